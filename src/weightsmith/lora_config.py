"""LoRA adapter settings and PEFT's `adapter_config.json` schema.

`LoraConfig` holds what an adapter is (rank, alpha, dropout, targets, rsLoRA, per-module
rank and alpha patterns) and converts to and from the JSON PEFT 0.22 writes, refusing
settings we do not implement (LoRA biases, `modules_to_save`, ...) with a message
naming the file and field. DoRA (`use_dora`) is read and written. Not here: the layers and files themselves (lora.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from weightsmith.errors import ConfigError

ALL_LINEAR = "all-linear"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
#: A DoRA adapter's magnitude vector, as PEFT names it in files (`<module>.lora_magnitude_vector`).
MAGNITUDE = "lora_magnitude_vector"
#: The PEFT release whose adapter_config.json schema `to_peft_dict` writes.
PEFT_SCHEMA_VERSION = "0.22.0"

#: Keys PEFT 0.22 writes that change nothing for a plain LoRA adapter at their PEFT
#: default; `from_peft_dict` refuses a file that sets one to anything else.
PEFT_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None, "arrow_config": None, "astra_config": None, "ensure_weight_tying": False,
    "exclude_modules": None, "fan_in_fan_out": False, "kasa_config": None, "layer_replication": None,
    "lora_bias": False, "megatron_config": None, "modules_to_save": None, "monteclora_config": None,
    "target_parameters": None, "trainable_token_indices": None, "use_bdlora": None,
    "use_qalora": False, "velora_config": None, "bias": "none",
}  # fmt: skip
#: What a reward model's adapter (`weightsmith reward`) saves besides its LoRA weights: the score
#: head, as PEFT saves `modules_to_save` for a SEQ_CLS task.
SCORE_HEAD = ("score",)
#: Bookkeeping keys (who saved it, how A was initialised before training): ignored on load.
PEFT_BOOKKEEPING = {
    "auto_mapping", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
    "megatron_core", "loftq_config", "qalora_group_size", "corda_config", "eva_config", "lora_ga_config",
}  # fmt: skip
#: Keys `from_peft_dict` reads (or checks) itself.
PEFT_READ = {
    "peft_type", "task_type", "layers_pattern", "init_lora_weights", "r", "lora_alpha", "lora_dropout",
    "target_modules", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform", "target_parameters",
    "use_dora",
}  # fmt: skip
#: init_lora_weights values whose saved adapter assumes a base model modified by the init.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _pattern_key(patterns: Iterable[str], module_name: str) -> str | None:
    """PEFT's `get_pattern_key`: the first pattern that matches the end of the name at a dot."""
    return next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module_name)), None)


@dataclass
class LoraConfig:
    """What to adapt and how; field names follow PEFT's LoraConfig (alpha = lora_alpha)."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    #: "all-linear", a list of module names / dotted suffixes, or a regex for the full name.
    target_modules: list[str] | str = ALL_LINEAR
    use_rslora: bool = False
    #: Per-module rank / alpha overrides, keyed by regex matched against the name's end.
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | None = None
    #: Parameters to adapt by their transformers-5 names, exact or a dotted suffix, as PEFT's
    #: `target_parameters`: a MoE layer's fused experts (`experts.gate_up_proj`, `experts.down_proj`,
    #: one LoRA per expert) or a linear's `weight` (the router's `gate.weight`). lora/experts.py.
    target_parameters: list[str] | None = None
    #: DoRA (Liu et al. 2024): a trained magnitude per output row on top of the low-rank update.
    use_dora: bool = False

    def validate(self, source: str = "LoraConfig") -> None:
        """Raise ConfigError naming `source` and the field for any value that cannot work."""
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(
                f"{source}: r must be an integer >= 1 (got {self.r!r}); ranks of 4-64 are usual"
            )
        if not _positive_number(self.alpha):
            raise ConfigError(
                f"{source}: lora_alpha must be > 0 (got {self.alpha!r}); 2*r is a common choice"
            )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{source}: lora_dropout must be in [0, 1) (got {self.dropout!r})")
        tp = self.target_parameters
        if tp is not None and not (isinstance(tp, list) and all(isinstance(t, str) and t for t in tp)):
            raise ConfigError(
                f"{source}: target_parameters must be a list of parameter names such as "
                f"['experts.gate_up_proj', 'experts.down_proj'] (got {tp!r})"
            )
        if tp and self.dropout:
            raise ConfigError(
                f"{source}: lora_dropout must be 0 with target_parameters (a LoRA on an expert parameter has no "
                f"dropout; PEFT refuses it too); set lora_dropout to 0 (got {self.dropout!r})"
            )
        if not isinstance(self.use_dora, bool):
            raise ConfigError(f"{source}: use_dora must be true or false (got {self.use_dora!r})")
        if self.use_dora and tp:
            raise ConfigError(
                f"{source}: use_dora cannot be combined with target_parameters (a mixture of experts' experts; PEFT "
                "refuses it too); adapt the attention with DoRA, or the experts with plain LoRA"
            )
        tm = self.target_modules
        if isinstance(tm, str):
            _compile(tm, source, "target_modules")
            if tm != ALL_LINEAR and self.layers_to_transform is not None:
                raise ConfigError(
                    f"{source}: layers_to_transform cannot be combined with a regex target_modules "
                    "(PEFT refuses it too); put the layer indices into the regex, or list module names"
                )
        elif not (isinstance(tm, list) and (tm or tp) and all(isinstance(t, str) and t for t in tm)):
            raise ConfigError(
                f"{source}: target_modules must be 'all-linear', a regex, or a non-empty list of module "
                f"names such as ['q_proj', 'v_proj'] (got {tm!r}; it may be empty with target_parameters)"
            )
        if not (isinstance(self.rank_pattern, dict) and isinstance(self.alpha_pattern, dict)):
            raise ConfigError(f"{source}: rank_pattern and alpha_pattern must map module patterns to values")
        for key, r in self.rank_pattern.items():
            _compile(key, source, "rank_pattern")
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ConfigError(f"{source}: rank_pattern[{key!r}] must be an integer >= 1 (got {r!r})")
        for key, alpha in self.alpha_pattern.items():
            _compile(key, source, "alpha_pattern")
            if not _positive_number(alpha):
                raise ConfigError(f"{source}: alpha_pattern[{key!r}] must be > 0 (got {alpha!r})")
        layers = self.layers_to_transform
        if layers is not None and not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers
        ):
            raise ConfigError(
                f"{source}: layers_to_transform must be a list of layer indices >= 0 (got {layers!r})"
            )

    def rank_for(self, module_name: str) -> int:
        key = _pattern_key(self.rank_pattern, module_name)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        key = _pattern_key(self.alpha_pattern, module_name)
        return self.alpha_pattern[key] if key is not None else self.alpha

    def scale_for(self, module_name: str) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA, after the rank and alpha patterns."""
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_peft_dict(
        self, base_model_name_or_path: str | None, *, module_names: Iterable[str] | None = None
    ) -> dict[str, Any]:
        """adapter_config.json contents. With `module_names` (the wrapped modules), "all-linear"
        is written as their sorted suffix names (PEFT, too, saves a resolved list); without, it
        stays "all-linear" for PEFT to resolve, which PEFT refuses with layers_to_transform."""
        targets: list[str] | str = self.target_modules
        if targets == ALL_LINEAR and module_names is not None:
            targets = sorted({n.rsplit(".", 1)[-1] for n in module_names})
        elif isinstance(targets, list):
            targets = sorted(targets)
        d: dict[str, Any] = {
            **PEFT_DEFAULTS,
            **dict.fromkeys(
                ["auto_mapping", "corda_config", "eva_config", "lora_ga_config", "layers_pattern"]
            ),
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "peft_version": PEFT_SCHEMA_VERSION,
            "base_model_name_or_path": base_model_name_or_path,
            "revision": None,
            "r": self.r,
            "lora_alpha": _plain_number(self.alpha),
            "lora_dropout": self.dropout,
            "target_modules": targets,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": {k: _plain_number(v) for k, v in self.alpha_pattern.items()},
            "layers_to_transform": self.layers_to_transform,
            "target_parameters": list(self.target_parameters) if self.target_parameters is not None else None,
            "init_lora_weights": True,
            "inference_mode": True,
            "loftq_config": {},
            "megatron_core": "megatron.core",
            "qalora_group_size": 16,
        }
        return dict(sorted(d.items()))

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any], source: str) -> LoraConfig:
        """Read adapter_config.json contents; refuse anything weightsmith does not implement."""
        _refuse_unsupported(d, source)
        params = d.get("target_parameters")
        if params is not None and not isinstance(params, list):
            raise ConfigError(
                f"{source}: target_parameters must be a list of parameter names (got {params!r})"
            )
        if d.get("target_modules") is None and not params:
            raise ConfigError(
                f"{source}: target_modules is missing; list the adapted modules, e.g. ['q_proj', 'v_proj']"
            )
        targets = d.get("target_modules") or []
        layers = d.get("layers_to_transform")
        cfg = cls(
            r=d.get("r", 8),
            alpha=d.get("lora_alpha", 8),
            dropout=d.get("lora_dropout", 0.0),
            target_modules=targets if isinstance(targets, str) else list(targets),
            use_rslora=bool(d.get("use_rslora", False)),
            use_dora=d.get("use_dora") or False,
            rank_pattern=d.get("rank_pattern") or {},
            alpha_pattern=d.get("alpha_pattern") or {},
            layers_to_transform=[layers] if isinstance(layers, int) else layers,
            target_parameters=list(params) if params else None,
        )
        cfg.validate(source)
        return cfg


def _refuse_unsupported(d: dict[str, Any], source: str) -> None:
    if d.get("peft_type") != "LORA":
        raise ConfigError(
            f"{source}: peft_type is {d.get('peft_type')!r}; weightsmith loads only 'LORA' adapters"
        )
    head = d.get("task_type") == "SEQ_CLS" and d.get("modules_to_save") == list(SCORE_HEAD)
    if d.get("task_type") not in (None, "CAUSAL_LM") and not head:
        raise ConfigError(
            f"{source}: task_type is {d['task_type']!r}; weightsmith loads CAUSAL_LM adapters and its own reward "
            "models (SEQ_CLS with modules_to_save ['score'])"
        )
    pattern = d.get("layers_pattern")
    if pattern not in (None, "", [], "layers", ["layers"]):
        raise ConfigError(
            f"{source}: layers_pattern {pattern!r} is not supported; layers are 'model.layers.<i>'"
        )
    init = d.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise ConfigError(
            f"{source}: init_lora_weights={init!r} adapters assume a base modified at init; convert it with "
            "PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) first"
        )
    for key, value in d.items():
        if key in PEFT_READ or key in PEFT_BOOKKEEPING or (head and key == "modules_to_save"):
            continue
        default = PEFT_DEFAULTS.get(key)
        # An unknown key (a newer PEFT's feature) is harmless only while it is unset; an empty list
        # is unset too (PEFT writes target_parameters=[] for a MoE model's plain LoRA).
        unset = value in (None, False, {}, [], "")
        harmless = value == default or (unset and not default) if key in PEFT_DEFAULTS else unset
        if not harmless:
            raise ConfigError(
                f"{source}: {key}={value!r} is not supported by weightsmith (only plain LoRA on linear "
                f"layers); retrain or convert the adapter with {key}={default!r}"
            )


def _positive_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _plain_number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def _compile(pattern: str, source: str, field_name: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(
            f"{source}: {field_name} {pattern!r} is not a valid regex ({e}); fix the pattern"
        ) from e
