"""A stable train / held-out split of red-team probes, so a fork is never scored on the
probes it learned from.

A probe's side depends only on its identity, its pack name and its id in the pack (before
any transform, so every transform of one probe lands on the same side), through sha256:

    u = int(sha256("weightsmith-redteam-split-v1\\0" + pack + "\\0" + id)[:16 hex], 16) / 2**64
    held out  <=>  u < heldout_fraction

The same on every run and machine (no Python `hash`, no seed), for attack and benign probes
alike. Raising the fraction only moves probes from train to held-out, never back. ``all``
keeps every probe (the default). The salt is part of the definition: change it and every
assignment changes, so it is versioned.

Not here: loading probes (probes.py), `--limit` (applied after the split, by the command).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from weightsmith.config import opt
from weightsmith.errors import UsageError

__all__ = ["SALT", "SPLITS", "SplitOptions", "probe_side", "select_split", "side_of"]

SALT = "weightsmith-redteam-split-v1"
SPLITS = ("train", "heldout", "all")
DEFAULT_HELDOUT = 0.3


def side_of(pack: str, probe_id: str, heldout_fraction: float = DEFAULT_HELDOUT) -> str:
    """The side, "heldout" or "train", of probe `probe_id` of pack `pack` (its id in the pack, without
    the pack name or a transform)."""
    digest = hashlib.sha256(f"{SALT}\0{pack}\0{probe_id}".encode()).hexdigest()
    u = int(digest[:16], 16) / 2**64
    return "heldout" if u < heldout_fraction else "train"


def probe_side(probe: Any, heldout_fraction: float = DEFAULT_HELDOUT) -> str:
    """The side of a `Probe` (or a transcript record with "pack" and "probe"): its id is
    "<pack>/<id>[~<transform>]", and only "<id>" counts."""
    pack = probe.pack if hasattr(probe, "pack") else probe["pack"]
    full = probe.id if hasattr(probe, "id") else probe["probe"]
    local = full.split("~", 1)[0]
    local = local[len(pack) + 1 :] if local.startswith(pack + "/") else local
    return side_of(pack, local, heldout_fraction)


@dataclass(kw_only=True)
class SplitOptions:
    """Which probes a run uses (the redteam command's `--split`, `--heldout-fraction`, flattened)."""

    split: Literal["train", "heldout", "all"] = opt(
        "all", "probes to run: the train part, the held-out part (by a stable hash of pack and id), or all"
    )
    heldout_fraction: float = opt(DEFAULT_HELDOUT, "share of probes held out (the same for every run)")

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise UsageError(f"--split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise UsageError(
                f"--heldout-fraction is a share strictly between 0 and 1, got {self.heldout_fraction}"
            )

    def record(self) -> dict[str, Any]:
        """What a summary or a pairs meta file records about the split."""
        return {
            "split": self.split,
            "heldout_fraction": self.heldout_fraction,
            "method": "sha256(salt, pack, probe id) < fraction",
            "salt": SALT,
        }


def select_split(probes: Sequence[Any], split: str, heldout_fraction: float = DEFAULT_HELDOUT) -> list[Any]:
    """The probes on side `split` ("train" or "heldout"); all of them for "all". Order is kept."""
    if split not in SPLITS:
        raise UsageError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "all":
        return list(probes)
    return [p for p in probes if probe_side(p, heldout_fraction) == split]
