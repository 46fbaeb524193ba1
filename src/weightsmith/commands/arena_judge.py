"""`arena judge`: fill an arena DB's battles with a judge's votes: an LLM judge asked in both
orders (`--judge`), or rewards that score each answer alone (`--reward`, reward_judge.py).

Everything a user can get wrong (a bad `--prompts` line, an unknown adapter, a bad guard
policy, an unreachable endpoint contestant or judge, a reference field a reward cannot use)
is found before anything is written: an endpoint judge is asked for its models first, then
the prompts are read, the rewards parsed and the prompts' fields checked, the contestants
(and their policies) and judge are loaded and their endpoints checked, and only then is the
DB created or a row added.

Not here: the judging loop (weightsmith.arena.judge), the other arena commands
(commands/arena.py), printing (weightsmith.cli.arena).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from weightsmith.arena.contestants import Contestants, parse_contestant, split_endpoint, split_guard
from weightsmith.arena.endpoint import check_endpoint
from weightsmith.arena.judge import Decide, Fight, judge_battles, llm_decider
from weightsmith.arena.prompt_file import read_prompts
from weightsmith.arena.records import Prompt, judge_voter
from weightsmith.arena.reward_judge import RewardJudge
from weightsmith.arena.store import ArenaStore
from weightsmith.commands.arena import DB_HELP
from weightsmith.commands.loading import load_model, model_label
from weightsmith.commands.serve import parse_adapters
from weightsmith.config import opt
from weightsmith.endpoints import is_endpoint
from weightsmith.errors import ConfigError, UsageError
from weightsmith.eval.judge import EndpointJudge, make_judge
from weightsmith.eval.judge_pairwise import LIKELIHOOD_RUBRIC, LikelihoodVerdicts, pairwise_config
from weightsmith.grants import Grants
from weightsmith.safety.policy_file import ClassifierAccess
from weightsmith.sampling import SamplingParams
from weightsmith.train.rewards import BUILTIN, RewardContext, parse_rewards

#: Longest prompt (characters) `arena judge` takes from a --prompts file.
JUDGE_PROMPT_CHARS = 20_000


@dataclass(kw_only=True)
class ArenaJudgeConfig:
    """Fill the arena with judge votes: an LLM judge asked in both orders, or rewards scoring each answer."""

    db: str = opt(help=DB_HELP + "; created if missing")
    judge: str | None = opt(
        None, "an LLM judge: a model name, HF directory or .gguf, or an endpoint URL#MODEL (or give --reward)"
    )
    reward: list[str] = opt(
        default_factory=list,
        help=f"judge by rewards instead, summed, each answer scored alone: {', '.join(k for k in BUILTIN if k != 'length')} "
        "(reading the prompt line's fields), PATH.py:FUNCTION[:WEIGHT], or a reward model, model:DIR[:WEIGHT]",
        split=False,
    )  # fmt: skip
    margin: float = opt(0.0, "with --reward: totals closer than this are a tie")
    judge_name: str | None = opt(
        None, "the judge's name in votes (judge:NAME); unset: the model's, or reward-NAMES"
    )
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
    prompts: str | None = opt(
        None, "JSONL prompts for new battles ({prompt} or {messages} per line); with --reward, their reference "
        "fields are stored with the DB's prompts of the same messages",
    )  # fmt: skip
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
        if (self.judge is None) == (not self.reward):
            raise UsageError(
                "give the judge: --judge MODEL (an LLM judge) or --reward SPEC (rewards), not both"
            )
        if self.reward and self.verdict != "reply":
            raise UsageError("--verdict is an LLM judge's; --reward scores the answers themselves")
        if self.battles is not None and self.battles < 1:
            raise UsageError(f"--battles must be at least 1, got {self.battles}")
        if self.contestants and len(self.contestants) < 2:
            raise UsageError("--contestants: new battles need at least two contestants")
        if (self.contestants or (self.prompts and not self.reward)) and self.battles is None:
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
    rewards = _reward_judge(cfg, prompts)
    voter = judge_voter(cfg.judge_name or (rewards.name if rewards else judge_identity(cfg.judge or "")[2]))
    db = Path(cfg.db).expanduser()
    store = ArenaStore(db, create=False) if db.exists() else None  # a newer schema stops here
    try:
        if (
            rewards and store is not None
        ):  # stored reference fields (not replaced by --prompts) are checked now
            given = {_key(p.messages) for p in prompts if p.fields}
            stored = [b for b in store.unvoted_battles(voter) if b.prompt and _key(b.prompt) not in given]
            rewards.check([b for b in stored if rewards.usable(b)])
        if cfg.judge and is_endpoint(cfg.judge):  # a judge that does not answer stops the run now
            model, endpoint_model, _ = judge_identity(cfg.judge)
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
        pool = _fight_prompts(rewards, prompts, store) if contestants is not None else []
        decide = _load_rewards(rewards, cfg, contestants) if rewards else _llm_decider(cfg)
        store = store or ArenaStore(db)
        fight = None
        if prompts and (
            contestants is not None or rewards
        ):  # a reward judge's file gives stored prompts fields
            ids = store.add_prompts(prompts)
            pool = [replace(p, id=i) for p, i in zip(prompts, ids, strict=True)]
        if contestants is not None:
            store.add_contestants(contestants.contestants)
            params = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
            fight = Fight(contestants, pool, params, random.Random(cfg.seed))
        tick = progress("judge") if progress else None
        tally = judge_battles(
            store, decide, voter=voter, limit=cfg.battles, fight=fight, progress=tick,
            usable=rewards.usable if rewards else None,
        )  # fmt: skip
        return {"db": str(db), "judge": cfg.judge or ",".join(cfg.reward), **tally.to_dict()}
    finally:
        if store is not None:
            store.close()


def _key(messages: list[dict]) -> str:
    return json.dumps(messages, sort_keys=True)


def _reward_judge(cfg: ArenaJudgeConfig, prompts: list[Prompt]) -> RewardJudge | None:
    """`--reward`'s judge (None for an LLM judge), with every `--prompts` line's fields checked:
    a file given to a reward judge must carry what its rewards read on each line."""
    if not cfg.reward:
        return None
    judge = RewardJudge(
        parse_rewards(cfg.reward, RewardContext(max_completion_len=cfg.max_tokens)), cfg.margin
    )
    if prompts:
        judge.check(prompts)
    return judge


def _fight_prompts(
    rewards: RewardJudge | None, prompts: list[Prompt], store: ArenaStore | None
) -> list[Prompt]:
    """What new battles are fought over: `--prompts`, else the stored prompts (for a reward
    judge, those with a field its rewards read, checked); ConfigError when none is left."""
    if prompts:
        return prompts
    pool = store.prompts() if store is not None else []
    if rewards is not None:
        pool = [p for p in pool if rewards.usable(p)]
        rewards.check(pool)
        if not pool:
            raise ConfigError(
                "no stored prompt carries a field the rewards read; pass --prompts FILE whose lines give them"
            )
    return pool


def _load_rewards(judge: RewardJudge, cfg: ArenaJudgeConfig, contestants: Contestants | None) -> RewardJudge:
    """Load the judge's reward models (`model:DIR`) on `--device`; a reward adapter's base may
    be the path of a local contestant (the command line names it), and one over a contestant's
    checkpoint runs on that contestant's loaded weights (another adapter beside its forks')."""
    from weightsmith.checkpoint.pull import looks_like_path, resolve
    from weightsmith.device import pick_device
    from weightsmith.train.reward_model import ModelReward, SharedBase

    local = [split_guard(spec)[0] for spec in cfg.contestants if not is_endpoint(split_guard(spec)[0])]
    named = [Path(m).expanduser() for s in local for m in [s.rpartition(":")[0] or s] if looks_like_path(m)]
    loaded = [
        SharedBase(resolve(base, auto_pull=False), llm.model, llm.tokenizer, f"the contestant {base}")
        for base, llm in (contestants.local_models() if contestants is not None else [])
    ]
    for reward in judge.rewards:
        if isinstance(reward.fn, ModelReward):
            reward.fn.load(pick_device(cfg.device), named, loaded)
    return judge


def _llm_decider(cfg: ArenaJudgeConfig) -> Decide:
    model, endpoint_model, _ = judge_identity(cfg.judge or "")
    return llm_decider(*_judge(cfg, model, endpoint_model))


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


__all__ = ["ArenaJudgeConfig", "judge_identity", "run_arena_judge"]
