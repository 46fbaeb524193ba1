"""How serve shows itself: the banner once it listens, and a line when it stops.

Not here: the server (`weightsmith.commands.serve`, `weightsmith.serve`).
"""

from __future__ import annotations

import sys
from typing import Any


def print_listening(url: str, state: Any, out) -> None:
    out.write(f"weightsmith serve: loading {state.served_name}; listening on {url}\n")
    out.write(
        f"  OpenAI base URL {url}/v1   chat page {url}/   health {url}/health   metrics {url}/metrics\n"
    )
    if state.settings.api_key:
        out.write("  an API key is required (Authorization: Bearer KEY)\n")
    guard = state.guard
    if guard is not None:
        out.write(f"  guardrail policy {guard.name} version {guard.version} on every request\n")
    out.flush()


def print_stopped(result: Any, console: Any = None) -> None:
    sys.stderr.write("weightsmith serve: stopped\n")


def warn_visible_key(argv: list[str], console: Any) -> None:
    """One line on stderr when the API key was typed on the command line, where every user of
    the machine can read it (ps, /proc/PID/cmdline)."""
    if any(a == "--api-key" or a.startswith("--api-key=") for a in argv):
        console.print(
            "weightsmith serve: warning: --api-key is visible in the process list; "
            "use --api-key-file PATH or $WEIGHTSMITH_API_KEY instead",
            markup=False,
        )
