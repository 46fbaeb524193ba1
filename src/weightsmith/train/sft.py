"""Supervised fine-tuning: the `finetune` command.

Loads a model, swaps in what the method trains (LoRA adapters; LoRA over a 4-bit
NF4 base for QLoRA; every weight for full fine-tuning), prepares the data, and
hands the SFT loss to the shared training loop. Writes, into OUT: the resolved
`config.yaml` (first), `metrics.jsonl`, `checkpoints/`, then at the end the PEFT
adapter (`adapter_config.json` + `adapter_model.safetensors`) or, for full
fine-tuning, an HF checkpoint in `OUT/model`, a loss curve `loss.png` and a
lineage record `run.json`.

The SFT loss runs the LM head only at target positions: prompt and padding
positions never get logits, which saves the largest matmul of the step and the
(T, vocab) logits tensor. Not here: the loop (loop.py) or data reading (data.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from weightsmith import __version__
from weightsmith.config import dump_config_yaml, load_config_yaml, opt
from weightsmith.device import pick_device, pick_dtype
from weightsmith.errors import UsageError
from weightsmith.files import write_json_atomic
from weightsmith.lora import LoraConfig, apply_lora, load_adapter, save_adapter
from weightsmith.train import checkpoints as ckpt
from weightsmith.train.data import (
    DataStats,
    Row,
    pad_id_for,
    read_records,
    split_records,
    to_rows,
    tokenize_records,
)
from weightsmith.train.loop import Reporter, Trainer, TrainOptions
from weightsmith.train.losses import sft_loss

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class LoraOptions:
    """LoRA adapters (methods lora and qlora)."""

    rank: int = opt(8, "adapter rank r")
    alpha: float = opt(16.0, "scaling numerator: updates are scaled by alpha/r (alpha/sqrt(r) with rslora)")
    dropout: float = opt(0.05, "dropout on the adapter's input")
    target_modules: list[str] = opt(
        ["all-linear"], "module names to adapt (e.g. q_proj,v_proj), or all-linear for every projection"
    )
    rslora: bool = opt(False, "rank-stabilised scaling alpha/sqrt(r)")

    def to_config(self) -> LoraConfig:
        targets: list[str] | str = list(self.target_modules)
        if targets == ["all-linear"]:
            targets = "all-linear"
        cfg = LoraConfig(
            r=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            target_modules=targets,
            use_rslora=self.rslora,
        )
        cfg.validate()
        return cfg


@dataclass(kw_only=True)
class FinetuneConfig:
    """Fine-tune a model on your own JSONL data with LoRA, QLoRA or full fine-tuning."""

    model: str | None = opt(None, "catalog or store name, HF directory, or .gguf file", positional=True)
    data: str | None = opt(None, "training data: JSONL in chat, instruction or text format")
    valid: str | None = opt(None, "validation JSONL; without it, --valid-fraction of --data is held out")
    valid_fraction: float = opt(0.1, "fraction of --data held out for validation when --valid is not given")
    method: Literal["lora", "qlora", "full"] = opt("lora", "what to train")
    out: str | None = opt(None, "output directory for the run")
    resume: str | None = opt(None, "continue the run in this directory from its latest checkpoint")
    max_seq_len: int = opt(1024, "truncate examples to this many tokens")
    packing: bool = opt(False, "pack several examples into each row of max_seq_len tokens")
    train_on_prompt: bool = opt(False, "also learn system/user text, not only assistant turns")
    device: str = opt("auto", "cpu, cuda, cuda:N, mps or auto")
    dtype: str = opt("auto", "base weight dtype: fp32, bf16, fp16 or auto")
    overwrite: bool = opt(False, "start afresh even if OUT already holds a run")
    json: bool = opt(False, "print the final metrics as JSON")
    train: TrainOptions = opt(default_factory=TrainOptions)
    lora: LoraOptions = opt(default_factory=LoraOptions)


@dataclass
class Prepared:
    """A model set up for one method, and how to save what it trains."""

    save_weights: Callable[[Path], None]


def _prepare_lora(
    model: nn.Module, cfg: FinetuneConfig, base_name: str, resume_from: Path | None
) -> Prepared:
    if cfg.method == "qlora":
        from weightsmith.quant.nf4 import quantize_linears_nf4

        quantize_linears_nf4(model)
    lora_cfg = cfg.lora.to_config()
    if resume_from is None:
        apply_lora(model, lora_cfg)
    else:
        load_adapter(model, resume_from)
    _float32_trainables(model)
    return Prepared(lambda d: save_adapter(model, d, lora_cfg, base_model=base_name))


def _prepare_full(
    model: nn.Module, cfg: FinetuneConfig, base_name: str, resume_from: Path | None
) -> Prepared:
    model.requires_grad_(True)
    if resume_from is not None:
        state = load_file(str(resume_from / "model.safetensors"))
        with torch.no_grad():
            for name, p in model.named_parameters():  # a tied LM head is listed once
                p.copy_(state[name])

    def save(directory: Path) -> None:
        state = {n: p.detach().contiguous() for n, p in model.named_parameters()}
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})

    return Prepared(save)


def _float32_trainables(model: nn.Module) -> None:
    """Adapters train in fp32 even over a bf16 base (autocast handles the matmuls)."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


#: What each --method trains; each swaps its trainable parts in and, on resume, restores them.
METHODS: dict[str, Callable[[nn.Module, FinetuneConfig, str, Path | None], Prepared]] = {
    "lora": _prepare_lora,
    "qlora": _prepare_lora,
    "full": _prepare_full,
}


# ----- the command --------------------------------------------------------------------------------


def resolve_config(cfg: FinetuneConfig) -> FinetuneConfig:
    """With --resume, the run's own config.yaml; otherwise check the flags."""
    if cfg.resume:
        saved = Path(cfg.resume) / "config.yaml"
        if not saved.is_file():
            raise UsageError(
                f"{saved}: not found; --resume takes the OUT directory of an earlier finetune run"
            )
        if cfg.model or cfg.data:
            raise UsageError(
                "--resume continues a run with its saved config.yaml; do not pass a model or --data"
            )
        if (Path(cfg.resume) / "run.json").exists():
            raise UsageError(f"{cfg.resume}: this run already finished (see its run.json); nothing to resume")
        resumed = load_config_yaml(FinetuneConfig, saved)
        resumed.resume, resumed.out, resumed.json = cfg.resume, cfg.resume, cfg.json
        return resumed
    missing = [
        flag for flag, value in (("MODEL", cfg.model), ("--data", cfg.data), ("--out", cfg.out)) if not value
    ]
    if missing:
        raise UsageError(f"missing {', '.join(missing)}: finetune needs a model, --data FILE and --out DIR")
    out = Path(cfg.out)
    if (out / "config.yaml").exists() and not cfg.overwrite:
        raise UsageError(
            f"{out} already holds a run; continue it with --resume {out}, or pass --overwrite to start afresh"
        )
    return cfg


def load_data(cfg: FinetuneConfig, tokenizer: Any) -> tuple[list[Row], list[Row], dict[str, Any]]:
    """Read and check all data, then tokenize it; nothing trains if any line is bad."""
    records = read_records(cfg.data)
    valid_records = read_records(cfg.valid) if cfg.valid else []
    if not cfg.valid and cfg.valid_fraction > 0:
        records, valid_records = split_records(records, cfg.valid_fraction, cfg.train.seed)
    kwargs = {"max_seq_len": cfg.max_seq_len, "train_on_prompt": cfg.train_on_prompt}
    train, train_stats = tokenize_records(records, tokenizer, **kwargs)
    valid, valid_stats = tokenize_records(valid_records, tokenizer, **kwargs)
    for name, stats in (("training", train_stats), ("validation", valid_stats)):
        _warn_about(name, stats, cfg.max_seq_len)
    train_rows = to_rows(train, cfg.max_seq_len, packing=cfg.packing)
    train_stats.rows = len(train_rows)
    valid_rows = to_rows(valid, cfg.max_seq_len, packing=False)
    return train_rows, valid_rows, {"train": train_stats.to_dict(), "valid": valid_stats.to_dict()}


def _warn_about(name: str, stats: DataStats, max_seq_len: int) -> None:
    if stats.truncated:
        log.warning(
            "%d %s examples are longer than max_seq_len=%d (longest %d tokens) and were truncated",
            stats.truncated, name, max_seq_len, stats.longest,
        )  # fmt: skip
    if stats.dropped:
        log.warning(
            "%d %s examples had no target tokens left after truncation and were dropped", stats.dropped, name
        )


def run_finetune(cfg: FinetuneConfig, *, reporter: Reporter | None = None) -> dict[str, Any]:
    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.checkpoint.pull import resolve

    cfg = resolve_config(cfg)
    out = Path(cfg.out)
    resume_from = None
    if cfg.resume:
        resume_from = ckpt.latest_checkpoint(out / "checkpoints")
        if resume_from is None:
            raise ckpt.ResumeError(f"{out}/checkpoints: no checkpoint to resume from; start the run again")
    torch.manual_seed(cfg.train.seed)
    device = pick_device(cfg.device)
    dtype = pick_dtype("fp32" if cfg.method == "full" and cfg.dtype == "auto" else cfg.dtype, device)
    path = resolve(str(cfg.model))
    hook = None
    if cfg.method == "qlora":
        from weightsmith.quant.nf4 import quantize_on_load

        hook = quantize_on_load()
    loaded = load_checkpoint(path, device=device, dtype=dtype, decode_layout=False, on_tensor=hook)
    train_rows, valid_rows, data_stats = load_data(cfg, loaded.tokenizer)  # all checks before any write
    out.mkdir(parents=True, exist_ok=True)
    if resume_from is None:
        dump_config_yaml(cfg, out / "config.yaml")
        (out / "metrics.jsonl").unlink(missing_ok=True)
    model = loaded.model
    prepared = METHODS[cfg.method](model, cfg, str(cfg.model), resume_from)
    gc = cfg.train.gradient_checkpointing
    trainer = Trainer(
        model,
        lambda m, b: sft_loss(m, b, checkpoint=gc),
        train_rows,
        valid_rows,
        cfg.train,
        out,
        save_weights=prepared.save_weights,
        pad_id=pad_id_for(loaded.tokenizer),
        device=device,
        reporter=reporter,
    )
    if resume_from is not None:
        trainer.resume(resume_from)
    counts = _parameter_counts(model)
    log.info("training %d of %d parameters (%s)", counts["trainable"], counts["total"], cfg.method)
    started = time.time()
    final = trainer.fit()
    _write_outputs(cfg, model, loaded, prepared, out)
    result = {
        "out": str(out),
        "method": cfg.method,
        "steps": trainer.state.step,
        "metrics": final,
        "initial_val_loss": trainer.initial.get("val_loss"),
        "data": data_stats,
        "parameters": counts,
        "seconds": round(time.time() - started, 1),
    }
    _write_lineage(cfg, path, result, out)
    return result


def _parameter_counts(model: nn.Module) -> dict[str, int]:
    params = list(model.parameters())
    return {
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "total": sum(p.numel() for p in params),
    }


def _write_outputs(cfg: FinetuneConfig, model: nn.Module, loaded: Any, prepared: Prepared, out: Path) -> None:
    if cfg.method == "full":
        from weightsmith.checkpoint.save import save_hf_dir

        save_hf_dir(
            model, loaded.tokenizer, out / "model", generation_config=loaded.generation_config, overwrite=True
        )
    else:
        prepared.save_weights(out)
    from weightsmith.report.loss_curve import plot_loss_curve

    plot_loss_curve(out / "metrics.jsonl", out / "loss.png", title=f"{cfg.model} · {cfg.method}")


def _write_lineage(cfg: FinetuneConfig, model_path: Path, result: dict[str, Any], out: Path) -> None:
    """What produced this output: base model, data hashes, code version, final metrics."""
    data = {name: _sha256(Path(p)) for name, p in (("data", cfg.data), ("valid", cfg.valid)) if p}
    write_json_atomic(
        out / "run.json",
        {
            "weightsmith": __version__,
            "base_model": {"name": cfg.model, "path": str(model_path)},
            "data_sha256": data,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **result,
        },
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
