"""The tokenizer endpoints, in vLLM's shapes: /tokenize, /detokenize and /tokenizer_info.

Evaluation harnesses that talk to an OpenAI-compatible server tokenize through it: lm-eval's
`local-completions` with `tokenizer_backend=remote` reads /tokenizer_info (the special tokens
and chat template), counts and cuts contexts with /tokenize and decodes with /detokenize, so a
weightsmith server scores as `weightsmith eval` does (tests/test_eval_parity.py runs it).

- POST /tokenize: `{"prompt": text, "add_special_tokens": true}` or `{"messages": [...],
  "add_generation_prompt": true, "tools": [...]}` -> `{"count", "max_model_len", "tokens",
  "token_strs"}` (`token_strs` with `"return_token_strs": true`, else null).
- POST /detokenize: `{"tokens": [...]}` -> `{"prompt": text}`.
- GET /tokenizer_info: the tokenizer's class, special tokens, chat template and context length,
  as vLLM serves them (the fields a remote tokenizer reads).

Not here: the generation routes (app.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from weightsmith.serve.prepare import check_chars, off_loop, render
from weightsmith.serve.schemas import ApiError, DetokenizeRequest, TokenizeRequest
from weightsmith.serve.structured import Plan, chat_messages, message_chars

#: (state, request, schema) -> (loaded model, scheduler, validated body): app._accept.
Accept = Callable[..., Awaitable[tuple[Any, Any, Any]]]


def add_token_routes(app: FastAPI, state: Any, accept: Accept) -> None:
    """/tokenize, /detokenize and /tokenizer_info on `app`; `accept` gives the loaded model (503
    while loading) and the validated body."""

    @app.post("/tokenize")
    async def tokenize(http: Request) -> JSONResponse:
        loaded, scheduler, req = await accept(state, http, TokenizeRequest)
        tok = loaded.llm.tokenizer
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "give exactly one of 'prompt' or 'messages'", param="prompt")
        limit = state.settings.max_prompt_chars
        if req.prompt is not None:
            if req.tools is not None:
                raise ApiError(400, "tools are rendered only with messages", param="tools")
            check_chars(len(req.prompt), limit, "prompt")
            prompt, special = req.prompt, req.add_special_tokens
            tokens = await off_loop(lambda: tok.encode(prompt, add_special_tokens=special))
        else:
            tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
            plan = Plan(tools=tools, native="tools" in (tok.chat_template or ""))
            messages = chat_messages(req.messages or [], plan)
            check_chars(message_chars(messages, plan), limit, "messages")
            tokens = await off_loop(render, loaded.llm, messages, state.template_limits,
                                    req.add_generation_prompt, plan.tools if plan.native else None)  # fmt: skip
        strs = [tok.id_to_token(t) for t in tokens] if req.return_token_strs else None
        return JSONResponse(
            {"count": len(tokens), "max_model_len": scheduler.max_len, "tokens": tokens, "token_strs": strs}
        )

    @app.post("/detokenize")
    async def detokenize(http: Request) -> JSONResponse:
        loaded, _, req = await accept(state, http, DetokenizeRequest)
        vocab = loaded.llm.model.config.vocab_size
        for i, t in enumerate(req.tokens):
            if not 0 <= t < vocab:
                raise ApiError(
                    400, f"token id {t} is outside the vocabulary [0, {vocab})", param=f"tokens[{i}]"
                )
        return JSONResponse({"prompt": await off_loop(loaded.llm.tokenizer.decode, req.tokens)})

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> JSONResponse:
        loaded, scheduler = state.require()
        tok = loaded.llm.tokenizer
        return JSONResponse(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": tok.bos_token,
                "eos_token": tok.eos_token,
                "pad_token": tok.pad_token,
                "unk_token": tok.unk_token,
                "add_bos_token": tok.add_bos_token,
                "add_eos_token": tok.add_eos_token,
                "chat_template": tok.chat_template,
                "model_max_length": scheduler.max_len,
                "vocab_size": loaded.llm.model.config.vocab_size,
            }
        )
