"""`weightsmith quantize` through `main(argv)`: the written directory reloads and
generates, `--check` reports perplexities and agreement, and bad input is one line on
stderr with a non-zero exit before anything is written."""

from __future__ import annotations

import json

import pytest

from weightsmith.cli.main import main
from weightsmith.cli.quantize import agreement


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
