"""`weightsmith quantize` through `main(argv)`: the written directory reloads and
generates, `--check` reports perplexities and agreement, and bad input is one line on
stderr with a non-zero exit before anything is written."""

from __future__ import annotations

import json

import pytest

from weightsmith.cli.main import main
from weightsmith.commands.quantize import agreement


def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def isolated_store(tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTSMITH_HOME", str(tmp_path / "home"))


def test_quantize_with_check_writes_a_loadable_dir(tiny_hf_dir, tmp_path, capsys):
    out = tmp_path / "tiny-int4"
    argv = ["quantize", str(tiny_hf_dir), "--to", "int4", "--group-size", "32", "--out", str(out), "--check"]
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "word perplexity" in stdout and "greedy agreement" in stdout and "int4-g32" in stdout
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 4
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left

    code, stdout, err = run_cli(
        ["generate", str(out), "-p", "Once upon", "--temperature", "0", "-n", "6"], capsys
    )
    assert code == 0, err

    # --json: the result dict; --overwrite replaces the directory.
    code, stdout, err = run_cli(
        ["quantize", str(tiny_hf_dir), "--to", "int8", "--out", str(out), "--check", "--overwrite", "--json"],
        capsys,
    )
    assert code == 0, err
    result = json.loads(stdout)
    check = result["check"]
    assert result["quantization"] == "int8" and result["modules_quantized"] == 14
    assert check["word_perplexity_original"] > 1 and check["word_perplexity_quantized"] > 1
    assert abs(check["perplexity_change_pct"]) < 5
    assert 0 <= check["greedy_agreement"]["before_divergence"] <= check["greedy_agreement"]["overall"] <= 1
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 8


def test_agreement_counts_prefix_and_all_positions():
    got = agreement([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 9, 4], [5, 6, 7, 8]])
    assert got == {"overall": 7 / 8, "before_divergence": 6 / 8}


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--to", "int3"], 2, "--to"),
        (["--to", "int4", "--group-size", "48"], 1, "--group-size 48"),
        (["--to", "int8", "--group-size", "32"], 1, "--group-size applies to int4"),
        (["--to", "int4", "--group-size", "128"], 1, "q_proj.weight"),  # hidden size 64
        (["--to", "int4", "--lm-head-bits", "6"], 1, "--lm-head-bits 6"),
    ],
)
def test_bad_input_is_one_line(tiny_hf_dir, tmp_path, capsys, extra, code, message):
    out = tmp_path / "q"
    rc, stdout, err = run_cli(["quantize", str(tiny_hf_dir), "--out", str(out), *extra], capsys)
    assert rc == code
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not out.exists() and not list(tmp_path.glob(".q.tmp-*"))


def test_existing_out_and_missing_model_are_refused(tiny_hf_dir, tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _, err = run_cli(["quantize", str(tiny_hf_dir), "--to", "int8", "--out", str(out)], capsys)
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "already exists" in err
    assert (out / "keep.txt").read_text() == "mine"
    rc, _, err = run_cli(
        ["quantize", str(tmp_path / "nope"), "--to", "int8", "--out", str(tmp_path / "o")], capsys
    )
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "nope" in err


@pytest.mark.parametrize("quant", ["q4_0", "q4_1"])
def test_gguf_q4_blocks_go_straight_into_int4_layers(tiny_hf_dir, tmp_path, capsys, quant):
    """A Q4_0 / Q4_1 GGUF quantized to int4 g32 keeps the file's own codes: every layer then
    computes exactly the weights the file stores (requantizing Q4_0's symmetric blocks from
    fp32 would not), including the llama Q/K rows llama.cpp permutes."""
    import torch

    from weightsmith.checkpoint.gguf_tensors import iter_gguf_tensors
    from weightsmith.checkpoint.gguf_write import export_gguf
    from weightsmith.llm import load
    from weightsmith.quant.weight_only import Int4Linear

    gguf = tmp_path / f"tiny-{quant}.gguf"
    if quant == "q4_1":  # our exporter writes q4_0; write Q4_1 blocks with gguf-py's quantizer
        from gguf import GGMLQuantizationType
        from gguf.quants import quantize

        export_gguf(tiny_hf_dir, tmp_path / "f32.gguf", "f32")
        _rewrite_as(tmp_path / "f32.gguf", gguf, GGMLQuantizationType.Q4_1, quantize)
    else:
        export_gguf(tiny_hf_dir, gguf, quant)
    stored = dict(iter_gguf_tensors(gguf))
    out = tmp_path / "int4"
    code, stdout, err = run_cli(["quantize", str(gguf), "--to", "int4", "--group-size", "32", "--out", str(out),
                                 "--json"], capsys)  # fmt: skip
    assert code == 0, err
    res = json.loads(stdout)
    assert res["modules_from_gguf_blocks"] == res["modules_quantized"] > 0
    model = load(out).model
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    assert len(layers) == res["modules_quantized"]
    for name, layer in layers.items():
        torch.testing.assert_close(layer.dequantize(), stored[f"{name}.weight"], rtol=0, atol=0)


def _rewrite_as(src, dst, qtype, quantize) -> None:
    """Copy a GGUF file, storing its 2-D weights whose rows are a multiple of 32 as `qtype`."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

    reader = GGUFReader(src)
    arch = reader.fields["general.architecture"]
    writer = GGUFWriter(dst, bytes(arch.parts[arch.data[0]]).decode())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        writer.add_key_value(
            field.name, value, field.types[0], sub_type=field.types[-1] if len(field.types) > 1 else None
        )
    for t in reader.tensors:
        data = np.asarray(t.data)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if t.tensor_type == GGMLQuantizationType.F32 and len(shape) == 2 and shape[1] % 32 == 0:
            writer.add_tensor(t.name, quantize(data.reshape(shape), qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, data.reshape(shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
