"""The GPU speed sections of gpu_check.py: decode, the server's batching, and LoRA training.

Each measures weightsmith and its peer in the same process on the same random weights:

- decode: ours eager, ours replayed from CUDA graphs (eager step, and the `--compile` step:
  torch.compile then captured), transformers eager (dynamic cache) and transformers with the
  static cache (which `generate` compiles on CUDA); batch 1 and 32; decode rate = the time
  for 129 tokens minus the time for 1, medians of `runs` after warm-ups; and the fraction of
  the bandwidth limit (weight bytes read once per step);
- server: aggregate tokens/s of the continuous-batching scheduler with 1/8/32/64 clients,
  and 32 clients spread over four LoRA adapters and the base model;
- lora: LoRA r=16 on every linear, batch 8 x 512, bf16, AdamW: tokens/s and peak memory,
  ours vs transformers + peft in a plain training loop;
- packed: LoRA steps on packed rows, attention one example at a time against the row-sized
  mask: tokens/s and the loss each gives; and DPO rows as two causal sequences against the
  shared-prompt mask;
- exact: the captured path's greedy tokens equal the eager path's in fp32 (TF32 off), and
  its logits are within bf16 rounding of eager in bf16; rows of different LoRA adapters get
  the eager per-group step's greedy tokens in fp32.

A `Clock` gives each section the time left; a contender that would start past the
deadline is skipped and says so, so the run fits one device call.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

#: H200 HBM3e: 4.8 TB/s.
BANDWIDTH = {"NVIDIA H200": 4.8e12, "NVIDIA H100 80GB HBM3": 3.35e12}
#: Where the sections run: CUDA, or the CPU for a dry run of the script (`gpu_check.py --dry`).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: New tokens per decode measurement (fewer in a dry run).
NEW_TOKENS = 128 if DEVICE == "cuda" else 8
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Clock:
    def __init__(self, budget: float) -> None:
        self.deadline = time.perf_counter() + budget

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], runs: int, warmups: int) -> float:
    for _ in range(warmups):
        fn()
    times = []
    for _ in range(runs):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bandwidth_limit(model) -> float | None:
    """Tokens/s at batch 1 if each step only read every weight once at the card's bandwidth."""
    bw = BANDWIDTH.get(torch.cuda.get_device_name()) if DEVICE == "cuda" else None
    if bw is None:
        return None
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return bw / total


def _ours(model, batch: int, prompt: list[int], decode) -> Callable[[int], object]:
    from weightsmith.generate import TokenGenerator
    from weightsmith.sampling import SamplingParams

    def gen(n: int):
        g = TokenGenerator(model, [prompt] * batch, [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)] * batch,
                           eos_token_ids=set(), decode=decode)  # fmt: skip
        for _ in g:
            pass
        return g.generated

    return gen


def _hf(ref, batch: int, prompt: list[int], cache: str | None) -> Callable[[int], object]:
    def gen(n: int):
        ids = torch.tensor([prompt] * batch, device=DEVICE)
        extra = {"cache_implementation": cache} if cache else {}
        with torch.inference_mode():
            return ref.generate(
                ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **extra
            )

    return gen


def section_decode(path: Path, clock: Clock, runs: int, new_tokens: int = NEW_TOKENS) -> dict:
    """Decode tok/s for one shape, batch 32 then 1 (so our graph cache is allocated once)."""
    from gpu_check import hf_model  # noqa: E402 - the shared loader of the peer

    from weightsmith import load
    from weightsmith.cuda_graphs import GraphDecode
    from weightsmith.generate import decode_one_token

    model = load(str(path), device=DEVICE, dtype="bf16").model
    ref = hf_model(path, torch.bfloat16, DEVICE)
    vocab = model.config.vocab_size
    prompt = [(1000 + i) % vocab for i in range(32)]
    captured = GraphDecode(model, decode_one_token, compile=False)
    compiled = GraphDecode(model, decode_one_token, compile=True)
    out: dict = {"bandwidth limit b1 tok/s": bandwidth_limit(model)}
    for batch in (32, 1):
        contenders = {
            "ours compiled+graphs": (_ours(model, batch, prompt, compiled), 2, 60),
            "ours graphs": (_ours(model, batch, prompt, captured), 2, 20),
            "ours eager": (_ours(model, batch, prompt, decode_one_token), 1, 30),
            "transformers eager": (_hf(ref, batch, prompt, None), 1, 30),
        }
        if batch == 1:
            contenders["transformers static+compile"] = (_hf(ref, 1, prompt, "static"), 2, 120)
        for name, (gen, warmups, needs) in contenders.items():
            key = f"decode b{batch} {name}"
            if clock.left() < needs:
                out[key] = f"skipped: {clock.left():.0f} s left"
                continue
            try:
                full = median_time(lambda g=gen: g(new_tokens + 1), runs, warmups)
                one = median_time(lambda g=gen: g(1), runs, 1)
                out[key] = batch * new_tokens / (full - one)
            except Exception as exc:  # noqa: BLE001 - a contender's failure is a finding
                out[key] = f"{type(exc).__name__}: {str(exc)[:300]}"
        out[f"b{batch} graph state"] = {"captured": captured.failed, "compiled": compiled.failed,
                                        "compile": compiled.compile_failed}  # fmt: skip
    _ratios(out)
    # Does the compiled, captured path give eager's greedy tokens in bf16? (rounding may differ)
    if clock.left() > 10:
        a = _ours(model, 2, prompt, compiled)(64)
        b = _ours(model, 2, prompt, decode_one_token)(64)
        out["bf16 greedy tokens equal to eager (of 128)"] = sum(
            x == y for r, s in zip(a, b, strict=True) for x, y in zip(r, s, strict=True)
        )
    return out


def _ratios(out: dict) -> None:
    limit = out.get("bandwidth limit b1 tok/s")
    for batch in (1, 32):
        ours = out.get(f"decode b{batch} ours compiled+graphs")
        if not isinstance(ours, float):
            continue
        for peer in ("transformers static+compile", "transformers eager", "ours eager"):
            other = out.get(f"decode b{batch} {peer}")
            if isinstance(other, float):
                out[f"ratio b{batch} ours compiled+graphs / {peer}"] = ours / other
        if batch == 1 and limit:
            out["b1 fraction of bandwidth limit"] = ours / limit


def section_server(path: Path, clock: Clock, runs: int, new_tokens: int = NEW_TOKENS // 2) -> dict:
    """The scheduler's aggregate tokens/s with n clients (requests submitted together)."""
    from weightsmith import load
    from weightsmith.sampling import SamplingParams
    from weightsmith.serve.scheduler import Request, Scheduler

    llm = load(str(path), device=DEVICE, dtype="bf16")
    llm.engine.compile = True
    decode = llm.engine.decode_step()
    sched = Scheduler(llm.model, llm.tokenizer, frozenset(), max_batch=64, max_len=512, decode=decode)
    vocab = llm.model.config.vocab_size
    params = SamplingParams(max_tokens=new_tokens, temperature=0.7, top_p=0.95, seed=0, ignore_eos=True)
    out: dict = {}

    def serve(n: int, adapters: tuple = (None,)) -> float:
        done = [0]
        for i in range(n):
            prompt = [(500 + 7 * i + j) % vocab for j in range(32 + i % 7)]
            emit = lambda ev: done.__setitem__(0, done[0] + len(ev.tokens))  # noqa: E731
            sched.submit(Request([prompt], [params], emit=emit, adapter=adapters[i % len(adapters)]))
        sync()
        start = time.perf_counter()
        while not sched.idle:
            sched.step()
        sync()
        assert done[0] == n * new_tokens, (done[0], n * new_tokens)
        return n * new_tokens / (time.perf_counter() - start)

    for n in (1, 8, 32, 64):
        if clock.left() < 15:
            out[f"clients {n}"] = f"skipped: {clock.left():.0f} s left"
            continue
        serve(n)  # warm-up: captures this batch size's graphs
        out[f"clients {n} tok/s"] = statistics.median(serve(n) for _ in range(runs))
    base = out.get("clients 1 tok/s")
    for n in (8, 32, 64):
        if isinstance(base, float) and isinstance(out.get(f"clients {n} tok/s"), float):
            out[f"ratio clients {n} / 1"] = out[f"clients {n} tok/s"] / base
    out["graphs"] = {
        "failed": getattr(decode, "failed", "not a graph decoder"),
        "compile": getattr(decode, "compile_failed", None),
    }
    # 32 clients spread over four LoRA adapters (r=16, every linear) and the base model: rows of
    # different adapters share the captured steps (each row's adapter by its code).
    if clock.left() > 40 and isinstance(out.get("clients 32 tok/s"), float):
        from weightsmith.lora import LoraConfig, apply_lora

        del sched  # frees the decoder's cache for a new scheduler (the model's modules change)
        names = ("a0", "a1", "a2", "a3")
        for name in names:
            apply_lora(llm.model, LoraConfig(r=16, alpha=32, target_modules=LORA_TARGETS), name)
        sched = Scheduler(llm.model, llm.tokenizer, frozenset(), max_batch=64, max_len=512, decode=decode)
        serve(32, names + (None,))
        mixed = statistics.median(serve(32, names + (None,)) for _ in range(runs))
        out["clients 32, 4 adapters + base, tok/s"] = mixed
        out["ratio 4 adapters / no adapter, 32 clients"] = mixed / out["clients 32 tok/s"]
        out["graphs with adapters failed"] = getattr(decode, "failed", None)
    return out


def section_lora(path: Path, clock: Clock, runs: int, batch: int = 8, seq: int = 512) -> dict:
    """LoRA r=16 on every linear: training tokens/s and peak memory, ours vs peft; and ours with
    each decoder layer compiled (regional torch.compile), to see whether it helps."""
    out: dict = {}
    vocab = None
    makers = {
        "ours": _lora_ours,
        "peft": _lora_peft,
        "ours, --train.compile": lambda *a: _lora_ours(*a, compile_layers=True),
    }
    for name, make in makers.items():
        if clock.left() < 45:
            out[name] = f"skipped: {clock.left():.0f} s left"
            continue
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            step, vocab = make(path, batch, seq)
            seconds = median_time(step, max(runs, 5), 2)
            out[name] = {"tokens/s": batch * seq / seconds,
                         "peak GiB": torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0}  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            out[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
        finally:
            step = None
            import gc

            gc.collect()
    if isinstance(out.get("ours"), dict) and isinstance(out.get("peft"), dict):
        out["ratio tokens/s ours / peft"] = out["ours"]["tokens/s"] / out["peft"]["tokens/s"]
        out["ratio peak memory ours / peft"] = out["ours"]["peak GiB"] / max(out["peft"]["peak GiB"], 1e-9)
    compiled = out.get("ours, --train.compile")
    if isinstance(compiled, dict) and isinstance(out.get("peft"), dict):
        out["ratio tokens/s ours --train.compile / peft"] = compiled["tokens/s"] / out["peft"]["tokens/s"]
        out["ratio peak memory ours --train.compile / peft"] = compiled["peak GiB"] / max(
            out["peft"]["peak GiB"], 1e-9
        )
    return out


def section_packed(
    path: Path, clock: Clock, runs: int, batch: int = 8, seq: int = 512, doc: int = 100
) -> dict:
    """LoRA steps on packed rows (examples of about `doc` tokens laid end to end in rows of
    `seq`): attention one example at a time with the causal kernel (what `--packing` does),
    against SDPA over the row with the block-diagonal mask; tokens/s, and the loss each gives
    on the same weights before any step (bf16: equal to rounding)."""
    from weightsmith.models import model as model_module
    from weightsmith.train.data import Batch
    from weightsmith.train.losses import sft_loss

    step, vocab, model = _lora_ours(path, batch, seq, keep_model=True)
    g = torch.Generator().manual_seed(1)
    lengths: list[list[int]] = []
    for _ in range(batch):  # each row: examples of doc/2 .. 3*doc/2 tokens, the last one cut
        row, room = [], seq
        while room > 0:
            row.append(min(room, int(torch.randint(doc // 2, 3 * doc // 2, (1,), generator=g))))
            room -= row[-1]
        lengths.append(row)
    documents = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths])
    positions = torch.stack([torch.cat([torch.arange(n) for n in r]) for r in lengths])
    inputs = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = torch.roll(inputs, -1, 1).masked_fill(torch.roll(positions, -1, 1) == 0, -100)
    packed = Batch(*(t.to(DEVICE) for t in (inputs, labels, positions, documents)))
    real = model_module.pack_documents
    modes = {"per example": real, "row mask": lambda documents: None}
    out: dict = {"examples": sum(len(r) for r in lengths)}
    try:
        for name, layout in modes.items():  # the losses first: the timed steps train the adapter
            model_module.pack_documents = layout
            with torch.no_grad():
                loss, n = sft_loss(model, packed)
            out[name] = {"loss": loss.item() / n}
        for name, layout in modes.items():
            if clock.left() < 30:
                out[name]["tokens/s"] = f"skipped: {clock.left():.0f} s left"
                continue
            model_module.pack_documents = layout
            out[name]["tokens/s"] = batch * seq / median_time(lambda: step(packed), max(runs, 5), 2)
    finally:
        model_module.pack_documents = real
    a, b = (out[name]["tokens/s"] for name in modes)
    if isinstance(a, float) and isinstance(b, float):
        out["ratio tokens/s per example / row mask"] = a / b
    if clock.left() > 40:
        out["dpo"] = _dpo_rows(model, vocab, clock, runs)
    return out


def _dpo_rows(model, vocab: int, clock: Clock, runs: int, pairs: int = 8, n: int = 256) -> dict:
    """DPO rows (prompt, chosen, rejected: `n` tokens each): the answers' log-probabilities and
    their backward, as two causal sequences (what `dpo` does on a GPU) against the shared-prompt
    mask; tokens/s and the largest log-probability difference."""
    from weightsmith.train import losses
    from weightsmith.train.preference_data import PairExample, collate_pairs

    g = torch.Generator().manual_seed(2)
    ids = lambda: torch.randint(0, vocab, (n,), generator=g).tolist()  # noqa: E731
    batch = collate_pairs([PairExample(ids(), ids(), ids()) for _ in range(pairs)], pad_id=0).to(
        torch.device(DEVICE)
    )
    real, threshold = losses.pair_sequences, losses.SEQUENCES_FROM
    modes = {"sequences": real, "mask": lambda segments: None}
    out: dict = {}
    losses.SEQUENCES_FROM = 0  # sequences at any row length (a GPU's choice; a CPU's from 1024)
    try:
        for name, layout in modes.items():
            losses.pair_sequences = layout
            with torch.no_grad():
                out[name] = {"logps": losses.pair_log_probs(model, batch)}

            def step() -> None:
                losses.pair_log_probs(model, batch).sum().backward()
                model.zero_grad(set_to_none=True)

            if clock.left() > 20:
                out[name]["tokens/s"] = pairs * 3 * n / median_time(step, max(runs, 5), 2)
    finally:
        losses.pair_sequences, losses.SEQUENCES_FROM = real, threshold
    out["max |logp difference|"] = (
        (out["sequences"].pop("logps") - out["mask"].pop("logps")).abs().max().item()
    )
    a, b = (out[name].get("tokens/s") for name in modes)
    if isinstance(a, float) and isinstance(b, float):
        out["ratio tokens/s sequences / mask"] = a / b
    return out


def _batch(vocab: int, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=g).to(DEVICE)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def _lora_ours(path: Path, batch: int, seq: int, compile_layers: bool = False, keep_model: bool = False):
    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.lora import LoraConfig, apply_lora
    from weightsmith.train.data import Batch
    from weightsmith.train.losses import sft_loss
    from weightsmith.train.optim import make_optimizer

    model = load_checkpoint(str(path), dtype=torch.bfloat16, device=DEVICE).model.train()
    apply_lora(model, LoraConfig(r=16, alpha=32, dropout=0.0, target_modules=LORA_TARGETS))
    if compile_layers:  # what --train.compile does
        from weightsmith.train.loop import compile_layers as compile_each

        compile_each(model, torch.device(DEVICE))
    opt = make_optimizer(model, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    inputs, labels = _batch(model.config.vocab_size, batch, seq)
    b = Batch(inputs, labels)

    def step(batch: Batch = b) -> None:
        loss, n = sft_loss(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return (step, model.config.vocab_size) + ((model,) if keep_model else ())


def _lora_peft(path: Path, batch: int, seq: int):
    import peft
    from gpu_check import hf_model  # noqa: E402

    model = hf_model(path, torch.bfloat16, DEVICE).train()
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS)
    )
    # fused, as ours picks on a GPU and as transformers' Trainer defaults to (adamw_torch_fused)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    inputs, labels = _batch(model.config.vocab_size, batch, seq)
    hf_labels = torch.cat([torch.full((batch, 1), -100, device=DEVICE), labels[:, :-1]], dim=1)

    def step() -> None:
        model(input_ids=inputs, labels=hf_labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model.config.vocab_size


def section_exact(path: Path, clock: Clock, runs: int) -> dict:
    """The captured path computes what the eager path computes (fp32 greedy, bf16 logits)."""
    from weightsmith import load
    from weightsmith.cuda_graphs import GraphDecode
    from weightsmith.generate import decode_one_token

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out: dict = {}
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15]]
    for dtype in ("fp32", "bf16"):
        model = load(str(path), device=DEVICE, dtype=dtype).model
        for compile in (False, True):
            if compile and clock.left() < 60:
                out[f"{dtype} compiled"] = f"skipped: {clock.left():.0f} s left"
                continue
            graphs = GraphDecode(model, decode_one_token, compile=compile)
            steps = {}
            for name, decode in (("eager", decode_one_token), ("graphs", graphs)):
                steps[name] = _logged_steps(model, prompts, decode, 40)
            (ta, la), (tb, lb) = steps["eager"], steps["graphs"]
            key = f"{dtype} {'compiled+graphs' if compile else 'graphs'}"
            out[key] = {**_compare_steps(ta, la, tb, lb), "logit scale": la.abs().max().item(),
                        "failed": graphs.failed, "compile": graphs.compile_failed}  # fmt: skip
        del model
    if clock.left() > 30:
        out["fp32 rows of different adapters"] = _exact_adapters(path)
    return out


def _exact_adapters(path: Path) -> dict:
    """fp32 greedy tokens of rows with adapters "a", none and "b" inside row_adapters: the graphs'
    coded per-row deltas against the eager per-group step."""
    from weightsmith import load
    from weightsmith.cuda_graphs import GraphDecode
    from weightsmith.generate import decode_one_token
    from weightsmith.lora import LoraConfig, apply_lora, lora_layers, row_adapters

    model = load(str(path), device=DEVICE, dtype="fp32").model
    for name in ("a", "b"):
        apply_lora(model, LoraConfig(r=8, alpha=16, target_modules=LORA_TARGETS), name)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for name in layer.lora_B:  # B = 0 adds nothing: give each adapter a visible delta
                w = layer.lora_B[name].weight
                w.copy_(torch.randn(w.shape, generator=g, device=DEVICE) * 0.02)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    graphs = GraphDecode(model, decode_one_token, compile=False)
    with row_adapters(model, ["a", None, "b"]):
        (ta, la), (tb, lb) = (_logged_steps(model, prompts, d, 40) for d in (decode_one_token, graphs))
    return {**_compare_steps(ta, la, tb, lb),
            "steps in the graphs": graphs.failed is None and any(k[2] for k in graphs._replays)}  # fmt: skip


def _compare_steps(ta: list, la: torch.Tensor, tb: list, lb: torch.Tensor) -> dict:
    """Greedy tokens equal, and the largest logit difference over the logged steps whose inputs
    were still the same in both runs: decode step i reads the tokens up to i, so a token that
    differs at index d (bf16 ties flip on random weights' flat logits) ends the comparison after
    step d - 1; later logits differ because their inputs do."""
    first = min((next((i for i, (x, y) in enumerate(zip(ra, rb, strict=False)) if x != y), len(ra))
                 for ra, rb in zip(ta, tb, strict=True)), default=0)  # fmt: skip
    k = min(len(la), first)
    gap = (la[:k] - lb[:k]).abs().max().item() if k else None
    return {"greedy tokens equal": ta == tb, "first differing token": None if ta == tb else first,
            "steps compared": k, "max |logit diff| (same inputs)": gap}  # fmt: skip


def _logged_steps(model, prompts, decode, n: int):
    from weightsmith.generate import TokenGenerator
    from weightsmith.sampling import SamplingParams

    gen = TokenGenerator(model, prompts, [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)] * len(prompts),
                         eos_token_ids=set(), decode=decode)  # fmt: skip
    seen = []
    step = gen.decode

    def spy(*args):
        logits = step(*args)
        if len(seen) < 8:
            seen.append(logits.float().clone())
        return logits

    gen.decode = spy
    for _ in gen:
        pass
    return gen.generated, torch.stack(seen)


def _finetune_cli(path: Path, out: Path, extra: list[str], timeout: float) -> dict:
    """`weightsmith finetune` in a child process (a launched job needs its own); its losses and
    tokens/s, or the error's last line."""
    import json
    import os
    import subprocess
    import sys

    from weightsmith.datasets import sample_path

    cmd = [sys.executable, "-m", "weightsmith", "finetune", str(path), "--data",
           str(sample_path("kettlebird/train.jsonl")), "--out", str(out), "--max-seq-len", "160",
           "--device", DEVICE, "--valid-fraction", "0.05", "--train.precision", "fp32", "--train.max-steps", "8",
           "--train.batch-size", "8", "--train.lr", "1e-4", "--train.eval-every", "0", "--train.save-every", "4",
           "--lora.dropout", "0", *extra]  # fmt: skip
    env = {**os.environ, "NVIDIA_TF32_OVERRIDE": "0"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:400]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    return {
        "losses": [r["loss"] for r in steps],
        "tokens/s": statistics.median(r["tokens_per_s"] for r in steps),
    }


def section_dist(path: Path, clock: Clock, runs: int) -> dict:
    """torch.distributed on the GPU(s): full fine-tuning with FSDP2 (`fully_shard` per layer, NCCL)
    and LoRA with DDP, each through `--nproc-per-node` (every GPU, at least one), against the
    same job in one plain process: per-step losses (fp32, TF32 off) and tokens/s."""
    import tempfile

    n = max(1, torch.cuda.device_count()) if DEVICE == "cuda" else 2
    out: dict = {"processes": n}
    jobs = {
        "full, one process": ["--method", "full"],
        f"full, fsdp x{n}": ["--method", "full", "--nproc-per-node", str(n), "--strategy", "fsdp"],
        "lora, one process": ["--method", "lora"],
        f"lora, ddp x{n}": ["--method", "lora", "--nproc-per-node", str(n), "--strategy", "ddp"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(jobs.items()):
            if clock.left() < 60:
                out[name] = f"skipped: {clock.left():.0f} s left"
                continue
            out[name] = _finetune_cli(
                path, Path(tmp) / f"run{i}", extra, timeout=max(30.0, clock.left() - 20)
            )
    for method, peer in (("full", f"full, fsdp x{n}"), ("lora", f"lora, ddp x{n}")):
        one, many = out.get(f"{method}, one process"), out.get(peer)
        if isinstance(one, dict) and isinstance(many, dict) and "losses" in one and "losses" in many:
            diffs = [abs(a - b) for a, b in zip(one["losses"], many["losses"], strict=False)]
            out[f"{method}: largest loss difference"] = max(diffs) if diffs else None
    return out
