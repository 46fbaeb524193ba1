"""Commands that shape a model: finetune, distill, dpo, kto, reward, grpo and merge.

`run_finetune(cfg, progress)` trains as `weightsmith.train.sft` does and `run_dpo(cfg,
progress)` as `weightsmith.train.dpo` does, with `progress` as the training loop's
`Reporter` (the CLI passes a progress bar or progress lines); `FinetuneConfig` and
`DpoConfig` are owned by those modules and only re-exported here; `run_kto` (and
`KtoConfig`) likewise for `weightsmith.train.kto`, `run_reward` (`RewardConfig`) for
`weightsmith.train.reward_model`, `run_grpo` (and `GrpoConfig`) for
`weightsmith.train.grpo`, `run_distill` (`DistillConfig`) for `weightsmith.train.distill`.
`run_merge` folds a
LoRA adapter into its base and saves an HF directory.

Not here: the training loop, data and losses (`weightsmith.train`), progress bars and
printing (`weightsmith.cli.train`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from weightsmith.commands.loading import LoadOptions, load_status
from weightsmith.config import opt
from weightsmith.lineage import write_lineage
from weightsmith.train.distill import DistillConfig
from weightsmith.train.distill import run_distill as train_distill
from weightsmith.train.dpo import DpoConfig
from weightsmith.train.dpo import run_dpo as train_dpo
from weightsmith.train.grpo import GrpoConfig
from weightsmith.train.grpo import run_grpo as train_grpo
from weightsmith.train.kto import KtoConfig
from weightsmith.train.kto import run_kto as train_kto
from weightsmith.train.loop import Reporter
from weightsmith.train.reward_model import RewardConfig
from weightsmith.train.reward_model import run_reward as train_reward
from weightsmith.train.rewards import Reward
from weightsmith.train.sft import FinetuneConfig
from weightsmith.train.sft import run_finetune as train_sft

__all__ = [
    "DistillConfig", "DpoConfig", "FinetuneConfig", "GrpoConfig", "KtoConfig", "MergeConfig", "Reward", "RewardConfig",
    "run_distill", "run_dpo", "run_finetune", "run_grpo", "run_kto", "run_merge", "run_reward",
]  # fmt: skip


def run_finetune(cfg: FinetuneConfig, progress: Reporter | None = None) -> dict[str, Any]:
    """Fine-tune as `cfg` says; `progress` is told each step (None: log lines via `logging`)."""
    return train_sft(cfg, reporter=progress)


def run_distill(cfg: DistillConfig, progress: Reporter | None = None) -> dict[str, Any]:
    """Distil a teacher into a student as `cfg` says; `progress` as for `run_finetune`."""
    return train_distill(cfg, reporter=progress)


def run_dpo(cfg: DpoConfig, progress: Reporter | None = None) -> dict[str, Any]:
    """Train on preference pairs as `cfg` says; `progress` as for `run_finetune`."""
    return train_dpo(cfg, reporter=progress)


def run_kto(cfg: KtoConfig, progress: Reporter | None = None) -> dict[str, Any]:
    """Train on completions labelled desirable or not (KTO) as `cfg` says; `progress` as for
    `run_finetune`."""
    return train_kto(cfg, reporter=progress)


def run_reward(cfg: RewardConfig, progress: Reporter | None = None) -> dict[str, Any]:
    """Train a reward model on preference pairs as `cfg` says; `progress` as for `run_finetune`."""
    return train_reward(cfg, reporter=progress)


def run_grpo(
    cfg: GrpoConfig, progress: Reporter | None = None, rewards: tuple[Reward, ...] = ()
) -> dict[str, Any]:
    """Reinforce what the rewards check (GRPO) as `cfg` says; `rewards` adds Python reward
    functions to --reward's; `progress` as for `run_finetune`."""
    return train_grpo(cfg, reporter=progress, rewards=rewards)


@dataclass(kw_only=True)
class MergeConfig(LoadOptions):
    """Fold a LoRA adapter into its base model and save a plain HF checkpoint directory."""

    out: str = opt(help="output directory (must not exist)")
    save_dtype: str | None = opt(None, "dtype of the saved weights: fp32, bf16 or fp16 (default: as loaded)")


def run_merge(cfg: MergeConfig, progress: Any = None) -> dict[str, Any]:
    import torch

    from weightsmith.checkpoint.save import save_hf_dir
    from weightsmith.device import pick_dtype
    from weightsmith.errors import UsageError

    if not cfg.adapter:
        raise UsageError("merge needs --adapter DIR (a LoRA adapter to fold into the model)")
    started = time.time()
    llm = cfg.load(load_status(progress))
    dtype = pick_dtype(cfg.save_dtype, torch.device("cpu")) if cfg.save_dtype else None
    out = save_hf_dir(
        llm.model, llm.tokenizer, cfg.out, generation_config=llm.checkpoint.generation_config, dtype=dtype
    )
    inputs = {"model": cfg.model, "adapter": cfg.adapter}
    write_lineage(out, kind="merge", config=cfg, inputs=inputs, started=started, device=str(llm.device))
    return {"model": cfg.model, "adapter": cfg.adapter, "out": str(out)}
