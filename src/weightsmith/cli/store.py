"""Commands that manage models on disk: pull, models, rm, info.

Each command is a config dataclass, a `run_*` function returning data, and a
`print_*` function for people (`--json` prints the data instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from weightsmith.checkpoint import store
from weightsmith.checkpoint.catalog import CATALOG
from weightsmith.checkpoint.load import inspect_checkpoint
from weightsmith.checkpoint.pull import pull, resolve
from weightsmith.config import opt


@dataclass(kw_only=True)
class PullConfig:
    """Fetch a model into the store (catalog name, Hub repo id, or local path)."""

    spec: str = opt(help="catalog name, HF repo id (org/name) or local path", positional=True)
    name: str | None = opt(None, "store name for the model (default: derived from the source)")
    force: bool = opt(False, "pull again even if the model is already in the store")
    json: bool = opt(False, "print the store entry as JSON")


def run_pull(cfg: PullConfig) -> dict[str, Any]:
    entry = pull(cfg.spec, cfg.name, force=cfg.force)
    return entry.to_dict()


def print_pull(result: dict[str, Any], console: Console) -> None:
    console.print(f"[green]ready[/green] {result['name']} -> {result['path']}")


@dataclass(kw_only=True)
class ModelsConfig:
    """List the models in the store and the catalog."""

    json: bool = opt(False, "print the list as JSON")


def run_models(cfg: ModelsConfig) -> dict[str, Any]:
    entries = [e.to_dict() for e in store.list_models()]
    pulled = {e["name"] for e in entries}
    catalog = [
        {"name": name, "description": c.description, "license": c.license, "pulled": name in pulled}
        for name, c in CATALOG.items()
    ]
    return {"store": str(store.models_dir()), "models": entries, "catalog": catalog}


def print_models(result: dict[str, Any], console: Console) -> None:
    table = Table(title=f"models in {result['store']}", title_justify="left")
    for col in ("name", "kind", "size", "source", "path"):
        table.add_column(col)
    for e in result["models"]:
        size = f"{e['size_bytes'] / 1e6:,.0f} MB" if e.get("size_bytes") else "-"
        table.add_row(e["name"], e["kind"], size, str(e.get("source") or "-"), str(e["path"]))
    if result["models"]:
        console.print(table)
    else:
        console.print(f"no models in {result['store']} yet")
    missing = [c for c in result["catalog"] if not c["pulled"]]
    if missing:
        console.print("available from the catalog (weightsmith pull NAME):")
        for c in missing:
            console.print(f"  {c['name']}  {c['description']}")


@dataclass(kw_only=True)
class RmConfig:
    """Remove a model from the store (registered local paths are only unregistered)."""

    name: str = opt(help="store name of the model", positional=True)
    json: bool = opt(False, "print the result as JSON")


def run_rm(cfg: RmConfig) -> dict[str, Any]:
    store.remove(cfg.name)
    return {"removed": cfg.name}


def print_rm(result: dict[str, Any], console: Console) -> None:
    console.print(f"removed {result['removed']}")


@dataclass(kw_only=True)
class InfoConfig:
    """Show a model's family, size, precision, context length and chat template."""

    model: str = opt(help="catalog or store name, HF directory, or .gguf file", positional=True)
    template: bool = opt(False, "print the whole chat template")
    json: bool = opt(False, "print the information as JSON")


def run_info(cfg: InfoConfig) -> dict[str, Any]:
    return inspect_checkpoint(resolve(cfg.model))


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
    table = Table(show_header=False, box=None)
    for k, v in rows:
        table.add_row(f"[bold]{k}[/bold]", str(v))
    console.print(table)
    tpl = result.get("chat_template")
    if not tpl:
        console.print("[bold]chat template[/bold]  none (use `generate`, not `chat`)")
    elif template:
        console.print("[bold]chat template[/bold]")
        console.print(tpl, markup=False, highlight=False)
    else:
        first = tpl.strip().splitlines()[0]
        console.print(f"[bold]chat template[/bold]  {len(tpl)} chars: {first[:80]}... (--template shows it)")
