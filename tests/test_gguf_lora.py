"""LoRA adapters as llama.cpp's GGUF adapter files (`export --adapter`, `--adapter x.gguf`).

Checked against references that are not ours:
- gguf-py's own reader applies each file by llama.cpp's rule (W + alpha/rank * B A, or B A when
  alpha is 0) to the base's GGUF export, and must give the GGUF export of the merged model, for
  plain LoRA, rsLoRA with rank/alpha patterns (scales carried in B), Qwen2 and Phi-3's fused
  projections;
- llama.cpp's own `convert_lora_to_gguf.py`, where `LLAMA_CPP_SRC` names a llama.cpp source tree,
  writes the same tensors and alpha from the same PEFT adapter;
- llama.cpp itself (llama-cpp-python, where installed) runs the real default model with our
  adapter file to the logits and greedy tokens we compute from the PEFT folder.
Reading a file back gives the folder's logits; bad files and requests fail in one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import build_tiny_hf_dir, build_tiny_tokenizer_dir, run_cli, write_gguf

from weightsmith.checkpoint.gguf_write import export_gguf
from weightsmith.checkpoint.load import load_checkpoint
from weightsmith.errors import CheckpointError, UsageError
from weightsmith.lora import LoraConfig, apply_lora, load_adapter, merge_and_unload, save_adapter
from weightsmith.lora.files import write_gguf_adapter_file
from weightsmith.lora.gguf_files import read_gguf_adapter

transformers = pytest.importorskip("transformers")

IDS = torch.tensor([[5, 17, 40, 100, 250, 3, 77, 299]])
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: name -> LoraConfig kwargs: plain LoRA (one alpha), and rsLoRA with patterns (scales in B).
VARIANTS = {
    "plain": dict(r=4, alpha=8, target_modules=ALL),
    "patterns": dict(
        r=4,
        alpha=8,
        use_rslora=True,
        target_modules=ALL + ["lm_head"],
        rank_pattern={"k_proj": 2, "layers.1.mlp.down_proj": 6},
        alpha_pattern={"o_proj": 3},
    ),  # fmt: skip
}


def build_tiny_qwen2_dir(path: Path) -> Path:
    build_tiny_tokenizer_dir(path)
    cfg = transformers.Qwen2Config(**TINY, tie_word_embeddings=False, eos_token_id=2)
    torch.manual_seed(1)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(path)
    return path


def build_tiny_phi3_dir(path: Path) -> Path:
    build_tiny_tokenizer_dir(path)
    cfg = transformers.Phi3Config(**TINY, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(2)
    transformers.Phi3ForCausalLM(cfg).save_pretrained(path)
    return path


TINY = dict(
    vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256,
)  # fmt: skip


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-lora-bases")
    return {
        "llama": build_tiny_hf_dir(root / "llama", tie_word_embeddings=False),
        "qwen2": build_tiny_qwen2_dir(root / "qwen2"),
        "phi3": build_tiny_phi3_dir(root / "phi3"),
    }


def make_adapter(base: Path, out: Path, seed: int = 5, std: float = 0.1, **kw) -> Path:
    """A trained-looking adapter (random A and B) for `base`, saved as a PEFT folder."""
    model = load_checkpoint(base, decode_layout=False).model
    cfg = LoraConfig(**kw)
    apply_lora(model, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, std)
    return save_adapter(model, out, cfg)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(IDS)
    return getattr(out, "logits", out).float()


def with_adapter(base: Path, adapter: Path):
    model = load_checkpoint(base, decode_layout=False).model
    load_adapter(model, adapter)
    return model


def gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as float32, read by gguf-py (llama.cpp's own Python reader)."""
    reader = gguf.GGUFReader(path)
    return {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors}


def gguf_alpha(path: Path) -> float:
    field = gguf.GGUFReader(path).fields[gguf.Keys.Adapter.LORA_ALPHA]
    return float(field.contents())


# ---------------------------------------------------------------------------------------------
# What llama.cpp computes from the file


@pytest.mark.parametrize(
    ("family", "variant"),
    [("llama", "plain"), ("llama", "patterns"), ("qwen2", "patterns"), ("phi3", "plain")],
)
def test_llama_cpp_s_rule_on_the_files_gives_the_merged_model_s_export(bases, tmp_path, family, variant):
    base = bases[family]
    kw = dict(VARIANTS[variant])
    if family == "phi3":  # LoRA on q/k/v and gate/up trained apart: llama.cpp's attn_qkv, ffn_up
        kw["target_modules"] = ["q_proj", "k_proj", "v_proj", "gate_proj", "down_proj"]
    adapter = make_adapter(base, tmp_path / "adapter", **kw)
    config = load_checkpoint(base, decode_layout=False).config
    write_gguf_adapter_file(adapter, config, tmp_path / "adapter.gguf", "f32")
    export_gguf(base, tmp_path / "base.gguf", "f32")
    merged = with_adapter(base, adapter)
    merge_and_unload(merged)
    ckpt = load_checkpoint(base, decode_layout=False)
    ckpt.model = merged
    export_gguf(ckpt, tmp_path / "merged.gguf", "f32")

    lora, weights, want = (gguf_tensors(tmp_path / f) for f in ("adapter.gguf", "base.gguf", "merged.gguf"))
    alpha = gguf_alpha(tmp_path / "adapter.gguf")
    # Mixed scales travel in B: patterns, and Phi-3's parts trained apart (one LoRA of rank 12 on
    # attn_qkv beside rank 4 on ffn_down).
    assert (alpha == 0.0) == (variant == "patterns" or family == "phi3")
    adapted = {n[: -len(".lora_a")] for n in lora if n.endswith(".lora_a")}
    assert adapted, "no adapter pairs in the file"
    for name, w in weights.items():
        if name in adapted:
            a, b = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]  # numpy (r, in), (out, r)
            scale = alpha / b.shape[1] if alpha else 1.0
            w = w + scale * (b @ a)
        np.testing.assert_allclose(w, want[name], rtol=1e-5, atol=1e-5, err_msg=name)
    changed = [n for n in adapted if not np.allclose(weights[n], want[n], atol=1e-4)]
    assert sorted(changed) == sorted(adapted)


@pytest.mark.parametrize(
    ("family", "variant"), [("llama", "plain"), ("llama", "patterns"), ("phi3", "plain")]
)
def test_a_gguf_adapter_loads_back_to_the_folder_s_logits(bases, tmp_path, family, variant):
    base = bases[family]
    adapter = make_adapter(base, tmp_path / "adapter", **VARIANTS[variant])
    config = load_checkpoint(base, decode_layout=False).config
    for quant, tol in (("f32", 1e-5), ("f16", 1e-2)):
        out = tmp_path / f"adapter-{quant}.gguf"
        write_gguf_adapter_file(adapter, config, out, quant)
        want, got = logits(with_adapter(base, adapter)), logits(with_adapter(base, out))
        assert (got - want).abs().max().item() < tol, quant
    assert (want - logits(load_checkpoint(base, decode_layout=False).model)).abs().max() > 0.05


def test_our_file_equals_llama_cpp_s_converter_output(bases, tmp_path):
    """llama.cpp's `convert_lora_to_gguf.py`, run on a PEFT-made adapter, writes what we write."""
    source = os.environ.get("LLAMA_CPP_SRC")
    if not source or not (Path(source) / "convert_lora_to_gguf.py").is_file():
        pytest.skip("set LLAMA_CPP_SRC to a llama.cpp source tree to compare with its converter")
    peft = pytest.importorskip("peft")
    base = bases["llama"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(base)
    model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(tmp_path / "peft")
    theirs = tmp_path / "theirs.gguf"
    env = {**os.environ, "PYTHONPATH": str(Path(source) / "gguf-py")}
    subprocess.run(
        [sys.executable, str(Path(source) / "convert_lora_to_gguf.py"), str(tmp_path / "peft"), "--base",
         str(base), "--outtype", "f32", "--outfile", str(theirs)],
        check=True, capture_output=True, env=env,
    )  # fmt: skip
    ours = tmp_path / "ours.gguf"
    write_gguf_adapter_file(tmp_path / "peft", load_checkpoint(base, decode_layout=False).config, ours, "f32")
    want, got = gguf_tensors(theirs), gguf_tensors(ours)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert gguf_alpha(ours) == gguf_alpha(theirs) == 8.0


def test_llama_cpp_runs_our_adapter_file_as_we_run_the_folder(default_gguf, tmp_path, capsys):
    """The real default model in llama.cpp with our file gives the logits we compute from the PEFT
    folder (to its f16 rounding: its base is F16, its KV cache f16), and its greedy tokens."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import weightsmith

    # On q and k only, the rows llama.cpp's rope reorders: a wrong order changes the logits by ~2.5.
    adapter = make_adapter(
        default_gguf,
        tmp_path / "adapter",
        seed=3,
        std=0.05,
        r=8,
        alpha=16,
        target_modules=["q_proj", "k_proj"],
    )
    export_gguf(default_gguf, tmp_path / "base.gguf", "f16")
    argv = [
        "export",
        str(tmp_path / "base.gguf"),
        "--adapter",
        str(adapter),
        "--out",
        str(tmp_path / "lora.gguf"),
    ]
    code, _, err = run_cli([*argv, "--quant", "f32"], capsys)
    assert code == 0, err
    ws = weightsmith.load(tmp_path / "base.gguf", adapter=adapter)
    prompt = ws.engine.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    with torch.no_grad():
        ours = logits_at(ws.model, prompt)
    tokens = ws.engine.generate([prompt], ws.sampling_params(temperature=0, max_tokens=8))[0].token_ids

    def theirs(**kw) -> tuple[np.ndarray, list[int]]:
        llama = llama_cpp.Llama(
            model_path=str(tmp_path / "base.gguf"),
            n_ctx=256,
            n_threads=2,
            verbose=False,
            logits_all=True,
            **kw,
        )
        llama.eval(prompt)
        last = np.array(llama.scores[len(prompt) - 1])
        out = []
        for token in llama.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            out.append(token)
            if len(out) == len(tokens):
                break
        return last, out

    adapted, greedy = theirs(lora_path=str(tmp_path / "lora.gguf"))
    base, _ = theirs()
    assert np.abs(adapted - ours).max() < 0.1
    assert np.abs(base - ours).max() > 1.0  # the adapter changes the logits
    assert greedy == tokens


def logits_at(model, ids: list[int]) -> np.ndarray:
    out = model(torch.tensor([ids]))
    return getattr(out, "logits", out)[0, -1].float().numpy()


# ---------------------------------------------------------------------------------------------
# The command


def test_export_adapter_writes_the_file_a_modelfile_and_lineage(bases, default_gguf, tmp_path, capsys):
    adapter = make_adapter(
        default_gguf, tmp_path / "support", r=4, alpha=8, target_modules=["q_proj", "v_proj"]
    )
    out = tmp_path / "exports" / "support-lora.gguf"
    code, stdout, stderr = run_cli(
        ["export", str(default_gguf), "--adapter", str(adapter), "--out", str(out), "--json"], capsys
    )
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["format"] == "gguf-lora" and result["quant"] == "f16" and result["alpha"] == 8.0
    assert result["modules"] == 60 and result["ranks"] == [4]
    modelfile = Path(result["modelfile"]).read_text()
    assert f"FROM {default_gguf.resolve()}\nADAPTER ./support-lora.gguf\n" in modelfile
    assert "TEMPLATE" in modelfile
    lineage = json.loads((out.parent / "support-lora.lineage.json").read_text())
    assert str(adapter) in json.dumps(lineage["inputs"])
    # An HF base has no GGUF file for Ollama's FROM: the file alone, and a line saying what to do.
    hf_adapter = make_adapter(bases["llama"], tmp_path / "tiny", r=2, alpha=4, target_modules=["q_proj"])
    code, stdout, _ = run_cli(
        ["export", str(bases["llama"]), "--adapter", str(hf_adapter), "--out", str(tmp_path / "tiny.gguf")],
        capsys,
    )
    assert code == 0 and "no Modelfile" in stdout and (tmp_path / "tiny.gguf").is_file()
    assert not (tmp_path / "Modelfile").exists()


def test_a_gguf_adapter_is_an_adapter_to_serve_and_merge(bases, tmp_path):
    from weightsmith.commands.serve import parse_adapters
    from weightsmith.merging.forks import is_adapter

    adapter = make_adapter(bases["llama"], tmp_path / "a", r=2, alpha=4, target_modules=["q_proj"])
    config = load_checkpoint(bases["llama"], decode_layout=False).config
    write_gguf_adapter_file(adapter, config, tmp_path / "tone.gguf")
    export_gguf(bases["llama"], tmp_path / "model.gguf", "f32")
    assert parse_adapters([str(tmp_path / "tone.gguf")]) == {"tone": tmp_path / "tone.gguf"}
    assert is_adapter(tmp_path / "tone.gguf") and not is_adapter(tmp_path / "model.gguf")


# ---------------------------------------------------------------------------------------------
# Refusals


def test_adapters_llama_cpp_cannot_apply_are_refused_before_writing(bases, tmp_path):
    base = bases["llama"]
    config = load_checkpoint(base, decode_layout=False).config
    dora = make_adapter(base, tmp_path / "dora", r=2, alpha=4, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(UsageError, match="DoRA adapter; llama.cpp applies plain LoRA only"):
        write_gguf_adapter_file(dora, config, tmp_path / "x.gguf")
    plain = make_adapter(base, tmp_path / "plain", r=2, alpha=4, target_modules=["q_proj"])
    with pytest.raises(UsageError, match="written as f32 or f16"):
        write_gguf_adapter_file(plain, config, tmp_path / "x.gguf", "q8_0")
    assert not (tmp_path / "x.gguf").exists()


def test_an_adapter_for_another_base_is_refused_by_export(bases, tmp_path, capsys):
    adapter = make_adapter(bases["llama"], tmp_path / "a", r=2, alpha=4, target_modules=["q_proj"])
    wider = build_tiny_hf_dir(tmp_path / "wider", hidden_size=96)
    argv = ["export", str(wider), "--adapter", str(adapter), "--out", str(tmp_path / "x.gguf")]
    code, _, stderr = run_cli(argv, capsys)
    assert code != 0 and "expected (2, 96)" in stderr and "another base model" in stderr
    assert not (tmp_path / "x.gguf").exists()


def write_file(path: Path, arch: str = "llama", tensors=None, **meta) -> Path:
    return write_gguf(path, arch, tensors, **{"general.type": "adapter", "adapter.type": "lora", **meta})


def test_bad_gguf_adapter_files_fail_in_one_line(bases, tmp_path):
    config = load_checkpoint(bases["llama"], decode_layout=False).config
    a, b = np.zeros((2, 64), np.float32), np.zeros((64, 2), np.float32)
    pair = {"blk.0.attn_q.weight.lora_a": a, "blk.0.attn_q.weight.lora_b": b}
    cases = {
        "not 'adapter'": write_file(tmp_path / "model.gguf", tensors=pair, **{"general.type": "model"}),
        "for llama.cpp's 'qwen2' models": write_file(tmp_path / "qwen.gguf", "qwen2", pair),
        "attn_q.weight.lora_b is missing": write_file(
            tmp_path / "half.gguf", tensors={"blk.0.attn_q.weight.lora_a": a}
        ),
        "not on embeddings": write_file(
            tmp_path / "embd.gguf", tensors={"token_embd.weight.lora_a": a, "token_embd.weight.lora_b": b}
        ),
        "activated LoRA": write_file(
            tmp_path / "alora.gguf", tensors=pair, **{"adapter.alora.invocation_tokens": "x"}
        ),
        "must be a number >= 0": write_file(
            tmp_path / "alpha.gguf", tensors=pair, **{"adapter.lora.alpha": -1.0}
        ),
        "holds no LoRA tensors": write_file(tmp_path / "empty.gguf"),
    }
    for message, path in cases.items():
        with pytest.raises(CheckpointError, match=message):
            read_gguf_adapter(path, config)
    wrong = write_file(
        tmp_path / "wide.gguf",
        tensors={
            "blk.0.attn_v.weight.lora_a": np.zeros((2, 48), np.float32),
            "blk.0.attn_v.weight.lora_b": b[:32],
        },
    )
    model = load_checkpoint(bases["llama"], decode_layout=False).model
    with pytest.raises(
        CheckpointError, match=r"blk.0.attn_v.weight.lora_a' has shape \(2, 48\), expected \(2, 64\)"
    ):
        load_adapter(model, wrong)
    assert not any("lora_" in n for n, _ in model.named_parameters())
