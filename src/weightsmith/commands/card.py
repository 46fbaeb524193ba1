"""The card command: a Hugging Face model card for an artifact, every number read from result files.

`run_card(cfg)` reads the artifact's lineage (base model, data, method), an eval report's
`results.json` (and its samples, for each metric's interval), a red-team `summary.json` and
a bias audit's `results.json`; every folder is checked before anything is written. The card
(`weightsmith.report.card`) is written atomically and parsed back with huggingface_hub's
`ModelCard` before the command returns.

Not here: the card's text (`weightsmith.report.card`), lineage records (`weightsmith.lineage`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightsmith.config import opt
from weightsmith.errors import UsageError, WeightsmithError
from weightsmith.eval.intervals import describe, is_binary, proportion_interval
from weightsmith.eval.stats import bootstrap_ci, doc_values
from weightsmith.files import read_json, write_text_atomic
from weightsmith.lineage import LineageError, check_lineage, locate
from weightsmith.report.card import CardFacts, render_card


@dataclass(kw_only=True)
class CardConfig:
    """Write a Hugging Face model card (README.md) from an artifact's lineage and its result files."""

    path: str = opt(help="the model artifact: a training run, a merged or quantized model folder, a .gguf",
                    positional=True)  # fmt: skip
    eval: str | None = opt(None, "an eval report folder (weightsmith eval --out)")
    eval_run: str | None = opt(None, "which model of the eval report (its label) when it holds several")
    redteam: str | None = opt(None, "a red-team report folder (weightsmith redteam --out)")
    bias: str | None = opt(None, "a bias audit folder (weightsmith audit bias --out)")
    out: str | None = opt(None, "where to write the card (default: PATH/README.md)")
    license: str | None = opt(None, "license id for the card (default: the base model's, from the catalog)")
    root: list[str] = opt(default_factory=lambda: ["."], help="folders the lineage check may read")
    overwrite: bool = opt(False, "replace an existing card")
    json: bool = opt(False, "print the card's metadata as JSON")


def _folder_file(flag: str, folder: str | None, name: str, how: str) -> Path | None:
    """`folder/name`, or a UsageError saying which report the flag wants."""
    if folder is None:
        return None
    path = Path(folder)
    if not path.is_dir():
        raise UsageError(f"--{flag} {folder}: not a folder; give the --out folder of {how}")
    if name and not (path / name).is_file():
        raise UsageError(f"--{flag} {folder}: no {name} in it; give the --out folder of {how}")
    return path / name if name else path


def _eval_results(cfg: CardConfig) -> dict[str, Any] | None:
    """The chosen model's results.json (with `intervals` added from its samples)."""
    folder = _folder_file("eval", cfg.eval, "", "weightsmith eval ... --out DIR")
    if folder is None:
        return None
    runs = sorted(folder.glob("*/results.json"))
    if not runs:
        raise UsageError(
            f"--eval {folder}: no LABEL/results.json in it; give the --out folder of weightsmith eval"
        )
    loaded = {p.parent.name: _read(p, "--eval") for p in runs}
    labels = {str(r.get("weightsmith", {}).get("label", name)): name for name, r in loaded.items()}
    if cfg.eval_run is not None:
        if cfg.eval_run not in labels:
            raise UsageError(f"--eval-run {cfg.eval_run}: not in {folder}; it holds {', '.join(labels)}")
        name = labels[cfg.eval_run]
    elif len(loaded) == 1:
        name = next(iter(loaded))
    else:
        name = _matching_run(loaded, Path(cfg.path), folder, list(labels))
    run = loaded[name]
    run["intervals"] = eval_intervals(run, folder / name)
    return run


def _matching_run(loaded: dict[str, dict], artifact: Path, folder: Path, labels: list[str]) -> str:
    """The run whose model or adapter is the artifact; an error naming the labels otherwise."""
    target = artifact.resolve()
    for name, run in loaded.items():
        meta = run.get("weightsmith", {})
        for key in ("adapter", "model"):
            if meta.get(key) and Path(str(meta[key])).resolve() == target:
                return name
    raise UsageError(
        f"--eval {folder}: holds several models ({', '.join(labels)}) and none is {artifact}; "
        "choose one with --eval-run LABEL"
    )


def eval_intervals(run: dict[str, Any], folder: Path) -> dict[str, dict[str, Any]]:
    """ "task/metric,filter" -> {value, n, ci_low, ci_high, method} from the per-document samples:
    Wilson for 0/1 scores, a percentile bootstrap of the mean otherwise."""
    out: dict[str, dict[str, Any]] = {}
    for task, values in (run.get("results") or {}).items():
        samples = folder / f"samples_{task}.jsonl"
        if not samples.is_file():
            continue
        records = [
            json.loads(line) for line in samples.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
        for key, value in values.items():
            if "stderr" in key or "," not in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            docs = [v for v in doc_values(records, metric, filt).values() if isinstance(v, (int, float))]
            if not docs:
                continue
            if is_binary(docs):
                low, high = proportion_interval(int(sum(docs)), len(docs), "wilson")
                method = describe("wilson")
            else:
                low, high = bootstrap_ci(docs, iters=2000)
                method = describe("bootstrap")
            out[f"{task}/{key}"] = {"value": value, "n": len(docs), "ci_low": low, "ci_high": high, **method}
    return out


def _read(path: Path, flag: str) -> dict[str, Any]:
    try:
        data = read_json(path)
    except WeightsmithError as e:
        raise UsageError(f"{flag}: {e}") from None
    assert data is not None
    return data


def _lineage(cfg: CardConfig) -> dict[str, Any] | None:
    """The artifact's checked lineage tree; None when it has no record (the card says so)."""
    try:
        locate(Path(cfg.path))
    except LineageError:
        return None
    return check_lineage(cfg.path, cfg.root)


def gather(cfg: CardConfig) -> CardFacts:
    """Everything the card says, read and checked before anything is written."""
    artifact = Path(cfg.path)
    if not artifact.exists():
        raise UsageError(f"{artifact}: no such model folder or file")
    if not (cfg.eval or cfg.redteam or cfg.bias):
        raise UsageError(
            "a card needs results: give --eval DIR, --redteam DIR and/or --bias DIR (the --out folders of "
            "weightsmith eval, redteam and audit bias)"
        )
    redteam = _folder_file("redteam", cfg.redteam, "summary.json", "weightsmith redteam ... --out DIR")
    bias = _folder_file("bias", cfg.bias, "results.json", "weightsmith audit bias ... --out DIR")
    return CardFacts(
        name=artifact.name if artifact.is_dir() else artifact.stem,
        artifact=artifact,
        lineage=_lineage(cfg),
        eval=_eval_results(cfg),
        redteam=_read(redteam, "--redteam") if redteam else None,
        bias=_read(bias, "--bias") if bias else None,
        license=cfg.license,
    )


def run_card(cfg: CardConfig, progress: Any = None) -> dict[str, Any]:
    from huggingface_hub import ModelCard

    out = (
        Path(cfg.out)
        if cfg.out
        else (Path(cfg.path) if Path(cfg.path).is_dir() else Path(cfg.path).parent) / "README.md"
    )
    if out.exists() and not cfg.overwrite:
        raise UsageError(f"{out}: already exists; pass --overwrite to replace it, or choose another --out")
    facts = gather(cfg)
    text, metadata = render_card(facts)
    ModelCard(text)  # huggingface_hub parses it (front matter and model-index) before it is written
    write_text_atomic(out, text)
    return {"out": str(out), "metadata": metadata}
