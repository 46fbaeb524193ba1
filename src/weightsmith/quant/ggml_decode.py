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
- IQ2_XXS 66: d, per 32 weights 4 grid indices and a word of four 7-bit KSIGNS indices (bits 7l)
  and a 4-bit scale (bits 28-31); w = d (0.5 + sc) / 4 grid * sign.
- IQ2_XS 74: d, 32 halves (9-bit grid index, 7-bit KSIGNS index), 8 bytes of scale nibbles (per
  16 weights, low first); w as IQ2_XXS. IQ2_S 82: d, 32 index bytes, 32 sign bytes (bit j of
  byte i: weight 8i + j), 8 bytes of 2-bit index highs (bits 2j of byte i: index 4i + j), scales
  as IQ2_XS.
- IQ3_XXS 98: d, 64 grid indices (4 weights each), 8 words as IQ2_XXS's;
  w = d (0.5 + sc) / 2 grid * sign.
  IQ3_S 110: d, 64 index bytes, 8 bytes of 9th index bits (bit j of byte i: index 8i + j), 32 sign
  bytes, 4 bytes of scale nibbles (per 32 weights); w = d (1 + 2 sc) grid * sign.
- IQ1_S 50: d, 32 index bytes, 8 halves per 32 weights (bits 3l: index l's high 3 bits, bits
  12-14 scale, bit 15 the sign of delta); w = d (2 sc + 1) (grid +- 0.125).
  IQ1_M 56: 32 index bytes, 16 bytes (a nibble per index: high 3 bits, then delta's sign), 4 halves
  of 3-bit scales per 16 weights (bits 3j) whose top nibbles make d; w as IQ1_S.
- TQ1_0 54: 48 + 4 bytes of 5 (4) base-3 digits (digit p of byte x: ((x 3^p mod 256) 3) >> 8; byte
  l, digit p: weight 32p + l, then 160 + 16p + l, 240 + 4p + l), d; w = d (digit - 1).
  TQ2_0 66: 64 bytes of 2-bit codes as Q2_K, d; w = d (q - 1).
- MXFP4 17: e8m0 exponent e (d = 2^(e - 128)), 16 bytes of nibbles as IQ4_NL's;
  w = d MXFP4_LEVELS[q].

Not here: the C kernels (cpu_ggml.c), the layer (ggml_linear.py), writing blocks (kquants.py).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from weightsmith.quant.iq4 import LEVELS
from weightsmith.quant.iq_tables import KSIGNS, grid

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
    16: ("IQ2_XXS", 256, 66, 2),
    17: ("IQ2_XS", 256, 74, 2),
    22: ("IQ2_S", 256, 82, 2),
    18: ("IQ3_XXS", 256, 98, 3),
    21: ("IQ3_S", 256, 110, 3),
    19: ("IQ1_S", 256, 50, 1),
    29: ("IQ1_M", 256, 56, 1),
    34: ("TQ1_0", 256, 54, 2),
    35: ("TQ2_0", 256, 66, 2),
    39: ("MXFP4", 32, 17, 4),
}
#: MXFP4's e2m1 values, doubled (its scale is halved to match).
MXFP4_LEVELS = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)
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


def _bit_list(b: torch.Tensor) -> torch.Tensor:
    """(nb, n) bytes -> (nb, 8n): bit j of byte i at 8i + j (Q5's fifth bits: weight j, bit j)."""
    return _bits(b, tuple(range(8)), 1).transpose(1, 2).reshape(b.shape[0], -1)


def _levels(q: torch.Tensor) -> torch.Tensor:
    return torch.tensor(LEVELS, dtype=torch.float32, device=q.device)[q.long()]


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    return _half(b, 0) * (_nibbles(b[:, 2:18]).to(torch.int8) - 8).float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return _half(b, 0) * _nibbles(b[:, 4:20]).float() + _half(b, 2)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 6:22]) | _bit_list(b[:, 2:6]) << 4
    return _half(b, 0) * (q.to(torch.int8) - 16).float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 8:24]) | _bit_list(b[:, 4:8]) << 4
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


_TABLES: dict[tuple[int | str, torch.device], torch.Tensor] = {}


def _table(key: int | str, device: torch.device) -> torch.Tensor:
    """A constant int8 table on `device`, built once a device: a grid-coded type's grid (points,
    width), "signs" (KSIGNS as +-1, (128, 8): bit j of entry i) or "mxfp4" (MXFP4_LEVELS)."""
    table = _TABLES.get((key, device))
    if table is None:
        if key == "signs":
            host = 1 - 2 * ((KSIGNS[:, None] >> np.arange(8)) & 1)
        else:
            host = np.array(MXFP4_LEVELS if key == "mxfp4" else grid(int(key)))
        table = _TABLES[(key, device)] = torch.from_numpy(host.astype(np.int8)).to(device)
    return table


def _u16(b: torch.Tensor) -> torch.Tensor:
    """(nb, 2n) bytes -> (nb, n) little-endian halves as int64."""
    p = b.reshape(b.shape[0], -1, 2).long()
    return p[..., 0] | p[..., 1] << 8


def _u32(b: torch.Tensor) -> torch.Tensor:
    """(nb, 4n) bytes -> (nb, n) little-endian words as int64."""
    p = b.reshape(b.shape[0], -1, 4).long()
    return p[..., 0] | p[..., 1] << 8 | p[..., 2] << 16 | p[..., 3] << 24


def _pm(bits: torch.Tensor) -> torch.Tensor:
    """Sign bits -> int8 +1 (0) / -1 (1)."""
    return 1 - 2 * bits.to(torch.int8)


def _ksigned(b: torch.Tensor, aux: torch.Tensor, g: torch.Tensor, factor: float) -> torch.Tensor:
    """IQ2_XXS / IQ3_XXS: aux (nb, 8) words (four 7-bit KSIGNS indices at bits 7l, the scale at
    bits 28-31) of the grid values g (nb, 8, 32); w = ((d (0.5 + sc)) factor) (g sign)."""
    nb = b.shape[0]
    signs = _table("signs", b.device)[_bits(aux, (0, 7, 14, 21), 127).transpose(1, 2)]
    db = (_half(b, 0) * ((aux >> 28).float() + 0.5) * factor).view(nb, 8, 1)
    return (db * (g * signs.reshape(nb, 8, 32)).float()).reshape(nb, 256)


def _iq2_xxs(b: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    q = b[:, 2:66].reshape(nb, 8, 8)  # per 32 weights: 4 grid indices, then the word
    g = _table(16, b.device)[q[..., :4].long()].view(nb, 8, 32)
    return _ksigned(b, _u32(q[..., 4:].reshape(nb, 32)), g, 0.25)


def _iq3_xxs(b: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    g = _table(18, b.device)[b[:, 2:66].long()].view(nb, 8, 32)
    return _ksigned(b, _u32(b[:, 66:98]), g, 0.5)


def _iq2_scaled(b: torch.Tensor, scales: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """IQ2_XS / IQ2_S: a scale nibble per 16 weights (byte i: 2i low, 2i + 1 high) of the signed
    grid values g (nb, 32, 8); w = ((d (0.5 + sc)) / 4) g."""
    nb = b.shape[0]
    sc = _bits(scales, (0, 4), 15).transpose(1, 2).reshape(nb, 16)
    db = (_half(b, 0) * (sc.float() + 0.5) * 0.25).view(nb, 16, 1)
    return (db * g.reshape(nb, 16, 16).float()).reshape(nb, 256)


def _iq2_xs(b: torch.Tensor) -> torch.Tensor:
    q = _u16(b[:, 2:66])  # (nb, 32): 9-bit grid index, 7-bit KSIGNS index
    g = _table(17, b.device)[q & 511] * _table("signs", b.device)[q >> 9]
    return _iq2_scaled(b, b[:, 66:74], g)


def _iq2_s(b: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    high = _bits(b[:, 66:74], (0, 2, 4, 6), 3).transpose(1, 2).reshape(nb, 32)
    g = _table(22, b.device)[b[:, 2:34].long() | high.long() << 8]
    return _iq2_scaled(b, b[:, 74:82], g * _pm(_bit_list(b[:, 34:66])).view(nb, 32, 8))


def _iq3_s(b: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    g = _table(21, b.device)[b[:, 2:66].long() | _bit_list(b[:, 66:74]).long() << 8].view(nb, 8, 32)
    g = g * _pm(_bit_list(b[:, 74:106])).view(nb, 8, 32)
    sc = _bits(b[:, 106:110], (0, 4), 15).transpose(1, 2).reshape(nb, 8)
    db = (_half(b, 0) * (2 * sc.float() + 1)).view(nb, 8, 1)
    return (db * g.float()).reshape(nb, 256)


def _iq1_s(b: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    qh = _u16(b[:, 34:50])  # (nb, 8): per 32 weights
    idx = b[:, 2:34].reshape(nb, 8, 4).long() | _bits(qh, (0, 3, 6, 9), 7).transpose(1, 2) << 8
    dl = (_half(b, 0) * (2 * ((qh >> 12) & 7) + 1).float()).view(nb, 8, 1, 1)
    delta = (0.125 - 0.25 * (qh >> 15).float()).view(nb, 8, 1, 1)
    return (dl * (_table(19, b.device)[idx].float() + delta)).reshape(nb, 256)


def _iq1_m(b: torch.Tensor) -> torch.Tensor:
    nb, top = b.shape[0], b[:, 49:56:2] >> 4  # d: the top nibbles of the 4 halves, low first
    d = (top[:, 0::2] | top[:, 1::2] << 4).contiguous().view(torch.float16).float()
    sc = _bits(_u16(b[:, 48:56]), (0, 3, 6, 9), 7).transpose(1, 2).reshape(nb, 16)
    dl = (d * (2 * sc + 1).float()).view(nb, 16, 1)
    qh = _bits(b[:, 32:48], (0, 4), 15).transpose(1, 2).reshape(nb, 32)  # index 2i + h: nibble h
    delta = (0.125 - 0.25 * (qh >> 3).float()).view(nb, 32, 1)
    g = _table(19, b.device)[b[:, :32].long() | (qh & 7).long() << 8].float() + delta
    return (dl * g.view(nb, 16, 16)).reshape(nb, 256)


def _tq1_0(b: torch.Tensor) -> torch.Tensor:
    nb, x = b.shape[0], b[:, :52].int()

    def trits(part: torch.Tensor, n: int) -> torch.Tensor:  # digit p of byte l at p * len + l
        return torch.stack([part * 3**p & 255 for p in range(n)], dim=1).reshape(nb, -1)

    q = torch.cat([trits(x[:, :32], 5), trits(x[:, 32:48], 5), trits(x[:, 48:], 4)], dim=1)
    return _half(b, 52) * ((q * 3 >> 8) - 1).float()


def _tq2_0(b: torch.Tensor) -> torch.Tensor:
    q = _crumbs(b[:, :64]).reshape(b.shape[0], 256)
    return _half(b, 64) * (q.to(torch.int8) - 1).float()


def _mxfp4(b: torch.Tensor) -> torch.Tensor:
    e = b[:, :1].int()  # d = 2^(e - 128): subnormal below e = 2
    d = torch.where(e < 2, 0x00200000 * (e + 1), (e - 1) << 23).view(torch.float32)
    return d * _table("mxfp4", b.device)[_nibbles(b[:, 1:17]).long()].float()


_DECODE: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    2: _q4_0, 3: _q4_1, 6: _q5_0, 7: _q5_1, 8: _q8_0, 10: _q2_k, 11: _q3_k, 12: _q4_k, 13: _q5_k,
    14: _q6_k, 20: _iq4_nl, 23: _iq4_xs, 16: _iq2_xxs, 17: _iq2_xs, 22: _iq2_s, 18: _iq3_xxs,
    21: _iq3_s, 19: _iq1_s, 29: _iq1_m, 34: _tq1_0, 35: _tq2_0, 39: _mxfp4,
}  # fmt: skip


def dequantize_blocks(rows: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """float32 (N, k) on `rows`' device from N rows of GGUF blocks (uint8 (N, row bytes)) of
    ggml type `qtype` (a GGMLLinear type: Q4_0 to Q8_0, Q2_K to Q6_K, IQ4_NL, IQ4_XS, the
    grid-coded IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, and TQ1_0, TQ2_0, MXFP4)."""
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
