"""Write a model as a Hugging Face checkpoint directory that transformers loads as is.

Writes config.json, generation_config.json, model.safetensors (or shards with an
index), and the tokenizer files. The directory appears atomically: everything is
written into a temporary sibling, fsynced, then renamed into place, so an
interrupted save never leaves a half checkpoint. Not here: GGUF export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from weightsmith.errors import CheckpointError
from weightsmith.files import atomic_dir, check_replaceable
from weightsmith.models import CausalLM
from weightsmith.models.fused import fuse_state
from weightsmith.models.merged_experts import merge_experts
from weightsmith.tokenizer import Tokenizer

DEFAULT_SHARD_BYTES = 2 * 1024**3
#: A folder holding one of these is a checkpoint `--overwrite` may replace (files.check_replaceable).
CHECKPOINT_MARKERS = ("config.json", "model.safetensors", "model.safetensors.index.json")


def save_hf_dir(
    model: CausalLM,
    tokenizer: Tokenizer,
    out: str | Path,
    *,
    generation_config: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Save `model` and `tokenizer` to `out` (which must not exist unless `overwrite`)."""
    out = Path(out)
    check_out_dir(out, overwrite=overwrite)
    cfg = model.config.to_hf()
    if dtype is not None:
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    return write_hf_dir(out, cfg, state_for_hf(model, dtype), tokenizer, generation_config, max_shard_bytes)


def check_out_dir(out: Path, *, overwrite: bool) -> None:
    """Refuse an existing `out` unless `overwrite`, and then unless it is a checkpoint (never
    `.`, `..`, home or a folder of other files): before any work, nothing half-done."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise CheckpointError(f"{out}: already exists; choose another --out or pass --overwrite")
        check_replaceable(out, CHECKPOINT_MARKERS)


def write_hf_dir(
    out: Path,
    cfg: dict[str, Any],
    state: dict[str, torch.Tensor],
    tokenizer: Tokenizer,
    generation_config: dict[str, Any] | None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write config.json, generation_config.json, safetensors shards and the tokenizer into a
    temp folder beside `out`, fsync them, then swap it into place: the old `out` (which must
    look like a checkpoint) is moved aside and removed only once the new one is in."""
    with atomic_dir(out, markers=CHECKPOINT_MARKERS) as tmp:
        _write_json(tmp / "config.json", cfg)
        gen = {"bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id")}
        gen.update(generation_config or {})
        _write_json(tmp / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
        _write_shards(state, tmp, max_shard_bytes)
        tokenizer.save(tmp)
    return out


def state_for_hf(model: CausalLM, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors under the checkpoint's names; a tied LM head is stored once, as HF
    does; fused projections (Phi-3) stacked back into one tensor, gpt-oss's experts merged."""
    state = {}
    for name, p in model.named_parameters():
        t = p.detach()
        if dtype is not None:
            t = t.to(dtype)
        state[name] = t.to("cpu").contiguous()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    # Phi-3: qkv_proj, gate_up_proj; gpt-oss: each layer's experts; as transformers has them
    return merge_experts(model.config, fuse_state(model.config, state))


def _write_shards(state: dict[str, torch.Tensor], out: Path, max_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    total = sum(t.numel() * t.element_size() for t in state.values())
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    _write_json(
        out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
