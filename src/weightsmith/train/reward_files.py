"""Reward functions from a Python file named on the command line: `--reward PATH.py:FUNCTION[:WEIGHT]`.

The file is the user's own code, run because the command line names it (as `python PATH.py`
would run it): it is imported once, before the model loads, and FUNCTION is looked up in it.
Two calling conventions are accepted, told apart by the signature:

- weightsmith's: `fn(completions, rows, lengths)`, the texts, each completion's data row (the
  whole JSON object of its prompt's line) and token count, as the Python API's rewards;
- TRL's (a function taking `**kwargs`): `fn(prompts=..., completions=..., completion_ids=...,
  **columns)` as `GRPOTrainer` calls its reward functions, so a function written for TRL runs
  unchanged. `prompts` are the lines' prompts, `completions` the texts (for conversational
  prompts, `[{"role": "assistant", "content": text}]` each), `completion_ids` the sampled token
  ids, every other key of the lines a list (None where a line lacks it); `trainer_state` is
  None, `log_extra` and `log_metric` accept and drop what they are given.

Either returns one float per completion, or None where it does not apply. The run's lineage
records each file's sha256 (an input like the data), so `reproduce` re-runs the run only
while the file is unchanged, and only with --allow-code (a record is a shared file).

Not here: the built-in rewards and scoring (rewards.py).
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from weightsmith.errors import ConfigError

#: `PATH.py:FUNCTION` or `PATH.py:FUNCTION:WEIGHT`.
FILE_SPEC = re.compile(r"^(?P<path>.+\.py):(?P<name>[A-Za-z_]\w*)(?::(?P<weight>[^:]*))?$")


def file_spec(spec: str) -> re.Match[str] | None:
    """The parts of a `--reward PATH.py:FUNCTION[:WEIGHT]` spec; None for a built-in's."""
    return FILE_SPEC.match(spec.strip())


def load_function(spec: str, path: str, name: str) -> Any:
    """FUNCTION from PATH, imported as a module of its own; ConfigError naming the spec when
    the file is missing, fails to import, or has no such function."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"--reward {spec}: {file}: no such file (give the path of a Python file)")
    stat = file.stat()
    key = (str(file.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _MODULES:  # the config is checked before the run starts: import once
        _MODULES[key] = _import(spec, file)
    return _function(spec, file, _MODULES[key], name)


_MODULES: dict[tuple[str, int, int], Any] = {}


def _import(spec: str, file: Path) -> Any:
    module_name = f"weightsmith_reward_{len(_MODULES)}_{file.stem}"
    loader = importlib.util.spec_from_file_location(module_name, file)
    if loader is None or loader.loader is None:
        raise ConfigError(f"--reward {spec}: {file} cannot be imported as Python")
    module = importlib.util.module_from_spec(loader)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
    try:
        loader.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's code: any error, named in one line
        del sys.modules[module_name]
        where = f" (line {exc.lineno})" if isinstance(exc, SyntaxError) and exc.lineno else ""
        raise ConfigError(
            f"--reward {spec}: importing {file} failed{where}: {type(exc).__name__}: {exc}"
        ) from exc
    return module


def _function(spec: str, file: Path, module: Any, name: str) -> Any:
    fn = getattr(module, name, None)
    if fn is None:
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ConfigError(
            f"--reward {spec}: {file} has no {name!r}"
            + (f" (it defines: {', '.join(found)})" if found else "")
        )
    if not callable(fn) or inspect.iscoroutinefunction(fn):
        kind = "an async function" if inspect.iscoroutinefunction(fn) else type(fn).__name__
        raise ConfigError(
            f"--reward {spec}: {name} is {kind}; give a plain function returning a list of floats"
        )
    return fn


def takes_kwargs(fn: Any) -> bool:
    """Whether `fn` is called TRL's way: it takes **kwargs."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class TrlStyle:
    """A reward function written for TRL, called as `GRPOTrainer` calls it."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(
        self, completions: list[str], rows: list[dict[str, Any]], lengths: list[int],
        ids: Sequence[Sequence[int]] | None = None,
    ) -> Any:  # fmt: skip
        prompts = [row.get("prompt") for row in rows]
        texts: list[Any] = [
            [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
            for prompt, text in zip(prompts, completions, strict=True)
        ]
        keys = dict.fromkeys(
            k for row in rows for k in row if k not in ("prompt", "completion", "completion_ids")
        )
        columns = {key: [row.get(key) for row in rows] for key in keys}
        columns |= {"trainer_state": None, "log_extra": _drop, "log_metric": _drop}
        completion_ids = [list(x) for x in ids] if ids is not None else None
        return self.fn(prompts=prompts, completions=texts, completion_ids=completion_ids, **columns)


def _drop(*args: Any, **kwargs: Any) -> None:
    """TRL's `log_extra` / `log_metric` hooks: accepted, nothing kept."""
