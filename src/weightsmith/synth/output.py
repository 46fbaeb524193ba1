"""A finished synth run's files: the training data, the funnel, the lineage.

- `train.jsonl` / `validation.jsonl`: chat-format examples (`{"messages": [...], "meta": {...}}`)
  that `weightsmith finetune --data` reads as they are; an example goes to validation when a
  hash of its instruction falls under `valid_fraction` (stable: the same example lands on the
  same side in every run and whatever else is kept).
- `funnel.json`: candidates, what each stage dropped by reason, what was left after it, the
  share kept with its 95% Wilson interval, and the documents skipped.
- `lineage.json`: the model (its weights' SHA-256, or the endpoint and what it serves), the
  recipe, every prompt template and input file with its SHA-256, the seed and the settings.

Nothing here carries a time, so two runs with the same inputs and seed write the same files.
Not here: the HTML report (report.synth_report).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from weightsmith.eval.intervals import wilson
from weightsmith.files import write_json_atomic, write_text_atomic

#: Funnel stages in the order a candidate meets them, and the reasons each drops for.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("generation", ("instruction_request_failed",)),
    ("instruction checks", ("instruction_empty", "instruction_cut_off", "instruction_too_short",
                            "instruction_too_long", "instruction_not_text", "instruction_refusal",
                            "instruction_boilerplate", "evolve_unchanged")),
    ("near-duplicates (ROUGE-L)", ("near_duplicate",)),
    ("answer", ("answer_request_failed", "answer_empty", "answer_cut_off", "answer_format", "answer_too_short",
                "answer_too_long", "answer_not_text", "answer_refusal", "answer_boilerplate", "answer_repetitive")),
    ("decontamination (n-grams)", ("contaminated",)),
    ("judge", ("judge_request_failed", "judge_unparseable", "judge_below_threshold")),
    ("target size", ("beyond_n",)),
)  # fmt: skip


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_validation(row: dict[str, Any], fraction: float) -> bool:
    key = json.dumps(row["messages"][:-1], ensure_ascii=False, sort_keys=True).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64 < fraction


def funnel(state_funnel: dict[str, Any], skipped: list[dict] | None = None) -> dict[str, Any]:
    """The funnel by stage from the state's counts by reason."""
    left = state_funnel["candidates"]
    stages = []
    known = {r for _, reasons in STAGES for r in reasons}
    dropped = state_funnel["dropped"]
    for name, reasons in STAGES:
        here = {r: dropped[r] for r in reasons if dropped.get(r)}
        left -= sum(here.values())
        stages.append({"stage": name, "dropped": here, "remaining": left})
    other = {r: n for r, n in dropped.items() if r not in known}
    assert not other, f"funnel reasons without a stage: {other}"
    kept, n = state_funnel["kept"], state_funnel["candidates"]
    share = {"k": kept, "n": n, "rate": kept / n if n else None, "method": "wilson", "level": 0.95}
    if n:
        share["ci_low"], share["ci_high"] = wilson(kept, n)
    out = {"candidates": n, "stages": stages, "kept": kept, "kept_share": share}
    if skipped is not None:
        out["skipped_documents"] = skipped
    return out


def write_outputs(out: Path, kept: list[dict], valid_fraction: float, funnel_data: dict) -> dict:
    """train.jsonl, validation.jsonl and funnel.json, each written atomically (the caller adds
    lineage.json once the report is written too)."""
    train = [r for r in kept if not is_validation(r, valid_fraction)]
    valid = [r for r in kept if is_validation(r, valid_fraction)]
    written = {}
    for name, rows in (("train", train), ("validation", valid)):
        path = out / f"{name}.jsonl"
        write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        written[name] = {"path": str(path), "examples": len(rows), "sha256": sha256_file(path)}
    funnel_data = {**funnel_data, "train": len(train), "validation": len(valid)}
    write_json_atomic(out / "funnel.json", funnel_data)
    written["funnel"] = str(out / "funnel.json")
    return written
