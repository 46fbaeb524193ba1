"""The guard commands: check a text against a guardrail policy, or test a policy on its examples.

`run_guard_check` runs the policy's input rails (or, with `output`, its output rails) on
one text and returns the verdict, the deciding rule and the refusal. `run_guard_test` runs
every example in the policy file and raises `GuardTestFailed` (exit 1), carrying the
per-example table, when any example gets another verdict than it expects.

Not here: the policy format and the checking itself (weightsmith.safety.policy), reading
the text from stdin and the tables (weightsmith.cli.guard).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from weightsmith.config import opt
from weightsmith.errors import UsageError, WeightsmithError
from weightsmith.safety.policy_file import ClassifierAccess


class GuardTestFailed(WeightsmithError):
    """A policy's own examples did not all pass; `result` holds the per-example table."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


@dataclass(kw_only=True)
class GuardCheckConfig:
    """Check one text against a guardrail policy's input (or output) rails."""

    policy: str = opt(help="policy file (.yaml) or builtin:NAME (e.g. builtin:school)", positional=True)
    classifier: ClassifierAccess = opt(default_factory=ClassifierAccess, flatten=True)
    text: str | None = opt(None, "the text to check; read from stdin when absent or '-'", positional=True)
    output: bool = opt(False, "check the text as model output (output rails) instead of user input")
    json: bool = opt(False, "print the result as JSON")


@dataclass(kw_only=True)
class GuardTestConfig:
    """Run a guardrail policy against the examples in its own file; fail if any disagrees."""

    policy: str = opt(help="policy file (.yaml) or builtin:NAME (e.g. builtin:school)", positional=True)
    classifier: ClassifierAccess = opt(default_factory=ClassifierAccess, flatten=True)
    json: bool = opt(False, "print the result as JSON")


def _load(cfg: GuardCheckConfig | GuardTestConfig) -> Any:
    from weightsmith.safety.policy import Guard

    return Guard.load(cfg.policy, grants=cfg.classifier.grants())


def run_guard_check(cfg: GuardCheckConfig, progress: Any = None) -> dict[str, Any]:
    """The policy's verdict on `cfg.text` (the CLI reads it from stdin when absent or '-')."""
    if cfg.text is None or cfg.text == "-":
        raise UsageError("no text to check: pass TEXT, or pipe it on stdin (TEXT '-' or absent)")
    text = cfg.text
    guard = _load(cfg)
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


def run_guard_test(cfg: GuardTestConfig, progress: Any = None) -> dict[str, Any]:
    """Run the policy's examples; when any fails, raise GuardTestFailed ("N of M examples
    failed: ...") carrying the whole result, which the CLI shows before the error line."""
    guard = _load(cfg)
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
        where = ", ".join(f"line {r['line']}" for r in failed[:5]) + (", ..." if len(failed) > 5 else "")
        raise GuardTestFailed(
            f"{guard.path}: {len(failed)} of {len(rows)} examples failed ({where}); "
            "fix the rules or the examples' expect:",
            result,
        )
    return result
