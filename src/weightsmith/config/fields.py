"""Config fields: how a config dataclass declares its fields, and how values are checked.

Every command, and every file format users write, is one dataclass. `opt`
declares a field with its help text; the functions here read a class's fields
and coerce a raw value (YAML data, or a flag's text) into a field's type,
raising `BadValue` with what was expected.

Not here: argparse (``weightsmith.cli.args``), building a whole config from a
mapping (`weightsmith.config.build`), reading YAML files
(`weightsmith.config.yaml_files`), files users write (`weightsmith.config.records`).

Files users write (records)
---------------------------
Policies, probe packs, lexicons and task files are dataclasses too ("records"),
loaded by `weightsmith.config.records.load_record` rather than the flag
machinery. A record may use what a command config may not: ``list[Rec]``,
``tuple[Rec, ...]`` and ``dict[str, Rec]`` of records; ``Annotated[X, check]``
(a callable raising `BadValue`); ``Any`` (checked in ``__post_init__``); and a
tagged union ``A | B | C`` of records that each declare ``type: Literal[...]``:
the item's ``type:`` key picks the member (field metadata ``tag`` names another
key, ``noun`` words the messages: "unknown rule type 'regexp' (did you mean
'regex'?)", "not a key of a keywords rule (it belongs to type: regex)").
Values keep their YAML type (``coerce(..., strict=True)``), and every error is
``file:line: key: problem (did you mean ...)`` with the line of the key or list
item; see that module's docstring for the rest.

Field conventions
-----------------
* Help text lives in the field metadata: ``field(default=1, metadata={"help":
  "..."})``, or shorter ``opt(1, "...")``. `opt` also takes ``short="-n"``
  (an extra flag name), ``positional=True`` (a positional argument; optional
  when the field has a default), ``choices=[...]`` (allowed values for any
  scalar or list item), ``split=False`` (list items may hold commas, e.g.
  stop strings: only repeated flags add items), ``metavar`` and
  ``default_factory``. A mutable default (list, dict, dataclass instance)
  given to `opt` becomes a factory.
* A top-level field ``max_tokens`` is the flag ``--max-tokens``; the
  underscore spelling ``--max_tokens`` is accepted but not shown in --help.
  Abbreviated flags are turned off on parsers this module adds to: with
  aliases they are ambiguous, and they change meaning when fields are added.
* A field whose type is a dataclass is a group: ``train: TrainConfig`` gives
  ``--train.lr`` and ``--train.warmup-steps``, listed in --help under a group
  titled by the first line of ``TrainConfig``'s docstring. The group's defaults
  come from the field's default instance when it has one. In YAML the group is
  a nested mapping (``train: {lr: 1.0e-4}``). Groups cannot be ``X | None``
  (use a Literal switch instead) and cannot hold positionals.
* A group declared with ``opt(default_factory=Grants, flatten=True)`` is a
  flattened group: its fields keep their own names at the level of the field
  that holds it (``--classifier-endpoint``, YAML ``classifier_endpoint:``, no
  group title), in its place in --help, while Python reads them through the
  group (``cfg.grants.classifier_endpoint``). A library declares the settings it
  takes once, as such a record, and each command embeds it; its names must not
  repeat a name of the command's other fields.
* Types (annotations are resolved with `typing.get_type_hints`, so
  ``from __future__ import annotations`` works for module-level classes):
  ``str``, ``int``, ``float``, ``Path``, ``bool`` (``--flag`` / ``--no-flag``;
  in a group ``--train.packing`` / ``--train.no-packing``), ``Literal[...]``
  and ``Enum`` (choices; an Enum is given by value or name), ``X | None``
  (``none`` or ``null`` sets None, except for ``str | None`` where it is
  text), ``list[X]`` and ``tuple[X, ...]`` / ``tuple[X, Y]`` (comma-separated
  and/or repeated flags; a flag replaces the file's whole list) and
  ``dict[str, X]`` (repeated ``--env KEY=VALUE``; flags replace the file's
  whole mapping). Other unions and nested containers raise TypeError when the
  parser is built, since that is a bug in the config class, not user input.
* YAML keys use underscores (dashes are accepted). PyYAML reads ``1e-4`` as a
  string, so values are coerced per field type: a float field takes
  ``"1e-4"``, an int field takes ``1e3``. A string field takes only a string,
  so a YAML ``1.10`` is an error instead of silently becoming ``"1.1"``.
* Every bad flag, value or key raises `UsageError` (exit status 2) with one
  line naming the flag or ``file:line`` and key, and how to fix it. A
  ValueError or WeightsmithError from a config's ``__post_init__`` becomes a
  `UsageError` with the same message. argparse's own errors (an unknown flag,
  a missing flag value) stay argparse's: usage on stderr, exit status 2.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import enum
import functools
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePath
from typing import Any, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")
Key = tuple[str, ...]  # a field's path from the root config: ("train", "lr")

NONE_WORDS = frozenset({"none", "null"})
_TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
_FALSE_WORDS = frozenset({"false", "no", "off", "0"})
_SCALAR_WORDS: dict[Any, str] = {
    int: "an integer",
    float: "a number",
    str: "a string",
    Path: "a path",
    bool: "true or false",
}


# ---------------------------------------------------------------------------
# Declaring fields


def opt(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    short: str | None = None,
    positional: bool = False,
    choices: Sequence[Any] | None = None,
    default_factory: Any = None,
    metavar: str | None = None,
    split: bool = True,
    flatten: bool = False,
) -> Any:
    """A `dataclasses.field` carrying CLI metadata; see the module docstring.

    Typed as Any (like `dataclasses.field`) so ``lr: float = opt(1e-3, "...")``
    type-checks. Without a default or factory the field is required.
    """
    if short is not None and (not short.startswith("-") or short.startswith("--")):
        raise TypeError(f"short={short!r}: expected one dash and a letter, e.g. '-n'")
    metadata: dict[str, Any] = {"help": help}
    extras = {"short": short, "positional": positional or None, "metavar": metavar}
    metadata.update({k: v for k, v in extras.items() if v is not None})
    if not split:
        metadata["split"] = False
    if flatten:
        metadata["flatten"] = True
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if default_factory is not None:
        if default is not dataclasses.MISSING:
            raise TypeError("opt(): give either default or default_factory, not both")
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    if default is not dataclasses.MISSING and type(default).__hash__ is None:
        # dataclasses refuses mutable defaults; give each instance its own copy.
        factory = functools.partial(copy.deepcopy, default)
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# ---------------------------------------------------------------------------
# Reading the config classes


def init_fields(cls: Any) -> list[tuple[dataclasses.Field, Any]]:
    """The fields ``cls(...)`` takes, each with its resolved annotation."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} is not a dataclass type")
    try:
        hints = typing.get_type_hints(cls)
    except NameError as exc:
        raise TypeError(
            f"cannot resolve the annotations of {cls.__qualname__}: {exc}; define config classes at module level"
        ) from exc
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def split_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); ``X`` -> (X, False)."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = get_args(tp)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return rest[0], True
        raise TypeError(f"unsupported annotation {tp!r}: the only union allowed is 'X | None'")
    return tp, False


def nested_class(tp: Any) -> type | None:
    """The dataclass a group field holds, or None for a plain value field."""
    inner, optional = split_optional(tp)
    if not (isinstance(inner, type) and dataclasses.is_dataclass(inner)):
        return None
    if optional:
        raise TypeError(f"{tp!r}: a nested config cannot be optional; use a Literal switch field instead")
    return inner


def is_flattened(f: dataclasses.Field) -> bool:
    """Whether a group field's own fields sit at its parent's level (``opt(flatten=True)``)."""
    return bool(f.metadata.get("flatten"))


def group_prefix(prefix: Key, f: dataclasses.Field) -> Key:
    """The path prefix of a group field's fields: its own name added, unless it is flattened."""
    return prefix if is_flattened(f) else prefix + (f.name,)


def visible_fields(cls: Any) -> dict[str, tuple[dataclasses.Field, Any]]:
    """Name -> (field, annotation) of the keys and flags `cls` shows at its own level: its
    fields, with each flattened group replaced by that group's visible fields."""
    out: dict[str, tuple[dataclasses.Field, Any]] = {}
    for f, tp in init_fields(cls):
        sub = nested_class(tp)
        if is_flattened(f) and sub is None:
            raise TypeError(f"{cls.__qualname__}.{f.name}: only a dataclass field can be flattened")
        inner = visible_fields(sub) if sub is not None and is_flattened(f) else {f.name: (f, tp)}
        for name, item in inner.items():
            if name in out:
                raise TypeError(
                    f"{cls.__qualname__}: the name {name!r} is used twice (a flattened group's fields "
                    "share their parent's names); rename one"
                )
            out[name] = item
    return out


def choices_of(tp: Any) -> tuple[Any, ...] | None:
    if get_origin(tp) is Literal:
        return get_args(tp)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tuple(tp)
    return None


def choice_name(choice: Any) -> str:
    return str(choice.value if isinstance(choice, enum.Enum) else choice)


def item_types(tp: Any) -> tuple[Any, ...] | None:
    """Item annotations of a list/tuple type (one for variable length), else None."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is list and len(args) == 1:
        return args
    if origin is tuple and args:
        return args[:1] if len(args) == 2 and args[1] is Ellipsis else args
    return None


def is_fixed_tuple(tp: Any) -> bool:
    args = get_args(tp)
    return get_origin(tp) is tuple and not (len(args) == 2 and args[1] is Ellipsis)


def describe_scalar(tp: Any) -> str:
    inner, optional = split_optional(tp)
    choices = choices_of(inner)
    if choices is not None:
        text = "one of " + ", ".join(choice_name(c) for c in choices)
    elif inner in _SCALAR_WORDS:
        text = _SCALAR_WORDS[inner]
    else:
        raise TypeError(
            f"unsupported annotation {tp!r} (supported: str, int, float, bool, Path, Literal, Enum)"
        )
    return f"{text} or none" if optional and inner is not str else text


def describe(tp: Any) -> str:
    """What a value of `tp` looks like, for messages; TypeError if unsupported."""
    inner, optional = split_optional(tp)
    items = item_types(inner)
    if items is not None:
        for item in items:
            describe_scalar(item)
        text = f"a list of {len(items)} values" if is_fixed_tuple(inner) else "a list"
    elif get_origin(inner) is dict:
        key, value = get_args(inner) or (None, None)
        if key is not str:
            raise TypeError(f"unsupported annotation {tp!r}: mapping keys must be str")
        text = f"a mapping of names to {describe_scalar(value)}"
    else:
        return describe_scalar(tp)
    return f"{text} or none" if optional else text


def is_repeatable(tp: Any) -> bool:
    inner, _ = split_optional(tp)
    return item_types(inner) is not None or get_origin(inner) is dict


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def leaves(cls: type, prefix: Key = ()) -> Iterator[tuple[Key, dataclasses.Field, Any]]:
    """(path, field, annotation) of every value field, groups flattened."""
    for f, tp in init_fields(cls):
        sub = nested_class(tp)
        if sub is not None:
            yield from leaves(sub, group_prefix(prefix, f))
        else:
            yield prefix + (f.name,), f, tp


# ---------------------------------------------------------------------------
# Values: checking and coercing


class BadValue(Exception):
    """A value that does not fit its field; the caller says which field and where."""


def show_value(value: Any) -> str:
    """A value as the user wrote it (YAML spelling for null and booleans)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value.value if isinstance(value, enum.Enum) else value)
    return text if len(text) <= 60 else text[:57] + "..."


def did_you_mean(word: Any, options: Sequence[str], cutoff: float = 0.6) -> str:
    """`` (did you mean 'x'?)`` for the closest of `options`, or "" when none is close.

    The one did-you-mean of the project: every config, file format and name lookup uses it."""
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""


def split_commas(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def coerce(tp: Any, value: Any, *, strict: bool = False) -> Any:
    """`value` (from YAML, or a string from the command line) as a `tp`.

    `strict` (files users write, `weightsmith.config.records`): a value must already have
    its YAML type: no "none" words, no numbers or booleans written as text, no 16.0 for 16."""
    inner, optional = split_optional(tp)
    is_none_word = not strict and isinstance(value, str) and value.strip().lower() in NONE_WORDS
    if value is None or (optional and inner is not str and is_none_word):
        if optional:
            return None
        raise BadValue(f"expected {describe(inner)}, got null")
    if item_types(inner) is not None:
        return _coerce_sequence(inner, value, strict)
    if get_origin(inner) is dict:
        return _coerce_mapping(inner, value, strict)
    return _coerce_scalar(inner, value, strict)


def _coerce_sequence(tp: Any, value: Any, strict: bool = False) -> list[Any] | tuple[Any, ...]:
    if isinstance(value, str) and not strict:
        value = split_commas(value)
    elif not isinstance(value, (list, tuple)):
        raise BadValue(f"expected {describe(tp)}, got {show_value(value)}")
    kinds = item_types(tp) or ()
    if is_fixed_tuple(tp):
        if len(value) != len(kinds):
            raise BadValue(
                f"expected {len(kinds)} comma-separated values, got {len(value)}: {show_value(value)}"
            )
    else:
        kinds = kinds * len(value)
    items = []
    for i, (item_tp, item) in enumerate(zip(kinds, value, strict=True), start=1):
        try:
            items.append(coerce(item_tp, item, strict=strict))
        except BadValue as exc:
            raise BadValue(f"item {i}: {exc}") from None
    return items if get_origin(tp) is list else tuple(items)


def _coerce_mapping(tp: Any, value: Any, strict: bool = False) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadValue(f"expected {describe(tp)}, got {show_value(value)}")
    _, value_tp = get_args(tp)
    out = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise BadValue(f"mapping keys must be strings, got {show_value(key)}")
        try:
            out[key] = coerce(value_tp, item, strict=strict)
        except BadValue as exc:
            raise BadValue(f"key {key!r}: {exc}") from None
    return out


def _coerce_scalar(tp: Any, value: Any, strict: bool = False) -> Any:
    choices = choices_of(tp)
    if choices is not None:
        return _pick_choice(choices, value)
    expected = f"expected {describe_scalar(tp)}, got {show_value(value)}"
    if strict:
        return _coerce_strict(tp, value, expected)
    if isinstance(value, str) and tp in (int, float, bool):
        return _parse_text(tp, value.strip(), expected)
    if tp is bool and isinstance(value, bool):
        return value
    if tp in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        if tp is float:
            return float(value)
        if isinstance(value, int) or value.is_integer():
            return int(value)
    if tp is str and isinstance(value, str):
        return value
    if tp is Path and isinstance(value, (str, PurePath)):
        return Path(value)
    if tp in (str, Path) and isinstance(value, (int, float, bool)):
        raise BadValue(f"{expected} (in YAML, put the value in quotes)")
    raise BadValue(expected)


def _coerce_strict(tp: Any, value: Any, expected: str) -> Any:
    """A scalar of a file users write: it must already have its YAML type."""
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, str):
        return value
    if tp is Path and isinstance(value, str):
        return Path(value)
    if tp in (str, Path) and isinstance(value, (int, float, bool)):
        raise BadValue(f"{expected} (in YAML, quote it)")
    raise BadValue(expected)


def _parse_text(tp: Any, text: str, expected: str) -> Any:
    """An int, float or bool written as text (a flag value, or YAML's "1e-4")."""
    if tp is bool:
        if text.lower() in _TRUE_WORDS | _FALSE_WORDS:
            return text.lower() in _TRUE_WORDS
        raise BadValue(expected)
    with contextlib.suppress(ValueError):
        return int(text) if tp is int else float(text)
    if tp is int:  # "1e3" is fine for an int field when it is a whole number
        with contextlib.suppress(ValueError):
            number = float(text)
            if number.is_integer():
                return int(number)
    raise BadValue(expected)


def _pick_choice(choices: tuple[Any, ...], value: Any) -> Any:
    for choice in choices:
        raw = choice.value if isinstance(choice, enum.Enum) else choice
        if value is choice or (type(value) is type(raw) and value == raw):
            return choice
        if isinstance(value, str) and (value == str(raw) or getattr(choice, "name", None) == value):
            return choice
    names = [choice_name(c) for c in choices]
    raise BadValue(f"expected one of {', '.join(names)}, got {show_value(value)}{did_you_mean(value, names)}")


def check_choices(f: dataclasses.Field, value: Any) -> Any:
    """Apply ``opt(choices=...)`` to a value, or to each item of a list."""
    allowed = f.metadata.get("choices")
    if allowed is None or value is None:
        return value
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if item not in allowed:
            names = [choice_name(c) for c in allowed]
            raise BadValue(
                f"expected one of {', '.join(names)}, got {show_value(item)}{did_you_mean(item, names)}"
            )
    return value


def splits(f: dataclasses.Field) -> bool:
    """Whether a list field's text is split at commas (``opt(split=False)`` says no)."""
    return f.metadata.get("split", True)


def flag_name(path: Key, dashes: bool = True, negate: bool = False) -> str:
    parts = [p.replace("_", "-") if dashes else p for p in path]
    if negate:
        parts[-1] = ("no-" if dashes else "no_") + parts[-1]
    return "--" + ".".join(parts)


def field_label(path: Key, f: dataclasses.Field) -> str:
    """How messages name a field given on the command line."""
    if f.metadata.get("positional"):
        return f.metadata.get("metavar") or path[-1].upper()
    return flag_name(path)
