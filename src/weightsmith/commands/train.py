"""Commands that shape a model: finetune, distill, dpo, kto, reward, grpo and merge.

`run_finetune(cfg, progress)` trains as `weightsmith.train.sft` does and `run_dpo(cfg,
progress)` as `weightsmith.train.dpo` does, with `progress` as the training loop's
`Reporter` (the CLI passes a progress bar or progress lines); `FinetuneConfig` and
`DpoConfig` are owned by those modules and only re-exported here; `run_kto` (and
`KtoConfig`) likewise for `weightsmith.train.kto`, `run_reward` (`RewardConfig`) for
`weightsmith.train.reward_model`, `run_grpo` (and `GrpoConfig`) for
`weightsmith.train.grpo`, `run_distill` (`DistillConfig`) for `weightsmith.train.distill`.
`run_merge` folds a
LoRA adapter into its base, or merges forks (weightsmith.merging), and saves an HF directory.

Not here: the training loop, data and losses (`weightsmith.train`), progress bars and
printing (`weightsmith.cli.train`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightsmith.commands.loading import LoadOptions, load_status
from weightsmith.config import opt
from weightsmith.lineage import write_lineage
from weightsmith.merging.merge import Recipe
from weightsmith.merging.methods import METHODS
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
    """Fold a LoRA adapter into its base model, or merge several forks of it (adapters or full
    fine-tunes) into one, and save a plain HF checkpoint directory."""

    out: str = opt(help="output directory (must not exist)")
    save_dtype: str | None = opt(None, "dtype of the saved weights: fp32, bf16 or fp16 (default: as loaded)")
    fork: list[str] = opt(
        default_factory=list,
        help="a fork of the model to merge: a LoRA adapter folder, or a full checkpoint of the same "
        "architecture; the model itself may be one (slerp from it)",
        split=False,
    )
    method: str = opt("linear", "how forks merge", choices=list(METHODS))
    weights: list[float] = opt(
        default_factory=list, help="each fork's weight (one, or one per fork; default 1)"
    )
    density: list[float] = opt(
        default_factory=list,
        help="ties, dare_*: the fraction of each fork's delta kept: one for all, or one per fork (1: all)",
    )
    t: list[str] = opt(
        default_factory=list,
        help="slerp: 0 is the first fork, 1 the second; a,b,c is a gradient over the layers, "
        "FILTER=... applies to tensors whose name holds FILTER; the first that matches wins",
        split=False,
    )
    scale: float = opt(1.0, "multiply the merged delta (TIES' lambda)")
    gamma: float = opt(0.01, "breadcrumbs: the share of each delta's largest entries dropped as outliers")
    normalize: str = opt(
        "auto", "divide by the weights (auto: as the method does: linear and ties yes, others no)",
        choices=["auto", "yes", "no"],
    )  # fmt: skip
    seed: int = opt(0, "seed of DARE's random drops")
    json: bool = opt(False, "print the result as JSON")
    as_adapter: bool = opt(
        False, "write the merge as a LoRA adapter (a truncated SVD of each linear's delta) instead of a model"
    )
    rank: int | None = opt(
        None,
        "--as-adapter: the adapter's rank (default: what adapter forks need to be exact; full forks: required)",
    )

    def recipe(self) -> Recipe:
        from weightsmith.merging.settings import parse_settings

        return Recipe(
            method=self.method,
            forks=len(self.fork),
            weights=list(self.weights),
            density=list(self.density),
            t=parse_settings("--t", self.t, low=0.0, high=1.0),
            scale=self.scale,
            gamma=self.gamma,
            normalize=None if self.normalize == "auto" else self.normalize == "yes",
            seed=self.seed,
        )


def run_merge(cfg: MergeConfig, progress: Any = None) -> dict[str, Any]:
    """Fold `cfg.adapter` into the model, or merge `cfg.fork`s into it; save an HF directory."""
    import torch

    from weightsmith.checkpoint.save import check_out_dir, save_hf_dir
    from weightsmith.device import pick_dtype
    from weightsmith.errors import UsageError

    if not cfg.adapter and not cfg.fork:
        raise UsageError(
            "merge needs --adapter DIR (a LoRA adapter to fold into the model) or --fork A --fork B ... "
            "(forks to merge)"
        )
    if cfg.adapter and cfg.fork:
        raise UsageError(f"give --adapter {cfg.adapter} as one more --fork (with --fork, no --adapter)")
    if cfg.fork and cfg.keep_quantized:
        raise UsageError("merge computes in full precision; drop --keep-quantized")
    if (cfg.as_adapter or cfg.rank is not None) and not cfg.fork:
        raise UsageError(
            "--as-adapter and --rank write a merge of --fork forks as an adapter; give the forks"
        )
    if cfg.rank is not None and cfg.rank < 1:
        raise UsageError(f"--rank {cfg.rank}: the adapter's rank must be at least 1")
    if cfg.rank is not None and not cfg.as_adapter:
        raise UsageError(f"--rank {cfg.rank} is the rank of --as-adapter's adapter; add --as-adapter")
    recipe = cfg.recipe() if cfg.fork else None  # every flag checked before the model loads
    check_out_dir(Path(cfg.out), overwrite=False)
    started = time.time()
    if recipe is None:
        llm = cfg.load(load_status(progress))
        ckpt, device, stats = llm.checkpoint, llm.device, {}
    else:
        ckpt, device = _load_base(cfg, progress)
        stats = _merge_forks(ckpt, cfg, recipe)
    if cfg.as_adapter:
        out = Path(cfg.out)
    else:
        dtype = pick_dtype(cfg.save_dtype, torch.device("cpu")) if cfg.save_dtype else None
        out = save_hf_dir(
            ckpt.model, ckpt.tokenizer, cfg.out, generation_config=ckpt.generation_config, dtype=dtype
        )
    inputs = (
        {"model": cfg.model, "adapter": cfg.adapter}
        if cfg.adapter
        else {"model": cfg.model, "forks": cfg.fork}
    )
    write_lineage(
        out,
        kind="merge",
        config=cfg,
        inputs=inputs,
        started=started,
        device=str(device),
        metrics=stats or None,
    )
    extra = {"method": cfg.method, "forks": list(cfg.fork), **stats} if cfg.fork else {}
    return {"model": cfg.model, "adapter": cfg.adapter, "out": str(out), **extra}


def _load_base(cfg: MergeConfig, progress: Any) -> tuple[Any, Any]:
    """The model to merge into, as its checkpoint: no engine, no decode layout."""
    import contextlib

    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.checkpoint.pull import resolve
    from weightsmith.device import pick_device, pick_dtype

    status = load_status(progress)
    device = pick_device(cfg.device)
    with status(cfg.model) if status is not None else contextlib.nullcontext():
        path = resolve(cfg.model)
        ckpt = load_checkpoint(
            path, device=device, dtype=pick_dtype(cfg.dtype, device), allow_pickle=cfg.allow_pickle
        )
    return ckpt, device


def _merge_forks(ckpt: Any, cfg: MergeConfig, recipe: Recipe) -> dict[str, Any]:
    """Merge into the model, or, with --as-adapter, write the merge as an adapter at cfg.out."""
    from contextlib import ExitStack

    from weightsmith.lora import unload
    from weightsmith.merging import merge_forks, open_forks
    from weightsmith.merging.adapter import LowRank, adapter_rank

    model = ckpt.model
    shapes = {n: p.shape for n, p in model.named_parameters()}
    with ExitStack() as stack:
        forks = open_forks(cfg.fork, model, ckpt.path, shapes, stack, allow_pickle=cfg.allow_pickle)
        unload(model)  # the forks' adapters stay readable from their own layers
        model.requires_grad_(False)
        if not cfg.as_adapter:
            return merge_forks(model, forks, recipe)
        low = LowRank(model, adapter_rank(forks, cfg.rank))
        stats = merge_forks(model, forks, recipe, keep=low.keep)
    low.save(Path(cfg.out), base_model=cfg.model)
    return {**stats, **low.summary()}
