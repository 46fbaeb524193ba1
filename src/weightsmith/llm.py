"""`weightsmith.load()` and `LLM`: the Python entry point for running a model.

`load` accepts a catalog name (pulled on first use), a store name, an HF
checkpoint directory or a .gguf file, and returns an `LLM` holding the model, its
tokenizer and a text engine (which, on the CPU, owns the model's decode layout and
fused C step: `llm.engine.cpu_plan`). Not here: the CLI (weightsmith.cli), file formats
(weightsmith.checkpoint).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from weightsmith.checkpoint.load import Checkpoint, load_checkpoint
from weightsmith.device import pick_device, pick_dtype
from weightsmith.engine import Completion, Engine
from weightsmith.errors import UsageError
from weightsmith.sampling import SamplingParams

#: Sampling fields a checkpoint's generation_config.json may set as defaults.
GENERATION_CONFIG_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


@dataclass
class LLM:
    """A loaded model, ready to generate."""

    checkpoint: Checkpoint
    name: str
    device: torch.device
    dtype: torch.dtype

    def __post_init__(self) -> None:
        self.engine = Engine(self.model, self.tokenizer)
        #: The steering hooks `load(steer=...)` started (weightsmith.inspect.steering), or None.
        self.steering: Any = None

    @property
    def model(self):
        return self.checkpoint.model

    @property
    def tokenizer(self):
        return self.checkpoint.tokenizer

    @property
    def config(self):
        return self.checkpoint.config

    def sampling_params(self, **overrides: Any) -> SamplingParams:
        """Defaults < the checkpoint's generation_config.json < `overrides` (None = unset).
        `json_schema` (a dict or its JSON text) constrains the output to JSON valid against it."""
        schema = overrides.pop("json_schema", None)
        if schema is not None:
            overrides["grammar"] = self.engine.json_schema(schema)
        values: dict[str, Any] = {}
        gen = self.checkpoint.generation_config
        if gen.get("do_sample", True):
            values.update({k: gen[k] for k in GENERATION_CONFIG_FIELDS if gen.get(k) is not None})
        known = {f.name for f in fields(SamplingParams)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return SamplingParams(**values)

    def complete(self, prompt: str | list[int], **params: Any) -> Completion:
        """Complete one prompt and return text with usage and timings. `params` are
        SamplingParams fields, and `json_schema=` for an answer that is JSON valid against it
        (as for `generate` and `chat`)."""
        return self.engine.generate([prompt], self.sampling_params(**params))[0]

    def generate(
        self, prompt: str | list[str], *, stream: bool = False, **params: Any
    ) -> str | list[str] | Iterator[str]:
        """Continue `prompt` (a string, or a list of strings generated as one batch)."""
        sp = self.sampling_params(**params)
        if stream:
            if not isinstance(prompt, str):
                raise TypeError("stream=True takes one prompt string")
            return (d.text for d in self.engine.stream(prompt, sp) if d.text)
        if isinstance(prompt, str):
            return self.engine.generate([prompt], sp)[0].text
        return [c.text for c in self.engine.generate(list(prompt), sp)]

    def chat(self, messages: list[dict], *, stream: bool = False, **params: Any) -> str | Iterator[str]:
        """Answer the conversation `messages` using the checkpoint's chat template."""
        ids = self.engine.chat_prompt(messages)
        sp = self.sampling_params(**params)
        if stream:
            return (d.text for d in self.engine.stream(ids, sp) if d.text)
        return self.engine.generate([ids], sp)[0].text

    def embed(
        self,
        texts: str | Sequence[str] | Sequence[Sequence[int]],
        *,
        pooling: str | None = None,
        dimensions: int | None = None,
        adapter: str | None = None,
    ) -> list[list[float]]:
        """One unit vector per text (a string, strings, or token-id lists), pooled from the last
        layer as the checkpoint says, else as `pooling` says ("last", "mean", "first"; default
        "last"); `dimensions` keeps the first values (then renormalised). weightsmith.embeddings."""
        from weightsmith.embeddings import DEFAULT_POOLING, check_pooling, embed_ids

        if pooling is None and self.checkpoint.pooling is not None:
            check_pooling(
                self.checkpoint.pooling, f"{self.checkpoint.path} (pass pooling= to pool otherwise)"
            )
        items = [texts] if isinstance(texts, str) else list(texts)
        ids = [self.tokenizer.encode(t) if isinstance(t, str) else list(t) for t in items]
        chosen = pooling or self.checkpoint.pooling or DEFAULT_POOLING
        pad = self.tokenizer.pad_token_id or 0
        vectors = embed_ids(self.model, ids, chosen, pad_id=pad, adapter=adapter, dimensions=dimensions)
        return vectors.tolist()

    def trace(self, prompt: str | list[int], **options: Any):
        """Run `prompt` through the model with named hook points (TransformerLens's names):
        `with llm.trace(p) as t: t["blocks.3.hook_resid_post"]`; see weightsmith.inspect.trace
        for `edits=`, `names=` and `grad=`."""
        from weightsmith.inspect.trace import Trace

        return Trace(self.model, self.tokenizer, prompt, **options)


def load(
    model: str | Path,
    *,
    device: str | None = None,
    dtype: str | None = None,
    allow_pickle: bool = False,
    auto_pull: bool = True,
    adapter: str | Path | None = None,
    steer: Sequence[str] = (),
    keep_quantized: bool = False,
    kv_cache_dtype: str | None = None,
) -> LLM:
    """Load a model by catalog/store name, HF directory or .gguf file.

    keep_quantized: run a GGUF file's quantized matrices (every published type: Q4_K, Q8_0, the
        IQ types, MXFP4, ...; weightsmith.checkpoint.gguf_quants), or the MXFP4 experts of
        OpenAI's gpt-oss folders, from their own blocks with the CPU kernels instead of
        dequantizing them; CPU only, no adapter.

    adapter: a LoRA adapter directory (ours or PEFT's), folded into the weights so
    generation runs at the base model's speed.
    steer: direction specs (`FILE:layer=L:scale=S`, `FILE:ablate`; weightsmith.inspect.steering)
        applied to every forward from now on, each file checked against the loaded weights first.
    kv_cache_dtype: "fp32", "bf16", "fp16" or "int8" (CPU) for the key/value caches of generation (`generate`,
        `chat`, `serve`), or "auto"/None: the model's dtype. bf16 under an fp32 model halves the
        cache's memory; its entries are rounded to bf16 and attention still computes in fp32.
    """
    from weightsmith.checkpoint.pull import resolve

    path = resolve(str(model), auto_pull=auto_pull)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    kv_dtype = None if kv_cache_dtype in (None, "auto") else torch.int8
    if kv_cache_dtype == "int8" and dev.type != "cpu":
        raise UsageError(
            f"--kv-cache-dtype int8 is read by the CPU decode step, not on {dev}; use bf16 or fp16"
        )
    if kv_cache_dtype not in (None, "auto", "int8"):
        kv_dtype = pick_dtype(kv_cache_dtype, dev, "--kv-cache-dtype")
    if keep_quantized and dev.type != "cpu":
        raise UsageError(
            f"--keep-quantized runs a GGUF file's blocks on the CPU, not on {dev}; drop one of them"
        )
    ckpt = load_checkpoint(
        path, device=dev, dtype=dt, allow_pickle=allow_pickle, keep_quantized=keep_quantized
    )
    if adapter is not None:
        from weightsmith.lora import load_adapter, merge_and_unload

        load_adapter(ckpt.model, Path(adapter))
        if not keep_quantized:  # folded in; over kept blocks it stays apart (the C step adds it)
            merge_and_unload(ckpt.model)
        ckpt.model.requires_grad_(False)
    llm = LLM(ckpt, str(model), dev, dt)  # its Engine lays a CPU model out for decoding
    llm.engine.kv_dtype = kv_dtype
    if steer:
        from weightsmith.inspect.steering import Steering

        llm.steering = Steering(llm.model, list(steer)).start()
    return llm
