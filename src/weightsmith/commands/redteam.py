"""The redteam command: attack a model, its forks and its guard with probe packs; report
attack success and over-refusal side by side, with intervals.

The target is a model (catalog or store name, HF directory, .gguf) run in this process,
or the base URL of an OpenAI-compatible server (`http://host:port/v1`) with the served
model names in `--model`. Each model (then each `--adapter` fork, or each further
`--model` on an endpoint) runs bare and, with `--guard`, behind the policy. Probe packs,
transforms and the policy are all read and checked before any model loads.

`--split train|heldout` keeps one side of a stable hash split of the probes
(`weightsmith.safety.split`); `--pairs FILE` turns the first configuration's replies (or
`--pairs-from NAME`'s) into DPO preference pairs (`weightsmith.safety.redteam_pairs`).

Not here: probes, transforms, detectors and the attack loop (`weightsmith.safety`), the
report (`weightsmith.report`), progress lines and tables (`weightsmith.cli.redteam`).
"""

from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from weightsmith import __version__
from weightsmith.commands.loading import LoadStatus, SteerOptions, load_model, load_status, model_label
from weightsmith.config import opt
from weightsmith.endpoints import endpoint_urls
from weightsmith.errors import UsageError
from weightsmith.eval.judge import is_endpoint
from weightsmith.preference_pairs import check_pairs_path
from weightsmith.safety.policy_file import ClassifierAccess
from weightsmith.safety.redteam import OutputOptions, RateOptions
from weightsmith.safety.redteam_pairs import PairOptions
from weightsmith.safety.split import SplitOptions

DEFAULT_TRANSFORMS = ["none", "base64", "rot13", "leetspeak", "suffix:sure"]


@dataclass(kw_only=True)
class RedteamConfig:
    """Run red-team probe packs against a model (or an endpoint), bare and behind a guard policy."""

    target: str = opt(help="model (name, HF directory, .gguf), or endpoint URLs like http://host:8000/v1 "
                      "(replicas: comma-separated)", positional=True)  # fmt: skip
    model: list[str] = opt(default_factory=list, help="with an endpoint: the served model names to attack")
    adapter: list[str] = opt(default_factory=list, help="LoRA adapter directory of a fork to attack too")
    steering: SteerOptions = opt(default_factory=SteerOptions, flatten=True)  # --steer
    guard: str | None = opt(None, "guardrail policy file (or builtin:school): also run each model behind it")
    classifier: ClassifierAccess = opt(default_factory=ClassifierAccess, flatten=True)
    packs: list[str] = opt(
        default_factory=lambda: ["builtin:all"], help="probe packs: files, folders, builtin:NAME"
    )
    transforms: list[str] = opt(
        default_factory=lambda: list(DEFAULT_TRANSFORMS),
        help="transforms applied to every attack probe: none, base64, rot13, leetspeak, suffix:NAME, "
        "template:NAME, chained with +",
    )
    transforms_file: str | None = opt(None, "YAML file of your own suffixes and templates")
    probe_split: SplitOptions = opt(default_factory=SplitOptions, flatten=True)  # --split, --heldout-fraction
    limit: int | None = opt(
        None, "probes per pack (evenly spaced through it), after --split, before transforms"
    )
    max_tokens: int = opt(96, "most tokens per reply")
    batch_size: int = opt(16, "conversations generated together")
    concurrency: int = opt(8, "requests in flight to each endpoint")
    judge: str | None = opt(
        None, "judge model or endpoint URL: attacks succeed only when it finds a violation"
    )
    judge_model: str = opt("default", "the judge endpoint's model name")
    refusal_detector: Literal["patterns", "judge"] = opt(
        "patterns", "how refusals are recognised: refusal patterns, or the --judge model"
    )
    api_key_env: str = opt("WEIGHTSMITH_API_KEY", "environment variable holding the endpoint's API key")
    rates: RateOptions = opt(default_factory=RateOptions, flatten=True)  # --over-refusal-budget, --interval
    calibrate: bool = opt(True, "measure the detectors on their labelled sets and report it")
    device: str = opt("auto", "cpu, cuda, cuda:N, mps or auto")
    dtype: str = opt("auto", "fp32, bf16, fp16 or auto")
    allow_pickle: bool = opt(False, "allow pickle weights (.bin/.pt), loaded with weights_only=True")
    output: OutputOptions = opt(default_factory=OutputOptions, flatten=True)  # --out, --resume
    preference_pairs: PairOptions = opt(default_factory=PairOptions, flatten=True)  # --pairs, --pairs-from...
    json: bool = opt(False, "print the summary as JSON")

    def __post_init__(self) -> None:
        _check(self)


class _LazyModel:
    """A `ModelTarget` whose model loads on first use and can be released after."""

    def __init__(
        self, cfg: RedteamConfig, adapter: str | None, status: LoadStatus | None = None, steer: list[str] = ()
    ) -> None:
        self.cfg, self.adapter, self.status, self.steer = cfg, adapter, status, list(steer)
        self.label = model_label(cfg.target, adapter) + ("+steered" if steer else "")
        self.identity = {"model": cfg.target, "adapter": adapter, "dtype": cfg.dtype, "kind": "in-process"}
        if steer:  # a steered run never resumes from an unsteered one's answers
            self.identity["steer"] = list(steer)
        self._target: Any = None

    def generate(self, conversations: list[list[dict]]) -> list[tuple[str, str]]:
        if self._target is None:
            from weightsmith.safety.redteam import ModelTarget

            llm = load_model(
                self.cfg.target, **_load_kwargs(self.cfg, self.status), adapter=self.adapter,
                steer=self.steer,
            )  # fmt: skip
            self._target = ModelTarget(
                llm, self.label, max_tokens=self.cfg.max_tokens, batch_size=self.cfg.batch_size
            )
        return self._target.generate(conversations)

    def release(self) -> None:
        self._target = None


def _load_kwargs(cfg: RedteamConfig, status: LoadStatus | None) -> dict[str, Any]:
    return {"device": cfg.device, "dtype": cfg.dtype, "allow_pickle": cfg.allow_pickle, "progress": status}


def _check(cfg: RedteamConfig) -> None:
    """Range and consistency checks, run when the config is built (nothing is read)."""
    endpoint = is_endpoint(cfg.target)
    if endpoint:
        endpoint_urls(cfg.target, "TARGET")  # every replica's URL is checked before any work
    if endpoint and not cfg.model:
        raise UsageError(f"{cfg.target} is an endpoint: name the served model(s) to attack with --model NAME")
    if endpoint and cfg.adapter:
        raise UsageError(
            "--adapter is for in-process models; with an endpoint, name served adapters in --model"
        )
    if endpoint and cfg.steering.steer:
        raise UsageError(
            "--steer is for in-process models; an endpoint steers per request (the `steer` field)"
        )
    if not endpoint and cfg.model:
        raise UsageError("--model names served models of an endpoint; for a local model pass it as TARGET")
    for name, value, low in (("max-tokens", cfg.max_tokens, 1), ("batch-size", cfg.batch_size, 1),
                             ("concurrency", cfg.concurrency, 1)):  # fmt: skip
        if value < low:
            raise UsageError(f"--{name} must be at least {low}, got {value}")
    if cfg.limit is not None and cfg.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {cfg.limit}")
    if cfg.refusal_detector == "judge" and cfg.judge is None:
        raise UsageError("--refusal-detector judge needs a judge model: give --judge MODEL or URL")


def limit_probes(probes: list[Any], limit: int | None) -> list[Any]:
    """At most `limit` probes per pack, evenly spaced through it (so a small sample of the
    harmful pack still spans its categories); deterministic."""
    if limit is None:
        return probes
    packs: dict[str, list[Any]] = {}
    for p in probes:
        packs.setdefault(p.pack, []).append(p)
    keep = set()
    for members in packs.values():
        step = max(1.0, len(members) / limit)
        keep.update(id(members[int(i * step)]) for i in range(min(limit, len(members))))
    return [p for p in probes if id(p) in keep]


def _targets(cfg: RedteamConfig, status: LoadStatus | None) -> list[Any]:
    from weightsmith.safety.redteam import EndpointTarget

    if is_endpoint(cfg.target):
        key = os.environ.get(cfg.api_key_env) or None
        return [
            EndpointTarget(cfg.target, m, api_key=key, max_tokens=cfg.max_tokens, concurrency=cfg.concurrency)
            for m in cfg.model
        ]
    # With --steer the base model runs twice, plain then steered: the report's change is the steering's.
    steered = [_LazyModel(cfg, None, status, cfg.steering.steer)] if cfg.steering.steer else []
    base, *forks = [_LazyModel(cfg, a, status) for a in [None, *cfg.adapter]]
    return [base, *steered, *forks]


def _judge(cfg: RedteamConfig, status: LoadStatus | None) -> Any:
    if cfg.judge is None:
        return None
    from weightsmith.eval.judge import EndpointJudge, LocalJudge

    if is_endpoint(cfg.judge):
        key = os.environ.get(cfg.api_key_env) or None
        return EndpointJudge(cfg.judge, cfg.judge_model, key, max_tokens=64)
    return LocalJudge(load_model(cfg.judge, **_load_kwargs(cfg, status)), max_tokens=64)


def select_probes(cfg: RedteamConfig) -> tuple[list[Any], list[Any]]:
    """(the packs' probes, the probes this run sends): `--split`, then `--limit`, then every
    attack probe under every transform. Reads and checks the packs and transforms files."""
    from weightsmith.safety.probes import load_packs
    from weightsmith.safety.split import select_split
    from weightsmith.safety.transforms import apply_transforms, parse_transforms

    loaded = load_packs(cfg.packs)
    probes = limit_probes(
        select_split(loaded, cfg.probe_split.split, cfg.probe_split.heldout_fraction), cfg.limit
    )
    transforms = parse_transforms(cfg.transforms, cfg.transforms_file)
    if not probes:
        raise UsageError(
            f"--split {cfg.probe_split.split} leaves no probes of {', '.join(cfg.packs)}; "
            "use more probes, another --heldout-fraction or --split all"
        )
    return loaded, apply_transforms(probes, transforms)


def run_redteam(cfg: RedteamConfig, progress: Any = None) -> dict[str, Any]:
    """Attack every configuration; `progress(label, done, total)` is told as probes finish (and
    its `loading(model)`, if it has one, wraps each model load)."""
    from weightsmith.safety.guarded import load_guard
    from weightsmith.safety.redteam import RunOptions, calibration, configurations, default_detectors
    from weightsmith.safety.redteam import run_redteam as attack

    status = load_status(progress)  # wraps each model load
    # Everything a user wrote is checked before any model loads.
    for a in cfg.adapter:
        if not Path(a).is_dir():
            raise UsageError(f"--adapter: adapter folder not found: {a}")
    if cfg.preference_pairs.pairs is not None:
        check_pairs_path(cfg.preference_pairs.pairs)
    loaded, probes = select_probes(cfg)
    guard = load_guard(
        cfg.guard,
        load_model=lambda ref: load_model(ref, **_load_kwargs(cfg, status)),
        grants=cfg.classifier.grants(),
    )
    detectors = default_detectors(_judge(cfg, status), refusal=cfg.refusal_detector)
    configs = configurations(_targets(cfg, status), guard)
    opts = RunOptions(
        rates=cfg.rates,
        output=cfg.output,
        # In-process, each call sorts 4 batches' worth by prompt length (1.3x faster on the
        # default model than calls of one batch); an endpoint gets enough to keep it busy.
        batch_size=4 * cfg.batch_size
        if not is_endpoint(cfg.target)
        else max(cfg.batch_size, cfg.concurrency * len(endpoint_urls(cfg.target))),
        key_extra={"max_tokens": cfg.max_tokens},
        run_info=_run_info(cfg),
    )
    if cfg.preference_pairs.pairs is not None:
        opts.pairs = _pairs_writer(cfg, configs, loaded, detectors.names())
    if cfg.calibrate:
        opts.run_info["calibration"] = calibration(detectors)
    released = _Releaser(configs)
    started = time.time()
    result = attack(configs, probes, detectors, opts, progress=released.wrap(progress))
    if cfg.output.out:
        result["written"] = {name: str(Path(cfg.output.out) / name) for name in
                             ("transcripts.jsonl", "summary.json", "report.html")}  # fmt: skip
    _record_lineage(cfg, result, started)
    return result


def _record_lineage(cfg: RedteamConfig, result: dict[str, Any], started: float) -> None:
    """The lineage of OUT and of the --pairs file (whose input is the scan in OUT, when there is one)."""
    from weightsmith.lineage import write_lineage

    device = "endpoint" if is_endpoint(cfg.target) else cfg.device
    metrics = {row["config"]: {k: row[k] for k in ("asr", "over_refusal")} for row in result["configs"]}
    inputs = {"model": cfg.target, "adapter": cfg.adapter, "guard": cfg.guard, "packs": cfg.packs,
              "transforms_file": cfg.transforms_file, "judge": cfg.judge}  # fmt: skip
    if cfg.output.out:
        write_lineage(cfg.output.out, kind="redteam", config=cfg, inputs=inputs, metrics=metrics,
                      started=started, device=device)  # fmt: skip
    pairs = cfg.preference_pairs.pairs
    if pairs is not None and Path(pairs).is_file():
        from weightsmith.preference_pairs import meta_path

        write_lineage(pairs, kind="redteam-pairs", config=cfg, started=started, device=device,
                      inputs={"scan": cfg.output.out} if cfg.output.out else inputs,
                      extra_outputs=[meta_path(Path(pairs))], metrics=result.get("pairs", {}).get("counts"))  # fmt: skip


def _run_info(cfg: RedteamConfig) -> dict[str, Any]:
    """What summary.json echoes about the run's settings."""
    return {
        "weightsmith": __version__,
        "target": cfg.target,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "max_tokens": cfg.max_tokens,
        "temperature": 0,
        "limit": cfg.limit,
        "split": cfg.probe_split.record(),
        **({"steer": list(cfg.steering.steer)} if cfg.steering.steer else {}),
    }


def _pairs_writer(cfg: RedteamConfig, configs: list[Any], loaded: list[Any], detectors: dict) -> Any:
    """The `RunOptions.pairs` hook: checks --pairs-from now, writes the pairs when the run ends."""
    from weightsmith.safety.probes import pack_digests
    from weightsmith.safety.redteam_pairs import pairs_for_run, source_config

    source_config(configs, cfg.preference_pairs.pairs_from)  # a wrong name fails before any model loads
    guard = next((c.guard for c in configs if c.guard is not None), None)
    provenance = {
        "target": cfg.target,
        "adapters": list(cfg.adapter),
        "packs": pack_digests(cfg.packs, loaded),
        "transforms": list(cfg.transforms),
        "split": cfg.probe_split.record(),
        "limit": cfg.limit,
        "policy": None
        if guard is None
        else {"name": guard.name, "version": guard.version, "digest": guard.digest},
        "detectors": detectors,
        "max_tokens": cfg.max_tokens,
        "temperature": 0,
        "weightsmith": __version__,
    }

    def write(configs: list[Any], per_config: dict[str, list[dict]]) -> dict[str, Any]:
        return pairs_for_run(
            cfg.preference_pairs, configs, per_config, provenance, cfg.probe_split.heldout_fraction
        )

    return write


class _Releaser:
    """Frees an in-process model once the run has moved on to the next target."""

    def __init__(self, configs: list[Any]) -> None:
        self.order = [c.target for c in configs]
        self.labels = {c.label: c.target for c in configs}
        self.current: Any = None

    def wrap(self, progress: Any) -> Any:
        def tick(label: str, done: int, total: int) -> None:
            target = self.labels[label]
            if self.current is not None and target is not self.current:
                getattr(self.current, "release", lambda: None)()
            self.current = target
            if progress is not None:
                progress(label, done, total)

        return tick
