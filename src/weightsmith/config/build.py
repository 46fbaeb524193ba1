"""Config values <-> nested plain data: a config dataclass from a mapping, and back.

`config_from_dict` checks every key and value of a mapping (YAML data, or a
dict from Python) against a config class and builds it; unknown keys, bad
values and missing required settings raise `UsageError` naming the file,
line and key. `config_to_dict` turns a config back into plain data that
loads into an equal config.

Not here: reading YAML text (`weightsmith.config.yaml_files`), argparse.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
from pathlib import PurePath
from typing import Any

from weightsmith.config.fields import (
    BadValue,
    Key,
    T,
    check_choices,
    coerce,
    did_you_mean,
    field_default,
    field_label,
    group_prefix,
    init_fields,
    is_flattened,
    is_repeatable,
    nested_class,
    show_value,
    splits,
    visible_fields,
)
from weightsmith.errors import UsageError, WeightsmithError


def build_config(cls: type[T], values: dict[Key, Any], prefix: Key, base: Any) -> T:
    """`cls` from `values` by path; fields not in it keep `base`'s value or their default."""
    kwargs: dict[str, Any] = {}
    missing = []
    for f, tp in init_fields(cls):
        path = prefix + (f.name,)
        sub = nested_class(tp)
        if sub is not None:
            sub_base = getattr(base, f.name) if base is not None else field_default(f)
            kwargs[f.name] = build_config(
                sub, values, group_prefix(prefix, f), None if sub_base is dataclasses.MISSING else sub_base
            )
        elif path in values:
            kwargs[f.name] = values[path]
        elif base is not None:
            kwargs[f.name] = copy.deepcopy(getattr(base, f.name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            missing.append((path, f))
    if missing:
        how = "; ".join(
            f"{field_label(p, f)} on the command line or '{'.'.join(p)}' in the config file"
            for p, f in missing
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
    return build_config(cls, values_from_mapping(cls, data, (), source, None), (), None)


def _where(source: str, line: int | None) -> str:
    return f"{source}:{line}: " if line else f"{source}: "


def _unknown_key(key: Any, prefix: Key, names: list[str]) -> str:
    inside = f" in '{'.'.join(prefix)}'" if prefix else ""
    text = str(key)
    if "." in text and text.split(".")[0].replace("-", "_") in names:
        return f"unknown key {key!r}{inside} (nest it: '{text.split('.')[0]}:' with the rest indented below)"
    hint = did_you_mean(text.replace("-", "_"), names) or f" (valid keys: {', '.join(names)})"
    return f"unknown key {key!r}{inside}{hint}"


def values_from_mapping(cls: type, data: Any, prefix: Key, source: str, line: int | None) -> dict[Key, Any]:
    """Check nested `data` against `cls`; return its values by field path."""
    if data is None and prefix:  # "train:" with every key commented out
        return {}
    if not isinstance(data, dict):
        what = f"'{'.'.join(prefix)}'" if prefix else "the top level"
        raise UsageError(
            f"{_where(source, line)}expected a mapping of keys at {what}, got {show_value(data)}"
        )
    fields = visible_fields(cls)  # flattened groups' keys sit at this level
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
        sub = nested_class(tp)
        if sub is not None:
            values.update(values_from_mapping(sub, value, path, source, key_lines.get(key, line)))
            continue
        try:
            if isinstance(value, str) and is_repeatable(tp) and not splits(f):
                value = [value]  # one item, commas and all
            values[path] = check_choices(f, coerce(tp, value))
        except BadValue as exc:
            raise UsageError(f"{where}{'.'.join(path)}: {exc}") from None
    return values


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
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if not f.init:
            continue
        value = getattr(cfg, f.name)
        if is_flattened(f):
            out.update(config_to_dict(value))  # its keys sit at this level
        else:
            out[f.name] = _plain(value)
    return out
