"""Per-request steering for the server: the `steer` extension field, resolved against the
directions the server was started with (`serve --direction NAME=FILE`).

A request names directions, never files: `"steer": "refusal:ablate"` or
`["refusal:layer=4:scale=1"]` (weightsmith.inspect.steering's spec with NAME in place of FILE).
Each file was read and checked against the served weights when the model loaded; here a
request's specs become one edit table for its rows (the scheduler applies it to those rows
only). Anything wrong is a 400 naming the field.

Not here: hook points and steering edits (weightsmith.inspect), the rows (scheduler.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from weightsmith.inspect import InspectError
from weightsmith.inspect.directions import Direction
from weightsmith.inspect.steering import edits_for, parse_steer
from weightsmith.serve.schemas import ApiError

#: Most steering specs one request may carry.
MAX_STEER_SPECS = 8


def request_steering(
    specs: str | list[str] | None, directions: Mapping[str, Direction], n_layers: int
) -> dict[str, list[Any]] | None:
    """The edit table for a request's `steer` field (None: not steered)."""
    items = [specs] if isinstance(specs, str) else list(specs or [])
    if not items:
        return None
    if not directions:
        raise ApiError(
            400,
            "this server offers no directions to steer with (start it with --direction NAME=FILE)",
            param="steer",
        )
    if len(items) > MAX_STEER_SPECS:
        raise ApiError(400, f"at most {MAX_STEER_SPECS} steering specs per request", param="steer")
    edits: dict[str, list[Any]] = {}
    for text in items:
        try:
            spec = parse_steer(text)
            name = str(spec.path)
            if name not in directions:
                raise ApiError(
                    400,
                    f"unknown direction {name!r}; this server offers {', '.join(sorted(directions))}",
                    param="steer",
                )
            table = edits_for(spec, directions[name], n_layers)
        except InspectError as e:
            raise ApiError(400, str(e).replace("--steer ", "steer "), param="steer") from None
        for hook, fns in table.items():
            edits.setdefault(hook, []).extend(fns)
    return edits
