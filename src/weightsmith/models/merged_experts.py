"""gpt-oss's merged expert tensors, split into one projection per expert and merged back.

gpt-oss checkpoints hold each layer's experts as four tensors (transformers' layout):

    mlp.experts.gate_up_proj       (E, h, 2I)  expert e's gate in columns 0, 2, 4, ..., up in 1, 3, ...
    mlp.experts.gate_up_proj_bias  (E, 2I)     the same interleaving
    mlp.experts.down_proj          (E, I, h)
    mlp.experts.down_proj_bias     (E, h)

OpenAI's published files store the two matrices in MXFP4 instead: `gate_up_proj_blocks`
(E, 2I, h/32, 16) bytes, two 4-bit codes each (the low nibble first), and `gate_up_proj_scales`
(E, 2I, h/32), a power-of-two exponent per 32 weights (biased by 127); rows there are outputs, as
in a linear layer's weight. Each code is an E2M1 number (sign, two exponent bits, one mantissa bit).

The model keeps one `Linear` per expert projection (`mlp.experts.3.gate_proj`, design principle
4), so quantization, LoRA and the CPU kernels see ordinary layers: `split_experts` turns the
checkpoint's tensors into those, one expert at a time (an MXFP4 matrix is decoded expert by
expert, never whole); `merge_experts` writes them back in transformers' unquantized layout.
Kept quantized (`keep_mxfp4`), an MXFP4 expert matrix becomes ggml's MXFP4 blocks instead (the
same codes and exponents, reordered: `ggml_mxfp4`), the `qweight` of a GGMLLinear.

Not here: the MoE block (model.py), Phi-3's fused projections (fused.py), GGUF's per-kind expert
tensors (checkpoint/gguf_experts.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

from weightsmith.errors import CheckpointError
from weightsmith.models.config import ModelConfig

#: `model.layers.3.mlp.experts.gate_up_proj_blocks` -> (`model.layers.3.mlp.experts`, `gate_up_proj`, `_blocks`)
MERGED = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)(_bias|_blocks|_scales)?")

Named = tuple[str, torch.Tensor, str]


def e2m1_values() -> torch.Tensor:
    """The 16 values of a 4-bit E2M1 code, by code: sign in bit 3, exponent in bits 2-1 (bias 1;
    0 is subnormal), mantissa in bit 0."""
    codes = torch.arange(16)
    exp, man = (codes >> 1) & 3, (codes & 1).float()
    magnitude = torch.where(exp == 0, man / 2, (1 + man / 2) * torch.exp2(exp.float() - 1))
    return torch.where(codes >= 8, -magnitude, magnitude)


def decode_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(..., G, 16) bytes and (..., G) exponents -> (..., G * 32) fp32 weights, each byte's low
    nibble first; a weight is its E2M1 value times 2^(scale - 127)."""
    codes = torch.stack((blocks & 15, blocks >> 4), dim=-1).flatten(-2).long()  # (..., G, 32)
    values = e2m1_values()[codes]
    return torch.ldexp(values, scales.long()[..., None] - 127).flatten(-2)


def ggml_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(..., G, 16) bytes and (..., G) exponents -> ggml's MXFP4 rows (..., G * 17): per block the
    exponent byte, then 16 bytes whose low nibbles are codes 0-15 and high nibbles codes 16-31
    (ggml halves the scale and doubles the E2M1 table: the same values)."""
    codes = torch.stack((blocks & 15, blocks >> 4), dim=-1).flatten(-2)  # (..., G, 32)
    packed = codes[..., :16] | (codes[..., 16:] << 4)
    return torch.cat((scales[..., None], packed), dim=-1).flatten(-2).contiguous()


def split_experts(cfg: ModelConfig, tensors: Iterable[Named], keep_mxfp4: bool = False) -> Iterator[Named]:
    """The tensors with each of gpt-oss's merged expert tensors (bf16 or MXFP4) replaced by one
    tensor per expert under the model's names; other families' tensors pass through. With
    `keep_mxfp4`, an MXFP4 matrix's experts come as ggml blocks named `...gate_proj.qweight`."""
    if cfg.family.moe != "gpt_oss":
        yield from tensors
        return
    halves: dict[tuple[str, str], Named] = {}  # an MXFP4 matrix's blocks or scales, until the other
    for name, tensor, source in tensors:
        m = MERGED.fullmatch(name)
        if m is None:
            yield name, tensor, source
            continue
        stem, kind, suffix = m.group(1), m.group(2), m.group(3) or ""
        if suffix in ("_blocks", "_scales"):
            other = halves.pop((f"{stem}.{kind}", "_scales" if suffix == "_blocks" else "_blocks"), None)
            if other is None:
                halves[(f"{stem}.{kind}", suffix)] = (name, tensor, source)
                continue
            blocks, scales = (tensor, other[1]) if suffix == "_blocks" else (other[1], tensor)
            yield from _mxfp4_experts(cfg, stem, kind, blocks, scales, source, keep_mxfp4)
        else:
            yield from _dense_experts(cfg, stem, kind, suffix, tensor, source)
    for name, _, source in halves.values():
        partner = name[: -len("_blocks")] + "_scales" if name.endswith("_blocks") else name[:-7] + "_blocks"
        raise CheckpointError(
            f"{source}: MXFP4 tensor {name!r} has no {partner!r}; re-download the checkpoint"
        )


def _widths(cfg: ModelConfig, kind: str) -> tuple[int, int]:
    """(inputs, outputs) of one expert's `kind` matrix (gate and up together)."""
    h, i = cfg.hidden_size, cfg.moe_intermediate_size or cfg.intermediate_size
    return (h, 2 * i) if kind == "gate_up_proj" else (i, h)


def _per_expert(
    stem: str, kind: str, suffix: str, e: int, rows: torch.Tensor, source: str
) -> Iterator[Named]:
    """Expert e's tensors from its (outputs, ...) rows of `kind`: gate and up de-interleaved."""
    if kind == "down_proj":
        yield f"{stem}.{e}.down_proj{suffix}", rows.contiguous(), source
        return
    yield f"{stem}.{e}.gate_proj{suffix}", rows[0::2].contiguous(), source
    yield f"{stem}.{e}.up_proj{suffix}", rows[1::2].contiguous(), source


def _dense_experts(
    cfg: ModelConfig, stem: str, kind: str, suffix: str, tensor: torch.Tensor, source: str
) -> Iterator[Named]:
    n_in, n_out = _widths(cfg, kind)
    n = cfg.num_local_experts
    expected = (n, n_out) if suffix == "_bias" else (n, n_in, n_out)
    if tuple(tensor.shape) != expected:
        raise CheckpointError(
            f"{source}: tensor '{stem}.{kind}{suffix}' has shape {tuple(tensor.shape)}, expected {expected} "
            "from config.json; the weights and config do not match"
        )
    for e in range(n):
        rows = tensor[e] if suffix == "_bias" else tensor[e].t()  # (outputs, inputs)
        yield from _per_expert(stem, kind, ".bias" if suffix else ".weight", e, rows, source)


def _mxfp4_experts(
    cfg: ModelConfig,
    stem: str,
    kind: str,
    blocks: torch.Tensor,
    scales: torch.Tensor,
    source: str,
    keep: bool,
) -> Iterator[Named]:
    n_in, n_out = _widths(cfg, kind)
    n = cfg.num_local_experts
    want = (n, n_out, n_in // 32)
    if n_in % 32 or blocks.dtype != torch.uint8 or tuple(blocks.shape) != (*want, 16):
        raise CheckpointError(
            f"{source}: tensor '{stem}.{kind}_blocks' is {tuple(blocks.shape)} {blocks.dtype}, expected "
            f"{(*want, 16)} uint8 from config.json; the weights and config do not match"
        )
    if scales.dtype != torch.uint8 or tuple(scales.shape) != want:
        raise CheckpointError(
            f"{source}: tensor '{stem}.{kind}_scales' is {tuple(scales.shape)} {scales.dtype}, expected "
            f"{want} uint8 from config.json; the weights and config do not match"
        )
    for e in range(n):  # one expert decoded at a time
        rows = ggml_mxfp4(blocks[e], scales[e]) if keep else decode_mxfp4(blocks[e], scales[e])
        yield from _per_expert(stem, kind, ".qweight" if keep else ".weight", e, rows, source)


def merge_experts(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with each layer's per-expert tensors merged into transformers' four (unquantized),
    at the position of the layer's first expert tensor."""
    if cfg.family.moe != "gpt_oss":
        return state
    expert = re.compile(
        r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|bias)"
    )
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[tuple[int, str, str], torch.Tensor]] = {}
    for name, t in state.items():
        m = expert.fullmatch(name)
        if m is None:
            out[name] = t
            continue
        stem = m.group(1)
        if stem not in parts:
            parts[stem] = {}
            out[stem] = t  # a placeholder that keeps the order
        parts[stem][(int(m.group(2)), m.group(3), m.group(4))] = t
    for stem, got in parts.items():
        del out[stem]
        out.update(_merged(cfg, stem, got))
    return out


def _merged(
    cfg: ModelConfig, stem: str, got: dict[tuple[int, str, str], torch.Tensor]
) -> dict[str, torch.Tensor]:
    n = cfg.num_local_experts
    missing = [
        k
        for k in (
            (e, p, w)
            for e in range(n)
            for p in ("gate_proj", "up_proj", "down_proj")
            for w in ("weight", "bias")
        )
        if k not in got
    ]
    assert not missing, f"{stem}: expert tensors {missing[:3]} missing from the state dict"

    def interleaved(what: str) -> torch.Tensor:  # (E, 2I[, h]): gate and up rows alternating
        gate = torch.stack([got[(e, "gate_proj", what)] for e in range(n)])
        up = torch.stack([got[(e, "up_proj", what)] for e in range(n)])
        return torch.stack((gate, up), dim=2).flatten(1, 2)

    down = torch.stack([got[(e, "down_proj", "weight")] for e in range(n)])  # (E, h, I)
    return {
        f"{stem}.gate_up_proj": interleaved("weight").transpose(1, 2).contiguous(),
        f"{stem}.gate_up_proj_bias": interleaved("bias"),
        f"{stem}.down_proj": down.transpose(1, 2).contiguous(),
        f"{stem}.down_proj_bias": torch.stack([got[(e, "down_proj", "bias")] for e in range(n)]),
    }
