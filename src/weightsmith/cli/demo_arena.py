"""`weightsmith demo`'s arena and align stages: forks compared in the arena by a reward
judge, and the decisive votes (and a watchdog round) turned into a new fork that joins it.

arena: the base model, the tuned fork and the base behind the school policy answer the
held-out Kettlebird conversations in pairs; `arena judge --reward contains` scores each answer
for the house tag, the held-out answer's topic head and its KB reference, the base model then
judges the same battles as an LLM judge (by the likelihood of its verdicts, both orders), and
the ratings of the reward judge's votes are printed with the two judges' agreement and the
command that opens the page. align: the reward judge's decisive votes → DPO → the new fork
rated in the same arena; one watchdog round in between.

Not here: the other stages and the stage table (demo.py), the work itself (the commands).
"""

from __future__ import annotations

from typing import Any, TextIO

from weightsmith.datasets import sample_path

#: The voter kind of the demo's reward judge (`--reward contains`): its votes are rated and learnt from.
VOTER = "judge:reward-contains"


def tuned_adapter(cfg: Any, stage: str):
    from pathlib import Path

    from weightsmith.errors import UsageError

    adapter = Path(cfg.out)
    if not (adapter / "adapter_config.json").is_file():
        raise UsageError(
            f"the {stage} stage uses the adapter the finetune stage writes, and {adapter} has none; "
            f"run `weightsmith demo --stages finetune,{stage}`"
        )
    return adapter


def demo_arena(cfg: Any, out: TextIO) -> dict[str, Any]:
    """Base, tuned fork and the base behind builtin:school on held-out questions, judged by a
    reward judge against the held-out answers and then by the base model as an LLM judge; the
    reward judge's ratings with the two judges' agreement, and how to open the page."""
    from pathlib import Path

    from rich.console import Console

    from weightsmith.cli.arena import print_judge, print_ratings
    from weightsmith.commands.arena import ArenaRatingsConfig, run_arena_ratings
    from weightsmith.commands.arena_judge import ArenaJudgeConfig, run_arena_judge
    from weightsmith.commands.arena_serve import ArenaServeConfig
    from weightsmith.config import config_from_dict

    adapter = tuned_adapter(cfg, "arena")
    folder = adapter / "arena"
    folder.mkdir(parents=True, exist_ok=True)
    db, prompts = folder / "arena.sqlite", folder / "prompts.jsonl"
    for old in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        old.unlink(missing_ok=True)  # the demo's own DB: each run starts a fresh arena
    prompts.write_text(arena_prompts(), encoding="utf-8")
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
    out.write(
        f"\n{cfg.model} judges the same battles as an LLM judge, in both orders (by its verdicts' likelihood)\n"
    )
    out.flush()
    llm = run_arena_judge(
        config_from_dict(
            ArenaJudgeConfig,
            {
                "db": str(db),
                "judge": cfg.model,
                "verdict": "likelihood",
                "device": cfg.device,
                "dtype": cfg.dtype,
            },
        )  # fmt: skip
    )
    print_judge(llm, console)
    rated = {"db": str(db), "out": str(folder), "voters": VOTER, "agree": [VOTER, llm["voter"]]}
    ratings = run_arena_ratings(config_from_dict(ArenaRatingsConfig, rated))
    print_ratings(ratings, console)
    port = ArenaServeConfig().port
    out.write(
        f"(the ratings count the reward judge's votes; the agreement line says how far the LLM judge can stand in "
        f"for it)\npeople can vote too: weightsmith arena serve {' '.join(contestants)} --adapter "
        f"kettlebird={adapter} --prompts {prompts} --db {db}\n  then open http://127.0.0.1:{port}/ (their votes "
        f"join the judges'; `weightsmith arena ratings --db {db} --voters human` rates theirs alone)\n"
    )
    return {"judge": judged, "llm_judge": llm, "ratings": ratings, "db": str(db)}


def arena_prompts() -> str:
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


def _reward_battles(cfg: Any, db: Any, prompts: Any, contestants: list[str], forks: list[str]) -> dict:
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


def demo_align(cfg: Any, out: TextIO) -> dict[str, Any]:
    """Preferences back into the weights: the arena's judged pairs → DPO → the new fork's rating
    in the same arena; then one watchdog round (red-team train probes → pairs → DPO → held-out
    rescan) and its before/after line."""
    from rich.console import Console

    from weightsmith.errors import UsageError

    adapter = tuned_adapter(cfg, "align")
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
    cfg: Any, adapter: Any, db: Any, train: dict, out: TextIO
) -> tuple[dict[str, Any], tuple[str, Any] | None]:
    """The arena's decisive votes as pairs and, with two or more, a DPO fork on them."""
    from weightsmith.commands.arena import ArenaExportConfig, run_arena_export
    from weightsmith.config import config_from_dict
    from weightsmith.errors import UsageError
    from weightsmith.train.dpo import DpoConfig, run_dpo

    pairs = db.parent / "pairs.jsonl"
    try:
        exported = run_arena_export(
            config_from_dict(ArenaExportConfig, {"db": str(db), "out": str(pairs), "voters": VOTER})
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
        {"model": cfg.model, "data": str(pairs), "out": str(aligned), "valid_fraction": 0.0, "sft_weight": 1.0,
         "max_seq_len": 384, "overwrite": True, "device": cfg.device, "dtype": cfg.dtype,
         "train": {**train, "lr": 2e-3}},
    )  # fmt: skip
    trained = run_dpo(dpo)
    out.write(
        f"DPO on them from {cfg.model}, with the chosen answers' NLL (RPO: --sft-weight 1), lr 2e-3: {trained['steps']} "
        f"steps, final loss {trained['metrics']['loss']:.3f}; fork in {aligned}\n"
    )
    result["dpo"] = trained
    return result, ("aligned", aligned)


def _align_watchdog(cfg: Any, adapter: Any, train: dict, console: Any, out: TextIO) -> dict[str, Any]:
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


def _align_rate(cfg: Any, db: Any, new_fork: tuple[str, Any], console: Any, out: TextIO) -> dict:
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
    rated = {"db": str(db), "out": str(db.parent), "voters": VOTER}
    ratings = run_arena_ratings(config_from_dict(ArenaRatingsConfig, rated))
    print_ratings(ratings, console)
    return ratings


def _share(r: dict) -> str:
    if r.get("rate") is None:
        return "-"
    return f"{100 * r['rate']:.0f}% [{100 * r['ci_low']:.0f}, {100 * r['ci_high']:.0f}]"


__all__ = ["VOTER", "arena_prompts", "demo_align", "demo_arena", "tuned_adapter"]
