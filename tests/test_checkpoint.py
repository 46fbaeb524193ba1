"""HF checkpoint directories: sharded weights, saving (atomic, loadable by
transformers), config errors naming file and line, generation_config defaults."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from weightsmith.checkpoint import save as save_mod
from weightsmith.checkpoint.load import load_checkpoint
from weightsmith.checkpoint.save import save_hf_dir
from weightsmith.errors import CheckpointError

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tiny_hf_dir):
    return load_checkpoint(tiny_hf_dir)


def test_sharded_save_loads_back_and_in_transformers(tiny, tmp_path):
    out = save_hf_dir(tiny.model, tiny.tokenizer, tmp_path / "sharded", max_shard_bytes=40_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    ids = torch.tensor([[5, 9, 33, 120, 7]])
    again = load_checkpoint(out)
    with torch.no_grad():
        want = tiny.model(ids)
        assert torch.equal(again.model(ids), want)
        hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert (hf(ids).logits - want).abs().max().item() <= 1e-5


def test_missing_shard_is_named(tiny, tmp_path):
    out = save_hf_dir(tiny.model, tiny.tokenizer, tmp_path / "sharded", max_shard_bytes=40_000)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_checkpoint(out)


def test_save_refuses_existing_and_interrupted_save_leaves_nothing(tiny, tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        save_hf_dir(tiny.model, tiny.tokenizer, target)
    target.rmdir()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(save_mod, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_hf_dir(tiny.model, tiny.tokenizer, target)
    assert list(tmp_path.iterdir()) == []


def test_config_json_syntax_error_names_line(tiny_hf_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_hf_dir, bad)
    text = (bad / "config.json").read_text().splitlines()
    text[3] = text[3] + " oops"
    (bad / "config.json").write_text("\n".join(text))
    with pytest.raises(CheckpointError, match=r"config\.json:4: invalid JSON"):
        load_checkpoint(bad)


def test_missing_tensor_is_named(tiny_hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "missing"
    shutil.copytree(tiny_hf_dir, bad)
    state = load_file(bad / "model.safetensors")
    del state["model.layers.0.self_attn.v_proj.weight"]
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.layers.0.self_attn.v_proj.weight"):
        load_checkpoint(bad)


def test_generation_config_sets_sampling_defaults(tiny_hf_dir, tmp_path):
    import weightsmith as ws

    d = tmp_path / "gen"
    shutil.copytree(tiny_hf_dir, d)
    gen = json.loads((d / "generation_config.json").read_text())
    gen.update({"do_sample": True, "temperature": 0.3, "top_p": 0.8, "eos_token_id": [2, 5]})
    (d / "generation_config.json").write_text(json.dumps(gen))
    llm = ws.load(str(d))
    sp = llm.sampling_params()
    assert (sp.temperature, sp.top_p) == (0.3, 0.8)
    assert llm.sampling_params(temperature=0).temperature == 0
    assert {2, 5} <= llm.engine.eos_token_ids
