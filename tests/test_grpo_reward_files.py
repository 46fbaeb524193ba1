"""`--reward PATH.py:FUNCTION[:WEIGHT]`: reward functions from the user's own file, in our
calling convention or TRL's (TRL's own reward functions run unchanged and agree with our
built-ins), bad files and functions named in one line before the model loads, the file's
hash in the run's lineage, and `reproduce` re-running the run while the file is unchanged."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest

from weightsmith.cli.main import main
from weightsmith.errors import ConfigError
from weightsmith.train.rewards import BUILTIN, RewardContext, RewardError, parse_rewards, score

pytest.importorskip("trl")

CONTEXT = RewardContext(max_completion_len=8, overlong_cache=3)
PROMPTS = [[{"role": "user", "content": "2 + 2?"}], [{"role": "user", "content": "Think first."}]]
ROWS = [{"prompt": PROMPTS[0], "answer": 4, "level": "easy"}, {"prompt": PROMPTS[1], "answer": 7}]
TEXTS = ["<think>\nsum\n</think>\n4", "no think, 7"]
IDS = [[5, 6, 7, 8, 9, 10, 11], [5, 6, 7]]


def write(path: Path, source: str) -> Path:
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    return path


def test_our_convention_and_trls_get_what_they_ask_for(tmp_path):
    file = write(tmp_path / "mine.py", """
        CALLS = []

        def brevity(completions, rows, lengths):
            return [1.0 / n for n in lengths]

        def theirs(prompts, completions, completion_ids, answer, **kwargs):
            CALLS.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids,
                              answer=answer, **kwargs))
            return [None if a == 7 else float(len(c[0]["content"])) for c, a in zip(completions, answer)]
    """)  # fmt: skip
    rewards = parse_rewards([f"{file}:brevity:0.5", f"{file}:theirs"], CONTEXT)
    assert [(r.name, r.weight) for r in rewards] == [("brevity", 0.5), ("theirs", 1.0)]
    table = score(rewards, TEXTS, ROWS, [len(x) for x in IDS], IDS)
    assert table[:, 0].tolist() == pytest.approx([1 / 7, 1 / 3])
    assert table[0, 1] == len(TEXTS[0]) and math.isnan(table[1, 1])  # None: does not apply
    (call,) = rewards[1].fn.fn.__globals__["CALLS"]
    assert call["prompts"] == PROMPTS and call["completion_ids"] == IDS
    assert call["completions"] == [[{"role": "assistant", "content": t}] for t in TEXTS]  # conversational
    assert call["answer"] == [4, 7] and call["level"] == [
        "easy",
        None,
    ]  # every other column, None where absent
    assert call["trainer_state"] is None and call["log_metric"]("x", 1.0) is None


def test_trls_own_reward_functions_run_unchanged_and_equal_ours(tmp_path):
    """TRL's `think_format_reward` (conversational completions) and its soft overlong punishment
    (completion ids) against our `think` and `length` built-ins on the same completions."""
    file = write(tmp_path / "trl_rewards.py", """
        from trl.rewards import get_soft_overlong_punishment, think_format_reward

        overlong = get_soft_overlong_punishment(max_completion_len=8, soft_punish_cache=3)
    """)  # fmt: skip
    texts = [*TEXTS, "<think>a</think>b", "<think>x</think><think>y</think>"]
    ids = [*IDS, list(range(6)), list(range(8))]
    rows = [*ROWS, ROWS[0], ROWS[1]]
    theirs = parse_rewards([f"{file}:think_format_reward", f"{file}:overlong"], CONTEXT)
    ours = parse_rewards(["think", "length"], CONTEXT)
    got = score(theirs, texts, rows, [len(x) for x in ids], ids)
    want = score(ours, texts, rows, [len(x) for x in ids], ids)
    assert got.tolist() == want.tolist()
    assert set(got[:, 0].tolist()) == {0.0, 1.0} and len(set(got[:, 1].tolist())) > 1  # both vary


@pytest.mark.parametrize(
    ("source", "spec", "message"),
    [
        (None, "missing.py:f", "missing.py: no such file"),
        ("def f(:\n", "r.py:f", "importing {file} failed (line 1): SyntaxError"),
        (
            "import no_such_module_here\n",
            "r.py:f",
            "ModuleNotFoundError: No module named 'no_such_module_here'",
        ),
        ("def g(c, r, n): return []\ndef h(c, r, n): return []\n", "r.py:f", "has no 'f' (it defines: g, h)"),
        ("async def f(**kw): return []\n", "r.py:f", "f is an async function"),
        ("f = 3\n", "r.py:f", "f is int"),
        ("def think(c, r, n): return []\n", "r.py:think", "'think' is a built-in reward's name"),
        ("def f(c, r, n): return []\n", "r.py:f:zero", "the weight must be a finite non-zero number"),
    ],
)
def test_a_bad_file_or_function_is_one_line(tmp_path, monkeypatch, source, spec, message):
    monkeypatch.chdir(tmp_path)
    if source is not None:
        write(tmp_path / "r.py", source)
    with pytest.raises(
        ConfigError, match=message.format(file="r.py").replace("(", r"\(").replace(")", r"\)")
    ) as err:
        parse_rewards([spec], CONTEXT)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"--reward {spec}: ")


def test_an_error_in_the_function_names_the_reward(tmp_path):
    file = write(tmp_path / "r.py", "def f(completions, rows, lengths):\n    return [1 / 0]\n")
    with pytest.raises(
        RewardError, match=r"the f reward \(.*r\.py:f\) raised ZeroDivisionError: division by zero"
    ):
        score(parse_rewards([f"{file}:f"], CONTEXT), ["a"], [{}], [1])
    assert "PATH.py:FUNCTION" in str(pytest.raises(ConfigError, parse_rewards, ["nope"], CONTEXT).value)
    assert "vowels" not in BUILTIN


def test_the_file_is_an_input_of_the_run_and_reproduce_checks_it(tiny_hf_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "rewards.py", """
        def vowels(completions, rows, lengths):
            return [sum(c in "aeiou" for c in t) / max(len(t), 1) for t in completions]
    """)  # fmt: skip
    rows = [{"prompt": [{"role": "user", "content": f"Say something, number {i}."}]} for i in range(4)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["grpo", str(tiny_hf_dir), "--data", "p.jsonl", "--out", "run", "--reward", "rewards.py:vowels:2",
            "--reward", "length:0.5", "--num-generations", "2", "--max-completion-len", "4", "--max-seq-len", "64",
            "--valid-fraction", "0", "--train.max-steps", "2", "--train.batch-size", "2", "--lora.rank", "2",
            "--json"]  # fmt: skip
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rewards"] == {"vowels": 2.0, "length": 0.5} and "reward_vowels" in result["metrics"]
    lineage = json.loads((tmp_path / "run" / "lineage.json").read_text())
    (reward,) = [i for i in lineage["inputs"] if i["role"] == "reward"]
    assert reward["path"].endswith("rewards.py") and len(reward["sha256"]) == 64
    assert (
        main(["reproduce", "run", "--out", "again", "--root", str(tmp_path)]) == 2
    )  # a shared record's code
    err = capsys.readouterr().err
    assert (
        "include Python code (rewards.py:vowels:2)" in err and "--allow-code" in err and err.count("\n") == 1
    )
    assert not (tmp_path / "again").exists()
    assert (
        main(["reproduce", "run", "--out", "again", "--root", str(tmp_path), "--json", "--allow-code"]) == 0
    )
    status = {o["path"]: o["status"] for o in json.loads(capsys.readouterr().out)["outputs"]}
    assert status["adapter_model.safetensors"] == status["rollouts.jsonl"] == "identical", status
    (tmp_path / "rewards.py").write_text(
        "def vowels(completions, rows, lengths):\n    return [0.0] * len(rows)\n"
    )
    assert main(["reproduce", "run", "--out", "third", "--root", str(tmp_path), "--allow-code"]) == 2
    err = capsys.readouterr().err
    assert "input reward" in err and "rewards.py is changed" in err and len(err.strip().splitlines()) == 1
