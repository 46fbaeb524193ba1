"""The config.json we write works in transformers' fast path: per family, only keys that
transformers' config class defines (v4-style rope keys, which v5 still reads, aside), and a
checkpoint we save runs `generate(cache_implementation="static")` with the dynamic cache's
greedy tokens (a Llama config carrying `layer_types` made that fail in transformers 5.17-5.25)."""

from __future__ import annotations

import pytest
import torch

from weightsmith.checkpoint.load import load_checkpoint
from weightsmith.checkpoint.save import save_hf_dir
from weightsmith.models.config import ModelConfig

transformers = pytest.importorskip("transformers")

CLASSES = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
    "mixtral": transformers.MixtralConfig,
    "qwen3_moe": transformers.Qwen3MoeConfig,
}
#: Keys transformers reads without its config class listing them among its defaults (Qwen3-MoE's
#: `num_experts`, the released checkpoints' name, is its attribute map's alias of num_local_experts).
READ_ANYWAY = {"rope_theta", "rope_scaling", "torch_dtype", "architectures", "model_type", "num_experts"}
SHAPE = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip


@pytest.mark.parametrize("family", sorted(CLASSES))
def test_written_keys_are_ones_transformers_defines(family):
    extra = {"sliding_window": 64} if family in ("mistral", "mixtral") else {}
    if family == "mixtral":
        extra |= {"num_local_experts": 4, "num_experts_per_tok": 2}
    if family == "qwen3_moe":
        extra |= {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "mlp_only_layers": [1],
        }
    cfg = ModelConfig.from_hf({"model_type": family, **SHAPE, **extra}, source="test")
    written = cfg.to_hf()
    known = set(CLASSES[family]().to_dict()) | READ_ANYWAY
    assert sorted(set(written) - known) == []
    # ... and reading it back gives the same config.
    assert ModelConfig.from_hf(written, source="test") == cfg


def test_a_saved_checkpoint_runs_transformers_static_cache_generate(tiny_hf_dir, tmp_path):
    ckpt = load_checkpoint(tiny_hf_dir, dtype=torch.float32, device="cpu")
    out = tmp_path / "saved"
    save_hf_dir(ckpt.model, ckpt.tokenizer, out)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.inference_mode():
        dynamic = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        static = model.generate(
            ids, max_new_tokens=12, do_sample=False, pad_token_id=0, cache_implementation="static"
        )
    assert static.tolist() == dynamic.tolist()
