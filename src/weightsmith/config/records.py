"""Records: the files users write (policies, probe packs, lexicons, task files) as dataclasses.

`load_record(cls, data, source=...)` checks parsed YAML (or JSON) data against a record class
and builds it, nested records, lists and mappings of records and tagged unions included. Every
mistake is one error line, ``file:line: key: problem (did you mean ...)``, where `key` is the
path from the top of the file (``input[0].keywords[1]``, ``refusals.default``) and `line` the
line of that key or list item (`LineLoader` records both).

Rules for record classes (see also weightsmith.config.fields' docstring):

* Values keep their YAML type (`coerce(..., strict=True)`): a string field refuses ``1.10``
  ("quote it"), an int field refuses ``"16"`` and ``16.5``, a bool field refuses ``"yes"``.
* ``Annotated[X, check, ...]``: each callable `check(value)` runs on the coerced value and may
  raise `BadValue`; e.g. ``Text = Annotated[str, nonempty]``.
* A field without a default is required ("required but missing"). A field with
  ``metadata={"null": "default"}`` takes its default when the file gives null (``input:``
  with every item commented out); ``{"null": "refuse"}`` refuses null for an ``X | None``
  field whose None means "not given"; otherwise null is a value, refused unless ``X | None``.
* Lists, tuples (``tuple[X, ...]``) and ``dict[str, X]`` are loaded item by item, so an error
  names the item (``keywords[1]``, ``refusals.default``) and its line. Metadata ``noun``
  ("rule") words messages about a field's items; ``any_keys`` lets a mapping's YAML keys be
  numbers too (read as their text, ``1:`` -> ``"1"``).
* Tagged unions: a field annotated ``A | B | C`` (or ``list[A | B | C]``), where every member
  is a record with a ``type: Literal["a"]`` field, picks the member named by the item's
  ``type:`` key (metadata ``tag`` names another key). An unknown type gets a did-you-mean; a
  key of another member is "not a key of a b rule (it belongs to type: a)".
* A record's ``__post_init__`` checks its own fields together and raises ``BadField(key,
  message, sub=None)``: the error names that key (``sub``: a list index or mapping key
  inside it) and its line. Cross-references between records (an unknown category, duplicate
  ids) are not checked here: each format's ``check()`` step does that after loading, using
  the records' `Where`.
* A field ``where: Where = where_field()`` receives the record's source, line, key path and
  the lines of its keys and items, for the format's own messages (`Where.error`).
* A class attribute ``key_notes: ClassVar[dict[str, str]]`` gives the message for keys a
  record deliberately lacks.

Not here: reading YAML (`weightsmith.config.yaml_files`), the command-line configs' mapping
loader (`weightsmith.config.build`, whose messages keep their own shape).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

from weightsmith.config.fields import BadValue, coerce, describe, did_you_mean, show_value
from weightsmith.errors import ConfigError

R = TypeVar("R")

__all__ = [
    "BadField",
    "Where",
    "load_record",
    "nonempty",
    "tagged_variants",
    "where_field",
]


class BadField(BadValue):
    """A record's own check failed on `key` (and `sub`, an index or key inside it)."""

    def __init__(self, key: str, message: str, sub: int | str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.sub = sub


@dataclass(frozen=True)
class Where:
    """Where a record came from: file, line, key path, and the lines of its keys and items."""

    source: str = "<data>"
    line: int = 0
    label: str = ""
    key_lines: dict[str, int] = field(default_factory=dict)
    sub_lines: dict[str, dict[Any, int]] = field(default_factory=dict)  # key -> index/key -> line
    error_type: type[Exception] = ConfigError
    given: frozenset[str] = frozenset()  # the keys the file gave (a default may differ from null)

    def at(self, key: str | None = None, sub: int | str | None = None) -> tuple[int, str]:
        """(line, label) of `key` (and `sub` inside it) in this record."""
        if key is None:
            return self.line, self.label
        first = key.split(".")[0].split("[")[0]
        line = self.key_lines.get(first, self.line)
        label = _join(self.label, key)
        if sub is not None:
            line = self.sub_lines.get(first, {}).get(sub, line)
            label = f"{label}[{sub}]" if isinstance(sub, int) else f"{label}.{sub}"
        return line, label

    def error(self, key: str | None, message: str, sub: int | str | None = None) -> Exception:
        line, label = self.at(key, sub)
        return self.error_type(_message(self.source, line, label, message))


def where_field() -> Any:
    """The field that receives a record's `Where` (not a key of the file)."""
    return field(default_factory=Where, compare=False, repr=False, metadata={"where": True})


def nonempty(value: Any) -> None:
    """A check for ``Annotated[str, nonempty]`` or ``Annotated[list[X], nonempty]``."""
    if isinstance(value, str) and not value.strip():
        raise BadValue(f"expected a non-empty string, got {value!r}")
    if isinstance(value, (list, tuple, dict)) and not value:
        raise BadValue("expected a non-empty list" if not isinstance(value, dict) else "expected entries")


def _join(label: str, key: Any) -> str:
    return f"{label}.{key}" if label else str(key)


def _message(source: str, line: int | None, label: str, message: str) -> str:
    where = f"{source}:{line}: " if line else f"{source}: "
    return f"{where}{label}: {message}" if label else f"{where}{message}"


@dataclass(frozen=True)
class _Ctx:
    source: str
    error: type[Exception]

    def fail(self, line: int | None, label: str, message: str) -> Exception:
        return self.error(_message(self.source, line, label, message))


def load_record(
    cls: type[R],
    data: Any,
    *,
    source: str,
    error: type[Exception] = ConfigError,
    line: int = 1,
    label: str = "",
) -> R:
    """A `cls` record from parsed data; `error` (ConfigError) naming FILE:LINE and key if bad."""
    return _record(cls, data, label, line, _Ctx(source, error))


# ---------------------------------------------------------------------------
# types


@functools.cache  # resolving annotations costs more than loading a record: once per class
def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls, include_extras=True)
    except NameError as exc:
        raise TypeError(f"cannot resolve the annotations of {cls.__qualname__}: {exc}") from exc


def _is_record(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def tagged_variants(tp: Any, tag: str = "type") -> dict[str, type] | None:
    """``A | B | C`` of records, each with a ``tag: Literal[...]`` field -> {tag value: class}."""
    if get_origin(tp) not in (typing.Union, types.UnionType):
        return None
    members = [a for a in get_args(tp) if a is not type(None)]
    if len(members) < 2 or not all(_is_record(m) for m in members):
        return None
    out: dict[str, type] = {}
    for member in members:
        literal = _hints(member).get(tag)
        if get_origin(literal) is not Literal:
            raise TypeError(f"{member.__qualname__}: a tagged-union member needs a field {tag}: Literal[...]")
        for value in get_args(literal):
            if value in out:
                raise TypeError(f"{tp!r}: {tag} {value!r} names two members")
            out[value] = member
    return out


def _optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = get_args(tp)
        rest = tuple(a for a in args if a is not type(None))
        if len(rest) < len(args):
            return (rest[0] if len(rest) == 1 else typing.Union[rest]), True  # noqa: UP007
    return tp, False


def _describe(tp: Any, noun: str) -> str:
    if _is_record(tp) or tagged_variants(tp) is not None:
        return f"a mapping ({noun})" if noun else "a mapping"
    try:
        return describe(tp)
    except TypeError:
        return "a list" if get_origin(tp) in (list, tuple) else "a value"


# ---------------------------------------------------------------------------
# loading


def _value(tp: Any, value: Any, label: str, line: int | None, ctx: _Ctx, meta: dict) -> Any:
    """`value` as a `tp`, for the key at `label`, `line`."""
    checks: list[Callable[[Any], None]] = []
    if get_origin(tp) is Annotated:
        tp, *extras = get_args(tp)
        checks = [c for c in extras if callable(c)]
    inner, optional = _optional(tp)
    if value is None and optional:
        return None
    if get_origin(inner) is Annotated:  # Annotated[str, check] | None
        return _value(inner, value, label, line, ctx, meta)
    out = _typed(inner, value, label, line, ctx, meta)
    for check in checks:
        try:
            check(out)
        except BadValue as exc:
            raise ctx.fail(line, label, str(exc)) from None
    return out


def _typed(tp: Any, value: Any, label: str, line: int | None, ctx: _Ctx, meta: dict) -> Any:
    if tp is Any:  # checked by the record's __post_init__
        return value
    noun = meta.get("noun", "")
    variants = tagged_variants(tp, meta.get("tag", "type"))
    if variants is not None:
        return _tagged(variants, value, label, line, ctx, meta)
    if _is_record(tp):
        return _record(tp, value, label, line, ctx)
    origin = get_origin(tp)
    if origin in (list, tuple) and _loaded_item_by_item(tp):
        item_tp = get_args(tp)[0]
        if not isinstance(value, list):
            what = f"a list of {noun}s" if noun else _describe(tp, noun)
            raise ctx.fail(line, label, f"expected {what}, got {show_value(value)}")
        lines = getattr(value, "item_lines", None) or [line] * len(value)
        items = [_value(item_tp, item, f"{label}[{i}]", lines[i], ctx, meta) for i, item in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict and _loaded_item_by_item(tp):
        if not isinstance(value, dict):
            what = f"names to {noun}s" if noun else "names to values"
            raise ctx.fail(line, label, f"expected a mapping of {what}, got {show_value(value)}")
        key_lines = getattr(value, "key_lines", {})
        out = {}
        for k, v in value.items():
            at = key_lines.get(k, line)
            if not isinstance(k, str) and not meta.get("any_keys"):
                raise ctx.fail(at, _join(label, k), f"a name must be a string, got {show_value(k)}")
            out[str(k)] = _value(get_args(tp)[1], v, _join(label, k), at, ctx, meta)
        return out
    try:
        return coerce(tp, value, strict=True)
    except BadValue as exc:
        raise ctx.fail(line, label, str(exc)) from None


def _loaded_item_by_item(tp: Any) -> bool:
    """Whether a list/tuple/dict annotation is loaded item by item (each with its label and line)."""
    args = get_args(tp)
    if get_origin(tp) is dict:
        return len(args) == 2
    if get_origin(tp) is tuple:
        return len(args) == 2 and args[1] is Ellipsis
    return get_origin(tp) is list and len(args) == 1


def _tagged(
    variants: dict[str, type], value: Any, label: str, line: int | None, ctx: _Ctx, meta: dict
) -> Any:
    tag, noun = meta.get("tag", "type"), meta.get("noun", "entry")
    if not isinstance(value, dict):
        raise ctx.fail(line, label, f"expected a {noun} mapping ({tag}: ..., ...), got {show_value(value)}")
    names = list(variants)
    key_lines = getattr(value, "key_lines", {})
    if tag not in value:
        raise ctx.fail(line, _join(label, tag), f"required but missing; one of {', '.join(names)}")
    kind = value[tag]
    if not isinstance(kind, str) or kind not in variants:
        hint = did_you_mean(kind, names) or f" (one of {', '.join(names)})"
        raise ctx.fail(
            key_lines.get(tag, line), _join(label, tag), f"unknown {noun} {tag} {show_value(kind)}{hint}"
        )
    owners: dict[str, str] = {}
    for other, cls in variants.items():
        for f in dataclasses.fields(cls):
            if f.init and not f.metadata.get("where"):
                owners.setdefault(f.name, other)
    notes = {k: f"not a key of a {kind} {noun} (it belongs to {tag}: {owner})" for k, owner in owners.items()}
    return _record(variants[kind], value, label, line, ctx, notes)


def _record(
    cls: type[R], data: Any, label: str, line: int | None, ctx: _Ctx, notes: dict[str, str] | None = None
) -> R:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.metadata.get("where")}
    if not isinstance(data, dict):
        keys = ", ".join(f"{k}:" for k in list(fields)[:3])
        raise ctx.fail(line, label, f"expected a mapping ({keys} ...), got {show_value(data)}")
    key_lines: dict[str, int] = dict(getattr(data, "key_lines", {}))
    class_notes = getattr(cls, "key_notes", {})
    for key in data:
        if key not in fields:
            at = key_lines.get(key, line)
            note = class_notes.get(key) or (notes or {}).get(key)
            hint = did_you_mean(key, list(fields)) or f" (valid keys: {', '.join(fields)})"
            raise ctx.fail(at, _join(label, key), note or f"unknown key{hint}")
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ctx.fail(line, _join(label, name), "required but missing")
            continue
        at = key_lines.get(name, line)
        if data[name] is None and f.metadata.get("null") == "default":
            continue
        if data[name] is None and f.metadata.get("null") == "refuse":
            raise ctx.fail(at, _join(label, name), "expected a value, got null (leave the key out instead)")
        kwargs[name] = _value(hints[name], data[name], _join(label, name), at, ctx, dict(f.metadata))
    given = frozenset(str(k) for k in data)
    where = Where(ctx.source, line or 0, label, key_lines, _sub_lines(data), ctx.error, given)
    kwargs.update({f.name: where for f in dataclasses.fields(cls) if f.metadata.get("where")})
    try:
        return cls(**kwargs)
    except BadField as exc:
        raise where.error(exc.key, str(exc), exc.sub) from None
    except (BadValue, ValueError) as exc:
        raise ctx.fail(line, label, str(exc)) from None


def _sub_lines(data: dict) -> dict[str, dict[Any, int]]:
    out: dict[str, dict[Any, int]] = {}
    for key, value in data.items():
        if isinstance(value, list) and getattr(value, "item_lines", None):
            out[str(key)] = dict(enumerate(value.item_lines))
        elif isinstance(value, dict) and getattr(value, "key_lines", None):
            out[str(key)] = dict(value.key_lines)
    return out
