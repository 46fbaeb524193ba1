"""The model: config (config.json fields), the transformer, rotary embeddings."""

from weightsmith.models.config import FAMILIES, ModelConfig
from weightsmith.models.model import CausalLM

__all__ = ["FAMILIES", "CausalLM", "ModelConfig"]
