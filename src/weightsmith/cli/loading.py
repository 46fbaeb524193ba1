"""How the CLI shows model loads: a spinner on stderr while a model loads (on a terminal).

A command that loads models is given a `Loading` as its progress: calls go to the command's
own progress (text as it arrives, ticks; None when it reports nothing, e.g. under --json),
and `loading(model)` is the spinner, which `weightsmith.commands.loading.load_status` finds.

Not here: loading models (`weightsmith.commands.loading.load_model`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console


def load_spinner(model: str) -> Any:
    """A spinner on stderr while a model loads, when stderr is a terminal."""
    if not sys.stderr.isatty():
        return contextlib.nullcontext()
    return Console(stderr=True, markup=False).status(f"loading {model}")


class Loading:
    """A command's progress that also shows model loads.

    Calling it calls `report`, the command's own progress; it is false when there is none,
    so a command's `if progress:` still means "someone listens"."""

    def __init__(self, report: Any = None) -> None:
        self.report = report

    def __call__(self, *args: Any) -> Any:
        return None if self.report is None else self.report(*args)

    def __bool__(self) -> bool:
        return self.report is not None

    def loading(self, model: str) -> Any:
        return load_spinner(model)


def with_loading(make: Callable[[Any], Any] | None = None) -> Callable[[Any], Loading]:
    """A `Command.progress` factory: `make(cfg)`'s progress (None: none), showing model loads."""
    return lambda cfg: Loading(make(cfg) if make is not None else None)
