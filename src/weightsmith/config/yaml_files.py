"""YAML files with line numbers: the loader every user-written file goes through.

`read_yaml` parses a file with `LineLoader` (PyYAML's safe loader; mappings
remember the line of each key, sequences the line of each item, duplicate keys
are an error) and turns every
read or parse failure into one `UsageError` line naming the file and line.
`load_config_yaml` / `dump_config_yaml` read and write a whole config.

Not here: checking values against a config class (`weightsmith.config.build`).
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml

from weightsmith.config.build import config_from_dict, config_to_dict
from weightsmith.config.fields import T
from weightsmith.errors import UsageError
from weightsmith.files import write_text_atomic


class MarkedDict(dict):
    """A YAML mapping that remembers the 1-based line of each key."""

    key_lines: dict[Any, int]


class MarkedList(list):
    """A YAML sequence that remembers the 1-based line of each item."""

    item_lines: list[int]


class LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings are `MarkedDict`s (rejecting duplicate keys) and sequences `MarkedList`s."""


def _construct_mapping(loader: LineLoader, node: yaml.MappingNode) -> MarkedDict:
    loader.flatten_mapping(node)  # resolve "<<" merge keys first
    data = MarkedDict()
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


def _construct_sequence(loader: LineLoader, node: yaml.SequenceNode) -> MarkedList:
    data = MarkedList(loader.construct_object(child, deep=True) for child in node.value)
    data.item_lines = [child.start_mark.line + 1 for child in node.value]
    return data


LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


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
    return MarkedDict() if data is None else data


def load_config_yaml(cls: type[T], path: str | os.PathLike) -> T:
    """A `cls` from a YAML file; missing keys keep their defaults."""
    return config_from_dict(cls, read_yaml(path), source=str(path))


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
