"""LoRA DPO training step time and peak memory: weightsmith vs TRL's DPOTrainer, one run.

Both train a fresh LoRA adapter (rank 8, alpha 16, no dropout, all seven projections) with
the sigmoid DPO loss (beta 0.1) against the reference "the same model, adapters disabled",
fp32 on the CPU with the same thread count, AdamW, on the same batch: 4 pairs x 256 tokens
(chosen and rejected rows of exactly 256 tokens each) built from the bundled Kettlebird data
(a prompt of earlier turns and a question, cut from the left to half the tokens as
`--max-prompt-len` does; long chosen and rejected answers fill the other half). weightsmith tokenizes the pairs (preference_data.py, as
TRL does; parity in tests/test_dpo_parity.py) and both sides train on those token ids: TRL's
side goes through its own `DataCollatorForPreference` and `DPOTrainer.compute_loss`, on a peft
LoRA over the transformers model converted from the same GGUF file.

A step is: reference forward (no_grad, adapters off) + policy forward + backward + AdamW
step. With `--loss simpo` there is no reference: SimPO (beta 2, gamma 0.5) against TRL's
`CPOTrainer` (trl.experimental; `loss_type="simpo"`, `cpo_alpha=0`) on the same token ids, a
step being policy forward + backward + AdamW step on both sides.

With `--loss kto`, KTO (beta 0.1, the same LoRA reference) against TRL's `KTOTrainer` on
unpaired examples cut from the same pairs: `--pairs` examples, pair i giving its chosen answer
(desirable) when i is even and its rejected one (undesirable) when odd, so prompts differ
within the batch; example i's KL completion is example i - 1's (TRL's rotation, set as our
partners too). Ours runs the reference once over prompt + completion + KL completion in one
row, the policy without gradients over prompt + KL completion and with them over prompt +
completion; TRL runs its KL forward (no grad), the policy forward, then the reference forward
and the reference KL forward; both then backward + AdamW step. Both sides' first loss is
about 0.5 (policy == reference on the first step, so every log-ratio is 0 and z0 is clamped
at 0).

With `--loss reward`, a reward model (a fresh fp32 score head on the last normed hidden state,
trained beside the adapters; Bradley-Terry loss, no margins, no centring) against TRL's
`RewardTrainer` on `AutoModelForSequenceClassification` with a peft SEQ_CLS LoRA whose
`modules_to_save` is the head, both heads starting from the same draw. Ours runs one forward over
each pair as one row (the prompt once, then the chosen and the rejected answer), reads the score
at each answer's last non-pad token, then backward; TRL runs chosen and rejected as two padded
rows each (the prompt twice) through the classifier, then backward; both then an AdamW step.
The first losses agree (same model, tokens and head; the adapters' B start at zero); in place of
the chosen log-prob, the first step's mean reward is printed.

Each contender runs in its own process (so peak resident memory is its own), warms up
for one step, then times `--steps` steps; processes alternate (ours, peer, ours, ...) so a
noisy neighbour slows both alike. Medians and the ratio peer/ours are printed (> 1 means
weightsmith is faster), with both sides' first-step policy log-probs (they agree: the same
model and tokens) and the CPU model and instruction sets.

    python benchmarks/dpo.py [--threads 2] [--pairs 4] [--seq-len 256] [--steps 3] [--rounds 2] [--loss dpo|simpo|kto|reward]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu_description  # beside this file

NAMES = {"ours": "weightsmith LoRA DPO", "peer": "TRL DPOTrainer + peft LoRA"}
OTHER_NAMES = {
    "simpo": {"ours": "weightsmith LoRA SimPO", "peer": "TRL CPOTrainer(simpo) + peft"},
    "kto": {"ours": "weightsmith LoRA KTO", "peer": "TRL KTOTrainer + peft LoRA"},
    "reward": {"ours": "weightsmith LoRA reward model", "peer": "TRL RewardTrainer + peft LoRA"},
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BETA = 0.1
SIMPO_BETA = 2.0  # SimPO's scale (its gamma: 0.5, both sides' default)


def pair_rows(n: int) -> list[dict]:
    """Conversational pairs from the bundled data: a few earlier turns and a question as the
    prompt; as chosen, the question's answer followed by two more; as rejected, three others."""
    from weightsmith.datasets import sample_path

    convs = [json.loads(line)["messages"] for line in sample_path("kettlebird/train.jsonl").open()]
    convs = [[m for m in c if m["role"] != "system"] for c in convs]
    single = [c for c in convs if len(c) == 2]
    rows = []
    for i in range(n):
        history = [m for c in convs[4 * i : 4 * i + 3] for m in c]
        question, answer = single[3 * i + 40]
        others = [single[(3 * i + k) % len(single)][1]["content"] for k in (1, 2, 3, 60, 61)]
        rows.append(
            {
                "prompt": [*history, question],
                "chosen": [{"role": "assistant", "content": " ".join([answer["content"], *others[:2]])}],
                "rejected": [{"role": "assistant", "content": " ".join(others[2:])}],
            }
        )
    return rows


def make_pairs(tokenizer, n: int, seq_len: int):
    """Our tokenized pairs, every chosen and rejected row exactly `seq_len` tokens long."""
    from weightsmith.train.preference_data import parse_pair, tokenize_pairs

    records = [parse_pair(json.dumps(r), f"bench:{i}")[0] for i, r in enumerate(pair_rows(n))]
    pairs, _ = tokenize_pairs(records, tokenizer, max_seq_len=seq_len, max_prompt_len=seq_len // 2)
    for p in pairs:
        assert len(p.prompt) + len(p.chosen) == len(p.prompt) + len(p.rejected) == seq_len, "pairs too short"
    return pairs


def unpair(pairs):
    """KTO's examples from our pairs' token ids: pair i's chosen answer (desirable) when i is
    even, its rejected one (undesirable) when odd, so neighbours' prompts differ."""
    from weightsmith.train.unpaired_data import UnpairedExample

    return [
        UnpairedExample(p.prompt, p.rejected if i % 2 else p.chosen, not i % 2) for i, p in enumerate(pairs)
    ]


def kl_rotation(n: int) -> list[int]:
    """Example i's KL partner: i - 1, as TRL rotates the completions of a batch."""
    return [(i - 1) % n for i in range(n)]


def run_ours(path: str, n: int, seq_len: int, steps: int, loss: str = "dpo") -> dict:
    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.device import tune_cpu_allocator
    from weightsmith.lora import LoraConfig, apply_lora
    from weightsmith.train.data import pad_id_for
    from weightsmith.train.dpo import PreferenceObjective
    from weightsmith.train.kto import KtoObjective
    from weightsmith.train.losses import PREFERENCE_LOSSES
    from weightsmith.train.metric_sums import Mean
    from weightsmith.train.optim import make_optimizer
    from weightsmith.train.preference_data import PairSource
    from weightsmith.train.reward_model import RewardObjective, RewardSource, attach_score
    from weightsmith.train.unpaired_data import UnpairedSource

    tune_cpu_allocator()  # what weightsmith's Trainer does before training on a CPU
    ckpt = load_checkpoint(path, dtype=torch.float32, decode_layout=False)
    model = ckpt.model.train()
    apply_lora(model, LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=LORA_TARGETS))
    if loss == "reward":
        attach_score(model, seed=0)  # trainable, so before the optimizer; TRL's side draws the same
    opt = make_optimizer(model, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    pairs = make_pairs(ckpt.tokenizer, n, seq_len)
    if loss == "kto":
        # KL completions never cut: prompt (at most seq_len / 2) + another example's completion
        source = UnpairedSource(unpair(pairs), pad_id=0, max_seq_len=2 * seq_len, partners=kl_rotation(n))
        batch = source.batch(range(n))
        objective = KtoObjective("kto", beta=BETA, reference=None)
    elif loss == "reward":  # padded with the id TRL pads with: both read the score at the same token
        batch = RewardSource(pairs, pad_id_for(ckpt.tokenizer)).batch(range(n))
        objective = RewardObjective(None)
    else:
        batch = PairSource(pairs, pad_id=0).batch(range(n))
        if loss == "simpo":
            objective = PreferenceObjective(PREFERENCE_LOSSES["simpo"], SIMPO_BETA, reference_free=True)
        else:
            objective = PreferenceObjective(PREFERENCE_LOSSES["dpo"], BETA)
    stats: list[float] = []
    key = "mean_reward" if loss == "reward" else "logps_chosen"

    def step() -> float:
        loss, count, metrics = objective(model, batch)
        (loss / count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        stat = metrics[key]  # a Mean (KTO's log-probs: over the desirable examples) or a sum
        stats.append(float(stat.total) / stat.n if isinstance(stat, Mean) else float(stat) / count)
        return float(loss) / count

    share = sum(len(p.prompt) for p in pairs) / (n * seq_len)
    return time_steps(step, steps, lambda: {"first_stat": stats[0], "prompt_share": share})


def convert(path: str, hf_dir: str) -> None:
    """transformers' own conversion of the GGUF file to an fp32 HF directory (Trainer refuses to
    train a model it still regards as GGUF-quantized)."""
    import transformers

    folder, name = path.rsplit("/", 1)
    transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer, model.is_quantized = None, False
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(hf_dir)


def run_peer(path: str, n: int, seq_len: int, steps: int, hf_dir: str, loss: str = "dpo") -> dict:
    """TRL's DPOTrainer (or with `loss` "kto" its KTOTrainer, with "reward" its RewardTrainer) on
    our token ids, through its own collator and `compute_loss`."""
    import datasets
    import peft
    import transformers
    import trl

    from weightsmith.train.data import pad_id_for
    from weightsmith.train.reward_model import attach_score
    from weightsmith.train.runs import load_tokenizer

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    common = {"output_dir": f"/tmp/weightsmith-bench-{loss}", "per_device_train_batch_size": n,
              "use_cpu": True, "bf16": False, "gradient_checkpointing": False, "disable_dropout": True,
              "report_to": "none"}  # fmt: skip
    ours_tokenizer = load_tokenizer(Path(path))
    pairs = make_pairs(ours_tokenizer, n, seq_len)  # same ids as ours
    lora = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": LORA_TARGETS}
    if loss == "reward":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            hf_dir, num_labels=1, dtype=torch.float32
        )
        head = attach_score(model, seed=0).weight  # our head's draw; peft copies it into modules_to_save
        trainer_class = trl.RewardTrainer
        args = trl.RewardConfig(max_length=None, center_rewards_coefficient=None, **common)
        rows = [{"chosen_ids": p.prompt + p.chosen, "rejected_ids": p.prompt + p.rejected} for p in pairs]
        lora |= {"task_type": "SEQ_CLS", "modules_to_save": ["score"]}
        train_rows, stat = rows, "mean_reward"  # already tokenized: TRL takes them as they are
    elif loss == "kto":
        trainer_class = trl.KTOTrainer
        args = trl.KTOConfig(loss_type="kto", max_length=None, beta=BETA, **common)
        ex = unpair(pairs)
        rows = [{"prompt_ids": e.prompt, "completion_ids": e.completion, "label": e.label,
                 "KL_completion_ids": ex[j].completion} for e, j in zip(ex, kl_rotation(n), strict=True)]  # fmt: skip
    else:
        trainer_class = trl.DPOTrainer
        args = trl.DPOConfig(loss_type=["sigmoid"], max_length=seq_len, beta=BETA, **common)
        rows = [{"prompt_ids": p.prompt, "chosen_ids": p.chosen, "rejected_ids": p.rejected} for p in pairs]
    if loss != "reward":
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        train_rows, stat = pair_rows(n), "logps/chosen"
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(train_rows),
        processing_class=tokenizer,
        peft_config=peft.LoraConfig(**lora),
    )
    if loss == "reward":  # the score is read at the last token that is not this id, on both sides
        assert trainer.processing_class.pad_token_id == pad_id_for(ours_tokenizer), "pad ids differ"
        score = trainer.model.base_model.model.score
        for module in (score.modules_to_save.default, score.original_module):
            assert torch.equal(module.weight, head), "score heads differ"
    batch = trainer.data_collator(rows)
    policy = trainer.model.train()
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    stats: list[float] = []

    def step() -> float:
        loss = trainer.compute_loss(policy, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        stats.append(trainer._metrics["train"][stat][-1])
        return float(loss)

    return time_steps(step, steps, lambda: {"first_stat": stats[0], "prompt_share": float("nan")})


def run_cpo(path: str, n: int, seq_len: int, steps: int, hf_dir: str) -> dict:
    """TRL's CPOTrainer with SimPO's loss on our token ids (its own collator pads them)."""
    import warnings

    import datasets
    import peft
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.cpo import CPOConfig, CPOTrainer

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    args = CPOConfig(output_dir="/tmp/weightsmith-bench-cpo", beta=SIMPO_BETA, loss_type="simpo", cpo_alpha=0.0,
                     max_length=seq_len, per_device_train_batch_size=n, use_cpu=True, bf16=False,
                     disable_dropout=True, report_to="none")  # fmt: skip
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS)
    trainer = CPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(pair_rows(n)),
                         processing_class=tokenizer, peft_config=lora)  # fmt: skip
    from weightsmith.train.runs import load_tokenizer

    pairs = make_pairs(load_tokenizer(Path(path)), n, seq_len)  # same ids as ours (the tokenizer alone)
    rows = []
    for p in pairs:
        row = {"prompt_input_ids": p.prompt, "prompt_attention_mask": [1] * len(p.prompt)}
        for side, answer in (("chosen", p.chosen), ("rejected", p.rejected)):
            row |= {f"{side}_input_ids": p.prompt + answer, f"{side}_attention_mask": [1] * (len(p.prompt) + len(answer)),
                    f"{side}_labels": [-100] * len(p.prompt) + answer}  # fmt: skip
        rows.append(row)
    batch = trainer.data_collator(rows)
    policy = trainer.model.train()
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    logps: list[float] = []

    def step() -> float:
        loss, metrics = trainer.get_batch_loss_metrics(policy, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        logps.append(float(metrics["logps/chosen"]))
        return float(loss)

    return time_steps(step, steps, lambda: {"first_stat": logps[0], "prompt_share": float("nan")})


def time_steps(step, steps: int, extra=dict) -> dict:
    """One warm-up `step()` (its loss is returned: both sides must start from the same one),
    then `steps` timed ones; with the process's peak memory and `extra()`'s entries."""
    first_loss = step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return {"times": times, "peak_gib": peak_gib, "first_loss": first_loss, **extra()}


def alternate(base: list[str], names, shape: list[str], rounds: int):
    """(round, contender, its JSON result) of `base --child NAME SHAPE`, contenders alternating
    in each round; a contender that crashes is reported and left out (a missing column, not a
    failed benchmark)."""
    for r in range(rounds):
        for who in names:
            done = subprocess.run([*base, "--child", who, *shape], capture_output=True, text=True)
            if done.returncode != 0:
                print(f"round {r + 1} {who}: failed ({done.returncode}): {done.stderr.strip()[-400:]}")
                continue
            yield r, who, json.loads(done.stdout.strip().splitlines()[-1])


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if args.child == "convert":
        return convert(args.model, args.hf_dir)
    if args.child == "ours":
        got = run_ours(args.model, args.pairs, args.seq_len, args.steps, args.loss)
    elif args.loss == "simpo":
        got = run_cpo(args.model, args.pairs, args.seq_len, args.steps, args.hf_dir)
    else:
        got = run_peer(args.model, args.pairs, args.seq_len, args.steps, args.hf_dir, args.loss)
    print(json.dumps(got))


def start(p: argparse.ArgumentParser, names, child, prefix: str):
    """The flags every TRL comparison shares (--threads, --rounds, --model), parsed: in a child
    process, `child(args)` and None; in the parent, (args, the child command line, the folder
    of transformers' conversion of the GGUF file, already converted)."""
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--model", default=None, help="GGUF path (default: the default model from the store)")
    p.add_argument("--child", choices=[*names, "convert"], help=argparse.SUPPRESS)
    p.add_argument("--hf-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.model is None:
        from weightsmith.checkpoint.pull import resolve

        args.model = str(resolve("smollm2-135m-instruct"))
    print(f"cpu: {cpu_description()}, {args.threads} threads")
    hf_dir = tempfile.mkdtemp(prefix=f"weightsmith-bench-{prefix}-")
    base = [sys.executable, os.path.abspath(sys.argv[0]), "--model", args.model,
            "--hf-dir", hf_dir, "--threads", str(args.threads)]  # fmt: skip
    subprocess.run([*base, "--child", "convert"], check=True, capture_output=True)
    return args, base, hf_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--loss", choices=["dpo", "simpo", "kto", "reward"], default="dpo")
    for loss, names in OTHER_NAMES.items():
        if loss in sys.argv:
            NAMES.update(names)
    started = start(p, NAMES, child, "dpo")
    if started is None:
        return
    args, base, hf_dir = started
    shape = [
        "--pairs",
        str(args.pairs),
        "--seq-len",
        str(args.seq_len),
        "--steps",
        str(args.steps),
        "--loss",
        args.loss,
    ]
    stat, digits = ("mean reward", 5) if args.loss == "reward" else ("chosen log-prob", 3)
    rows = "examples x {} tokens (+ KL rows)" if args.loss == "kto" else "pairs x {} tokens (x2 rows)"
    compare(
        base, NAMES, shape, args.rounds, hf_dir,
        lambda got: f"first loss {got['first_loss']:.5f}  first {stat} {got['first_stat']:.{digits}f}",
        f"LoRA r=8 all-linear {args.loss}, {args.pairs} {rows.format(args.seq_len)}, fp32, {args.threads} threads",
    )  # fmt: skip


def compare(base: list[str], names, shape: list[str], rounds: int, hf_dir: str, first, title: str) -> None:
    """Run the contenders' `rounds` (`alternate`), printing each with `first(result)`; then the
    medians of the step times, the largest peaks and the ratios under `title`."""
    results: dict[str, dict[str, list[float]]] = {who: {"t": [], "mem": []} for who in names}
    for r, who, got in alternate(base, names, shape, rounds):
        results[who]["t"] += got["times"]
        results[who]["mem"].append(got["peak_gib"])
        print(
            f"round {r + 1} {who:4s}: step {statistics.median(got['times']):.2f}s  peak {got['peak_gib']:.2f} GiB"
            f"  {first(got)}"
        )
    shutil.rmtree(hf_dir, ignore_errors=True)
    if not all(results[who]["t"] for who in names):
        return
    t = {who: statistics.median(results[who]["t"]) for who in names}
    mem = {who: max(results[who]["mem"]) for who in names}
    print(f"\n{title}")
    print(f"{'':30s}{'step s':>10s}{'peak GiB':>10s}")
    for who, label in names.items():
        print(f"{label:30s}{t[who]:10.2f}{mem[who]:10.2f}")
    print(
        f"speed-up (peer / ours): {t['peer'] / t['ours']:.2f}x   "
        f"peak memory (ours / peer): {mem['ours'] / mem['peer']:.2f}x"
    )


if __name__ == "__main__":
    main()
