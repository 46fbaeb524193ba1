"""Writing an evaluation's files: per model `results.json` (lm-eval's layout) and
`samples_<task>.jsonl`, and for a comparison `comparison.json`.

Every file is written atomically (temp file, fsync, rename), so an interrupted run
never leaves a half-written result beside complete ones. Not here: the HTML report
(weightsmith.report.eval_report, which sits above eval and is called by the eval command).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from weightsmith.errors import WeightsmithError
from weightsmith.files import is_inside, is_plain_file_name, write_json_atomic, write_text_atomic


def safe_name(label: str) -> str:
    """A label as a folder name: letters, digits, '.', '_' and '-'."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "model"
    return name[:80]


def _inside(folder: Path, name: str) -> Path:
    """`folder / name`, refused unless `name` is one plain file name that stays in `folder`
    (task names are checked when read; this is the writer's own guard)."""
    path = folder / name
    if not is_plain_file_name(name) or not is_inside(path, folder):
        raise WeightsmithError(
            f"{path}: refusing to write outside {folder}; {name!r} is not a plain file name"
        )
    return path


def write_outputs(
    out: Path, runs: list[dict], samples: list[dict[str, list[dict]]], comparison: dict | None
) -> dict:
    """Write every file under `out`; return {what: path}."""
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Any] = {"runs": []}
    used: set[str] = set()
    for run, run_samples in zip(runs, samples, strict=True):
        name = safe_name(run["weightsmith"]["label"])
        while name in used:
            name += "_"
        used.add(name)
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / "results.json", run)
        for task, records in run_samples.items():
            lines = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records)
            write_text_atomic(_inside(folder, f"samples_{task}.jsonl"), lines)
        written["runs"].append(str(folder))
    if comparison is not None:
        write_json_atomic(out / "comparison.json", comparison)
        written["comparison"] = str(out / "comparison.json")
    return written
