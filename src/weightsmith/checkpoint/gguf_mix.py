"""Which GGML type each tensor of a GGUF export is stored in (`--quant`), and its bytes.

`--quant` names one of llama.cpp's file types. As llama.cpp's `llama-quantize` does for that
type (without an importance matrix), most matrices are stored in the type's base and a few get
more bits where rounding costs the most, so that a file we write holds the same types per
tensor as one `llama-quantize` makes from the same model (tests/test_gguf_kquants.py compares
them where llama-cpp-python is installed):

- the LM head (or the embedding, when the model ties them) is Q6_K for every quantized type
  but Q8_0; Q8_0 if its rows are not a multiple of 256;
- `*_m` types: attn_v and ffn_down of the first and last eighth of the layers and of every
  third layer between them (`more_bits`) are Q6_K; `q4_k_s`: attn_v of the first 4 layers and
  ffn_down of the first eighth are Q5_K (Phi-3's fused attn_qkv is ruled as attn_v);
- `q3_k_m`: attn_output and ffn_down Q4_K (ffn_down Q5_K in the first sixteenth), attn_v Q5_K
  in the first two layers and Q4_K after; `q3_k_l`: those three Q5_K; `q2_k`: those three Q3_K,
  attn_v Q4_K with 4 or more heads a key/value head;
- `iq4_nl` / `iq4_xs`: attn_v Q5_K with 4 or more heads a key/value head; ffn_down Q5_K in the
  first eighth of the layers, unless an importance matrix is given (as llama-quantize does);
- models with 8 experts (Mixtral): attn_k and attn_v are Q8_0, and attn_output Q5_K for q4_k_*,
  q3_k_s, q3_k_m, q2_k and the iq4 types;
- a k-quant matrix whose rows are not a multiple of 256 falls back as llama.cpp does (Q4_K to
  Q5_0, Q5_K to Q5_1, Q6_K to Q8_0, Q2_K and Q3_K to Q4_0, IQ4_XS to IQ4_NL), and one whose rows
  are not a multiple of 32 to F16.

With an importance matrix (`export --imatrix`), `Mix.encode` weighs each matrix's fits by its
entry (checkpoint/imatrix.py), and the file records it under llama-quantize's
`quantize.imatrix.*` keys.

Vectors (norms, biases) and MoE routers stay F32. Not here: the blocks themselves
(quant/kquants.py), names and metadata (gguf_write.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from weightsmith.quant.kquants import QK_K, quantize_blocks

_FT = gguf.LlamaFileType
#: --quant value -> (GGML type of most matrices, llama.cpp's general.file_type).
QUANTS: dict[str, tuple[QT, gguf.LlamaFileType]] = {
    "f32": (QT.F32, _FT.ALL_F32),
    "f16": (QT.F16, _FT.MOSTLY_F16),
    "q8_0": (QT.Q8_0, _FT.MOSTLY_Q8_0),
    "q6_k": (QT.Q6_K, _FT.MOSTLY_Q6_K),
    "q5_k_m": (QT.Q5_K, _FT.MOSTLY_Q5_K_M),
    "q5_k_s": (QT.Q5_K, _FT.MOSTLY_Q5_K_S),
    "q4_k_m": (QT.Q4_K, _FT.MOSTLY_Q4_K_M),
    "q4_k_s": (QT.Q4_K, _FT.MOSTLY_Q4_K_S),
    "q3_k_l": (QT.Q3_K, _FT.MOSTLY_Q3_K_L),
    "q3_k_m": (QT.Q3_K, _FT.MOSTLY_Q3_K_M),
    "q3_k_s": (QT.Q3_K, _FT.MOSTLY_Q3_K_S),
    "q2_k": (QT.Q2_K, _FT.MOSTLY_Q2_K),
    "iq4_xs": (QT.IQ4_XS, _FT.MOSTLY_IQ4_XS),
    "iq4_nl": (QT.IQ4_NL, _FT.MOSTLY_IQ4_NL),
    "q5_1": (QT.Q5_1, _FT.MOSTLY_Q5_1),
    "q5_0": (QT.Q5_0, _FT.MOSTLY_Q5_0),
    "q4_1": (QT.Q4_1, _FT.MOSTLY_Q4_1),
    "q4_0": (QT.Q4_0, _FT.MOSTLY_Q4_0),
}
if hasattr(_FT, "MOSTLY_MXFP4_MOE"):  # gguf 0.17+ knows MXFP4
    # llama.cpp's MXFP4_MOE (what gpt-oss ships as): the experts in MXFP4, every other matrix Q8_0.
    QUANTS["mxfp4_moe"] = (QT.Q8_0, _FT.MOSTLY_MXFP4_MOE)
_K_FALLBACK = {
    QT.Q2_K: QT.Q4_0, QT.Q3_K: QT.Q4_0, QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0,
    QT.IQ4_XS: QT.IQ4_NL,
}  # fmt: skip
_IQ4 = ("iq4_nl", "iq4_xs")
#: The type the low-bit mixes give ffn_down and (without 8 experts) attn_output: a step up.
_STEP_UP = {"q2_k": QT.Q3_K, "q3_k_m": QT.Q4_K, "q3_k_l": QT.Q5_K}
_BLOCK = 32  # weights per block of the legacy types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)
_LAYER = re.compile(r"blk\.(\d+)\.(\w+?)\.weight")


def more_bits(layer: int, layers: int) -> bool:
    """The layers `*_m` types give more bits: the first and last eighth, every third between."""
    eighth = layers // 8
    return layer < eighth or layer >= 7 * layers // 8 or (layer - eighth) % 3 == 2


@dataclass
class Mix:
    """What the rules read of a model, and the fallbacks taken while writing its tensors."""

    quant: str
    layers: int
    experts: int = 0
    has_output: bool = True
    gqa: int = 1  # attention heads per key/value head (q2_k's attn_v takes Q4_K from 4)
    #: llama.cpp's "70B" (a llama with 80 layers and grouped KV heads): attn_v Q3_K/Q4_K -> Q5_K.
    seventy_b: bool = False
    imatrix: Any = None  # checkpoint.imatrix.Imatrix: weighs the fits of the matrices it covers
    #: with an importance matrix: how many quantized matrices it weighed, and which it lacked.
    weighted: int = 0
    unweighted: list[str] = field(default_factory=list)
    #: tensor name -> "FROM -> TO" for every tensor whose rows did not fit its type's blocks.
    fallbacks: dict[str, str] = field(default_factory=dict)

    def tensor_type(self, name: str, shape: tuple[int, ...]) -> QT:
        """The type `name` (of `shape`, rows last) is stored in."""
        base = QUANTS[self.quant][0]
        if len(shape) < 2 or base == QT.F32 or name.endswith((".bias", "ffn_gate_inp.weight")):
            return QT.F32
        if base == QT.F16:
            return QT.F16
        if self.quant == "mxfp4_moe":  # stacked experts (E, out, in): MXFP4; the rest Q8_0
            chosen = QT.MXFP4 if len(shape) == 3 else QT.Q8_0
            return chosen if shape[-1] % _BLOCK == 0 else self._fallback(name, chosen, QT.F16)
        chosen = self._rule(name, shape[-1], base)
        wanted = chosen
        if chosen in _K_FALLBACK and shape[-1] % QK_K:
            chosen = _K_FALLBACK[chosen]
        if shape[-1] % _BLOCK:
            chosen = QT.F16
        if chosen != wanted:
            self.fallbacks[name] = f"{wanted.name} -> {chosen.name}"
        return chosen

    def _fallback(self, name: str, wanted: QT, chosen: QT) -> QT:
        self.fallbacks[name] = f"{wanted.name} -> {chosen.name}"
        return chosen

    def _rule(self, name: str, cols: int, base: QT) -> QT:
        if name == "output.weight" or (name == "token_embd.weight" and not self.has_output):
            return QT.Q8_0 if cols % QK_K or base == QT.Q8_0 else QT.Q6_K
        match = _LAYER.fullmatch(name)
        if match is None:
            return base
        layer, kind = int(match.group(1)), match.group(2)
        medium = self.quant in ("q4_k_m", "q5_k_m")
        if kind in ("attn_v", "attn_qkv"):  # Phi-3's fused q/k/v is ruled as attn_v
            chosen = base
            if self.quant == "q2_k":
                chosen = QT.Q4_K if self.gqa >= 4 else QT.Q3_K
            elif self.quant in ("q3_k_m", "q3_k_l"):
                chosen = QT.Q5_K if self.quant == "q3_k_l" or layer < 2 else QT.Q4_K
            elif medium and more_bits(layer, self.layers):
                chosen = QT.Q6_K
            elif self.quant == "q4_k_s" and layer < 4:
                chosen = QT.Q5_K
            elif self.quant in _IQ4 and self.gqa >= 4:
                chosen = QT.Q5_K
            if self.seventy_b and chosen in (QT.Q3_K, QT.Q4_K):  # 8 heads share each attn_v row
                chosen = QT.Q5_K
            return QT.Q8_0 if self.experts == 8 else chosen
        if kind == "attn_k":
            return QT.Q8_0 if self.experts == 8 else base
        if kind.startswith("ffn_down"):
            if self.quant in _STEP_UP:  # q3_k_m: two steps in the first sixteenth
                return (
                    QT.Q5_K if self.quant == "q3_k_m" and layer < self.layers // 16 else _STEP_UP[self.quant]
                )
            if medium and more_bits(layer, self.layers):
                return QT.Q6_K
            if self.quant == "q4_k_s" and layer < self.layers // 8:
                return QT.Q5_K
            if self.quant in _IQ4 and layer < self.layers // 8 and self.imatrix is None:
                return QT.Q5_K
            return base
        if kind == "attn_output":
            if self.experts == 8:  # llama.cpp's list for 8 experts leaves q3_k_l at its base
                low = ("q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m", *_IQ4)
                return QT.Q5_K if self.quant in low else base
            return _STEP_UP.get(self.quant, base)
        return base

    def encode(self, name: str, w: np.ndarray, qtype: QT) -> np.ndarray:
        """The bytes (or float array) `writer.add_tensor` takes for `w` stored as `qtype`; its fits
        weighted by the importance matrix's entry for `name` where there is one."""
        if qtype == QT.F32:
            return np.ascontiguousarray(w, dtype=np.float32)
        if qtype == QT.F16:
            return np.ascontiguousarray(w, dtype=np.float16)
        if qtype.name == "MXFP4":  # gguf-py's port of ggml's reference quantizer (no weighted fit)
            return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)
        importance = None
        if self.imatrix is not None and qtype != QT.Q8_0:
            importance = self.imatrix.importance(name, w.shape)
            if importance is None and name.startswith("blk."):  # embedding, output: as llama.cpp's
                self.unweighted.append(name)
            elif importance is not None:
                self.weighted += 1
        return quantize_blocks(np.ascontiguousarray(w, dtype=np.float32), qtype, importance=importance)

    def add_imatrix_metadata(self, writer: gguf.GGUFWriter) -> None:
        """llama-quantize's record of the importance matrix a file was quantized with."""
        if self.imatrix is None:
            return
        writer.add_string("quantize.imatrix.file", self.imatrix.path)
        if self.imatrix.datasets:
            writer.add_string("quantize.imatrix.dataset", self.imatrix.datasets[0])
        writer.add_int32("quantize.imatrix.entries_count", len(self.imatrix.sums))
        writer.add_int32("quantize.imatrix.chunks_count", self.imatrix.chunk_count)
