"""One entry of the command line: its config class, help, run function, printer and progress.

`weightsmith.cli.main.COMMANDS` is built from these; a group of commands (a module of its
own, e.g. `cli/lineage.py`) may declare its entries where its printers are. Entries name
what lives in heavy modules (torch, models) with a `Ref`, imported only when that command
runs, so `weightsmith --help` or `weightsmith models` does not import every command.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.console import Console

#: A printer for people: `show(result, console, cfg)`.
Show = Callable[[Any, Console, Any], None]


@dataclass(frozen=True)
class Ref:
    """`module:name`, imported on first use; calling it calls what it names."""

    path: str

    def get(self) -> Any:
        module, _, name = self.path.partition(":")
        return getattr(importlib.import_module(module), name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.get()(*args, **kwargs)


def resolve(value: Any) -> Any:
    """What `value` names when it is a `Ref`, else `value` itself."""
    return value.get() if isinstance(value, Ref) else value


@dataclass(frozen=True)
class Command:
    """One command: its config class, help, examples, and how it runs and shows itself.

    `run(cfg, progress)` does the work and returns data (a `weightsmith.commands` function, or a
    CLI function where the command needs the terminal: a prompt or text on stdin, chat's loop,
    the demo's narration); `progress(cfg)` makes what `run` reports progress to (None: nothing);
    `show` prints the result for people (None: `run` already showed it). `--json` prints the
    result instead of `show`."""

    config: type | Ref
    help: str
    examples: str
    run: Callable[[Any, Any], Any]
    show: Show | None = None
    progress: Callable[[Any], Any] | None = None

    def config_class(self) -> type:
        return resolve(self.config)


@dataclass(frozen=True)
class Group:
    """A command with subcommands (`weightsmith guard check ...`); dispatched as "guard check"."""

    help: str
    commands: dict[str, Command]
