"""The text-level engine (weightsmith.engine) on a tiny random Llama and a tiny byte-level tokenizer.

What is checked, always against the engine's own earlier runs or the tokenizer, never against
remembered outputs:
- `StopMatcher`, fed any chunking of a text, returns exactly the text before the first stop string
  to complete, holds back only what could still start a stop string, and flushes the rest;
- `Engine.stream`: deltas concatenate to the completion's text (and to the tokenizer's decode of its
  token ids), the last delta carries the finish reason and the completion, usage counts add up, and
  max_tokens / eos / stop strings / stop_token_ids end a sequence with the right reason;
- the context limit: too-long prompts are refused, max_tokens is clamped to the space left;
- `Engine.generate` of several prompts equals each prompt alone (greedy and seeded sampling);
- `chat_prompt` renders the checkpoint's template, and refuses when there is none;
- streaming never splits a UTF-8 character, even when every byte is its own token (a scripted
  stand-in model forces the tokens).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tokenizers
import torch
from conftest import build_tiny_hf_dir
from hypothesis import given, settings
from hypothesis import strategies as st

from weightsmith.checkpoint.load import load_checkpoint
from weightsmith.engine import Completion, Delta, Engine
from weightsmith.errors import GenerationError
from weightsmith.row_state import StopMatcher
from weightsmith.sampling import SamplingParams
from weightsmith.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PROMPTS = ["Once upon a time", "The quick brown fox jumps over the lazy dog.", "Hola"]


@pytest.fixture(scope="module")
def engine(tiny_hf_dir: Path) -> Engine:
    ckpt = load_checkpoint(tiny_hf_dir)
    return Engine(ckpt.model, ckpt.tokenizer)


@pytest.fixture(scope="module")
def short_engine(tmp_path_factory) -> Engine:
    """The tiny model with a 64-token context."""
    path = build_tiny_hf_dir(tmp_path_factory.mktemp("short") / "tiny-64", max_position_embeddings=64)
    ckpt = load_checkpoint(path)
    return Engine(ckpt.model, ckpt.tokenizer)


def run(engine: Engine, prompt, params: SamplingParams) -> tuple[list[Delta], Completion]:
    """Stream one prompt; check the delta protocol; return the deltas and the completion."""
    deltas = list(engine.stream(prompt, params))
    *middle, last = deltas
    assert all(d.finish_reason is None and d.completion is None for d in middle)
    assert all(d.text for d in middle), "only the final delta may be empty"
    assert all(d.index == 0 for d in deltas)
    assert last.finish_reason in ("stop", "length")
    completion = last.completion
    assert completion is not None and completion.finish_reason == last.finish_reason
    assert "".join(d.text for d in deltas) == completion.text
    assert completion.completion_tokens == len(completion.token_ids)
    assert completion.prompt_tokens == len(engine.encode_prompt(prompt))
    return deltas, completion


# ----- stop strings at the text level -------------------------------------------------------------


def first_stop_cut(text: str, stops: list[str]) -> int | None:
    """Where the output ends: the start of the first stop string to be completed, reading left to right."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if text[:end].endswith(s)]
        if starts:
            return min(starts)
    return None


def feed_in_chunks(stops: list[str], chunks: list[str]) -> tuple[str, bool]:
    """What the engine does with a matcher: feed until a stop hits, else flush at the end."""
    matcher = StopMatcher(stops)
    out = ""
    seen = ""
    for chunk in chunks:
        seen += chunk
        piece, hit = matcher.feed(chunk)
        out += piece
        if hit:
            return out, True
        held = seen[len(out) :]
        assert seen.startswith(out)
        # Only text that could still become a stop string is held back, and all of it is.
        longest = max(
            (n for s in stops for n in range(1, len(s)) if seen.endswith(s[:n])),
            default=0,
        )
        assert len(held) == longest, (seen, out, stops)
    return out + matcher.flush(), False


def split_at(text: str, cuts: list[int]) -> list[str]:
    points = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in zip(points, points[1:], strict=False)] or [""]


ALPHABET = "abé"


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(ALPHABET + "x", max_size=24),
    stops=st.lists(st.text(ALPHABET, min_size=1, max_size=4), min_size=0, max_size=3),
    cuts=st.lists(st.integers(0, 100), max_size=8),
)
def test_stop_matcher_any_chunking(text: str, stops: list[str], cuts: list[int]) -> None:
    cut = first_stop_cut(text, stops)
    out, hit = feed_in_chunks(stops, split_at(text, cuts))
    assert hit == (cut is not None)
    assert out == (text if cut is None else text[:cut])


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("hello world", [], "hello world"),  # no stop strings
        ("hello world", ["xyz"], "hello world"),  # no stop found: everything after flush
        ("hello world", ["wor"], "hello "),
        ("STOP and more", ["STOP"], ""),  # stop at the very start
        ("abcabd", ["abd"], "abc"),  # a false start then the real one
        ("aaab", ["aab"], "a"),  # overlapping with itself
        ("xabcd", ["abc", "ab"], "x"),  # one stop is a prefix of another
        ("xabcd", ["ab", "abc"], "x"),
        ("one two three", ["three", "two"], "one "),  # the earlier of two stops
        ("ends with stop", ["stop"], "ends with "),
        ("almost sto", ["stop"], "almost sto"),  # a partial stop at the end is flushed
    ],
)
def test_stop_matcher_examples(text: str, stops: list[str], expected: str) -> None:
    whole, _ = feed_in_chunks(stops, [text])
    by_char, _ = feed_in_chunks(stops, list(text))
    assert whole == by_char == expected


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [("xabcdy", ["abcd", "bc"], "xa"), ("baa", ["a", "baa"], "b")],
)
def test_stop_matcher_nested_stop_is_chunking_independent(text: str, stops: list[str], expected: str) -> None:
    by_char, _ = feed_in_chunks(stops, list(text))  # the inner stop completes first: generation stops there
    assert by_char == expected
    whole, _ = feed_in_chunks(stops, [text])  # one token carrying all of it
    assert whole == expected


# ----- streaming and finish reasons ---------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [1, 2, 17])
def test_stream_max_tokens_ends_with_length(engine: Engine, max_tokens: int) -> None:
    for prompt in PROMPTS[:2]:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        _, completion = run(engine, prompt, params)
        assert completion.finish_reason == "length"
        assert completion.completion_tokens == max_tokens


@pytest.mark.parametrize("seed", range(4))
def test_stream_text_is_the_decoded_tokens(engine: Engine, seed: int) -> None:
    prompt = PROMPTS[seed % len(PROMPTS)]
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=32)
    _, completion = run(engine, prompt, params)
    if completion.finish_reason == "length":
        assert completion.completion_tokens == params.max_tokens
    else:  # an end-of-sequence token
        assert completion.token_ids[-1] in engine.eos_token_ids
    assert completion.text == engine.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    usage = completion.to_dict()["usage"]
    assert usage["total_tokens"] == len(engine.encode_prompt(prompt)) + len(completion.token_ids)


def test_stop_string_cuts_the_text_before_it(engine: Engine) -> None:
    _, full = run(engine, PROMPTS[1], GREEDY)
    text = full.text
    assert full.finish_reason == "length" and len(text) > 12
    for start, length in [(0, 2), (len(text) // 3, 3), (len(text) // 2, 4), (len(text) - 3, 3)]:
        stop = text[start : start + length]
        _, c = run(
            engine, PROMPTS[1], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
        )
        assert c.finish_reason == "stop"
        assert c.text == text[: text.index(stop)]
        assert stop not in c.text
        # Greedy: the same tokens up to the one that completed the stop string, then no more.
        assert c.token_ids == full.token_ids[: len(c.token_ids)]
        assert stop in engine.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        # (A trailing U+FFFD is an unfinished character the stream holds back, not text yet.)
        before_last = engine.tokenizer.decode(c.token_ids[:-1], skip_special_tokens=True)
        assert stop not in before_last.rstrip("\ufffd")


def test_two_stop_strings_cut_at_the_first(engine: Engine) -> None:
    _, full = run(engine, PROMPTS[0], GREEDY)
    text = full.text
    early, late = text[len(text) // 4 : len(text) // 4 + 2], text[-2:]
    expected = text[: min(text.index(early), text.index(late))]
    for stops in ([early, late], [late, early]):
        _, c = run(
            engine, PROMPTS[0], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=stops)
        )
        assert c.finish_reason == "stop" and c.text == expected


def test_stop_token_id_ends_without_its_text(engine: Engine) -> None:
    _, full = run(engine, PROMPTS[1], GREEDY)
    ids = full.token_ids
    stop_id = ids[2]
    k = ids.index(stop_id)  # the first time it appears (at most index 2)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[stop_id])
    _, c = run(engine, PROMPTS[1], params)
    assert c.finish_reason == "stop"
    assert c.token_ids == ids[: k + 1]
    assert c.text == engine.tokenizer.decode(ids[:k], skip_special_tokens=True)


# ----- context limit ------------------------------------------------------------------------------


def test_prompt_longer_than_context_is_refused(short_engine: Engine) -> None:
    ctx = short_engine.context_length
    assert ctx == 64
    for n in (ctx, ctx + 1, 3 * ctx):
        with pytest.raises(GenerationError, match="context"):
            list(short_engine.stream([5] * n, GREEDY))
    long_text = "The quick brown fox jumps over the lazy dog. " * 20
    assert len(short_engine.tokenizer.encode(long_text)) > ctx
    with pytest.raises(GenerationError, match="context"):
        short_engine.generate([long_text], GREEDY)
    with pytest.raises(GenerationError):
        short_engine.encode_prompt("")


@pytest.mark.parametrize("prompt_len", [1, 40, 63])
def test_max_tokens_is_clamped_to_the_context(short_engine: Engine, prompt_len: int) -> None:
    ctx = short_engine.context_length
    prompt = [(7 * i) % 250 + 3 for i in range(prompt_len)]
    params = SamplingParams(temperature=0, max_tokens=10 * ctx, ignore_eos=True)
    _, c = run(short_engine, prompt, params)
    assert c.finish_reason == "length"
    assert c.prompt_tokens + c.completion_tokens == ctx


def test_batch_rows_are_clamped_each_to_its_own_space(short_engine: Engine) -> None:
    ctx = short_engine.context_length
    prompts = [[9] * 50, [11] * 10, [13] * 30]
    params = SamplingParams(temperature=0, max_tokens=10 * ctx, ignore_eos=True)
    batch = short_engine.generate(prompts, params)
    assert [c.prompt_tokens + c.completion_tokens for c in batch] == [ctx] * 3
    assert [c.token_ids for c in batch] == [run(short_engine, p, params)[1].token_ids for p in prompts]


# ----- batches equal single runs ------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
        SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=7, max_tokens=16),
        SamplingParams(temperature=1.2, min_p=0.02, repetition_penalty=1.3, seed=3, max_tokens=16),
    ],
    ids=["greedy", "seeded", "seeded-penalty"],
)
def test_generate_batch_equals_each_prompt_alone(engine: Engine, params: SamplingParams) -> None:
    batch = engine.generate(PROMPTS, params)
    alone = [engine.generate([p], params)[0] for p in PROMPTS]
    assert len(batch) == len(PROMPTS)
    for b, a in zip(batch, alone, strict=True):
        assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason)
        assert (b.prompt_tokens, b.completion_tokens) == (a.prompt_tokens, a.completion_tokens)


def test_rows_sharing_a_prompt_share_its_prefill_and_equal_each_row_alone(
    engine: Engine, monkeypatch
) -> None:
    """n samples of one prompt (GRPO's groups): the prompt is prefilled once and copied into
    its rows; every row still equals its run alone."""
    import weightsmith.generate as generate

    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[0], PROMPTS[1]]
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=12, ignore_eos=True) for s in range(5)]
    params[3] = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prefilled: list[int] = []
    real = generate.prefill
    monkeypatch.setattr(
        generate, "prefill", lambda m, c, p, *a, **k: prefilled.append(len(p)) or real(m, c, p, *a, **k)
    )
    batch = engine.generate(prompts, params)
    assert prefilled == [2]  # two distinct prompts, one prefill of two rows
    monkeypatch.undo()
    alone = [engine.generate([p], sp)[0] for p, sp in zip(prompts, params, strict=True)]
    assert [c.token_ids for c in batch] == [c.token_ids for c in alone]
    assert len({tuple(batch[i].token_ids) for i in (0, 2, 3)}) == 3  # each seed its own sample


def test_generate_batch_with_per_row_params_and_early_stops(engine: Engine) -> None:
    _, full = run(engine, PROMPTS[0], GREEDY)
    stop = full.text[len(full.text) // 3 : len(full.text) // 3 + 2]
    params = [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]),  # ends early
        SamplingParams(temperature=1.0, seed=11, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),  # ends first
    ]
    batch = engine.generate(PROMPTS, params)
    alone = [engine.generate([p], sp)[0] for p, sp in zip(PROMPTS, params, strict=True)]
    assert [c.finish_reason for c in batch] == ["stop", "length", "length"]
    assert [(c.token_ids, c.text) for c in batch] == [(c.token_ids, c.text) for c in alone]

    deltas = list(engine.stream_batch(list(PROMPTS), params))
    for i, c in enumerate(batch):
        mine = [d for d in deltas if d.index == i]
        assert "".join(d.text for d in mine) == c.text
        assert [d.finish_reason is not None for d in mine] == [False] * (len(mine) - 1) + [True]


# ----- chat template ------------------------------------------------------------------------------


def test_chat_prompt_renders_the_template(engine: Engine) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Grüße!"},
    ]
    ids = engine.chat_prompt(messages)
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nGrüße!<|im_end|>\n<|im_start|>assistant\n"
    )
    assert engine.tokenizer.decode(ids) == expected
    assert ids == engine.tokenizer.encode(expected, add_special_tokens=False)
    im_start = engine.tokenizer.token_to_id("<|im_start|>")
    assert ids.count(im_start) == 3  # the markers are single special tokens, not text
    _, c = run(engine, ids, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert c.prompt_tokens == len(ids)


def test_chat_prompt_without_template_is_refused(engine: Engine) -> None:
    tok = engine.tokenizer
    backend = tokenizers.Tokenizer.from_str(tok.backend.to_str())
    bare = Tokenizer(backend, eos_token=tok.eos_token, pad_token=tok.pad_token, chat_template=None)
    assert bare.chat_template is None
    with pytest.raises(GenerationError, match="chat template"):
        Engine(engine.model, bare).chat_prompt([{"role": "user", "content": "hi"}])


# ----- forced tokens: eos and UTF-8 streaming ------------------------------------------------------


class ScriptedLM:
    """Stands in for a CausalLM: whatever the input, the next token is the next one of `script`.

    It follows CausalLM.forward's contract (positions, logits_at at prefill, (B, 1, V) logits) and
    borrows the real model's config, so the engine and the token loop run unchanged.
    """

    def __init__(self, real, script: list[int]) -> None:
        self.config = real.config
        self.model = real.model
        self.inv_freq = real.inv_freq
        self.script = script
        self.prompt_lengths: list[int] = []

    def __call__(
        self, input_ids: torch.Tensor, *, positions: torch.Tensor, logits_at=None, **_
    ) -> torch.Tensor:
        if logits_at is not None:  # prefill: logits come from each row's last prompt token
            self.prompt_lengths = [int(i) + 1 for i in logits_at]
            last = logits_at
        else:
            last = positions[:, -1]
        logits = torch.zeros(input_ids.shape[0], 1, self.config.vocab_size)
        for row, pos in enumerate(last.tolist()):
            step = pos + 1 - self.prompt_lengths[row]
            logits[row, 0, self.script[min(step, len(self.script) - 1)]] = 1.0
        return logits


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character map, which byte-level BPE vocabularies are written in."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars: dict[int, str] = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + n) for n, b in enumerate(others)})
    return [chars[b] for b in range(256)]


BYTE_CHARS = _byte_chars()


def byte_token_ids(tok: Tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte of `text`: the hardest case for a streaming detokenizer."""
    ids = [tok.token_to_id(BYTE_CHARS[b]) for b in text.encode("utf-8")]
    assert None not in ids
    assert tok.decode(ids) == text
    return ids


def scripted_engine(engine: Engine, script: list[int]) -> Engine:
    return Engine(ScriptedLM(engine.model, script), engine.tokenizer)


@pytest.mark.parametrize("text", ["Grüße aus Köln", "你好世界", "a🙂b 👩\u200d👩\u200d👧 é", "ok"])
def test_stream_never_splits_a_utf8_character(engine: Engine, text: str) -> None:
    script = byte_token_ids(engine.tokenizer, text)
    params = SamplingParams(temperature=0, max_tokens=len(script), ignore_eos=True)
    deltas, c = run(scripted_engine(engine, script), "Hola", params)
    assert c.token_ids == script and c.finish_reason == "length"
    assert c.text == text
    assert not any("\ufffd" in d.text for d in deltas)


@settings(max_examples=40, deadline=None)
@given(text=st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=10))
def test_stream_utf8_any_text(engine: Engine, text: str) -> None:
    script = byte_token_ids(engine.tokenizer, text)
    params = SamplingParams(temperature=0, max_tokens=len(script), ignore_eos=True)
    deltas, c = run(scripted_engine(engine, script), "Hola", params)
    assert c.text == text
    if "\ufffd" not in text:
        assert not any("\ufffd" in d.text for d in deltas)


def test_random_model_deltas_have_no_replacement_char_the_text_lacks(engine: Engine) -> None:
    """The real model's output, split at every delta: a U+FFFD in a delta must be in the final text."""
    for seed in range(6):
        deltas, c = run(engine, "Hola", SamplingParams(temperature=1.0, seed=seed, max_tokens=24))
        assert sum(d.text.count("\ufffd") for d in deltas) == c.text.count("\ufffd")


def test_eos_ends_with_stop_unless_ignored(engine: Engine) -> None:
    eos = engine.tokenizer.eos_token_id
    assert eos in engine.eos_token_ids
    head = byte_token_ids(engine.tokenizer, "Hi!")
    script = [*head, eos, *byte_token_ids(engine.tokenizer, "more")]
    scripted = scripted_engine(engine, script)

    _, c = run(scripted, "Hola", SamplingParams(temperature=0, max_tokens=20))
    assert (c.text, c.finish_reason, c.token_ids) == ("Hi!", "stop", [*head, eos])

    _, c = run(scripted, "Hola", SamplingParams(temperature=0, max_tokens=len(script), ignore_eos=True))
    assert (c.text, c.finish_reason, c.token_ids) == ("Hi!more", "length", script)

    # Text held back as a possible stop string comes out when the sequence ends otherwise.
    for params in (
        SamplingParams(temperature=0, stop=["!!"]),
        SamplingParams(temperature=0, max_tokens=3, stop=["!?"]),
    ):
        _, c = run(scripted, "Hola", params)
        assert c.text == "Hi!" and c.token_ids == script[: len(c.token_ids)]
        assert c.finish_reason == ("stop" if params.max_tokens > 3 else "length")

    # A stop string that spans several tokens, completed before eos.
    _, c = run(scripted, "Hola", SamplingParams(temperature=0, max_tokens=20, stop=["i!"]))
    assert (c.text, c.finish_reason, c.token_ids) == ("H", "stop", head)
