"""k-quant GGUF export (`export --quant q4_k_m` etc.): the blocks, their error against llama.cpp's
quantizer, each tensor's type against `llama-quantize`'s, and the files loading back.

gguf-py's dequantizers (ggml's layouts in numpy, not ours) decode every block we write. Where
llama-cpp-python is installed, the error is compared with ggml's own quantizer on the same
weights and the type of every tensor with `llama_model_quantize` on the same model; without it,
with the errors ggml's quantizer had on these seeded weights (recorded below).
"""

from __future__ import annotations

import ctypes
import json
from collections import Counter
from pathlib import Path

import gguf.quants
import numpy as np
import pytest
import torch
from conftest import build_tiny_tokenizer_dir
from gguf import GGML_QUANT_SIZES, GGUFReader
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

import weightsmith
from weightsmith.checkpoint.gguf import open_gguf, read_gguf
from weightsmith.checkpoint.gguf_mix import QUANTS, Mix, more_bits
from weightsmith.checkpoint.gguf_write import export_gguf
from weightsmith.checkpoint.load import load_checkpoint
from weightsmith.cli.main import main
from weightsmith.errors import CheckpointError
from weightsmith.quant import cpu_kernels
from weightsmith.quant.kquants import BLOCK_BYTES, quantize_blocks

transformers = pytest.importorskip("transformers")

KQUANTS = (QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K)
#: RMSE of ggml's quantizer (ggml 0.25.3 from llama-cpp-python 0.3.36, `ggml_quantize_chunk`
#: without an importance matrix) on `seeded()`'s weights, as dequantized by gguf-py.
GGML_RMSE = {
    ("normal", QT.Q2_K): 5.91644e-03,
    ("normal", QT.Q3_K): 3.01480e-03,
    ("normal", QT.Q4_K): 1.42558e-03,
    ("normal", QT.Q5_K): 7.22535e-04,
    ("normal", QT.Q6_K): 3.54848e-04,
    ("student-t", QT.Q2_K): 9.56351e-03,
    ("student-t", QT.Q3_K): 5.17257e-03,
    ("student-t", QT.Q4_K): 2.43352e-03,
    ("student-t", QT.Q5_K): 1.23191e-03,
    ("student-t", QT.Q6_K): 6.39514e-04,
    ("uniform", QT.Q2_K): 6.73831e-03,
    ("uniform", QT.Q3_K): 3.62836e-03,
    ("uniform", QT.Q4_K): 1.57316e-03,
    ("uniform", QT.Q5_K): 7.97645e-04,
    ("uniform", QT.Q6_K): 3.84505e-04,
}


#: The most of ggml's RMSE ours may have: the fits weigh by sqrt(sigma2 + w^2) where ggml's weigh
#: by |w| (Q2_K) or w^2 (Q3_K, Q6_K), measured 0.87-0.94x, 0.95-0.97x and 0.97-0.98x; Q4_K and
#: Q5_K keep ggml's rms + |w| (0.99x, 0.97x).
MOST = {QT.Q2_K: 0.95, QT.Q3_K: 0.98, QT.Q4_K: 1.0, QT.Q5_K: 0.98, QT.Q6_K: 0.98}


def seeded() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "normal": (rng.standard_normal((64, 1024)) * 0.02).astype(np.float32),
        "student-t": (rng.standard_t(4, (64, 1024)) * 0.02).astype(np.float32),
        "uniform": rng.uniform(-0.05, 0.05, (64, 1024)).astype(np.float32),
    }


def rmse(blocks: np.ndarray, qtype: QT, w: np.ndarray) -> float:
    return float(np.sqrt(((dequantize(blocks, qtype) - w) ** 2).mean()))


def ggml_quantizer():
    """ggml's `ggml_quantize_chunk` from llama-cpp-python's library, or None."""
    try:
        import llama_cpp
    except ImportError:
        return None
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = (
        [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    )

    def quantize(w: np.ndarray, qtype: QT) -> np.ndarray:
        w = np.ascontiguousarray(w, dtype=np.float32)
        per, size = GGML_QUANT_SIZES[qtype]
        out = np.zeros((w.shape[0], w.shape[1] // per * size), dtype=np.uint8)
        assert (
            lib.ggml_quantize_chunk(int(qtype), w.ctypes.data, out.ctypes.data, 0, *w.shape, None)
            == out.nbytes
        )
        return out

    return quantize


# ---------------------------------------------------------------------------------------------
# Blocks


@pytest.mark.parametrize("kernels", [True, False], ids=["C", "torch"])
@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda q: q.name)
def test_blocks_decode_to_the_weights_with_less_error_than_ggml(qtype: QT, kernels: bool) -> None:
    """Our blocks, decoded by gguf-py, are closer to the weights than ggml's quantizer gets (its
    recorded error, and its live error where llama-cpp-python is installed; by MOST), from the C kernels
    (quant/cpu_kquant.c) and from the tensor passes alike."""
    if kernels and cpu_kernels.library() is None:
        pytest.skip("the C kernels cannot be built here")
    theirs = ggml_quantizer()
    for name, w in seeded().items():
        blocks = quantize_blocks(w, qtype, kernels=kernels)
        assert blocks.shape == (64, 4 * BLOCK_BYTES[qtype]) and blocks.dtype == np.uint8
        ours = rmse(blocks, qtype, w)
        assert ours <= MOST[qtype] * GGML_RMSE[name, qtype], (name, ours / GGML_RMSE[name, qtype])
        if theirs is not None:
            assert ours <= MOST[qtype] * rmse(theirs(w, qtype), qtype, w), name


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "importance"])
@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda q: q.name)
def test_the_c_kernels_take_the_steps_of_the_tensor_passes(qtype: QT, weighted: bool) -> None:
    """Same algorithm, sums in another order: nearly every block is the same bytes, and the
    error is the same to 0.1%, with and without an importance matrix's weights."""
    if cpu_kernels.library() is None:
        pytest.skip("the C kernels cannot be built here")
    w = seeded()["student-t"]
    imp = np.random.default_rng(2).lognormal(0, 1, w.shape[1]).astype(np.float32) if weighted else None
    c = quantize_blocks(w, qtype, importance=imp)
    py = quantize_blocks(w, qtype, kernels=False, importance=imp)
    same = (c.reshape(-1, BLOCK_BYTES[qtype]) == py.reshape(-1, BLOCK_BYTES[qtype])).all(1).mean()
    assert same > 0.9
    assert abs(rmse(c, qtype, w) / rmse(py, qtype, w) - 1) < 1e-3


def test_more_bits_means_less_error() -> None:
    w = seeded()["normal"]
    errors = [rmse(quantize_blocks(w, qtype), qtype, w) for qtype in KQUANTS]
    ratios = [a / b for a, b in zip(errors[:-1], errors[1:], strict=True)]  # Q2_K/Q3_K .. Q5_K/Q6_K
    assert all(1.75 < r < 2.5 for r in ratios), ratios  # each bit about halves the error


def edge_rows() -> dict[str, np.ndarray]:
    """Rows of 256 weights that stress a quantizer, by name."""
    rng = np.random.default_rng(3)
    return {
        "zeros": np.zeros(256),
        "zero sub-blocks": np.concatenate([np.zeros(128), rng.standard_normal(128)]),
        "constant": np.full(256, 0.37),
        "negative constant": np.full(256, -2.5),
        "positive": rng.uniform(1, 2, 256),
        "negative": -rng.uniform(1, 2, 256),
        "tiny": rng.standard_normal(256) * 1e-9,
        "huge": rng.standard_normal(256) * 1e4,
        "outlier": np.concatenate([[50.0], rng.standard_normal(255) * 0.01]),
    }


@pytest.mark.parametrize("kernels", [True, False], ids=["C", "torch"])
@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda q: q.name)
def test_edge_blocks(qtype: QT, kernels: bool) -> None:
    """Zeros stay zero, a constant stays within fp16's precision, one-signed, tiny, huge and
    outlier blocks decode finitely near their weights; 3-D (stacked experts) keeps its shape."""
    rows = edge_rows()
    w = np.stack(list(rows.values())).astype(np.float32)
    back = dequantize(quantize_blocks(w, qtype, kernels=kernels), qtype)
    assert np.isfinite(back).all()
    err = np.abs(back - w)
    by_name = dict(zip(rows, err, strict=True))
    assert (by_name["zeros"] == 0).all() and (by_name["zero sub-blocks"][:128] == 0).all()
    for name in ("constant", "negative constant"):
        assert (by_name[name] <= 2e-3 * abs(w[list(rows).index(name), 0])).all(), name
    levels = {QT.Q2_K: 3, QT.Q3_K: 7, QT.Q4_K: 15, QT.Q5_K: 31, QT.Q6_K: 63}[qtype]
    for name in ("zero sub-blocks", "positive", "negative", "huge"):
        x = w[list(rows).index(name)]
        # Well within one step of a 32-weight range cut into the type's levels.
        assert np.sqrt((by_name[name] ** 2).mean()) < (x.max() - x.min()) / levels, name
    assert by_name["tiny"].max() < 1e-8
    assert by_name["outlier"][0] < 1.0  # the outlier keeps its size; its sub-block pays for it
    stacked = np.stack([w[:4], w[4:8]])
    assert quantize_blocks(stacked, qtype, kernels=kernels).shape == (2, 4, BLOCK_BYTES[qtype])


LEGACY = (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0)


def legacy_rows() -> np.ndarray:
    """Blocks of 32 that take each branch of the 32-weight quantizers: seeded normal, Student-t
    and uniform rows, and blocks of zeros, -0.0, constants, equal magnitudes of both signs (the
    first one sets Q4_0's sign), a lone weight, scales that round to a subnormal half, scales past fp16's range
    (infinity), weights on the Q4 grid (exact halves) and one outlier."""
    rng = np.random.default_rng(11)
    blocks = [
        rng.standard_normal((64, 32)) * 0.02,
        rng.standard_t(3, (64, 32)),
        rng.uniform(-1, 1, (64, 32)),
        np.zeros((1, 32)),
        np.full((1, 32), -0.0),
        np.full((1, 32), 0.3),
        np.full((1, 32), -7.0),
        np.tile([2.0, -2.0, 1.0, 0.5], (1, 8)),
        np.tile([-2.0, 2.0, 1.0, -0.5], (1, 8)),
        rng.standard_normal((2, 32)) * 1e-9,
        rng.standard_normal((2, 32)) * 3e6,
        rng.integers(-8, 8, (4, 32)) * 0.125,
        np.concatenate([[50.0], rng.standard_normal(31) * 0.01])[None],
        np.eye(1, 32, 17) * -3.0,  # one weight: the others are codes of zero
    ]
    return np.concatenate(blocks).astype(np.float32).reshape(-1, 64)


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda q: q.name)
def test_the_32_weight_types_are_ggml_reference_bytes(qtype: QT) -> None:
    """Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 from the C kernels are byte for byte gguf-py's ports of
    ggml's reference quantizers, and ggml's own where llama-cpp-python is installed, on every
    branch (`legacy_rows`); stacked (3-D) weights keep their shape."""
    if cpu_kernels.library() is None:
        pytest.skip("the C kernels cannot be built here")
    w = legacy_rows()
    ours = quantize_blocks(w, qtype)
    with np.errstate(over="ignore"):  # the scales past fp16's range become infinity there too
        ported = gguf.quants.quantize(w, qtype)
    per_block = ours.shape[-1] // 2
    blocks, ported = ours.reshape(-1, per_block), ported.reshape(-1, per_block)
    minus_zeros = np.flatnonzero((w.reshape(-1, 32) == 0).all(1) & np.signbit(w.reshape(-1, 32)[:, 0]))
    assert len(minus_zeros) == 1
    if qtype in (QT.Q4_0, QT.Q5_0):
        # ggml starts its search for the largest magnitude from +0.0, so a block of zeros gets
        # d = +0.0 / -8 = -0.0 (half 0x8000); gguf-py's port takes the first weight, -0.0 here.
        assert blocks[minus_zeros[0], :2].tolist() == [0x00, 0x80]
        ported[minus_zeros[0], :2] = [0x00, 0x80]
    assert np.array_equal(blocks, ported)
    theirs = ggml_quantizer()
    if theirs is not None:
        assert np.array_equal(ours, theirs(w, qtype))
    assert np.array_equal(quantize_blocks(w.reshape(2, -1, 64), qtype), ours.reshape(2, -1, ours.shape[-1]))


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_blocks(np.zeros((2, 320), np.float32), QT.Q4_K)
    for kernels in (True, False):  # the C kernels check as they quantize, the others before
        for qtype, bad in ((QT.Q6_K, np.nan), (QT.Q8_0, np.inf), (QT.Q4_1, -np.inf)):
            w = np.ones((3, 256), np.float32)
            w[2, 200] = bad
            with pytest.raises(ValueError, match="NaN"):
                quantize_blocks(w, qtype, kernels=kernels)
    with pytest.raises(ValueError, match="not a type this module writes"):
        quantize_blocks(np.zeros((1, 256), np.float32), QT.IQ2_XS)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_blocks(np.zeros((1, 48), np.float32), QT.Q8_0)


# ---------------------------------------------------------------------------------------------
# Which tensor gets which type


def test_more_bits_layers() -> None:
    """llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third between."""
    assert [i for i in range(8) if more_bits(i, 8)] == [0, 3, 6, 7]
    assert [i for i in range(24) if more_bits(i, 24)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23]
    assert [i for i in range(30) if more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


def test_mix_rules() -> None:
    wide, narrow = (1024, 2048), (1024, 576)
    mix = Mix("q4_k_m", layers=8)
    assert mix.tensor_type("output.weight", wide) == QT.Q6_K
    assert mix.tensor_type("output.weight", narrow) == QT.Q8_0
    assert mix.tensor_type("token_embd.weight", wide) == QT.Q4_K
    assert mix.tensor_type("output_norm.weight", (2048,)) == QT.F32
    assert mix.tensor_type("blk.0.attn_q.bias", (2048,)) == QT.F32
    assert [mix.tensor_type(f"blk.{i}.attn_v.weight", wide).name for i in range(8)] == [
        "Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q6_K"
    ]  # fmt: skip
    assert mix.tensor_type("blk.3.ffn_down.weight", wide) == QT.Q6_K
    assert mix.tensor_type("blk.3.ffn_up.weight", wide) == QT.Q4_K
    assert mix.tensor_type("blk.3.attn_q.weight", narrow) == QT.Q5_0  # rows of 576: no k-quant
    assert mix.tensor_type("blk.3.attn_v.weight", narrow) == QT.Q8_0
    assert mix.tensor_type("blk.1.attn_k.weight", (64, 48)) == QT.F16
    assert "output.weight" not in mix.fallbacks  # Q8_0 was its rule's choice, not a fallback
    assert mix.fallbacks["blk.3.attn_q.weight"] == "Q4_K -> Q5_0"
    assert mix.fallbacks["blk.3.attn_v.weight"] == "Q6_K -> Q8_0"
    assert mix.fallbacks["blk.1.attn_k.weight"] == "Q4_K -> F16"
    tied = Mix("q5_k_s", layers=8, has_output=False)
    assert tied.tensor_type("token_embd.weight", wide) == QT.Q6_K
    assert tied.tensor_type("blk.0.attn_v.weight", wide) == QT.Q5_K
    q8 = Mix("q8_0", layers=8, has_output=False)
    assert q8.tensor_type("token_embd.weight", wide) == QT.Q8_0
    small = Mix("q4_k_s", layers=16)
    assert [small.tensor_type(f"blk.{i}.attn_v.weight", wide).name for i in (0, 3, 4)] == [
        "Q5_K",
        "Q5_K",
        "Q4_K",
    ]
    assert [small.tensor_type(f"blk.{i}.ffn_down.weight", wide).name for i in (1, 2)] == ["Q5_K", "Q4_K"]
    moe = Mix("q4_k_m", layers=4, experts=8)
    assert moe.tensor_type("blk.1.attn_k.weight", wide) == QT.Q8_0
    assert moe.tensor_type("blk.1.attn_output.weight", wide) == QT.Q5_K
    assert moe.tensor_type("blk.1.ffn_gate_inp.weight", (8, 2048)) == QT.F32
    assert moe.tensor_type("blk.3.ffn_down_exps.weight", (8, 2048, 2048)) == QT.Q6_K  # last eighth
    assert moe.tensor_type("blk.1.ffn_down_exps.weight", (8, 2048, 2048)) == QT.Q4_K


def test_low_bit_mix_rules() -> None:
    """q2_k and q3_k_*, as llama.cpp's llama_tensor_get_type rules them (ggml 0.25.3)."""
    wide, narrow = (1024, 2048), (1024, 576)

    def types(quant: str, kind: str, layers=(0, 1, 2, 31), **kw) -> list[str]:
        mix = Mix(quant, layers=32, **kw)
        return [mix.tensor_type(f"blk.{i}.{kind}.weight", wide).name for i in layers]

    assert types("q2_k", "attn_q") == ["Q2_K"] * 4
    assert types("q2_k", "attn_v") == ["Q3_K"] * 4 and types("q2_k", "attn_v", gqa=4) == ["Q4_K"] * 4
    assert types("q2_k", "ffn_down") == types("q2_k", "attn_output") == ["Q3_K"] * 4
    assert types("q3_k_s", "attn_v") == types("q3_k_s", "ffn_down") == ["Q3_K"] * 4
    assert types("q3_k_m", "attn_v") == types("q3_k_m", "attn_qkv") == ["Q5_K", "Q5_K", "Q4_K", "Q4_K"]
    assert types("q3_k_m", "ffn_down") == ["Q5_K", "Q5_K", "Q4_K", "Q4_K"]  # the first 32 / 16
    assert types("q3_k_m", "attn_output") == ["Q4_K"] * 4
    assert types("q3_k_l", "attn_v") == types("q3_k_l", "ffn_down") == ["Q5_K"] * 4
    assert types("q3_k_l", "attn_output") == ["Q5_K"] * 4 and types("q3_k_l", "ffn_up") == ["Q3_K"] * 4
    # 8 experts: attn_k/attn_v in Q8_0, attn_output in Q5_K, except for q3_k_l (left at Q3_K)
    for quant in ("q2_k", "q3_k_s", "q3_k_m"):
        assert types(quant, "attn_output", experts=8) == ["Q5_K"] * 4
        assert types(quant, "attn_v", experts=8) == types(quant, "attn_k", experts=8) == ["Q8_0"] * 4
    assert types("q3_k_l", "attn_output", experts=8) == ["Q3_K"] * 4
    # rows of 576: Q2_K and Q3_K fall back to Q4_0, the output to Q8_0
    mix = Mix("q3_k_m", layers=32)
    assert mix.tensor_type("blk.5.ffn_up.weight", narrow) == QT.Q4_0
    assert mix.tensor_type("blk.5.attn_v.weight", narrow) == QT.Q5_0  # Q4_K's fallback
    assert mix.tensor_type("output.weight", narrow) == QT.Q8_0
    assert mix.fallbacks == {"blk.5.ffn_up.weight": "Q3_K -> Q4_0", "blk.5.attn_v.weight": "Q4_K -> Q5_0"}
    assert Mix("q2_k", layers=32).tensor_type("token_embd.weight", narrow) == QT.Q4_0
    # llama.cpp's "70B" (80 llama layers, grouped KV heads): attn_v's Q3_K / Q4_K become Q5_K
    big = {q: Mix(q, layers=80, gqa=8, seventy_b=True) for q in ("q2_k", "q3_k_s", "q4_k_m", "q6_k")}
    assert [big[q].tensor_type("blk.11.attn_v.weight", wide).name for q in big] == [
        "Q5_K",
        "Q5_K",
        "Q5_K",
        "Q6_K",
    ]
    assert big["q4_k_m"].tensor_type("blk.0.attn_v.weight", wide) == QT.Q6_K  # more_bits stays
    assert big["q4_k_m"].tensor_type("blk.11.attn_k.weight", wide) == QT.Q4_K


# ---------------------------------------------------------------------------------------------
# Whole models

#: Rows of 256 and 512 (k-quant super-blocks fit), 9 layers (`more_bits` picks 0, 3, 6, 7, 8).
WIDE = dict(
    vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=9, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, eos_token_id=2,
)  # fmt: skip
IDS = torch.tensor([[5, 17, 40, 100, 250, 3, 77, 299, 12, 64]])


def build(path: Path, model_cls, config) -> Path:
    build_tiny_tokenizer_dir(path)
    torch.manual_seed(0)
    model_cls(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    return build(
        tmp_path_factory.mktemp("wide"), transformers.LlamaForCausalLM, transformers.LlamaConfig(**WIDE)
    )


def logits(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_checkpoint(path, decode_layout=False).model(IDS).float()


def test_k_quant_exports_load_back_with_their_types_and_errors(wide: Path, tmp_path: Path) -> None:
    ref = logits(wide)
    errors = {}
    # (base type, blk.0's ffn_down, blk.1's): 9 layers, so `more_bits` gives blk.0 and not blk.1
    expected = {
        "q6_k": ("Q6_K", "Q6_K", "Q6_K"),
        "q5_k_m": ("Q5_K", "Q6_K", "Q5_K"),
        "q4_k_m": ("Q4_K", "Q6_K", "Q4_K"),
        "q4_k_s": ("Q4_K", "Q5_K", "Q4_K"),
        "q3_k_l": ("Q3_K", "Q5_K", "Q5_K"),
        "q3_k_m": ("Q3_K", "Q4_K", "Q4_K"),  # Q5_K only in the first sixteenth: none of 9 layers
        "q3_k_s": ("Q3_K", "Q3_K", "Q3_K"),
        "q2_k": ("Q2_K", "Q3_K", "Q3_K"),
    }
    for quant, (base, down0, down1) in expected.items():
        out = tmp_path / f"m-{quant}.gguf"
        summary = export_gguf(wide, out, quant)
        types = {t.name: t.tensor_type.name for t in open_gguf(out).tensors}
        assert GGUFReader(out).fields["general.file_type"].contents() == QUANTS[quant][1]
        assert read_gguf(out).file_type == quant.upper()
        assert summary["fallbacks"] == {} and summary["tensors"] == dict(
            sorted(Counter(types.values()).items())
        )
        assert types["output.weight"] == "Q6_K" and types["blk.1.attn_q.weight"] == base
        assert (types["blk.0.ffn_down.weight"], types["blk.1.ffn_down.weight"]) == (down0, down1)
        errors[quant] = (logits(out) - ref).abs().mean().item()
    for quant in ("q8_0", "q4_0", "iq4_nl", "iq4_xs"):
        export_gguf(wide, tmp_path / f"m-{quant}.gguf", quant)
        errors[quant] = (logits(tmp_path / f"m-{quant}.gguf") - ref).abs().mean().item()
    # Fewer bits, more error; Q4_K (4.5 bits a weight) beats Q4_0 (4.5 bits) on the same model.
    # (Whether the `_m` layers' extra bits pay is not visible on random weights.)
    assert errors["q8_0"] < errors["q6_k"] < errors["q5_k_m"] < errors["q4_k_m"] < errors["q4_0"]
    # The 3-bit mixes in their order of size, Q2_K the last; Q3_K (3.4375 bits) loses to Q4_0.
    assert errors["q4_k_m"] < errors["q3_k_l"] < errors["q3_k_m"] < errors["q3_k_s"] < errors["q2_k"]
    assert errors["q4_0"] < errors["q3_k_s"]
    assert errors["q4_k_s"] < errors["q4_0"] and errors["q4_k_m"] < 0.25 * ref.abs().mean().item()
    # IQ4_NL (4.5 bits, non-linear levels) beats Q4_0 (4.5 bits, even steps), and IQ4_XS (4.25
    # bits) is within 5% of IQ4_NL; on these normal weights Q4_K_S's 6-bit affine scales and
    # minima per 32 do better than both (0.045 against 0.059 here).
    assert errors["iq4_nl"] < errors["q4_0"] and errors["iq4_xs"] < errors["q4_0"]
    assert errors["iq4_xs"] < 1.05 * errors["iq4_nl"] and errors["q4_k_s"] < errors["iq4_xs"]


def test_kept_quantized_decoding_runs_the_blocks(wide: Path, tmp_path: Path) -> None:
    """The export loads with its blocks kept (`--keep-quantized`: the k-quant kernels, inputs
    rounded to int8) and computes what the same file dequantized computes, within that rounding."""
    out = tmp_path / "m.gguf"
    export_gguf(wide, out, "q4_k_m")
    kept = weightsmith.load(out, keep_quantized=True)
    kinds = Counter(m.type_name for m in kept.model.modules() if hasattr(m, "type_name"))
    assert kinds["Q4_K"] > 0 and kinds["Q6_K"] > 0, kinds
    plain = logits(out)
    with torch.no_grad():
        ours = kept.model(IDS).float()
    assert (ours - plain).abs().mean() < 0.02 * plain.abs().mean()
    completion = kept.complete(IDS[0].tolist(), max_tokens=8, temperature=0, ignore_eos=True)
    assert completion.completion_tokens == 8


def test_cli_export_k_quant(wide: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli.gguf"
    assert main(["export", str(wide), "--quant", "q5_k_m", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["quant"] == "q5_k_m" and result["tensors"]["Q5_K"] > 0 and result["tensors"]["Q6_K"] > 0
    assert main(["export", str(wide), "--quant", "q4_k_s", "--out", str(tmp_path / "plain.gguf")]) == 0
    err = capsys.readouterr().err
    assert "export q4_k_s: 84/84 tensors" in err  # progress, a line every ~10% off a terminal
    assert main(["export", str(wide), "--quant", "iq2_xs", "--out", str(tmp_path / "x.gguf")]) != 0
    assert not (tmp_path / "x.gguf").exists()


def test_a_nan_weight_is_refused_by_name(wide: Path, tmp_path: Path) -> None:
    ckpt = load_checkpoint(wide, decode_layout=False)
    with torch.no_grad():
        dict(ckpt.model.named_parameters())["model.layers.2.mlp.down_proj.weight"][3, 7] = float("nan")
    out = tmp_path / "nan.gguf"
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.down_proj\.weight holds NaN"):
        export_gguf(ckpt, out, "q4_k_m")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Against llama.cpp itself (where llama-cpp-python is installed)


def _families(root: Path) -> dict[str, Path]:
    shape = {**WIDE, "num_hidden_layers": 4, "intermediate_size": 256}
    return {
        "llama": root / "llama",
        "llama, tied": build(
            root / "tied", transformers.LlamaForCausalLM, transformers.LlamaConfig(**WIDE, tie_word_embeddings=True)
        ),
        "mixtral": build(
            root / "mixtral", transformers.MixtralForCausalLM,
            transformers.MixtralConfig(**shape, num_local_experts=8, num_experts_per_tok=2),
        ),
        "phi3": build(
            root / "phi3", transformers.Phi3ForCausalLM,
            transformers.Phi3Config(**{**WIDE, "num_key_value_heads": 4}, pad_token_id=0, bos_token_id=1),
        ),
        "llama, 4 heads a kv head": build(
            root / "gqa4", transformers.LlamaForCausalLM,
            transformers.LlamaConfig(**{**WIDE, "num_attention_heads": 8, "num_key_value_heads": 2}),
        ),
        "llama, rows of 192 and 320": build(  # no k-quant fits: every fallback
            root / "narrow", transformers.LlamaForCausalLM,
            transformers.LlamaConfig(**{**WIDE, "hidden_size": 192, "intermediate_size": 320,
                                        "num_attention_heads": 3, "num_key_value_heads": 1}),
        ),
        "qwen3moe": build(
            root / "qwen3moe", transformers.Qwen3MoeForCausalLM,
            transformers.Qwen3MoeConfig(**shape, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256,
                                        head_dim=64, norm_topk_prob=True),
        ),
    }  # fmt: skip


def test_each_tensor_has_the_type_llama_quantize_gives_it(wide: Path, tmp_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    families = _families(tmp_path)
    families["llama"] = wide
    from weightsmith.checkpoint.load import load_checkpoint

    for family, path in families.items():
        # loaded once, exported in every type (an export reads the checkpoint, never changes it)
        src = load_checkpoint(path, device="cpu", dtype=torch.float32, decode_layout=False)
        f32 = tmp_path / f"{family}-f32.gguf"
        export_gguf(src, f32, "f32")
        for quant, (_, file_type) in QUANTS.items():
            if quant in ("f32", "f16"):
                continue
            theirs, ours = tmp_path / "theirs.gguf", tmp_path / "ours.gguf"
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.nthread = int(file_type), 2
            assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), params) == 0
            export_gguf(src, ours, quant, overwrite=True)
            want = {t.name: t.tensor_type.name for t in open_gguf(theirs).tensors}
            got = {t.name: t.tensor_type.name for t in open_gguf(ours).tensors}
            assert got == want, (family, quant)
            theirs.unlink()


_LLAMA_CHILD = """
import json, sys
import llama_cpp, numpy as np
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=2, n_batch=1, logits_all=True, verbose=False)
llm.eval(json.loads(sys.argv[2]))  # one token a batch: multi-token batches crash on some AMX CPUs
print(json.dumps(np.asarray(llm.scores[: llm.n_tokens]).tolist()))
"""


@pytest.mark.parametrize("quant", ["q4_k_m", "q5_k_s", "q6_k", "q3_k_m", "q2_k", "iq4_xs", "iq4_nl"])
def test_llama_cpp_computes_our_k_quant_files_as_we_do(wide: Path, tmp_path: Path, quant: str) -> None:
    """llama.cpp (in a child process, so a crash of its own fails only this test) runs our file
    and its logits are ours from the same file, up to its int8 rounding of the inputs."""
    pytest.importorskip("llama_cpp")
    import subprocess
    import sys

    out = tmp_path / f"m-{quant}.gguf"
    export_gguf(wide, out, quant)
    run = subprocess.run(
        [sys.executable, "-c", _LLAMA_CHILD, str(out), json.dumps(IDS[0].tolist())],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = torch.tensor(json.loads(run.stdout.strip().splitlines()[-1]))
    ours = logits(out)[0]
    assert theirs.shape == ours.shape
    # Their rounding moves these logits by about 2% (a misread block would move them by ~100%:
    # Q4_K_M itself is 18% from the float model here).
    assert (theirs - ours).abs().mean() < 0.05 * ours.abs().mean()
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.7
