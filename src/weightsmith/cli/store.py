"""Printers for the store commands (pull, models, rm, info); `--json` prints the data instead.

Not here: the commands themselves (`weightsmith.commands.store`).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

#: Text from files and paths is never markup: styles are given as Text, never as [tags].
TEMPLATE = ("chat template", "bold")


def print_pull(result: dict[str, Any], console: Console) -> None:
    console.print(Text.assemble(("ready", "green"), f" {result['name']} -> {result['path']}"))


def print_models(result: dict[str, Any], console: Console) -> None:
    table = Table(title=f"models in {result['store']}", title_justify="left")
    for col in ("name", "kind", "size", "source", "license", "path"):
        table.add_column(col)
    for e in result["models"]:
        size = f"{e['size_bytes'] / 1e6:,.0f} MB" if e.get("size_bytes") else "-"
        row = (
            e["name"],
            e["kind"],
            size,
            str(e.get("source") or "-"),
            e.get("license") or "-",
            str(e["path"]),
        )
        table.add_row(*(Text(str(v)) for v in row))
    if result["models"]:
        console.print(table)
    else:
        console.print(f"no models in {result['store']} yet")
    missing = [c for c in result["catalog"] if not c["pulled"]]
    if missing:
        console.print("available from the catalog (weightsmith pull NAME):")
        for c in missing:
            console.print(f"  {c['name']}  {c['description']}  [license: {c['license']}]", markup=False)


def print_rm(result: dict[str, Any], console: Console) -> None:
    console.print(f"removed {result['removed']}")


def print_info(result: dict[str, Any], console: Console, *, template: bool = False) -> None:
    rows = [
        ("path", result["path"]),
        ("format", result["format"]),
        ("family", f"{result['model_type']} ({result['architecture']})"),
        ("parameters", f"{result['parameters'] / 1e6:,.1f} M"),
        ("precision", result["precision"]),
        ("context length", f"{result['context_length']:,}"),
        ("layers / heads / kv heads", f"{result['layers']} / {result['heads']} / {result['kv_heads']}"),
        ("hidden / ffn size", f"{result['hidden_size']} / {result['intermediate_size']}"),
        ("vocabulary", f"{result['vocab_size']:,}"),
        ("rope", result["rope"]),
    ]
    if result.get("experts"):
        rows.append(("experts", result["experts"]))
    if result.get("sliding_window"):
        rows.append(("sliding window", result["sliding_window"]))
    if result.get("pooling"):
        rows.append(("embedding pooling", result["pooling"]))
    if result.get("license"):
        rows.append(("license", result["license"]))
    table = Table(show_header=False, box=None)
    for k, v in rows:
        table.add_row(Text(k, style="bold"), Text(str(v)))
    console.print(table)
    tpl = result.get("chat_template")
    if not tpl:
        console.print(Text.assemble(TEMPLATE, "  none (use `generate`, not `chat`)"))
    elif template:
        console.print(Text.assemble(TEMPLATE))
        console.print(tpl, markup=False, highlight=False)
    else:
        first = tpl.strip().splitlines()[0]
        console.print(Text.assemble(TEMPLATE, f"  {len(tpl)} chars: {first[:80]}... (--template shows it)"))
