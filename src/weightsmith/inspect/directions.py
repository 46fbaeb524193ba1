"""Difference-of-means directions in the residual stream, and their files.

A direction separates two sets of prompts (say harmful and harmless requests): at each layer,
the mean residual stream (`blocks.L.hook_resid_pre`, the last layer's `hook_resid_post` as
index L) at the last prompt token over the positive set minus the same over the negative
set. Prompts are wrapped in the checkpoint's chat template as a user turn, so the last token
is the end of the assistant header, where Arditi et al. (2024) "Refusal in language models
is mediated by a single direction" read it. Every layer's direction is kept; the file also
names a recommended layer: the one, among the first 80% (as their selection; not the
embedding, layer 0), where the two
sets' projections on it are furthest apart in pooled standard deviations (Cohen's d).

File: safetensors with one tensor `directions` (L+1, hidden) in fp32 (and, when `--select`
chose an activation addition, `add_directions` of the same shape, the differences of means at
its prompt position, with `recommended_add` in the metadata) and string metadata:
the model's weights fingerprint (models/fingerprint.py), the sets and their sha256, counts,
the recommended layer, per-layer separations and the code version. `read_direction` checks a
file against a model before anything runs: format, width, layer count, fingerprint.

Not here: reading prompt sets from packs (weightsmith.commands.inspect), steering (steering.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from weightsmith.files import atomic_file
from weightsmith.inspect.hooks import InspectError
from weightsmith.inspect.trace import run_hooked
from weightsmith.models.model import CausalLM

FORMAT = "weightsmith-direction-v1"
#: The optional second tensor: the directions chosen for activation addition (addition.py).
ADD_KEY = "add_directions"
#: A direction file is a few MB at most ((layers + 1) x hidden fp32); refuse anything far larger.
MAX_FILE_BYTES = 256 << 20


@dataclass
class Direction:
    """Difference-of-means directions at every layer, with where they came from."""

    vectors: torch.Tensor  # (L+1, h): index l is blocks.l.hook_resid_pre, index L the final stream
    layer: int  # the recommended layer
    meta: dict[str, str] = field(default_factory=dict)
    #: (L+1, h) for activation addition, chosen apart from `vectors` (`inspect direction
    #: --select`; its prompt position may differ), with `meta["recommended_add"]` naming layer and scale
    add_vectors: torch.Tensor | None = None

    def at(self, layer: int | None = None) -> torch.Tensor:
        return self.vectors[self.layer if layer is None else layer]


def stream_names(model: CausalLM) -> list[str]:
    n = len(model.model.layers)
    return [f"blocks.{i}.hook_resid_pre" for i in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat and tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
    return tokenizer.encode(prompt)


@torch.no_grad()
def last_token_streams(
    model: CausalLM, tokenizer, prompts: Sequence[str], *, chat: bool = True, progress: Callable | None = None
) -> torch.Tensor:
    """The stream at the last token of each prompt at every layer: (N, L+1, h) fp32."""
    names = stream_names(model)
    rows = []
    for i, prompt in enumerate(prompts):
        ids = prompt_ids(tokenizer, prompt, chat)
        _, cache = run_hooked(model, torch.tensor([ids]), keep=names)
        rows.append(torch.stack([cache[n][0, -1] for n in names]).float().cpu())
        if progress is not None:
            progress(i + 1, len(prompts))
    return torch.stack(rows)


def separations(pos: torch.Tensor, neg: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Cohen's d of the two sets' projections on each layer's direction: (L+1,)."""
    unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (L+1, h)
    p, n = (pos * unit).sum(-1), (neg * unit).sum(-1)  # (N, L+1)
    pooled = ((p.var(0, unbiased=len(p) > 1) + n.var(0, unbiased=len(n) > 1)) / 2).sqrt().clamp_min(1e-12)
    return (p.mean(0) - n.mean(0)) / pooled


def difference_of_means(
    model: CausalLM,
    tokenizer,
    positive: Sequence[str],
    negative: Sequence[str],
    *,
    chat: bool = True,
    layer: int | None = None,
    progress: Callable | None = None,
) -> Direction:
    """Mean stream over `positive` minus over `negative` at every layer (see the module doc)."""
    for what, prompts in (("positive", positive), ("negative", negative)):
        if not prompts:
            raise InspectError(f"the {what} prompt set is empty; give at least one prompt")
    n_layers = len(model.model.layers)
    check_layer(layer, n_layers)
    pos = last_token_streams(model, tokenizer, positive, chat=chat, progress=progress)
    neg = last_token_streams(model, tokenizer, negative, chat=chat, progress=progress)
    vectors = pos.mean(0) - neg.mean(0)  # (L+1, h)
    seps = separations(pos, neg, vectors)
    if layer is None:  # layer 0 is the last token's embedding, one token for every templated prompt
        eligible = max(2, int(0.8 * n_layers))
        layer = 1 + int(seps[1:eligible].abs().argmax())
    meta = {
        "separation": json.dumps([round(float(s), 4) for s in seps]),
        "positive_count": str(len(positive)),
        "negative_count": str(len(negative)),
        "positive_sha256": prompts_digest(positive),
        "negative_sha256": prompts_digest(negative),
        "chat_template": str(bool(chat and tokenizer.chat_template)).lower(),
        "position": "last prompt token",
    }
    return Direction(vectors, layer, meta)


def prompts_digest(prompts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode()).hexdigest()


def check_layer(layer: int | None, n_layers: int, where: str = "layer") -> None:
    if layer is not None and not 0 <= layer <= n_layers:
        raise InspectError(f"{where}={layer} is out of range: this model's stream has layers 0..{n_layers}")


def write_direction(path: Path, direction: Direction, provenance: dict[str, str]) -> dict[str, str]:
    """Save atomically as safetensors; returns the metadata written. `provenance` should name the
    model and its fingerprint (`model_sha256`, which `read_direction` checks), the sets and the
    code version."""
    from safetensors.torch import save_file

    meta = {
        "format": FORMAT,
        "layer": str(direction.layer),
        "num_layers": str(direction.vectors.shape[0] - 1),
        "hidden_size": str(direction.vectors.shape[1]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **direction.meta,
        **{k: str(v) for k, v in provenance.items()},
    }
    tensors = {"directions": direction.vectors.float().contiguous()}
    if direction.add_vectors is not None:
        tensors[ADD_KEY] = direction.add_vectors.float().contiguous()
    with atomic_file(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return meta


def read_direction(path: Path, *, hidden_size: int, num_layers: int, fingerprint: str | None) -> Direction:
    """A direction file checked against a model (width, layers, weights fingerprint); one line if not."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InspectError(f"no direction file at {path}; make one with `weightsmith inspect direction`")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise InspectError(f"{path} is {path.stat().st_size} bytes, too large for a direction file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, keys = f.metadata() or {}, sorted(f.keys())
            vectors = (
                f.get_tensor("directions") if keys in (["directions"], [ADD_KEY, "directions"]) else None
            )
            add = f.get_tensor(ADD_KEY) if ADD_KEY in keys else None
    except Exception as e:  # safetensors raises its own error types for a broken header
        raise InspectError(
            f"{path} is not a safetensors file ({e}); make one with `weightsmith inspect direction`"
        ) from e
    if meta.get("format") != FORMAT or vectors is None or vectors.ndim != 2:
        raise InspectError(
            f"{path} is not a weightsmith direction file (no {FORMAT!r} metadata and `directions` tensor)"
        )
    if add is not None and add.shape != vectors.shape:
        raise InspectError(
            f"{path}: {ADD_KEY} has shape {tuple(add.shape)}, not that of directions {tuple(vectors.shape)}"
        )
    if vectors.shape[1] != hidden_size:
        raise InspectError(
            f"{path} holds directions of width {vectors.shape[1]} but this model's hidden size is "
            f"{hidden_size}; extract one for this model"
        )
    if vectors.shape[0] != num_layers + 1:
        raise InspectError(f"{path} has {vectors.shape[0] - 1} layers but this model has {num_layers}")
    theirs = meta.get("model_sha256")
    if fingerprint is not None and theirs != fingerprint:
        raise InspectError(
            f"{path} was extracted from other weights (sha256 {str(theirs)[:12]}..., this model's are "
            f"{fingerprint[:12]}...: another model, adapter, dtype or device); extract it on this model"
        )
    try:
        layer = int(meta.get("layer", ""))
    except ValueError:
        raise InspectError(f"{path}: metadata field 'layer' is not an integer") from None
    check_layer(layer, num_layers, f"{path}: layer")
    return Direction(vectors.float(), layer, dict(meta), None if add is None else add.float())
