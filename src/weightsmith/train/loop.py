"""The one training loop, parameterised by a batch source and a loss function.

`Trainer.fit` runs optimizer steps of `grad_accum` micro-batches: AdamW, warm-up
then a cosine/linear/constant schedule, gradient clipping, optional bf16 autocast,
periodic validation, periodic atomic checkpoints, `metrics.jsonl`, optional
TensorBoard. A `BatchSource` turns item indices (SFT rows, DPO pairs) into a batch;
a `LossFn` returns the batch's summed loss, how many units it sums over, and summed
extra metrics. The loss of a step is the sum over all its micro-batches divided by
their total count, which each batch knows before its forward (`n_targets`): the mean
over every target token for SFT (not a mean of micro-batch means, which would weigh
short batches more), the mean over pairs for DPO. Extra metrics are normalised the
same way. Ctrl-C (or SIGTERM) finishes the current step, saves a checkpoint and
raises `TrainingInterrupted`. A resumed run restores weights, optimizer, RNG and data
position, so its later losses equal an uninterrupted run's. A source whose batches serve
several steps (GRPO's `--num-iterations`) has them held between steps, and checkpoints fall
after the last step of each such group.

Not here: what is trained (runs.py chooses LoRA, QLoRA or full weights), the data or
the loss (sft.py, dpo.py), or printing (a `Reporter` receives the metrics).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from weightsmith.config import opt
from weightsmith.device import cpu_multiplies_bf16, tune_cpu_allocator
from weightsmith.errors import ConfigError, WeightsmithError
from weightsmith.models.model import DecoderLayer
from weightsmith.train import checkpoints as ckpt
from weightsmith.train import fsdp
from weightsmith.train.data import BatchOrder
from weightsmith.train.distributed import World
from weightsmith.train.metric_sums import Mean, MetricSums
from weightsmith.train.optim import SCHEDULES, lr_factor, make_optimizer, set_lr, trainable_parameters
from weightsmith.train.signals import stop_on_signal

log = logging.getLogger(__name__)


class TrainBatch(Protocol):
    """A batch the loop can train on."""

    n_tokens: int  # real (unpadded) input tokens, for tokens/s

    @property
    def n_targets(self) -> int:
        """What the step's loss is averaged over: target tokens (SFT), pairs (DPO)."""
        ...

    def to(self, device: torch.device) -> TrainBatch: ...


class BatchSource(Protocol):
    """Items (rows, pairs) by index, made into batches. A source may also have
    `whole_step(batches)`, called with a step's (batch, counts) pairs once all are drawn."""

    def __len__(self) -> int: ...
    def batch(self, indices: Sequence[int]) -> TrainBatch: ...
    def lengths(self) -> list[int]: ...  # each item's tokens (--train.group-by-length)


#: (model, batch) -> (summed loss, how many units it sums, {metric: summed value, or a Mean}).
LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, int, dict[str, "torch.Tensor | Mean"]]]


@dataclass(kw_only=True)
class TrainOptions:
    """Training: steps, learning rate, batches, precision, evaluation and checkpoints."""

    lr: float = opt(2e-4, "peak learning rate")
    epochs: int = opt(1, "passes over the training data (unless --train.max-steps is set)")
    max_steps: int | None = opt(None, "stop after this many optimizer steps")
    batch_size: int = opt(4, "examples (or packed rows) per micro-batch")
    group_by_length: bool = opt(
        False, "batch examples of similar length (less padding; order still shuffled)"
    )
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    schedule: Literal["cosine", "linear", "constant"] = opt("cosine", "learning-rate decay after warm-up")
    warmup_ratio: float = opt(0.05, "fraction of the steps spent warming up (unless --train.warmup-steps)")
    warmup_steps: int | None = opt(None, "warm-up steps")
    min_lr_ratio: float = opt(0.0, "final learning rate as a fraction of the peak")
    weight_decay: float = opt(0.0, "AdamW weight decay (never on norms or biases)")
    adam_betas: tuple[float, float] = opt((0.9, 0.999), "AdamW betas")
    adam_eps: float = opt(1e-8, "AdamW epsilon")
    max_grad_norm: float = opt(1.0, "clip the gradient norm to this (0 = off)")
    precision: Literal["auto", "fp32", "bf16"] = opt(
        "auto", "bf16 autocast (auto: on GPUs that support it and CPUs with AMX)"
    )
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    compile: bool = opt(
        False,
        "torch.compile each decoder layer: faster steps after a one-off compile (C++ on CPU, Triton on GPU)",
    )
    seed: int = opt(0, "seed for adapter init, data order and dropout")
    eval_every: int = opt(50, "validate every N steps (0 = only at the end)")
    save_every: int = opt(50, "write a checkpoint every N steps (0 = never)")
    keep_checkpoints: int = opt(2, "how many recent checkpoints to keep")
    log_every: int = opt(1, "write metrics every N steps")
    tensorboard: bool = opt(False, "also write TensorBoard logs to OUT/tensorboard (needs `tensorboard`)")

    def __post_init__(self) -> None:
        checks = {
            "lr": self.lr > 0,
            "epochs": self.epochs >= 1,
            "max_steps": self.max_steps is None or self.max_steps >= 1,
            "batch_size": self.batch_size >= 1,
            "grad_accum": self.grad_accum >= 1,
            "warmup_ratio": 0 <= self.warmup_ratio < 1,
            "warmup_steps": self.warmup_steps is None or self.warmup_steps >= 0,
            "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
            "max_grad_norm": self.max_grad_norm >= 0,
            "keep_checkpoints": self.keep_checkpoints >= 1,
            "log_every": self.log_every >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"train.{bad[0]}: value {getattr(self, bad[0])!r} is out of range")
        assert self.schedule in SCHEDULES
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("--train.tensorboard needs the tensorboard package: pip install tensorboard")


class TrainingInterrupted(WeightsmithError):
    """Stopped by a signal after saving a checkpoint."""

    exit_code = 130


class TrainingError(WeightsmithError):
    """Training cannot go on (a non-finite loss, for example)."""


class Reporter(Protocol):
    def start(self, total_steps: int, first_step: int) -> None: ...
    def step(self, metrics: dict[str, Any]) -> None: ...
    def evaluated(self, metrics: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class LogReporter:
    """Plain periodic log lines (what non-terminal runs get)."""

    def __init__(self, every: int = 10) -> None:
        self.every = every

    def start(self, total_steps: int, first_step: int) -> None:
        log.info("training: steps %d..%d", first_step + 1, total_steps)

    def step(self, m: dict[str, Any]) -> None:
        if m["step"] % self.every == 0:
            log.info("step %d loss %.4f lr %.2e %.0f tok/s", m["step"], m["loss"], m["lr"], m["tokens_per_s"])

    def evaluated(self, m: dict[str, Any]) -> None:
        log.info("step %d val_loss %.4f", m["step"], m["val_loss"])

    def close(self) -> None:
        pass


@dataclass
class RunState:
    step: int = 0  # optimizer steps done
    cursor: int = 0  # micro-batches consumed
    tokens: int = 0
    elapsed_s: float = 0.0


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        train: BatchSource,
        valid: BatchSource | None,
        opts: TrainOptions,
        out: Path,
        *,
        save_weights: Callable[[Path], None],
        device: torch.device,
        reporter: Reporter | None = None,
        command: str = "finetune",
        perplexity: bool = True,
        world: World | None = None,
        iterations: int = 1,
    ) -> None:
        """`command` names the CLI command in the resume hint; `perplexity` adds val_ppl
        (meaningful only for a per-token cross-entropy); `world` is this rank's place in a
        distributed job (distributed.py: batches sharded, counts and gradients summed);
        `iterations` is how many optimizer steps each drawn set of micro-batches serves (GRPO's
        num_iterations): they are held, on the device, for that many steps, and checkpoints (and
        a stop) wait for the last of them, so a resumed run draws afresh as the first would."""
        if not len(train):
            raise ConfigError("no training examples left after tokenizing; check the data and max_seq_len")
        self.model, self.loss_fn, self.opts, self.out = model, loss_fn, opts, out
        self.train, self.valid = train, valid
        self.save_weights, self.device = save_weights, device
        self.command, self.perplexity = command, perplexity
        self.world = world or World()
        if self.world.size > 1:  # the model is built alike on every rank; dropout must differ
            ckpt.split_rng(self.world.rank)
        self.reporter = (reporter if self.world.is_main else None) or LogReporter()
        lengths = train.lengths() if opts.group_by_length else None
        self.order = BatchOrder(len(train), opts.batch_size, opts.seed, lengths=lengths)
        self.optimizer = make_optimizer(
            model, lr=opts.lr, weight_decay=opts.weight_decay, betas=opts.adam_betas, eps=opts.adam_eps
        )
        self.params = list(trainable_parameters(model))
        if opts.compile:
            compile_layers(model, device)
        self.state = RunState()
        self.iterations, self._held = iterations, None
        self.total_steps = opts.max_steps or iterations * math.ceil(
            opts.epochs * self.order.batches_per_epoch / opts.grad_accum
        )
        ratio_warmup = round(self.total_steps * opts.warmup_ratio)
        self.warmup = opts.warmup_steps if opts.warmup_steps is not None else ratio_warmup
        self.metrics_path = out / "metrics.jsonl"
        self._tb = None

    # ----- resume ---------------------------------------------------------------------------------

    def resume(self, checkpoint: Path) -> None:
        """Continue from `checkpoint` (whose weights the caller loaded): optimizer, RNG,
        data position, and metrics.jsonl cut back to the checkpoint's step."""
        if fsdp.is_sharded_checkpoint(checkpoint):  # weights too: an fsdp run's DCP shards
            state = fsdp.load_sharded(checkpoint, self.model, self.optimizer, self.world)
        else:
            state = ckpt.load_checkpoint_state(checkpoint, self.optimizer, self.world.rank, self.world.size)
        self.state = RunState(**{k: state[k] for k in asdict(RunState())})
        if self.world.is_main:  # drop lines written after the checkpoint
            ckpt.cut_log(self.metrics_path, self.state.step)

    # ----- the loop -------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train to the last step; returns the final metrics."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.device.type == "cpu":
            tune_cpu_allocator()
        self.reporter.start(self.total_steps, self.state.step)
        last: dict[str, Any] = {}
        self.initial: dict[str, Any] = {}
        save_due = False
        try:
            with stop_on_signal() as stop, self._open_metrics() as metrics:
                self._metrics_file = metrics
                if self.state.step == 0 and self._has_valid:
                    self.initial = self.evaluate()  # the starting point of the validation curve
                while self.state.step < self.total_steps:
                    last = self._train_step()
                    step = self.state.step
                    if self.opts.eval_every and step % self.opts.eval_every == 0 and step < self.total_steps:
                        last.update(self.evaluate())
                    stopping = self.world.all_sum([stop.is_set()])[0]  # every rank stops at the same step
                    held = step % self.iterations != 0  # batches still to learn from: no checkpoint yet
                    if stopping and held:
                        log.warning(
                            "stopping after step %d: the last that learns from this batch",
                            step - step % self.iterations + self.iterations,
                        )
                    if stopping and not held:
                        saved = self.save_checkpoint()
                        raise TrainingInterrupted(
                            f"interrupted after step {step}; a checkpoint was saved in {saved}; "
                            f"continue with: weightsmith {self.command} --resume {self.out}"
                        )
                    save_due = save_due or bool(self.opts.save_every and step % self.opts.save_every == 0)
                    if save_due and not held and step < self.total_steps:
                        self.save_checkpoint()
                        save_due = False
                if self._has_valid:
                    last.update(self.evaluate())
        finally:
            self.reporter.close()
            if self._tb is not None:
                self._tb.close()
        return last

    @property
    def _has_valid(self) -> bool:
        return self.valid is not None and len(self.valid) > 0

    def _open_metrics(self) -> contextlib.AbstractContextManager:
        if self.world.is_main:
            return open(self.metrics_path, "a", encoding="utf-8")
        return contextlib.nullcontext(None)

    def _micro_batches(self) -> Iterator[tuple[TrainBatch, bool]]:
        """(this rank's part of each micro-batch of the step, whether it counts)."""
        for _ in range(self.opts.grad_accum):
            epoch, index = divmod(self.state.cursor, self.order.batches_per_epoch)
            self.state.cursor += 1
            mine, counts = self.world.shard(self.order.rows(epoch, index))
            yield mark_stand_in(self.train.batch(mine), counts), counts

    def _train_step(self) -> dict[str, Any]:
        start = time.perf_counter()
        step = self.state.step
        lr = self.opts.lr * lr_factor(
            step, self.total_steps, self.warmup, self.opts.schedule, self.opts.min_lr_ratio
        )
        set_lr(self.optimizer, lr)
        if step % self.iterations == 0 or self._held is None:
            drawn = list(self._micro_batches())
            if hasattr(self.train, "whole_step"):  # a source that settles a step's batches together
                self.train.whole_step(drawn)
            self._held = [(b.to(self.device), c) for b, c in drawn]
        micro = self._held
        n_targets = max(1, int(self.world.all_sum([sum(b.n_targets for b, c in micro if c)])[0]))
        self.model.train()
        loss_sum = 0.0
        extras = MetricSums()
        for batch, counts in micro:
            with self._autocast():
                loss, _, extra = self.loss_fn(self.model, batch)
            if not counts:  # a stand-in, so that every rank runs the same passes
                loss = loss * 0.0
            (loss / (n_targets / self.world.grad_scale)).backward()
            loss_sum += float(loss.detach())
            extras.add(extra, bool(counts))
        self.world.reduce_gradients(self.params)
        tokens = sum(b.n_tokens for b, c in micro if c)
        loss_sum, tokens, *totals = self.world.all_sum([loss_sum, tokens, *extras.flat()])
        if not math.isfinite(loss_sum):
            raise TrainingError(
                f"the loss became {loss_sum} at step {step + 1}; lower --train.lr or check the data"
            )
        max_norm = self.opts.max_grad_norm or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        tokens = int(tokens)
        self.state.step += 1
        self.state.tokens += tokens
        self.state.elapsed_s += seconds
        metrics = {
            "step": self.state.step,
            "epoch": round(self.state.cursor / self.order.batches_per_epoch, 4),
            "loss": loss_sum / n_targets,
            **extras.means(totals, n_targets),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / seconds,
            "targets": n_targets,
            "elapsed_s": round(self.state.elapsed_s, 3),
            **self.world.comm_seconds(),  # empty unless a benchmark times the all-reduce
        }
        self._record(metrics, every=self.opts.log_every)
        self.reporter.step(metrics)
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Mean loss (per target token, or per pair) over the validation items (dropout off),
        and the loss function's extra metrics as `val_NAME`."""
        if not self._has_valid:
            return {}
        assert self.valid is not None
        self.model.eval()
        total, n = 0.0, 0
        extras = MetricSums()
        size = self.opts.batch_size
        for i in range(0, len(self.valid), size):
            mine, counts = self.world.shard(range(i, min(i + size, len(self.valid))))
            batch = mark_stand_in(self.valid.batch(mine).to(self.device), counts)
            with self._autocast():
                loss, count, extra = self.loss_fn(self.model, batch)
            if not counts:  # a stand-in (see distributed.World.shard)
                loss, count = loss * 0.0, 0
            total, n = total + float(loss), n + count
            extras.add(extra, bool(counts))
        self.model.train()
        total, n, *sums = self.world.all_sum([total, n, *extras.flat()])
        val = total / max(n, 1)
        metrics: dict[str, Any] = {"step": self.state.step, "val_loss": val}
        if self.perplexity:
            metrics["val_ppl"] = math.exp(min(val, 50.0))
        metrics.update({f"val_{key}": value for key, value in extras.means(sums, max(n, 1)).items()})
        self._record(metrics, every=1)
        self.reporter.evaluated(metrics)
        return metrics

    def save_checkpoint(self) -> Path:
        state = {**asdict(self.state), "total_steps": self.total_steps}
        path = self.out / "checkpoints" / f"step-{self.state.step:08d}"
        if self.world.strategy == "fsdp":
            return fsdp.save_sharded(
                path.parent,
                self.state.step,
                model=self.model,
                optimizer=self.optimizer,
                state=state,
                keep=self.opts.keep_checkpoints,
                world=self.world,
            )
        rng = ckpt.rng_state(self.world.gather(ckpt.rng_state()))  # each rank's dropout stream
        if self.world.is_main:  # DDP: every rank holds the same weights and optimizer state
            ckpt.save_checkpoint(
                self.out / "checkpoints",
                self.state.step,
                save_weights=self.save_weights,
                optimizer=self.optimizer,
                state=state,
                keep=self.opts.keep_checkpoints,
                rng=rng,
            )
        self.world.barrier()
        return path

    def _record(self, metrics: dict[str, Any], *, every: int) -> None:
        if not self.world.is_main or (metrics["step"] % every and metrics["step"] != self.total_steps):
            return
        self._metrics_file.write(json.dumps(metrics) + "\n")
        self._metrics_file.flush()
        if self.opts.tensorboard:
            writer = self._tensorboard()
            for key, value in metrics.items():
                if key != "step":
                    writer.add_scalar(key, value, metrics["step"])

    def _tensorboard(self) -> Any:
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError(
                    "--train.tensorboard needs the tensorboard package: pip install tensorboard"
                ) from e
            self._tb = SummaryWriter(str(self.out / "tensorboard"))
        return self._tb

    def _autocast(self) -> contextlib.AbstractContextManager:
        if use_bf16(self.opts.precision, self.device):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def mark_stand_in(batch: Any, counts: bool) -> Any:
    """`batch`, its `stand_in` flag set where it has one: a loss that pools values over ranks
    (GRPO's entropy threshold, KTO's KL estimate) leaves a stand-in's out."""
    if hasattr(batch, "stand_in"):
        batch.stand_in = not counts
    return batch


def compile_layers(model: nn.Module, device: torch.device) -> int:
    """Compile each decoder layer in place (regional compilation: one layer's code compiles once
    and serves them all; parameter names unchanged); returns how many. Refuses, before any
    step, a device whose compiler toolchain is missing."""
    compilers = (os.environ.get("CXX", "g++"), "c++", "clang++")
    if device.type == "cpu" and not any(shutil.which(c) for c in compilers):
        raise ConfigError(
            "--train.compile on the CPU needs a C++ compiler (g++ or clang++; CXX names another)"
        )
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise ConfigError("--train.compile on a CUDA device needs Triton: pip install triton")
    layers = [m for m in model.modules() if isinstance(m, DecoderLayer)]
    for layer in layers:  # packed rows' layout changes every batch: attended eagerly, it is no guard
        layer.self_attn.attend_documents = torch.compiler.disable(layer.self_attn.attend_documents)
        layer.compile()
    return len(layers)


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether to run under bf16 autocast: asked for, or (auto) on a GPU that supports bf16 or a
    CPU that multiplies it in hardware (device.cpu_multiplies_bf16)."""
    if precision == "auto":
        if device.type == "cpu":
            return cpu_multiplies_bf16()
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16"
