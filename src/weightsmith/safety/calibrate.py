"""How good a detector is: precision and recall on hand-labelled calibration sets.

`calibrate` runs a detector (detectors.py) over a labelled set and scores it with
`precision_recall`. The shipped sets live in calibration/ (see calibration/README.md for how
they were labelled); `load_calibration` also reads a user's JSONL file of the same shape,
checking every line ("FILE:LINE: field 'x': problem").

Not here: the detectors themselves (detectors.py), or intervals on the rates (a red-team
report adds those).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from weightsmith.errors import ConfigError
from weightsmith.files import json_object_line
from weightsmith.safety.detectors import TAXONOMY, Detector, Exchange, canary_chars

# ---- metrics ----------------------------------------------------------------------------


def precision_recall(predicted: Sequence[bool | None], gold: Sequence[bool]) -> dict:
    """Confusion counts and precision, recall, F1, accuracy of `predicted` against `gold`.

    None predictions are counted as `undecided` and left out of tp/fp/fn/tn and of every
    ratio. A ratio with a zero denominator is None (precision with no positive predictions,
    recall with no positive gold labels); F1 is None when precision or recall is.
    """
    if len(predicted) != len(gold):
        raise ValueError(f"got {len(predicted)} predictions and {len(gold)} gold labels")
    tp = fp = fn = tn = undecided = 0
    for i, (p, g) in enumerate(zip(predicted, gold, strict=True)):
        if not isinstance(g, bool):
            raise ValueError(f"gold label {i} is {g!r}; expected True or False")
        if p is None:
            undecided += 1
        elif not isinstance(p, bool):
            raise ValueError(f"prediction {i} is {p!r}; expected True, False or None")
        elif p and g:
            tp += 1
        elif p:
            fp += 1
        elif g:
            fn += 1
        else:
            tn += 1
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    if precision is None or recall is None:
        f1 = None
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    decided = tp + fp + fn + tn
    return {
        "n": len(gold),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "undecided": undecided,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": (tp + tn) / decided if decided else None,
    }


# ---- calibration sets -----------------------------------------------------------------

CALIBRATION_DIR = Path(__file__).parent / "calibration"
_SETS = ("refusal", "leak", "violation")
_FIELDS = {"prompt", "response", "label", "note", "canary", "category"}


def calibration_sets() -> dict[str, Path]:
    """The shipped hand-labelled sets: {"refusal": path, "leak": path, "violation": path}."""
    return {name: CALIBRATION_DIR / f"{name}.jsonl" for name in _SETS}


def _resolve(name_or_path: str | Path) -> tuple[Path, str | None]:
    sets = calibration_sets()
    if isinstance(name_or_path, str) and name_or_path in sets:
        return sets[name_or_path], name_or_path
    path = Path(name_or_path)
    if not path.is_file():
        raise ConfigError(
            f"{path}: calibration set not found; name one of {', '.join(sets)} or give a JSONL file path"
        )
    stem = path.stem.lower()
    kind = next((k for k in ("leak", "violation") if stem.startswith(k)), None)
    return path, kind


def load_calibration(name_or_path: str | Path) -> list[tuple[Exchange, bool]]:
    """A calibration set (shipped name or JSONL path) as (exchange, gold label) pairs.

    Each line is an object with prompt, response (strings), label (true/false), optional note;
    a leak set (name or file stem starting with "leak") needs canary on every line and a
    violation set ("violation...") needs category (S1..S14). Other files may carry either.
    Any bad line raises ConfigError "FILE:LINE: field 'x': problem; fix".
    """
    path, kind = _resolve(name_or_path)
    out: list[tuple[Exchange, bool]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            out.append(_parse_line(path, lineno, line, kind))
    if not out:
        raise ConfigError(f"{path}: no examples; add one JSON object per line")
    return out


def _parse_line(path: Path, lineno: int, line: str, kind: str | None) -> tuple[Exchange, bool]:
    where = f"{path}:{lineno}"
    record = json_object_line(line, where, "labelled example", ConfigError)
    unknown = sorted(set(record) - _FIELDS)
    if unknown:
        raise ConfigError(f"{where}: field {unknown[0]!r}: unknown; expected {', '.join(sorted(_FIELDS))}")
    for key in ("prompt", "response"):
        if key not in record:
            raise ConfigError(f"{where}: field {key!r}: required but missing")
        if not isinstance(record[key], str):
            raise ConfigError(f"{where}: field {key!r}: expected a string, got {record[key]!r}")
    if "label" not in record:
        raise ConfigError(f"{where}: field 'label': required but missing; add \"label\": true or false")
    label = record["label"]
    if not isinstance(label, bool):
        raise ConfigError(f"{where}: field 'label': expected true or false, got {label!r}")
    if "note" in record and not isinstance(record["note"], str):
        raise ConfigError(f"{where}: field 'note': expected a string, got {record['note']!r}")
    canary = record.get("canary")
    if canary is None and kind == "leak":
        raise ConfigError(
            f"{where}: field 'canary': required in a leak set but missing; add the planted secret"
        )
    if canary is not None and (not isinstance(canary, str) or not canary_chars(canary)):
        raise ConfigError(
            f"{where}: field 'canary': expected a string with letters or digits, got {canary!r}"
        )
    category = record.get("category")
    if category is None and kind == "violation":
        raise ConfigError(
            f"{where}: field 'category': required in a violation set but missing; add one of S1..S14"
        )
    if category is not None and (not isinstance(category, str) or category.strip().upper() not in TAXONOMY):
        raise ConfigError(
            f"{where}: field 'category': expected a hazard category {', '.join(TAXONOMY)}, got {category!r}"
        )
    exchange = Exchange(
        prompt=record["prompt"],
        response=record["response"],
        canary=canary,
        category=category.strip().upper() if category is not None else None,
    )
    return exchange, label


def calibrate(detector: Detector, name_or_path: str | Path) -> dict:
    """`precision_recall` of `detector` on a calibration set, plus "detector" and "set"."""
    pairs = load_calibration(name_or_path)
    predicted = detector.detect([ex for ex, _ in pairs])
    result = precision_recall(predicted, [label for _, label in pairs])
    return {"detector": detector.name, "set": str(name_or_path), **result}
