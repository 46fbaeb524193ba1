"""From a validated request to prompt token ids: the part of a request that costs CPU.

Rendering a chat template, running guardrail checks and tokenising take time in proportion to
the request (a 4 MB body is seconds of CPU), so the routes run them through `off_loop`, on a
worker thread, and the event loop keeps serving every other client meanwhile. Characters are
counted first, on the loop, which is cheap: a request over `--max-prompt-chars` is refused
with 400 before any of that work. A chat template renders within `TemplateLimits` (its time
limit is `--template-timeout`); one that breaks them costs its own request a 400.

Not here: routing and the response (app.py), validation (schemas.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool

from weightsmith.chat_template import TemplateLimits
from weightsmith.errors import WeightsmithError
from weightsmith.llm import LLM
from weightsmith.serve.schemas import ApiError

T = TypeVar("T")


async def off_loop(func: Callable[..., T], *args: Any) -> T:
    """`func(*args)` on a worker thread, so the event loop stays free for other clients."""
    return await run_in_threadpool(func, *args)


def check_chars(count: int, limit: int, param: str) -> None:
    """400 when a request's prompt text is over `limit` characters (checked before tokenising)."""
    if count > limit:
        raise ApiError(
            400,
            f"{param} holds {count} characters, more than this server's limit of {limit} "
            "(--max-prompt-chars); shorten the prompt",
            param=param,
            code="prompt_too_long",
        )


def check_n(choices: int, max_batch: int, batch: int = 1) -> None:
    if choices > max_batch:
        what = f"n x {batch} prompts" if batch > 1 else "n"
        raise ApiError(400, f"{what} = {choices} is more than this server's batch of {max_batch}", param="n")


def render(
    llm: LLM,
    messages: list[dict[str, Any]],
    limits: TemplateLimits,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """The prompt ids of `messages` (and `tools`, the template's `tools` variable) through the
    checkpoint's chat template; 400 when it refuses."""
    if not llm.tokenizer.chat_template:
        raise ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
    try:
        return list(llm.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      tokenize=True, limits=limits, tools=tools))  # fmt: skip
    except WeightsmithError as e:
        raise ApiError(400, f"the chat template refused the messages: {e}", param="messages") from None


def chat_ids(
    llm: LLM, guard: Any, messages: list[dict[str, Any]], limits: TemplateLimits, tools: list | None = None
) -> tuple[list[int], str | None]:
    """The prompt ids of a chat request after its input rails, and the refusal when a rail
    blocked it (None otherwise)."""
    refusal = None
    if guard is not None:
        verdict, messages = guard.guard_messages(messages)
        refusal = verdict.refusal or "" if verdict.blocked else None
    return render(llm, messages, limits, tools=tools), refusal


def completion_ids(
    llm: LLM, guard: Any, prompts: list[str | list[int]], n: int
) -> tuple[list[list[int]], dict[int, str]]:
    """Each prompt's ids after the input rails, and the refusals by choice index."""
    ids = [prompt_ids(llm, p, i, len(prompts)) for i, p in enumerate(prompts)]
    if guard is None:
        return ids, {}
    return guard_prompts(guard, llm, prompts, ids, n)


def guard_prompts(
    guard: Any, llm: LLM, prompts: list, ids: list[list[int]], n: int
) -> tuple[list[list[int]], dict[int, str]]:
    """Input rails over each prompt: redacted prompts are re-tokenized; the choices of a
    blocked prompt get the refusal (keyed by choice index)."""
    out, refusals = [], {}
    for i, (prompt, p) in enumerate(zip(prompts, ids, strict=True)):
        text = prompt if isinstance(prompt, str) else llm.tokenizer.decode(p)
        verdict = guard.check_input(text)
        if verdict.blocked:
            refusals.update(dict.fromkeys(range(i * n, (i + 1) * n), verdict.refusal or ""))
        elif verdict.action == "redact":
            p = llm.tokenizer.encode(verdict.text)
        out.append(p)
    return out, refusals


def prompt_param(index: int, count: int) -> str:
    return "prompt" if count == 1 else f"prompt[{index}]"


def prompt_ids(llm: LLM, prompt: str | list[int], index: int, count: int) -> list[int]:
    param = prompt_param(index, count)
    if isinstance(prompt, str):
        ids = llm.tokenizer.encode(prompt)
    else:
        vocab = llm.model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param=param)
        ids = list(prompt)
    if not ids:
        raise ApiError(400, "the prompt is empty", param=param)
    return ids
