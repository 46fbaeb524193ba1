"""Reward models: the `reward` command trains a model to score answers from preference pairs.

A reward model is the language model with its LM head replaced by a score head, a linear map
from the last layer's (normed) hidden state to one number, read at the last token of prompt +
answer: the last whose id is not the padding id, as transformers' `*ForSequenceClassification`
reads it (so a checkpoint written here scores alike there). Training is Bradley-Terry, as TRL's
`RewardTrainer` computes it: per pair, -log sigmoid(r_chosen - r_rejected - margin), the margin
a pair's optional `margin` field (Llama 2's), plus `--center-rewards` x (r_chosen + r_rejected)^2
(keeps rewards near 0); a step's loss is the mean over its pairs.

Pairs are read as `dpo` reads them (preference_data.py: every TRL format, checked before the
model loads; truncation cuts the prompt's start first). A batch holds each pair as one row, the
prompt once (`PairBatch`); the score is read from the hidden state at each answer's last token.

The score head starts as transformers starts one (normal, std 0.02, seeded by --train.seed) and
is always trained: with `--method lora` or `qlora` beside the adapters (the output is a PEFT
SEQ_CLS adapter whose `modules_to_save` is the head, as TRL trains one: transformers + peft load
it with `AutoModelForSequenceClassification` and `PeftModel.from_pretrained`); with `--method
full` with everything, the output an HF `*ForSequenceClassification` checkpoint in OUT/model.

Metrics, per step and as `val_*` (TRL's): the loss, `accuracy` (the share of pairs whose chosen
answer scores higher), `margin` (the mean r_chosen - r_rejected), `reward_chosen`,
`reward_rejected` and `mean_reward`.

Not here: reading pairs (preference_data.py), the loop (loop.py), what uses a reward model (grpo).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from weightsmith.config import opt
from weightsmith.errors import ConfigError
from weightsmith.lora import head_weight
from weightsmith.lora.files import save_adapter
from weightsmith.train.distributed import World
from weightsmith.train.dpo import check_prompt_len, load_pairs
from weightsmith.train.loop import Reporter
from weightsmith.train.losses import shared_prompt_attention
from weightsmith.train.metric_sums import Mean
from weightsmith.train.preference_data import PairBatch, PairSource
from weightsmith.train.runs import (
    Prepared,
    RunConfig,
    begin_outputs,
    fit_and_save,
    load_data_and_model,
    make_trainer,
    prepare,
    run_on_ranks,
    start_run,
)

__all__ = ["RewardConfig", "RewardObjective", "attach_score", "pair_rewards", "run_reward", "save_reward_dir"]

log = logging.getLogger(__name__)

#: transformers' default `initializer_range`: the std of a new score head's weights.
HEAD_STD = 0.02


@dataclass(kw_only=True)
class RewardConfig(RunConfig):
    """Train a reward model on preference pairs: a score that ranks the chosen answers higher."""

    command: ClassVar[str] = "reward"

    data: str | None = opt(None, "preference pairs: JSONL in TRL's prompt/chosen/rejected format")
    center_rewards: float | None = opt(
        None, "add this times the squared sum of a pair's rewards: keeps rewards near 0 (TRL's "
        "center_rewards_coefficient; 0.01 is usual)"
    )  # fmt: skip
    max_prompt_len: int | None = opt(None, "cut prompts longer than this from the left")

    def __post_init__(self) -> None:
        if self.center_rewards is not None and not 0 <= self.center_rewards <= 100:
            raise ConfigError(f"--center-rewards {self.center_rewards}: must be between 0 and 100")
        if self.dist.strategy == "fsdp":
            raise ConfigError("--strategy fsdp: reward models train with ddp (the default); drop --strategy")
        check_prompt_len(self.max_prompt_len, self.max_seq_len)


# ----- the score head and the loss ----------------------------------------------------------------


def attach_score(model: nn.Module, seed: int, weight: torch.Tensor | None = None) -> nn.Linear:
    """Give `model` a trainable fp32 score head (`model.score`): `weight` (1, hidden), or a new one
    drawn as transformers draws one (normal, std 0.02) from `seed`."""
    hidden = model.config.hidden_size
    device = model.model.norm.weight.device
    head = nn.Linear(hidden, 1, bias=False, device=device, dtype=torch.float32)
    with torch.no_grad():
        if weight is None:
            g = torch.Generator().manual_seed(seed)
            weight = torch.randn((1, hidden), generator=g) * HEAD_STD
        if tuple(weight.shape) != (1, hidden):
            raise ConfigError(f"score head weight: shape {tuple(weight.shape)}, expected (1, {hidden})")
        head.weight.copy_(weight)
    model.score = head
    return head


def pair_rewards(model: nn.Module, batch: RewardBatch, *, checkpoint: bool = False) -> torch.Tensor:
    """(2B,) each answer's reward in fp32, chosen answers first; a pair's prompt runs once."""
    pairs = batch.pairs
    with shared_prompt_attention(model, pairs):
        hidden = model.hidden_states(pairs.inputs, positions=pairs.positions, checkpoint=checkpoint)
    h = model.model.norm(hidden.reshape(-1, hidden.shape[-1])[batch.read_at])  # (2B, h)
    return model.score(h).squeeze(-1).float()


@dataclass
class RewardBatch:
    """B pairs as a `PairBatch`, where to read each answer's score, and each pair's margin."""

    pairs: PairBatch
    read_at: torch.Tensor  # (2B,) flat into (B, T), chosen answers first
    margins: torch.Tensor  # (B,)

    @property
    def n_tokens(self) -> int:
        return self.pairs.n_tokens

    @property
    def n_targets(self) -> int:
        return len(self.margins)

    def to(self, device: torch.device) -> RewardBatch:
        return RewardBatch(self.pairs.to(device), self.read_at.to(device), self.margins.to(device))


class RewardSource(PairSource):
    """Pairs by index, made into `RewardBatch`es."""

    def batch(self, indices: Any) -> RewardBatch:  # type: ignore[override]
        picked = [self.pairs[i] for i in indices]
        pairs = super().batch(indices)
        t = pairs.inputs.shape[1]
        read_at = []
        for answer in ("chosen", "rejected"):
            for i, p in enumerate(picked):
                ids = p.prompt + getattr(p, answer)
                last = max((j for j, token in enumerate(ids) if token != self.pad_id), default=0)
                if answer == "rejected" and last >= len(p.prompt):  # the rejected answer follows the chosen
                    last += len(p.chosen)
                read_at.append(i * t + last)
        margins = torch.tensor([p.margin for p in picked], dtype=torch.float32)
        return RewardBatch(pairs, torch.tensor(read_at), margins)


@dataclass
class RewardObjective:
    """The loop's loss function for a reward model: (summed loss, pairs, summed metrics)."""

    center: float | None = None
    checkpoint: bool = False

    def __call__(self, model: nn.Module, batch: RewardBatch) -> tuple[torch.Tensor, int, dict[str, Any]]:
        r = pair_rewards(model, batch, checkpoint=self.checkpoint)
        n = batch.n_targets
        chosen, rejected = r[:n], r[n:]
        losses = -F.logsigmoid(chosen - rejected - batch.margins)
        if self.center is not None:
            losses = losses + self.center * (chosen + rejected) ** 2
        c, j = chosen.detach(), rejected.detach()
        metrics = {
            "accuracy": (c > j).sum(),
            "margin": (c - j).sum(),
            "reward_chosen": c.sum(),
            "reward_rejected": j.sum(),
            "mean_reward": Mean(float(c.sum() + j.sum()), 2.0 * n),
        }
        return losses.sum(), n, metrics


# ----- outputs ------------------------------------------------------------------------------------


def save_reward_dir(model: nn.Module, tokenizer: Any, out: Path, pad_id: int) -> Path:
    """An HF `*ForSequenceClassification` checkpoint of a fully trained reward model: the
    decoder and the score head (no LM head), `num_labels` 1, `pad_token_id` the id its score
    position skips."""
    from weightsmith.checkpoint.save import check_out_dir, state_for_hf, write_hf_dir

    check_out_dir(out, overwrite=True)
    cfg = model.config.to_hf()
    cfg["architectures"] = [cfg["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")]
    cfg.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, pad_token_id=pad_id)
    state = state_for_hf(model, None)
    state.pop("lm_head.weight", None)
    return write_hf_dir(out, cfg, state, tokenizer, None)


def _outputs(
    model: nn.Module, cfg: RewardConfig, prepared: Prepared, tokenizer: Any, pad_id: int
) -> Prepared:
    """Checkpoints and the final output with the score head."""
    if cfg.method == "full":  # model.safetensors holds every parameter, the head's included
        return Prepared(
            prepared.save_weights, lambda out: save_reward_dir(model, tokenizer, out / "model", pad_id)
        )
    lora = cfg.lora.to_config()

    def save(directory: Path) -> None:
        save_adapter(model, directory, lora, base_model=str(cfg.model), head=model.score.weight)

    return Prepared(save, save)


def _resumed_head(cfg: RewardConfig, resume_from: Path | None) -> torch.Tensor | None:
    if resume_from is None:
        return None
    if cfg.method != "full":
        return head_weight(resume_from)
    with safe_open(str(resume_from / "model.safetensors"), framework="pt") as f:
        return f.get_tensor("score.weight")


# ----- the command --------------------------------------------------------------------------------


def run_reward(cfg: RewardConfig, *, reporter: Reporter | None = None) -> dict[str, Any]:
    """Train a reward model as `cfg` says (here or on --nproc-per-node processes); the result has
    `run_finetune`'s shape."""
    return run_on_ranks(cfg, "reward", lambda c, world: _reward(c, world, reporter))


def _reward(cfg: RewardConfig, world: World, reporter: Reporter | None) -> dict[str, Any]:
    cfg, out, resume_from = start_run(cfg, "reward")
    path, loaded, device, (train, valid, data_stats) = load_data_and_model(cfg, load_pairs)
    train, valid = (RewardSource(s.pairs, s.pad_id) for s in (train, valid))
    begin_outputs(cfg, out, resume_from, world)
    model = loaded.model
    prepared = prepare(model, cfg, resume_from, world, device)
    attach_score(model, cfg.train.seed, _resumed_head(cfg, resume_from))
    prepared = _outputs(model, cfg, prepared, loaded.tokenizer, train.pad_id)
    objective = RewardObjective(cfg.center_rewards, cfg.train.gradient_checkpointing)
    trainer = make_trainer(
        cfg, model, objective, (train, valid), out, prepared, device, reporter, world, perplexity=False
    )
    center = f", centred x {cfg.center_rewards:g}" if cfg.center_rewards else ""
    log.info("reward model: Bradley-Terry loss%s, score read at the last non-padding token", center)
    return fit_and_save(
        cfg, trainer, loaded, prepared, model_path=path, resume_from=resume_from, data_stats=data_stats,
        center_rewards=cfg.center_rewards,
    )  # fmt: skip


# ----- scoring with a trained reward model (grpo --reward model:DIR) ---------------------------------


@dataclass
class Scorer:
    """A loaded reward model: the model, its score head, tokenizer and padding id; `adapter`,
    the reward adapter's name where it runs on the base of the model being trained (made active
    while scoring, beside that model's own adapter)."""

    model: nn.Module
    tokenizer: Any
    pad_id: int
    head: nn.Linear
    adapter: str | None = None

    def __call__(self, ids: list[list[int]], chunk: int = 16) -> torch.Tensor:
        """(N,) fp32 scores of token sequences, read at each one's last non-padding token."""
        from weightsmith.lora import adapter_active

        device = self.model.model.norm.weight.device
        out = []
        running = adapter_active(self.model, self.adapter) if self.adapter else contextlib.nullcontext()
        with running, torch.no_grad():
            for start in range(0, len(ids), chunk):
                part = ids[start : start + chunk]
                width = max(1, max(map(len, part)))
                inputs = torch.full((len(part), width), self.pad_id, dtype=torch.long)
                read = []
                for i, x in enumerate(part):
                    inputs[i, : len(x)] = torch.tensor(x, dtype=torch.long)
                    read.append(i * width + max((j for j, t in enumerate(x) if t != self.pad_id), default=0))
                hidden = self.model.hidden_states(inputs.to(device))
                h = self.model.model.norm(
                    hidden.reshape(-1, hidden.shape[-1])[torch.tensor(read, device=device)]
                )
                out.append(self.head(h.to(self.head.weight.dtype)).squeeze(-1).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)


@dataclass
class SharedBase:
    """A loaded model whose base weights do not change (a LoRA run's policy, an arena
    contestant): a reward adapter over the same checkpoint runs on them as another adapter
    instead of loading a second copy. `path` is the checkpoint's resolved path."""

    path: Path
    model: nn.Module
    tokenizer: Any
    what: str = "the model being trained"  # for the log line


def load_scorer(
    path: str | Path,
    device: torch.device,
    spec: str,
    policy: Path | Sequence[Path] | None = None,
    shared: SharedBase | Sequence[SharedBase] | None = None,
) -> Scorer:
    """A reward model written by `weightsmith reward`: a PEFT SEQ_CLS adapter or an HF
    `*ForSequenceClassification` folder. An adapter's base is named in its adapter_config.json,
    a shared file: a store or catalog name is loaded from the store (never fetched), a path only
    where the command line named it too (`policy`: the model being trained, or the arena's
    local contestants). An adapter over the checkpoint of one of `shared` runs on its model."""
    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.device import pick_dtype
    from weightsmith.files import read_json
    from weightsmith.lora import load_adapter
    from weightsmith.train.data import pad_id_for

    folder = Path(path).expanduser()
    dtype = pick_dtype("auto", device)
    if (folder / "adapter_config.json").is_file():
        base = _adapter_base(folder, spec, policy)
        loaded = [shared] if isinstance(shared, SharedBase) else list(shared or ())
        # a quantized base (integer blocks) would score otherwise than the float copy loaded here
        same = next(
            (s for s in loaded if s.path.resolve() == base.resolve() and _float_weights(s.model)), None
        )
        if same is not None:
            return _shared_scorer(folder, spec, same)
        ckpt = load_checkpoint(base, device=device, dtype=dtype)
        load_adapter(ckpt.model, folder, reward=True)
        weight, pad = head_weight(folder), pad_id_for(ckpt.tokenizer)
    elif (folder / "config.json").is_file():
        ckpt = load_checkpoint(folder, device=device, dtype=dtype, reward=True)  # refuses a language model
        assert ckpt.score is not None
        weight, pad = ckpt.score, read_json(folder / "config.json").get("pad_token_id")
        pad = pad_id_for(ckpt.tokenizer) if pad is None else int(pad)
    else:
        raise ConfigError(
            f"--reward {spec}: {folder} holds no reward model (adapter_config.json or config.json)"
        )
    model = ckpt.model.requires_grad_(False).eval()
    head = attach_score(model, 0, weight.float()).requires_grad_(False)
    return Scorer(model, ckpt.tokenizer, pad, head)


def _adapter_base(folder: Path, spec: str, policy: Path | Sequence[Path] | None) -> Path:
    """The checkpoint a reward adapter's config names as its base, resolved (never fetched)."""
    from weightsmith.checkpoint.pull import looks_like_path, resolve
    from weightsmith.files import read_json

    base = read_json(folder / "adapter_config.json").get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"--reward {spec}: {folder}/adapter_config.json names no base model")
    named = [policy] if isinstance(policy, Path) else list(policy or ())
    if looks_like_path(str(base)) and Path(base).expanduser().resolve() not in [p.resolve() for p in named]:
        raise ConfigError(
            f"--reward {spec}: its adapter's base is the path {base}, not a model the command line names (the "
            "model being trained, or a local arena contestant); a reward model's base must be one of those "
            "or a stored one (weightsmith pull NAME)"
        )
    return resolve(str(base), auto_pull=False)


def _float_weights(model: nn.Module) -> bool:
    return all(t.is_floating_point() for t in itertools.chain(model.parameters(), model.buffers()))


def _shared_scorer(folder: Path, spec: str, shared: SharedBase) -> Scorer:
    """The reward adapter at `folder` loaded beside any adapter of `shared.model`, frozen and
    without dropout; the adapter that was active stays active."""
    from weightsmith.lora import load_adapter, lora_layers
    from weightsmith.train.data import pad_id_for

    model = shared.model
    active = {n: m.active_adapter for n, m in lora_layers(model).items()}
    taken = {a for m in lora_layers(model).values() for a in m.lora_A}
    name = next(f"reward{i}" for i in range(len(taken) + 1) if f"reward{i}" not in taken)
    load_adapter(model, folder, name=name, reward=True)  # made active on every LoRA layer
    for n, layer in lora_layers(model).items():
        layer.active_adapter = active.get(n, next(iter(active.values()), None))
        if name in layer.lora_A:
            layer.lora_A[name].requires_grad_(False)
            layer.lora_B[name].requires_grad_(False)
            if name in layer.lora_magnitude_vector:
                layer.lora_magnitude_vector[name].requires_grad_(False)
            layer.lora_dropout[name] = nn.Identity()
    head = nn.Linear(model.config.hidden_size, 1, bias=False, device=model.model.norm.weight.device)
    with torch.no_grad():
        head.weight.copy_(head_weight(folder).float())
    base = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)
    log.info(
        "--reward %s: its adapter runs on the base weights of %s, already loaded (no second copy of the "
        "base model: %.0f MiB saved)", spec, shared.what, base / 2**20,
    )  # fmt: skip
    return Scorer(model, shared.tokenizer, pad_id_for(shared.tokenizer), head.requires_grad_(False), name)


def model_reward(spec: str, weight_of: Any) -> tuple[ModelReward, float]:
    """The function and weight of `--reward model:DIR[:WEIGHT]` (rewards.parse_rewards);
    `weight_of(spec, text)` checks a weight."""
    rest = spec.strip().partition(":")[2]
    path, colon, tail = rest.rpartition(":")
    try:
        float(tail)
    except ValueError:  # no weight: a colon, if any, is the path's
        path, tail = rest, ""
    if not colon:
        path, tail = rest, ""
    if not path.strip():
        raise ConfigError(f"--reward {spec}: give the reward model's folder, as in model:runs/rm")
    return ModelReward(spec, path.strip()), weight_of(spec, tail) if tail else 1.0


class ModelReward:
    """`--reward model:DIR`: a trained reward model's score of each prompt + completion, as TRL's
    GRPOTrainer scores with a reward model: a conversation rendered with the reward model's chat
    template (the prompt's messages and the completion as an assistant turn), text as prompt +
    completion, tokenized without added special tokens. Loaded by `load` (once the policy is on
    its device); the folder is checked when the flags are."""

    def __init__(self, spec: str, path: str) -> None:
        self.spec, self.path = spec, path
        folder = Path(path).expanduser()
        if not ((folder / "adapter_config.json").is_file() or (folder / "config.json").is_file()):
            raise ConfigError(
                f"--reward {spec}: {folder} holds no reward model; give the OUT folder of weightsmith reward"
            )
        self.scorer: Scorer | None = None

    def load(
        self,
        device: torch.device,
        policy: Path | Sequence[Path] | None = None,
        shared: SharedBase | Sequence[SharedBase] | None = None,
    ) -> None:
        """Load the reward model on `device`; `policy` is the path (or paths) of the models the
        command line names (an adapter's base may be one); an adapter over the checkpoint of one
        of `shared` runs on its model."""
        if self.scorer is None:
            self.scorer = load_scorer(self.path, device, self.spec, policy, shared)

    def __call__(self, completions: list[str], rows: list[dict[str, Any]], lengths: list[int]) -> list[float]:
        assert self.scorer is not None, "ModelReward.load first"
        tok = self.scorer.tokenizer
        ids = []
        for text, row in zip(completions, rows, strict=True):
            prompt = row.get("prompt")
            if isinstance(prompt, list):
                messages = list(prompt) + [{"role": "assistant", "content": text}]
                rendered = tok.apply_chat_template(messages, add_generation_prompt=False)
                ids.append(tok.encode(str(rendered), add_special_tokens=False))
            else:
                ids.append(tok.encode(str(prompt) + text, add_special_tokens=False))
        return self.scorer(ids).tolist()
