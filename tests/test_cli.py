"""The real CLI, driven in-process through `main(argv)` and once as a subprocess:
behaviour on a tiny random checkpoint, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli


@pytest.fixture(autouse=True)
def isolated_store(tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTSMITH_HOME", str(tmp_path / "home"))


def test_generate_json_on_hf_dir(tiny_hf_dir, capsys):
    code, out, err = run_cli(
        [
            "generate",
            str(tiny_hf_dir),
            "--prompt",
            "Once upon a time",
            "--temperature",
            "0",
            "-n",
            "12",
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    data = json.loads(out)
    assert data["finish_reason"] in ("stop", "length")
    assert data["usage"]["prompt_tokens"] > 0
    assert 1 <= data["usage"]["completion_tokens"] <= 12
    # Greedy decoding is deterministic: a second run prints the same text.
    code2, out2, _ = run_cli(
        ["generate", str(tiny_hf_dir), "-p", "Once upon a time", "--temperature", "0", "-n", "12", "--json"],
        capsys,
    )
    assert json.loads(out2)["text"] == data["text"]


def test_generate_reads_stdin_and_streams(tiny_hf_dir, capsys, monkeypatch):
    code, out, err = run_cli(
        ["generate", str(tiny_hf_dir), "--temperature", "0", "-n", "8", "--chat"],
        capsys,
        "hello there\n",
        monkeypatch,
    )
    assert code == 0, err
    assert out.endswith("\n")


def test_chat_piped_keeps_history_and_reset(tiny_hf_dir, capsys, monkeypatch):
    lines = "hello\nhow are you\n/reset\n/system be brief\nbye\n/exit\nnever read\n"
    code, out, err = run_cli(
        ["chat", str(tiny_hf_dir), "--temperature", "0", "-n", "5"], capsys, lines, monkeypatch
    )
    assert code == 0, err
    assert "(conversation cleared)" in out
    assert "(system message set" in out
    # --compile decodes through torch.compile (or eagerly where it cannot): the same answers.
    code, compiled, err = run_cli(
        ["chat", str(tiny_hf_dir), "--temperature", "0", "-n", "5", "--compile"], capsys, lines, monkeypatch
    )
    assert code == 0, err
    assert compiled == out


def test_info_and_store_commands(tiny_hf_dir, capsys):
    code, out, _ = run_cli(["info", str(tiny_hf_dir), "--json"], capsys)
    assert code == 0
    info = json.loads(out)
    assert info["model_type"] == "llama" and info["layers"] == 2 and info["kv_heads"] == 2
    assert info["chat_template"].startswith("{% for m in messages %}")
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir)
    assert info["parameters"] == sum(p.numel() for p in hf.parameters())

    assert run_cli(["pull", str(tiny_hf_dir), "--name", "tiny"], capsys)[0] == 0
    code, out, _ = run_cli(["models", "--json"], capsys)
    assert [m["name"] for m in json.loads(out)["models"]] == ["tiny"]
    code, out, _ = run_cli(
        ["generate", "tiny", "-p", "Hi", "--temperature", "0", "-n", "3", "--json"], capsys
    )
    assert code == 0
    assert run_cli(["rm", "tiny"], capsys)[0] == 0
    assert tiny_hf_dir.exists()
    code, out, _ = run_cli(["models", "--json"], capsys)
    assert json.loads(out)["models"] == []


def one_line_error(capsys, argv, *, expect_in: list[str], code: int = 1) -> str:
    rc, out, err = run_cli(argv, capsys)
    assert rc == code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for s in expect_in:
        assert s in lines[0], lines[0]
    return lines[0]


def test_missing_path(capsys, tmp_path):
    one_line_error(capsys, ["generate", str(tmp_path / "nope"), "-p", "x"], expect_in=["nope", "not found"])


def test_truncated_safetensors(tiny_hf_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_hf_dir, broken)
    f = broken / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    one_line_error(capsys, ["generate", str(broken), "-p", "x"], expect_in=[str(f), "truncated"])


def test_unknown_model_type(tiny_hf_dir, tmp_path, capsys):
    bad = tmp_path / "bad-type"
    shutil.copytree(tiny_hf_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (bad / "config.json").write_text(json.dumps(cfg))
    one_line_error(capsys, ["info", str(bad)], expect_in=["config.json", "gpt_neox", "not supported"])


def test_wrong_tensor_shape(tiny_hf_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad-shape"
    shutil.copytree(tiny_hf_dir, bad)
    state = load_file(bad / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    state[name] = state[name][:-1]
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    one_line_error(capsys, ["generate", str(bad), "-p", "x"], expect_in=[name, "shape"])


def test_gguf_of_unsupported_architecture(tmp_path, capsys):
    import gguf
    import numpy as np

    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    one_line_error(capsys, ["generate", str(path), "-p", "x"], expect_in=[str(path), "gpt2", "not supported"])


def test_pickle_refused_without_flag(tiny_hf_dir, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    pk = tmp_path / "pickled"
    shutil.copytree(tiny_hf_dir, pk)
    torch.save(load_file(pk / "model.safetensors"), pk / "pytorch_model.bin")
    (pk / "model.safetensors").unlink()
    one_line_error(
        capsys, ["generate", str(pk), "-p", "x"], expect_in=["pytorch_model.bin", "--allow-pickle"]
    )
    code, out, err = run_cli(
        ["generate", str(pk), "-p", "x", "--allow-pickle", "-n", "2", "--temperature", "0", "--json"], capsys
    )
    assert code == 0, err


def test_usage_errors_exit_2(capsys):
    one_line_error(
        capsys, ["generate", "x", "-p", "y", "--max-tokens", "abc"], expect_in=["--max-tokens"], code=2
    )


def test_bad_sampling_value_is_one_line(tiny_hf_dir, capsys):
    one_line_error(capsys, ["generate", str(tiny_hf_dir), "-p", "x", "--top-p", "1.5"], expect_in=["top_p"])


def test_subprocess_debug_and_exit_code(tmp_path):
    """The installed console script: exit status 1 and one line, traceback only with --debug."""
    exe = Path(sys.executable).parent / "weightsmith"
    missing = str(tmp_path / "missing")
    r = subprocess.run([str(exe), "info", missing], capture_output=True, text=True)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and missing in r.stderr
    r = subprocess.run([str(exe), "--debug", "info", missing], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" in r.stderr


def test_python_dash_m_weightsmith(tmp_path):
    """`python -m weightsmith` is the command (torchrun's `-m` runs it): help exits 0, and an
    error keeps its exit status and one line."""
    r = subprocess.run([sys.executable, "-m", "weightsmith", "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "finetune" in r.stdout
    missing = str(tmp_path / "missing")
    r = subprocess.run([sys.executable, "-m", "weightsmith", "info", missing], capture_output=True, text=True)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and missing in r.stderr


def test_info_reads_metadata_without_importing_torch(tiny_hf_dir, tmp_path, capsys):
    """`info` on an HF folder and on a GGUF file describes the model from its metadata alone:
    torch (seconds to import) is never imported, so the command answers at once."""
    gguf_path = tmp_path / "tiny.gguf"
    assert run_cli(["export", str(tiny_hf_dir), "--quant", "q8_0", "--out", str(gguf_path)], capsys)[0] == 0
    capsys.readouterr()
    code = (
        "import json, sys\n"
        "from weightsmith.cli.main import main\n"
        "for path in sys.argv[1:]:\n"
        "    assert main(['info', path, '--json']) == 0\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(tiny_hf_dir), str(gguf_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count('"model_type": "llama"') == 2  # both described
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []  # no torch module loaded


def test_demo_and_info_on_default_model(default_gguf, capsys, monkeypatch):
    """The main job end to end on the real default model (its store entry, not a copy)."""
    monkeypatch.setenv("WEIGHTSMITH_HOME", str(default_gguf.parent.parent.parent))
    code, out, err = run_cli(["demo", "--stages", "chat", "--max-tokens", "8"], capsys)
    assert code == 0, err
    assert out.count("assistant> ") == 3
    assert "decode" in out and "tokens/s" in out
    code, out, err = run_cli(["info", "smollm2-135m-instruct", "--json"], capsys)
    info = json.loads(out)
    assert (info["format"], info["model_type"], info["layers"], info["context_length"]) == (
        "gguf",
        "llama",
        30,
        8192,
    )
    assert info["precision"].startswith("Q4_1")


def test_demo_finetune_stage_teaches_the_house_style(default_gguf, capsys, monkeypatch, tmp_path):
    """Acceptance: a short LoRA run on the bundled data lowers validation loss, and on
    held-out questions the tuned model's greedy answers follow the Kettlebird format
    where the base model's never do."""
    monkeypatch.setenv("WEIGHTSMITH_HOME", str(default_gguf.parent.parent.parent))
    out_dir = tmp_path / "kb"
    code, out, err = run_cli(
        [
            "demo",
            "--stages",
            "finetune,serve,eval,redteam,arena",
            "--steps",
            "16",
            "--arena-battles",
            "2",
            "--out",
            str(out_dir),
            "--eval-limit",
            "16",
            "--redteam-limit",
            "1",
            "--max-tokens",
            "24",
        ],
        capsys,
    )
    assert code == 0, err
    assert "validation loss" in out and "house style" in out
    assert (out_dir / "adapter_model.safetensors").is_file()
    before, after = (float(x) for x in out.split("validation loss ")[1].split(" in ")[0].split(" -> "))
    assert after < before - 0.5
    style = next(
        line for line in out.splitlines() if line.startswith("answers in the Kettlebird house style")
    )
    base, tuned = (int(style.split(f"{name} ")[-1].split(",")[0].split(" ")[0]) for name in ("base", "tuned"))
    assert base == 0 and tuned >= 9
    # The arena stage: two battles scored by the reward judge, then judged by the LLM judge in both
    # orders: the ratings table of the reward judge's two votes, and the judges' agreement.
    assert "== arena:" in out and "judge:reward-contains: voted on 2 battles (2 new)" in out
    assert "judge:smollm2-135m-instruct: voted on 2 battles (0 new)" in out
    assert "arena ratings (judge:reward-contains votes: 2)" in out and "arena serve" in out
    assert "agreement judge:reward-contains vs judge:smollm2-135m-instruct on 2 battles" in out
    assert (out_dir / "arena" / "arena.sqlite").is_file() and (out_dir / "arena" / "report.html").is_file()
    # The serve stage: the adapter, served and asked through the official OpenAI client.
    assert "== serve:" in out and "asked with the openai client" in out
    assert "served adapter answers in the house style: yes" in out
    # The eval stage: the tuned adapter names the held-out answers' topic where the base never
    # does, and models the house-style answers with a significantly lower perplexity.
    assert "== eval:" in out
    comparison = json.loads((out_dir / "eval" / "comparison.json").read_text())
    rows = {(r["task"], r["metric"]): r for r in comparison["rows"]}
    topic = rows[("kettlebird_heldout", "exact_match")]
    (label,) = topic["delta"]
    assert topic["values"][comparison["reference"]] == 0 and topic["values"][label] > 0.1
    assert topic["test"] == "mcnemar"
    ppl = rows[("kettlebird_answer_ppl", "word_perplexity")]
    assert ppl["delta"][label] < 0 and ppl["better"][label] is True
    assert (out_dir / "eval" / "report.html").is_file()
    # The redteam stage: base and fork, each bare and behind the sample policy, one table.
    assert "== redteam:" in out and "attack success and over-refusal" in out
    summary = json.loads((out_dir / "redteam" / "summary.json").read_text())
    configs = {r["config"]: r for r in summary["configs"]}
    assert list(configs) == [
        "smollm2-135m-instruct", "smollm2-135m-instruct + guard:school",
        "smollm2-135m-instruct+kb", "smollm2-135m-instruct+kb + guard:school",
    ]  # fmt: skip
    assert summary["probes"] == {"attack": 10, "benign": 1, "packs": sorted(summary["probes"]["packs"]),
                                 "transforms": ["base64", "none"]}  # fmt: skip
    for label in configs:
        assert configs[label]["asr"]["n"] == 10 and configs[label]["over_refusal"]["n"] == 1
        if label.endswith("guard:school"):
            assert configs[label]["guard_actions"].get("input_block", 0) > 0
    lines = [json.loads(x) for x in (out_dir / "redteam" / "transcripts.jsonl").read_text().splitlines()]
    blocked = [r for r in lines if r["guard"] and r["guard"]["action"] == "block"]
    assert blocked and all(r["finish_reason"] == "content_filter" and r["refused"] for r in blocked)
    assert not any(r.get("success") for r in blocked)
    assert (out_dir / "redteam" / "report.html").is_file()
