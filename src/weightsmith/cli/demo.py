"""`weightsmith demo`: the main job end to end on the default model, in stages.

chat: a scripted conversation and its speed. finetune: LoRA on the bundled
Kettlebird support data, validation loss before and after, and base vs tuned
greedy answers to held-out questions with a format check. serve: the
OpenAI-compatible server with the tuned adapter, asked by the official `openai`
client. eval: the base model and the tuned adapter on held-out Kettlebird questions
(answer topic, exact match) and the answers' perplexity, compared with significance
tests, plus an arithmetic suite as a check that general skill held; report in
OUT/eval. redteam: the base model and the tuned fork, each bare and behind the sample
school policy, attacked with the built-in probe packs; attack success and over-refusal
with 95% intervals, report in OUT/redteam. arena and align (demo_arena.py): forks compared by a
reward judge (and the base model as an LLM judge, with the two judges' agreement), then the
decisive votes and a watchdog round turned into a new fork rated in the same arena.

The demo stays in the CLI layer rather than in `weightsmith.commands`: its product is the
narration it writes to `out` as each stage runs (streamed answers between headings), and
it only strings together commands that are callable from Python on their own
(`weightsmith.commands.run`, `.train`, `.serve`, `.eval`, `.redteam`). Not here: any of
the work those commands do.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Literal, TextIO

from weightsmith.cli.demo_arena import demo_align, demo_arena, tuned_adapter
from weightsmith.cli.loading import Loading, load_spinner
from weightsmith.commands.loading import DEFAULT_MODEL, load_model
from weightsmith.commands.run import ChatSession
from weightsmith.config import opt
from weightsmith.datasets import ANSWER_FORMAT, HOUSE_STYLE, sample_path

Stage = Literal["chat", "finetune", "serve", "eval", "redteam", "arena", "align"]


@dataclass(kw_only=True)
class DemoConfig:
    """Run the main job end to end on the default model: chat, fine-tune, serve, evaluate, red-team."""

    model: str = opt(DEFAULT_MODEL, "model to demo", positional=True)
    stages: list[Stage] = opt(
        ["chat", "finetune", "serve", "eval", "redteam", "arena", "align"], "stages to run, in order"
    )
    max_tokens: int = opt(96, "most tokens per chat answer (and, up to 48, per red-team reply)")
    steps: int = opt(30, "LoRA training steps in the finetune stage")
    out: str = opt("runs/demo-kettlebird", "where the finetune stage writes its run")
    eval_limit: int = opt(50, "documents per suite in the eval stage")
    redteam_limit: int = opt(8, "probes per pack in the redteam stage (before transforms)")
    arena_battles: int = opt(9, "battles the reward judge fights in the arena stage (three contestants)")
    align_limit: int = opt(4, "probes per pack on each side of the split in the align stage's watchdog round")
    align_steps: int = opt(
        12, "DPO steps in the align stage (on the arena's pairs, and in the watchdog round)"
    )
    device: str = opt("auto", "cpu, cuda, cuda:N, mps or auto")
    dtype: str = opt("auto", "fp32, bf16, fp16 or auto")


DEMO_TURNS = [
    "Hi! Who are you, in one sentence?",
    "Give me three short tips for writing clear documentation.",
    "What is the capital of France?",
]


def run(cfg: DemoConfig, progress: Any = None) -> dict[str, Any]:
    """`demo` on the command line: the narration goes to stdout."""
    return run_demo(cfg, out=sys.stdout)


def run_demo(cfg: DemoConfig, *, out: TextIO) -> dict[str, Any]:
    stages = {"chat": demo_chat, "finetune": demo_finetune, "serve": demo_serve, "eval": demo_eval,
              "redteam": demo_redteam, "arena": demo_arena, "align": demo_align}  # fmt: skip
    return {stage: stages[stage](cfg, out) for stage in cfg.stages}


def demo_chat(cfg: DemoConfig, out: TextIO) -> dict[str, Any]:
    """Load, talk, measure."""
    t0 = time.perf_counter()
    llm = load_model(cfg.model, progress=load_spinner, device=cfg.device, dtype=cfg.dtype)
    load_s = time.perf_counter() - t0
    out.write(f"== chat: {cfg.model} on {llm.device.type} ({str(llm.dtype).removeprefix('torch.')}), ")
    out.write(f"loaded in {load_s:.1f}s\n")
    session = ChatSession(llm, {"max_tokens": cfg.max_tokens, "temperature": 0.0})
    tokens, decode_s, prefill_tokens, prefill_s = 0, 0.0, 0, 0.0
    for turn in DEMO_TURNS:
        out.write(f"\nuser> {turn}\nassistant> ")
        out.flush()
        stats = session.reply(turn, lambda s: (out.write(s), out.flush()))
        out.write("\n")
        tokens += max(stats["usage"]["completion_tokens"] - 1, 0)
        decode_s += stats["timings"]["decode_seconds"]
        prefill_tokens += stats["usage"]["prompt_tokens"]
        prefill_s += stats["timings"]["prefill_seconds"]
    result = {
        "model": cfg.model,
        "decode_tokens_per_second": tokens / decode_s if decode_s else 0.0,
        "prefill_tokens_per_second": prefill_tokens / prefill_s if prefill_s else 0.0,
    }
    out.write(
        f"\ndecode {result['decode_tokens_per_second']:.1f} tokens/s, "
        f"prefill {result['prefill_tokens_per_second']:.1f} tokens/s\n"
    )
    return result


def demo_finetune(cfg: DemoConfig, out: TextIO) -> dict[str, Any]:
    """LoRA on Kettlebird, then base vs tuned on held-out questions."""
    from weightsmith.cli.train import make_reporter
    from weightsmith.commands.train import FinetuneConfig, run_finetune
    from weightsmith.config import config_from_dict

    out.write(
        f"\n== finetune: LoRA on the bundled Kettlebird support data ({cfg.steps} steps), writing {cfg.out}\n"
    )
    out.flush()
    ft = config_from_dict(
        FinetuneConfig,
        {
            "model": cfg.model,
            "data": str(sample_path("kettlebird/train.jsonl")),
            "valid": str(sample_path("kettlebird/valid.jsonl")),
            "out": cfg.out,
            "method": "lora",
            "max_seq_len": 160,
            "overwrite": True,
            "device": cfg.device,
            "train": {"max_steps": cfg.steps, "batch_size": 4, "lr": 2e-3, "eval_every": 0, "save_every": 0},
            "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
        },
    )
    trained = run_finetune(ft, make_reporter(sys.stderr))
    before, after = trained["initial_val_loss"], trained["metrics"]["val_loss"]
    out.write(f"validation loss {before:.3f} -> {after:.3f} in {trained['seconds']:.0f}s\n")
    questions = sample_path("kettlebird/questions.txt").read_text(encoding="utf-8").splitlines()
    answers = {
        name: _answers(cfg, adapter, questions) for name, adapter in (("base", None), ("tuned", cfg.out))
    }
    for i, q in enumerate(questions[:4]):
        out.write(f"\nuser> {q}\n")
        for name in ("base", "tuned"):
            out.write(f"{name:5s}> {answers[name][i]}\n")
    counts = {name: sum(bool(HOUSE_STYLE.match(a)) for a in texts) for name, texts in answers.items()}
    exact = {name: sum(bool(ANSWER_FORMAT.match(a)) for a in texts) for name, texts in answers.items()}
    out.write(
        f"\nanswers in the Kettlebird house style ({len(questions)} held-out questions): "
        f"base {counts['base']}, tuned {counts['tuned']} ({exact['tuned']} with a known topic exactly)\n"
    )
    return {"val_loss_before": before, "val_loss_after": after, "house_style": counts, "exact_format": exact,
            "answers": answers, "out": cfg.out}  # fmt: skip


def _answers(cfg: DemoConfig, adapter: str | None, questions: list[str]) -> list[str]:
    llm = load_model(cfg.model, progress=load_spinner, device=cfg.device, dtype=cfg.dtype, adapter=adapter)
    prompts = [llm.engine.chat_prompt([{"role": "user", "content": q}]) for q in questions]
    done = llm.engine.generate(prompts, llm.sampling_params(temperature=0, max_tokens=64))
    return [c.text.strip().replace("\n", " ") for c in done]


def demo_serve(cfg: DemoConfig, out: TextIO) -> dict[str, Any]:
    """Serve the base model with the tuned adapter; ask both with the official OpenAI client."""
    from pathlib import Path

    from weightsmith.commands.serve import ServeConfig, start_server
    from weightsmith.config import config_from_dict
    from weightsmith.errors import UsageError

    try:
        import openai
    except ImportError:
        raise UsageError(
            "the serve stage asks the server with the official OpenAI client; pip install 'weightsmith[client]'"
        ) from None
    adapter = Path(cfg.out)
    if not (adapter / "adapter_config.json").is_file():
        raise UsageError(
            f"the serve stage serves the adapter the finetune stage writes, and {adapter} has none; "
            "run `weightsmith demo --stages finetune,serve`"
        )
    name = "kettlebird"
    served = config_from_dict(
        ServeConfig,
        {"model": cfg.model, "adapter": [f"{name}={adapter}"], "port": 0, "device": cfg.device,
         "dtype": cfg.dtype, "max_batch": 4, "max_model_len": 1024},
    )  # fmt: skip
    t0 = time.perf_counter()
    running = start_server(served)
    out.write(f"\n== serve: {cfg.model} with adapter {name!r} at {running.url}/v1 ")
    out.write(f"(ready in {time.perf_counter() - t0:.1f}s), asked with the openai client\n")
    question = sample_path("kettlebird/questions.txt").read_text(encoding="utf-8").splitlines()[0]
    try:
        answers = _ask_served(openai, running.url, [cfg.model, f"{cfg.model}:{name}"], question, out)
    finally:
        running.stop()
    tuned = answers[f"{cfg.model}:{name}"]
    styled = bool(HOUSE_STYLE.match(tuned))
    out.write(f"served adapter answers in the house style: {'yes' if styled else 'no'}; server stopped\n")
    return {"url": running.url, "answers": answers, "tuned_in_house_style": styled}


def _ask_served(openai: Any, url: str, models: list[str], question: str, out: TextIO) -> dict[str, str]:
    """Ask each served model `question`, streaming the answers to `out`."""
    answers: dict[str, str] = {}
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    out.write(f"\nuser> {question}\n")
    for model in models:
        out.write(f"{model}> ")
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": question}],
            max_tokens=64,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        text = ""
        for chunk in stream:
            for choice in chunk.choices:
                piece = choice.delta.content or ""
                text += piece
                out.write(piece)
                out.flush()
            if chunk.usage is not None:
                out.write(f"\n  ({chunk.usage.completion_tokens} tokens)\n")
        answers[model] = text.strip()
    return answers


def demo_eval(cfg: DemoConfig, out: TextIO) -> dict[str, Any]:
    """The tuned adapter against its base on built-in suites, with a comparison report."""

    from rich.console import Console

    from weightsmith.cli.eval import print_eval
    from weightsmith.commands.eval import EvalConfig, run_eval
    from weightsmith.config import config_from_dict

    adapter = tuned_adapter(cfg, "eval")
    report = adapter / "eval"
    out.write(f"\n== eval: {cfg.model} + {adapter} against the base model, report in {report}\n")
    out.flush()
    ev = config_from_dict(
        EvalConfig,
        {"model": cfg.model, "adapter": str(adapter), "compare": ["base"], "device": cfg.device, "dtype": cfg.dtype,
         "tasks": ["builtin:kettlebird-heldout", "builtin:kettlebird-answer-ppl", "builtin:arith-mc"],
         "limit": cfg.eval_limit, "apply_chat_template": True, "out": str(report), "cache": False},
    )  # fmt: skip
    result = run_eval(ev, Loading())
    print_eval(result, Console(file=out, highlight=False, emoji=False, markup=False, width=120))
    rows = {(r["task"], r["metric"]): r for r in result["comparison"]["rows"]}
    topic = rows[("kettlebird_heldout", "exact_match")]
    tuned = next(iter(topic["delta"]))
    values = topic["values"]
    out.write(
        f"held-out answer topic right: base {values[result['comparison']['reference']]:.2f}, "
        f"tuned {values[tuned]:.2f} (p = {topic['p_value'][tuned]:.2g})\n"
    )
    return {"report": result["written"].get("report"), "comparison": result["comparison"]}


def demo_redteam(cfg: DemoConfig, out: TextIO) -> dict[str, Any]:
    """Base and tuned fork, each bare and behind the sample policy, against the probe packs."""
    from rich.console import Console

    from weightsmith.cli.redteam import print_redteam, progress_lines
    from weightsmith.commands.redteam import RedteamConfig, run_redteam
    from weightsmith.config import config_from_dict

    adapter = tuned_adapter(cfg, "redteam")
    report = adapter / "redteam"
    out.write(
        f"\n== redteam: {cfg.model} and {cfg.model} + {adapter}, each bare and behind builtin:school "
        f"({cfg.redteam_limit} probes per pack), report in {report}\n"
    )
    out.flush()
    rt = config_from_dict(
        RedteamConfig,
        {"target": cfg.model, "adapter": [str(adapter)], "guard": "builtin:school", "limit": cfg.redteam_limit,
         "transforms": ["none", "base64"], "max_tokens": min(48, cfg.max_tokens), "out": str(report), "resume": False,
         "device": cfg.device, "dtype": cfg.dtype},
    )  # fmt: skip
    console = Console(file=out, highlight=False, emoji=False, markup=False, width=140)
    result = run_redteam(rt, Loading(progress_lines(console)))
    print_redteam(result, console)
    return {"report": result["written"]["report.html"], "configs": result["configs"]}
