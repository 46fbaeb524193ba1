"""Knowledge distillation: the `distill` command.

A student model learns a teacher's next-token distributions on your data: at every target
token of a `finetune` data file (chat, instruction or text; packing and `--train-on-prompt`
as there) the student's logits are pulled toward the teacher's by a divergence
(distill_loss.py: forward KL, reverse KL or GKD's generalized JSD, at a temperature), mixed
with the plain cross-entropy on the data's own tokens by `--kd-ratio`. Teacher and student
must share one tokenizer (their vocabularies are compared token by token before anything
loads); the teacher may be larger, quantized (a GGUF file), or a fork with a LoRA adapter
(`--teacher-adapter`, folded into its weights).

The same run as `finetune` (runs.py: LoRA, QLoRA or full, resume, outputs, lineage; loop.py):
the teacher is loaded once, frozen, beside the student, and runs without gradients before
the student's forward in each micro-batch, its hidden states kept only at target positions;
the student's LM head and the loss are fused and chunked (`distill_loss.linear_distill`).

Two other ways to run it: `--on-policy F` has a share F of the micro-batches answered by the
student itself and scored by the teacher (GKD; distill_data.py), and `--precompute-teacher K`
stores the teacher's top K at every answer token once, so no step runs it (distill_topk.py).

Metrics per step and on validation (`val_...`): the loss, `kd` (the divergence, per target
token), `nll` (the student's cross-entropy on the data) and `teacher_nll` (the teacher's):
the gap between the last two is what distillation closes. The teacher is a lineage input.

Not here: the losses (distill_loss.py), the loop (loop.py), SFT data (data.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from weightsmith.config import opt
from weightsmith.errors import ConfigError
from weightsmith.train.checkpoints import ResumeError
from weightsmith.train.data import IGNORE, Batch, RowSource, pad_id_for
from weightsmith.train.distill_data import (
    DistillSource,
    SampledBatch,
    Sampler,
    read_prompted,
    tokenize_prompted,
)
from weightsmith.train.distill_loss import DIVERGENCES, DistillSpec, linear_distill, token_losses
from weightsmith.train.distill_topk import TOPK_FILE, TaughtBatch, TaughtSource, fill_top_k, stored_vocab
from weightsmith.train.distributed import World
from weightsmith.train.loop import Reporter, use_bf16
from weightsmith.train.metric_sums import Mean
from weightsmith.train.runs import (
    begin_outputs,
    fit_and_save,
    load_data_and_model,
    load_tokenizer,
    make_trainer,
    prepare,
    read_and_tokenize,
    run_on_ranks,
    start_run,
)
from weightsmith.train.sft import FinetuneConfig, load_data, warn_about

__all__ = ["DistillConfig", "DistillObjective", "check_tokenizers", "run_distill"]

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class DistillConfig(FinetuneConfig):
    """Distil a teacher model into a student: learn its token distributions on your data."""

    command: ClassVar[str] = "distill"

    teacher: str | None = opt(
        None, "the teacher: catalog or store name, HF directory or .gguf file, with the student's tokenizer"
    )
    teacher_adapter: str | None = opt(None, "a LoRA adapter to fold into the teacher (a fine-tuned fork)")
    teacher_keep_quantized: bool = opt(
        False, "run a .gguf teacher from its quantized blocks (CPU kernels: a 4-bit teacher in a quarter of "
        "the memory, at some speed) instead of dequantizing it"
    )  # fmt: skip
    loss: str = opt(
        "forward_kl",
        "divergence: forward_kl (KL(teacher||student), classic distillation), reverse_kl (KL(student||teacher), "
        "mode-seeking), jsd (GKD's generalized Jensen-Shannon, mixture weight --beta)",
        choices=DIVERGENCES,
    )
    beta: float = opt(0.5, "jsd's weight of the teacher in the mixture (0: forward KL, 1: reverse KL)")
    temperature: float = opt(1.0, "divide both models' logits by this before comparing them")
    kd_ratio: float = opt(
        0.5, "the divergence's share of each token's loss; the rest is cross-entropy on the data (1: pure KD)"
    )
    on_policy: float = opt(
        0.0, "share of micro-batches whose answers the student samples itself for the teacher to score (GKD's "
        "lambda; 1: on-policy distillation, prompts alone suffice)"
    )  # fmt: skip
    max_completion_len: int = opt(128, "--on-policy: the most tokens the student samples for an answer")
    sample_temperature: float = opt(1.0, "--on-policy: the student's sampling temperature")
    precompute_teacher: int = opt(
        0, "compute the teacher's top K tokens at every target once, before training, into OUT: the teacher then "
        "leaves memory and no step runs it (--loss forward_kl; 0: the teacher runs every step)", metavar="K"
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.loss not in DIVERGENCES:
            raise ConfigError(f"--loss {self.loss!r}: unknown; choose one of {', '.join(DIVERGENCES)}")
        if not 0 <= self.beta <= 1:
            raise ConfigError(f"--beta {self.beta}: must be between 0 and 1")
        if not 0 < self.temperature <= 100:
            raise ConfigError(f"--temperature {self.temperature}: must be above 0 and at most 100")
        if not 0 < self.kd_ratio <= 1:
            raise ConfigError(
                f"--kd-ratio {self.kd_ratio}: must be above 0 and at most 1 (0 would be `weightsmith finetune`)"
            )
        if not 0 <= self.on_policy <= 1:
            raise ConfigError(
                f"--on-policy {self.on_policy}: must be between 0 and 1 (a share of micro-batches)"
            )
        if self.on_policy and self.packing:
            raise ConfigError("--packing: an on-policy row holds one prompt and its sampled answer; drop one")
        if self.on_policy and not 1 <= self.max_completion_len < self.max_seq_len:
            raise ConfigError(
                f"--max-completion-len {self.max_completion_len}: must be at least 1 and below --max-seq-len "
                f"{self.max_seq_len}"
            )
        if not self.sample_temperature > 0:
            raise ConfigError(f"--sample-temperature {self.sample_temperature}: must be above 0")
        if self.precompute_teacher < 0 or (
            self.precompute_teacher and (self.loss != "forward_kl" or self.on_policy)
        ):
            raise ConfigError(
                f"--precompute-teacher {self.precompute_teacher}: keeps the teacher's top K tokens of the data's own "
                "answers (K at least 1), so it takes --loss forward_kl (the one divergence defined on them) and no "
                "--on-policy"
            )
        if self.beta != 0.5 and self.loss != "jsd":
            raise ConfigError(f"--beta applies to --loss jsd, not {self.loss}; drop it")

    def spec(self) -> DistillSpec:
        return DistillSpec(self.loss, self.beta, self.temperature, self.kd_ratio)


# ----- the loss -----------------------------------------------------------------------------------


@dataclass
class DistillObjective:
    """The loop's loss function: (summed token loss, target tokens, summed metrics). The teacher
    runs first, without gradients, and keeps its hidden states only where a loss is taken."""

    teacher: nn.Module | None  # None: every batch carries its teacher top K (--precompute-teacher)
    spec: DistillSpec
    vocab: int  # the logit columns both models share (both tokenizers' ids are below it)
    checkpoint: bool = False

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        keep = batch.labels != IGNORE
        targets = batch.labels[keep]
        teacher = self._teacher(batch, keep)

        hidden = model.hidden_states(
            batch.inputs, positions=batch.positions, documents=batch.documents, checkpoint=self.checkpoint
        )[keep]  # (N, h)
        head = model.lm_head
        if isinstance(head, nn.Linear) and head.bias is None:
            normed = model.model.norm(hidden)
            cap = model.config.final_logit_softcapping  # Gemma's, applied per chunk
            total, stats = linear_distill(normed, head.weight[: self.vocab], teacher, targets, self.spec, cap)
        else:  # an adapted or quantized head: the plain way
            logits = model.logits(hidden)[:, : self.vocab].float()
            losses, stats = token_losses(logits, teacher(0, len(targets)), targets, self.spec)
            total = losses.sum()
        if isinstance(batch, TaughtBatch) and batch.teacher_nll is not None:
            stats[2] = batch.teacher_nll  # over the teacher's whole vocabulary, not its top K
        sums = stats.sum(1)
        metrics: dict[str, Any] = {"kd": sums[0], "nll": sums[1], "teacher_nll": sums[2]}
        if isinstance(batch, SampledBatch):  # --on-policy: the share of micro-batches the student answered
            rows = batch.inputs.shape[0]
            metrics["on_policy"] = Mean(batch.sampled, 1)
            metrics["completion_len"] = Mean(batch.completion_tokens, rows if batch.sampled else 0)
        return total, len(targets), metrics

    def _teacher(self, batch: Batch, keep: torch.Tensor) -> Any:
        """The teacher's fp32 logits of targets [start, stop): from the batch's top K, or by running
        the teacher (first, without gradients, keeping its hidden states only at the targets)."""
        if isinstance(batch, TaughtBatch) and batch.teacher_ids is not None:
            return lambda start, stop: batch.dense(start, stop, self.vocab)
        assert self.teacher is not None
        teacher = self.teacher
        with torch.no_grad():
            taught = teacher.hidden_states(
                batch.inputs, positions=batch.positions, documents=batch.documents
            )[keep]

        def logits(start: int, stop: int) -> torch.Tensor:
            with torch.no_grad():
                return teacher.logits(taught[start:stop])[:, : self.vocab].float()

        return logits


# ----- the command --------------------------------------------------------------------------------


def check_tokenizers(student: Any, teacher: Any, where: str) -> None:
    """Distillation compares distributions over token ids: every id both tokenizers have must be
    the same token in each (ids past the smaller one, such as a GGUF file's padding tokens up to
    its embedding's rows, are left to the heads' shared width). Refused in one line naming the
    first difference."""
    vocabs = [t.backend.get_vocab(with_added_tokens=True) for t in (student, teacher)]
    shared = min(map(len, vocabs))
    mine, theirs = ({token: i for token, i in v.items() if i < shared} for v in vocabs)
    if mine == theirs:
        return
    differ = sorted(set(mine.items()) ^ set(theirs.items()), key=lambda item: (item[1], item[0]))
    token, index = differ[0]
    say = f"token {token!r} is id {mine[token]} in the student's" if token in mine else ""
    say = say or f"token {token!r} (id {index}) is not in the student's"
    raise ConfigError(
        f"--teacher {where}: its tokenizer differs from the student's ({len(vocabs[0])} and {len(vocabs[1])} "
        f"tokens; {say}); distillation needs one tokenizer for both (for another tokenizer, distil its "
        "answers: weightsmith synth answer, then finetune)"
    )


def _load_teacher(cfg: DistillConfig, path: Path, device: torch.device, tokenizer: Any) -> nn.Module:
    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.device import train_dtype
    from weightsmith.lora import load_adapter, merge_and_unload

    autocast = use_bf16(cfg.train.precision, device)
    dtype = train_dtype(cfg.dtype, device, full=False, autocast=autocast)
    keep = cfg.teacher_keep_quantized
    if keep and device.type != "cpu":
        raise ConfigError(f"--teacher-keep-quantized: the quantized kernels run on the CPU, not on {device}")
    loaded = load_checkpoint(path, device=device, dtype=dtype, decode_layout=False, keep_quantized=keep)
    check_tokenizers(tokenizer, loaded.tokenizer, str(cfg.teacher))
    model = loaded.model
    if cfg.teacher_adapter:
        load_adapter(model, Path(cfg.teacher_adapter))
        if not keep:  # over kept blocks the adapter stays apart, added to each block layer's output
            merge_and_unload(model)
    return model.requires_grad_(False).eval()


def _shared_vocab(student: nn.Module, teacher: nn.Module, tokenizer: Any, where: str) -> int:
    """The logit columns to compare: both heads' rows up to the smaller one (checkpoints pad
    their vocabularies differently), which must hold every token id."""
    rows = [int(m.lm_head.weight.shape[0]) for m in (student, teacher)]
    vocab = min(rows)
    if tokenizer.vocab_size > vocab:
        raise ConfigError(
            f"--teacher {where}: its LM head has {rows[1]} rows and the student's {rows[0]}, fewer than the "
            f"tokenizer's {tokenizer.vocab_size} ids; the two models cannot be compared token by token"
        )
    return vocab


def load_sources(cfg: DistillConfig, tokenizer: Any) -> tuple[Any, Any, dict[str, Any]]:
    """The training and validation sources and data stats: finetune's rows, or with --on-policy
    prompts and their answers (distill_data.py); every line checked before the model loads."""
    pad = pad_id_for(tokenizer)
    if not cfg.on_policy:
        train_rows, valid_rows, stats = load_data(cfg, tokenizer)
        kind = TaughtSource if cfg.precompute_teacher else RowSource
        return kind(train_rows, pad), kind(valid_rows, pad), stats
    kwargs = {"max_seq_len": cfg.max_seq_len, "max_completion_len": cfg.max_completion_len,
              "train_on_prompt": cfg.train_on_prompt}  # fmt: skip
    (train, train_stats), (valid, valid_stats) = read_and_tokenize(
        cfg,
        lambda path: read_prompted(path, cfg.on_policy),
        lambda part: tokenize_prompted(part, tokenizer, **kwargs),
        warn_about,
    )
    stats = {"train": train_stats.to_dict(), "valid": valid_stats.to_dict()}
    return DistillSource(train, pad, cfg.on_policy), DistillSource(valid, pad, 0.0), stats


def _ready_teacher(
    cfg: DistillConfig,
    path: Path,
    loaded: Any,
    device: torch.device,
    run: tuple[Path, Path | None],
    sources: dict[str, Any],
    world: World,
) -> tuple[nn.Module | None, int]:
    """The teacher, loaded and checked, and the logit columns both models share; then OUT is
    begun. With --precompute-teacher its top K are filled into the sources (computed, or read back
    on resume) and the teacher is let go (None)."""
    out, resume_from = run
    k = cfg.precompute_teacher
    top_k = lambda teacher, vocab: fill_top_k(  # noqa: E731
        teacher, sources, out, resume_from, k=k, vocab=vocab, batch_size=cfg.train.batch_size, device=device,
        precision=cfg.train.precision, world=world,
    )  # fmt: skip
    if k and resume_from is not None:  # the table, read back: no teacher at all
        vocab = stored_vocab(out)
        if vocab is None:
            raise ResumeError(
                f"{out}/{TOPK_FILE}: missing or unreadable; the run used --precompute-teacher, start it again"
            )
        begin_outputs(cfg, out, resume_from, world)
        top_k(None, vocab)
        return None, vocab
    with torch.random.fork_rng(devices=[]):  # a teacher adapter's loading draws nothing the run draws
        teacher = _load_teacher(cfg, path, device, loaded.tokenizer)
    vocab = _shared_vocab(loaded.model, teacher, loaded.tokenizer, str(cfg.teacher))
    if k > vocab:
        raise ConfigError(f"--precompute-teacher {k}: more than the {vocab} tokens the two models share")
    begin_outputs(cfg, out, resume_from, world)
    if not k:
        return teacher, vocab
    top_k(teacher, vocab)
    return None, vocab  # the teacher leaves memory before the student trains


def run_distill(cfg: DistillConfig, *, reporter: Reporter | None = None) -> dict[str, Any]:
    """Distil as `cfg` says, here or on --nproc-per-node processes; the run's result
    (`run_finetune`'s shape, plus the loss and the teacher)."""
    return run_on_ranks(cfg, "distill", lambda c, world: _distill(c, world, reporter))


def _distill(cfg: DistillConfig, world: World, reporter: Reporter | None) -> dict[str, Any]:
    from weightsmith.checkpoint.pull import resolve

    cfg, out, resume_from = start_run(cfg, "distill")
    if not cfg.teacher:
        raise ConfigError(
            "--teacher is required: the model to learn from (a store name, folder or .gguf file)"
        )
    teacher_path = resolve(str(cfg.teacher))
    teacher_tokenizer = load_tokenizer(teacher_path)

    def load(c: DistillConfig, tokenizer: Any) -> tuple:
        if teacher_tokenizer is not None:  # before any weights load, where the tokenizers load alone
            check_tokenizers(tokenizer, teacher_tokenizer, str(cfg.teacher))
        return load_sources(c, tokenizer)

    path, loaded, device, (train, valid, data_stats) = load_data_and_model(cfg, load)
    sources = {"train": train, "valid": valid}
    teacher, vocab = _ready_teacher(cfg, teacher_path, loaded, device, (out, resume_from), sources, world)
    model = loaded.model
    prepared = prepare(model, cfg, resume_from, world, device)
    objective = DistillObjective(teacher, cfg.spec(), vocab, cfg.train.gradient_checkpointing)
    trainer = make_trainer(
        cfg, model, objective, (train, valid), out, prepared, device, reporter, world, perplexity=False
    )
    if cfg.on_policy:
        sampler = Sampler(model, loaded.tokenizer, cfg.max_completion_len, cfg.sample_temperature)
        seed = cfg.train.seed  # the loop counts a micro-batch before it draws it
        train.sampler = valid.sampler = sampler
        train.clock = lambda: f"{seed}/train/{trainer.state.cursor}"
        valid.clock = lambda: f"{seed}/valid/{trainer.state.step}"
    log.info("%s x %s + %s x cross-entropy, temperature %g, teacher %s", cfg.kd_ratio, cfg.loss,
             1 - cfg.kd_ratio, cfg.temperature, cfg.teacher)  # fmt: skip
    return fit_and_save(
        cfg, trainer, loaded, prepared, model_path=path, resume_from=resume_from, data_stats=data_stats,
        inputs={"teacher": cfg.teacher, "teacher_adapter": cfg.teacher_adapter}, loss=cfg.loss, teacher=str(cfg.teacher),
        teacher_top_k=cfg.precompute_teacher or None,
    )  # fmt: skip
