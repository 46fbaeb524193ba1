"""The old import path of the model store, kept so code written against it still runs.

The store now lives in three modules, one idea each: checkpoint/store.py (the local
store), checkpoint/catalog.py (well-known models) and checkpoint/pull.py (`pull` from the
three sources, and `resolve`). New code imports from those; this module only re-exports
their public names.

Not here: any code.
"""

from weightsmith.checkpoint.catalog import CATALOG, CatalogEntry
from weightsmith.checkpoint.pull import HF_ALLOW_PATTERNS, pull, resolve
from weightsmith.checkpoint.store import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    StoreEntry,
    get_entry,
    list_models,
    models_dir,
    remove,
    validate_name,
    weightsmith_home,
)

__all__ = [
    "CATALOG",
    "HF_ALLOW_PATTERNS",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "CatalogEntry",
    "StoreEntry",
    "get_entry",
    "list_models",
    "models_dir",
    "pull",
    "remove",
    "resolve",
    "validate_name",
    "weightsmith_home",
]
