"""POST /v1/embeddings, in OpenAI's shape: one unit vector per input text.

`{"model": NAME, "input": TEXT | [TEXT, ...] | [ID, ...] | [[ID, ...], ...], "encoding_format":
"float" | "base64", "dimensions": N}` -> `{"object": "list", "data": [{"object": "embedding",
"index": i, "embedding": [...] | BASE64}], "model": NAME, "usage": {"prompt_tokens",
"total_tokens"}}`. Base64 is the vector's little-endian float32 bytes, what the official
client asks for by default and decodes. `model` may name an adapter (`MODEL:NAME`), which then
runs alone on the base weights. How the last layer is pooled is the server's (`serve
--pooling`, else the checkpoint's own, else the last token's: weightsmith.embeddings).

Every input is checked before any runs: at most `MAX_INPUTS`, none empty, token ids inside
the vocabulary, none longer than the server's context (--max-model-len), the text within
--max-prompt-chars. The work runs on the scheduler's thread (the model's owner:
model_calls.py) in calls of at most --prefill-chunk token positions, so streams being
decoded keep getting tokens between them, as they do while a long prompt is prefilled.

Not here: the pooling (weightsmith.embeddings), the other routes (app.py, token_routes.py).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from weightsmith.embeddings import batches, embed_ids
from weightsmith.serve.prepare import check_chars, off_loop
from weightsmith.serve.scheduler import QueueFull
from weightsmith.serve.schemas import ApiError, EmbeddingRequest

#: Most inputs in one request (OpenAI's limit).
MAX_INPUTS = 2048

#: (state, request, schema) -> (loaded model, scheduler, validated body): app._accept.
Accept = Callable[..., Awaitable[tuple[Any, Any, Any]]]


def add_embedding_route(
    app: FastAPI, state: Any, accept: Accept, busy: Callable[[QueueFull], ApiError]
) -> None:
    """/v1/embeddings on `app`; `busy(e)` is the 429 for a full call queue."""

    @app.post("/v1/embeddings")
    async def embeddings(http: Request) -> JSONResponse:
        loaded, scheduler, req = await accept(state, http, EmbeddingRequest)
        adapter = state.resolve_model(req.model)
        pooling = state.pooling()
        llm = loaded.llm
        hidden = llm.model.config.hidden_size
        if req.dimensions is not None and req.dimensions > hidden:
            raise ApiError(
                400, f"dimensions {req.dimensions} is over the model's {hidden}", param="dimensions"
            )
        texts = req.texts()
        if len(texts) > MAX_INPUTS:
            raise ApiError(400, f"{len(texts)} inputs, over the limit of {MAX_INPUTS}; send them in parts",
                           param="input")  # fmt: skip
        check_chars(
            sum(len(t) for t in texts if isinstance(t, str)), state.settings.max_prompt_chars, "input"
        )
        tok = llm.tokenizer
        ids = await off_loop(lambda: [tok.encode(t) if isinstance(t, str) else t for t in texts])
        _check_ids(ids, texts, llm.model.config.vocab_size, scheduler.max_len)
        vectors = await _embed(scheduler, llm, ids, pooling, adapter, req.dimensions, busy,
                               state.settings.prefill_chunk)  # fmt: skip
        tokens = sum(map(len, ids))
        state.metrics.embedded(tokens)
        data = [
            {"object": "embedding", "index": i, "embedding": _encoded(v, req.encoding_format)}
            for i, v in enumerate(vectors)
        ]
        return JSONResponse({"object": "list", "data": data, "model": req.model,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})  # fmt: skip


def _check_ids(ids: list[list[int]], texts: list[Any], vocab: int, max_len: int) -> None:
    """400 naming the first input that is empty, holds an id outside the vocabulary, or is
    longer than the context."""
    for i, x in enumerate(ids):
        where = "input" if len(ids) == 1 and isinstance(texts[0], str) else f"input[{i}]"
        if not x:
            raise ApiError(400, f"{where} is empty; an embedding needs at least one token", param=where)
        bad = next((t for t in x if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(
                400, f"{where}: token id {bad} is outside the vocabulary [0, {vocab})", param=where
            )
        if len(x) > max_len:
            raise ApiError(400, f"{where} is {len(x)} tokens, over this server's context of {max_len} "
                           "(--max-model-len); shorten it", param=where, code="context_length_exceeded")  # fmt: skip


async def _embed(
    scheduler: Any,
    llm: Any,
    ids: list[list[int]],
    pooling: str,
    adapter: str | None,
    dimensions: int | None,
    busy: Callable[[QueueFull], ApiError],
    chunk: int,
) -> torch.Tensor:
    """The inputs' vectors, computed on the model's thread a group of at most `chunk` token
    positions (or one longer input) per call."""
    out = torch.empty((len(ids), dimensions or llm.model.config.hidden_size))
    pad = llm.tokenizer.pad_token_id or 0
    for group in batches([len(x) for x in ids], chunk):
        part = [ids[i] for i in group]
        try:
            future = scheduler.call(lambda part=part: embed_ids(
                llm.model, part, pooling, pad_id=pad, adapter=adapter, dimensions=dimensions, budget=chunk))  # fmt: skip
        except QueueFull as e:
            raise busy(e) from None
        try:
            out[group] = await asyncio.wrap_future(future)
        except asyncio.CancelledError:  # the client went away: the rest is not computed
            future.cancel()
            raise
        except Exception as e:
            raise ApiError(500, f"embedding failed: {type(e).__name__}: {e}", type="server_error") from None
    return out


def _encoded(vector: torch.Tensor, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
