"""weightsmith: own the whole life cycle of an open-weight language model.

import weightsmith as ws
llm = ws.load("smollm2-135m-instruct")
llm.generate("Once upon a time", max_tokens=32, temperature=0)

The names below are imported on first use, so `import weightsmith` (and every command
that needs no model, such as `weightsmith --help`) does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_HOMES = {
    "LLM": "weightsmith.llm",
    "load": "weightsmith.llm",
    "SamplingParams": "weightsmith.sampling",
    "WeightsmithError": "weightsmith.errors",
}

__all__ = ["LLM", "SamplingParams", "WeightsmithError", "__version__", "inspect", "load"]

if TYPE_CHECKING:
    from weightsmith import inspect
    from weightsmith.errors import WeightsmithError
    from weightsmith.llm import LLM, load
    from weightsmith.sampling import SamplingParams


def __getattr__(name: str) -> Any:
    if name == "inspect":
        return importlib.import_module("weightsmith.inspect")
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'weightsmith' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
