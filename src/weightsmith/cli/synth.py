"""How synth shows itself: a line when the run starts, a line per step (kept so far, and of
how many) on stderr, a spinner while a model loads, and the funnel table at the end.

Not here: the command (`weightsmith.commands.synth`).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from weightsmith.cli.command import Ref
from weightsmith.cli.loading import load_spinner
from weightsmith.cli.redteam import stderr_console

HELP = "make training data with a model: self-instruct, evolve, grounded Q&A from your documents, answer"


#: (name, config, run, help, example) of each `synth` subcommand, for cli/main.py's COMMANDS.
SUBCOMMANDS = (
    (
        "self-instruct",
        Ref("weightsmith.commands.synth:SelfInstructConfig"),
        Ref("weightsmith.commands.synth:run_self_instruct"),
        "new instructions from your seed examples, then answers; filtered and deduplicated",
        "weightsmith synth self-instruct --seed seeds.jsonl --model smollm2-135m-instruct --n 2000 --out data/synth",
    ),
    (
        "evolve",
        Ref("weightsmith.commands.synth:EvolveConfig"),
        Ref("weightsmith.commands.synth:run_evolve"),
        "rewrite instructions deeper, broader or more concrete, round after round, then answer them",
        "weightsmith synth evolve --data data/synth/train.jsonl --model http://big:8000/v1#qwen --rounds 2 "
        "--out data/evolved",
    ),
    (
        "grounded",
        Ref("weightsmith.commands.synth:GroundedConfig"),
        Ref("weightsmith.commands.synth:run_grounded"),
        "questions and answers grounded in chunks of your documents (each keeps its source)",
        "weightsmith synth grounded --docs manuals/ --model http://big:8000/v1#qwen --questions-per-chunk 3 "
        "--out data/kb",
    ),
    (
        "answer",
        Ref("weightsmith.commands.synth:AnswerConfig"),
        Ref("weightsmith.commands.synth:run_answer"),
        "distil a teacher model's answers to your prompts",
        "weightsmith synth answer --prompts prompts.jsonl --model http://teacher:8000/v1#m --out data/distilled",
    ),
)  # fmt: skip


class SynthLines:
    """The synth run's progress on stderr."""

    def __init__(self) -> None:
        self.console = stderr_console()
        self.steps = 0

    def line(self, text: str) -> None:
        self.console.print(f"== {text}", markup=False, highlight=False)

    def step(self, recipe: str, kept: int, target: int | None) -> None:
        self.steps += 1
        of = f"/{target}" if target else ""
        self.console.print(
            f"{recipe}: step {self.steps}: {kept}{of} examples kept", markup=False, highlight=False
        )

    def loading(self, model: str) -> Any:
        return load_spinner(model)


def make_progress(cfg: Any) -> SynthLines | None:
    return None if cfg.json else SynthLines()


def print_synth(result: dict, console: Console) -> None:
    funnel = result["funnel"]
    table = Table(title=f"synth {result['recipe']}: {funnel['candidates']} candidates")
    for col in ("stage", "dropped", "remaining"):
        table.add_column(col, justify="right" if col == "remaining" else "left")
    for stage in funnel["stages"]:
        dropped = ", ".join(f"{r} {n}" for r, n in stage["dropped"].items()) or "-"
        table.add_row(stage["stage"], dropped, str(stage["remaining"]))
    console.print(table)
    share = funnel["kept_share"]
    if share.get("rate") is not None:
        console.print(
            f"kept {funnel['kept']} ({100 * share['rate']:.1f}% [{100 * share['ci_low']:.1f}, "
            f"{100 * share['ci_high']:.1f}] 95% Wilson): train {funnel['train']}, validation {funnel['validation']}",
            markup=False, highlight=False,
        )  # fmt: skip
    skipped = result.get("skipped_documents") or []
    for s in skipped:
        console.print(f"skipped {s['file']}: {s['reason']}", markup=False, highlight=False)
    w = result["written"]
    console.print(f"data: {w['train']['path']}  report: {w['report']}", markup=False, highlight=False)
