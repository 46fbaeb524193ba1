"""Typed dataclass configs <-> argparse flags <-> YAML files.

Every command has one config dataclass. This module turns such a class into
command-line flags, reads a YAML config file for it, merges the two with the
dataclass defaults (defaults < ``--config FILE`` < flags given on the command
line), checks every value against its annotation, and writes a config back to
YAML so that it loads into an equal config.

What it does not do: build subcommands (the CLI makes one subparser per
command and calls `add_config_arguments` on it), print anything, expand or
resolve paths (``~`` stays ``~``; commands resolve paths), read environment
variables, or pick code from strings (a config chooses code from a plain dict
in the command's module).

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

import argparse
import contextlib
import copy
import dataclasses
import difflib
import enum
import functools
import os
import types
import typing
from collections.abc import Hashable, Iterator, Sequence
from pathlib import Path, PurePath
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from weightsmith.errors import UsageError, WeightsmithError
from weightsmith.files import write_text_atomic

__all__ = [
    "add_config_arguments",
    "config_from_args",
    "config_from_dict",
    "config_to_dict",
    "dump_config_yaml",
    "load_config_yaml",
    "opt",
    "parse_config",
]

T = TypeVar("T")
Key = tuple[str, ...]  # a field's path from the root config: ("train", "lr")

# argparse dests owned by this module; ":" keeps them apart from the CLI's own
# namespace keys ("command", "debug") and from each other (field names are identifiers).
_DEST_PREFIX = "cfg:"
_FILE_DEST = "cfg::file"
_NONE_WORDS = frozenset({"none", "null"})
_TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
_FALSE_WORDS = frozenset({"false", "no", "off", "0"})
_SCALAR_WORDS: dict[Any, str] = {
    int: "an integer",
    float: "a number",
    str: "a string",
    Path: "a path",
    bool: "true or false",
}
_SCALAR_METAVARS: dict[Any, str] = {int: "INT", float: "FLOAT", str: "TEXT", Path: "PATH", bool: "BOOL"}


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


def _init_fields(cls: Any) -> list[tuple[dataclasses.Field, Any]]:
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


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); ``X`` -> (X, False)."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = get_args(tp)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return rest[0], True
        raise TypeError(f"unsupported annotation {tp!r}: the only union allowed is 'X | None'")
    return tp, False


def _nested_class(tp: Any) -> type | None:
    """The dataclass a group field holds, or None for a plain value field."""
    inner, optional = _split_optional(tp)
    if not (isinstance(inner, type) and dataclasses.is_dataclass(inner)):
        return None
    if optional:
        raise TypeError(f"{tp!r}: a nested config cannot be optional; use a Literal switch field instead")
    return inner


def _choices_of(tp: Any) -> tuple[Any, ...] | None:
    if get_origin(tp) is Literal:
        return get_args(tp)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tuple(tp)
    return None


def _choice_name(choice: Any) -> str:
    return str(choice.value if isinstance(choice, enum.Enum) else choice)


def _item_types(tp: Any) -> tuple[Any, ...] | None:
    """Item annotations of a list/tuple type (one for variable length), else None."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is list and len(args) == 1:
        return args
    if origin is tuple and args:
        return args[:1] if len(args) == 2 and args[1] is Ellipsis else args
    return None


def _is_fixed_tuple(tp: Any) -> bool:
    args = get_args(tp)
    return get_origin(tp) is tuple and not (len(args) == 2 and args[1] is Ellipsis)


def _describe_scalar(tp: Any) -> str:
    inner, optional = _split_optional(tp)
    choices = _choices_of(inner)
    if choices is not None:
        text = "one of " + ", ".join(_choice_name(c) for c in choices)
    elif inner in _SCALAR_WORDS:
        text = _SCALAR_WORDS[inner]
    else:
        raise TypeError(
            f"unsupported annotation {tp!r} (supported: str, int, float, bool, Path, Literal, Enum)"
        )
    return f"{text} or none" if optional and inner is not str else text


def _describe(tp: Any) -> str:
    """What a value of `tp` looks like, for messages; TypeError if unsupported."""
    inner, optional = _split_optional(tp)
    items = _item_types(inner)
    if items is not None:
        for item in items:
            _describe_scalar(item)
        text = f"a list of {len(items)} values" if _is_fixed_tuple(inner) else "a list"
    elif get_origin(inner) is dict:
        key, value = get_args(inner) or (None, None)
        if key is not str:
            raise TypeError(f"unsupported annotation {tp!r}: mapping keys must be str")
        text = f"a mapping of names to {_describe_scalar(value)}"
    else:
        return _describe_scalar(tp)
    return f"{text} or none" if optional else text


def _is_repeatable(tp: Any) -> bool:
    inner, _ = _split_optional(tp)
    return _item_types(inner) is not None or get_origin(inner) is dict


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _leaves(cls: type, prefix: Key = ()) -> Iterator[tuple[Key, dataclasses.Field, Any]]:
    """(path, field, annotation) of every value field, groups flattened."""
    for f, tp in _init_fields(cls):
        sub = _nested_class(tp)
        if sub is not None:
            yield from _leaves(sub, prefix + (f.name,))
        else:
            yield prefix + (f.name,), f, tp


# ---------------------------------------------------------------------------
# Values: checking and coercing


class _BadValue(Exception):
    """A value that does not fit its field; the caller says which field and where."""


def _show(value: Any) -> str:
    """A value as the user wrote it (YAML spelling for null and booleans)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value.value if isinstance(value, enum.Enum) else value)
    return text if len(text) <= 60 else text[:57] + "..."


def _did_you_mean(word: Any, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _split_commas(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _coerce(tp: Any, value: Any) -> Any:
    """`value` (from YAML, or a string from the command line) as a `tp`."""
    inner, optional = _split_optional(tp)
    is_none_word = isinstance(value, str) and value.strip().lower() in _NONE_WORDS
    if value is None or (optional and inner is not str and is_none_word):
        if optional:
            return None
        raise _BadValue(f"expected {_describe(inner)}, got null")
    if _item_types(inner) is not None:
        return _coerce_sequence(inner, value)
    if get_origin(inner) is dict:
        return _coerce_mapping(inner, value)
    return _coerce_scalar(inner, value)


def _coerce_sequence(tp: Any, value: Any) -> list[Any] | tuple[Any, ...]:
    if isinstance(value, str):
        value = _split_commas(value)
    elif not isinstance(value, (list, tuple)):
        raise _BadValue(f"expected {_describe(tp)}, got {_show(value)}")
    item_types = _item_types(tp) or ()
    if _is_fixed_tuple(tp):
        if len(value) != len(item_types):
            raise _BadValue(
                f"expected {len(item_types)} comma-separated values, got {len(value)}: {_show(value)}"
            )
    else:
        item_types = item_types * len(value)
    items = []
    for i, (item_tp, item) in enumerate(zip(item_types, value, strict=True), start=1):
        try:
            items.append(_coerce(item_tp, item))
        except _BadValue as exc:
            raise _BadValue(f"item {i}: {exc}") from None
    return items if get_origin(tp) is list else tuple(items)


def _coerce_mapping(tp: Any, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _BadValue(f"expected {_describe(tp)}, got {_show(value)}")
    _, value_tp = get_args(tp)
    out = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise _BadValue(f"mapping keys must be strings, got {_show(key)}")
        try:
            out[key] = _coerce(value_tp, item)
        except _BadValue as exc:
            raise _BadValue(f"key {key!r}: {exc}") from None
    return out


def _coerce_scalar(tp: Any, value: Any) -> Any:
    choices = _choices_of(tp)
    if choices is not None:
        return _pick_choice(choices, value)
    expected = f"expected {_describe_scalar(tp)}, got {_show(value)}"
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
        raise _BadValue(f"{expected} (in YAML, put the value in quotes)")
    raise _BadValue(expected)


def _parse_text(tp: Any, text: str, expected: str) -> Any:
    """An int, float or bool written as text (a flag value, or YAML's "1e-4")."""
    if tp is bool:
        if text.lower() in _TRUE_WORDS | _FALSE_WORDS:
            return text.lower() in _TRUE_WORDS
        raise _BadValue(expected)
    with contextlib.suppress(ValueError):
        return int(text) if tp is int else float(text)
    if tp is int:  # "1e3" is fine for an int field when it is a whole number
        with contextlib.suppress(ValueError):
            number = float(text)
            if number.is_integer():
                return int(number)
    raise _BadValue(expected)


def _pick_choice(choices: tuple[Any, ...], value: Any) -> Any:
    for choice in choices:
        raw = choice.value if isinstance(choice, enum.Enum) else choice
        if value is choice or (type(value) is type(raw) and value == raw):
            return choice
        if isinstance(value, str) and (value == str(raw) or getattr(choice, "name", None) == value):
            return choice
    names = [_choice_name(c) for c in choices]
    raise _BadValue(f"expected one of {', '.join(names)}, got {_show(value)}{_did_you_mean(value, names)}")


def _check_choices(f: dataclasses.Field, value: Any) -> Any:
    """Apply ``opt(choices=...)`` to a value, or to each item of a list."""
    allowed = f.metadata.get("choices")
    if allowed is None or value is None:
        return value
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if item not in allowed:
            names = [_choice_name(c) for c in allowed]
            raise _BadValue(
                f"expected one of {', '.join(names)}, got {_show(item)}{_did_you_mean(item, names)}"
            )
    return value


# ---------------------------------------------------------------------------
# argparse


class _BoolAction(argparse.Action):
    """``--flag`` stores True, ``--no-flag`` stores False, in one dest."""

    def __init__(
        self, option_strings: list[str], dest: str, negatives: Sequence[str] = (), **kwargs: Any
    ) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)
        self.negatives = frozenset(negatives)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, option_string not in self.negatives)


def _flag(path: Key, dashes: bool = True, negate: bool = False) -> str:
    parts = [p.replace("_", "-") if dashes else p for p in path]
    if negate:
        parts[-1] = ("no-" if dashes else "no_") + parts[-1]
    return "--" + ".".join(parts)


def _label(path: Key, f: dataclasses.Field) -> str:
    """How messages name a field given on the command line."""
    if f.metadata.get("positional"):
        return f.metadata.get("metavar") or path[-1].upper()
    return _flag(path)


def _show_default(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_show_default(v) for v in value) or "empty"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_show_default(v)}" for k, v in value.items()) or "empty"
    if value is None or isinstance(value, bool):
        return _show(value).replace("null", "none")
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value) if value != "" else "''"


def _metavar(tp: Any, choices: Sequence[Any] | None = None) -> str:
    """The placeholder --help shows for a value (no brackets: argparse's usage wrapping trips on them)."""
    inner, _ = _split_optional(tp)
    if get_origin(inner) is dict:
        return "KEY=VALUE"
    items = _item_types(inner)
    if items is not None:
        names = [_metavar(item, choices) for item in items]
        return ",".join(names) if _is_fixed_tuple(inner) else f"{names[0]},..."
    choices = _choices_of(inner) or choices
    if choices is not None:
        return "{" + ",".join(_choice_name(c) for c in choices) + "}"
    return _SCALAR_METAVARS[inner]


def _help_text(f: dataclasses.Field, tp: Any, default: Any) -> str:
    notes = []
    inner, _ = _split_optional(tp)
    if get_origin(inner) is dict:
        notes.append("repeatable")
    elif _is_repeatable(tp) and not _is_fixed_tuple(inner) and not f.metadata.get("positional"):
        notes.append("comma-separated or repeated" if _splits(f) else "repeatable")
    notes.append("required" if default is dataclasses.MISSING else f"default: {_show_default(default)}")
    text = f"{f.metadata.get('help', '').strip()} ({'; '.join(notes)})".strip()
    return text.replace("%", "%%")  # argparse %-formats help strings


def _group_title(cls: type, path: Key) -> str:
    doc = (cls.__doc__ or "").strip()
    if not doc or doc.startswith(cls.__name__ + "("):  # the signature dataclass makes up
        return f"{'.'.join(path)} options"
    return doc.splitlines()[0].strip().rstrip(".:")  # argparse appends ":"


def _add_leaf(container: Any, path: Key, f: dataclasses.Field, tp: Any, default: Any) -> None:
    _describe(tp)  # TypeError now for an unsupported annotation, not at parse time
    dest = _DEST_PREFIX + ".".join(path)
    common = {"dest": dest, "default": argparse.SUPPRESS}
    help_text = _help_text(f, tp, default)
    inner, _ = _split_optional(tp)
    if f.metadata.get("positional"):
        if len(path) > 1 or inner is bool:
            raise TypeError(f"{'.'.join(path)}: positionals must be top-level and not bool")
        nargs = "*" if _is_repeatable(tp) else "?"
        metavar = f.metadata.get("metavar") or path[-1].upper()
        container.add_argument(dest, nargs=nargs, default=argparse.SUPPRESS, metavar=metavar, help=help_text)
        return
    short = [f.metadata["short"]] if f.metadata.get("short") else []
    hidden = _flag(path, dashes=False) != _flag(path)  # the underscore spelling
    if inner is bool:
        on, off = _flag(path), _flag(path, negate=True)
        container.add_argument(*short, on, off, action=_BoolAction, negatives=[off], help=help_text, **common)
        if hidden:
            on, off = _flag(path, dashes=False), _flag(path, dashes=False, negate=True)
            container.add_argument(
                on, off, action=_BoolAction, negatives=[off], help=argparse.SUPPRESS, **common
            )
        return
    action = "append" if _is_repeatable(tp) else "store"
    metavar = f.metadata.get("metavar") or _metavar(tp, f.metadata.get("choices"))
    container.add_argument(*short, _flag(path), action=action, metavar=metavar, help=help_text, **common)
    if hidden:
        container.add_argument(_flag(path, dashes=False), action=action, help=argparse.SUPPRESS, **common)


def _add_fields(parser: argparse.ArgumentParser, container: Any, cls: type, prefix: Key, base: Any) -> None:
    for f, tp in _init_fields(cls):
        path = prefix + (f.name,)
        default = getattr(base, f.name) if base is not None else _field_default(f)
        sub = _nested_class(tp)
        if sub is None:
            _add_leaf(container, path, f, tp, default)
            continue
        # argparse groups do not nest, so every group hangs off the parser.
        group = parser.add_argument_group(_group_title(sub, path), f.metadata.get("help") or None)
        _add_fields(parser, group, sub, path, None if default is dataclasses.MISSING else default)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add ``--config FILE`` and one argument per field of `cls` to `parser`.

    Works on a subparser. Every argument defaults to SUPPRESS, so the parsed
    namespace holds only what the user typed; `config_from_args` merges it.
    """
    _init_fields(cls)
    parser.allow_abbrev = False
    parser.add_argument(
        "--config",
        dest=_FILE_DEST,
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="YAML file with values for any of the options below (keys nest like the groups: "
        "'train: {lr: 1.0e-4}'); flags given on the command line override it",
    )
    _add_fields(parser, parser, cls, (), None)


def _splits(f: dataclasses.Field) -> bool:
    """Whether a list field's text is split at commas (``opt(split=False)`` says no)."""
    return f.metadata.get("split", True)


def _from_command_line(tp: Any, raw: Any, f: dataclasses.Field) -> Any:
    """Turn argparse's raw strings (a list for repeated flags) into one value for `_coerce`."""
    if not isinstance(raw, list):
        return raw
    inner, optional = _split_optional(tp)
    if optional and len(raw) == 1 and raw[0].strip().lower() in _NONE_WORDS:
        return None
    if get_origin(inner) is dict:
        pairs = {}
        for item in raw:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise _BadValue(f"expected KEY=VALUE, got {_show(item)}")
            pairs[key.strip()] = value
        return pairs
    if f.metadata.get("positional") or not _splits(f):
        return raw
    return [part for chunk in raw for part in _split_commas(chunk)]


def _values_from_namespace(cls: type, ns: argparse.Namespace) -> dict[Key, Any]:
    raw_values = vars(ns)
    values = {}
    for path, f, tp in _leaves(cls):
        dest = _DEST_PREFIX + ".".join(path)
        if dest not in raw_values:
            continue
        try:
            raw = _from_command_line(tp, raw_values[dest], f)
            values[path] = _check_choices(f, _coerce(tp, raw))
        except _BadValue as exc:
            raise UsageError(f"{_label(path, f)}: {exc}") from None
    return values


def config_from_args(cls: type[T], ns: argparse.Namespace) -> T:
    """The config: `cls` defaults < the ``--config`` file < flags the user gave.

    Keys of `ns` that `add_config_arguments` did not add (the subcommand name,
    ``--debug``) are ignored. Raises UsageError for any bad value or key.
    """
    values: dict[Key, Any] = {}
    file = getattr(ns, _FILE_DEST, None)
    if file is not None:
        values.update(_values_from_mapping(cls, read_yaml(file), (), str(file), None))
    values.update(_values_from_namespace(cls, ns))
    return _build(cls, values, (), None)


def parse_config(cls: type[T], argv: list[str], *, prog: str, description: str = "", epilog: str = "") -> T:
    """Parse `argv` into a `cls` with a parser of its own (argparse errors exit 2)."""
    doc = (cls.__doc__ or "").strip()
    if doc.startswith(cls.__name__ + "("):
        doc = ""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description or doc or None,
        epilog=epilog or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser, cls)
    return config_from_args(cls, parser.parse_args(argv))


# ---------------------------------------------------------------------------
# Building the config


def _build(cls: type[T], values: dict[Key, Any], prefix: Key, base: Any) -> T:
    """`cls` from `values` by path; fields not in it keep `base`'s value or their default."""
    kwargs: dict[str, Any] = {}
    missing = []
    for f, tp in _init_fields(cls):
        path = prefix + (f.name,)
        sub = _nested_class(tp)
        if sub is not None:
            sub_base = getattr(base, f.name) if base is not None else _field_default(f)
            kwargs[f.name] = _build(sub, values, path, None if sub_base is dataclasses.MISSING else sub_base)
        elif path in values:
            kwargs[f.name] = values[path]
        elif base is not None:
            kwargs[f.name] = copy.deepcopy(getattr(base, f.name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            missing.append((path, f))
    if missing:
        how = "; ".join(
            f"{_label(p, f)} on the command line or '{'.'.join(p)}' in the config file" for p, f in missing
        )
        raise UsageError(f"missing required setting{'s' if len(missing) > 1 else ''}: give {how}")
    try:
        return cls(**kwargs)
    except UsageError:
        raise
    except (ValueError, WeightsmithError) as exc:
        raise UsageError(str(exc)) from exc


def config_from_dict(cls: type[T], data: dict, *, source: str = "<dict>") -> T:
    """A `cls` from nested plain data (as `config_to_dict` makes, or YAML gives).

    Missing keys keep their defaults. `source` names the data in messages.
    """
    return _build(cls, _values_from_mapping(cls, data, (), source, None), (), None)


def _where(source: str, line: int | None) -> str:
    return f"{source}:{line}: " if line else f"{source}: "


def _unknown_key(key: Any, prefix: Key, names: list[str]) -> str:
    inside = f" in '{'.'.join(prefix)}'" if prefix else ""
    text = str(key)
    if "." in text and text.split(".")[0].replace("-", "_") in names:
        return f"unknown key {key!r}{inside} (nest it: '{text.split('.')[0]}:' with the rest indented below)"
    hint = _did_you_mean(text.replace("-", "_"), names) or f" (valid keys: {', '.join(names)})"
    return f"unknown key {key!r}{inside}{hint}"


def _values_from_mapping(cls: type, data: Any, prefix: Key, source: str, line: int | None) -> dict[Key, Any]:
    """Check nested `data` against `cls`; return its values by field path."""
    if data is None and prefix:  # "train:" with every key commented out
        return {}
    if not isinstance(data, dict):
        what = f"'{'.'.join(prefix)}'" if prefix else "the top level"
        raise UsageError(f"{_where(source, line)}expected a mapping of keys at {what}, got {_show(data)}")
    fields = {f.name: (f, tp) for f, tp in _init_fields(cls)}
    key_lines = getattr(data, "key_lines", {})
    values: dict[Key, Any] = {}
    seen: set[str] = set()
    for key, value in data.items():
        where = _where(source, key_lines.get(key, line))
        name = key.replace("-", "_") if isinstance(key, str) else key
        if name not in fields:
            raise UsageError(where + _unknown_key(key, prefix, list(fields)))
        if name in seen:
            raise UsageError(f"{where}key {key!r} is given twice (as dashes and as underscores); keep one")
        seen.add(name)
        f, tp = fields[name]
        path = prefix + (name,)
        sub = _nested_class(tp)
        if sub is not None:
            values.update(_values_from_mapping(sub, value, path, source, key_lines.get(key, line)))
            continue
        try:
            if isinstance(value, str) and _is_repeatable(tp) and not _splits(f):
                value = [value]  # one item, commas and all
            values[path] = _check_choices(f, _coerce(tp, value))
        except _BadValue as exc:
            raise UsageError(f"{where}{'.'.join(path)}: {exc}") from None
    return values


# ---------------------------------------------------------------------------
# YAML files


class _MarkedDict(dict):
    """A YAML mapping that remembers the 1-based line of each key."""

    key_lines: dict[Any, int]


class LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings are `_MarkedDict`s and reject duplicate keys."""


def _construct_mapping(loader: LineLoader, node: yaml.MappingNode) -> _MarkedDict:
    loader.flatten_mapping(node)  # resolve "<<" merge keys first
    data = _MarkedDict()
    data.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(
                None, None, "found an unhashable key", key_node.start_mark
            )
        if key in data:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        data[key] = loader.construct_object(value_node, deep=True)
        data.key_lines[key] = key_node.start_mark.line + 1
    return data


LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(
    path: str | os.PathLike,
    *,
    what: str = "config file",
    hint: str = "check the --config path",
    loader: type | None = None,
) -> Any:
    """The parsed file, mappings carrying key lines (`key_lines`); UsageError if unreadable.

    `what` and `hint` word the not-found message; `loader` may be a `LineLoader` subclass
    with extra tags."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{what} not found: {path} ({hint})") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, expected a {what} (YAML)") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a UTF-8 text file; a {what} is YAML text") from None
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.load(text, Loader=loader or LineLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UsageError(f"{path}{line}: invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: invalid YAML: {exc}") from None
    return _MarkedDict() if data is None else data


def load_config_yaml(cls: type[T], path: str | os.PathLike) -> T:
    """A `cls` from a YAML file; missing keys keep their defaults."""
    return config_from_dict(cls, read_yaml(path), source=str(path))


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain data (str, int, float, bool, None, list, dict) for a config.

    Paths become strings, enums their values, tuples lists. Fields with
    ``init=False`` are left out: ``__post_init__`` computes them again.
    """
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"expected a dataclass instance, got {cfg!r}")
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}


class _Dumper(yaml.SafeDumper):
    """SafeDumper that double-quotes strings holding Unicode line breaks.

    PyYAML may write U+0085/U+2028/U+2029 raw inside a single-quoted scalar,
    where a reader folds them into a space; escaped, they load back unchanged.
    """


def _represent_str(dumper: _Dumper, value: str) -> yaml.ScalarNode:
    style = '"' if any(ch in value for ch in "\x85\u2028\u2029") else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def dump_config_yaml(cfg: Any, path: str | os.PathLike) -> None:
    """Write `cfg` as YAML atomically (temp file in the same directory, fsync, rename)."""
    data = config_to_dict(cfg)
    body = yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False)
    text = f"# {type(cfg).__name__}, written by weightsmith\n{body}"
    write_text_atomic(Path(path), text)
