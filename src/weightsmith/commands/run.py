"""Commands that run a model: generate, and the conversation `weightsmith chat` drives.

`run_generate(cfg, progress)` completes `cfg.prompt` and returns the completion as data;
`progress`, when given, receives the text as it arrives (the CLI writes it to stdout).
Chat is interactive, so its terminal loop (reading lines, slash commands, Ctrl-C) stays
in `weightsmith.cli.run`; what it drives lives here: `open_chat(cfg)` loads the model and
policy and returns a `ChatSession`, which keeps the history, fits it to the context and
streams each answer. That keeps the session callable from Python (the demo uses it) while
no terminal handling lands in the commands layer.

Not here: reading the prompt from standard input, printing (`weightsmith.cli.run`); the
engine, sampling and speculative decoding themselves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from weightsmith.commands.loading import (
    LoadOptions,
    LoadStatus,
    SamplingOptions,
    SteerOptions,
    load_model,
    load_status,
)
from weightsmith.config import opt
from weightsmith.errors import GenerationError, UsageError
from weightsmith.llm import LLM
from weightsmith.prompt_cache import CHAT_BUDGET, PromptCache
from weightsmith.safety.policy_file import ClassifierAccess

TextSink = Callable[[str], None]


@dataclass(kw_only=True)
class GenerateConfig(SteerOptions, LoadOptions, SamplingOptions):
    """Complete a prompt (from --prompt or standard input)."""

    prompt: str | None = opt(None, "text to continue; read from standard input when omitted", short="-p")
    chat: bool = opt(False, "wrap the prompt as a user message in the model's chat template")
    system: str | None = opt(None, "system message (with --chat)")
    json: bool = opt(False, "print one JSON object with text, finish reason, usage and timings")
    draft: str | None = opt(None, "draft model for speculative decoding (greedy only; same tokenizer)")
    prompt_lookup: int | None = opt(
        None,
        "speculate without a draft model: propose the tokens that followed the latest earlier occurrence of "
        "the text's last N tokens (greedy only; for answers that repeat the prompt; 3 is a good N)",
        metavar="N",
    )
    draft_k: int = opt(4, "tokens the draft (or --prompt-lookup) proposes per step")
    guard: str | None = opt(
        None, "guardrail policy file (or builtin:NAME) applied to the prompt and the answer"
    )
    classifier: ClassifierAccess = opt(default_factory=ClassifierAccess, flatten=True)
    compile: bool = opt(
        False, "decode through torch.compile (CUDA graphs on a GPU; eager if it cannot compile)"
    )


def run_generate(cfg: GenerateConfig, progress: TextSink | None = None) -> dict:
    """Complete `cfg.prompt`; `progress(text)` receives the text as it arrives (and its
    `loading(model)`, if it has one, wraps each model load)."""
    if cfg.prompt is None:
        raise UsageError("no prompt: pass --prompt TEXT or pipe text on standard input")
    prompt, on_text, status = cfg.prompt, progress, load_status(progress)
    sampling = cfg.sampling()  # reads --json-schema: a bad file is refused before the model loads
    guard = _load_guard(cfg, status)
    llm = cfg.load(status)
    llm.engine.compile = cfg.compile
    params = llm.sampling_params(**sampling)
    messages = ([{"role": "system", "content": cfg.system}] if cfg.system and cfg.chat else []) + [
        {"role": "user", "content": prompt}
    ]
    speculate = (
        "--draft" if cfg.draft is not None else "--prompt-lookup" if cfg.prompt_lookup is not None else None
    )
    if guard is not None:
        if speculate:
            raise UsageError(f"--guard and {speculate} cannot be combined yet; drop one of them")
        to_ids = (
            llm.engine.chat_prompt if cfg.chat else (lambda m: llm.engine.encode_prompt(m[-1]["content"]))
        )
        completion, reply = guarded_stream(llm, guard, messages, to_ids, params, on_text)
        return {"model": cfg.model, "prompt": prompt, **_guarded_result(completion, reply)}
    source: Any = llm.engine.chat_prompt(messages) if cfg.chat else prompt
    if speculate:
        return {
            "model": cfg.model,
            "prompt": prompt,
            **_run_speculative(cfg, llm, params, source, on_text, status),
        }
    completion = None
    for delta in llm.engine.stream(source, params):
        if on_text and delta.text:
            on_text(delta.text)
        completion = delta.completion or completion
    assert completion is not None
    return {"model": cfg.model, "prompt": prompt, **completion.to_dict()}


def _load_guard(cfg: Any, status: LoadStatus | None) -> Any:
    """The --guard policy, read and checked before the model loads (None without --guard)."""
    from weightsmith.safety.guarded import load_guard

    opts = {"device": cfg.device, "dtype": cfg.dtype, "allow_pickle": cfg.allow_pickle}
    return load_guard(
        cfg.guard,
        load_model=lambda ref: load_model(ref, progress=status, **opts),
        grants=cfg.classifier.grants(),
    )


def guarded_stream(
    llm: LLM, guard: Any, messages: list[dict], to_ids: Callable[[list[dict]], list[int]], params: Any,
    on_text: TextSink | None,
) -> tuple[Any, Any]:  # fmt: skip
    """One guarded answer: streamed as it comes when the policy has only input rails; held
    until complete (then checked and shown) when it has output rails. Returns the model's
    Completion (None when the input was blocked) and the `GuardedReply`."""
    from weightsmith.safety.guarded import guarded_replies

    live = not guard.has_output_rails
    state: dict[str, Any] = {"completion": None}

    def generate(convs: list[list[dict]]) -> list[tuple[str, str]]:
        for delta in llm.engine.stream(to_ids(convs[0]), params):
            if live and on_text and delta.text:
                on_text(delta.text)
            state["completion"] = delta.completion or state["completion"]
        c = state["completion"]
        return [(c.text, c.finish_reason)]

    reply = guarded_replies(guard, [messages], generate)[0]
    if on_text and reply.text and not (live and state["completion"] is not None):
        on_text(reply.text)
    return state["completion"], reply


def _guarded_result(completion: Any, reply: Any) -> dict:
    out = completion.to_dict() if completion is not None else {"usage": None}
    out.update({"text": reply.text, "finish_reason": reply.finish_reason, "guard": reply.guard_record()})
    return out


def _run_speculative(
    cfg: GenerateConfig,
    llm: LLM,
    params: Any,
    source: Any,
    on_text: TextSink | None,
    status: LoadStatus | None,
) -> dict:
    """`generate --draft` / `--prompt-lookup`: the target's greedy tokens, drafted by a second
    model or by the text so far. Stop strings are not applied here, so --stop is refused rather
    than silently ignored."""
    from weightsmith.engine import Completion
    from weightsmith.speculative import LookupDrafter, check_draft, speculative_generate

    _check_speculative(cfg, params)
    if cfg.draft is not None:
        loaded = load_model(
            cfg.draft, progress=status, device=cfg.device, dtype=cfg.dtype, allow_pickle=cfg.allow_pickle
        )
        check_draft(llm.model, loaded.model)
        drafter, step = loaded.model, loaded.engine.decode_step()
    else:
        n = cfg.prompt_lookup or 1
        drafter, step = LookupDrafter(max_n=n, min_n=n), None
    ids = llm.engine.encode_prompt(source)
    eos = set() if params.ignore_eos else set(llm.engine.eos_token_ids)
    eos |= set(params.stop_token_ids)
    start = time.perf_counter()
    res = speculative_generate(
        llm.model, drafter, ids, max_tokens=params.max_tokens, k=cfg.draft_k, eos_token_ids=eos,
        target_step=llm.engine.decode_step(), kv_dtype=llm.engine.kv_dtype,
        **({"draft_step": step} if step is not None else {}),
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    shown = res.tokens[:-1] if res.finish_reason == "stop" else res.tokens  # the end token has no text
    text = llm.tokenizer.decode(shown, skip_special_tokens=True)
    if on_text and text:
        on_text(text)
    completion = Completion(
        text, res.finish_reason, len(ids), len(res.tokens), res.tokens, decode_seconds=elapsed
    )
    speculative = {
        "proposed": res.proposed,
        "accepted": res.accepted,
        "acceptance_rate": round(res.acceptance_rate, 4),
        "target_forwards": res.target_forwards,
    }
    return {**completion.to_dict(), "speculative": speculative}


def _check_speculative(cfg: GenerateConfig, params: Any) -> None:
    """What --draft and --prompt-lookup cannot do, refused in one line each."""
    flag = "--draft" if cfg.draft is not None else "--prompt-lookup"
    if cfg.draft is not None and cfg.prompt_lookup is not None:
        raise UsageError("--draft and --prompt-lookup are two ways to draft; choose one")
    if cfg.prompt_lookup is not None and cfg.prompt_lookup < 1:
        raise UsageError(
            f"--prompt-lookup N looks up the last N tokens; N must be at least 1, got {cfg.prompt_lookup}"
        )
    if params.temperature != 0:
        raise UsageError("speculative decoding is greedy-only here; pass --temperature 0")
    if params.grammar is not None:
        raise UsageError(f"--json-schema is not supported with {flag}; drop one of them")
    if params.stop:
        raise UsageError(f"--stop is not supported with {flag}; drop one of them")
    if params.repetition_penalty != 1 or params.presence_penalty or params.frequency_penalty:
        raise UsageError(f"{flag} does not apply repetition penalties; pass --repetition-penalty 1")
    if cfg.draft_k < 1:
        raise UsageError(f"--draft-k must be at least 1, got {cfg.draft_k}")


@dataclass(kw_only=True)
class ChatConfig(SteerOptions, LoadOptions, SamplingOptions):
    """Chat interactively (or answer piped lines, one turn per line)."""

    max_tokens: int = opt(512, "most tokens per answer", short="-n")
    system: str | None = opt(None, "system message for the conversation")
    guard: str | None = opt(None, "guardrail policy file (or builtin:NAME) applied to every turn")
    classifier: ClassifierAccess = opt(default_factory=ClassifierAccess, flatten=True)
    compile: bool = opt(
        False, "decode through torch.compile (CUDA graphs on a GPU; eager if it cannot compile)"
    )


@dataclass
class ChatSession:
    """A conversation that keeps history and trims the oldest turns to fit the context."""

    llm: LLM
    params: dict[str, Any]
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    guard: Any = None

    def messages(self) -> list[dict[str, str]]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + self.history

    def reply(self, text: str, on_text: TextSink, on_reasoning: TextSink | None = None) -> dict:
        """Answer `text`, streaming the answer to `on_text` and a reasoning model's thoughts (gpt-oss's
        analysis, never kept in the history) to `on_reasoning`, whose `end()`, if it has one, is
        called when the answer starts."""
        self.history.append({"role": "user", "content": text})
        sp = self.llm.sampling_params(**self.params)
        if self.guard is not None:
            return self._guarded_reply(sp, on_text)
        ids = self._fitting_prompt(sp.max_tokens)
        answer, completion = [], None
        for delta in self.llm.engine.stream(ids, sp):
            if delta.reasoning and on_reasoning is not None:
                on_reasoning(delta.reasoning)
            if delta.text:
                if not answer and hasattr(on_reasoning, "end"):
                    on_reasoning.end()  # type: ignore[union-attr]
                on_text(delta.text)
                answer.append(delta.text)
            completion = delta.completion or completion
        self.history.append({"role": "assistant", "content": "".join(answer)})
        return completion.to_dict() if completion else {}

    def _guarded_reply(self, sp: Any, on_text: TextSink) -> dict:
        def to_ids(messages: list[dict]) -> list[int]:
            # What the guard let through, redactions included, is the history from now on.
            self.history = [m for m in messages if m["role"] != "system"]
            return self._fitting_prompt(sp.max_tokens)

        completion, reply = guarded_stream(self.llm, self.guard, self.messages(), to_ids, sp, on_text)
        if completion is None:
            self.history.pop()  # blocked before the model: the turn is not kept
        else:
            self.history.append({"role": "assistant", "content": reply.text})
        return _guarded_result(completion, reply)

    def _fitting_prompt(self, max_tokens: int) -> list[int]:
        budget = self.llm.engine.context_length - min(max_tokens, self.llm.engine.context_length // 2)
        while True:
            ids = self.llm.tokenizer.apply_chat_template(
                self.messages(), add_generation_prompt=True, tokenize=True
            )
            if len(ids) <= budget or len(self.history) <= 1:
                return self.llm.engine.encode_prompt(ids)
            self.history = self.history[2:]  # drop the oldest exchange


def open_chat(cfg: ChatConfig, progress: Any = None) -> ChatSession:
    """Load the policy (checked first) and the model; a session ready for its first turn.
    `progress.loading(model)`, if it has one, wraps each model load."""
    status = load_status(progress)
    sampling = cfg.sampling()  # reads --json-schema: a bad file is refused before the model loads
    guard = _load_guard(cfg, status)
    llm = cfg.load(status)
    llm.engine.compile = cfg.compile
    # each turn resends the conversation: keep it, so a turn prefills only its new message
    llm.engine.prompt_cache = PromptCache(CHAT_BUDGET)
    if not llm.tokenizer.chat_template:
        raise GenerationError(f"{cfg.model} has no chat template; use `weightsmith generate` instead")
    llm.sampling_params(**sampling)  # an unusable schema is refused before the first turn
    return ChatSession(llm, sampling, cfg.system, guard=guard)
