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
