"""Text embeddings from a decoder: one unit vector per text, read off the last layer.

A text's token ids run through the model; the last layer's hidden states, after the final norm
(what transformers calls `last_hidden_state`), are pooled into one vector as the checkpoint
says (checkpoint/pooling.py) or as asked: "last" (the last token's state: Qwen3-Embedding,
gte-Qwen2, E5-Mistral, and vLLM's default for a decoder), "mean" (the mean over the text's
tokens) or "first". The vector is scaled to unit length (L2), as OpenAI's embeddings, llama.cpp's
and sentence-transformers' Normalize module give them; with `dimensions` only its first
`dimensions` values are kept, then scaled to unit length again (OpenAI's shortening, right for
Matryoshka-trained models such as Qwen3-Embedding).

Texts of different lengths share a batch, padded on the right with no attention mask: a
causal model's position i reads positions <= i only, so a text's own states never see the
padding after it (tested equal to transformers run one text at a time). Batches hold texts
of similar length (sorted), at most `budget` token positions each; a longer text runs alone.

Not here: the pooling a checkpoint names (checkpoint/pooling.py), the HTTP route
(serve/embedding_route.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from weightsmith.checkpoint.pooling import POOLINGS
from weightsmith.errors import UsageError
from weightsmith.lora import adapter_active, lora_layers
from weightsmith.models import CausalLM

#: Token positions (rows x the longest row) run in one forward pass. Activations of ~1k
#: positions stay in cache: on the default model (2 threads, AMD EPYC Zen 4) 512-1024 took
#: 0.75-0.8x the time of 4096, and 128 or 2048 more than 1024.
BUDGET = 1024
#: The pooling of a checkpoint that names none: the last token's state, as vLLM pools a decoder.
DEFAULT_POOLING = "last"


def check_pooling(pooling: str, source: str = "pooling") -> str:
    """`pooling` when it is one computed here; otherwise a UsageError naming `source`."""
    if pooling not in POOLINGS:
        raise UsageError(f"{source}: {pooling!r} pooling is not supported; use one of {', '.join(POOLINGS)}")
    return pooling


def check_dimensions(dimensions: int | None, hidden: int) -> None:
    if dimensions is not None and not 1 <= dimensions <= hidden:
        raise UsageError(f"dimensions {dimensions}: must be between 1 and the model's {hidden}")


@torch.inference_mode()
def embed_ids(
    model: CausalLM,
    texts: Sequence[Sequence[int]],
    pooling: str,
    *,
    pad_id: int = 0,
    adapter: str | None = None,
    dimensions: int | None = None,
    budget: int = BUDGET,
) -> torch.Tensor:
    """(N, dimensions or hidden) fp32 unit vectors of the token-id lists `texts` (each non-empty);
    `adapter`, a LoRA adapter loaded in `model`, runs alone (None: the base model)."""
    check_pooling(pooling)
    hidden = model.config.hidden_size
    check_dimensions(dimensions, hidden)
    if any(len(t) == 0 for t in texts):
        raise UsageError("an empty text has no embedding; give at least one token")
    device = model.inv_freq.device
    out = torch.empty((len(texts), hidden), dtype=torch.float32)
    running = adapter_active(model, adapter) if lora_layers(model) else contextlib.nullcontext()
    with running:
        for group in batches([len(t) for t in texts], budget):
            width = max(len(texts[i]) for i in group)
            inputs = torch.full((len(group), width), pad_id, dtype=torch.long)
            for row, i in enumerate(group):
                inputs[row, : len(texts[i])] = torch.as_tensor(texts[i], dtype=torch.long)
            lengths = torch.tensor([len(texts[i]) for i in group])
            states = model.hidden_states(inputs.to(device))  # (B, T, h), before the final norm
            out[group] = pool(model, states, lengths.to(device), pooling).float().cpu()
    if dimensions is not None:
        out = out[:, :dimensions]
    return F.normalize(out, dim=-1)


def pool(model: CausalLM, states: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, h) pooled, final-normed states of (B, T, h) rows whose first `lengths` positions are
    the text (the rest padding)."""
    if pooling == "mean":  # the norm is per position: norm every text position, then average
        normed = model.model.norm(states).float()
        real = (torch.arange(states.shape[1], device=states.device) < lengths[:, None]).float()
        return (normed * real[..., None]).sum(1) / lengths[:, None].float()
    at = lengths - 1 if pooling == "last" else torch.zeros_like(lengths)
    return model.model.norm(states[torch.arange(states.shape[0], device=states.device), at])


def batches(lengths: Sequence[int], budget: int) -> Iterator[list[int]]:
    """Indices of texts in groups of similar length whose padded size is within `budget`."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    group: list[int] = []
    for i in order:
        if group and (len(group) + 1) * lengths[i] > budget:  # sorted: lengths[i] is the widest
            yield group
            group = []
        group.append(i)
    if group:
        yield group
