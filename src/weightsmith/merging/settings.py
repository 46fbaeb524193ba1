"""A merge parameter that varies over the model: by tensor name, and along the layers.

`--t 0.5` is one value for every tensor. `--t 0,0.5,1` is a gradient: the values are spread
evenly from the first decoder layer to the last and interpolated linearly between them
(layer i of L sits at i / (L - 1) of the list). `--t self_attn=0,0.5,1` applies only to tensors
whose name contains `self_attn`; several `--t` are tried in order and the first that matches
a tensor gives its value, so the last one is usually a plain default. Tensors outside the
decoder layers (embeddings, final norm, LM head) take a gradient's first value. This is how
mergekit reads its `t` (and other parameters) with `filter:` and lists, so a SLERP recipe
written for mergekit means the same here.

Not here: the merge methods (methods.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from weightsmith.errors import UsageError

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class LayerSetting:
    """One `[FILTER=]V[,V...]` spec: the values (one, or a gradient) and the name filter."""

    values: tuple[float, ...]
    filter: str | None = None

    def matches(self, name: str) -> bool:
        return self.filter is None or self.filter in name

    def at(self, position: float) -> float:
        """The value at `position` in [0, 1] along the layers (linear between the listed values)."""
        if len(self.values) == 1:
            return self.values[0]
        scaled = position * (len(self.values) - 1)
        i = min(int(scaled), len(self.values) - 1)
        j = min(i + 1, len(self.values) - 1)
        frac = scaled - i
        return (1 - frac) * self.values[i] + frac * self.values[j]


def parse_settings(flag: str, specs: Sequence[str], *, low: float, high: float) -> list[LayerSetting]:
    """Read `[FILTER=]V[,V...]` specs (each value in [low, high]); a bad one is a UsageError
    naming the flag and the spec."""
    out = []
    for spec in specs:
        filt, sep, rest = str(spec).rpartition("=")
        if sep and not filt:
            raise UsageError(
                f"{flag} {spec}: the part before '=' names the tensors it applies to; e.g. mlp=0,1"
            )
        try:
            values = tuple(float(v) for v in rest.split(","))
        except ValueError:
            raise UsageError(
                f"{flag} {spec}: expected a number, numbers a,b,c (a gradient over the layers), "
                "or FILTER=numbers"
            ) from None
        bad = [v for v in values if not (math.isfinite(v) and low <= v <= high)]
        if bad:
            raise UsageError(f"{flag} {spec}: {bad[0]:g} is outside [{low:g}, {high:g}]")
        out.append(LayerSetting(values, filt or None))
    return out


def layer_position(name: str, num_layers: int) -> float:
    """Where tensor `name` sits along the decoder layers, in [0, 1]; 0 outside them."""
    m = _LAYER.search(name)
    if m is None or num_layers <= 1:
        return 0.0
    return int(m.group(1)) / (num_layers - 1)


def value_for(settings: Sequence[LayerSetting], name: str, num_layers: int, flag: str) -> float:
    """The first matching setting's value for tensor `name`; a UsageError when none matches."""
    for s in settings:
        if s.matches(name):
            return s.at(layer_position(name, num_layers))
    raise UsageError(
        f"{flag}: no value for tensor {name}; end the list with one without a filter, e.g. {flag} 0.5"
    )
