"""One entry of the command line: its config class, help, run function, printer and progress.

`weightsmith.cli.main.COMMANDS` is built from these; a group of commands (a module of its
own, e.g. `cli/lineage.py`) may declare its entries where its printers are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.console import Console

#: A printer for people: `show(result, console, cfg)`.
Show = Callable[[Any, Console, Any], None]


@dataclass(frozen=True)
class Command:
    """One command: its config class, help, examples, and how it runs and shows itself.

    `run(cfg, progress)` does the work and returns data (a `weightsmith.commands` function, or a
    CLI function where the command needs the terminal: a prompt or text on stdin, chat's loop,
    the demo's narration); `progress(cfg)` makes what `run` reports progress to (None: nothing);
    `show` prints the result for people (None: `run` already showed it). `--json` prints the
    result instead of `show`."""

    config: type
    help: str
    examples: str
    run: Callable[[Any, Any], Any]
    show: Show | None = None
    progress: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class Group:
    """A command with subcommands (`weightsmith guard check ...`); dispatched as "guard check"."""

    help: str
    commands: dict[str, Command]
