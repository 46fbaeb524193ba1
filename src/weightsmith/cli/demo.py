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
with 95% intervals, report in OUT/redteam. arena: the base model, the tuned fork and the base model behind the
school policy answer held-out questions in pairs, a reward judge scores each answer against
the held-out answer (the house tag, its topic head and KB reference: `--reward contains`), and
the Bradley–Terry ratings of those votes are printed with the command that opens the page
(and its address) for people to vote too. align: the decisive votes → DPO → the new fork
rated in the same arena, and one watchdog round.

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


def _tuned_adapter(cfg: DemoConfig, stage: str):
    from pathlib import Path

    from weightsmith.errors import UsageError

    adapter = Path(cfg.out)
    if not (adapter / "adapter_config.json").is_file():
        raise UsageError(
            f"the {stage} stage uses the adapter the finetune stage writes, and {adapter} has none; "
            f"run `weightsmith demo --stages finetune,{stage}`"
        )
    return adapter


def demo_eval(cfg: DemoConfig, out: TextIO) -> dict[str, Any]:
    """The tuned adapter against its base on built-in suites, with a comparison report."""

    from rich.console import Console

    from weightsmith.cli.eval import print_eval
    from weightsmith.commands.eval import EvalConfig, run_eval
    from weightsmith.config import config_from_dict

    adapter = _tuned_adapter(cfg, "eval")
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

    adapter = _tuned_adapter(cfg, "redteam")
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


def demo_arena(cfg: DemoConfig, out: TextIO) -> dict[str, Any]:
    """Base, tuned fork and the base behind builtin:school on held-out questions, judged by a
    reward judge against the held-out answers; their ratings, and how to open the page."""
    from pathlib import Path

    from rich.console import Console

    from weightsmith.cli.arena import print_judge, print_ratings
    from weightsmith.commands.arena import ArenaRatingsConfig, run_arena_ratings
    from weightsmith.commands.arena_serve import ArenaServeConfig
    from weightsmith.config import config_from_dict

    adapter = _tuned_adapter(cfg, "arena")
    folder = adapter / "arena"
    folder.mkdir(parents=True, exist_ok=True)
    db, prompts = folder / "arena.sqlite", folder / "prompts.jsonl"
    for old in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        old.unlink(missing_ok=True)  # the demo's own DB: each run starts a fresh arena
    prompts.write_text(_arena_prompts(), encoding="utf-8")
    fork, guarded = f"{cfg.model}:kettlebird", f"{cfg.model}@builtin:school"
    contestants = [cfg.model, fork, guarded]
    out.write(
        f"\n== arena: {', '.join(contestants)} on held-out questions, {cfg.arena_battles} battles; a reward "
        "judge scores each answer alone (--reward contains: the house tag, the held-out answer's topic head and "
        f"its KB reference), so no side is favoured; votes in {db}\n"
    )
    out.flush()
    console = Console(file=out, highlight=False, emoji=False, markup=False, width=120)
    judged = _reward_battles(cfg, db, prompts, contestants, [f"kettlebird={adapter}"])
    print_judge(judged, console)
    ratings = run_arena_ratings(config_from_dict(ArenaRatingsConfig, {"db": str(db), "out": str(folder)}))
    print_ratings(ratings, console)
    port = ArenaServeConfig().port
    out.write(
        f"people can vote too: weightsmith arena serve {' '.join(contestants)} --adapter kettlebird={adapter} "
        f"--prompts {prompts} --db {db}\n  then open http://127.0.0.1:{port}/ (their votes join the judge's; "
        f"`weightsmith arena ratings --db {db} --voters human` rates theirs alone); an LLM judge can vote as "
        f"well: weightsmith arena judge --db {db} --judge {cfg.model} --verdict likelihood\n"
    )
    return {"judge": judged, "ratings": ratings, "db": str(db)}


def _arena_prompts() -> str:
    """The held-out Kettlebird conversations as arena prompt lines: every turn before the last
    answer, and, for the reward judge, the house tag, that answer's topic head and its KB
    reference (`contains`: a third of the score each)."""
    import json
    import re

    lines = []
    for raw in sample_path("kettlebird/valid.jsonl").read_text(encoding="utf-8").splitlines():
        *turns, answer = json.loads(raw)["messages"]
        head, ref = (
            re.match(r"\[Kettlebird\] [^:]+:", answer["content"]),
            re.search(r"\(ref KB-\d+\)", answer["content"]),
        )
        if head and ref:
            lines.append(
                json.dumps({"messages": turns, "contains": ["[Kettlebird]", head.group(0), ref.group(0)]})
                + "\n"
            )
    return "".join(lines)


def _reward_battles(cfg: DemoConfig, db: Any, prompts: Any, contestants: list[str], forks: list[str]) -> dict:
    """`arena judge --reward contains`: `cfg.arena_battles` new battles among `contestants`
    (`forks`: their --adapter NAME=DIR options)."""
    from weightsmith.commands.arena_judge import ArenaJudgeConfig, run_arena_judge
    from weightsmith.config import config_from_dict

    judge = config_from_dict(
        ArenaJudgeConfig,
        {"db": str(db), "reward": ["contains"], "battles": cfg.arena_battles, "contestants": contestants,
         "adapter": forks, "prompts": str(prompts), "max_tokens": min(80, cfg.max_tokens), "temperature": 0.0,
         "device": cfg.device, "dtype": cfg.dtype},
    )  # fmt: skip
    return run_arena_judge(judge)


def demo_align(cfg: DemoConfig, out: TextIO) -> dict[str, Any]:
    """Preferences back into the weights: the arena's judged pairs → DPO → the new fork's rating
    in the same arena; then one watchdog round (red-team train probes → pairs → DPO → held-out
    rescan) and its before/after line."""
    from rich.console import Console

    from weightsmith.errors import UsageError

    adapter = _tuned_adapter(cfg, "align")
    db = adapter / "arena" / "arena.sqlite"
    if not db.is_file():
        raise UsageError(f"the align stage learns from the arena stage's votes, and {db} is missing; "
                         "run `weightsmith demo --stages finetune,arena,align`")  # fmt: skip
    console = Console(file=out, highlight=False, emoji=False, markup=False, width=140)
    train = {"max_steps": cfg.align_steps, "batch_size": 2, "lr": 5e-4, "eval_every": 0, "save_every": 0}
    result, new_fork = _align_on_arena_pairs(cfg, adapter, db, train, out)
    watched = _align_watchdog(cfg, adapter, train, console, out)
    result["watchdog"] = watched["rounds"][0]
    if new_fork is None:
        new_fork = ("watchdog", watched["rounds"][0]["lineage"]["adapter"]["folder"])
    result["ratings"] = _align_rate(cfg, db, new_fork, console, out)
    return result


def _align_on_arena_pairs(
    cfg: DemoConfig, adapter: Any, db: Any, train: dict, out: TextIO
) -> tuple[dict[str, Any], tuple[str, Any] | None]:
    """The arena's decisive votes as pairs and, with two or more, a DPO fork on them."""
    from weightsmith.commands.arena import ArenaExportConfig, run_arena_export
    from weightsmith.config import config_from_dict
    from weightsmith.errors import UsageError
    from weightsmith.train.dpo import DpoConfig, run_dpo

    pairs = db.parent / "pairs.jsonl"
    try:
        exported = run_arena_export(
            config_from_dict(ArenaExportConfig, {"db": str(db), "out": str(pairs), "voters": "all"})
        )
        out.write(
            f"\n== align: the arena's decisive votes → {exported['rows']} preference pairs in {pairs}\n"
        )
    except UsageError as e:  # no battle with a winner: nothing to export
        exported = {"rows": 0, "why": str(e)}
        out.write(f"\n== align: the arena's votes give no preference pairs ({e})\n")
    result: dict[str, Any] = {"arena_pairs": exported}
    if exported["rows"] < 2:
        out.write(
            "too few: the reward judge found almost every answer pair equally good; vote on the page (the "
            "arena stage printed how to open it) and rerun to learn from people. The arena rates the "
            "watchdog's fork instead.\n"
        )
        return result, None
    aligned = adapter / "aligned"
    dpo = config_from_dict(
        DpoConfig,
        {"model": cfg.model, "data": str(pairs), "out": str(aligned), "valid_fraction": 0.0,
         "max_seq_len": 384, "overwrite": True, "device": cfg.device, "dtype": cfg.dtype, "train": train},
    )  # fmt: skip
    trained = run_dpo(dpo)
    out.write(
        f"DPO on them: {trained['steps']} steps, final loss {trained['metrics']['loss']:.3f}; fork in {aligned}\n"
    )
    result["dpo"] = trained
    return result, ("aligned", aligned)


def _align_watchdog(cfg: DemoConfig, adapter: Any, train: dict, console: Any, out: TextIO) -> dict[str, Any]:
    """One short watchdog round and its held-out before/after line."""
    from weightsmith.cli.watchdog import StageLines, print_watchdog
    from weightsmith.commands.watchdog import WatchdogConfig, run_watchdog
    from weightsmith.config import config_from_dict

    wd_out = adapter / "watchdog"
    out.write(
        f"\n== align: one watchdog round ({cfg.align_limit} probes per pack per side), writing {wd_out}\n"
    )
    out.flush()
    wd = config_from_dict(
        WatchdogConfig,
        {"model": cfg.model, "out": str(wd_out), "limit": cfg.align_limit, "transforms": ["none", "base64"],
         "max_tokens": min(48, cfg.max_tokens), "eval_tasks": ["builtin:arith-mc"], "eval_limit": cfg.eval_limit,
         "overwrite": True, "device": cfg.device, "dtype": cfg.dtype, "train": {**train, "batch_size": 4}},
    )  # fmt: skip
    watched = run_watchdog(wd, StageLines())
    print_watchdog(watched, console)
    held = watched["rounds"][0]["heldout"]
    asr, refusal = held["asr"], held["over_refusal"]
    out.write(
        f"held-out attack success {_share(asr['before'])} -> {_share(asr['after'])}, over-refusal "
        f"{_share(refusal['before'])} -> {_share(refusal['after'])} (report: {watched['written']['report']})\n"
    )
    return watched


def _align_rate(cfg: DemoConfig, db: Any, new_fork: tuple[str, Any], console: Any, out: TextIO) -> dict:
    """The new fork judged against the base model in the same arena; everyone's ratings."""
    from weightsmith.cli.arena import print_judge, print_ratings
    from weightsmith.commands.arena import ArenaRatingsConfig, run_arena_ratings
    from weightsmith.config import config_from_dict

    name, folder = new_fork
    fork = f"{cfg.model}:{name}"
    out.write(f"\n== align: {fork} joins the arena against {cfg.model}, {cfg.arena_battles} battles\n")
    out.flush()
    judged = _reward_battles(cfg, db, db.parent / "prompts.jsonl", [cfg.model, fork], [f"{name}={folder}"])
    print_judge(judged, console)
    ratings = run_arena_ratings(config_from_dict(ArenaRatingsConfig, {"db": str(db), "out": str(db.parent)}))
    print_ratings(ratings, console)
    return ratings


def _share(r: dict) -> str:
    if r.get("rate") is None:
        return "-"
    return f"{100 * r['rate']:.0f}% [{100 * r['ci_low']:.0f}, {100 * r['ci_high']:.0f}]"
