"""How quantize shows itself: the written directory and, with --check, the comparison table.

Not here: the command and its check (`weightsmith.commands.quantize`).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def print_quantize(result: dict[str, Any], console: Console) -> None:
    console.print(
        f"wrote {result['out']} ({result['quantization']}, {result['modules_quantized']} modules, "
        f"{result['bytes'] / 1e6:,.1f} MB)"
    )
    check = result.get("check")
    if check is None:
        return
    table = Table(title="quantization check (text sample, greedy decoding)")
    table.add_column("metric")
    table.add_column("original", justify="right")
    table.add_column(result["quantization"], justify="right")
    table.add_column("change", justify="right")
    table.add_row(
        "word perplexity",
        f"{check['word_perplexity_original']:.3f}",
        f"{check['word_perplexity_quantized']:.3f}",
        f"{check['perplexity_change_pct']:+.2f}%",
    )
    agree = check["greedy_agreement"]
    where = f"{check['prompts']} prompts x {check['tokens_per_prompt']} tokens"
    table.add_row("greedy agreement, before first divergence", where, f"{agree['before_divergence']:.1%}", "")
    table.add_row("greedy agreement, all positions", where, f"{agree['overall']:.1%}", "")
    console.print(table)
