"""Training checkpoints: written whole or not at all, the last N kept.

A checkpoint is a directory `checkpoints/step-00000040/` holding what the method
saves for its trainable weights (a PEFT adapter for LoRA, `model.safetensors` for
full fine-tuning), `optimizer.pt`, `rng_state.pt` and `trainer_state.json`. It is
written into a hidden sibling, every file fsynced, then renamed into place, so a
run killed at any moment leaves either the previous checkpoints or the new one,
never half of one. Not here: what the state means (loop.py).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from weightsmith.errors import WeightsmithError
from weightsmith.files import atomic_dir, write_text_atomic

STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"


class ResumeError(WeightsmithError):
    """A run cannot be resumed from what is on disk."""


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def rng_state(ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """This process's RNG state; with `ranks` (every rank's state in rank order, from a
    distributed job), rank 0's with all of them, so that each rank resumes its own dropout
    stream and the saved file is the same whichever rank writes it."""
    if ranks is not None and len(ranks) > 1:
        return {**ranks[0], "ranks": ranks}
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def split_rng(rank: int) -> None:
    """Give each rank of a job a stream of its own, derived from the one every rank holds in
    common: dropout masks must differ between ranks, as they differ between the rows of one
    process's batch."""
    base = int(torch.randint(0, 2**62, (1,)))
    torch.manual_seed(base + rank)


def set_rng_state(state: dict[str, Any], rank: int = 0, size: int = 1) -> None:
    """Restore rank `rank`'s stream; a checkpoint from another world size gives rank 0's saved
    stream to every rank, split again (`split_rng`)."""
    ranks = state.get("ranks")
    own = ranks[rank] if ranks is not None and len(ranks) == size else state
    torch.set_rng_state(own["cpu"])
    if "cuda" in own and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(own["cuda"])
    if size > 1 and own is state:
        split_rng(rank)


def save_checkpoint(
    root: Path,
    step: int,
    *,
    save_weights: Callable[[Path], None],
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int,
    rng: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint `step` atomically, then drop all but the newest `keep`; `rng` is the
    RNG state to save (this process's by default)."""
    root.mkdir(parents=True, exist_ok=True)
    # A resumed run re-saving a step it already saved replaces that step's directory.
    with atomic_dir(root / f"step-{step:08d}", markers=(STATE_FILE,)) as tmp:
        save_weights(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng or rng_state(), tmp / "rng_state.pt")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return root / f"step-{step:08d}"


def load_checkpoint_state(
    path: Path, optimizer: torch.optim.Optimizer, rank: int = 0, size: int = 1
) -> dict[str, Any]:
    """Restore the optimizer and rank `rank`'s RNG from checkpoint `path`; return its trainer state."""
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
        set_rng_state(torch.load(path / "rng_state.pt", weights_only=True), rank, size)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ResumeError(f"{path}: cannot restore the checkpoint ({e}); resume from an older one") from e
    return state


def latest_checkpoint(root: Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def cut_log(path: Path, step: int) -> None:
    """Keep the lines of a JSONL log (metrics.jsonl, a run's other records) whose `step` is at
    most `step`, atomically: what a run resumed from that step's checkpoint has written."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            if json.loads(line)["step"] <= step:
                kept.append(line)
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))
