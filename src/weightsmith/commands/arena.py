"""The arena commands: `arena judge|ratings|export|import` (the page, `arena serve`, is
commands/arena_serve.py). One config per subcommand and a `run_arena_*(cfg, progress=None)`
that returns data and prints nothing.

Everything a user can get wrong (a missing DB, a DB of a newer schema, a bad `--prompts`
line, an unknown adapter, a bad guard policy, an unreachable endpoint contestant or judge) is
found before anything is written: readers open the DB with `create=False`, and `arena judge`
asks an endpoint judge for its models first, then reads its prompts, loads its contestants
(and their policies) and judge and checks their endpoints before it creates a DB or adds a
row.

Not here: the store, ratings, files and the judging loop (weightsmith.arena), printing
(weightsmith.cli.arena).
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from weightsmith.arena.battles import ExportFilters, export_preferences, read_battle_log
from weightsmith.arena.contestants import Contestants, parse_contestant, split_endpoint
from weightsmith.arena.endpoint import check_endpoint
from weightsmith.arena.judge import Fight, judge_battles
from weightsmith.arena.leaderboard import VOTERS, rate_votes
from weightsmith.arena.prompt_file import read_prompts
from weightsmith.arena.records import judge_voter
from weightsmith.arena.report import write_ratings_outputs
from weightsmith.arena.store import ArenaStore
from weightsmith.commands.loading import load_model, model_label
from weightsmith.commands.serve import parse_adapters
from weightsmith.config import opt
from weightsmith.endpoints import is_endpoint
from weightsmith.errors import UsageError
from weightsmith.eval.judge import EndpointJudge, make_judge
from weightsmith.eval.judge_pairwise import LIKELIHOOD_RUBRIC, LikelihoodVerdicts, pairwise_config
from weightsmith.grants import Grants
from weightsmith.safety.policy_file import ClassifierAccess
from weightsmith.sampling import SamplingParams

DB_HELP = "the arena's SQLite file (votes from `arena serve`, `arena judge`, `arena import`)"


# ---- arena judge ----------------------------------------------------------------------------


#: Longest prompt (characters) `arena judge` takes from a --prompts file.
JUDGE_PROMPT_CHARS = 20_000


@dataclass(kw_only=True)
class ArenaJudgeConfig:
    """Fill the arena with LLM-judge votes: each pair judged in both orders, a tie when they disagree."""

    db: str = opt(help=DB_HELP + "; created if missing")
    judge: str = opt(help="the judge: a model name, HF directory or .gguf, or an endpoint URL#MODEL")
    judge_name: str | None = opt(None, "the judge's name in votes (judge:NAME); unset: the model's")
    judge_api_key_env: str | None = opt(
        None, "environment variable whose value is the judge endpoint's API key"
    )
    judge_max_tokens: int = opt(128, "most tokens of one judge reply")
    verdict: str = opt(
        "reply",
        "how a local judge gives its verdict: reply (it writes one, parsed) or likelihood "
        "(the likeliest of [[A]]/[[B]]/[[C]]; always votes, for small judges)",
        choices=("reply", "likelihood"),
    )
    battles: int | None = opt(
        None, "battles to judge; beyond the unvoted ones, new battles are fought (needs --contestants)"
    )
    contestants: list[str] = opt(
        default_factory=list,
        help="contestants of new battles: NAME, NAME:ADAPTER or URL#MODEL, each optionally "
        "+ @builtin:NAME or @POLICY.yaml (behind that guard policy)",
    )
    adapter: list[str] = opt(
        default_factory=list, help="a fork's LoRA adapter, NAME=DIR (used as MODEL:NAME)", split=False
    )
    prompts: str | None = opt(None, "JSONL prompts for new battles ({prompt} or {messages} per line)")
    contestant_api_key_env: str | None = opt(
        None, "environment variable whose value is sent as the API key to endpoint contestants"
    )
    classifier: ClassifierAccess = opt(default_factory=ClassifierAccess, flatten=True)
    max_tokens: int = opt(256, "most tokens of a contestant's answer")
    temperature: float = opt(0.7, "contestants' sampling temperature (0: greedy)")
    top_p: float = opt(1.0, "contestants' nucleus sampling (1: off)")
    seed: int = opt(0, "seed for pairs, prompts and the per-answer seeds")
    device: str = opt("auto", "cpu, cuda, cuda:N, mps or auto (local judge and contestants)")
    dtype: str = opt("auto", "fp32, bf16, fp16 or auto")
    json: bool = opt(False, "print the result as JSON")

    def __post_init__(self) -> None:
        self.contestants = [s.strip() for s in self.contestants if s.strip()]
        if self.battles is not None and self.battles < 1:
            raise UsageError(f"--battles must be at least 1, got {self.battles}")
        if self.contestants and len(self.contestants) < 2:
            raise UsageError("--contestants: new battles need at least two contestants")
        if (self.contestants or self.prompts) and self.battles is None:
            raise UsageError("--contestants/--prompts fight new battles: say how many with --battles N")
        if self.judge_max_tokens < 1 or self.max_tokens < 1:
            raise UsageError("--judge-max-tokens and --max-tokens must be at least 1")
        SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p)


def judge_identity(spec: str) -> tuple[str, str, str]:
    """(model or base URL, endpoint model, default name) of a `--judge` spec."""
    if is_endpoint(spec):
        url, model = split_endpoint(spec)
        return url, model, model if model != "default" else urlsplit(url).netloc
    return spec, "default", model_label(spec, None)


def run_arena_judge(cfg: ArenaJudgeConfig, progress: Any = None) -> dict[str, Any]:
    """Judge unvoted battles (and fight new ones); `progress(label)` returns `tick(done, total)`."""
    adapters = parse_adapters(cfg.adapter)
    for spec in cfg.contestants:
        parse_contestant(spec, adapters)  # one-line errors before anything loads
    prompts = read_prompts(cfg.prompts, max_chars=JUDGE_PROMPT_CHARS) if cfg.prompts else []
    model, endpoint_model, default_name = judge_identity(cfg.judge)
    voter = judge_voter(cfg.judge_name or default_name)
    db = Path(cfg.db).expanduser()
    store = ArenaStore(db, create=False) if db.exists() else None  # a newer schema stops here
    try:
        if is_endpoint(cfg.judge):  # a judge that does not answer stops the run now
            key = os.environ.get(cfg.judge_api_key_env) if cfg.judge_api_key_env else None
            check_endpoint(EndpointJudge(model, endpoint_model, key), "judge", "pass another --judge")
        contestants = None
        if cfg.contestants:
            contestants = Contestants(
                cfg.contestants, adapters=adapters, device=cfg.device, dtype=cfg.dtype,
                grants=Grants(api_key_env=cfg.contestant_api_key_env), loader=load_model,
                classifier=cfg.classifier,
            )  # fmt: skip
            contestants.check()
        judge_cfg, backend = _judge(cfg, model, endpoint_model)
        store = store or ArenaStore(db)
        fight = None
        if contestants is not None:
            store.add_contestants(contestants.contestants)
            if prompts:
                ids = store.add_prompts(prompts)
                prompts = [replace(p, id=i) for p, i in zip(prompts, ids, strict=True)]
            params = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
            fight = Fight(contestants, prompts or store.prompts(), params, random.Random(cfg.seed))
        tick = progress("judge") if progress else None
        tally = judge_battles(
            store, judge_cfg, backend, voter=voter, limit=cfg.battles, fight=fight, progress=tick
        )
        return {"db": str(db), "judge": cfg.judge, **tally.to_dict()}
    finally:
        if store is not None:
            store.close()


def _judge(cfg: ArenaJudgeConfig, model: str, endpoint_model: str) -> tuple[Any, Any]:
    """The pairwise judge's config and backend (`--verdict likelihood`: scored, local only)."""
    likely = cfg.verdict == "likelihood"
    judge_cfg = pairwise_config(
        model,
        endpoint_model=endpoint_model,
        api_key_env=cfg.judge_api_key_env,
        max_tokens=cfg.judge_max_tokens,
        **({"rubric": LIKELIHOOD_RUBRIC} if likely else {}),
    )
    if likely and judge_cfg.is_endpoint:
        raise UsageError(
            "--verdict likelihood scores the verdicts with a local judge; an endpoint judge replies"
        )
    if likely:
        return judge_cfg, LikelihoodVerdicts(load_model(model, device=cfg.device, dtype=cfg.dtype))
    grants = Grants(endpoints=(model,) if judge_cfg.is_endpoint else (), api_key_env=cfg.judge_api_key_env)
    backend = make_judge(
        judge_cfg, load_model=lambda ref: load_model(ref, device=cfg.device, dtype=cfg.dtype), grants=grants
    )
    return judge_cfg, backend


# ---- arena ratings --------------------------------------------------------------------------


@dataclass(kw_only=True)
class ArenaRatingsConfig:
    """Bradley–Terry ratings with bootstrap intervals from the arena's votes."""

    db: str = opt(help=DB_HELP)
    out: str | None = opt(None, "folder for ratings.json and report.html")
    voters: str = opt("all", "whose votes count", choices=tuple(VOTERS))
    anchor: str | None = opt(None, "contestant rated exactly 1000 (unset: the mean is 1000)")
    rounds: int = opt(200, "bootstrap resamples for the 95 percent intervals")
    seed: int = opt(0, "bootstrap seed")
    json: bool = opt(False, "print the ratings as JSON")

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise UsageError(f"--rounds must be at least 1, got {self.rounds}")


def run_arena_ratings(cfg: ArenaRatingsConfig, progress: Any = None) -> dict[str, Any]:
    """Ratings of the votes `cfg.voters` cast, and human–judge agreement where both voted."""
    with ArenaStore(Path(cfg.db).expanduser(), create=False) as store:
        everything = store.battles_with_votes()
        sha = store.content_hash()
    ratings = rate_votes(everything, kinds=VOTERS[cfg.voters], voters=cfg.voters, db=str(cfg.db), sha256=sha,
                         anchor=cfg.anchor, rounds=cfg.rounds, seed=cfg.seed)  # fmt: skip
    written = write_ratings_outputs(Path(cfg.out), ratings) if cfg.out else {}
    return {**ratings.to_dict(), "written": written}


# ---- arena export ---------------------------------------------------------------------------


@dataclass(kw_only=True)
class ArenaExportConfig:
    """Preference pairs for DPO (TRL's conversational prompt/chosen/rejected) from the arena's votes."""

    db: str = opt(help=DB_HELP)
    out: str = opt(help="the pairs file (JSONL); NAME.meta.json beside it records the DB hash and battle ids")
    voters: str = opt("human", "whose votes count", choices=tuple(VOTERS))
    min_votes: int = opt(1, "counted votes a battle needs")
    min_margin: float = opt(0.0, "the winner's share of a battle's counted votes it needs (0 to 1)")
    json: bool = opt(False, "print the result as JSON")

    def __post_init__(self) -> None:
        ExportFilters(min_votes=self.min_votes, min_margin=self.min_margin)  # the range checks


def run_arena_export(cfg: ArenaExportConfig, progress: Any = None) -> dict[str, Any]:
    db, started = Path(cfg.db).expanduser(), time.time()
    with ArenaStore(db, create=False) as store:
        pairs = store.battles_with_votes()
        sha = store.content_hash()
    filters = ExportFilters(
        voters=VOTERS[cfg.voters] or (), min_votes=cfg.min_votes, min_margin=cfg.min_margin
    )
    battles = [battle for battle, _ in pairs]
    votes = [vote for _, vs in pairs for vote in vs]
    result = export_preferences(cfg.out, battles, votes, source_sha256=sha, source=str(db), filters=filters)
    from weightsmith.lineage import write_lineage
    from weightsmith.preference_pairs import meta_path

    write_lineage(cfg.out, kind="arena export", config=cfg, inputs={"db": str(db)}, started=started,
                  extra_outputs=[meta_path(Path(cfg.out))], metrics=result.to_dict())  # fmt: skip
    return {**result.to_dict(), "db_sha256": sha}


# ---- arena import ---------------------------------------------------------------------------


@dataclass(kw_only=True)
class ArenaImportConfig:
    """Add battles collected elsewhere (Chatbot Arena's battle format) to an arena DB."""

    db: str = opt(help=DB_HELP)
    battles: str = opt(help="the battle log: JSON lines or a JSON list (model_a, model_b, winner, ...)")
    judges_are_models: bool = opt(
        False, "the log's `judge` field names LLM judges: store votes as judge:NAME"
    )
    json: bool = opt(False, "print the result as JSON")


def run_arena_import(cfg: ArenaImportConfig, progress: Any = None) -> dict[str, Any]:
    db = Path(cfg.db).expanduser()
    with ArenaStore(db, create=False) as store:
        pairs = read_battle_log(cfg.battles, judges_are_models=cfg.judges_are_models)  # all checked first
        counts = store.import_battles(((b, [v]) for b, v in pairs), origin=str(cfg.battles))
    return {"db": str(db), "battles": str(cfg.battles), "lines": len(pairs), **vars(counts)}


__all__ = [
    "ArenaExportConfig",
    "ArenaImportConfig",
    "ArenaJudgeConfig",
    "ArenaRatingsConfig",
    "run_arena_export",
    "run_arena_import",
    "run_arena_judge",
    "run_arena_ratings",
]
