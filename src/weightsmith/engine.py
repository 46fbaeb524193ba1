"""The text-level engine: prompts or chat messages in, streamed text deltas out.

Wraps the token loop (generate.py) with tokenization, the checkpoint's chat
template and each row's text (row_state.TextStream: a streaming detokenizer that never
splits a UTF-8 character, and stop strings: text up to the stop string is returned, the
stop string is not, as in OpenAI's API). chat, generate, eval, red-team and serve all go
through `Engine`.

The engine owns how its model decodes: for a CPU model it prepares the CPU decode plan
(weightsmith.cpu_decode: the decode layout and the fused C step) and `decode_step()` is
the one place the step is chosen (eager, compiled or C), refreshing the plan first so an
adapter applied or merged since is seen.

A row may follow a grammar (`SamplingParams.grammar`; `json_schema()` compiles one with the
engine's `grammars`, grammar.py): its sampler masks the logits every step, whichever step runs.

Not here: request scheduling across clients (the server adds that on top).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from weightsmith.cpu_decode import CpuDecodePlan, prepare_cpu_decode
from weightsmith.errors import GenerationError, UsageError
from weightsmith.generate import DecodeFn, TokenGenerator, compiled_step, decode_one_token
from weightsmith.grammar import Grammar, GrammarCompiler
from weightsmith.harmony import HarmonyReader, is_harmony
from weightsmith.kv_cache import KVCache
from weightsmith.models import CausalLM
from weightsmith.prompt_cache import MIN_SHARED, PromptCache
from weightsmith.row_state import TextStream
from weightsmith.sampling import SamplingParams
from weightsmith.tokenizer import Tokenizer

__all__ = ["Completion", "Delta", "Engine", "TextStream"]

Prompt = str | list[int]


@dataclass
class Delta:
    """New text for one sequence; the last delta carries `finish_reason`."""

    text: str
    index: int = 0
    finish_reason: str | None = None  # "stop" | "length"
    completion: Completion | None = None  # set on the last delta
    reasoning: str = ""  # a reasoning model's new thoughts, apart from the answer (gpt-oss)


@dataclass
class Completion:
    """A finished sequence with its usage and timings."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    #: gpt-oss's analysis channel (harmony.py); `text` is then its final answer alone.
    reasoning: str = ""

    @property
    def decode_tokens_per_second(self) -> float:
        n = max(self.completion_tokens - 1, 0)  # the first token comes from prefill
        return n / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            **({"reasoning": self.reasoning} if self.reasoning else {}),
            "finish_reason": self.finish_reason,
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
            },
            "timings": {
                "prefill_seconds": round(self.prefill_seconds, 4),
                "decode_seconds": round(self.decode_seconds, 4),
                "decode_tokens_per_second": round(self.decode_tokens_per_second, 2),
            },
        }


class Engine:
    """Generates text from a model and its tokenizer."""

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Tokenizer,
        *,
        compile: bool = False,
        cpu_decode: bool = True,
        decode_layout: bool = True,
    ) -> None:
        """compile: decode through torch.compile (CUDA graphs on a CUDA device).
        cpu_decode: on the CPU, decode through the fused C step where it applies.
        decode_layout: with cpu_decode, also lay the weights out for the PyTorch decode path
            (cpu_decode/layout.py); False leaves every weight where it is (a model being
            trained: the C step reads the weights, and LoRA adapters, in place)."""
        self.model = model
        self.tokenizer = tokenizer
        #: decode through torch.compile with static shapes (weightsmith.compiled)
        self.compile = compile
        #: Whether answers are gpt-oss's channels (harmony.py): text is then the final answer.
        self.harmony = is_harmony(tokenizer)
        eos = set(tokenizer.eos_token_ids)
        cfg_eos = model.config.eos_token_id
        eos.update([cfg_eos] if isinstance(cfg_eos, int) else (cfg_eos or []))
        if self.harmony:  # an answer ends with its final message or a call (GGUF files name neither)
            eos.update(tokenizer.token_to_id(m) for m in ("<|return|>", "<|call|>"))
        self.eos_token_ids = frozenset(eos)
        #: Compiles JSON schemas and tool-call grammars for this tokenizer (grammar.py).
        self.grammars = GrammarCompiler(tokenizer, self.eos_token_ids, model.config.vocab_size)
        #: The CPU decode layout and fused C step (None off the CPU or with `cpu_decode=False`);
        #: `cpu_plan.undo()` gives the model back as it was.
        self.cpu_plan: CpuDecodePlan | None = None
        #: Kept conversations (prompt_cache.py; `chat` sets one): a one-prompt generation copies the
        #: longest kept prefix of its prompt instead of prefilling it, and is kept when it ends.
        self.prompt_cache: PromptCache | None = None
        #: The key/value cache's dtype (None: the model's): bf16 under an fp32 model halves the
        #: cache, its entries rounded to bf16 (`weightsmith.load(kv_cache_dtype=...)`).
        self.kv_dtype: torch.dtype | None = None
        if cpu_decode and isinstance(model, CausalLM) and model.inv_freq.device.type == "cpu":
            self.cpu_plan = prepare_cpu_decode(model, layout=decode_layout)

    def decode_step(self) -> DecodeFn:
        """The decode step for the next generation, chosen here once: the CPU plan's fused C step
        where it applies (its rows permitting), else the eager PyTorch step; with `compile`,
        replayed from CUDA graphs on a CUDA device, else through torch.compile."""
        step: DecodeFn = decode_one_token
        if self.cpu_plan is not None:
            step = self.cpu_plan.decode_step(step)
        if self.compile:
            if self.kv_dtype == torch.int8:
                raise UsageError("--kv-cache-dtype int8 decodes with the eager or C step; drop --compile")
            step = compiled_step(self.model, step)
        return step

    def json_schema(self, schema: object) -> Grammar:
        """The grammar of JSON documents valid against `schema` (a dict, or its JSON text), for
        `SamplingParams(grammar=...)`; GrammarError when the schema cannot be used."""
        return self.grammars.json_schema(schema)

    @property
    def context_length(self) -> int:
        return self.model.config.max_position_embeddings

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise GenerationError("the prompt is empty; give at least one token of text")
        if len(ids) >= self.context_length:
            raise GenerationError(
                f"the prompt has {len(ids)} tokens but the model's context is {self.context_length}; shorten it"
            )
        return ids

    def chat_prompt(self, messages: list[dict], **template_kwargs) -> list[int]:
        """Render `messages` with the checkpoint's chat template and tokenize it."""
        if not self.tokenizer.chat_template:
            raise GenerationError(
                "this checkpoint has no chat template; use `generate` with a plain prompt instead of chat"
            )
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, **template_kwargs
        )
        return self.encode_prompt(ids)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[Delta]:
        """Stream one sequence's text deltas; the last carries the finish reason."""
        yield from self.stream_batch([prompt], [params or SamplingParams()])

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams | list[SamplingParams]
    ) -> list[Completion]:
        """Complete several prompts in one batch; results equal running each alone."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        done: list[Completion | None] = [None] * len(prompts)
        for delta in self.stream_batch(list(prompts), params):
            if delta.completion is not None:
                done[delta.index] = delta.completion
        return [c for c in done if c is not None]

    def stream_batch(self, prompts: list[Prompt], params: list[SamplingParams]) -> Iterator[Delta]:
        """Stream deltas for a batch, tagged with the prompt's index."""
        if not prompts or len(prompts) != len(params):
            raise GenerationError(
                f"got {len(prompts)} prompts and {len(params)} sampling settings; give one per prompt"
            )
        ids = [self.encode_prompt(p) for p in prompts]
        params = [
            replace(sp, max_tokens=min(sp.max_tokens, self.context_length - len(p)))
            for p, sp in zip(ids, params, strict=False)
        ]
        texts = [TextStream(self.tokenizer, sp.stop) for sp in params]
        kept = self.prompt_cache if len(ids) == 1 else None
        gen = TokenGenerator(
            self.model, ids, params, eos_token_ids=self.eos_token_ids, compile=self.compile,
            decode=self.decode_step(), texts=texts, prefix=self._kept_prefix(ids[0]) if kept else None,
            kv_dtype=self.kv_dtype,
        )  # fmt: skip
        start = time.perf_counter()
        first_at: list[float | None] = [None] * len(ids)
        answers = [Answers(self.tokenizer) if self.harmony else None for _ in ids]
        for events in gen:
            now = time.perf_counter()
            for ev in events:
                row, answer = ev.row, answers[ev.row]
                first_at[row] = first_at[row] or now
                text, thought = (ev.text, "") if answer is None else answer.read(ev.token, ev.finish_reason)
                if ev.finish_reason is None:
                    if text or thought:
                        yield Delta(text, row, reasoning=thought)
                    continue
                state = gen.rows[row]
                if kept is not None and ev.finish_reason in ("stop", "length"):
                    kept.keep(gen.cache, row, ids[row] + state.generated, None, MIN_SHARED)
                completion = Completion(
                    texts[row].text if answer is None else answer.content, ev.finish_reason, len(ids[row]),
                    len(state.generated), list(state.generated), prefill_seconds=(first_at[row] or now) - start,
                    decode_seconds=now - (first_at[row] or now), reasoning="" if answer is None else answer.reasoning,
                )  # fmt: skip
                yield Delta(text, row, ev.finish_reason, completion, thought)

    def _kept_prefix(self, prompt: list[int]) -> tuple[KVCache, int] | None:
        """The prompt cache's longest prefix of `prompt` (at least MIN_SHARED tokens, and one left
        to prefill) as TokenGenerator's `prefix`, or None."""
        assert self.prompt_cache is not None
        entry, n = self.prompt_cache.longest(prompt)
        n = min(n, len(prompt) - 1)
        if entry is None or n < MIN_SHARED:
            return None
        self.prompt_cache.touch(entry)
        return entry.cache, n


class Answers:
    """One row's answer from a harmony model (gpt-oss), token by token: its final channel as the
    text, its analysis as the reasoning (harmony.py). Stop strings still end the row (on the raw
    text) but are not cut from the answer."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.reader = HarmonyReader(tokenizer)
        self.content = ""
        self.reasoning = ""

    def read(self, token: int | None, finish_reason: str | None) -> tuple[str, str]:
        """(new answer text, new reasoning) with `token` (the row's last when `finish_reason`)."""
        parts = self.reader.feed([] if token is None else [token])
        if finish_reason is not None:
            end = self.reader.finish(ended=finish_reason == "stop")
            parts.content += end.content
            parts.reasoning += end.reasoning
        self.content += parts.content
        self.reasoning += parts.reasoning
        return parts.content, parts.reasoning
