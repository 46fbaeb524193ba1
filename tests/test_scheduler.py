"""The continuous-batching scheduler, driven step by step without HTTP.

What is checked, on a tiny random Llama: requests that join a running batch mid-flight,
leave it early (finish, cancel) or fork n choices from one prefill get exactly the tokens
they get when run alone through the engine (greedy and seeded sampling); rows with
different LoRA adapters share a batch and each matches its adapter merged offline; a full
queue refuses; a failing step ends every request with an error event.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import weightsmith
from weightsmith.lora import LoraConfig, apply_lora, lora_layers, save_adapter, set_adapter
from weightsmith.sampling import SamplingParams
from weightsmith.serve.scheduler import QueueFull, Request, Scheduler, SequenceEvent


@pytest.fixture(scope="module")
def llm(tiny_hf_dir: Path):
    return weightsmith.load(tiny_hf_dir)


def make_scheduler(llm, **kw) -> Scheduler:
    kw.setdefault("max_len", 256)
    kw.setdefault("decode", llm.engine.decode_step())  # as the server does: the CPU's C step
    return Scheduler(llm.model, llm.tokenizer, llm.engine.eos_token_ids, **kw)


class Collector:
    """Records a request's events; `tokens[i]` and `finish[i]` per choice."""

    def __init__(self, n: int = 1) -> None:
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.text = [""] * n
        self.finish: list[str | None] = [None] * n
        self.events: list[SequenceEvent] = []

    def __call__(self, ev: SequenceEvent) -> None:
        self.events.append(ev)
        self.tokens[ev.index] += ev.tokens
        self.text[ev.index] += ev.text
        if ev.finish_reason:
            self.finish[ev.index] = ev.finish_reason


def prompts(llm, count: int) -> list[list[int]]:
    words = ["Once upon a time", "The quick brown fox", "Bonjour le monde", "Hola mundo", "0123 4567"]
    return [llm.tokenizer.encode(f"{words[i % len(words)]} {i}") for i in range(count)]


def alone(llm, prompt: list[int], params: SamplingParams) -> list[int]:
    return llm.engine.generate([prompt], params)[0].token_ids


def request(prompt, params, n=1, **kw) -> tuple[Request, Collector]:
    got = Collector(n)
    seeds = [params.seed + i if params.seed is not None else None for i in range(n)]
    return Request([prompt] * n, [replace(params, seed=s) for s in seeds], emit=got, **kw), got


def run_until_idle(s: Scheduler, limit: int = 1000) -> int:
    steps = 0
    while not s.idle:
        s.step()
        steps += 1
        assert steps < limit
    return steps


GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, seed=11, ignore_eos=True)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_requests_joining_mid_flight_get_their_solo_tokens(llm, params: SamplingParams) -> None:
    s = make_scheduler(llm, max_batch=4)
    ps = prompts(llm, 6)
    lengths = [12, 5, 9, 12, 3, 7]  # rows finish at different steps, so others move into their slots
    reqs = [request(p, replace(params, max_tokens=m)) for p, m in zip(ps, lengths, strict=True)]
    s.submit(reqs[0][0])
    s.step()
    s.step()
    s.submit(reqs[1][0])
    s.submit(reqs[2][0])
    s.step()
    batch_sizes = []
    for r, _ in reqs[3:]:
        s.submit(r)
        s.step()
        batch_sizes.append(len(s.running))
    run_until_idle(s)
    assert max(batch_sizes) == 4  # the batch was full while requests were waiting
    for (r, got), p in zip(reqs, ps, strict=True):
        assert got.finish == ["length"]
        assert got.tokens[0] == alone(llm, p, r.params[0])


def test_n_choices_share_one_prefill_and_match_separate_runs(llm) -> None:
    s = make_scheduler(llm, max_batch=8)
    p = prompts(llm, 1)[0]
    r, got = request(p, SAMPLED, n=3)
    s.submit(r)
    s.step()
    assert len(s.running) == 3
    assert s.cache.lengths[:3] == (len(p) + 1,) * 3  # prompt copied to every row, then one decode step
    run_until_idle(s)
    for i in range(3):
        assert got.tokens[i] == alone(llm, p, replace(SAMPLED, seed=SAMPLED.seed + i))
    assert len({tuple(t) for t in got.tokens}) == 3  # different seeds, different choices


def test_cancelled_request_frees_its_row_and_others_are_unaffected(llm) -> None:
    s = make_scheduler(llm, max_batch=3)
    ps = prompts(llm, 3)
    reqs = [request(p, replace(GREEDY, max_tokens=20)) for p in ps]
    for r, _ in reqs:
        s.submit(r)
    s.step()
    s.step()
    assert len(s.running) == 3
    reqs[0][0].cancel()  # row 0: the last row moves into its slot
    s.step()
    assert len(s.running) == 2
    run_until_idle(s)
    cancelled = reqs[0][1]
    assert cancelled.finish == [None] and len(cancelled.tokens[0]) == 3  # prefill + 2 decode steps
    for (r, got), p in zip(reqs[1:], ps[1:], strict=True):
        assert got.tokens[0] == alone(llm, p, r.params[0])


def test_cancel_while_waiting_never_runs(llm) -> None:
    s = make_scheduler(llm, max_batch=1)
    a, got_a = request(prompts(llm, 1)[0], replace(GREEDY, max_tokens=3))
    b, got_b = request(prompts(llm, 2)[1], GREEDY)
    s.submit(a)
    s.submit(b)
    s.step()
    b.cancel()
    run_until_idle(s)
    assert got_a.finish == ["length"] and got_b.events == []


def test_stop_token_and_stop_string_end_a_row(llm) -> None:
    p = prompts(llm, 1)[0]
    full = llm.engine.generate([p], replace(GREEDY, max_tokens=12))[0]
    s = make_scheduler(llm)
    stop_id = full.token_ids[4]
    r, got = request(p, replace(GREEDY, stop_token_ids=[stop_id]))
    s.submit(r)
    run_until_idle(s)
    assert got.finish == ["stop"] and got.tokens[0] == full.token_ids[: full.token_ids.index(stop_id) + 1]
    # A stop string: the text before it, the same as the engine's.
    text = full.text
    start = next(i for i in range(2, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    stop = text[start : start + 2]
    r, got = request(p, replace(GREEDY, stop=[stop]))
    s.submit(r)
    run_until_idle(s)
    expected = llm.engine.generate([p], replace(GREEDY, stop=[stop]))[0]
    assert got.finish == ["stop"] and got.text[0] == expected.text == text[: text.find(stop)]


def test_queue_full_is_refused(llm) -> None:
    s = make_scheduler(llm, max_batch=1, max_queue=2)
    for _ in range(2):
        s.submit(request(prompts(llm, 1)[0], GREEDY)[0])
    with pytest.raises(QueueFull):
        s.submit(request(prompts(llm, 1)[0], GREEDY)[0])


def test_a_failing_step_ends_every_request_with_an_error(llm, monkeypatch) -> None:
    s = make_scheduler(llm, max_batch=2)
    reqs = [request(p, GREEDY) for p in prompts(llm, 3)]
    for r, _ in reqs:
        s.submit(r)
    s.step()

    def broken(*a, **k):
        raise RuntimeError("device lost")

    monkeypatch.setattr(s, "_decode", broken)
    s.start()
    try:
        for _ in range(200):
            if all(got.finish[0] for _, got in reqs):
                break
            torch.cuda.synchronize() if torch.cuda.is_available() else __import__("time").sleep(0.01)
    finally:
        s.stop()
    for _, got in reqs:
        assert got.finish == ["error"]
        assert "device lost" in got.events[-1].error
    assert s.running == [] and len(s.waiting) == 0


def test_rows_with_different_adapters_match_each_adapter_merged(llm, tiny_hf_dir: Path, tmp_path) -> None:
    served = weightsmith.load(tiny_hf_dir)
    dirs = {}
    for name, seed in (("a", 1), ("b", 2)):
        cfg = LoraConfig(r=4, alpha=8)
        apply_lora(served.model, cfg, name)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in lora_layers(served.model).values():
                for w in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                    w.copy_(torch.randn(w.shape, generator=g) * 0.3)
        dirs[name] = save_adapter(served.model, tmp_path / name, cfg, name=name)
    set_adapter(served.model, None)
    s = make_scheduler(served, max_batch=4)
    ps = prompts(llm, 4)
    names = ["a", None, "b", "a"]
    reqs = [request(p, GREEDY, adapter=n) for p, n in zip(ps, names, strict=True)]
    for r, _ in reqs:
        s.submit(r)
    run_until_idle(s)
    merged = {n: weightsmith.load(tiny_hf_dir, adapter=d) for n, d in dirs.items()}
    merged[None] = llm
    outputs = set()
    for (_, got), p, n in zip(reqs, ps, names, strict=True):
        assert got.tokens[0] == alone(merged[n], p, GREEDY), n
        outputs.add((n, tuple(alone(merged[n], ps[0], GREEDY))))
    assert len({o for _, o in outputs}) == 3  # the adapters do change the output


def long_prompt(llm, tokens: int) -> list[int]:
    ids = llm.tokenizer.encode("Once upon a time there was a small model that learned to talk. " * 8)
    assert len(ids) >= tokens
    return ids[:tokens]


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_a_long_prompt_is_prefilled_in_chunks_while_others_keep_decoding(llm, params) -> None:
    s = make_scheduler(llm, max_batch=4, prefill_chunk=16)
    short = prompts(llm, 1)[0]
    a, got_a = request(short, replace(params, max_tokens=30))
    s.submit(a)
    s.step()
    assert len(short) <= 16  # A itself is prefilled whole
    long = long_prompt(llm, 60)  # 4 chunks of at most 16
    b, got_b = request(long, replace(params, max_tokens=10), n=2)
    s.submit(b)
    for step in range(4):
        before = len(got_a.tokens[0])
        s.step()
        assert len(got_a.tokens[0]) == before + 1  # A got its token every step meanwhile
        assert (got_b.tokens[0] != []) == (step == 3)  # B's first token when its last chunk is in
    run_until_idle(s)
    assert got_a.tokens[0] == alone(llm, short, a.params[0])
    for i in range(2):
        assert got_b.tokens[i] == alone(llm, long, b.params[i]), i


def test_short_requests_pass_a_long_one_waiting_for_the_staging_row(llm) -> None:
    s = make_scheduler(llm, max_batch=4, prefill_chunk=16)
    first, _ = request(long_prompt(llm, 60), GREEDY)
    second, got_second = request(long_prompt(llm, 50), GREEDY)
    short, got_short = request(prompts(llm, 1)[0], GREEDY)
    for r in (first, second, short):
        s.submit(r)
    s.step()
    assert s.staged is not None and s.staged.request is first
    assert list(s.waiting) == [second] and got_short.tokens[0]  # the short one went ahead
    run_until_idle(s)
    assert got_second.tokens[0] == alone(llm, long_prompt(llm, 50), GREEDY)


def test_a_staged_request_that_is_cancelled_frees_its_rows(llm) -> None:
    s = make_scheduler(llm, max_batch=2, prefill_chunk=16)
    r, got = request(long_prompt(llm, 40), GREEDY, n=2)
    s.submit(r)
    s.step()
    assert s.staged is not None
    r.cancel()
    s.step()
    assert s.staged is None and s.idle and got.events == []
    other, got_other = request(prompts(llm, 1)[0], replace(GREEDY, max_tokens=3), n=2)
    s.submit(other)
    run_until_idle(s)
    assert got_other.finish == ["length", "length"]


def test_a_list_of_long_prompts_is_prefilled_in_chunks_too(llm, monkeypatch) -> None:
    """Two distinct long prompts in one request (completions' `prompt` as a list) go through
    the chunked path like one long prompt does: no step prefills more than a chunk."""
    from weightsmith.serve import scheduler as scheduler_module

    real, sizes = scheduler_module.prefill, []

    def counting(model, cache, batch, *a, **k):
        sizes.append(sum(len(p) for p in batch))
        return real(model, cache, batch, *a, **k)

    monkeypatch.setattr(scheduler_module, "prefill", counting)
    s = make_scheduler(llm, max_batch=4, prefill_chunk=16)
    short = prompts(llm, 1)[0]
    a, got_a = request(short, replace(GREEDY, max_tokens=40))
    s.submit(a)
    s.step()
    long_1, long_2 = long_prompt(llm, 40), long_prompt(llm, 33)
    b = Request([long_1, long_1, long_2], [GREEDY] * 3, emit=(got_b := Collector(3)))
    s.submit(b)
    for _ in range(6):  # 3 chunks for long_1, 3 for long_2
        before = len(got_a.tokens[0])
        s.step()
        assert len(got_a.tokens[0]) == before + 1  # A got its token every step meanwhile
    run_until_idle(s)
    assert max(sizes) <= 16, sizes
    for i, p in enumerate([long_1, long_1, long_2]):
        assert got_b.tokens[i] == alone(llm, p, GREEDY), i
    assert got_a.tokens[0] == alone(llm, short, a.params[0])


@pytest.mark.parametrize("long", [False, True], ids=["whole", "chunked"])
def test_a_prefill_that_raises_ends_the_admitted_requests_with_an_error(llm, monkeypatch, long) -> None:
    """Requests taken from the queue but not yet running (their prefill raised, e.g. out of
    memory) get an error event instead of waiting forever; the scheduler keeps serving."""
    from weightsmith.serve import scheduler as scheduler_module

    s = make_scheduler(llm, max_batch=4, prefill_chunk=16)
    first = long_prompt(llm, 40) if long else prompts(llm, 1)[0]
    reqs = [request(first, GREEDY), request(prompts(llm, 2)[1], GREEDY)]
    real = scheduler_module.prefill

    def broken(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(scheduler_module, "prefill", broken)
    for r, _ in reqs:
        s.submit(r)
    s.start()
    try:
        for _ in range(500):
            if all(got.finish[0] for _, got in reqs):
                break
            __import__("time").sleep(0.01)
        for _, got in reqs:
            assert got.finish == ["error"] and "out of memory" in got.events[-1].error
        assert s.idle
        monkeypatch.setattr(scheduler_module, "prefill", real)
        again, got = request(prompts(llm, 1)[0], replace(GREEDY, max_tokens=3))
        s.submit(again)
        for _ in range(500):
            if got.finish[0]:
                break
            __import__("time").sleep(0.01)
        assert got.finish == ["length"]
    finally:
        s.stop()


def test_newcomers_sharing_a_prompt_prefix_copy_it_and_get_their_solo_tokens(llm, monkeypatch) -> None:
    """Requests whose prompts begin like a running row's (a system prompt) copy that prefix from
    its cache row and prefill only the rest, and still get the tokens they get alone; a prompt
    sharing too little is prefilled whole."""
    from weightsmith.serve import prefix, scheduler

    ran: list[list[int]] = []  # the prompt tokens each prefill call ran
    real = scheduler.prefill

    def spy(model, cache, prompts, device, **kw):
        ran.extend(len(p) for p in prompts)
        return real(model, cache, prompts, device, **kw)

    monkeypatch.setattr(scheduler, "prefill", spy)
    system = llm.tokenizer.encode("You are a careful assistant who answers in short plain sentences. " * 2)
    assert len(system) >= prefix.MIN_SHARED
    ps = [
        system + llm.tokenizer.encode(f" Question {i}: {w}?") for i, w in enumerate(["rivers", "owls", "tea"])
    ]
    s = make_scheduler(llm, max_batch=4)
    reqs = [request(p, replace(SAMPLED if i == 1 else GREEDY, max_tokens=6 + i)) for i, p in enumerate(ps)]
    s.submit(reqs[0][0])
    s.step()  # the first prompt runs whole: nothing to share yet
    s.submit(reqs[1][0])
    s.submit(reqs[2][0])
    s.step()  # both newcomers share the system prompt (and more) with row 0
    other = request(llm.tokenizer.encode("Short and unrelated."), GREEDY)
    s.submit(other[0])
    run_until_idle(s)
    shared = len(os.path.commonprefix(ps))
    assert ran[0] == len(ps[0])
    assert ran[1:3] == [len(ps[1]) - shared, len(ps[2]) - shared]
    assert ran[3] == len(other[0].prompts[0])
    for (r, got), p in zip([*reqs, other], [*ps, other[0].prompts[0]], strict=True):
        assert got.finish == ["length"]
        assert got.tokens[0] == alone(llm, p, r.params[0])
