"""Preference training: the `dpo` command (DPO, IPO, SimPO, ORPO and the other pairwise losses of
`losses.PREFERENCE_LOSSES`).

The same run as `finetune` (runs.py: methods, resume, outputs, lineage; loop.py: the one
loop) with another batch source (pairs, preference_data.py) and another loss. A step's
loss is the mean over its pairs of `loss(beta, log-ratios)`, where a log-ratio is
log pi(answer | prompt) - log pi_ref(answer | prompt), summed over the answer's tokens.

The reference pi_ref is the model before training, obtained without a second copy where
possible: for LoRA and QLoRA it is the same model with its adapters disabled (run under
no_grad, before the policy forward, so its activations are gone before the policy's are
kept); for full fine-tuning a frozen copy of the loaded model. `--precompute-ref` instead
computes every pair's reference log-probs once, before training, and stores them in
`OUT/reference_logps.safetensors` (a resumed run reads them back): no reference forward per
step, and no copy for full fine-tuning. Both answers of a pair go through the model in one
forward, as in TRL, but as one row that holds the prompt once (an attention mask keeps the
answers apart, `preference_data.PairBatch`), and the LM head runs only where an answer token
is predicted, chunked (`losses.pair_log_probs`).

Metrics per step and on validation (`val_...`), as TRL's `DPOTrainer` logs them: the loss,
`reward_chosen` and `reward_rejected` (beta * log-ratio, means over pairs), `reward_accuracy`
(the share of pairs whose chosen reward is higher), `reward_margin`, and the policy's
`logps_chosen` / `logps_rejected`; with `--sft-weight`, `nll_chosen`.

`--sft-weight W` adds W times the chosen answers' mean token negative log-likelihood (the RPO
recipe; TRL's `loss_type=["sigmoid", "sft"]`, `loss_weights=[1, W]`): plain DPO can widen the
margin by pushing the rejected answer down while the chosen one stays unlikely, so the model
learns what not to say more than what to say.

`--loss simpo` (SimPO) and `--loss orpo` (ORPO's odds-ratio term, with the chosen answers' NLL
as its sft term, weight 1 unless --sft-weight says otherwise) need no reference: none is run,
copied or precomputed; their log-ratios are the policy's own log-probabilities and their
rewards beta x each answer's mean token log-probability.

Not here: reading pairs (preference_data.py), the loop (loop.py), printing (cli).
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from weightsmith.config import opt
from weightsmith.errors import ConfigError
from weightsmith.files import atomic_file
from weightsmith.lora import adapters_disabled
from weightsmith.train import checkpoints as ckpt
from weightsmith.train.data import pad_id_for
from weightsmith.train.distributed import World
from weightsmith.train.loop import Reporter, use_bf16
from weightsmith.train.losses import (
    PREFERENCE_LOSSES,
    REFERENCE_FREE,
    LogRatios,
    PreferenceLoss,
    discopop_loss,
    pair_log_probs,
    simpo_loss,
)
from weightsmith.train.preference_data import PairBatch, PairSource, PairStats, read_pairs, tokenize_pairs
from weightsmith.train.runs import (
    RunConfig,
    begin_outputs,
    fit_and_save,
    load_data_and_model,
    make_trainer,
    prepare,
    read_and_tokenize,
    run_on_ranks,
    start_run,
    warn_truncated,
)

__all__ = [
    "DpoConfig", "PreferenceObjective", "check_prompt_len", "choose_reference", "fill_reference", "fit_preferences",
    "load_pairs", "precompute_reference", "reference_log_probs", "run_dpo",
]  # fmt: skip

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference_logps.safetensors"


@dataclass(kw_only=True)
class DpoConfig(RunConfig):
    """Align a model with preference pairs (DPO, IPO): prefer the chosen answers, near the start model."""

    command: ClassVar[str] = "dpo"

    data: str | None = opt(None, "preference pairs: JSONL in TRL's prompt/chosen/rejected format")
    loss: str = opt(
        "dpo",
        "pairwise loss: dpo (sigmoid DPO), ipo, hinge (SLiC), robust, and TRL's sigmoid_norm, exo_pair, "
        "nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, discopop; or without a reference model: simpo, orpo",
        choices=tuple(PREFERENCE_LOSSES),
    )
    beta: float = opt(
        0.1, "how far the model may move from the reference (IPO: its tau; SimPO: its reward scale, ~2; "
        "ORPO: its lambda)"
    )  # fmt: skip
    label_smoothing: float = opt(
        0.0, "assumed share of flipped labels, for --loss dpo, robust or simpo (< 0.5)"
    )
    sft_weight: float | None = opt(
        None,
        "add this times the chosen answers' mean token NLL (RPO; TRL's loss_type [sigmoid, sft]; CPO's alpha): "
        "keeps the chosen answers likely, not only likelier than the rejected (default 0; 1 for orpo, its NLL "
        "term)",
    )
    simpo_gamma: float = opt(0.5, "SimPO's target reward margin gamma (--loss simpo)")
    discopop_tau: float = opt(0.05, "DiscoPOP's temperature tau (--loss discopop)")
    precompute_ref: bool = opt(False, "compute the reference log-probs once before training")
    max_prompt_len: int | None = opt(None, "cut prompts longer than this from the left")

    def __post_init__(self) -> None:
        if self.loss not in PREFERENCE_LOSSES:
            raise ConfigError(f"--loss {self.loss!r}: unknown; choose one of {', '.join(PREFERENCE_LOSSES)}")
        if not self.beta > 0:
            raise ConfigError(f"--beta {self.beta}: must be greater than 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"--label-smoothing {self.label_smoothing}: must be at least 0 and below 0.5")
        if self.sft_weight is None:
            self.sft_weight = 1.0 if self.loss == "orpo" else 0.0
        if not 0 <= self.sft_weight <= 100:
            raise ConfigError(f"--sft-weight {self.sft_weight}: must be between 0 and 100 (0 turns it off)")
        if self.label_smoothing and self.loss not in ("dpo", "robust", "simpo", "exo_pair"):
            raise ConfigError(
                f"--label-smoothing applies to --loss dpo, robust, simpo or exo_pair, not {self.loss}; drop it"
            )
        if self.loss == "exo_pair" and not self.label_smoothing:
            raise ConfigError(
                "--loss exo_pair needs --label-smoothing above 0 (the target's share for the rejected answer; "
                "EXO used 1e-3)"
            )
        if not self.discopop_tau > 0:
            raise ConfigError(f"--discopop-tau {self.discopop_tau}: must be greater than 0")
        if self.precompute_ref and self.loss in REFERENCE_FREE:
            raise ConfigError(f"--precompute-ref: --loss {self.loss} runs no reference model; drop it")
        check_prompt_len(self.max_prompt_len, self.max_seq_len)


def check_prompt_len(max_prompt_len: int | None, max_seq_len: int) -> None:
    if max_prompt_len is not None and not 1 <= max_prompt_len < max_seq_len:
        raise ConfigError(
            f"--max-prompt-len {max_prompt_len}: must be at least 1 and below --max-seq-len "
            f"{max_seq_len} (the answer needs room)"
        )


# ----- the loss -----------------------------------------------------------------------------------


def reference_log_probs(
    model: nn.Module, batch: PairBatch, reference: nn.Module | None = None
) -> torch.Tensor:
    """(2B,) summed answer log-probs under the reference: `reference` (a frozen copy) or, when
    None, `model` with its adapters disabled; no graph is kept."""
    with torch.no_grad():
        if reference is not None:
            return pair_log_probs(reference, batch)
        with adapters_disabled(model):
            return pair_log_probs(model, batch)


@dataclass
class PreferenceObjective:
    """The loop's loss function for pairs: (summed per-pair loss, pairs, summed metrics)."""

    loss: PreferenceLoss
    beta: float
    label_smoothing: float = 0.0
    reference: nn.Module | None = None  # a frozen copy; None: the model with adapters disabled
    checkpoint: bool = False
    sft_weight: float = 0.0  # times the chosen answers' mean token NLL, added to the mean pair loss
    reference_free: bool = False  # simpo, orpo: no reference is run; rewards are beta x mean log-probs

    def __call__(
        self, model: nn.Module, batch: PairBatch
    ) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        ref = batch.reference
        if ref is None and not self.reference_free:  # first, so its activations are freed before the policy's
            ref = reference_log_probs(model, batch, self.reference)
        policy = pair_log_probs(model, batch, checkpoint=self.checkpoint)  # (2B,)
        n, lengths = batch.n_pairs, batch.lengths
        ratio = policy if self.reference_free else policy - ref
        r = LogRatios(ratio[:n], ratio[n:], lengths[:n], lengths[n:])
        losses = self.loss(r, self.beta, self.label_smoothing)  # (B,)
        if self.reference_free:  # the implicit reward of SimPO and ORPO: beta x mean token log-prob
            ratio = ratio / lengths.clamp(min=1)
        chosen, rejected = self.beta * ratio[:n].detach(), self.beta * ratio[n:].detach()
        logps = policy.detach()
        total = losses.sum()
        if self.sft_weight:  # token mean over the batch's chosen answers, as TRL's "sft" loss; x n pairs,
            nll = -policy[:n].sum() / lengths[:n].sum().clamp(min=1)  # since the loop divides by pairs
            total = total + self.sft_weight * nll * n
        metrics = {
            "reward_chosen": chosen.sum(),
            "reward_rejected": rejected.sum(),
            "reward_accuracy": (chosen > rejected).sum(),
            "reward_margin": (chosen - rejected).sum(),
            "logps_chosen": logps[:n].sum(),
            "logps_rejected": logps[n:].sum(),
        }
        if self.sft_weight:
            metrics["nll_chosen"] = nll.detach() * n
        return total, n, metrics


def precompute_reference(
    model: nn.Module,
    source: Any,
    *,
    batch_size: int,
    device: torch.device,
    precision: str,
    reference: nn.Module | None = None,
    world: World | None = None,
) -> torch.Tensor:
    """(n, 2) reference log-probs of every item of `source`, in order: (chosen, rejected) of a
    pair (`PairSource`), (completion, KL completion) of a KTO example (`UnpairedSource`). Under
    several ranks each scores every size-th batch and the parts are gathered (each runs every
    batch when the model is sharded: FSDP's forward is collective)."""
    world = world or World()
    autocast = use_bf16(precision, device)
    was_training = model.training
    model.eval()
    parts = {}
    for start in world.share_of(len(source), batch_size, split=not world.sharded):
        batch = source.batch(range(start, min(start + batch_size, len(source))))
        batch = getattr(batch, "both", batch).to(device)  # KTO's: completion and KL completion
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            ref = reference_log_probs(model, batch, reference).float().cpu()
        n = batch.n_pairs
        parts[start] = torch.stack([ref[:n], ref[n:]], dim=1)
    model.train(was_training)
    ordered = world.gather_shares(parts, split=not world.sharded)
    return torch.cat(ordered) if ordered else torch.empty((0, 2), dtype=torch.float32)


# ----- the command --------------------------------------------------------------------------------


def load_pairs(cfg: DpoConfig, tokenizer: Any) -> tuple[PairSource, PairSource, dict[str, Any]]:
    """Read, check, render and measure every pair; nothing loads or trains if one is bad."""
    kwargs = {"max_seq_len": cfg.max_seq_len, "max_prompt_len": cfg.max_prompt_len}
    (train, train_stats), (valid, valid_stats) = read_and_tokenize(
        cfg,
        read_pairs,
        lambda part: tokenize_pairs(part, tokenizer, **kwargs),
        lambda name, stats, max_seq_len: _warn_about(name, stats, max_seq_len, cfg.max_prompt_len),
    )
    pad = pad_id_for(tokenizer)
    stats = {"train": train_stats.to_dict(), "valid": valid_stats.to_dict()}
    return PairSource(train, pad), PairSource(valid, pad), stats


def _warn_about(name: str, stats: PairStats, max_seq_len: int, max_prompt_len: int | None = None) -> None:
    warn_truncated(name, "pairs", stats.truncated, max_seq_len, stats.longest, max_prompt_len)
    if stats.prompt_mismatch:
        log.warning(
            "%d %s pairs: the prompt alone tokenizes differently from its start in prompt + answer; the "
            "answer starts where they part (as in TRL)", stats.prompt_mismatch, name,
        )  # fmt: skip


def fill_reference(
    cfg: Any,
    model: nn.Module,
    out: Path,
    resume_from: Path | None,
    sources: dict[str, Any],
    device: torch.device,
    world: World,
) -> None:
    """Fill each source's precomputed reference log-probs: computed now on a fresh run (the
    model is still the reference), read back from OUT on resume."""
    path = out / REFERENCE_FILE
    if resume_from is not None:
        if not path.is_file():
            raise ckpt.ResumeError(f"{path}: missing; the run used --precompute-ref, start it again")
        saved = load_file(str(path))
        for name, source in sources.items():
            if name in saved and saved[name].shape != (len(source), 2):
                raise ckpt.ResumeError(f"{path}: {name} does not match the data; start the run again")
            source.reference = saved.get(name, torch.empty((0, 2)))
        return
    started = time.perf_counter()
    for source in sources.values():
        source.reference = precompute_reference(
            model, source, batch_size=cfg.train.batch_size, device=device, precision=cfg.train.precision,
            world=world,
        )  # fmt: skip
    if world.is_main:  # every rank holds the same values
        with atomic_file(path) as tmp:
            save_file(
                {n: s.reference.contiguous() for n, s in sources.items() if s.reference is not None}, str(tmp)
            )
    log.info(
        "reference log-probs of %d examples in %.1fs",
        sum(map(len, sources.values())),
        time.perf_counter() - started,
    )


def choose_reference(
    cfg: Any, model: nn.Module, precompute: Callable[[], None]
) -> tuple[nn.Module | None, str]:
    """The reference: a frozen copy (full fine-tuning; taken before any trained weight loads) or
    None, and where it comes from; `precompute` fills the sources' precomputed log-probs."""
    if cfg.loss in REFERENCE_FREE:
        return None, "none"
    if cfg.precompute_ref:
        precompute()
        return None, "precomputed"
    if cfg.method == "full":
        return copy.deepcopy(model).requires_grad_(False).eval(), "frozen copy"
    return None, "adapters disabled"


def run_dpo(cfg: DpoConfig, *, reporter: Reporter | None = None) -> dict[str, Any]:
    """Train on preference pairs as `cfg` says (here or on --nproc-per-node processes); the
    result has `run_finetune`'s shape plus the loss, beta and where the reference came from."""
    return run_on_ranks(cfg, "dpo", lambda c, world: _dpo(c, world, reporter))


def _dpo(cfg: DpoConfig, world: World, reporter: Reporter | None) -> dict[str, Any]:
    def objective(reference: nn.Module | None) -> PreferenceObjective:
        loss = PREFERENCE_LOSSES[cfg.loss]
        if cfg.loss == "simpo":
            loss = functools.partial(simpo_loss, gamma=cfg.simpo_gamma)
        if cfg.loss == "discopop":
            loss = functools.partial(discopop_loss, tau=cfg.discopop_tau)
        return PreferenceObjective(
            loss,
            cfg.beta,
            cfg.label_smoothing,
            reference,
            cfg.train.gradient_checkpointing,
            cfg.sft_weight or 0.0,
            reference_free=cfg.loss in REFERENCE_FREE,
        )

    sft = f" + {cfg.sft_weight:g} x chosen NLL" if cfg.sft_weight else ""
    return fit_preferences(
        cfg, world, reporter, load_pairs, objective, f"{cfg.loss} loss{sft}, beta {cfg.beta:g}",
        sft_weight=cfg.sft_weight,
    )  # fmt: skip


def fit_preferences(
    cfg: Any,
    world: World,
    reporter: Reporter | None,
    load: Callable[[Any, Any], tuple[Any, Any, dict[str, Any]]],
    objective: Callable[[nn.Module | None], Any],
    what: str,
    **facts: Any,
) -> dict[str, Any]:
    """A preference run (dpo, kto): `load(cfg, tokenizer)` gives the training and validation
    sources (each with a precomputable `reference`) and data stats, checked before the weights
    load; `objective(reference)` the loss function, given the frozen copy (or None); `what` says
    which loss, for the log. The result has `run_finetune`'s shape plus the loss, beta, where the
    reference came from and `facts`."""
    cfg, out, resume_from = start_run(cfg, cfg.command)
    path, loaded, device, (train, valid, data_stats) = load_data_and_model(cfg, load)
    begin_outputs(cfg, out, resume_from, world)
    model = loaded.model
    sources = {"train": train, "valid": valid}
    reference, where = choose_reference(
        cfg, model, lambda: fill_reference(cfg, model, out, resume_from, sources, device, world)
    )
    prepared = prepare(model, cfg, resume_from, world, device)
    trainer = make_trainer(
        cfg,
        model,
        objective(reference),
        (train, valid),
        out,
        prepared,
        device,
        reporter,
        world,
        perplexity=False,
    )
    log.info("%s, reference: %s", what, where)
    return fit_and_save(
        cfg,
        trainer,
        loaded,
        prepared,
        model_path=path,
        resume_from=resume_from,
        data_stats=data_stats,
        loss=cfg.loss,
        beta=cfg.beta,
        reference=where,
        **facts,
    )
