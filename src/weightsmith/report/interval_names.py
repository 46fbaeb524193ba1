"""The words reports show for an interval method: "95% Wilson score" for
{"method": "wilson", "level": 0.95}.

Every report names the method behind its intervals; the pages (this floor) and the terminal
printers (cli/) share these names so that both say the same thing. The method ids are the
ones `weightsmith.eval.intervals` writes into results.
Not here: computing intervals (weightsmith.eval.intervals, weightsmith.eval.stats).
"""

from __future__ import annotations

from typing import Any

METHOD_NAMES: dict[str, str] = {
    "wilson": "Wilson score",
    "clopper-pearson": "Clopper–Pearson exact",
    "newcombe-paired": "Newcombe's hybrid score for paired proportions (method 10)",
    "newcombe": "Newcombe's hybrid score for independent proportions (method 10)",
    "bootstrap": "percentile bootstrap",
    "paired-bootstrap": "paired percentile bootstrap",
}

# For table cells and terminal columns, where the full name does not fit.
SHORT_NAMES: dict[str, str] = {
    "wilson": "Wilson",
    "clopper-pearson": "Clopper–Pearson",
    "newcombe-paired": "Newcombe paired",
    "newcombe": "Newcombe",
    "bootstrap": "bootstrap",
    "paired-bootstrap": "paired bootstrap",
}


def method_line(info: dict[str, Any] | None, *, short: bool = False) -> str:
    """'95% Wilson score' for an interval record {"method", "level"} ('' for None)."""
    if not info:
        return ""
    method = str(info.get("method"))
    level = info.get("level", 0.95)
    return f"{100 * level:g}% {(SHORT_NAMES if short else METHOD_NAMES).get(method, method)}"
