"""Describe a checkpoint from its metadata alone: what `weightsmith info` prints.

Reads config.json / tokenizer_config.json of an HF folder, or a GGUF file's header, and reads
no weights. Imports no torch (nor anything that does), so `info` answers in a fraction of a
second.

Not here: loading a checkpoint (load.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from weightsmith.checkpoint.pooling import folder_pooling, gguf_pooling
from weightsmith.files import read_json
from weightsmith.models.config import ModelConfig


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    """Describe a checkpoint from its metadata alone (no weights are read)."""
    path = Path(path)
    if path.is_file():
        from weightsmith.checkpoint import gguf

        reader = gguf.open_gguf(path)
        info = gguf.read_gguf(reader)
        cfg = ModelConfig.from_hf(info.config, source=str(path))
        types = ", ".join(f"{n}: {c}" for n, c in sorted(info.tensor_types.items()))
        precision = f"{info.file_type} (GGUF tensors {types})"
        template = info.tokenizer_config.get("chat_template")
        fmt, size = "gguf", path.stat().st_size
        license_name = gguf.meta(reader, "general.license")
        pooling = gguf_pooling(reader, str(gguf.meta(reader, "general.architecture")))
    else:
        data = read_json(path / "config.json")
        cfg = ModelConfig.from_hf(data, source=str(path / "config.json"))
        precision = cfg.torch_dtype
        tok_cfg = read_json(path / "tokenizer_config.json", required=False) or {}
        template = tok_cfg.get("chat_template")
        jinja = path / "chat_template.jinja"
        if template is None and jinja.exists():
            template = jinja.read_text(encoding="utf-8")
        fmt = "hf"
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        license_name = None
        pooling = folder_pooling(path)
    rope = f"theta {cfg.rope_theta:g}" + (f", {cfg.rope_type} scaling" if cfg.rope_scaling else "")
    nope = [i for i in range(cfg.num_hidden_layers) if not cfg.rope_layer(i)]
    if nope:
        rope += f", none on {len(nope)} of {cfg.num_hidden_layers} layers"
    if cfg.rotary_dim < cfg.head_dim:
        rope += f", on {cfg.rotary_dim} of {cfg.head_dim} dimensions a head"
    return {
        "path": str(path),
        "format": fmt,
        "size_bytes": size,
        "model_type": cfg.model_type,
        "architecture": cfg.architecture,
        "parameters": cfg.num_parameters(),
        "precision": precision,
        "context_length": cfg.max_position_embeddings,
        "layers": cfg.num_hidden_layers,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "rope": rope,
        "sliding_window": cfg.sliding_window if "sliding_attention" in cfg.layer_types else None,
        "experts": f"{cfg.num_experts_per_tok} of {cfg.num_local_experts}" if cfg.num_local_experts else None,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "chat_template": template,
        "license": license_name,
        "pooling": pooling,  # an embedding model's (checkpoint/pooling.py), or None
    }
