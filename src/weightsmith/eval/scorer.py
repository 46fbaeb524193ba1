"""Requests to numbers: log-likelihoods (batched, shared prefixes computed once) and
generations, tokenized exactly as lm-eval's Hugging Face backend tokenizes them.

Log-likelihood: lm-eval scores `context + continuation` in full for every choice.
Here the requests that share a context (the choices of one question) are grouped: the
context runs once into a KV cache, the cache row is copied for each continuation, and
only the continuation tokens run again. The LM head (the largest matmul of a small
model) runs only at the positions that are scored. Groups go longest first, so the
first batch is the largest and padding stays small. Results do not depend on the batch
size or the order (tests check 1, 3 and 8 against transformers).

Tokenization follows lm-eval (`lm_eval/api/model.py`, `models/huggingface.py`): trailing
spaces of the context move to the continuation, the continuation's tokens are those of
`encode(context + continuation)` past `len(encode(context))`, an empty context becomes
the BOS (else EOS) token, and inputs longer than the model's context keep their last
`max_length + 1` tokens. Rolling log-likelihood uses lm-eval's disjoint windows.

Not here: which requests a task makes (`eval/prompts.py`), metrics, caching.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from weightsmith.engine import Engine
from weightsmith.errors import GenerationError, UsageError
from weightsmith.eval.prompts import ChatFormatter
from weightsmith.kv_cache import KVCache
from weightsmith.models.model import CausalLM
from weightsmith.sampling import SamplingParams
from weightsmith.tokenizer import Tokenizer

Progress = Callable[[int], None]  # called with the number of requests just finished


@dataclass(frozen=True)
class TokenRequest:
    """Score `continuation` given `context` (token ids); `context` is never empty."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


class Scorer:
    """Log-likelihoods and greedy generations from one model."""

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Tokenizer,
        *,
        batch_size: int = 64,
        max_length: int | None = None,
        max_batch_tokens: int = 16384,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, batch_size)
        #: Also bounds a batch by tokens (prefixes + continuations), so long documents batch fewer.
        self.max_batch_tokens = max_batch_tokens
        self.max_length = max_length or model.config.max_position_embeddings
        self.engine = Engine(model, tokenizer)
        # The embedding is never quantized, so it names the device and compute dtype
        # (a quantized LM head's `weight` is a dequantized copy).
        self.device = model.model.embed_tokens.weight.device
        self.dtype = model.model.embed_tokens.weight.dtype

    def chat_formatter(self) -> ChatFormatter:
        """Messages -> prompt text through the model's chat template (generation prompt on)."""
        tok = self.tokenizer
        if not tok.chat_template:
            raise UsageError("--apply-chat-template: this model has no chat template")
        return lambda messages: tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    # -- tokenization (lm-eval's HF backend) ---------------------------------

    @property
    def prefix_token_id(self) -> int:
        tok = self.tokenizer
        if tok.bos_token_id is not None:
            return tok.bos_token_id
        if tok.eos_token_id is None:
            raise GenerationError(
                "the tokenizer has neither a BOS nor an EOS token to condition an empty context on"
            )
        return tok.eos_token_id

    def tok_encode(self, text: str) -> list[int]:
        bos = self.tokenizer.bos_token
        specials = not (bos and text.startswith(bos))  # the text already carries BOS
        return self.tokenizer.encode(text, add_special_tokens=specials)

    def encode_pair(self, context: str, continuation: str) -> TokenRequest:
        if context == "":
            cont = self.tokenizer.encode(continuation, add_special_tokens=False)
            if cont and cont[0] == self.prefix_token_id:
                return TokenRequest(tuple(cont[:1]), tuple(cont[1:]))
            return TokenRequest((self.prefix_token_id,), tuple(cont))
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return TokenRequest(tuple(ctx), tuple(whole[len(ctx) :]))

    def rolling_windows(self, text: str) -> list[TokenRequest]:
        """lm-eval's `get_rolling_token_windows(context_len=1)` + `make_disjoint_window`."""
        tokens = self.tok_encode(text)
        if not tokens:
            return []
        n, size = len(tokens), self.max_length
        first = min(size, n)
        windows = [TokenRequest((self.prefix_token_id,), tuple(tokens[:first]))]
        done = first
        while done < n:
            pred = min(n - done, size)
            end = done + pred
            inputs = tokens[max(end - size - 1, 0) : end - 1]
            context = inputs[: len(inputs) - (pred - 1)]
            windows.append(TokenRequest(tuple(context), tuple(tokens[end - pred : end])))
            done += pred
        return windows

    # -- log-likelihood -------------------------------------------------------

    def loglikelihood(
        self, requests: Sequence[tuple[str, str]], progress: Progress | None = None
    ) -> list[tuple[float, bool]]:
        return self.score([self.encode_pair(c, x) for c, x in requests], progress)

    def loglikelihood_rolling(self, texts: Sequence[str], progress: Progress | None = None) -> list[float]:
        windows = [self.rolling_windows(t) for t in texts]
        flat = [w for ws in windows for w in ws]
        scores = iter(self.score(flat, progress=None))
        out = []
        for ws in windows:
            out.append(sum(next(scores)[0] for _ in ws))
            if progress:
                progress(1)
        return out

    def _truncate(self, req: TokenRequest) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(prefix whose last token predicts the first continuation token, the continuation)."""
        cont = req.continuation
        inputs = (req.context + cont)[-(self.max_length + 1) :][:-1]
        if len(cont) > len(inputs):
            raise GenerationError(
                f"a continuation of {len(cont)} tokens does not fit the model's context of {self.max_length}"
            )
        return inputs[: len(inputs) - len(cont) + 1], cont

    @torch.inference_mode()
    def score(
        self, requests: Sequence[TokenRequest], progress: Progress | None = None
    ) -> list[tuple[float, bool]]:
        """(sum of continuation log-probabilities, whether greedy decoding gives it) per request."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[tuple[int, tuple[int, ...]]]] = defaultdict(list)
        for i, req in enumerate(requests):
            if not req.continuation:
                results[i] = (0.0, True)
                continue
            prefix, cont = self._truncate(req)
            groups[prefix].append((i, cont))
        order = sorted(groups.items(), key=lambda kv: -(len(kv[0]) + max(len(c) for _, c in kv[1])))
        batch: list[tuple[tuple[int, ...], list]] = []
        rows = tokens = 0
        for prefix, members in order:
            size = len(prefix) + sum(len(c) for _, c in members)
            if batch and (rows + len(members) > self.batch_size or tokens + size > self.max_batch_tokens):
                self._score_batch(batch, results, progress)
                batch, rows, tokens = [], 0, 0
            batch.append((prefix, members))
            rows += len(members)
            tokens += size
        if batch:
            self._score_batch(batch, results, progress)
        return results  # type: ignore[return-value]

    def _score_batch(self, batch, results, progress: Progress | None) -> None:
        """Step 1 runs each group's prefix plus the tokens all its continuations share, with
        logits at the positions that predict continuation tokens; step 2 runs what is left
        of each continuation over a copy of its group's cache row."""
        model, device = self.model, self.device
        shared = [_common_prefix([c[:-1] for _, c in members]) for _, members in batch]
        inputs = [list(p) + list(s) for (p, _), s in zip(batch, shared, strict=True)]
        lengths = [len(x) for x in inputs]
        longest_cont = max(len(c) for _, members in batch for _, c in members)
        cache = KVCache.for_model(
            model.config, len(batch), max(lengths) + longest_cont, dtype=self.dtype, device=device
        )
        t = max(lengths)
        ids = torch.tensor([x + [0] * (t - len(x)) for x in inputs], device=device)  # (G, T)
        positions = torch.arange(t, device=device).expand(len(inputs), t)
        hidden = model.hidden_states(
            ids, positions=positions, cache=cache, kv_len=t, aligned=len(set(lengths)) == 1
        )
        # Group g's scored positions: the last prefix token and each shared token.
        spans = [(len(p) - 1, len(s) + 1) for (p, _), s in zip(batch, shared, strict=True)]
        g_idx = [g for g, (_, n) in enumerate(spans) for _ in range(n)]
        t_idx = [start + k for start, n in spans for k in range(n)]
        step1 = hidden[torch.tensor(g_idx, device=device), torch.tensor(t_idx, device=device)]  # (N1, h)
        cache.set_lengths(0, lengths)
        first_row = [0]
        for _, n in spans:
            first_row.append(first_row[-1] + n)
        # Step 2: each continuation's unshared tokens.
        members = [(g, i, cont) for g, (_, ms) in enumerate(batch) for i, cont in ms]
        rest = [(g, i, cont[len(shared[g]) :]) for g, i, cont in members if len(cont) > len(shared[g]) + 1]
        step2, rest_rows = self._continue(cache, lengths, rest) if rest else (None, {})
        states = step1 if step2 is None else torch.cat([step1, step2])
        logprobs = torch.log_softmax(model.logits(states).float(), dim=-1)  # (N, V)
        best = logprobs.argmax(dim=-1)  # (N,)
        row_of, target, owner = [], [], []
        for k, (g, i, cont) in enumerate(members):
            n_shared = len(shared[g]) + 1  # positions served by step 1
            for j, tok in enumerate(cont):
                row_of.append(first_row[g] + j if j < n_shared else len(step1) + rest_rows[i] + j - n_shared)
                target.append(tok)
                owner.append(k)
        rows_t = torch.tensor(row_of, device=device)
        target_t = torch.tensor(target, device=device)
        owner_t = torch.tensor(owner, device=device)
        token_lp = logprobs[rows_t, target_t]  # (M,)
        total = torch.zeros(len(members), dtype=token_lp.dtype, device=device).index_add_(
            0, owner_t, token_lp
        )
        misses = torch.zeros(len(members), dtype=torch.long, device=device).index_add_(
            0, owner_t, (best[rows_t] != target_t).long()
        )
        for (_, i, _), ll, miss in zip(members, total.tolist(), misses.tolist(), strict=True):
            results[i] = (ll, miss == 0)
        if progress:
            progress(len(members))

    def _continue(self, cache: KVCache, lengths: list[int], rest) -> tuple[torch.Tensor, dict[int, int]]:
        """Hidden states predicting each continuation's tokens after the first of `rest`'s
        (row, request, unshared tokens), and where each request's rows start in them."""
        model, device = self.model, self.device
        forked = cache.select([g for g, _, _ in rest])  # (L, R, H, S, D) copies
        starts = [lengths[g] for g, _, _ in rest]
        feeds = [list(cont[:-1]) for _, _, cont in rest]
        t = max(len(f) for f in feeds)
        ids = torch.tensor([f + [0] * (t - len(f)) for f in feeds], device=device)  # (R, T)
        positions = torch.tensor(starts, device=device)[:, None] + torch.arange(t, device=device)  # (R, T)
        kv_len = max(starts) + t
        aligned = len(set(starts)) == 1
        hidden = model.hidden_states(ids, positions=positions, cache=forked, kv_len=kv_len, aligned=aligned)
        row_idx = torch.tensor([r for r, f in enumerate(feeds) for _ in f], device=device)
        col_idx = torch.tensor([j for f in feeds for j in range(len(f))], device=device)
        where, k = {}, 0
        for (_, i, _), f in zip(rest, feeds, strict=True):
            where[i] = k
            k += len(f)
        return hidden[row_idx, col_idx], where

    # -- generation -----------------------------------------------------------

    def generate_until(
        self, requests: Sequence[tuple[str, dict]], progress: Progress | None = None
    ) -> list[str]:
        """Greedy (or seeded sampled) continuations, cut at the first stop string, as lm-eval's."""
        encoded = []
        for context, kwargs in requests:
            max_gen = int(kwargs.get("max_gen_toks", 256))
            if max_gen >= self.max_length:
                raise GenerationError(
                    f"max_gen_toks {max_gen} must be below the model's context {self.max_length}"
                )
            ids = self.tok_encode(context)[-(self.max_length - max_gen) :]
            params = SamplingParams(
                max_tokens=max_gen,
                temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                seed=1234 if kwargs.get("do_sample") else None,
                stop=[s for s in kwargs.get("until", []) if s],
            )
            encoded.append((ids, params))
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
        out: list[str] = [""] * len(encoded)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            done = self.engine.generate([encoded[i][0] for i in chunk], [encoded[i][1] for i in chunk])
            for i, completion in zip(chunk, done, strict=True):
                out[i] = cut_at_stops(completion.text, encoded[i][1].stop)
            if progress:
                progress(len(chunk))
        return out


def _common_prefix(seqs: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The longest token prefix every sequence starts with."""
    first = seqs[0]
    n = len(first)
    for seq in seqs[1:]:
        n = min(n, len(seq))
        for j in range(n):
            if seq[j] != first[j]:
                n = j
                break
    return first[:n]


def cut_at_stops(text: str, stops: list[str]) -> str:
    """`text` up to its first stop string (lm-eval's generate_until)."""
    for stop in stops:
        text = text.split(stop)[0]
    return text
