"""Packed rows attend one document at a time (models/packed.py): the same outputs and gradients
as SDPA (or Gemma 2's capped attention) under the block-diagonal causal mask, and as each
document run alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from weightsmith.checkpoint.load import load_checkpoint
from weightsmith.models import packed
from weightsmith.models.attention import attend
from weightsmith.models.packed import attend_documents, pack_documents
from weightsmith.train.data import Example, collate, to_rows
from weightsmith.train.losses import sft_loss


def _documents(rows: list[list[int]], t: int) -> torch.Tensor:
    """Document ids for rows of document lengths, -1 after them."""
    ids = torch.full((len(rows), t), -1, dtype=torch.long)
    for i, lengths in enumerate(rows):
        ids[i, : sum(lengths)] = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return ids


def _block_causal_mask(documents: torch.Tensor) -> torch.Tensor:
    t = documents.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    return causal & (documents[:, None, :, None] == documents[:, None, None, :])  # (B, 1, T, T)


def test_the_layout_puts_every_token_of_a_document_in_one_batch_in_order(monkeypatch):
    monkeypatch.setattr(packed, "MIN_BUCKET", 2)
    documents = _documents([[3, 2, 1], [6]], 8)  # each row ends in two padding tokens
    layout = pack_documents(documents)
    assert layout.longest == 6
    # lengths 3, 2, 1, 6 fall in batches of up to 2 (2, 1), 4 (3) and 8 (6) tokens
    assert layout.shapes == [(2, 2), (1, 3), (1, 6)]
    n_slots, flat = len(layout.index), documents.flatten()
    real = (flat >= 0).nonzero().squeeze(1)
    assert layout.index[layout.back[real]].tolist() == real.tolist()  # every real token reads itself back
    assert layout.owner[layout.back[real]].tolist() == real.tolist()  # ... and its slot writes to it
    assert layout.unread.tolist() == [6, 7, 14, 15]  # padding reads nothing (zero)
    start = 0
    for n, width in layout.shapes:  # one document per sequence, in order, padded with its last token
        for row in layout.index[start : start + n * width].view(n, width):
            assert len(set(flat[row].tolist())) == 1
            assert row.tolist() == sorted(row.tolist()) and row[-1] == row.max()
        start += n * width
    assert not {6, 7, 14, 15} & set(layout.index.tolist())  # padding is in no batch
    assert len(layout.unowned) == n_slots - len(real) and len(layout.shared_slots) == 0  # pads write nowhere
    assert all(layout.index[s] == layout.index[s - 1] for s in layout.unowned.tolist())  # ... and repeat


def test_no_documents_means_no_layout():
    assert pack_documents(torch.full((2, 5), -1)) is None


@pytest.mark.parametrize(
    ("n_kv", "softcap", "sinks"), [(4, None, False), (2, None, False), (2, 1.5, False), (2, None, True)]
)
def test_per_document_attention_equals_the_masked_kernel_with_gradients(n_kv, softcap, sinks):
    rows = [[5, 70, 140, 1], [300], [2, 2, 2, 90]]  # four length buckets, single-token documents
    t = 310
    documents = _documents(rows, t)
    g = torch.Generator().manual_seed(0)
    shapes = {"q": (3, 4, t, 16), "k": (3, n_kv, t, 16), "v": (3, n_kv, t, 16)}
    if sinks:  # gpt-oss: a logit per head in each softmax, trained too
        shapes["sinks"] = (4,)
    inputs = {k: torch.randn(s, generator=g, requires_grad=True) for k, s in shapes.items()}
    real = (documents >= 0)[:, None, :, None]  # (B, 1, T, 1): padding positions carry no loss
    upstream = torch.randn(3, 4, t, 16, generator=g) * real
    q, k, v, sink = inputs["q"], inputs["k"], inputs["v"], inputs.get("sinks")

    ours = attend_documents(q, k, v, pack_documents(documents), scale=0.3, softcap=softcap, sinks=sink)
    ref = attend(q, k, v, mask=_block_causal_mask(documents), scale=0.3, softcap=softcap, sinks=sink)
    if softcap is None and not sinks:  # and that is SDPA's
        sdpa = F.scaled_dot_product_attention(
            *inputs.values(), attn_mask=_block_causal_mask(documents), scale=0.3, enable_gqa=n_kv != 4
        )
        assert torch.equal(ref, sdpa)
    torch.testing.assert_close(ours * real, ref * real, rtol=1e-5, atol=1e-6)
    assert not (ours * ~real).any()  # padding attends to nothing: zero
    grads = [torch.autograd.grad((out * upstream).sum(), list(inputs.values())) for out in (ours, ref)]
    for a, b in zip(*grads, strict=True):  # GQA sums key/value gradients over heads in another order
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_a_packed_batch_trains_as_under_the_mask(tiny_hf_dir, monkeypatch, checkpoint):
    """The loss and every gradient of a packed batch (fp32) equal the mask path's, with gradient
    checkpointing (each layer recomputed in backward) too."""
    model = load_checkpoint(tiny_hf_dir, decode_layout=False).model.train().requires_grad_(True)
    examples = [Example(list(range(3 + i, 10 + 9 * i)), [True] * (7 + 8 * i)) for i in range(6)]
    batch = collate(to_rows(examples, 64, packing=True), pad_id=0)
    assert batch.documents is not None and (batch.documents == -1).any()
    out = []
    for per_document in (True, False):
        if not per_document:
            monkeypatch.setattr("weightsmith.models.model.pack_documents", lambda documents: None)
        model.zero_grad()
        loss, _ = sft_loss(model, batch, checkpoint=checkpoint)
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = out
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["gemma3", "gemma2", "mistral-sliding", "gpt-oss"])
def test_sliding_window_layers_keep_their_window_in_packed_rows(family):
    """A document longer than the window: sliding layers keep the mask, full layers go per document;
    each document's logits equal its own forward."""
    from test_model_parity import make_pair

    _, model = make_pair(family)
    docs = [list(range(5, 25)), list(range(30, 34)), list(range(40, 52))]  # 20 > window, 4, 12
    batch = collate(to_rows([Example(d, [True] * len(d)) for d in docs], 64, packing=True), pad_id=0)
    with torch.no_grad():
        hidden = model.hidden_states(batch.inputs, positions=batch.positions, documents=batch.documents)
        logits = model.logits(hidden)
        start = 0
        for i, d in enumerate(docs):
            n = len(d) - (i == len(docs) - 1)  # the row's last token is only a label
            alone = model(torch.tensor([d]))
            torch.testing.assert_close(logits[0, start : start + n], alone[0, :n], rtol=1e-5, atol=1e-5)
            start += n


def test_compiled_layers_take_every_packing_without_hitting_the_recompile_limit(tiny_hf_dir, monkeypatch):
    """--train.compile with --packing: each batch's document layout differs (how many length
    batches, how many documents in each), which as a graph input recompiled the layer until
    torch.compile gave up on it. Here it may not give up, and the results stay the eager ones.
    The guards are torch.compile's front end (dynamo); its "eager" back end keeps the test fast."""
    import torch._dynamo

    from weightsmith.train.loop import compile_layers

    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self: compile_module(self, backend="eager"))
    model = load_checkpoint(tiny_hf_dir, decode_layout=False).model.train().requires_grad_(True)
    eager = load_checkpoint(tiny_hf_dir, decode_layout=False).model.train().requires_grad_(True)
    compile_layers(model, torch.device("cpu"))
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=8):
        for n in range(12):  # 1-8 examples of 1-300 tokens in rows of 512; validation now and then
            lengths = torch.randint(1, 300, (1 + n % 8,), generator=g).tolist()
            examples = [Example(list(range(3, 4 + k)), [True] * (k + 1)) for k in lengths]
            batch = collate(to_rows(examples, 512, packing=True), pad_id=0)
            with torch.set_grad_enabled(n % 3 != 2):
                losses = [sft_loss(m, batch)[0] for m in (model, eager)]
            torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-4)
            if losses[0].requires_grad:
                losses[0].backward()


def _pairs():
    from weightsmith.train.preference_data import PairExample

    g = torch.Generator().manual_seed(3)
    ids = lambda n: torch.randint(3, 200, (n,), generator=g).tolist()  # noqa: E731
    return [
        PairExample(ids(9), ids(12), ids(5)),
        PairExample(ids(3), ids(4), ids(14)),
        PairExample(ids(1), ids(6), ids(2)),
    ]


@pytest.mark.parametrize("family", ["llama", "gemma3", "gemma2", "mistral-sliding"])
def test_pair_log_probs_equal_each_answer_scored_after_its_prompt_alone(family, monkeypatch):
    """DPO's rows (prompt once, then both answers) attend as prompt + chosen and prompt + rejected
    sequences; sliding layers (window 7, shorter than the sequences) keep the mask."""
    from test_model_parity import make_pair

    monkeypatch.setattr("weightsmith.train.losses.SEQUENCES_FROM", 0)  # a CPU's short rows too

    from weightsmith.train.losses import pair_log_probs
    from weightsmith.train.preference_data import collate_pairs

    _, model = make_pair(family)
    pairs = _pairs()
    with torch.no_grad():
        got = pair_log_probs(model, collate_pairs(pairs, pad_id=0))
        want = []
        for answer in ("chosen", "rejected"):
            for p in pairs:
                seq = p.prompt + getattr(p, answer)
                logp = model(torch.tensor([seq]))[0].float().log_softmax(-1)
                at = torch.arange(len(p.prompt) - 1, len(seq) - 1)
                want.append(logp[at, torch.tensor(seq[len(p.prompt) :])].sum())
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-4)


def test_pair_sequences_train_as_under_the_shared_prompt_mask(tiny_hf_dir, monkeypatch):
    from weightsmith.train import losses
    from weightsmith.train.losses import pair_log_probs
    from weightsmith.train.preference_data import collate_pairs

    monkeypatch.setattr(losses, "SEQUENCES_FROM", 0)
    made = []
    monkeypatch.setattr(
        losses, "pair_sequences", lambda s, real=losses.pair_sequences: made.append(1) or real(s)
    )
    model = load_checkpoint(tiny_hf_dir, decode_layout=False).model.train().requires_grad_(True)
    batch = collate_pairs(_pairs(), pad_id=0)
    weights = torch.linspace(-1, 1, 2 * len(_pairs()))
    out = []
    for sequences in (True, False):
        if not sequences:
            monkeypatch.setattr("weightsmith.train.losses.pair_sequences", lambda segments: None)
        model.zero_grad()
        logps = pair_log_probs(model, batch)
        (logps * weights).sum().backward()
        out.append((logps.detach(), [p.grad.clone() for p in model.parameters()]))
    (a, grads_a), (b, grads_b) = out
    assert made  # the first pass attended as sequences
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
    for x, y in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
