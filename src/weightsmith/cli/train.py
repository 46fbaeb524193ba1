"""How finetune and merge show themselves: the training progress bar and the result lines.

A rich progress bar on a terminal, plain lines otherwise (both are `Reporter`s the
training loop calls). Not here: the commands (`weightsmith.commands.train`) and the
training itself (`weightsmith.train`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from weightsmith.train.distributed import launched_rank
from weightsmith.train.loop import LogReporter, Reporter


class BarReporter:
    """A progress bar with loss, learning rate, tokens/s and ETA; validation results as lines."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]} tok/s"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task: Any = None

    def start(self, total_steps: int, first_step: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=total_steps, completed=first_step, loss="-", lr="-", speed="-"
        )

    def step(self, m: dict[str, Any]) -> None:
        fields = {"loss": f"{m['loss']:.4f}", "lr": f"{m['lr']:.2e}", "speed": f"{m['tokens_per_s']:.0f}"}
        self.progress.update(self.task, completed=m["step"], **fields)

    def evaluated(self, m: dict[str, Any]) -> None:
        ppl = f" (ppl {m['val_ppl']:.2f})" if "val_ppl" in m else ""  # DPO's loss has no perplexity
        self.progress.console.print(f"step {m['step']}: validation loss {m['val_loss']:.4f}{ppl}")

    def close(self) -> None:
        self.progress.stop()


class LineReporter(LogReporter):
    """Plain progress lines on a stream (for logs and CI, where a bar would be noise)."""

    def __init__(self, stream: TextIO, every: int = 10) -> None:
        super().__init__(every)
        self.stream = stream

    def start(self, total_steps: int, first_step: int) -> None:
        self.total = total_steps
        print(f"training steps {first_step + 1}..{total_steps}", file=self.stream, flush=True)

    def step(self, m: dict[str, Any]) -> None:
        if m["step"] % self.every == 0 or m["step"] == self.total:
            print(
                f"step {m['step']}/{self.total} loss {m['loss']:.4f} lr {m['lr']:.2e} "
                f"{m['tokens_per_s']:.0f} tok/s",
                file=self.stream,
                flush=True,
            )

    def evaluated(self, m: dict[str, Any]) -> None:
        print(f"step {m['step']}: validation loss {m['val_loss']:.4f}", file=self.stream, flush=True)


def make_reporter(stream: TextIO | None = None) -> Reporter:
    """Bars on a terminal, else a line every few steps; on `stream` (stderr as it is now)."""
    stream = sys.stderr if stream is None else stream
    if stream.isatty():
        return BarReporter(Console(file=stream, markup=False))
    return LineReporter(stream)


def print_finetune(result: dict[str, Any], console: Console) -> None:
    if launched_rank() or os.environ.get("RANK", "0") != "0":  # rank 0 (or the launcher) tells
        return
    m = result["metrics"]
    data = result["data"]["train"]
    console.print(
        f"trained {result['parameters']['trainable']:,} of {result['parameters']['total']:,} parameters "
        f"({result['method']}) for {result['steps']} steps on {data['examples']} examples "
        f"in {result['seconds']:.0f}s"
    )
    if "loss" in m:
        val = f", validation loss {m['val_loss']:.4f}" if "val_loss" in m else ""
        console.print(f"final training loss {m['loss']:.4f}{val}")
    if "reward" in m:  # grpo: what the rewards said of the last step's samples (and validation's)
        val = f", validation {m['val_reward']:.4f}" if "val_reward" in m else ""
        console.print(f"mean reward {m['reward']:.4f}{val}")
    if "val_kd" in m:  # distill: the student's distance to the teacher, and each one's cross-entropy
        console.print(
            f"validation {result['loss']} to the teacher {m['val_kd']:.4f}; cross-entropy on the data: "
            f"student {m['val_nll']:.4f}, teacher {m['val_teacher_nll']:.4f}"
        )
    out = Path(result["out"])
    where = out / "model" if result["method"] == "full" else out
    console.print(f"wrote {where} (and metrics.jsonl, loss.png, config.yaml, run.json in {out})")


def print_merge(result: dict[str, Any], console: Console) -> None:
    if "method" in result:
        forks = len(result["forks"])
        console.print(
            f"{result['method']} of {forks} fork{'s' * (forks != 1)}: {result['tensors']} tensors changed"
        )
    if "rank" in result:
        console.print(
            f"adapter of rank {result['rank']} on {result['layers']} linears; the least a layer kept of its "
            f"delta's energy: {result['energy_kept_min']:.1%}"
        )
        if result["left_out_tensors"]:
            console.print(
                f"left out (a LoRA cannot hold them): changes to {result['left_out_tensors']} tensors (norms, "
                f"embeddings, head), the largest {result['left_out_max_relative']:.2%} of its weights"
            )
    console.print(f"wrote {result['out']}")
