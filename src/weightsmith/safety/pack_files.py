"""Probe pack and transforms files as records, loaded by `weightsmith.config.load_record`.

A YAML pack is a `PackFile` (the pack-level keys of `PackHeader`, then `probes:`, a list of
`ProbeEntry`); a JSONL pack holds one `JsonlProbe` per line (the pack-level and probe keys
side by side). A transforms file is a `TransformsFile` (`suffixes:` and `templates:`, name ->
text). Each record checks its own keys; a bad key or value is one ConfigError line
``FILE:LINE: key: problem``. The format is documented in probes.py and transforms.py.

Not here: what needs the pack and the probe together (success kinds, hazard ids, canary
placement), duplicate ids, and building `Probe`s (probes.py); applying transforms
(transforms.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from weightsmith.config import BadValue, did_you_mean
from weightsmith.config.records import BadField, Where, nonempty, where_field

__all__ = [
    "KINDS",
    "NAME",
    "SUCCESS",
    "JsonlProbe",
    "PackFile",
    "PackHeader",
    "ProbeEntry",
    "TransformsFile",
    "success_message",
]

KINDS = ("attack", "benign")
SUCCESS = {"attack": ("complied", "canary"), "benign": ("answered",)}
#: Pack, probe, suffix and template names.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

Text = Annotated[str, nonempty]


def _at_least_one(value: int) -> None:
    if value < 1:
        raise BadValue(f"expected an integer >= 1, got {value!r}")


def success_message(kind: str, success: Any) -> str:
    allowed = SUCCESS[kind]
    hint = did_you_mean(success, allowed) if isinstance(success, str) else ""
    return f"a{'n' if kind == 'attack' else ''} {kind} probe's success is {' or '.join(allowed)}, got {success!r}{hint}"


@dataclass(frozen=True, kw_only=True)
class PackHeader:
    """The pack-level keys: pack name, family, kind, default success and system prompt."""

    pack: str
    family: str
    kind: Literal["attack", "benign"]
    version: Annotated[int, _at_least_one] = 1
    description: str = ""
    success: Annotated[str, nonempty] = ""  # "": the kind's first success rule
    system: Text | None = None
    where: Where = where_field()

    def __post_init__(self) -> None:
        if not NAME.match(self.pack):
            raise BadField(
                "pack",
                f"every pack needs a name of letters, digits, '.', '_', '-' (pack: my-pack), got {self.pack!r}",
            )
        if not NAME.match(self.family):
            raise BadField(
                "family", f"expected a family name such as harmful, injection or benign, got {self.family!r}"
            )
        if self.success and self.success not in SUCCESS[self.kind]:
            raise BadField("success", success_message(self.kind, self.success))

    @property
    def default_success(self) -> str:
        return self.success or SUCCESS[self.kind][0]


@dataclass(frozen=True, kw_only=True)
class ProbeEntry:
    """One probe's keys; `id` may be written as a number."""

    id: Any
    prompt: Text
    category: Text | None = None
    document: Text | None = None
    system: Text | None = None
    canary: str | None = None
    success: Annotated[str, nonempty] = ""  # "": the pack's
    note: Any = None  # free text for pack authors, ignored
    where: Where = where_field()


@dataclass(frozen=True, kw_only=True)
class PackFile(PackHeader):
    """A YAML probe pack."""

    probes: Annotated[list[ProbeEntry], nonempty] = field(metadata={"noun": "probe"})


@dataclass(frozen=True, kw_only=True)
class JsonlProbe(ProbeEntry, PackHeader):
    """One line of a JSONL pack: the pack-level keys next to the probe's."""


def _transform_text(text: str) -> None:
    if not text.strip():
        raise BadValue(f"expected non-empty text, got {text!r}")


def _has_request(text: str) -> None:
    if "{request}" not in text:
        raise BadValue("template has no {request} slot; write {request} where the request goes")


_NULL_IS_EMPTY = {"null": "default", "noun": "text"}


@dataclass(frozen=True, kw_only=True)
class TransformsFile:
    """Named adversarial suffixes and templates (each template has a {request} slot)."""

    suffixes: dict[str, Annotated[str, _transform_text]] = field(
        default_factory=dict, metadata=_NULL_IS_EMPTY
    )
    templates: dict[str, Annotated[str, _transform_text, _has_request]] = field(
        default_factory=dict, metadata=_NULL_IS_EMPTY
    )
    where: Where = where_field()

    def __post_init__(self) -> None:
        for section in ("suffixes", "templates"):
            for name in getattr(self, section):
                if not NAME.match(name):
                    raise BadField(section, "a name is letters, digits, '.', '_', '-'; rename it", sub=name)
