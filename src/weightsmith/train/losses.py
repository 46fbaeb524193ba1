"""Training losses over a model's hidden states.

`sft_loss` is next-token cross-entropy at target positions only: prompt and padding
positions never reach the LM head. `linear_cross_entropy` fuses the LM head matmul
with the cross-entropy and computes the gradient during the forward pass, chunk by
chunk, so the (N, vocab) logits are never held in full and are swept over fewer times
(log-softmax, its saved output and its backward are one in-place softmax here). The
same trick as "Cut Your Losses in Large-Vocabulary Language Models" (Wijmans et al.
2024), written plainly in torch.

For preference training, `pair_log_probs` sums the log-probability of each answer's tokens
given its prompt, through `linear_log_probs`: the same chunked head, returning one
log-probability per target token. A pair's prompt runs once for both answers
(`shared_prompt_mask`). `PREFERENCE_LOSSES` maps a `--loss` name to a
function of the policy/reference log-ratios (sigmoid DPO, IPO, hinge, robust DPO), with
TRL's `DPOTrainer` definitions.

Not here: the loop that calls them (loop.py), the reference model and batches of pairs
(dpo.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from weightsmith.models.packed import PackedDocuments, layout
from weightsmith.train.data import IGNORE, Batch
from weightsmith.train.preference_data import PADDING, PROMPT, PairBatch

#: Logit elements per chunk (64 MiB in fp32, ~340 rows of a 49k vocabulary). Smaller
#: chunks re-read the (V, h) head weight more often: 85-row chunks made the fused
#: head + loss ~20% slower on the default model than 340-row ones.
CHUNK_ELEMENTS = 1 << 24


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, t_i); the gradient is computed in forward and scaled in backward."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n, vocab = h.shape[0], weight.shape[0]
        ctx.weight_dtype = weight.dtype
        rows = max(1, CHUNK_ELEMENTS // vocab)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        w = weight if weight.dtype == h.dtype else weight.to(h.dtype)  # e.g. bf16 activations (autocast)
        buffer = torch.empty((min(rows, n), vocab), dtype=h.dtype, device=h.device)  # reused per chunk
        for start in range(0, n, rows):
            hc, tc = h[start : start + rows], targets[start : start + rows]
            logits = torch.mm(hc, w.t(), out=buffer[: len(hc)]).float()  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            loss += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
            probs[torch.arange(len(tc), device=h.device), tc] -= 1.0  # dCE/dlogits
            g = probs.to(h.dtype)
            if grad_h is not None:
                grad_h[start : start + rows] = g @ w  # (c, h)
            if grad_w is not None:
                grad_w.addmm_(g.t().float(), hc.float())  # (V, h)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return scaled_gradients(ctx, grad_out, 1)


def scaled_gradients(ctx: Any, grad_out: torch.Tensor, others: int) -> tuple[torch.Tensor | None, ...]:
    """The backward of a fused head whose forward saved the gradients of its summed loss with
    respect to h and the head weight (None where not needed): both scaled by the upstream
    gradient, then None for the function's `others` inputs."""
    grad_h, grad_w = ctx.saved_tensors
    dh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
    dw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
    return (dh, dw, *[None] * others)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of logits h @ weight^T (N, V) against targets (N,)."""
    if not torch.is_grad_enabled() or not (h.requires_grad or weight.requires_grad):
        return F.cross_entropy((h @ weight.t()).float(), targets, reduction="sum")
    return _LinearCrossEntropy.apply(h, weight, targets)


def soft_capped(model: nn.Module) -> bool:
    """Whether the model's logits are soft-capped (Gemma): then only `model.logits` is exact."""
    return getattr(model.config, "final_logit_softcapping", None) is not None


def sft_loss(model: nn.Module, batch: Batch, *, checkpoint: bool = False) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over target positions, and their count."""
    hidden = model.hidden_states(
        batch.inputs, positions=batch.positions, documents=batch.documents, checkpoint=checkpoint
    )  # (B, T, h)
    keep = batch.labels != IGNORE  # (B, T)
    targets = batch.labels[keep]
    head = model.lm_head
    if not isinstance(head, nn.Linear) or head.bias is not None or soft_capped(model):
        logits = model.logits(hidden[keep]).float()  # an adapted or quantized head: the plain way
        return F.cross_entropy(logits, targets, reduction="sum"), int(keep.sum())
    normed = model.model.norm(hidden[keep])  # (N, h): only where a loss is taken
    return linear_cross_entropy(normed, head.weight, targets), len(targets)


# ----- per-token log-probabilities (preference training) -------------------------------------------


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


def _log_probs_no_grad(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, entropy: torch.Tensor | None = None
) -> torch.Tensor:
    """log softmax(h @ W^T)[t] (N,) in fp32, chunked so (N, V) logits are never held in full."""
    w = weight if weight.dtype == h.dtype else weight.to(h.dtype)
    out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    rows = _chunk_rows(weight.shape[0])
    for start in range(0, h.shape[0], rows):
        logits = (h[start : start + rows] @ w.t()).float()  # (c, V)
        tc = targets[start : start + rows]
        lse = torch.logsumexp(logits, -1)
        out[start : start + rows] = logits.gather(1, tc[:, None]).squeeze(1) - lse
        if entropy is not None:
            entropy[start : start + rows] = _entropy(logits.sub_(lse[:, None]).exp_())
    return out


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    """(c,) -sum p log p of each row of probabilities (c, V)."""
    return torch.special.entr(probs).sum(-1)


class _LinearLogProbs(torch.autograd.Function):
    """log softmax(h_i @ W^T)[t_i] per row i, chunked.

    Unlike a summed cross-entropy, each row's gradient is scaled by its own upstream
    gradient (a sequence's dLoss/dlogp), unknown during the forward. With only `h`
    trainable (LoRA), the forward still computes the unscaled dlogp_i/dh_i = (onehot - p_i) @ W
    per chunk and backward scales its rows: one sweep over the logits, as in
    `_LinearCrossEntropy`. When the head weight is trainable too (full fine-tuning), its
    gradient sum_i g_i (onehot - p_i)^T h_i needs g, so backward recomputes the logits."""

    @staticmethod
    def forward(
        ctx: Any, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, entropy: torch.Tensor | None
    ) -> torch.Tensor:
        n, vocab = h.shape[0], weight.shape[0]
        ctx.weight_dtype = weight.dtype
        w = weight if weight.dtype == h.dtype else weight.to(h.dtype)
        out = torch.empty(n, dtype=torch.float32, device=h.device)
        recompute = ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] and not recompute else None
        rows = _chunk_rows(vocab)
        buffer = torch.empty((min(rows, n), vocab), dtype=h.dtype, device=h.device)
        lse_all = torch.empty(n, dtype=torch.float32, device=h.device)
        for start in range(0, n, rows):
            hc, tc = h[start : start + rows], targets[start : start + rows]
            logits = torch.mm(hc, w.t(), out=buffer[: len(hc)]).float()  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            out[start : start + rows] = logits.gather(1, tc[:, None]).squeeze(1) - lse
            lse_all[start : start + rows] = lse
            if grad_h is not None or entropy is not None:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
            if entropy is not None:
                entropy[start : start + rows] = _entropy(probs)
            if grad_h is not None:
                probs[torch.arange(len(tc), device=h.device), tc] -= 1.0  # -dlogp/dlogits
                grad_h[start : start + rows] = probs.to(h.dtype) @ w  # (c, h)
        if recompute:
            ctx.save_for_backward(h, weight, targets, lse_all)
        else:
            ctx.save_for_backward(grad_h)
        ctx.recompute = recompute
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if not ctx.recompute:
            (grad_h,) = ctx.saved_tensors
            if grad_h is None:
                return None, None, None, None
            return -grad_out[:, None].to(grad_h.dtype) * grad_h, None, None, None
        h, weight, targets, lse_all = ctx.saved_tensors
        w = weight if weight.dtype == h.dtype else weight.to(h.dtype)
        dh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        dw = torch.zeros_like(weight, dtype=torch.float32)
        rows = _chunk_rows(weight.shape[0])
        for start in range(0, h.shape[0], rows):
            hc, tc = h[start : start + rows], targets[start : start + rows]
            probs = (hc @ w.t()).float().sub_(lse_all[start : start + rows, None]).exp_()  # (c, V)
            probs[torch.arange(len(tc), device=h.device), tc] -= 1.0
            g = probs.mul_(-grad_out[start : start + rows, None])  # dLoss/dlogits
            if dh is not None:
                dh[start : start + rows] = g.to(h.dtype) @ w
            dw.addmm_(g.t(), hc.float())
        return dh, dw.to(ctx.weight_dtype), None, None


def linear_log_probs(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, entropy: torch.Tensor | None = None
) -> torch.Tensor:
    """log softmax(h @ weight^T)[targets] (N,) in fp32, without holding the (N, V) logits;
    `entropy` (N,), if given, is filled with each row's entropy (no gradient)."""
    if not torch.is_grad_enabled() or not (h.requires_grad or weight.requires_grad):
        return _log_probs_no_grad(h, weight, targets, entropy)
    return _LinearLogProbs.apply(h, weight, targets, entropy)


def head_log_probs(
    model: nn.Module, h: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
    entropy: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """(N,) log softmax(logits / temperature)[target] of the last layer's outputs `h` (N, hidden),
    fp32: through `linear_log_probs` (chunked, no (N, V) logits kept) for a plain head, else
    the model's own `logits` (an adapted, quantized, biased or soft-capped head). `entropy`
    (N,), if given, is filled with the entropy of each row's distribution (no gradient)."""
    head = model.lm_head
    if not isinstance(head, nn.Linear) or head.bias is not None or soft_capped(model):
        logp = (model.logits(h).float() / temperature).log_softmax(-1)
        if entropy is not None:
            entropy.copy_(_entropy(logp.detach().exp()))
        return logp.gather(1, targets[:, None]).squeeze(1)
    return linear_log_probs(model.model.norm(h) / temperature, head.weight, targets, entropy)


def shared_prompt_mask(
    positions: torch.Tensor, segments: torch.Tensor, window: int | None = None
) -> torch.Tensor:
    """(B, 1, T, T) which keys each query sees in a `PairBatch` row: earlier tokens of its own
    segment and of the prompt (so an answer never sees the other answer), within `window`
    positions for sliding-window layers."""
    slots = torch.arange(segments.shape[1], device=segments.device)
    mask = slots[None, None, :] <= slots[None, :, None]  # (1, T, T): causal by slot
    seg_q, seg_k = segments[:, :, None], segments[:, None, :]  # (B, T, 1), (B, 1, T)
    mask = mask & ((seg_k == seg_q) | (seg_k == PROMPT))  # (B, T, T)
    if window:
        mask = mask & (positions[:, None, :] > positions[:, :, None] - window)
    return mask[:, None]


#: On a CPU, DPO rows this long or longer attend as sequences (`pair_sequences`), shorter ones under
#: the mask: the sequences attend to the prompt twice and gather every token, which cost more than
#: they saved in rows of 192-768 tokens (0.7-0.9x the mask's attention time, fp32, 2-core Xeon)
#: and saved a third at 1280-1536 (1.5x). On a GPU they replace the mask's kernel with flash.
SEQUENCES_FROM = 1024


def pair_sequences(segments: torch.Tensor) -> PackedDocuments | None:
    """Rows of a prompt and its answers as attention sequences (models/packed.py): prompt +
    each answer, in the order of the answers' segment values (a `PairBatch`'s chosen, then
    rejected; GRPO's completions), the prompt's outputs read from the first."""
    seg = segments.detach().cpu()
    t = seg.shape[1]
    sequences, read_from = [], []
    for i, row in enumerate(seg):
        prompt = (row == PROMPT).nonzero().squeeze(1) + i * t
        answers = [s for s in row.unique().tolist() if s not in (PROMPT, PADDING)]  # sorted
        for k, s in enumerate(answers):
            sequences.append(torch.cat([prompt, (row == s).nonzero().squeeze(1) + i * t]))
            read_from.append(len(prompt) if k else 0)
    return layout(sequences, read_from, seg.numel(), segments.device)


@contextlib.contextmanager
def shared_prompt_attention(model: nn.Module, batch: Any) -> Iterator[None]:
    """Inside, the model's forwards attend as `shared_prompt_mask` says instead of causally:
    each answer as one causal sequence with its prompt (`pair_sequences`), or, in sliding-window
    layers shorter than such a sequence, under the mask. The model's own `hidden_states` runs
    (embedding, layers, checkpointing) with only this replaced."""
    cfg = model.config
    window = cfg.sliding_window or None
    segments = batch.segments
    long_rows = segments.device.type == "cuda" or segments.shape[1] >= SEQUENCES_FROM
    docs = pair_sequences(segments) if long_rows else None
    masks = {
        kind: shared_prompt_mask(
            batch.positions, batch.segments, window if kind == "sliding_attention" else None
        )
        if docs is None or not docs.usable_for(kind, window)
        else None
        for kind in set(cfg.layer_types)
    }
    build = model._attention_inputs
    model._attention_inputs = lambda *args, **kwargs: dataclasses.replace(
        build(*args, **kwargs), masks=masks, is_causal=False, docs=docs
    )
    try:
        yield
    finally:
        del model._attention_inputs  # the class's method again


def pair_log_probs(model: nn.Module, batch: PairBatch, *, checkpoint: bool = False) -> torch.Tensor:
    """(2B,) each answer's summed token log-probability given its prompt, fp32 (chosen answers
    first); the prompt of a pair runs once, the LM head only where an answer token is predicted.
    Rows of one answer (`batch.causal`) attend causally."""
    with contextlib.nullcontext() if batch.causal else shared_prompt_attention(model, batch):
        hidden = model.hidden_states(
            batch.inputs, positions=batch.positions, checkpoint=checkpoint
        )  # (B, T, h)
    token = head_log_probs(model, hidden.reshape(-1, hidden.shape[-1])[batch.index], batch.targets)  # (N,)
    out = torch.zeros(len(batch.lengths), dtype=torch.float32, device=token.device)
    return out.index_add(0, batch.answer, token)


# ----- preference losses ----------------------------------------------------------------------------


@dataclass
class LogRatios:
    """Per pair (B,): log pi(y|x) - log pi_ref(y|x) of the chosen and rejected answers, and the
    answers' lengths in tokens."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


def sigmoid_loss(r: LogRatios, beta: float, label_smoothing: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * margin). With label smoothing e,
    conservative DPO (Mitchell 2023): the label is flipped with probability e."""
    z = beta * (r.chosen - r.rejected)
    if label_smoothing == 0:
        return -F.logsigmoid(z)
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def _mean_logps(r: LogRatios) -> tuple[torch.Tensor, torch.Tensor]:
    """Each answer's log-ratio per token (its sum over its length); for the reference-free
    losses, whose log-ratios are the policy's own summed log-probabilities, its mean token
    log-probability."""
    return r.chosen / r.chosen_tokens.clamp(min=1), r.rejected / r.rejected_tokens.clamp(min=1)


def ipo_loss(r: LogRatios, beta: float, label_smoothing: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17) on per-token log-ratios: (margin - 1/(2 beta))^2, each
    answer's log-ratio divided by its length, as TRL does (and the IPO authors confirmed)."""
    chosen, rejected = _mean_logps(r)
    return (chosen - rejected - 1 / (2 * beta)) ** 2


def hinge_loss(r: LogRatios, beta: float, label_smoothing: float) -> torch.Tensor:
    """SLiC's hinge (Zhao et al. 2023): relu(1 - beta * margin)."""
    return torch.relu(1 - beta * (r.chosen - r.rejected))


def robust_loss(r: LogRatios, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024): unbiased under labels flipped with probability e < 1/2."""
    z = beta * (r.chosen - r.rejected)
    e = label_smoothing
    return (-(1 - e) * F.logsigmoid(z) + e * F.logsigmoid(-z)) / (1 - 2 * e)


def exo_loss(r: LogRatios, beta: float, label_smoothing: float) -> torch.Tensor:
    """EXO (Ji et al. 2024, eq. 16 for a pair): KL from the model's softmax over the pair's two
    rewards to the labels (1 - e, e); e is --label-smoothing, which must be above 0."""
    z = beta * (r.chosen - r.rejected)
    q_w, q_l = torch.sigmoid(z), torch.sigmoid(-z)
    e = torch.tensor(label_smoothing, dtype=z.dtype, device=z.device)
    return q_w * (F.logsigmoid(z) - torch.log1p(-e)) + q_l * (F.logsigmoid(-z) - torch.log(e))


def nca_loss(r: LogRatios, beta: float, label_smoothing: float) -> torch.Tensor:
    """NCA (Chen et al. 2024), for a pair: the chosen answer's reward up in absolute terms, both
    answers' down a little: -log s(r_w) - 0.5 log s(-r_w) - 0.5 log s(-r_l), r = beta x log-ratio."""
    cw, cl = beta * r.chosen, beta * r.rejected
    return -F.logsigmoid(cw) - 0.5 * F.logsigmoid(-cw) - 0.5 * F.logsigmoid(-cl)


def bco_loss(r: LogRatios, beta: float, label_smoothing: float) -> torch.Tensor:
    """BCO on pairs (Jung et al. 2024, without its running reward shift): each answer
    classified on its own, chosen as good and rejected as bad: -log s(r_w) - log s(-r_l)."""
    return -F.logsigmoid(beta * r.chosen) - F.logsigmoid(-beta * r.rejected)


def sppo_loss(r: LogRatios, beta: float, label_smoothing: float) -> torch.Tensor:
    """SPPO (Wu et al. 2024) with hard win probabilities: each answer's log-ratio pulled to
    +1/(2 beta) (chosen) or -1/(2 beta) (rejected), squared."""
    return (r.chosen - 0.5 / beta) ** 2 + (r.rejected + 0.5 / beta) ** 2


def apo_zero_loss(r: LogRatios, beta: float, label_smoothing: float) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7): chosen answers up, rejected down, each
    anchored at the reference; for chosen answers better than the model's own."""
    return 1 - torch.sigmoid(beta * r.chosen) + torch.sigmoid(beta * r.rejected)


def apo_down_loss(r: LogRatios, beta: float, label_smoothing: float) -> torch.Tensor:
    """APO-down (eq. 8): both answers down, the rejected further; for chosen answers worse than
    the model's own."""
    return torch.sigmoid(beta * r.chosen) + 1 - torch.sigmoid(beta * (r.chosen - r.rejected))


def discopop_loss(r: LogRatios, beta: float, label_smoothing: float, tau: float = 0.05) -> torch.Tensor:
    """DiscoPOP (Chris Lu et al. 2024, eq. 5; a loss found by LLM-driven search): the logistic
    loss -log sigmoid(z) and the exponential exp(-z) of z = beta x margin, mixed by sigmoid(z / tau)."""
    z = beta * (r.chosen - r.rejected)
    mix = torch.sigmoid(z / tau)
    return -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix


def sigmoid_norm_loss(r: LogRatios, beta: float, label_smoothing: float) -> torch.Tensor:
    """DPO on per-token log-ratios (each answer's divided by its length): -log sigmoid(beta x margin)."""
    chosen, rejected = _mean_logps(r)
    return -F.logsigmoid(beta * (chosen - rejected))


def simpo_loss(r: LogRatios, beta: float, label_smoothing: float, gamma: float = 0.5) -> torch.Tensor:
    """SimPO (Meng et al. 2024): -log sigmoid(beta * (mean log pi(y_w) - mean log pi(y_l)) - gamma),
    reference-free; with label smoothing e, conservative as DPO's (TRL's CPO `simpo`)."""
    chosen, rejected = _mean_logps(r)
    z = beta * (chosen - rejected) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def orpo_loss(r: LogRatios, beta: float, label_smoothing: float) -> torch.Tensor:
    """ORPO's odds-ratio term (Hong et al. 2024): -beta * log sigmoid(log odds(y_w) - log odds(y_l)),
    odds(y) = p / (1 - p) of the answer's mean token probability p; reference-free (the NLL of
    the chosen answer, ORPO's other term, is the objective's sft term)."""
    chosen, rejected = _mean_logps(r)
    log_odds = (chosen - rejected) - (torch.log(-torch.expm1(chosen)) - torch.log(-torch.expm1(rejected)))
    return -beta * F.logsigmoid(log_odds)


PreferenceLoss = Callable[[LogRatios, float, float], torch.Tensor]

#: --loss NAME -> per-pair loss (B,) of (log-ratios, beta, label smoothing).
PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "dpo": sigmoid_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "robust": robust_loss,
    "sigmoid_norm": sigmoid_norm_loss,
    "exo_pair": exo_loss,
    "nca_pair": nca_loss,
    "bco_pair": bco_loss,
    "sppo_hard": sppo_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "discopop": discopop_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
}
#: Losses of the policy alone: no reference model is run (their log-ratios are log-probs).
REFERENCE_FREE = ("simpo", "orpo")
