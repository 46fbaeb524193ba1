"""Typed dataclass configs -> argparse flags, and parsed flags -> a config.

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

The field conventions (types, `opt` metadata, how a field is spelled as a
flag) are documented in `weightsmith.config.fields`.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_origin

from weightsmith.config import (
    NONE_WORDS,
    BadValue,
    Key,
    T,
    build_config,
    check_choices,
    choice_name,
    choices_of,
    coerce,
    describe,
    field_default,
    field_label,
    flag_name,
    init_fields,
    is_fixed_tuple,
    is_flattened,
    is_repeatable,
    item_types,
    leaves,
    nested_class,
    read_yaml,
    show_value,
    split_commas,
    split_optional,
    splits,
    values_from_mapping,
    visible_fields,
)
from weightsmith.errors import UsageError

__all__ = ["add_config_arguments", "config_from_args", "parse_config"]

# argparse dests owned by this module; ":" keeps them apart from the CLI's own
# namespace keys ("command", "debug") and from each other (field names are identifiers).
_DEST_PREFIX = "cfg:"
_FILE_DEST = "cfg::file"
_SCALAR_METAVARS: dict[Any, str] = {int: "INT", float: "FLOAT", str: "TEXT", Path: "PATH", bool: "BOOL"}


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


def _show_default(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_show_default(v) for v in value) or "empty"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_show_default(v)}" for k, v in value.items()) or "empty"
    if value is None or isinstance(value, bool):
        return show_value(value).replace("null", "none")
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value) if value != "" else "''"


def _metavar(tp: Any, choices: Sequence[Any] | None = None) -> str:
    """The placeholder --help shows for a value (no brackets: argparse's usage wrapping trips on them)."""
    inner, _ = split_optional(tp)
    if get_origin(inner) is dict:
        return "KEY=VALUE"
    items = item_types(inner)
    if items is not None:
        names = [_metavar(item, choices) for item in items]
        return ",".join(names) if is_fixed_tuple(inner) else f"{names[0]},..."
    choices = choices_of(inner) or choices
    if choices is not None:
        return "{" + ",".join(choice_name(c) for c in choices) + "}"
    return _SCALAR_METAVARS[inner]


def _help_text(f: dataclasses.Field, tp: Any, default: Any) -> str:
    notes = []
    inner, _ = split_optional(tp)
    if get_origin(inner) is dict:
        notes.append("repeatable")
    elif is_repeatable(tp) and not is_fixed_tuple(inner) and not f.metadata.get("positional"):
        notes.append("comma-separated or repeated" if splits(f) else "repeatable")
    notes.append("required" if default is dataclasses.MISSING else f"default: {_show_default(default)}")
    text = f"{f.metadata.get('help', '').strip()} ({'; '.join(notes)})".strip()
    return text.replace("%", "%%")  # argparse %-formats help strings


def _group_title(cls: type, path: Key) -> str:
    doc = (cls.__doc__ or "").strip()
    if not doc or doc.startswith(cls.__name__ + "("):  # the signature dataclass makes up
        return f"{'.'.join(path)} options"
    return doc.splitlines()[0].strip().rstrip(".:")  # argparse appends ":"


def _add_leaf(container: Any, path: Key, f: dataclasses.Field, tp: Any, default: Any) -> None:
    describe(tp)  # TypeError now for an unsupported annotation, not at parse time
    dest = _DEST_PREFIX + ".".join(path)
    common = {"dest": dest, "default": argparse.SUPPRESS}
    help_text = _help_text(f, tp, default)
    inner, _ = split_optional(tp)
    if f.metadata.get("positional"):
        if len(path) > 1 or inner is bool:
            raise TypeError(f"{'.'.join(path)}: positionals must be top-level and not bool")
        nargs = "*" if is_repeatable(tp) else "?"
        metavar = f.metadata.get("metavar") or path[-1].upper()
        container.add_argument(dest, nargs=nargs, default=argparse.SUPPRESS, metavar=metavar, help=help_text)
        return
    short = [f.metadata["short"]] if f.metadata.get("short") else []
    hidden = flag_name(path, dashes=False) != flag_name(path)  # the underscore spelling
    if inner is bool:
        on, off = flag_name(path), flag_name(path, negate=True)
        container.add_argument(*short, on, off, action=_BoolAction, negatives=[off], help=help_text, **common)
        if hidden:
            on, off = flag_name(path, dashes=False), flag_name(path, dashes=False, negate=True)
            container.add_argument(
                on, off, action=_BoolAction, negatives=[off], help=argparse.SUPPRESS, **common
            )
        return
    action = "append" if is_repeatable(tp) else "store"
    metavar = f.metadata.get("metavar") or _metavar(tp, f.metadata.get("choices"))
    container.add_argument(*short, flag_name(path), action=action, metavar=metavar, help=help_text, **common)
    if hidden:
        container.add_argument(flag_name(path, dashes=False), action=action, help=argparse.SUPPRESS, **common)


def _add_fields(parser: argparse.ArgumentParser, container: Any, cls: type, prefix: Key, base: Any) -> None:
    for f, tp in init_fields(cls):
        path = prefix + (f.name,)
        default = getattr(base, f.name) if base is not None else field_default(f)
        sub = nested_class(tp)
        if sub is None:
            _add_leaf(container, path, f, tp, default)
            continue
        sub_default = None if default is dataclasses.MISSING else default
        if is_flattened(f):  # its fields are this level's, in this place
            _add_fields(parser, container, sub, prefix, sub_default)
            continue
        # argparse groups do not nest, so every group hangs off the parser.
        group = parser.add_argument_group(_group_title(sub, path), f.metadata.get("help") or None)
        _add_fields(parser, group, sub, path, sub_default)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add ``--config FILE`` and one argument per field of `cls` to `parser`.

    Works on a subparser. Every argument defaults to SUPPRESS, so the parsed
    namespace holds only what the user typed; `config_from_args` merges it.
    """
    visible_fields(cls)  # TypeError now for a name a flattened group repeats
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


def _from_command_line(tp: Any, raw: Any, f: dataclasses.Field) -> Any:
    """Turn argparse's raw strings (a list for repeated flags) into one value for `coerce`."""
    if not isinstance(raw, list):
        return raw
    inner, optional = split_optional(tp)
    if optional and len(raw) == 1 and raw[0].strip().lower() in NONE_WORDS:
        return None
    if get_origin(inner) is dict:
        pairs = {}
        for item in raw:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise BadValue(f"expected KEY=VALUE, got {show_value(item)}")
            pairs[key.strip()] = value
        return pairs
    if f.metadata.get("positional") or not splits(f):
        return raw
    return [part for chunk in raw for part in split_commas(chunk)]


def _values_from_namespace(cls: type, ns: argparse.Namespace) -> dict[Key, Any]:
    raw_values = vars(ns)
    values = {}
    for path, f, tp in leaves(cls):
        dest = _DEST_PREFIX + ".".join(path)
        if dest not in raw_values:
            continue
        try:
            raw = _from_command_line(tp, raw_values[dest], f)
            values[path] = check_choices(f, coerce(tp, raw))
        except BadValue as exc:
            raise UsageError(f"{field_label(path, f)}: {exc}") from None
    return values


def config_from_args(cls: type[T], ns: argparse.Namespace) -> T:
    """The config: `cls` defaults < the ``--config`` file < flags the user gave.

    Keys of `ns` that `add_config_arguments` did not add (the subcommand name,
    ``--debug``) are ignored. Raises UsageError for any bad value or key.
    """
    values: dict[Key, Any] = {}
    file = getattr(ns, _FILE_DEST, None)
    if file is not None:
        values.update(values_from_mapping(cls, read_yaml(file), (), str(file), None))
    values.update(_values_from_namespace(cls, ns))
    return build_config(cls, values, (), None)


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
