"""The fused step's attention (quant/cpu_decode.c) past a few hundred positions, for 1 to 6 query
heads per key/value head and head sizes with a tail, on fp32 and bf16 caches and 1 to 3 threads,
against the PyTorch model; a row's logits bit for bit the same alone, in a batch and on any thread
count; the RoPE table the step reads (cpu_decode/rope_table.py): built once, grown, rebuilt when
the model's RoPE changes; and the embedding rows the step reads itself."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import CPU

from weightsmith.cpu_decode.fused import FusedDecode
from weightsmith.cpu_decode.rope_table import FIRST_ROWS
from weightsmith.generate import decode_one_token, prefill
from weightsmith.kv_cache import KVCache
from weightsmith.models import CausalLM, ModelConfig

VOCAB = 96
#: Past FIRST_ROWS and the C step's SPLIT_FROM (256): the table grows, and a row with fewer
#: (row, kv head) groups than threads splits its positions and head_dim among them.
LONG = 300


def _model(heads: int, kv: int, head_dim: int, seed: int = 0) -> CausalLM:
    cfg = ModelConfig.from_hf(
        {
            "model_type": "llama", "vocab_size": VOCAB, "hidden_size": 48, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": heads, "num_key_value_heads": kv,
            "head_dim": head_dim, "max_position_embeddings": 1024,
        }
    )  # fmt: skip
    torch.manual_seed(seed)
    model = CausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Sharp attention (large q/k) so that a wrong position or head shows in the logits.
            scale = 0.6 if name.endswith(("q_proj.weight", "k_proj.weight")) else 0.15
            p.copy_(1 + 0.3 * torch.randn(p.shape) if "norm" in name else scale * torch.randn(p.shape))
    return model


def _bf16_writes(monkeypatch) -> None:
    """The PyTorch model's cache entries rounded to bf16, as the C step stores them in a bf16 cache."""
    write = KVCache.write

    def rounded(self, layer, positions, k, v, *args, **kw):
        return write(self, layer, positions, k.bfloat16().float(), v.bfloat16().float(), *args, **kw)

    monkeypatch.setattr(KVCache, "write", rounded)


def _prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _prefilled(model, prompts, dtype=torch.float32, max_len=LONG + 8) -> KVCache:
    cache = KVCache.for_model(model.config, len(prompts), max_len, dtype=torch.float32, device=CPU)
    prefill(model, cache, prompts, CPU)
    if dtype == torch.float32:
        return cache
    out = KVCache.for_model(model.config, len(prompts), max_len, dtype=dtype, device=CPU)
    out.k.copy_(cache.k), out.v.copy_(cache.v)  # exact: the writes were rounded to bf16
    out.set_lengths(0, cache.lengths)
    return out


@pytest.fixture
def threads():
    """Set torch's (and so the C step's) thread count for one test; restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


# (query heads, kv heads, head_dim): 1, 3, 4 and 6 query heads a kv head (6: two passes of the
# 4 heads the kernel holds at once); head_dim 12 and 40 end in a part of 8 lanes / 16 floats.
SHAPES = [(2, 2, 16), (6, 2, 12), (8, 2, 40), (6, 1, 8)]


@pytest.mark.parametrize("n_threads", [1, 3])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_long_attention_equals_the_pytorch_model(
    shape, cache_dtype, n_threads, native_lib, monkeypatch, threads
):
    model = _model(*shape)
    prompts = _prompts([LONG, 41])  # one row past the split threshold, one short
    steps = [[7, 8], [9, 10]]
    with pytest.MonkeyPatch.context() as mp:
        if cache_dtype == torch.bfloat16:
            _bf16_writes(mp)
        ref = _prefilled(model, prompts)
        want = torch.stack([decode_one_token(model, ref, s, CPU) for s in steps])
        cache = _prefilled(model, prompts, cache_dtype)
    threads(n_threads)
    fused = FusedDecode(model, native_lib)
    assert fused.ok
    got = torch.stack([fused.step(cache, s) for s in steps])
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale)
    assert cache.lengths == ref.lengths == (LONG + 2, 43)
    n = LONG + 2
    torch.testing.assert_close(cache.k[:, 0, :, :n].float(), ref.k[:, 0, :, :n], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cache.v[:, 0, :, :n].float(), ref.v[:, 0, :, :n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, 2, 12), (8, 2, 40)])
def test_long_attention_with_each_instruction_set(shape, cache_dtype, isa_lib):
    """Attention over a long row and a short one (head_dim with lanes past the last eight) in
    every build (native, AVX2, portable C), from an fp32 or a bf16 cache: the PyTorch model's
    logits."""
    model = _model(*shape)
    prompts = _prompts([LONG + 5, 13])
    with pytest.MonkeyPatch.context() as mp:
        if cache_dtype == torch.bfloat16:
            _bf16_writes(mp)
        ref = _prefilled(model, prompts)
        want = decode_one_token(model, ref, [7, 8], CPU)
        cache = _prefilled(model, prompts, cache_dtype)
    got = FusedDecode(model, isa_lib).step(cache, [7, 8])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(1.0, want.abs().max().item()))


def test_a_wrong_position_shows_in_these_logits(native_lib):
    """The check above has teeth: the same step one position later gives other logits."""
    model = _model(6, 2, 12)
    prompts = _prompts([LONG])
    fused = FusedDecode(model, native_lib)
    right = fused.step(_prefilled(model, prompts), [7])
    shifted = _prefilled(model, prompts)
    shifted.set_lengths(0, [LONG + 1])  # the key at LONG is zeros: attention sees one more entry
    assert (fused.step(shifted, [7]) - right).abs().max() > 1e-3


@pytest.mark.parametrize("lengths", [[LONG, 20, LONG - 40, 280], [40, 20, 33, 12]], ids=["long", "short"])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_a_rows_logits_are_bit_identical_alone_in_a_batch_and_on_any_thread_count(
    cache_dtype, lengths, native_lib, threads
):
    """Row 0 alone on 1 thread, and among rows of other lengths on 1, 2 and 3 threads: the same
    bits. Long rows: one pass, and positions split across threads. Short rows, one pass: by
    (row, kv head) group, or by single query head where that splits more evenly (1 or 2 rows of
    2 kv heads on 3 threads)."""
    model = _model(6, 2, 12)
    with pytest.MonkeyPatch.context() as mp:
        if cache_dtype == torch.bfloat16:
            _bf16_writes(mp)
        full = _prefilled(model, _prompts(lengths), cache_dtype)  # one prefill: the same entries
    fused = FusedDecode(model, native_lib)
    threads(1)
    alone = fused.step(full.select([0]), [5])
    for n in (1, 2, 3):
        threads(n)
        for rows in (1, 2, 4):
            batch = fused.step(full.select(list(range(rows))), [5, 6, 7, 8][:rows])
            assert torch.equal(batch[0], alone[0]), (n, rows)


def test_the_rope_table_is_built_once_grown_and_rebuilt_when_the_rope_changes(native_lib):
    model = _model(4, 2, 16)
    prompts = _prompts([30])
    fused = FusedDecode(model, native_lib)
    cache = _prefilled(model, prompts, max_len=FIRST_ROWS + 40)
    for t in range(5):
        fused.step(cache, [t + 3])
    assert fused.rope.builds == 1 and fused.rope.tables[0].shape[0] == FIRST_ROWS
    cache.set_lengths(0, [FIRST_ROWS + 3])
    fused.step(cache, [4])
    assert fused.rope.builds == 2 and fused.rope.tables[0].shape[0] >= FIRST_ROWS + 4

    def parity() -> torch.Tensor:
        """The fused step against the PyTorch model, both on their own copy of one cache."""
        ref = _prefilled(model, prompts, max_len=64)
        c = _prefilled(model, prompts, max_len=64)
        want = decode_one_token(model, ref, [9], CPU)
        got = fused.step(c, [9])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(1.0, want.abs().max().item()))
        return got

    before = parity()
    with torch.no_grad():
        model.inv_freq.mul_(0.5)  # changed in place
    changed = parity()
    assert fused.rope.builds == 3 and (changed - before).abs().max() > 1e-3
    model.config = dataclasses.replace(model.config, rope_theta=500.0)
    model.reset_rope()  # a new inv_freq tensor
    parity()
    assert fused.rope.builds == 4


class _ShiftedEmbedding(torch.nn.Embedding):
    """Not a plain nn.Embedding: the step must take its output, not read its weight."""

    def forward(self, ids):
        return super().forward(ids) + 0.5


def test_the_step_reads_a_plain_embedding_and_calls_any_other(native_lib):
    model = _model(4, 2, 16)
    prompts = _prompts([30])
    fused = FusedDecode(model, native_lib)

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        want = decode_one_token(model, _prefilled(model, prompts), [9], CPU)
        return fused.step(_prefilled(model, prompts), [9]), want

    got, want = both()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(1.0, want.abs().max().item()))
    plain = got
    shifted = _ShiftedEmbedding(VOCAB, 48)
    shifted.weight = model.model.embed_tokens.weight
    model.model.embed_tokens = shifted
    got, want = both()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(1.0, want.abs().max().item()))
    assert (got - plain).abs().max() > 1e-3  # the shift shows
    with pytest.raises(IndexError, match="outside the vocabulary"):
        FusedDecode(_model(4, 2, 16), native_lib).step(_prefilled(model, prompts), [VOCAB])


def _int8_prefilled(model, prompts, max_len=LONG + 8) -> KVCache:
    cache = KVCache.for_model(model.config, len(prompts), max_len, dtype=torch.int8, device=CPU)
    prefill(model, cache, prompts, CPU)  # the PyTorch model's writes: codes and scales
    return cache


def _assert_int8_entries_agree(got: KVCache, want: KVCache, row: int, n: int) -> None:
    """The C step quantized its new entries as the PyTorch cache does: same scales to float
    rounding, codes equal but where a value sat within rounding of a half step (then one apart)."""
    for codes, scales in (("k", "k_scale"), ("v", "v_scale")):
        a, b = getattr(got, codes)[:, row, :, :n].int(), getattr(want, codes)[:, row, :, :n].int()
        assert (a - b).abs().max() <= 1 and (a != b).float().mean() < 0.01
        torch.testing.assert_close(getattr(got, scales)[:, row, :, :n], getattr(want, scales)[:, row, :, :n])


@pytest.mark.parametrize("n_threads", [1, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_long_attention_from_an_int8_cache(shape, n_threads, native_lib, threads):
    """`--kv-cache-dtype int8`: the C step reads the codes and scales the PyTorch model wrote (its
    logits, to float rounding) and quantizes its own entries as the PyTorch cache does."""
    model = _model(*shape)
    prompts = _prompts([LONG, 41])
    steps = [[7, 8], [9, 10]]
    ref = _int8_prefilled(model, prompts)
    want = torch.stack([decode_one_token(model, ref, s, CPU) for s in steps])
    cache = _int8_prefilled(model, prompts)
    threads(n_threads)
    fused = FusedDecode(model, native_lib)
    got = torch.stack([fused.step(cache, s) for s in steps])
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3 * scale)
    assert cache.lengths == ref.lengths == (LONG + 2, 43)
    _assert_int8_entries_agree(cache, ref, 0, LONG + 2)
    _assert_int8_entries_agree(cache, ref, 1, 43)
    # The entries are codes (what rounding costs on real text: benchmarks/kv_cache.py --quality).
    assert cache.k.dtype == torch.int8 and cache.k[:, 0, :, :LONG].abs().max() == 127
    full = _prefilled(model, prompts)
    assert (got - torch.stack([decode_one_token(model, full, s, CPU) for s in steps])).abs().max() > 0


@pytest.mark.parametrize("shape", [(6, 2, 12), (8, 2, 40)])
def test_long_attention_from_an_int8_cache_with_each_instruction_set(shape, isa_lib):
    model = _model(*shape)
    prompts = _prompts([LONG + 5, 13])
    want = decode_one_token(model, _int8_prefilled(model, prompts), [7, 8], CPU)
    got = FusedDecode(model, isa_lib).step(_int8_prefilled(model, prompts), [7, 8])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3 * max(1.0, want.abs().max().item()))
