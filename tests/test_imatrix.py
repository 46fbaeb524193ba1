"""Importance matrices: llama.cpp's imatrix files (read, written, computed by `weightsmith imatrix`)
and `export --imatrix`, whose fits they weigh.

The sums are checked against transformers' modules hooked the same way (not our code); the files
against gguf-py's reader and llama.cpp's layout; the quantization by what an importance matrix is
for: less error in the outputs of the inputs it was computed on. Where llama.cpp's tools are on
PATH (`llama-imatrix`, `llama-quantize`), their file equals ours and they read ours.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny_tokenizer_dir
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from gguf.quants import dequantize

from weightsmith.checkpoint.gguf import open_gguf
from weightsmith.checkpoint.gguf_write import export_gguf
from weightsmith.checkpoint.imatrix import Imatrix, collect, read_imatrix, text_chunks, write_imatrix
from weightsmith.checkpoint.load import load_checkpoint
from weightsmith.cli.main import main
from weightsmith.errors import CheckpointError
from weightsmith.quant.kquants import quantize_blocks

transformers = pytest.importorskip("transformers")

WIDE = dict(
    vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, eos_token_id=2,
)  # fmt: skip


def build(path: Path, model_cls, config, skew: bool = False) -> Path:
    """A random model; with `skew`, norm weights spread over two orders of magnitude, so some
    input columns of every projection carry far more than others (as trained models' do)."""
    build_tiny_tokenizer_dir(path)
    torch.manual_seed(0)
    model = model_cls(config)
    if skew:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(torch.exp(torch.randn(p.shape) * 1.2))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    return build(
        tmp_path_factory.mktemp("wide"),
        transformers.LlamaForCausalLM,
        transformers.LlamaConfig(**WIDE),
        skew=True,
    )


@pytest.fixture(scope="module")
def phi3(tmp_path_factory) -> Path:
    """Phi-3: fused attn_qkv / ffn_up in the checkpoint."""
    return build(
        tmp_path_factory.mktemp("phi3"), transformers.Phi3ForCausalLM,
        transformers.Phi3Config(**{**WIDE, "num_key_value_heads": 4}, pad_token_id=0, bos_token_id=1),
    )  # fmt: skip


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Path:
    """Mixtral with 4 routed experts, 2 a token."""
    return build(
        tmp_path_factory.mktemp("mixtral"), transformers.MixtralForCausalLM,
        transformers.MixtralConfig(**{**WIDE, "intermediate_size": 256}, num_local_experts=4, num_experts_per_tok=2),
    )  # fmt: skip


def chunks(n: int = 3, size: int = 48, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 320, (size,), generator=g).tolist() for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Computing one


def reference_sums(src: Path, cls, names: dict[str, str], data: list[list[int]]) -> dict[str, np.ndarray]:
    """Sums of squared inputs of transformers' own modules (HF module name -> GGUF name)."""
    model = cls.from_pretrained(src, torch_dtype=torch.float32).eval()
    sums: dict[str, np.ndarray] = {}
    modules = dict(model.named_modules())

    def hook(gguf_name: str):
        def record(_m, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[gguf_name] = sums.get(gguf_name, 0) + x.square().sum(0).numpy()

        return record

    handles = [modules[hf].register_forward_pre_hook(hook(g)) for hf, g in names.items()]
    with torch.no_grad():
        for chunk in data:
            model(torch.tensor([chunk]))
    for h in handles:
        h.remove()
    return sums


def test_collected_sums_are_transformers_inputs_squared(wide: Path) -> None:
    data = chunks()
    ckpt = load_checkpoint(wide, decode_layout=False)
    found = collect(ckpt.model, ckpt.config, data)
    kinds = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}  # fmt: skip
    names = {f"model.layers.{i}.{hf}": f"blk.{i}.{g}.weight" for i in range(3) for hf, g in kinds.items()}
    want = reference_sums(wide, transformers.LlamaForCausalLM, names, data)
    assert set(found.sums) == set(want) and found.chunk_count == 3
    for name, sums in want.items():
        np.testing.assert_allclose(found.sums[name][0], sums, rtol=1e-4, err_msg=name)
        assert found.counts[name].tolist() == [3 * 48]
    # The inputs differ: attention's and the MLP's norms scale columns differently.
    assert not np.allclose(found.sums["blk.0.attn_q.weight"], found.sums["blk.0.ffn_up.weight"])


def test_fused_and_expert_entries(phi3: Path, mixtral: Path) -> None:
    data = chunks(2)
    ckpt = load_checkpoint(phi3, decode_layout=False)
    found = collect(ckpt.model, ckpt.config, data)
    # Phi-3's fused attn_qkv / ffn_up: one entry each, the input their parts share
    names = {
        "model.layers.1.self_attn.qkv_proj": "blk.1.attn_qkv.weight",
        "model.layers.1.mlp.gate_up_proj": "blk.1.ffn_up.weight",
    }
    want = reference_sums(phi3, transformers.Phi3ForCausalLM, names, data)
    for name in names.values():
        np.testing.assert_allclose(found.sums[name][0], want[name], rtol=1e-4, err_msg=name)
        assert found.counts[name].tolist() == [2 * 48]
    assert not any(".attn_q." in n or ".ffn_gate." in n for n in found.sums)
    ckpt = load_checkpoint(mixtral, decode_layout=False)
    found = collect(ckpt.model, ckpt.config, data)
    for kind in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
        sums, counts = found.sums[f"blk.0.{kind}.weight"], found.counts[f"blk.0.{kind}.weight"]
        assert sums.shape == (4, 256) and counts.sum() == 2 * 2 * 48  # each token goes to 2 experts
    np.testing.assert_array_equal(
        found.counts["blk.0.ffn_gate_exps.weight"], found.counts["blk.0.ffn_down_exps.weight"]
    )


def test_text_chunks_are_llama_imatrix_chunks() -> None:
    ids = list(range(10, 35))
    assert text_chunks(ids, 8, bos=1) == [[1, *range(11, 18)], [1, *range(19, 26)], [1, *range(27, 34)]]
    assert text_chunks(ids, 8, bos=None, limit=2) == [list(range(10, 18)), list(range(18, 26))]
    assert text_chunks(ids[:7], 8, bos=1) == []


# ---------------------------------------------------------------------------------------------
# Files


def test_file_round_trip_in_llama_cpp_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    made = Imatrix(
        sums={"blk.0.attn_q.weight": rng.uniform(0, 5, (1, 64)), "blk.0.ffn_down_exps.weight": rng.uniform(0, 5, (4, 32))},
        counts={"blk.0.attn_q.weight": np.array([96.0]), "blk.0.ffn_down_exps.weight": np.array([10.0, 0.0, 50.0, 36.0])},
        datasets=["calibration.txt"], chunk_count=3, chunk_size=32,
    )  # fmt: skip
    path = write_imatrix(tmp_path / "m.imatrix.gguf", made)
    reader = GGUFReader(path)
    assert reader.fields["general.type"].contents() == "imatrix"
    assert "general.architecture" not in reader.fields
    assert reader.fields["imatrix.datasets"].contents() == ["calibration.txt"]
    assert (
        reader.fields["imatrix.chunk_count"].contents() == 3
        and reader.fields["imatrix.chunk_size"].contents() == 32
    )
    shapes = {t.name: (t.tensor_type, t.shape.tolist()) for t in reader.tensors}  # ggml's ne order
    assert shapes["blk.0.ffn_down_exps.weight.in_sum2"] == (QT.F32, [32, 4])
    assert shapes["blk.0.ffn_down_exps.weight.counts"] == (QT.F32, [1, 4])
    assert shapes["blk.0.attn_q.weight.in_sum2"] == (QT.F32, [64, 1])
    back = read_imatrix(path)
    assert back.datasets == ["calibration.txt"] and back.chunk_count == 3 and back.path == str(path)
    for name in made.sums:
        np.testing.assert_allclose(back.sums[name], made.sums[name], rtol=1e-6)
        np.testing.assert_array_equal(back.counts[name], made.counts[name])
    # importance: sums / counts, shaped for the tensor; an expert that saw no token gets ones
    q = back.importance("blk.0.attn_q.weight", (128, 64))
    np.testing.assert_allclose(q, made.sums["blk.0.attn_q.weight"][0] / 96, rtol=1e-6)
    experts = back.importance("blk.0.ffn_down_exps.weight", (4, 16, 32))
    assert experts.shape == (4, 1, 32) and (experts[1] == 1).all()
    np.testing.assert_allclose(experts[2, 0], made.sums["blk.0.ffn_down_exps.weight"][2] / 50, rtol=1e-6)
    assert back.importance("blk.0.attn_k.weight", (64, 64)) is None
    with pytest.raises(
        CheckpointError, match=r"entry blk.0.attn_q.weight has 1 x 64 values but the tensor is 128 x 32"
    ):
        back.importance("blk.0.attn_q.weight", (128, 32))


def legacy_bytes(entries: dict[str, tuple[int, np.ndarray]], chunks: int, dataset: str) -> bytes:
    """llama.cpp's legacy .dat layout, written here from its description."""
    out = struct.pack("<i", len(entries))
    for name, (calls, values) in entries.items():
        raw = name.encode()
        out += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", calls, values.size)
        out += values.astype("<f4").tobytes()
    return out + struct.pack("<ii", chunks, len(dataset)) + dataset.encode()


def test_legacy_dat_files_read(tmp_path: Path) -> None:
    mean = np.linspace(0.5, 2.0, 32)
    path = tmp_path / "old.dat"
    path.write_bytes(legacy_bytes({"blk.0.attn_q.weight": (7, mean * 7)}, 7, "wiki.txt"))
    back = read_imatrix(path)
    np.testing.assert_allclose(back.importance("blk.0.attn_q.weight", (8, 32)), mean, rtol=1e-6)
    assert back.chunk_count == 7 and back.datasets == ["wiki.txt"]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"nothing like an imatrix", "not an imatrix file"),
        (b"\x01\x00\x00\x00\xff\xff\x00\x00", "bad imatrix entry name length"),
        (b"\x01\x00\x00\x00\x04\x00\x00\x00blk.", "ends early"),
    ],
)
def test_bad_files_are_one_clear_error(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "bad.dat"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=needle):
        read_imatrix(path)


def test_bad_gguf_entries(tmp_path: Path) -> None:
    import gguf

    def write(tensors: dict[str, np.ndarray]) -> Path:
        path = tmp_path / "bad.gguf"
        writer = gguf.GGUFWriter(str(path), arch="")
        for name, data in tensors.items():
            writer.add_tensor(name, data)
        writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
        writer.close()
        return path

    ones = np.ones((1, 8), np.float32)
    with pytest.raises(CheckpointError, match="lacks its counts"):
        read_imatrix(write({"blk.0.attn_q.weight.in_sum2": ones}))
    with pytest.raises(CheckpointError, match="negative, NaN or infinite"):
        read_imatrix(write({"a.in_sum2": -ones, "a.counts": np.ones((1, 1), np.float32)}))
    with pytest.raises(CheckpointError, match="holds no imatrix entries"):
        read_imatrix(write({"token_embd.weight": ones}))
    with pytest.raises(CheckpointError, match="no such imatrix file"):
        read_imatrix(tmp_path / "missing.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(b"GGUF\x03\x00\x00\x00\xff")
    with pytest.raises(CheckpointError, match="not a valid or complete GGUF file"):
        read_imatrix(cut)


# ---------------------------------------------------------------------------------------------
# Quantizing with one


@pytest.mark.parametrize("kernels", [True, False], ids=["C", "torch"])
@pytest.mark.parametrize(
    "qtype",
    [QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1],
    ids=lambda q: q.name,
)
def test_importance_lowers_the_error_where_it_is_high(qtype: QT, kernels: bool) -> None:
    """Weighted by an importance, the blocks (decoded by gguf-py) reproduce the important
    columns better: the importance-weighted error falls, at some cost in plain error."""
    rng = np.random.default_rng(5)
    w = (rng.standard_t(4, (32, 512)) * 0.02).astype(np.float32)
    importance = rng.lognormal(0, 1.5, 512).astype(np.float32)

    def errors(blocks: np.ndarray) -> tuple[float, float]:
        e = dequantize(blocks, qtype) - w
        return float(np.sqrt((e**2).mean())), float(np.sqrt((e**2 * importance).mean()))

    plain = errors(quantize_blocks(w, qtype, kernels=kernels))
    weighted = errors(quantize_blocks(w, qtype, kernels=kernels, importance=importance))
    assert weighted[1] < 0.93 * plain[1], (plain, weighted)
    assert weighted[0] < 1.2 * plain[0]
    uniform = errors(quantize_blocks(w, qtype, kernels=kernels, importance=np.ones(512, np.float32)))
    assert uniform[0] < 1.02 * plain[0]  # a flat importance is no worse than none


def test_importance_input_is_checked() -> None:
    w = np.zeros((2, 256), np.float32)
    with pytest.raises(ValueError, match="does not fit"):
        quantize_blocks(w, QT.Q4_K, importance=np.ones(128, np.float32))
    with pytest.raises(ValueError, match="finite and >= 0"):
        quantize_blocks(w, QT.Q4_K, importance=np.full(256, -1.0, np.float32))


def logits_on(path: Path, data: list[list[int]]) -> torch.Tensor:
    model = load_checkpoint(path, decode_layout=False).model
    with torch.no_grad():
        return torch.cat([model(torch.tensor([c])).float() for c in data])


def test_export_with_an_imatrix_is_closer_on_its_inputs(wide: Path, tmp_path: Path) -> None:
    data = chunks(4, 64)
    ckpt = load_checkpoint(wide, decode_layout=False)
    path = write_imatrix(tmp_path / "wide.imatrix.gguf", collect(ckpt.model, ckpt.config, data))
    ref = logits_on(wide, data)
    for quant in ("q2_k", "q3_k_m", "q4_k_m", "q4_0"):
        plain, weighted = tmp_path / f"{quant}.gguf", tmp_path / f"{quant}-im.gguf"
        export_gguf(wide, plain, quant)
        summary = export_gguf(wide, weighted, quant, imatrix=read_imatrix(path))
        assert summary["imatrix"]["without"] == [] and summary["imatrix"]["weighted"] > 0
        fields = GGUFReader(weighted).fields
        assert fields["quantize.imatrix.file"].contents() == str(path)
        assert fields["quantize.imatrix.chunks_count"].contents() == 4
        assert fields["quantize.imatrix.entries_count"].contents() == 21
        assert [t.tensor_type for t in open_gguf(plain).tensors] == [
            t.tensor_type for t in open_gguf(weighted).tensors
        ]
        e_plain = (logits_on(plain, data) - ref).abs().mean().item()
        e_weighted = (logits_on(weighted, data) - ref).abs().mean().item()
        assert e_weighted < 0.95 * e_plain, (quant, e_plain, e_weighted)


# ---------------------------------------------------------------------------------------------
# Commands


def test_cli_imatrix_then_export(wide: Path, tmp_path: Path, capsys) -> None:
    text = tmp_path / "calibration.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60, encoding="utf-8")
    out = tmp_path / "wide.imatrix.gguf"
    args = [
        "imatrix",
        str(wide),
        "--text",
        str(text),
        "--out",
        str(out),
        "--chunk-size",
        "64",
        "--chunks",
        "3",
    ]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["chunks"] == 3 and result["tokens"] == 192 and result["entries"] == 21
    found = read_imatrix(out)
    assert found.datasets == ["calibration.txt"] and found.chunk_size == 64 and found.chunk_count == 3
    assert {c.item() for c in found.counts.values()} == {192.0}
    assert main(args) != 0 and "already exists" in capsys.readouterr().err  # no --overwrite
    assert main(["info", str(out)]) != 0  # not a model: said so, with what to do with it
    assert "is an importance matrix (llama.cpp's imatrix file), not a model" in capsys.readouterr().err
    gguf_out = tmp_path / "wide-q4.gguf"
    assert (
        main(["export", str(wide), "--quant", "q4_k_m", "--imatrix", str(out), "--out", str(gguf_out)]) == 0
    )
    assert "importance matrix: weighed 21 matrices" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--quant", "f16", "--imatrix", "IM"], "--imatrix has no effect on --quant f16"),
        (["--quant", "q4_k_m", "--imatrix", "MISSING"], "no such imatrix file"),
    ],
)
def test_cli_export_imatrix_refusals(
    wide: Path, tmp_path: Path, capsys, extra: list[str], needle: str
) -> None:
    im = write_imatrix(tmp_path / "im.gguf", Imatrix(sums={"a": np.ones((1, 8))}, counts={"a": np.ones(1)}))
    extra = [str(im) if x == "IM" else str(tmp_path / "missing.gguf") if x == "MISSING" else x for x in extra]
    out = tmp_path / "x.gguf"
    assert main(["export", str(wide), "--out", str(out), *extra]) != 0
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_cli_imatrix_from_finetune_data(wide: Path, tmp_path: Path, capsys) -> None:
    """--data: a finetune JSONL, each example tokenized as finetune does, laid end to end."""
    from weightsmith.train.data import read_records, tokenize_record

    data = tmp_path / "train.jsonl"
    lines = [{"text": f"Example number {i} says something about foxes and dogs."} for i in range(30)]
    lines += [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
    ] * 5
    data.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    out = tmp_path / "data.imatrix.gguf"
    assert (
        main(["imatrix", str(wide), "--data", str(data), "--out", str(out), "--chunk-size", "32", "--json"])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    tok = load_checkpoint(wide, decode_layout=False).tokenizer
    total = sum(len(tokenize_record(r, tok).ids) for r in read_records(data))
    assert result["text_tokens"] == total and result["chunks"] == total // 32
    assert read_imatrix(out).datasets == ["train.jsonl"]
    for both in ([], ["--text", str(data), "--data", str(data)]):
        assert main(["imatrix", str(wide), "--out", str(tmp_path / "x.gguf"), *both]) != 0
        assert "pass the calibration as --text FILE.txt or --data FILE.jsonl" in capsys.readouterr().err


def test_cli_imatrix_refusals(wide: Path, tmp_path: Path, capsys) -> None:
    short = tmp_path / "short.txt"
    short.write_text("too short", encoding="utf-8")
    out = tmp_path / "x.imatrix.gguf"
    assert main(["imatrix", str(wide), "--text", str(short), "--out", str(out)]) != 0
    assert "fewer than one chunk of 512" in capsys.readouterr().err
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00")
    assert main(["imatrix", str(wide), "--text", str(binary), "--out", str(out)]) != 0
    assert "not UTF-8 text" in capsys.readouterr().err
    assert main(["imatrix", str(wide), "--text", str(short), "--out", str(tmp_path / "x.dat")]) != 0
    assert "must end in .gguf" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Against llama.cpp's tools (where they are on PATH)


def test_llama_imatrix_computes_our_sums_and_llama_quantize_reads_ours(wide: Path, tmp_path: Path) -> None:
    tools = {name: shutil.which(name) for name in ("llama-imatrix", "llama-quantize")}
    if not all(tools.values()):
        pytest.skip("llama.cpp's llama-imatrix / llama-quantize are not on PATH")
    f32 = tmp_path / "wide-f32.gguf"
    export_gguf(wide, f32, "f32")
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(f"word{i % 97} and more text {i}" for i in range(900)), encoding="utf-8")
    theirs = tmp_path / "theirs.imatrix.gguf"
    run = subprocess.run(
        [tools["llama-imatrix"], "-m", str(f32), "-f", str(text), "-o", str(theirs), "-c", "64", "--chunks", "4",
         "-b", "64", "-t", "2", "--no-ppl"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    ours = tmp_path / "ours.imatrix.gguf"
    assert (
        main(
            [
                "imatrix",
                str(f32),
                "--text",
                str(text),
                "--out",
                str(ours),
                "--chunk-size",
                "64",
                "--chunks",
                "4",
            ]
        )
        == 0
    )
    a, b = read_imatrix(ours), read_imatrix(theirs)
    assert set(a.sums) == set(b.sums)
    for name in b.sums:
        np.testing.assert_array_equal(a.counts[name], b.counts[name], err_msg=name)
        np.testing.assert_allclose(a.sums[name], b.sums[name], rtol=2e-3, err_msg=name)
    quantized = tmp_path / "q.gguf"
    run = subprocess.run(
        [tools["llama-quantize"], "--imatrix", str(ours), str(f32), str(quantized), "Q4_K_M", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"loaded {len(a.sums)} importance matrix entries" in run.stdout


# ---------------------------------------------------------------------------------------------
# `weightsmith quantize --to int4 --imatrix`


def test_int4_groups_fitted_under_an_importance() -> None:
    from weightsmith.quant.weight_only import dequantize_int4, quantize_int4

    g = torch.Generator().manual_seed(4)
    w = torch.distributions.StudentT(4.0).sample((64, 256)) * 0.02
    importance = torch.exp(torch.randn(256, generator=g) * 1.5)

    def errors(parts) -> tuple[float, float]:
        e = dequantize_int4(*parts) - w
        return e.square().mean().sqrt().item(), (e.square() * importance).mean().sqrt().item()

    plain = errors(quantize_int4(w, 64))
    weighted = errors(quantize_int4(w, 64, importance=importance))
    assert weighted[1] < 0.85 * plain[1] and weighted[0] < 1.2 * plain[0], (plain, weighted)
    assert errors(quantize_int4(w, 64, importance=torch.ones(256)))[0] < plain[0]  # LS beats min/max


def test_module_importance_maps_fused_parts_and_experts(phi3: Path, mixtral: Path) -> None:
    from weightsmith.checkpoint.imatrix import module_importance

    ckpt = load_checkpoint(phi3, decode_layout=False)
    found = collect(ckpt.model, ckpt.config, chunks(2))
    rows = module_importance(found, ckpt.model, ckpt.config)
    qkv = found.sums["blk.1.attn_qkv.weight"][0] / found.counts["blk.1.attn_qkv.weight"][0]
    split = [n for n in rows if n.startswith("model.layers.1.self_attn.") and n.endswith("_proj")]
    assert len(split) >= 3 or "model.layers.1.self_attn.qkv_proj" in rows, sorted(rows)
    for name in split or ["model.layers.1.self_attn.qkv_proj"]:
        if name.endswith("o_proj"):
            continue
        np.testing.assert_allclose(rows[name].numpy(), qkv, rtol=1e-6, err_msg=name)
    ckpt = load_checkpoint(mixtral, decode_layout=False)
    found = collect(ckpt.model, ckpt.config, chunks(2))
    rows = module_importance(found, ckpt.model, ckpt.config)
    sums, counts = found.sums["blk.0.ffn_down_exps.weight"], found.counts["blk.0.ffn_down_exps.weight"]
    downs = {
        n: n.split(".experts.")[1].split(".")[0]
        for n in rows
        if ".experts." in n and n.startswith("model.layers.0.")
    }
    downs = {n: int(e) for n, e in downs.items() if n.endswith((".w2", ".down_proj"))}  # Mixtral's w2
    assert sorted(downs.values()) == [0, 1, 2, 3]
    for name, e in downs.items():
        want = sums[e] / counts[e] if counts[e] else np.ones(256)
        np.testing.assert_allclose(rows[name].numpy(), want, rtol=1e-6, err_msg=name)


def test_cli_quantize_int4_with_an_imatrix(wide: Path, tmp_path: Path, capsys) -> None:
    data = chunks(4, 64)
    ckpt = load_checkpoint(wide, decode_layout=False)
    im = write_imatrix(tmp_path / "wide.imatrix.gguf", collect(ckpt.model, ckpt.config, data))
    ref = logits_on(wide, data)
    errors = {}
    for label, extra in (("plain", []), ("imatrix", ["--imatrix", str(im)])):
        out = tmp_path / label
        args = [
            "quantize",
            str(wide),
            "--to",
            "int4",
            "--group-size",
            "64",
            "--out",
            str(out),
            "--json",
            *extra,
        ]
        assert main(args) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["modules_weighted_by_imatrix"] == (21 if extra else 0)
        errors[label] = (logits_on(out, data) - ref).abs().mean().item()
    assert errors["imatrix"] < 0.95 * errors["plain"], errors
    out = tmp_path / "int8"
    assert main(["quantize", str(wide), "--to", "int8", "--out", str(out), "--imatrix", str(im)]) != 0
    assert "--imatrix weighs int4 groups" in capsys.readouterr().err and not out.exists()
