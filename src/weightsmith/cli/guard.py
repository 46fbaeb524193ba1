"""The terminal side of the guard commands: the text from stdin, and the verdict tables.

Not here: the commands (`weightsmith.commands.guard`) and the policies (`weightsmith.safety.policy`).
"""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from weightsmith.commands.guard import GuardCheckConfig, run_guard_check
from weightsmith.errors import UsageError

_ACTION_STYLE = {"allow": "green", "redact": "yellow", "block": "bold red"}


def read_text(text: str | None) -> str:
    """TEXT as given, or standard input when it is absent or '-'."""
    if text is not None and text != "-":
        return text
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("no text to check: pass TEXT, or pipe it on stdin (TEXT '-' or absent)")
    data = sys.stdin.read()
    if data.endswith("\n"):
        data = data[:-1]
    if not data.strip():
        raise UsageError("no text to check: stdin was empty")
    return data


def check(cfg: GuardCheckConfig, progress: Any = None) -> dict[str, Any]:
    """`guard check`: TEXT, or the text on stdin, through `run_guard_check`."""
    cfg.text = read_text(cfg.text)
    return run_guard_check(cfg)


def print_guard_check(result: dict[str, Any], console: Console) -> None:
    action = result["action"]
    title = f"{result['policy']} {result['version']} ({result['direction']} rails)"
    table = Table(title=title, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("action", Text(action.upper(), style=_ACTION_STYLE.get(action, "")))
    for key in ("rule", "category", "matched"):
        if result.get(key) is not None:
            table.add_row(key, Text(str(result[key])))
    if action == "redact":
        table.add_row("redacted text", Text(result["text"]))
    if result.get("refusal"):
        table.add_row("refusal", Text(result["refusal"]))
    console.print(table)


def print_guard_test(result: dict[str, Any], console: Console) -> None:
    rows = result["examples"]
    title = f"{result['policy']} {result['version']}: {result['passed']} of {len(rows)} examples pass"
    table = Table(title=title)
    table.add_column("line", justify="right")
    table.add_column("dir")
    table.add_column("text", overflow="fold", max_width=60)
    table.add_column("expect")
    table.add_column("got")
    table.add_column("rule")
    table.add_column("ok")
    for r in rows:
        got = Text(r["got"], style=_ACTION_STYLE.get(r["got"], ""))
        ok = Text("ok", style="green") if r["ok"] else Text(f"FAIL: {r['problem']}", style="bold red")
        expect = r["expect"] + (f" ({r['expect_rule']})" if r["expect_rule"] else "")
        table.add_row(str(r["line"]), r["direction"][:3], Text(r["text"]), expect, got, r["rule"] or "", ok)
    console.print(table)
