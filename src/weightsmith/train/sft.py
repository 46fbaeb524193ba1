"""Supervised fine-tuning: the `finetune` command.

Loads a model, swaps in what the method trains (LoRA adapters; LoRA over a 4-bit
NF4 base for QLoRA; every weight for full fine-tuning; see runs.py), prepares the
data, and hands the SFT loss to the shared training loop. OUT gets what every
training run writes (runs.py): `config.yaml`, `metrics.jsonl`, `checkpoints/`, the
adapter or `OUT/model`, `loss.png` and `run.json`.

The SFT loss runs the LM head only at target positions: prompt and padding
positions never get logits, which saves the largest matmul of the step and the
(T, vocab) logits tensor. Not here: the loop (loop.py) or data reading (data.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from weightsmith.config import opt
from weightsmith.train.data import (
    DataStats,
    Row,
    RowSource,
    pad_id_for,
    read_records,
    to_rows,
    tokenize_records,
)
from weightsmith.train.distributed import World
from weightsmith.train.loop import Reporter
from weightsmith.train.losses import sft_loss
from weightsmith.train.runs import (
    LoraOptions,
    RunConfig,
    begin_outputs,
    fit_and_save,
    load_model,
    make_trainer,
    prepare,
    read_and_tokenize,
    read_metrics,
    run_on_ranks,
    start_run,
    warn_truncated,
)

__all__ = [
    "FinetuneConfig", "LoraOptions", "load_data", "read_metrics", "run_finetune", "sft_loss", "warn_about",
]  # fmt: skip

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class FinetuneConfig(RunConfig):
    """Fine-tune a model on your own JSONL data with LoRA, QLoRA or full fine-tuning."""

    command: ClassVar[str] = "finetune"

    data: str | None = opt(None, "training data: JSONL in chat, instruction or text format")
    packing: bool = opt(False, "pack several examples into each row of max_seq_len tokens")
    train_on_prompt: bool = opt(False, "also learn system/user text, not only assistant turns")


def load_data(cfg: FinetuneConfig, tokenizer: Any) -> tuple[list[Row], list[Row], dict[str, Any]]:
    """Read and check all data, then tokenize it; nothing trains if any line is bad."""
    kwargs = {"max_seq_len": cfg.max_seq_len, "train_on_prompt": cfg.train_on_prompt}
    (train, train_stats), (valid, valid_stats) = read_and_tokenize(
        cfg, read_records, lambda part: tokenize_records(part, tokenizer, **kwargs), warn_about
    )
    train_rows = to_rows(train, cfg.max_seq_len, packing=cfg.packing)
    train_stats.rows = len(train_rows)
    # Shortest first: validation sums a loss over all rows, so their order is free, and batches of
    # like lengths pad less (the demo's 41 rows: 21% fewer tokens than in file order).
    valid_rows = sorted(to_rows(valid, cfg.max_seq_len, packing=False), key=lambda row: len(row.ids))
    return train_rows, valid_rows, {"train": train_stats.to_dict(), "valid": valid_stats.to_dict()}


def warn_about(name: str, stats: DataStats, max_seq_len: int) -> None:
    warn_truncated(name, "examples", stats.truncated, max_seq_len, stats.longest)
    if stats.dropped:
        log.warning(
            "%d %s examples had no target tokens left after truncation and were dropped", stats.dropped, name
        )


def run_finetune(cfg: FinetuneConfig, *, reporter: Reporter | None = None) -> dict[str, Any]:
    """Fine-tune as `cfg` says, here or on --nproc-per-node processes; the run's result."""
    return run_on_ranks(cfg, "finetune", lambda c, world: _finetune(c, world, reporter))


def _finetune(cfg: FinetuneConfig, world: World, reporter: Reporter | None) -> dict[str, Any]:
    from weightsmith.checkpoint.pull import resolve

    cfg, out, resume_from = start_run(cfg, "finetune")
    path = resolve(str(cfg.model))
    loaded, device = load_model(cfg, path)
    train_rows, valid_rows, data_stats = load_data(cfg, loaded.tokenizer)  # all checks before any write
    begin_outputs(cfg, out, resume_from, world)
    model = loaded.model
    prepared = prepare(model, cfg, resume_from, world, device)
    gc = cfg.train.gradient_checkpointing
    pad_id = pad_id_for(loaded.tokenizer)
    sources = (RowSource(train_rows, pad_id), RowSource(valid_rows, pad_id))
    loss = lambda m, b: (*sft_loss(m, b, checkpoint=gc), {})  # noqa: E731
    trainer = make_trainer(cfg, model, loss, sources, out, prepared, device, reporter, world)
    return fit_and_save(
        cfg, trainer, loaded, prepared, model_path=path, resume_from=resume_from, data_stats=data_stats
    )
