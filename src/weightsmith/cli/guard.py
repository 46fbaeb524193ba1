"""The `guard` commands: check a text against a guardrail policy, or test a policy on its examples.

`weightsmith guard check POLICY "text"` runs the policy's input rails (or, with --output, its
output rails) on one text and shows the verdict, the deciding rule and the refusal.
`weightsmith guard test POLICY` runs every example in the policy file and fails (exit 1)
when any example gets another verdict than it expects. Not here: the policy format and the
checking itself (weightsmith.safety.policy).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from weightsmith.config import opt
from weightsmith.errors import UsageError, WeightsmithError

_ACTION_STYLE = {"allow": "green", "redact": "yellow", "block": "bold red"}


class GuardTestFailed(WeightsmithError):
    """A policy's own examples did not all pass; `result` holds the per-example table."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


@dataclass(kw_only=True)
class GuardCheckConfig:
    """Check one text against a guardrail policy's input (or output) rails."""

    policy: str = opt(help="policy file (.yaml) or builtin:NAME (e.g. builtin:school)", positional=True)
    text: str | None = opt(None, "the text to check; read from stdin when absent or '-'", positional=True)
    output: bool = opt(False, "check the text as model output (output rails) instead of user input")
    json: bool = opt(False, "print the result as JSON")


@dataclass(kw_only=True)
class GuardTestConfig:
    """Run a guardrail policy against the examples in its own file; fail if any disagrees."""

    policy: str = opt(help="policy file (.yaml) or builtin:NAME (e.g. builtin:school)", positional=True)
    json: bool = opt(False, "print the result as JSON")


def _load(spec: str) -> Any:
    from weightsmith.safety.policy import Guard

    return Guard.load(spec)


def _read_text(text: str | None) -> str:
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


def run_guard_check(cfg: GuardCheckConfig) -> dict[str, Any]:
    text = _read_text(cfg.text)
    guard = _load(cfg.policy)
    direction = "output" if cfg.output else "input"
    if direction == "output" and not guard.has_output_rails:
        raise UsageError(f"{guard.path}: policy {guard.name} has no output rails; drop --output")
    v = guard.check_many([text], direction)[0]
    return {
        "policy": guard.name,
        "version": guard.version,
        "direction": direction,
        "action": v.action,
        "rule": v.rule,
        "category": v.category,
        "matched": v.matched,
        "text": v.text,
        "refusal": v.refusal,
    }


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


def run_guard_test(cfg: GuardTestConfig, *, console: Console | None = None) -> dict[str, Any]:
    """Run the policy's examples. When any fails, show the table (or JSON with --json) on
    `console` / stdout first, then raise GuardTestFailed ("N of M examples failed: ...")."""
    guard = _load(cfg.policy)
    rows = guard.run_examples()
    failed = [r for r in rows if not r["ok"]]
    result = {
        "policy": guard.name,
        "version": guard.version,
        "path": guard.path,
        "digest": guard.digest,
        "passed": len(rows) - len(failed),
        "failed": len(failed),
        "examples": rows,
    }
    if not rows:
        raise UsageError(f"{guard.path}: policy {guard.name} has no examples; add some under examples:")
    if failed:
        if cfg.json:
            print(json.dumps(result, indent=2, ensure_ascii=False, default=str))
        else:
            print_guard_test(result, console or Console(highlight=False, emoji=False))
        where = ", ".join(f"line {r['line']}" for r in failed[:5]) + (", ..." if len(failed) > 5 else "")
        raise GuardTestFailed(
            f"{guard.path}: {len(failed)} of {len(rows)} examples failed ({where}); "
            "fix the rules or the examples' expect:",
            result,
        )
    return result


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
