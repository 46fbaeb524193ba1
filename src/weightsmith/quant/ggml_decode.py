"""GGUF blocks dequantized with tensor ops, on whatever device holds them.

`GGMLLinear` on a GPU (or on a CPU where the C kernels cannot be built) multiplies by its weight
dequantized per call: this module computes that weight on the blocks' own device, so a GGUF
file's matrices kept quantized on CUDA never go through the host. Bit for bit
`gguf.quants.dequantize` (the float32 products are taken in gguf-py's order: d times the
sub-block scale first, then times the code, then minus d_min times the sub-block minimum), as
the C dequantizer (quant/cpu_ggml.c) is; the tests hold all three to each other.

Layouts (ggml's; bytes of one block, little-endian halves):
- Q4_0 18: d, 16 bytes of nibbles (byte j: weight j low, j + 16 high); w = d (q - 8).
  Q4_1 20: d, m, nibbles; w = d q + m. IQ4_NL 18: as Q4_0; w = d LEVELS[q].
- Q5_0 22: d, 32 fifth bits (bit j of the 4 bytes: weight j), nibbles; w = d (q - 16).
  Q5_1 24: d, m, fifth bits, nibbles; w = d q + m.
- Q8_0 34: d, 32 int8 codes; w = d q.
- Q2_K 84: 16 bytes of 4-bit scale | 4-bit min, 64 bytes of 2-bit codes (byte 32h + l holds
  weights 128h + 32j + l at bits 2j), d, d_min; w = d sc q - d_min m per 16 weights.
- Q3_K 110: 32 bytes of high bits (weight 32j + l: bit j of byte l), 64 bytes of 2-bit codes as
  Q2_K, 12 bytes of 6-bit scales, d; code = low - 4 when the high bit is 0; w = d (sc - 32) code.
- Q4_K 144 / Q5_K 176: d, d_min, 12 bytes of eight 6-bit scales and mins (`_scale_min`),
  (Q5_K: 32 bytes of fifth bits, weight 32j + l: bit j of byte l), 128 bytes of nibbles (byte
  32i + l: weight 64i + l low, 64i + 32 + l high); w = d sc q - d_min m per 32 weights.
- Q6_K 210: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8 scales, d;
  w = d sc (q - 32) per 16 weights.
- IQ4_XS 136: d, 2 bytes of high scale bits, 4 bytes of low scale nibbles, 128 bytes of
  nibbles (16 a block of 32, as IQ4_NL's); w = d (sc - 32) LEVELS[q] per 32 weights.

Not here: the C kernels (cpu_ggml.c), the layer (ggml_linear.py), writing blocks (kquants.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from weightsmith.quant.iq4 import LEVELS

#: The types GGMLLinear runs (re-exported there): ggml type id (gguf.GGMLQuantizationType) -> (name, weights per block, bytes per block, bits).
GGML_TYPES = {
    2: ("Q4_0", 32, 18, 4),
    3: ("Q4_1", 32, 20, 4),
    6: ("Q5_0", 32, 22, 5),
    7: ("Q5_1", 32, 24, 5),
    8: ("Q8_0", 32, 34, 8),
    12: ("Q4_K", 256, 144, 4),
    13: ("Q5_K", 256, 176, 5),
    14: ("Q6_K", 256, 210, 6),
    10: ("Q2_K", 256, 84, 2),
    11: ("Q3_K", 256, 110, 3),
    20: ("IQ4_NL", 32, 18, 4),
    23: ("IQ4_XS", 256, 136, 4),
}
#: Rows decoded at a time: bounds the float32 temporaries to tens of MB for any matrix.
_WEIGHTS_AT_ONCE = 1 << 22


def _half(b: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 at bytes `at`, `at + 1` of each block (nb, size) as float32 (nb, 1)."""
    return b[:, at : at + 2].contiguous().view(torch.float16).float()


def _bits(b: torch.Tensor, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """(nb, n) bytes -> (nb, len(shifts), n): each byte shifted right by each shift, masked."""
    s = torch.tensor(shifts, dtype=torch.uint8, device=b.device).view(1, -1, 1)
    return (b.unsqueeze(1) >> s) & mask


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(nb, 16) bytes -> (nb, 32) codes: weight j low nibble of byte j, weight j + 16 high."""
    return _bits(qs, (0, 4), 15).reshape(qs.shape[0], 32)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """(nb, 4) bytes -> (nb, 32): bit j of the little-endian word, weight j."""
    return _bits(qh, tuple(range(8)), 1).transpose(1, 2).reshape(qh.shape[0], 32)


def _levels(q: torch.Tensor) -> torch.Tensor:
    return torch.tensor(LEVELS, dtype=torch.float32, device=q.device)[q.long()]


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    return _half(b, 0) * (_nibbles(b[:, 2:18]).to(torch.int8) - 8).float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return _half(b, 0) * _nibbles(b[:, 4:20]).float() + _half(b, 2)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 6:22]) | _fifth_bits(b[:, 2:6]) << 4
    return _half(b, 0) * (q.to(torch.int8) - 16).float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 8:24]) | _fifth_bits(b[:, 4:8]) << 4
    return _half(b, 0) * q.float() + _half(b, 2)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:34].contiguous().view(torch.int8).float() * _half(b, 0)


def _iq4_nl(b: torch.Tensor) -> torch.Tensor:
    return _half(b, 0) * _levels(_nibbles(b[:, 2:18]))


def _crumbs(qs: torch.Tensor) -> torch.Tensor:
    """(nb, 64) bytes of 2-bit codes -> (nb, 16, 16): byte 32h + l holds weight 128h + 32j + l."""
    return _bits(qs.reshape(-1, 32), (0, 2, 4, 6), 3).reshape(qs.shape[0], 16, 16)


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    nb, sc = b.shape[0], b[:, :16]
    dl = (_half(b, 80) * (sc & 15).float()).view(nb, 16, 1)
    ml = (_half(b, 82) * (sc >> 4).float()).view(nb, 16, 1)
    return (dl * _crumbs(b[:, 16:80]).float() - ml).reshape(nb, 256)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    nb, scales = b.shape[0], b[:, 96:108]
    low = _bits(scales[:, :8], (0, 4), 15).reshape(nb, 16)
    high = _bits(scales[:, 8:12], (0, 2, 4, 6), 3).reshape(nb, 16)
    dl = (_half(b, 108) * ((low | high << 4).to(torch.int8) - 32).float()).view(nb, 16, 1)
    hbit = _bits(b[:, :32], tuple(range(8)), 1).reshape(nb, 16, 16)  # weight 32j + l: bit j of byte l
    q = _crumbs(b[:, 32:96]).to(torch.int8) - ((hbit ^ 1) << 2).to(torch.int8)
    return (dl * q.float()).reshape(nb, 256)


def _scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins (nb, 8): bytes 0-3 hold
    scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7, bytes 4-7 the same for the mins,
    bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and mins 4-7 (high nibble)."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=1)
    return sc, mn


def _k_affine(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    sc, mn = _scale_min(b[:, 4:16])
    d = (_half(b, 0) * sc.float()).view(nb, 8, 1)
    dm = (_half(b, 2) * mn.float()).view(nb, 8, 1)
    return (d * q.float() - dm).reshape(nb, 256)


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(nb, 128) -> (nb, 8, 32): byte 32i + l holds weight 64i + l low and 64i + 32 + l high."""
    return _bits(qs.reshape(-1, 32), (0, 4), 15).reshape(qs.shape[0], 8, 32)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    return _k_affine(b, _k_nibbles(b[:, 16:144]))


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    high = _bits(b[:, 16:48], tuple(range(8)), 1)  # (nb, 8, 32): weight 32j + l, bit j of byte l
    return _k_affine(b, _k_nibbles(b[:, 48:176]) | high << 4)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    d = (_half(b, 208) * b[:, 192:208].contiguous().view(torch.int8).float()).view(nb, 16, 1)
    low = _bits(b[:, :128].reshape(-1, 64), (0, 4), 15).reshape(nb, 8, 32)
    high = _bits(b[:, 128:192].reshape(-1, 32), (0, 2, 4, 6), 3).reshape(nb, 8, 32)
    q = ((low | high << 4).to(torch.int8) - 32).reshape(nb, 16, 16)
    return (d * q.float()).reshape(nb, 256)


def _iq4_xs(b: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    low = _bits(b[:, 4:8], (0, 4), 15).transpose(1, 2).reshape(nb, 8)  # block 2i + s: byte i >> 4s
    high = _bits(b[:, 2:4], (0, 2, 4, 6), 3).transpose(1, 2).reshape(nb, 8)  # block j: bits 2j
    dl = (_half(b, 0) * ((low | high << 4).to(torch.int8) - 32).float()).view(nb, 8, 1)
    q = _nibbles(b[:, 8:136].reshape(-1, 16)).reshape(nb, 8, 32)
    return (dl * _levels(q)).reshape(nb, 256)


_DECODE: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    2: _q4_0, 3: _q4_1, 6: _q5_0, 7: _q5_1, 8: _q8_0, 10: _q2_k, 11: _q3_k, 12: _q4_k, 13: _q5_k,
    14: _q6_k, 20: _iq4_nl, 23: _iq4_xs,
}  # fmt: skip


def dequantize_blocks(rows: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """float32 (N, k) on `rows`' device from N rows of GGUF blocks (uint8 (N, row bytes)) of
    ggml type `qtype` (a GGMLLinear type: Q4_0 to Q8_0, Q2_K to Q6_K, IQ4_NL, IQ4_XS)."""
    if qtype not in _DECODE:
        raise ValueError(f"ggml type {qtype} is not one this module dequantizes")
    n, per = rows.shape[0], GGML_TYPES[qtype][1]
    out = torch.empty(n, k, dtype=torch.float32, device=rows.device)
    step = max(1, _WEIGHTS_AT_ONCE // max(k, 1))
    for start in range(0, n, step):
        part = rows[start : start + step]
        blocks = part.reshape(part.shape[0] * (k // per), -1)
        out[start : start + step] = _DECODE[qtype](blocks).reshape(part.shape[0], k)
    return out
