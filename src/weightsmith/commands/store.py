"""Commands that manage models on disk: pull, models, rm, info.

Each command is a config dataclass and a `run_*` function returning plain data.
Not here: the store itself (`weightsmith.checkpoint.store`, `.catalog`, `.pull`), printing (`weightsmith.cli.store`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from weightsmith.checkpoint import store
from weightsmith.checkpoint.catalog import CATALOG
from weightsmith.checkpoint.pull import pull, resolve
from weightsmith.config import opt


@dataclass(kw_only=True)
class PullConfig:
    """Fetch a model into the store (catalog name, Hub repo id, or local path)."""

    spec: str = opt(help="catalog name, HF repo id (org/name) or local path", positional=True)
    name: str | None = opt(None, "store name for the model (default: derived from the source)")
    force: bool = opt(False, "pull again even if the model is already in the store")
    accept_license: bool = opt(
        False, "accept the license terms of a catalog model that is not openly licensed (e.g. Gemma's)"
    )
    json: bool = opt(False, "print the store entry as JSON")


def run_pull(cfg: PullConfig, progress: Any = None) -> dict[str, Any]:
    entry = pull(cfg.spec, cfg.name, force=cfg.force, accept_license=cfg.accept_license)
    return entry.to_dict()


@dataclass(kw_only=True)
class ModelsConfig:
    """List the models in the store and the catalog."""

    json: bool = opt(False, "print the list as JSON")


def run_models(cfg: ModelsConfig, progress: Any = None) -> dict[str, Any]:
    entries = [e.to_dict() for e in store.list_models()]
    for e in entries:
        e["license"] = CATALOG[e["catalog"]].license if e.get("catalog") in CATALOG else None
    pulled = {e["name"] for e in entries}
    catalog = [
        {
            "name": name,
            "description": c.description,
            "license": c.license,
            "terms_url": c.terms_url,
            "pulled": name in pulled,
        }
        for name, c in CATALOG.items()
    ]
    return {"store": str(store.models_dir()), "models": entries, "catalog": catalog}


@dataclass(kw_only=True)
class RmConfig:
    """Remove a model from the store (registered local paths are only unregistered)."""

    name: str = opt(help="store name of the model", positional=True)
    json: bool = opt(False, "print the result as JSON")


def run_rm(cfg: RmConfig, progress: Any = None) -> dict[str, Any]:
    store.remove(cfg.name)
    return {"removed": cfg.name}


@dataclass(kw_only=True)
class InfoConfig:
    """Show a model's family, size, precision, context length and chat template."""

    model: str = opt(help="catalog or store name, HF directory, or .gguf file", positional=True)
    template: bool = opt(False, "print the whole chat template")
    json: bool = opt(False, "print the information as JSON")


def run_info(cfg: InfoConfig, progress: Any = None) -> dict[str, Any]:
    from weightsmith.checkpoint.describe import inspect_checkpoint

    info = inspect_checkpoint(resolve(cfg.model))
    return {**info, "license": _license(cfg.model, info.get("license"))}


def _license(model: str, from_file: str | None) -> str | None:
    """The model's license: the catalog's words for a catalog model (pulled under that name), else
    what the checkpoint itself says (GGUF `general.license`, config/README are not read)."""
    entry = store.get_entry(model) if store.is_name(model) else None
    catalog = CATALOG.get(model if entry is None else (entry.catalog or ""))
    return catalog.license if catalog is not None else from_file
