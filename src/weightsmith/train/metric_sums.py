"""A training step's extra metrics, summed over its micro-batches and ranks, then averaged.

A loss function returns extra metrics as sums over its batch (`Trainer` divides them by the
step's loss units: target tokens, pairs) or as a `Mean` over units of their own (GRPO's
rewards: completions), whose sum and count are both added up over the step before dividing,
so that a step split into micro-batches and ranks reports what one whole batch does.

Not here: the loop (loop.py), the all-reduce (distributed.World.all_sum).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Mean(NamedTuple):
    """An extra metric that is a mean over its own units (GRPO's rewards: completions), not over
    the loss's: `total` summed over the batch's units, `n` of them. The loop sums both over the
    step's micro-batches and ranks before dividing, so a split batch reports what a whole one does."""

    total: torch.Tensor | float
    n: float


class MetricSums:
    """The sums of a step's extra metrics: `add` each micro-batch's, `flat` gives the numbers to
    sum over ranks, `means` the metrics from those sums."""

    def __init__(self) -> None:
        #: key: [summed value, summed units (None: a metric over the loss's units)]
        self.totals: dict[str, list] = {}

    def add(self, extra: dict[str, torch.Tensor | Mean], real: bool = True) -> None:
        """Add a micro-batch's extra metrics; a stand-in batch (`real` False) adds zeros."""
        for key, value in extra.items():
            total, n = (value.total, value.n) if isinstance(value, Mean) else (value, None)
            at = self.totals.setdefault(key, [0.0, None if n is None else 0.0])
            at[0] += float(total) if real else 0.0
            if n is not None:
                at[1] += float(n) if real else 0.0

    def flat(self) -> list[float]:
        """The sums to add over ranks, in `means`'s order."""
        return [v for total, n in self.totals.values() for v in ((total,) if n is None else (total, n))]

    def means(self, summed: list[float], n_units: float) -> dict[str, float]:
        """Each metric from its sums over ranks (`summed`, in `flat`'s order): over its own units
        for a Mean, else over the loss's `n_units`."""
        out, at = {}, iter(summed)
        for key, (_, n) in self.totals.items():
            total = next(at)
            if n is None:
                out[key] = total / n_units
            elif (
                units := next(at)
            ) > 0:  # a mean over no units (no undesirable example this step) is left out
                out[key] = total / units
        return out
