"""`weightsmith arena serve` on the command line: its entry in the `arena` group, the banner
once it listens, a line when it stops.

Not here: the server (`weightsmith.commands.arena_serve`, `weightsmith.arena.page`).
"""

from __future__ import annotations

import sys
from typing import Any

from weightsmith.commands import arena_serve


def print_listening(url: str, info: dict[str, Any], out: Any) -> None:
    out.write(
        f"weightsmith arena serve: {info['contestants']} contestants, {info['prompts']} prompts, "
        f"votes in {info['db']}; listening on {url}\n"
    )
    out.write(f"  arena page {url}/\n")
    if info["vote_key"]:
        out.write("  private: battles and votes need the vote key\n")
    out.flush()


def print_stopped(result: Any, console: Any = None, cfg: Any = None) -> None:
    t = result["battles"]
    sys.stderr.write(
        f"weightsmith arena serve: stopped; battles in the DB: {t['voted']} voted, {t['open']} open for votes, "
        f"{t['expired']} expired unvoted, {t['pending']} never answered\n"
    )


def warn_visible_key(argv: list[str], console: Any) -> None:
    """One line on stderr when the vote key was typed on the command line (the process list shows it)."""
    if any(a == "--vote-key" or a.startswith("--vote-key=") for a in argv):
        console.print(
            "weightsmith arena serve: warning: --vote-key is visible in the process list; "
            f"use --vote-key-file PATH or ${arena_serve.VOTE_KEY_ENV} instead",
            markup=False,
        )
