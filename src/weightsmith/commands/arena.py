"""The arena commands that read and write votes: `arena ratings|export|import` (the page,
`arena serve`, is commands/arena_serve.py; the LLM judge, `arena judge`, commands/arena_judge.py).
One config per subcommand and a `run_arena_*(cfg, progress=None)` that returns data and prints
nothing. None of them loads a model, so none imports torch.

A missing DB or one of a newer schema is an error before anything is read or written:
readers open the DB with `create=False`, and `arena import` checks the whole battle log
before it adds a row.

Not here: the store, ratings, files and the judging loop (weightsmith.arena), printing
(weightsmith.cli.arena).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightsmith.arena.battles import ExportFilters, export_preferences, read_battle_log
from weightsmith.arena.leaderboard import agree_kinds, rate_votes, voter_kinds
from weightsmith.arena.report import write_ratings_outputs
from weightsmith.arena.store import ArenaStore
from weightsmith.config import opt
from weightsmith.errors import UsageError

DB_HELP = "the arena's SQLite file (votes from `arena serve`, `arena judge`, `arena import`)"


# ---- arena ratings --------------------------------------------------------------------------


@dataclass(kw_only=True)
class ArenaRatingsConfig:
    """Bradley–Terry ratings with bootstrap intervals from the arena's votes."""

    db: str = opt(help=DB_HELP)
    out: str | None = opt(None, "folder for ratings.json and report.html")
    voters: str = opt("all", "whose votes count: human, judge, import, all, or judge:NAME (one judge)")
    agree: list[str] = opt(
        ["human", "judge"], "the two voters whose agreement (Cohen's kappa) to report: human, judge, import or "
        "judge:NAME (say judge:reward-answer,judge:my-llm to check an LLM judge against a reward judge)",
    )  # fmt: skip
    anchor: str | None = opt(None, "contestant rated exactly 1000 (unset: the mean is 1000)")
    rounds: int = opt(200, "bootstrap resamples for the 95 percent intervals")
    seed: int = opt(0, "bootstrap seed")
    json: bool = opt(False, "print the ratings as JSON")

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise UsageError(f"--rounds must be at least 1, got {self.rounds}")
        voter_kinds(self.voters)
        if len(self.agree) != 2:
            raise UsageError(f"--agree takes two voters, as in human,judge; got {len(self.agree)}")
        agree_kinds(*self.agree)


def run_arena_ratings(cfg: ArenaRatingsConfig, progress: Any = None) -> dict[str, Any]:
    """Ratings of the votes `cfg.voters` cast, and human–judge agreement where both voted."""
    with ArenaStore(Path(cfg.db).expanduser(), create=False) as store:
        everything = store.battles_with_votes()
        sha = store.content_hash()
    ratings = rate_votes(everything, kinds=voter_kinds(cfg.voters), voters=cfg.voters, db=str(cfg.db), sha256=sha,
                         anchor=cfg.anchor, rounds=cfg.rounds, seed=cfg.seed, agree=agree_kinds(*cfg.agree))  # fmt: skip
    written = write_ratings_outputs(Path(cfg.out), ratings) if cfg.out else {}
    return {**ratings.to_dict(), "written": written}


# ---- arena export ---------------------------------------------------------------------------


@dataclass(kw_only=True)
class ArenaExportConfig:
    """Preference pairs for DPO (TRL's conversational prompt/chosen/rejected), or labelled answers for
    KTO, from the arena's votes."""

    db: str = opt(help=DB_HELP)
    out: str = opt(help="the pairs file (JSONL); NAME.meta.json beside it records the DB hash and battle ids")
    voters: str = opt("human", "whose votes count: human, judge, import, all, or judge:NAME (one judge)")
    min_votes: int = opt(1, "counted votes a battle needs")
    min_margin: float = opt(0.0, "the winner's share of a battle's counted votes it needs (0 to 1)")
    format: str = opt(
        "pairs",
        "pairs (DPO) or kto: each answer alone, labelled (the winner's good, the loser's bad, both bad when "
        "voted so)",
        choices=("pairs", "kto"),
    )
    json: bool = opt(False, "print the result as JSON")

    def __post_init__(self) -> None:
        ExportFilters(min_votes=self.min_votes, min_margin=self.min_margin)  # the range checks
        voter_kinds(self.voters)


def run_arena_export(cfg: ArenaExportConfig, progress: Any = None) -> dict[str, Any]:
    db, started = Path(cfg.db).expanduser(), time.time()
    with ArenaStore(db, create=False) as store:
        pairs = store.battles_with_votes()
        sha = store.content_hash()
    filters = ExportFilters(
        voters=voter_kinds(cfg.voters) or (), min_votes=cfg.min_votes, min_margin=cfg.min_margin
    )
    battles = [battle for battle, _ in pairs]
    votes = [vote for _, vs in pairs for vote in vs]
    result = export_preferences(cfg.out, battles, votes, source_sha256=sha, source=str(db), filters=filters,
                                unpaired=cfg.format == "kto")  # fmt: skip
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
    "ArenaRatingsConfig",
    "run_arena_export",
    "run_arena_import",
    "run_arena_ratings",
]
