"""The model: config (config.json fields), the transformer, rotary embeddings.

`CausalLM` is imported on first use (PEP 562), so reading a config (`weightsmith info`) does not
import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from weightsmith.models.config import FAMILIES, ModelConfig

if TYPE_CHECKING:
    from weightsmith.models.model import CausalLM

__all__ = ["FAMILIES", "CausalLM", "ModelConfig"]


def __getattr__(name: str) -> Any:
    if name == "CausalLM":
        from weightsmith.models.model import CausalLM

        return CausalLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
