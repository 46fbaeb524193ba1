"""Our eval runner's numbers equal lm-eval's (Hugging Face backend) on the same task files
and tiny random model: acc, acc_norm, acc_bytes, exact_match (with filters and few-shot
examples), perplexity, word/byte perplexity and bits per byte, and their standard errors.
The lm-eval plugin (`--model weightsmith`) gives the same numbers inside lm-eval."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from weightsmith import load
from weightsmith.eval.cache import model_fingerprint
from weightsmith.eval.runner import EvalOptions, Runner, evaluate, load_tasks
from weightsmith.eval.scorer import Scorer

lm_eval = pytest.importorskip("lm_eval")

WORDS = "quick brown fox jumps over the lazy dog once upon a time there was small model learned talk".split()

MC_YAML = """
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files: {test: mc.jsonl, train: mc_train.jsonl}
test_split: test
fewshot_split: train
num_fewshot: 2
output_type: multiple_choice
doc_to_text: "Q: {{question}}\\nA:"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - {metric: acc}
  - {metric: acc_norm}
  - {metric: acc_bytes}
  - {metric: exact_match}
"""

GEN_YAML = """
task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files: {test: gen.jsonl}
test_split: test
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: answer
generation_kwargs: {until: ["\\n", "."], max_gen_toks: 8, do_sample: false}
filter_list:
  - name: first_word
    filter:
      - {function: regex, regex_pattern: "(\\\\S+)"}
      - {function: take_first}
  - name: whole
    filter:
      - {function: remove_whitespace}
      - {function: take_first}
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: true, ignore_punctuation: true}
"""

PPL_YAML = """
task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files: {test: text.jsonl}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}
"""

LL_YAML = """
task: tiny_ll
dataset_path: json
dataset_kwargs:
  data_files: {test: mc.jsonl}
test_split: test
output_type: loglikelihood
doc_to_text: "Q: {{question}}\\nA:"
doc_to_target: "{{' ' + choices[label]}}"
"""


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _phrase(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, tiny_hf_dir):
    import transformers

    rng = random.Random(0)
    d = tmp_path_factory.mktemp("tasks")

    def mc_rows(n):
        rows = []
        for _ in range(n):
            # dict, not set: a set's order follows PYTHONHASHSEED, so the labels would change per run
            choices = list(dict.fromkeys(_phrase(rng, rng.randint(1, 3)) for _ in range(4)))
            rows.append(
                {"question": _phrase(rng, 5), "choices": choices, "label": rng.randrange(len(choices))}
            )
        return rows

    _write_jsonl(d / "mc.jsonl", mc_rows(16))
    _write_jsonl(d / "mc_train.jsonl", mc_rows(8))
    # Half the generation targets are what transformers itself generates, so exact_match is not all 0.
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_hf_dir))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_hf_dir), dtype=torch.float32).eval()
    rows = []
    for i in range(12):
        prompt = _phrase(rng, 4)
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0].split(".")[0]
        answer = text.strip().upper() if i % 2 == 0 else _phrase(rng, 1)
        rows.append({"prompt": prompt, "answer": answer})
    _write_jsonl(d / "gen.jsonl", rows)
    _write_jsonl(d / "text.jsonl", [{"text": _phrase(rng, rng.randint(5, 120)) + "."} for _ in range(6)])
    for name, text in {"mc": MC_YAML, "gen": GEN_YAML, "ppl": PPL_YAML, "ll": LL_YAML}.items():
        (d / f"{name}.yaml").write_text(text)
    return d


def _lm_eval_results(
    task_dir, monkeypatch, model, model_args, tasks=("tiny_mc", "tiny_gen", "tiny_ppl", "tiny_ll")
):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(task_dir)  # lm-eval resolves data_files against the working directory
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=list(tasks),
        task_manager=tm,
        batch_size=1,
        device="cpu",
        bootstrap_iters=0,
        log_samples=False,
    )
    return out["results"]


@pytest.fixture(scope="module")
def ours(task_dir, tiny_hf_dir):
    llm = load(str(tiny_hf_dir), dtype="float32")
    runner = Runner(Scorer(llm.model, llm.tokenizer, batch_size=5), fingerprint=model_fingerprint(llm.model))
    taskset = load_tasks([str(task_dir)])
    results, samples = evaluate(runner, taskset, EvalOptions())
    return results["results"], samples


def _assert_same(expected: dict, got: dict) -> None:
    for task, values in expected.items():
        for key, value in values.items():
            if "," not in key or "_stderr" in key:
                continue
            assert key in got[task], (task, key)
            assert got[task][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (task, key)


def test_metrics_equal_lm_eval_hf(task_dir, tiny_hf_dir, ours, monkeypatch):
    expected = _lm_eval_results(task_dir, monkeypatch, "hf", f"pretrained={tiny_hf_dir},dtype=float32")
    got, samples = ours
    _assert_same(expected, got)
    # The checks are not vacuous: some documents pass and some fail.
    for key in ("acc,none", "acc_norm,none", "exact_match,none"):
        assert 0 < got["tiny_mc"][key] < 1 or key == "exact_match,none", key
    assert 0 < got["tiny_gen"]["exact_match,whole"] < 1
    assert math.isfinite(got["tiny_ppl"]["word_perplexity,none"])


def test_mean_stderrs_equal_lm_eval(task_dir, tiny_hf_dir, ours, monkeypatch):
    from lm_eval.api.metrics import mean_stderr

    got, samples = ours
    for task, key in [
        ("tiny_mc", "acc,none"),
        ("tiny_mc", "acc_norm,none"),
        ("tiny_gen", "exact_match,whole"),
    ]:
        per_doc = [r["metrics"][key] for r in samples[task]]
        stderr_key = key.replace(",", "_stderr,")
        assert got[task][stderr_key] == pytest.approx(mean_stderr(per_doc), rel=1e-9)


def test_lm_eval_plugin_gives_the_same_numbers(task_dir, tiny_hf_dir, ours, monkeypatch):
    import weightsmith.eval.lm_eval_plugin  # noqa: F401 - registers --model weightsmith

    expected = _lm_eval_results(task_dir, monkeypatch, "weightsmith", f"model={tiny_hf_dir},dtype=float32")
    _assert_same(expected, ours[0])


def test_lm_eval_remote_tokenizer_scores_a_server_like_weightsmith_eval(
    task_dir, tiny_hf_dir, ours, monkeypatch, tmp_path
):
    """lm-eval's `local-completions` with `tokenizer_backend=remote` (it tokenizes through the
    server's /tokenizer_info, /tokenize and /detokenize, as with vLLM) against a live server of the
    same model gives `weightsmith eval`'s numbers. lm-eval's API models cut rolling windows of
    max_length - 1 tokens, and each scoring request generates one token after the echoed prompt,
    which a server (vLLM too) refuses when the prompt fills its context: so the served copy
    declares twice the context (same weights; RoPE does not depend on it) and lm-eval's windows
    are the in-process run's 256 tokens."""
    import shutil

    from weightsmith.commands.serve import ServeConfig, start_server
    from weightsmith.config import config_from_dict

    served = tmp_path / "served"
    shutil.copytree(tiny_hf_dir, served)
    config = json.loads((served / "config.json").read_text())
    window = config["max_position_embeddings"]
    (served / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2 * window}))
    running = start_server(
        config_from_dict(ServeConfig, {"model": str(served), "served_name": "tiny", "port": 0})
    )
    try:
        args = (f"base_url={running.url}/v1/completions,model=tiny,tokenizer_backend=remote,"
                f"tokenized_requests=True,max_length={window + 1},max_retries=1")  # fmt: skip
        expected = _lm_eval_results(task_dir, monkeypatch, "local-completions", args)
    finally:
        running.stop()
    _assert_same(expected, ours[0])
    assert set(expected) == {"tiny_mc", "tiny_gen", "tiny_ppl", "tiny_ll"}


def test_weightsmith_lm_eval_command_runs_lm_eval_cli(task_dir, tiny_hf_dir, monkeypatch, tmp_path):
    """`weightsmith-lm-eval` is lm-eval's own CLI with `--model weightsmith` available."""
    from weightsmith.eval.lm_eval_plugin import main

    monkeypatch.chdir(task_dir)
    out = tmp_path / "out"
    argv = ["weightsmith-lm-eval", "--model", "weightsmith", "--model_args", f"model={tiny_hf_dir},dtype=float32",
            "--tasks", "tiny_mc", "--include_path", str(task_dir), "--limit", "3", "--output_path", str(out)]  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    try:
        main()
    except SystemExit as exc:
        assert exc.code in (0, None)
    written = list(out.rglob("results_*.json"))
    assert written, list(out.rglob("*"))
    results = json.loads(written[0].read_text())["results"]["tiny_mc"]
    assert 0 <= results["acc,none"] <= 1
