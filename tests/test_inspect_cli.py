"""`weightsmith inspect ...` on a tiny model: JSON with provenance, HTML reports, one-line errors;
`redteam --steer` runs the plain and the steered model side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli, write_probe_packs

import weightsmith as ws
from weightsmith.models.fingerprint import model_fingerprint


@pytest.fixture(scope="module")
def fingerprint(tiny_hf_dir) -> str:
    return model_fingerprint(ws.load(tiny_hf_dir, device="cpu").model)


def _ok(argv, capsys) -> dict:
    code, out, err = run_cli([*argv, "--json"], capsys)
    assert code == 0, err
    return json.loads(out)


def _one_line_error(argv, capsys, match: str) -> None:
    code, out, err = run_cli(argv, capsys)
    assert code != 0 and match in err, err
    assert len(err.strip().splitlines()) == 1, err


def _report(path: Path, *words: str) -> None:
    html = path.read_text()
    assert "<img" in html and "Provenance" in html
    for w in words:
        assert w in html


def test_logit_lens_and_attention(tiny_hf_dir, fingerprint, tmp_path, capsys) -> None:
    r = _ok(
        ["inspect", "logit-lens", tiny_hf_dir, "-p", "Once upon a time", "--top-k", "3", "--out", tmp_path],
        capsys,
    )
    assert r["model_sha256"] == fingerprint and r["prompt"] == "Once upon a time" and r["weightsmith"]
    assert len(r["layers"]) == 3 and len(r["target_prob"][0]) == len(r["tokens"]) and len(r["top"][0][0]) == 3
    assert json.loads((tmp_path / "logit-lens.json").read_text())["target_prob"] == r["target_prob"]
    _report(tmp_path / "logit-lens.html", fingerprint)
    r = _ok(["inspect", "attention", tiny_hf_dir, "-p", "Once upon a time", "--out", tmp_path], capsys)
    assert len(r["patterns"]) == 2 and len(r["patterns"][0]) == 4
    _report(tmp_path / "attention.html", "layer 1")


def test_patch_and_attribute(tiny_hf_dir, tmp_path, capsys) -> None:
    tok = ws.load(tiny_hf_dir, device="cpu").tokenizer
    clean, corrupt = "The quick brown fox", "The quick brown dog"
    assert len(tok.encode(clean)) == len(tok.encode(corrupt))
    r = _ok(["inspect", "patch", tiny_hf_dir, "--clean", clean, "--corrupt", corrupt, "--answer", " a", "--wrong", " b",
             "--out", tmp_path], capsys)  # fmt: skip
    assert len(r["by_position"]["values"]) == 2 and len(r["by_head"]["values"][0]) == 4
    assert r["by_position"]["hook"] == "blocks.{layer}.hook_resid_pre"
    _report(tmp_path / "patch.html", "patched")
    r = _ok(
        [
            "inspect",
            "attribute",
            tiny_hf_dir,
            "-p",
            clean,
            "--target",
            " a",
            "--steps",
            "24",
            "--out",
            tmp_path,
        ],
        capsys,
    )
    assert r["direct"]["total"] == pytest.approx(r["logit"], abs=1e-4)
    assert r["integrated_gradients"]["completeness_error"] < 1e-3
    _report(tmp_path / "attribute.html", "Integrated gradients")
    _one_line_error(["inspect", "patch", tiny_hf_dir, "--clean", clean, "--corrupt", "A much longer corrupted prompt here"],
                    capsys, "same token count")  # fmt: skip
    _one_line_error(["inspect", "attribute", tiny_hf_dir, "-p", "  "], capsys, "--prompt is empty")


def test_direction_from_files_then_steer_redteam(tiny_hf_dir, fingerprint, tmp_path, capsys) -> None:
    (tmp_path / "pos.txt").write_text("Tell me a story\nOnce upon a time\n")
    (tmp_path / "neg.txt").write_text("0123456789\nBonjour le monde\n")
    (tmp_path / "empty.txt").write_text("\n\n")
    out = tmp_path / "d.safetensors"
    r = _ok(["inspect", "direction", tiny_hf_dir, "--positive", tmp_path / "pos.txt", "--negative", tmp_path / "neg.txt",
             "--out", out], capsys)  # fmt: skip
    assert (
        r["metadata"]["model_sha256"] == fingerprint
        and r["metadata"]["positive_count"] == "2"
        and out.is_file()
    )
    _one_line_error(["inspect", "direction", tiny_hf_dir, "--positive", tmp_path / "empty.txt", "--negative",
                     tmp_path / "neg.txt", "--out", tmp_path / "e.safetensors"], capsys, "gives no prompts")  # fmt: skip
    assert not (tmp_path / "e.safetensors").exists()
    packs = write_probe_packs(
        tmp_path / "packs",
        "pack: tp\nversion: 1\nfamily: injection\nkind: attack\nsuccess: complied\nprobes:\n"
        '  - {id: a1, category: S1, prompt: "Once upon a time"}\n  - {id: a2, category: S2, prompt: "Say hi"}\n',
        '{"pack": "tb", "family": "benign", "kind": "benign", "id": "b1", "category": "x", "prompt": "Say hello"}\n',
    )
    r = _ok(["redteam", tiny_hf_dir, "--packs", packs, "--transforms", "none", "--max-tokens", "4", "--no-calibrate",
             "--steer", f"{out}:ablate"], capsys)  # fmt: skip
    assert [c["config"] for c in r["configs"]] == ["tiny-llama", "tiny-llama+steered"]
    _one_line_error(
        ["redteam", "http://localhost:9/v1", "--model", "m", "--steer", f"{out}:ablate"], capsys, "in-process"
    )
