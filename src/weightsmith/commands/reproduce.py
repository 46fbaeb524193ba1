"""The reproduce command: run an artifact's recorded command again into a fresh place and compare.

The lineage record holds the command's kind and its whole config. `run_reproduce` checks
that the recorded inputs are still the ones used (else the comparison would mean nothing,
unless `--allow-changed`), builds the same config through the typed config loader (a record
is a shared file: its config is checked like a config file, never run as a shell line),
points its output at the new place, runs the command in the folder it first ran in (its
relative paths mean what they meant), and compares: which outputs are bit-identical, and how
far each headline metric moved.

Not here: the commands themselves; lineage records (`weightsmith.lineage`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightsmith.config import config_from_dict, opt
from weightsmith.errors import UsageError
from weightsmith.lineage import check_lineage, locate, read_record


def _recipes() -> dict[str, tuple[type, Callable[..., Any]]]:
    """kind -> (config class, run function) of every command `reproduce` can re-run."""
    from weightsmith.commands import arena, audit, export, quantize, redteam, train, watchdog
    from weightsmith.commands import eval as evaluate

    return {
        "finetune": (train.FinetuneConfig, train.run_finetune),
        "dpo": (train.DpoConfig, train.run_dpo),
        "kto": (train.KtoConfig, train.run_kto),
        "distill": (train.DistillConfig, train.run_distill),
        "reward": (train.RewardConfig, train.run_reward),
        "grpo": (train.GrpoConfig, train.run_grpo),
        "merge": (train.MergeConfig, train.run_merge),
        "quantize": (quantize.QuantizeConfig, quantize.run_quantize),
        "export": (export.ExportConfig, export.run_export),
        "eval": (evaluate.EvalConfig, evaluate.run_eval),
        "redteam": (redteam.RedteamConfig, redteam.run_redteam),
        "audit bias": (audit.AuditBiasConfig, audit.run_audit_bias),
        "arena export": (arena.ArenaExportConfig, arena.run_arena_export),
        "watchdog": (watchdog.WatchdogConfig, watchdog.run_watchdog),
    }


#: Config keys that say where a run writes or how it continues: never taken from the record.
RESET = {"out": None, "resume": None, "overwrite": False, "json": False}


@dataclass(kw_only=True)
class ReproduceConfig:
    """Re-run the command that made an artifact, into a fresh place; compare outputs and metrics."""

    path: str = opt(help="the artifact (a folder or file with a lineage record)", positional=True)
    out: str | None = opt(None, "where the re-run writes (default: PATH-reproduced beside it)")
    allow_changed: bool = opt(False, "re-run even if an input changed since the artifact was made")
    allow_code: bool = opt(
        False,
        "re-run a grpo run whose rewards are functions in Python files (re-running imports and runs them)",
    )
    root: list[str] = opt(default_factory=lambda: ["."], help="folders the input check may read")
    json: bool = opt(False, "print the comparison as JSON")


def default_out(artifact: Path, record: dict[str, Any]) -> Path:
    """DIR-reproduced for a folder; for a file, the same name in a NAME-reproduced folder (its
    companions, a Modelfile, must not land on the original's)."""
    if record.get("artifact", {}).get("type") == "file":
        return artifact.parent / f"{artifact.stem}-reproduced" / artifact.name
    return artifact.with_name(f"{artifact.name}-reproduced")


def _config(record: dict[str, Any], cls: type, out: Path, source: str) -> Any:
    data = {k: v for k, v in (record.get("config") or {}).items() if k not in RESET}
    data["out"] = str(out)
    if "cache" in data:
        data["cache"] = False  # eval: answers computed again, not read from the result cache
    if data.get("pairs"):  # red-team pairs go beside the new run, not over the original's
        data["pairs"] = str(out / Path(str(data["pairs"])).name)
    return config_from_dict(cls, data, source=source)


def _check_inputs(cfg: ReproduceConfig) -> None:
    """The artifact's own inputs must still be what it used (problems further up do not matter:
    the re-run starts from these files)."""
    tree = check_lineage(cfg.path, cfg.root)["tree"]
    changed = [
        f"input {i['role']} {i.get('path')} is {i['status']}"
        for i in tree["inputs"]
        if i["status"] in ("changed", "missing")
    ]
    if changed and not cfg.allow_changed:
        raise UsageError(
            f"{changed[0]}{f' (and {len(changed) - 1} more)' if len(changed) > 1 else ''}; a re-run would not "
            "start from the same inputs: restore them, or pass --allow-changed to re-run anyway"
        )


def run_reproduce(cfg: ReproduceConfig, progress: Any = None) -> dict[str, Any]:
    file = locate(Path(cfg.path))
    record = read_record(file)
    recipes = _recipes()
    if record["kind"] not in recipes:
        raise UsageError(
            f"{file}: a {record['kind']!r} artifact cannot be re-run; reproduce re-runs {', '.join(recipes)}"
        )
    artifact = (
        file.parent
        if record.get("artifact", {}).get("type") != "file"
        else file.parent / record["artifact"]["path"]
    )
    out = Path(os.path.abspath(cfg.out or default_out(artifact, record)))
    if out.exists():
        raise UsageError(
            f"{out}: already exists; reproduce writes into a fresh place: remove it or pass --out"
        )
    _check_inputs(cfg)
    if record["kind"] == "grpo":
        _check_rewards(file, record, cfg.allow_code)
    cls, run = recipes[record["kind"]]
    config = _config(record, cls, out, str(file))
    cwd = (record.get("command") or {}).get("cwd")
    here = os.getcwd()
    try:
        if isinstance(cwd, str) and Path(cwd).is_dir():
            os.chdir(cwd)  # the recorded relative paths (data, models) mean what they meant
        run(config, None)
    finally:
        os.chdir(here)
    return compare(file, record, read_record(locate(out)), out)


def _check_rewards(file: Path, record: dict[str, Any], allow_code: bool) -> None:
    """A GRPO run scored by Python functions (the API's `rewards=`) cannot be re-run from its
    record, which holds only --reward's specs: its metrics name every reward it used. A
    function from a file (`--reward PATH.py:FUNCTION`, whose sha256 the inputs check) is code
    that a record, a shared file, must not get run by itself: only with --allow-code."""
    from weightsmith.train.reward_files import file_spec
    from weightsmith.train.rewards import reward_name

    specs = [str(spec) for spec in (record.get("config") or {}).get("reward") or []]
    code = [spec for spec in specs if file_spec(spec)]
    if code and not allow_code:
        raise UsageError(
            f"{file}: the run's rewards include Python code ({', '.join(code)}); re-running it imports and runs "
            "that file: pass --allow-code if you trust it"
        )
    given = {reward_name(spec) for spec in specs}
    used = {k.removeprefix("reward_") for k in record.get("metrics") or {} if k.startswith("reward_")}
    missing = sorted(used - given - {"zero_std"})
    if missing:
        raise UsageError(
            f"{file}: the run was also scored by Python reward functions ({', '.join(missing)}) that its record "
            "cannot re-run; re-run it from Python with the same functions"
        )


def _flat(metrics: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(metrics, dict):
        for k, v in metrics.items():
            out.update(_flat(v, f"{prefix}{k}."))
    elif isinstance(metrics, (int, float)) and not isinstance(metrics, bool):
        out[prefix.rstrip(".")] = float(metrics)
    return out


def compare(file: Path, before: dict[str, Any], after: dict[str, Any], out: Path) -> dict[str, Any]:
    """Which outputs are bit-identical, and each headline metric's move."""
    new = {o["path"]: o["sha256"] for o in after["outputs"]}
    outputs = []
    for o in before["outputs"]:
        sha = new.get(o["path"])
        status = "missing" if sha is None else "identical" if sha == o["sha256"] else "differs"
        outputs.append({"path": o["path"], "status": status, "sha256": o["sha256"], "reproduced": sha})
    old_m, new_m = _flat(before.get("metrics")), _flat(after.get("metrics"))
    metrics = [
        {"name": k, "original": old_m[k], "reproduced": new_m[k], "delta": new_m[k] - old_m[k]}
        for k in old_m
        if k in new_m
    ]
    return {
        "original": str(file),
        "reproduced": str(out),
        "kind": before["kind"],
        "id": after["id"],
        "outputs": outputs,
        "identical": sum(o["status"] == "identical" for o in outputs),
        "metrics": metrics,
    }
