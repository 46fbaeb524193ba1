"""The CUDA-graph decoder (cuda_graphs.py) computes what the eager step computes.

On the CPU the same code runs with graph capture switched off (`capture=False`): static
input buffers, batch sizes padded to their bucket, attention over a bucketed cache length
with a position mask, the decoder's own cache. What only a GPU can check (the capture
itself) is in benchmarks/gpu_check.py and the `gpu`-marked test at the end.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import weightsmith
from weightsmith import cuda_graphs
from weightsmith.cuda_graphs import GraphDecode, batch_bucket, kv_bucket
from weightsmith.generate import TokenGenerator, decode_one_token
from weightsmith.lora import LoraConfig, apply_lora, lora_layers, row_adapters
from weightsmith.sampling import SamplingParams
from weightsmith.serve.scheduler import Request, Scheduler


@pytest.fixture(scope="module")
def llm(tiny_hf_dir):
    llm = weightsmith.load(tiny_hf_dir)
    if llm.engine.cpu_plan is not None:
        llm.engine.cpu_plan.undo()  # the plain PyTorch model, as on a GPU
    return llm


def run(llm, prompts, params, decode=None):
    gen = TokenGenerator(llm.model, prompts, params, eos_token_ids=set(), decode=decode)
    for _ in gen:
        pass
    return gen.generated, gen


def test_buckets():
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 9, 33, 64)] == [2, 2, 4, 8, 16, 64, 64]
    assert [kv_bucket(n, 1024) for n in (1, 128, 129, 300, 600)] == [128, 128, 256, 512, 1024]
    assert kv_bucket(900, 768) == 768  # never past the cache


def test_greedy_tokens_equal_the_eager_step(llm):
    """Three rows of different lengths (padded to a batch of 4) for 150 tokens, crossing the
    128-entry attention bucket: the same tokens as eager decoding, which attends over exactly
    the filled entries."""
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    params = [SamplingParams(max_tokens=150, temperature=0, ignore_eos=True)] * 3
    eager, _ = run(llm, prompts, params)
    graphs = GraphDecode(llm.model, decode_one_token, compile=False, capture=False)
    ours, gen = run(llm, prompts, params, decode=graphs)
    assert graphs.owns(gen.cache) and graphs.failed is None
    assert sorted(graphs._replays) == [(4, 128, False), (4, 256, False)]
    assert ours == eager


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "smollm3", "olmo2", "gpt-oss"])
def test_other_layers_decode_in_the_graph_cache(family):
    """Sliding layers (window 7, well inside the 128-entry bucket), Gemma 2's capped scores (masked
    bucket entries and all), Gemma 3's two RoPE bases, SmolLM3's layers without RoPE and gpt-oss's
    sinks (a softmax over masked bucket entries too) and experts: the eager step's greedy tokens."""
    from test_model_parity import make_pair

    model = make_pair(family, seed=3)[1]
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13]]
    params = [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)] * 2
    llm = SimpleNamespace(model=model)
    eager, _ = run(llm, prompts, params)
    graphs = GraphDecode(model, decode_one_token, compile=False, capture=False)
    ours, gen = run(llm, prompts, params, decode=graphs)
    assert graphs.owns(gen.cache) and graphs.failed is None
    assert ours == eager


def test_the_compiled_step_gives_eager_tokens_with_one_compilation(llm):
    """`--compile`'s step (torch.compile, then what a graph would replay): sizes are symbolic, so
    batches of 3 and 1 and attended lengths 128 and 256 share one compilation; the tokens are
    eager's. Inductor needs a C++ compiler: where it cannot run, the eager step is captured."""
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    params = [SamplingParams(max_tokens=140, temperature=0, ignore_eos=True)] * 3
    graphs = GraphDecode(llm.model, decode_one_token, compile=True, capture=False)
    for rows in (3, 1):
        eager, _ = run(llm, prompts[:rows], params[:rows])
        assert run(llm, prompts[:rows], params[:rows], decode=graphs)[0] == eager
    if graphs.compile_failed is not None:
        pytest.skip(f"torch.compile cannot run here: {graphs.compile_failed}")
    entries = torch._dynamo.eval_frame._debug_get_cache_entry_list(cuda_graphs._step.__code__)
    assert len(entries) == 1  # one compiled graph for every (rows, kv) this test ran


def test_logits_equal_the_eager_step(llm):
    model = llm.model
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10]]
    graphs = GraphDecode(model, decode_one_token, compile=False, capture=False)
    steps = {}
    for name, decode in (("eager", decode_one_token), ("graphs", graphs)):
        gen = TokenGenerator(
            model,
            prompts,
            [SamplingParams(max_tokens=8, temperature=0)] * 2,
            eos_token_ids=set(),
            decode=decode,
        )
        seen = []
        step = gen.decode

        def spy(*args, step=step, seen=seen):
            out = step(*args)
            seen.append(out.clone())
            return out

        gen.decode = spy
        for _ in gen:
            pass
        steps[name] = torch.stack(seen)
    torch.testing.assert_close(steps["graphs"], steps["eager"], rtol=1e-5, atol=1e-5)


def test_seeded_sampling_and_reuse_across_generations(llm):
    """Sampled rows draw the same tokens; a second generation reuses the decoder's cache (and its
    steps), a generation started while another holds the cache decodes with the fallback."""
    prompts = [[5, 6, 7], [8, 9]]
    params = [
        SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=s, ignore_eos=True) for s in (1, 2)
    ]
    eager, _ = run(llm, prompts, params)
    graphs = GraphDecode(llm.model, decode_one_token, compile=False, capture=False)
    assert run(llm, prompts, params, decode=graphs)[0] == eager  # that generation is over
    cache = graphs.cache
    held = TokenGenerator(llm.model, prompts, params, eos_token_ids=set(), decode=graphs)  # holds the cache
    other = TokenGenerator(llm.model, prompts, params, eos_token_ids=set(), decode=graphs)
    assert graphs.owns(held.cache) and not graphs.owns(other.cache)
    for _ in other:
        pass
    assert other.generated == eager
    del held
    again, gen = run(llm, prompts, params, decode=graphs)
    assert again == eager and graphs.cache is cache and graphs.owns(gen.cache)


def test_the_scheduler_decodes_in_the_graph_cache(llm):
    """Continuous batching through the graph decoder: requests joining and leaving (batch sizes
    change, rows move) get their solo tokens."""
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [[(7 * i + j) % 300 + 3 for j in range(3 + 2 * i)] for i in range(6)]
    solo = [run(llm, [p], [params])[0][0] for p in prompts]
    graphs = GraphDecode(llm.model, decode_one_token, compile=False, capture=False)
    sched = Scheduler(llm.model, llm.tokenizer, frozenset(), max_batch=8, max_len=128, decode=graphs)
    assert graphs.owns(sched.cache)
    got: list[list[int]] = [[] for _ in prompts]
    for i, p in enumerate(prompts[:3]):
        sched.submit(Request([p], [params], emit=lambda ev, i=i: got[i].extend(ev.tokens)))
    for _ in range(4):
        sched.step()
    for i, p in enumerate(prompts[3:], start=3):
        sched.submit(Request([p], [params], emit=lambda ev, i=i: got[i].extend(ev.tokens)))
    while not sched.idle:
        sched.step()
    assert got == solo
    assert {rows for rows, _, _ in graphs._replays} >= {4, 8}


def test_a_failed_capture_falls_back_and_a_failing_step_is_not_hidden(llm, monkeypatch, caplog):
    """A capture that raises is logged once and the generation goes on with the plain step (the
    same tokens); an error of the replayed step itself reaches the caller, nothing marked failed."""
    prompts = [[5, 6, 7], [8, 9]]
    params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)] * 2
    eager, _ = run(llm, prompts, params)
    graphs = GraphDecode(llm.model, decode_one_token, compile=False, capture=False)

    def refuse(*args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "_capture", refuse)
    with caplog.at_level("WARNING", logger="weightsmith.cuda_graphs"):
        assert run(llm, prompts, params, decode=graphs)[0] == eager
    assert graphs.failed == "RuntimeError: operation not permitted when stream is capturing"
    assert sum("capture failed" in r.getMessage() for r in caplog.records) == 1

    broken = GraphDecode(llm.model, decode_one_token, compile=False, capture=False)
    monkeypatch.setattr(cuda_graphs, "_step", lambda *args: (_ for _ in ()).throw(ValueError("bad step")))
    with pytest.raises(ValueError, match="bad step"):
        run(llm, prompts, params, decode=broken)
    assert broken.failed is None


@pytest.fixture(scope="module")
def adapted(tiny_hf_dir):
    """A second copy of the tiny model with two random adapters: "a" (rank 4, every decoder
    linear) and "b" (rank 2 on a few linears of layer 1 and the LM head)."""
    llm = weightsmith.load(tiny_hf_dir)
    if llm.engine.cpu_plan is not None:
        llm.engine.cpu_plan.undo()
    apply_lora(llm.model, LoraConfig(r=4, alpha=8), "a")
    targets = ["q_proj", "v_proj", "down_proj", "lm_head"]
    apply_lora(llm.model, LoraConfig(r=2, alpha=4, target_modules=targets, layers_to_transform=[1]), "b")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in lora_layers(llm.model).values():
            for name in layer.lora_A:
                for p in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return llm


class Counting:
    """The eager step, counting the steps the graph decoder hands it."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        return decode_one_token(*args)


@pytest.mark.parametrize("compile", [False, True])
def test_rows_with_different_adapters_decode_in_the_graphs(adapted, compile):
    """Inside row_adapters (rows for "a", none, "b", ...), the decoder's steps add each row's
    adapter by its code: greedy tokens and every step's logits equal the eager per-group step,
    which equals each row run alone (tests/test_lora_rows.py); no step falls back."""
    model = adapted.model
    names = ["a", None, "b", "a", "b"]
    prompts = [[5 + i, 9, 11 + 3 * i, 4][: 2 + i % 3] for i in range(5)]
    params = [SamplingParams(max_tokens=6 if compile else 20, temperature=0, ignore_eos=True)] * 5
    fallback = Counting()
    graphs = GraphDecode(model, fallback, compile=compile, capture=False)
    out = {}
    for label, decode in (("eager", decode_one_token), ("graphs", graphs)):
        gen = TokenGenerator(model, prompts, params, eos_token_ids=set(), decode=decode)
        seen, step = [], gen.decode
        gen.decode = lambda *args, step=step, seen=seen: seen.append(step(*args)) or seen[-1]
        with row_adapters(model, names):
            for _ in gen:
                pass
        out[label] = (gen.generated, torch.stack(seen))
    assert out["graphs"][0] == out["eager"][0]
    torch.testing.assert_close(out["graphs"][1], out["eager"][1], rtol=1e-5, atol=1e-5)
    assert fallback.calls == 0 and list(graphs._replays) == [(8, 128, True)]
    if compile and graphs.compile_failed is not None:
        pytest.skip(f"torch.compile cannot run here: {graphs.compile_failed}")
    assert all(m.row_index is None for m in lora_layers(model).values())  # put back after each step


def test_the_scheduler_serves_adapters_from_the_graphs(adapted):
    """A server with adapters loaded: requests for "a", "b" and the base model joining and leaving
    get their solo tokens (set_adapter / adapters off), every decode step in the graphs."""
    model = adapted.model
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    prompts = [[(5 * i + j) % 300 + 3 for j in range(2 + i)] for i in range(6)]
    names = ["a", None, "b", "b", None, "a"]
    solo = []
    for p, name in zip(prompts, names, strict=True):
        with row_adapters(model, [name]):
            solo.append(run(adapted, [p], [params])[0][0])
    fallback = Counting()
    graphs = GraphDecode(model, fallback, compile=False, capture=False)
    sched = Scheduler(model, adapted.tokenizer, frozenset(), max_batch=8, max_len=128, decode=graphs)
    got: list[list[int]] = [[] for _ in prompts]

    def submit(i: int) -> None:
        emit = lambda ev, i=i: got[i].extend(ev.tokens)  # noqa: E731
        sched.submit(Request([prompts[i]], [params], emit=emit, adapter=names[i]))

    for i in range(3):
        submit(i)
    for _ in range(4):
        sched.step()
    for i in range(3, 6):
        submit(i)
    while not sched.idle:
        sched.step()
    assert got == solo
    assert fallback.calls == 0 and {indexed for _, _, indexed in graphs._replays} == {True}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_graphs_give_the_eager_greedy_tokens(tiny_hf_dir):
    torch.backends.cuda.matmul.allow_tf32 = False
    llm = weightsmith.load(tiny_hf_dir, device="cuda", dtype="fp32")
    prompts = [[5, 6, 7, 8], [9, 10]]
    params = [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)] * 2
    eager, _ = run(llm, prompts, params)
    for compile in (False, True):
        graphs = GraphDecode(llm.model, decode_one_token, compile=compile)
        ours, _ = run(llm, prompts, params, decode=graphs)
        assert graphs.failed is None and ours == eager
    # Rows of different adapters in the captured graphs: the eager per-group step's tokens.
    apply_lora(llm.model, LoraConfig(r=4, alpha=8), "a")
    apply_lora(llm.model, LoraConfig(r=2, alpha=4, target_modules=["q_proj", "down_proj"]), "b")
    with torch.no_grad():
        for layer in lora_layers(llm.model).values():
            for name in layer.lora_B:
                layer.lora_B[name].weight.normal_(std=0.2)
    with row_adapters(llm.model, ["b", "a"]):
        eager, _ = run(llm, prompts, params)
        graphs = GraphDecode(llm.model, decode_one_token, compile=False)
        ours, _ = run(llm, prompts, params, decode=graphs)
    assert graphs.failed is None and ours == eager and any(indexed for *_, indexed in graphs._replays)
