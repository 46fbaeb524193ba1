"""The watchdog command: what the red-team finds flows back into the weights, and the result
is measured in the open on probes the fork never learned from.

A round: (1) scan the current model (the base, then the newest fork) with the probe packs'
*train* side of the stable split, behind `--policy` too when one is given; (2) turn that scan
into preference pairs: refuse what got through, keep answering the benign prompts it
answered (`redteam --pairs`); (3) DPO with LoRA on every round's pairs so far, from the base
model (the reference is the base with the adapters off); (4) rescan the base model and the
new fork on the *held-out* side; (5) compare: attack success and over-refusal before and
after, each with 95% intervals, the paired change with Newcombe's interval and McNemar's
exact test; (6) the `--eval-tasks` suites (default `builtin:core`) on the base and the
fork, as the check that nothing else was forgotten (McNemar on the pooled items).

OUT holds `config.yaml`, `round-N/{scan,pairs.jsonl,train-pairs.jsonl,dpo,heldout,eval}`,
`watchdog.json` (rewritten after each round) and `report.html`. Rerunning the same command
continues OUT: scans reuse their journals, a training run resumes from its last checkpoint
or is kept when finished, and evaluation reuses its cache.

Not here: the stages themselves (`commands.redteam`, `train.dpo`, `commands.eval`), the
paired comparison (`safety.redteam_compare`), the HTML (`report.watchdog_report`), progress
lines and tables (`cli.watchdog`).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from weightsmith import __version__
from weightsmith.commands.loading import model_label
from weightsmith.commands.redteam import DEFAULT_TRANSFORMS
from weightsmith.config import config_from_dict, config_to_dict, dump_config_yaml, load_config_yaml, opt
from weightsmith.errors import UsageError
from weightsmith.files import write_json_atomic
from weightsmith.lineage import file_sha256, write_lineage
from weightsmith.safety.split import DEFAULT_HELDOUT
from weightsmith.train.loop import TrainOptions
from weightsmith.train.runs import LoraOptions


def _dpo_train_defaults() -> TrainOptions:
    # A few hundred pairs: a few epochs at a LoRA learning rate; no mid-run validation.
    return TrainOptions(lr=2e-4, epochs=2, batch_size=4, eval_every=0, save_every=25, warmup_ratio=0.1)


def _dpo_lora_defaults() -> LoraOptions:
    return LoraOptions(rank=16, alpha=32.0, dropout=0.0)


@dataclass(kw_only=True)
class WatchdogConfig:
    """Red-team a model, train a safer fork on what got through (DPO), and measure it on held-out probes."""

    model: str = opt(help="catalog or store name, HF directory, or .gguf file", positional=True)
    out: str = opt(help="folder for every round's scans, pairs, fork, evaluation and the report")
    rounds: int = opt(1, "scan → pairs → DPO → held-out rescan rounds; each round scans the newest fork")
    policy: str | None = opt(
        None,
        "guard policy (file or builtin:NAME) whose refusals the pairs prefer; the train scan runs behind it too",
    )
    packs: list[str] = opt(
        default_factory=lambda: ["builtin:all"], help="probe packs: files, folders, builtin:NAME"
    )
    transforms: list[str] = opt(
        default_factory=lambda: list(DEFAULT_TRANSFORMS), help="transforms applied to every attack probe"
    )
    heldout_fraction: float = opt(DEFAULT_HELDOUT, "share of the probes kept back for the held-out rescan")
    limit: int | None = opt(
        None, "probes per pack on each side of the split (evenly spaced), before transforms"
    )
    max_tokens: int = opt(64, "most tokens per red-team reply")
    batch_size: int = opt(16, "conversations generated together")
    benign_ratio: float | None = opt(None, "at most this many benign pairs per attack pair")
    loss: str = opt("dpo", "DPO's pairwise loss (dpo, ipo, ...)")
    beta: float = opt(0.1, "how far the fork may move from the base (IPO: its tau)")
    sft_weight: float = opt(
        1.0, "weight of the chosen answers' NLL next to the DPO loss (RPO); 0 for plain DPO"
    )
    max_seq_len: int = opt(
        384, "longest prompt + answer in training, in tokens (prompts are cut from the left to 2/3 of it)"
    )
    train: TrainOptions = opt(default_factory=_dpo_train_defaults)
    lora: LoraOptions = opt(default_factory=_dpo_lora_defaults)
    eval_tasks: list[str] = opt(
        default_factory=lambda: ["builtin:core"],
        help="suites run on the base and each fork (forgetting check)",
    )
    eval_limit: int | None = opt(None, "documents per eval task (none: all)")
    overwrite: bool = opt(False, "start afresh even if OUT holds a watchdog run with other settings")
    device: str = opt("auto", "cpu, cuda, cuda:N, mps or auto")
    dtype: str = opt("auto", "fp32, bf16, fp16 or auto")
    json: bool = opt(False, "print the result as JSON")

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise UsageError(f"--rounds must be at least 1, got {self.rounds}")
        if not 0 < self.heldout_fraction < 1:
            raise UsageError(f"--heldout-fraction must be between 0 and 1, got {self.heldout_fraction}")
        for name, value in (("limit", self.limit), ("eval-limit", self.eval_limit)):
            if value is not None and value < 1:
                raise UsageError(f"--{name} must be at least 1, got {value}")
        if self.max_tokens < 1 or self.batch_size < 1:
            raise UsageError("--max-tokens and --batch-size must be at least 1")


class WatchdogProgress(Protocol):
    """What the command reports to (the CLI's lines and bars); every member may be None."""

    def stage(self, text: str) -> None: ...

    probes: Any  # redteam's progress(label, done, total)
    evaluation: Any  # eval's progress(label) -> tick(done, total)
    reporter: Any  # the training loop's Reporter


# ----- starting or continuing OUT ---------------------------------------------------------------


def _start(cfg: WatchdogConfig, out: Path) -> None:
    """Write config.yaml, or check that OUT's run has these settings (then it continues)."""
    saved = out / "config.yaml"
    if saved.exists() and not cfg.overwrite:
        before = config_to_dict(load_config_yaml(WatchdogConfig, saved))
        now = config_to_dict(cfg)
        differ = sorted(k for k in now if k not in ("json", "overwrite") and before.get(k) != now.get(k))
        if differ:
            raise UsageError(
                f"{out} holds a watchdog run with other settings ({', '.join(differ)}); "
                "use another --out, or --overwrite to start afresh"
            )
        return
    if cfg.overwrite and out.exists():
        import shutil

        for child in out.iterdir():  # only what a watchdog run writes
            if child.name.startswith("round-") and child.is_dir():
                shutil.rmtree(child)
            elif child.name in ("config.yaml", "watchdog.json", "report.html"):
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    dump_config_yaml(cfg, saved)


def _check_inputs(cfg: WatchdogConfig) -> None:
    """Everything a user wrote is read and checked before any model loads: the packs, both
    sides of the split, the transforms, the policy and the eval tasks."""
    from weightsmith.commands.redteam import select_probes
    from weightsmith.eval.runner import EvalOptions, load_tasks

    for side in ("train", "heldout"):
        select_probes(_scan_config(cfg, "-", side, adapter=None, pairs=None))
    if cfg.policy is not None:
        from weightsmith.safety.guarded import load_guard

        load_guard(cfg.policy)
    load_tasks(cfg.eval_tasks, EvalOptions(limit=cfg.eval_limit))


# ----- the stages ----------------------------------------------------------------------------------


def _scan_config(cfg: WatchdogConfig, out: str, side: str, *, adapter: str | None, pairs: str | None) -> Any:
    from weightsmith.commands.redteam import RedteamConfig

    data: dict[str, Any] = {
        "target": cfg.model,
        "adapter": [adapter] if adapter else [],
        "packs": cfg.packs,
        "transforms": cfg.transforms,
        "split": side,
        "heldout_fraction": cfg.heldout_fraction,
        "limit": cfg.limit,
        "max_tokens": cfg.max_tokens,
        "batch_size": cfg.batch_size,
        "out": out,
        "resume": True,
        "calibrate": False,
        "device": cfg.device,
        "dtype": cfg.dtype,
    }
    if pairs is not None:
        data.update(pairs=pairs, benign_ratio=cfg.benign_ratio)
        if adapter:  # later rounds learn from the newest fork's replies
            data["pairs_from"] = model_label(cfg.model, adapter)
        if cfg.policy is not None:
            data["guard"] = cfg.policy
    return config_from_dict(RedteamConfig, data, source="watchdog")


def _scan(cfg: WatchdogConfig, folder: Path, side: str, adapter: str | None, pairs: Path | None,
          progress: WatchdogProgress | None) -> dict[str, Any]:  # fmt: skip
    from weightsmith.commands.redteam import run_redteam

    rt = _scan_config(cfg, str(folder), side, adapter=adapter, pairs=str(pairs) if pairs else None)
    return run_redteam(rt, getattr(progress, "probes", None))


def merge_pairs(files: list[Path], dest: Path) -> dict[str, Any]:
    """One training file from every round's pairs (a pair repeated across rounds is kept once),
    with a meta file naming each source file and its sha256."""
    from weightsmith.preference_pairs import meta_path, write_pairs

    rows, seen, sources = [], set(), []
    for f in files:
        text = f.read_text(encoding="utf-8")
        sources.append({"file": str(f), "sha256": hashlib.sha256(text.encode()).hexdigest(),
                        "meta": str(meta_path(f))})  # fmt: skip
        for line in text.splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            key = json.dumps([row["prompt"], row["chosen"], row["rejected"]], sort_keys=True)
            if key not in seen:
                seen.add(key)
                rows.append(row)
    meta = write_pairs(dest, rows, {"source": "watchdog", "merged_from": sources})
    write_lineage(dest, kind="watchdog pairs", inputs={"pairs": files}, extra_outputs=[meta_path(dest)],
                  metrics={"rows": len(rows)})  # fmt: skip
    return {"path": str(dest), "rows": len(rows), "sha256": meta["sha256"], "sources": sources}


def _train(
    cfg: WatchdogConfig, data: Path, folder: Path, progress: WatchdogProgress | None
) -> dict[str, Any]:
    """DPO with LoRA from the base; a finished run is kept, an interrupted one resumes."""
    from weightsmith.train.dpo import DpoConfig, run_dpo

    if (folder / "run.json").is_file():
        return {**json.loads((folder / "run.json").read_text(encoding="utf-8")), "reused": True}
    if (folder / "config.yaml").is_file() and (folder / "checkpoints").is_dir():
        dpo = DpoConfig(resume=str(folder))
    else:
        dpo = DpoConfig(
            model=cfg.model, data=str(data), out=str(folder), method="lora", loss=cfg.loss, beta=cfg.beta,
            sft_weight=cfg.sft_weight, max_seq_len=cfg.max_seq_len, max_prompt_len=cfg.max_seq_len * 2 // 3, valid_fraction=0.0, overwrite=True, device=cfg.device,
            dtype=cfg.dtype, train=cfg.train, lora=cfg.lora,
        )  # fmt: skip
    return run_dpo(dpo, reporter=getattr(progress, "reporter", None))


def _evaluate(
    cfg: WatchdogConfig, adapter: str, folder: Path, progress: WatchdogProgress | None
) -> dict[str, Any]:
    """The eval tasks on the base and the fork; per task and pooled over every item."""
    from weightsmith.commands.eval import EvalConfig, run_eval

    ev = config_from_dict(
        EvalConfig,
        {"model": cfg.model, "adapter": adapter, "compare": ["base"], "tasks": cfg.eval_tasks,
         "limit": cfg.eval_limit, "out": str(folder), "device": cfg.device, "dtype": cfg.dtype},
        source="watchdog",
    )  # fmt: skip
    result = run_eval(ev, getattr(progress, "evaluation", None), keep_samples=True)
    return forgetting_check(result)


def forgetting_check(result: dict[str, Any]) -> dict[str, Any]:
    """The eval comparison as the watchdog reports it: per task/metric rows, and accuracy pooled
    over every 0/1-scored item of every task with McNemar's test and Newcombe's interval."""
    from weightsmith.eval.intervals import paired_difference
    from weightsmith.eval.stats import mcnemar
    from weightsmith.safety.redteam import rate

    comparison = result["comparison"]
    base, fork = comparison["labels"]
    rows = [
        {"task": r["task"], "metric": r["metric"], "before": r["values"][base], "after": r["values"][fork],
         "delta": r["delta"].get(fork), "p_value": r["p_value"].get(fork), "test": r["test"]}
        for r in comparison["rows"]
    ]  # fmt: skip
    before, after = _pooled_items(result["samples"][0]), _pooled_items(result["samples"][1])
    common = sorted(set(before) & set(after))
    a, b = [before[k] for k in common], [after[k] for k in common]
    pooled = None
    if common:
        test = mcnemar(a, b)
        pooled = {"items": len(common), "before": rate(a), "after": rate(b),
                  "difference": paired_difference(a, b),
                  "mcnemar": {"before_only": test["a_only"], "after_only": test["b_only"],
                              "p_value": test["p_value"], "method": test["method"]}}  # fmt: skip
    return {"labels": {"before": base, "after": fork}, "rows": rows, "pooled": pooled,
            "report": result["written"].get("report")}  # fmt: skip


def _pooled_items(samples: dict[str, list[dict]]) -> dict[tuple[str, Any], int]:
    """(task, doc id) -> 0/1 for every document whose `acc` (else `exact_match`) is 0 or 1."""
    from weightsmith.eval.stats import doc_values

    items: dict[tuple[str, Any], int] = {}
    for task, records in samples.items():
        for metric in ("acc", "exact_match"):
            values = doc_values(records, metric, "none")
            if values and all(v in (0, 1) for v in values.values()):
                items.update({(task, doc): int(v) for doc, v in values.items()})
                break
    return items


def _adapter_digest(folder: Path) -> str | None:
    weights = folder / "adapter_model.safetensors"
    return file_sha256(weights) if weights.is_file() else None


# ----- the command ---------------------------------------------------------------------------------


def run_watchdog(cfg: WatchdogConfig, progress: WatchdogProgress | None = None) -> dict[str, Any]:
    """Every round; returns (and writes to OUT/watchdog.json) the rounds' comparisons and lineage."""
    from weightsmith.safety.redteam_compare import compare_runs, records_by_config

    out = Path(cfg.out)
    _check_inputs(cfg)
    _start(cfg, out)
    say = getattr(progress, "stage", None) or (lambda text: None)
    started = time.time()
    result: dict[str, Any] = {"weightsmith": __version__, "model": cfg.model, "policy": cfg.policy,
                              "split": {"heldout_fraction": cfg.heldout_fraction}, "rounds": []}  # fmt: skip
    pair_files: list[Path] = []
    adapter: str | None = None
    for n in range(1, cfg.rounds + 1):
        folder = out / f"round-{n}"
        scanned = model_label(cfg.model, adapter)
        say(f"round {n}: scanning {scanned} on the train probes")
        scan = _scan(cfg, folder / "scan", "train", adapter, folder / "pairs.jsonl", progress)
        pair_files.append(folder / "pairs.jsonl")
        merged = merge_pairs(pair_files, folder / "train-pairs.jsonl")
        if merged["rows"] == 0:
            raise UsageError(
                f"round {n}: the scan of {scanned} gave no preference pairs (no attack got through and no "
                f"benign prompt was answered); nothing to learn; see {folder / 'scan' / 'report.html'}"
            )
        say(f"round {n}: DPO on {merged['rows']} pairs ({scan['pairs']['counts']} new)")
        trained = _train(cfg, folder / "train-pairs.jsonl", folder / "dpo", progress)
        fork = str(folder / "dpo")
        say(f"round {n}: rescanning {cfg.model} and the fork on the held-out probes")
        _scan(cfg, folder / "heldout", "heldout", fork, None, progress)
        runs = records_by_config(folder / "heldout")
        base_label, fork_label = model_label(cfg.model, None), model_label(cfg.model, fork)
        heldout = compare_runs(runs[base_label], runs[fork_label])
        say(f"round {n}: {', '.join(cfg.eval_tasks)} on {cfg.model} and the fork")
        forgetting = _evaluate(cfg, fork, folder / "eval", progress)
        result["rounds"].append({
            "round": n,
            "scanned": scanned,
            "heldout": heldout,
            "eval": forgetting,
            "train": {key: trained.get(key) for key in ("steps", "metrics", "seconds", "reference", "loss", "beta", "sft_weight")},
            "lineage": {
                "scan": {"folder": str(folder / "scan"), "split": "train", "model": scanned,
                         "pairs": scan.get("pairs")},
                "train_pairs": merged,
                "adapter": {"folder": fork, "sha256": _adapter_digest(folder / "dpo"),
                            "run": str(folder / "dpo" / "run.json")},
                "heldout": {"folder": str(folder / "heldout"), "split": "heldout"},
                "eval": {"folder": str(folder / "eval"), "tasks": cfg.eval_tasks, "limit": cfg.eval_limit},
            },
        })  # fmt: skip
        adapter = fork
        result["seconds"] = round(time.time() - started, 1)
        write_json_atomic(out / "watchdog.json", result)
    from weightsmith.report.watchdog_report import write_watchdog_report

    write_watchdog_report(out / "report.html", result)
    _record_lineage(cfg, out, result, started)
    result["written"] = {"json": str(out / "watchdog.json"), "report": str(out / "report.html")}
    return result


def _record_lineage(cfg: WatchdogConfig, out: Path, result: dict[str, Any], started: float) -> None:
    """OUT's lineage record; the last round's held-out rates are its headline."""
    last = result["rounds"][-1]["heldout"]
    write_lineage(
        out, kind="watchdog", config=cfg, started=started, device=cfg.device,
        inputs={"model": cfg.model, "policy": cfg.policy, "packs": cfg.packs, "eval_tasks": cfg.eval_tasks},
        metrics={"rounds": cfg.rounds, **{k: {s: (last.get(k) or {}).get(s) for s in ("before", "after")} for k in ("asr", "over_refusal")}},
    )  # fmt: skip
