"""What every training command shares: the run's config fields, the methods (LoRA, QLoRA,
full), `--resume`, loading the model, the loop (`make_trainer`) and what a run leaves in OUT.

Each command (sft.py, dpo.py, kto.py, reward_model.py, grpo.py, distill.py) is a `RunConfig`
subclass, a data reader and a loss on top of this module and the one loop (loop.py). A run
writes into OUT the resolved `config.yaml` (first), `metrics.jsonl`, `checkpoints/`, then the
PEFT adapter or, for full fine-tuning, an HF checkpoint in `OUT/model`, `loss.png` and `run.json`
(base model, sha256 of the data and of any `NAME.meta.json` beside it, code version, metrics).

Not here: the loop (loop.py), data formats (data.py, preference_data.py), losses (losses.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from weightsmith import __version__
from weightsmith.config import dump_config_yaml, load_config_yaml, opt
from weightsmith.device import pick_device, train_dtype
from weightsmith.errors import UsageError
from weightsmith.files import write_json_atomic
from weightsmith.lineage import file_sha256
from weightsmith.lineage import write_lineage as record_lineage
from weightsmith.lora import LoraConfig, apply_lora, load_adapter, save_adapter
from weightsmith.preference_pairs import meta_path
from weightsmith.train import checkpoints as ckpt
from weightsmith.train.distributed import (
    DistOptions,
    World,
    check_batch,
    join,
    launch,
    leave,
    name_rank,
    should_launch,
)
from weightsmith.train.loop import Trainer, TrainOptions, use_bf16

if TYPE_CHECKING:
    from weightsmith.checkpoint.load import Checkpoint
    from weightsmith.tokenizer import Tokenizer

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
    dora: bool = opt(False, "DoRA: also train a magnitude per output row (PEFT's use_dora)")
    target_parameters: list[str] = opt(
        [], "MoE parameters to adapt by PEFT's names (experts.gate_up_proj,experts.down_proj,gate.weight)"
    )

    def to_config(self) -> LoraConfig:
        targets: list[str] | str = list(self.target_modules)
        if targets == ["all-linear"]:
            targets = "all-linear"
        cfg = LoraConfig(
            r=self.rank, alpha=self.alpha, dropout=self.dropout, target_modules=targets, use_rslora=self.rslora,
            use_dora=self.dora, target_parameters=list(self.target_parameters) or None,
        )  # fmt: skip
        cfg.validate()
        return cfg


@dataclass(kw_only=True)
class RunConfig:
    """The fields every training command has: model, data, method, output, device, loop, LoRA."""

    command: ClassVar[str] = "train"  # the command's name (finetune, dpo): its lineage kind

    model: str | None = opt(None, "catalog or store name, HF directory, or .gguf file", positional=True)
    data: str | None = opt(None, "training data (JSONL)")
    valid: str | None = opt(None, "validation JSONL; without it, --valid-fraction of --data is held out")
    valid_fraction: float = opt(0.1, "fraction of --data held out for validation when --valid is not given")
    method: Literal["lora", "qlora", "full"] | None = opt(
        None, "what to train: lora (when not given), qlora or full; a resumed run keeps its own"
    )
    out: str | None = opt(None, "output directory for the run")
    resume: str | None = opt(None, "continue the run in this directory from its latest checkpoint")
    max_seq_len: int = opt(1024, "truncate examples to this many tokens")
    device: str = opt("auto", "cpu, cuda, cuda:N, mps or auto")
    dtype: str = opt("auto", "base weight dtype: fp32, bf16, fp16 or auto")
    overwrite: bool = opt(False, "start afresh even if OUT already holds a run")
    json: bool = opt(False, "print the final metrics as JSON")
    train: TrainOptions = opt(default_factory=TrainOptions)
    lora: LoraOptions = opt(default_factory=LoraOptions)
    dist: DistOptions = opt(default_factory=DistOptions, flatten=True)


# ----- methods: what is trained ---------------------------------------------------------------------


@dataclass
class Prepared:
    """A model set up for one method, and how to save what it trains (checkpoints), and, where
    the run's output differs from the method's (a reward model's), how to write that."""

    save_weights: Callable[[Path], None]
    final: Callable[[Path], None] | None = None


def _prepare_lora(model: nn.Module, cfg: RunConfig, base_name: str, resume_from: Path | None) -> Prepared:
    if cfg.method == "qlora":
        from weightsmith.quant.nf4 import quantize_linears_nf4

        quantize_linears_nf4(model)
    lora_cfg = cfg.lora.to_config()
    if resume_from is None:
        apply_lora(model, lora_cfg)
    else:  # a reward model's checkpoints hold its score head too (reward_model.py restores it)
        load_adapter(model, resume_from, reward=cfg.command == "reward")
    _float32_trainables(model)
    return Prepared(lambda d: save_adapter(model, d, lora_cfg, base_model=base_name))


def _prepare_full(model: nn.Module, cfg: RunConfig, base_name: str, resume_from: Path | None) -> Prepared:
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
METHODS: dict[str, Callable[[nn.Module, RunConfig, str, Path | None], Prepared]] = {
    "lora": _prepare_lora,
    "qlora": _prepare_lora,
    "full": _prepare_full,
}


def prepare(
    model: nn.Module, cfg: RunConfig, resume_from: Path | None, world: World, device: torch.device
) -> Prepared:
    """METHODS[cfg.method], then, for --strategy fsdp on several ranks, `fully_shard`. An fsdp
    run's checkpoints are DCP shards that the loop restores (weights included)."""
    from weightsmith.train import fsdp

    if resume_from is not None and fsdp.is_sharded_checkpoint(resume_from):
        resume_from = None  # fresh trainable parts; Trainer.resume loads the shards into them
    prepared = METHODS[cfg.method](model, cfg, str(cfg.model), resume_from)
    if world.sharded:
        fsdp.shard_model(model, device=device, cpu_offload=cfg.dist.cpu_offload)
    return prepared


# ----- starting a run -------------------------------------------------------------------------------


def resolve_config(cfg: RunConfig, command: str) -> RunConfig:
    """With --resume, the run's own config.yaml; otherwise check the flags."""
    if cfg.resume:
        saved = Path(cfg.resume) / "config.yaml"
        if not saved.is_file():
            raise UsageError(
                f"{saved}: not found; --resume takes the OUT directory of an earlier {command} run"
            )
        if (Path(cfg.resume) / "run.json").exists():
            raise UsageError(f"{cfg.resume}: this run already finished (see its run.json); nothing to resume")
        resumed = load_config_yaml(type(cfg), saved)
        resumed.method = resumed.method or "lora"
        check_resume_flags(cfg, resumed, saved)
        resumed.resume, resumed.out, resumed.json = cfg.resume, cfg.resume, cfg.json
        # how many processes and how long they wait may change between runs; the strategy may not
        resumed.dist.nproc_per_node, resumed.dist.dist_timeout = (
            cfg.dist.nproc_per_node,
            cfg.dist.dist_timeout,
        )
        return resumed
    missing = [
        flag for flag, value in (("MODEL", cfg.model), ("--data", cfg.data), ("--out", cfg.out)) if not value
    ]
    if missing:
        raise UsageError(f"missing {', '.join(missing)}: {command} needs a model, --data FILE and --out DIR")
    out = Path(cfg.out)
    if (out / "config.yaml").exists() and not cfg.overwrite:
        raise UsageError(
            f"{out} already holds a run; continue it with --resume {out}, or pass --overwrite to start afresh"
        )
    return cfg if cfg.method else dataclasses.replace(cfg, method="lora")


def check_resume_flags(cfg: RunConfig, resumed: RunConfig, saved: Path) -> None:
    """A resumed run trains what it started with: a model, data or method given with --resume
    must be the saved one (giving the same is harmless)."""
    for flag, field in (("MODEL", "model"), ("--data", "data"), ("--valid", "valid"), ("--method", "method")):
        given, kept = getattr(cfg, field), getattr(resumed, field)
        if given is None or _same(field, given, kept):
            continue
        raise UsageError(
            f"--resume {cfg.resume}: {flag} {given} differs from the run's {field} {kept} (in {saved}); "
            f"drop {flag} to continue that run, or start a new run with another --out"
        )


def _same(field: str, given: str, kept: str | None) -> bool:
    if kept is None or given == kept:
        return given == kept
    if field == "method":
        return False
    return Path(given).expanduser().resolve() == Path(kept).expanduser().resolve()


def run_on_ranks(
    cfg: RunConfig, command: str, body: Callable[[Any, World], dict[str, Any]]
) -> dict[str, Any]:
    """`body(cfg, world)` in this process, or, with --nproc-per-node, in that many processes
    started through torch.distributed.run (the result is then rank 0's, from OUT/run.json).
    The flags are checked here first, so bad input stops before any process starts."""
    resolved = resolve_config(cfg, command)
    if should_launch(cfg.dist):
        assert cfg.dist.nproc_per_node is not None
        check_batch(resolved.train.batch_size, cfg.dist.nproc_per_node)
        launch(cfg, command)
        return json.loads((Path(str(resolved.out)) / "run.json").read_text(encoding="utf-8"))
    world = join(resolved.dist, resolved.train.batch_size, cfg.device)
    try:
        return body(cfg, world)
    except Exception as e:
        named = name_rank(e, world)
        if named is e:
            raise
        raise named from e
    finally:
        leave()


def start_run(cfg: RunConfig, command: str) -> tuple[Any, Path, Path | None]:
    """(the resolved config, OUT, the checkpoint to resume from or None); seeds torch."""
    cfg = resolve_config(cfg, command)
    out = Path(cfg.out)
    resume_from = None
    if cfg.resume:
        resume_from = ckpt.latest_checkpoint(out / "checkpoints")
        if resume_from is None:
            raise ckpt.ResumeError(f"{out}/checkpoints: no checkpoint to resume from; start the run again")
    torch.manual_seed(cfg.train.seed)
    return cfg, out, resume_from


def load_model(cfg: RunConfig, path: Path) -> tuple[Checkpoint, torch.device]:
    """The checkpoint at `path` on the run's device; QLoRA quantizes each linear as it loads."""
    from weightsmith.checkpoint.load import load_checkpoint

    device = pick_device(cfg.device)
    autocast = use_bf16(cfg.train.precision, device)
    dtype = train_dtype(cfg.dtype, device, full=cfg.method == "full", autocast=autocast)
    hook = None
    if cfg.method == "qlora":
        from weightsmith.quant.nf4 import quantize_on_load

        hook = quantize_on_load()
    return load_checkpoint(path, device=device, dtype=dtype, decode_layout=False, on_tensor=hook), device


def load_tokenizer(path: Path) -> Tokenizer | None:
    """The checkpoint's tokenizer alone, so data can be checked before the weights load (None
    where `path` is not a checkpoint: loading the model then says what is wrong)."""
    from weightsmith.tokenizer import Tokenizer

    if path.is_dir() and (path / "config.json").is_file():
        return Tokenizer.from_dir(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        from weightsmith.checkpoint import gguf
        from weightsmith.checkpoint.gguf_tokenizer import build_gguf_tokenizer

        reader = gguf.open_gguf(path)
        return Tokenizer.from_config(build_gguf_tokenizer(reader), gguf.read_gguf(reader).tokenizer_config)
    return None


def read_and_tokenize(
    cfg: RunConfig,
    read: Callable[[str], list],
    tokenize: Callable[[list], tuple[list, Any]],
    warn: Callable[[str, Any, int], None],
) -> tuple[tuple[list, Any], tuple[list, Any]]:
    """(items, stats) of the training and validation data: `read` each file (every line checked
    first), hold out `--valid-fraction` of --data when there is no --valid, then `tokenize`
    each part and `warn` about what was cut."""
    from weightsmith.train.data import split_records

    records = read(str(cfg.data))
    valid_records = read(cfg.valid) if cfg.valid else []
    if not cfg.valid and cfg.valid_fraction > 0:
        records, valid_records = split_records(records, cfg.valid_fraction, cfg.train.seed)
    parts = []
    for name, part in (("training", records), ("validation", valid_records)):
        items, stats = tokenize(part)
        warn(name, stats, cfg.max_seq_len)
        parts.append((items, stats))
    return parts[0], parts[1]


def warn_truncated(
    name: str, items: str, count: int, max_seq_len: int, longest: int, max_prompt_len: int | None = None
) -> None:
    if count:
        limit = f"max_seq_len={max_seq_len}"
        if max_prompt_len is not None:
            limit += f" or have a prompt longer than max_prompt_len={max_prompt_len}"
        log.warning(
            "%d %s %s are longer than %s (longest %d tokens) and were truncated",
            count, name, items, limit, longest,
        )  # fmt: skip


def load_data_and_model(
    cfg: RunConfig, load: Callable[[Any, Any], tuple]
) -> tuple[Path, Any, torch.device, tuple]:
    """The model's path, its loaded checkpoint and device, and `load(cfg, tokenizer)`'s data,
    read and checked before the weights load wherever the tokenizer loads alone."""
    from weightsmith.checkpoint.pull import resolve

    path = resolve(str(cfg.model))
    tokenizer = load_tokenizer(path)
    data = load(cfg, tokenizer) if tokenizer is not None else None
    loaded, device = load_model(cfg, path)
    return path, loaded, device, data if data is not None else load(cfg, loaded.tokenizer)


# fmt: off
def make_trainer(
    cfg: RunConfig, model: nn.Module, loss_fn: Any, sources: tuple[Any, Any], out: Path, prepared: Prepared,
    device: torch.device, reporter: Any, world: World, **options: Any,
) -> Trainer:
    # fmt: on
    """The loop for a run: `loss_fn` over the (training, validation) `sources`, cfg's loop options,
    saving what `prepared` trains; `options` as `Trainer` takes them (perplexity, iterations)."""
    return Trainer(
        model, loss_fn, *sources, cfg.train, out, save_weights=prepared.save_weights, device=device,
        reporter=reporter, command=cfg.command, world=world, **options,
    )  # fmt: skip


def begin_outputs(cfg: RunConfig, out: Path, resume_from: Path | None, world: World | None = None) -> None:
    """OUT exists; a fresh run writes its config.yaml first and starts a new metrics.jsonl
    (rank 0, once every rank has checked its input)."""
    world = world or World()
    world.barrier()
    if not world.is_main:
        return
    out.mkdir(parents=True, exist_ok=True)
    if resume_from is None:
        dump_config_yaml(cfg, out / "config.yaml")
        (out / "metrics.jsonl").unlink(missing_ok=True)
        (out / "lineage.json").unlink(missing_ok=True)  # an earlier run's record no longer holds


# ----- training and finishing a run -----------------------------------------------------------------


def fit_and_save(
    cfg: RunConfig,
    trainer: Trainer,
    loaded: Any,
    prepared: Prepared,
    *,
    model_path: Path,
    resume_from: Path | None,
    data_stats: dict[str, Any],
    inputs: dict[str, Any] | None = None,
    **facts: Any,
) -> dict[str, Any]:
    """Train (from `resume_from`'s state, if given), write the outputs and lineage, and return
    the result: where, what, steps, final metrics, data and parameter counts, and `facts`.
    `inputs` adds lineage inputs (role -> paths) to the model and data."""
    if resume_from is not None:
        trainer.resume(resume_from)
    model = loaded.model
    counts = parameter_counts(model)
    weights = next((p.dtype for p in model.parameters() if not p.requires_grad), torch.float32)
    log.info(
        "training %d of %d parameters (%s; base weights %s%s)", counts["trainable"], counts["total"], cfg.method,
        str(weights).removeprefix("torch."), ", bf16 autocast" if use_bf16(cfg.train.precision, trainer.device) else "",
    )  # fmt: skip
    started = time.time()
    final = trainer.fit()
    out = trainer.out
    from weightsmith.train.fsdp import gathered

    with gathered(model, trainer.world):  # FSDP: every rank takes part in the gather
        if trainer.world.is_main:
            write_outputs(cfg, model, loaded, prepared, out)
    result = {
        "out": str(out),
        "method": cfg.method,
        **facts,
        "steps": trainer.state.step,
        "metrics": final,
        "initial_val_loss": trainer.initial.get("val_loss"),
        "data": data_stats,
        "parameters": counts,
        "seconds": round(time.time() - started, 1),
    }
    if trainer.world.is_main:
        write_lineage(cfg, model_path, result, out)
        record_lineage(
            out, kind=cfg.command, config=cfg, started=started, device=cfg.device, exclude=("checkpoints",),
            inputs={"model": cfg.model, "data": cfg.data, "valid": cfg.valid, **(inputs or {})},
            metrics={"steps": trainer.state.step, **final},
        )  # fmt: skip
    trainer.world.barrier()
    return result


def parameter_counts(model: nn.Module) -> dict[str, int]:
    params = list(model.parameters())
    return {
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "total": sum(p.numel() for p in params),
    }


def write_outputs(cfg: RunConfig, model: nn.Module, loaded: Any, prepared: Prepared, out: Path) -> None:
    """The adapter (or, for full fine-tuning, an HF checkpoint in OUT/model) and loss.png."""
    if prepared.final is not None:
        prepared.final(out)
    elif cfg.method == "full":
        from weightsmith.checkpoint.save import save_hf_dir

        save_hf_dir(
            model, loaded.tokenizer, out / "model", generation_config=loaded.generation_config, overwrite=True
        )
    else:
        prepared.save_weights(out)
    from weightsmith.report.loss_curve import plot_loss_curve

    plot_loss_curve(out / "metrics.jsonl", out / "loss.png", title=f"{cfg.model} · {cfg.method}")


def write_lineage(cfg: RunConfig, model_path: Path, result: dict[str, Any], out: Path) -> None:
    """What produced this output: base model, data hashes (and their meta files), code version,
    final metrics."""
    files = {name: Path(p) for name, p in (("data", cfg.data), ("valid", cfg.valid)) if p}
    metas = {name: m for name, p in files.items() if (m := data_meta(p)) is not None}
    write_json_atomic(
        out / "run.json",
        {
            "weightsmith": __version__,
            "base_model": {"name": cfg.model, "path": str(model_path)},
            "data_sha256": {name: file_sha256(p) for name, p in files.items()},
            **({"data_meta": metas} if metas else {}),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **result,
        },
    )


def data_meta(path: Path) -> dict[str, Any] | None:
    """The meta file beside a data file: its path, sha256 and (when it is JSON) its content."""
    meta = meta_path(path)
    if not meta.is_file():
        return None
    try:
        content: Any = json.loads(meta.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        content = None  # recorded by hash only
    return {"path": str(meta), "sha256": file_sha256(meta), "content": content}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
