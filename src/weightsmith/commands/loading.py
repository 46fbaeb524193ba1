"""The options shared by every command that loads a model, and the one place commands load it.

`LoadOptions` (which model, device, dtype, pickle, adapter) and `SamplingOptions` (how
tokens are chosen) are mixed into the configs of generate, chat, merge, eval and audit;
`SteerOptions` (--steer, placed before `LoadOptions`) into generate's and chat's.
`load_model(model, progress=status)` loads a checkpoint through `weightsmith.load` inside
`status(model)`, a context manager (the CLI shows a spinner in it on a terminal). A command
finds that status in the `progress` it was given: `load_status(progress)` is its
`loading` method when it has one (the CLI's progress for a model-loading command does), so
a command's own progress (text as it arrives, ticks) keeps its shape and tests pass plain
callables. Nothing here is process-wide.

Not here: resolving or reading checkpoints (`weightsmith.llm`, `weightsmith.checkpoint`),
the spinner itself (`weightsmith.cli.loading`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightsmith.config import opt
from weightsmith.errors import UsageError
from weightsmith.llm import LLM, load

DEFAULT_MODEL = "smollm2-135m-instruct"
KV_CACHE_DTYPES = ("auto", "fp32", "bf16", "fp16", "int8")
KV_CACHE_HELP = (
    "key/value cache dtype: auto (the model's), fp32, bf16 (half an fp32 cache's memory, entries rounded "
    "to bf16), fp16, or int8 (CPU: 0.27x an fp32 cache, each head's entry as codes and a scale)"
)

#: `status(model)`: a context manager around one model load (the CLI shows a spinner in it).
LoadStatus = Callable[[str], AbstractContextManager[Any]]


def load_status(progress: Any) -> LoadStatus | None:
    """How a command's `progress` shows model loads: its `loading(model)`, if it has one."""
    return getattr(progress, "loading", None)


def load_model(model: str, *, progress: LoadStatus | None = None, **kwargs: Any) -> LLM:
    """`weightsmith.load(model, **kwargs)`, inside `progress(model)` when given."""
    with progress(model) if progress is not None else contextlib.nullcontext():
        return load(model, **kwargs)


@dataclass(kw_only=True)
class LoadOptions:
    """Which model to run and where."""

    model: str = opt(help="catalog or store name, HF directory, or .gguf file", positional=True)
    device: str = opt("auto", "cpu, cuda, cuda:N, mps or auto")
    dtype: str = opt("auto", "fp32, bf16, fp16 or auto (fp32 on CPU, bf16/fp16 on GPU)")
    allow_pickle: bool = opt(False, "allow pickle weights (.bin/.pt), loaded with weights_only=True")
    adapter: str | None = opt(
        None, "LoRA adapter to apply: a folder (from finetune, or PEFT) or llama.cpp's GGUF LoRA file"
    )
    keep_quantized: bool = opt(
        False, "run a .gguf file's quantized matrices (Q4_K, Q8_0, IQ*, MXFP4, ...; and gpt-oss's MXFP4 "
        "experts of an HF folder) from their own blocks (CPU kernels, the file's memory) instead of "
        "dequantizing them; an --adapter then runs beside the blocks"
    )  # fmt: skip
    kv_cache_dtype: str = opt("auto", KV_CACHE_HELP, choices=KV_CACHE_DTYPES)

    def load_kwargs(self) -> dict[str, Any]:
        kwargs = {
            "device": self.device,
            "dtype": self.dtype,
            "allow_pickle": self.allow_pickle,
            "adapter": self.adapter,
        }
        if self.kv_cache_dtype != "auto":
            kwargs["kv_cache_dtype"] = self.kv_cache_dtype
        return {**kwargs, "keep_quantized": True} if self.keep_quantized else kwargs

    def load(self, progress: LoadStatus | None = None) -> LLM:
        return load_model(self.model, progress=progress, **self.load_kwargs())


@dataclass(kw_only=True)
class SteerOptions:
    """Steering with a direction file (`weightsmith inspect direction`) while generating."""

    steer: list[str] = opt(
        default_factory=list,
        help="steer with a direction: FILE:layer=L:scale=S adds it, FILE:add adds it as --select chose, "
        "FILE:ablate removes it; a llama.cpp control vector: FILE.gguf[:scale=S] (repeatable)",
        split=False,
    )

    def __post_init__(self) -> None:
        from weightsmith.inspect.steering import parse_steer

        for spec in self.steer:  # the form and the file now; the file against the model once loaded
            path = parse_steer(spec).path
            if not path.is_file():
                raise UsageError(f"--steer {spec}: no direction file at {path}")

    def load_kwargs(self) -> dict[str, Any]:
        if self.steer and getattr(self, "compile", False):
            raise UsageError("--steer runs the plain PyTorch decode path; drop --compile")
        return {**super().load_kwargs(), "steer": list(self.steer)}  # type: ignore[misc]


@dataclass(kw_only=True)
class SamplingOptions:
    """How tokens are chosen; unset options take the checkpoint's generation_config or our defaults."""

    max_tokens: int = opt(256, "most tokens to generate", short="-n")
    temperature: float | None = opt(None, "0 for greedy decoding; higher is more random (default 0.7)")
    top_k: int | None = opt(None, "sample from the k most likely tokens (0 = off)")
    top_p: float | None = opt(None, "sample from the smallest set with this much probability (1 = off)")
    min_p: float | None = opt(None, "drop tokens below min_p x the top token's probability (0 = off)")
    repetition_penalty: float | None = opt(None, "penalise tokens already seen (1 = off)")
    seed: int | None = opt(None, "random seed for reproducible sampling")
    stop: list[str] = opt(default_factory=list, help="stop when this text appears (repeatable)", split=False)
    json_schema: str | None = opt(None, "JSON schema file: the answer is JSON valid against it")

    def sampling(self) -> dict[str, Any]:
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
            "stop": list(self.stop),
            "json_schema": read_json_schema(self.json_schema) if self.json_schema else None,
        }


def read_json_schema(path: str) -> Any:
    """The JSON schema in the file `path`; UsageError naming the file (and line) when it cannot
    be read or parsed. Whether the schema is usable is the grammar compiler's check."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--json-schema {path}: cannot read it ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(
            f"--json-schema {path}: line {e.lineno} column {e.colno}: not valid JSON ({e.msg}); fix the file"
        ) from None


def model_label(model: str, adapter: str | None) -> str:
    """A short name for a model (and adapter) in tables and results: `smollm2+support`."""
    name = Path(model).name if ("/" in model or model.endswith(".gguf")) else model
    return f"{name}+{Path(adapter).name}" if adapter else name
