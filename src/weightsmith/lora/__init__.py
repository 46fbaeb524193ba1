"""LoRA adapters: layers that wrap a loaded model's linears, and PEFT-format adapter files.

Two modules, one idea each: `layers` (the `LoRALinear` wrapper, targeting, enable/disable,
merge, per-row adapters for batched serving) and `files` (PEFT's `adapter_config.json` +
`adapter_model.safetensors`, read and written), with `fused` (Phi-3's fused projections) and
`experts` (a MoE layer's experts and router as PEFT's `target_parameters`) mapping the file's
names to the model's, and `dora` (DoRA's magnitudes and weight norms, which `layers` calls). Everything public is importable from
`weightsmith.lora` itself. The settings and PEFT's config schema live in
`weightsmith.lora_config`.

Not here: training (weightsmith.train), quantized base layers (weightsmith.quant).
"""

from weightsmith.lora.files import (
    head_weight,
    load_adapter,
    lora_state_dict,
    save_adapter,
)
from weightsmith.lora.layers import (
    LoRALinear,
    adapter_active,
    adapters_disabled,
    apply_lora,
    is_linear_like,
    layers_with,
    lora_layers,
    merge_adapter,
    merge_and_unload,
    resolve_targets,
    row_adapters,
    set_adapter,
    unload,
    unmerge_adapter,
)
from weightsmith.lora_config import LoraConfig

__all__ = [
    "LoraConfig",
    "LoRALinear",
    "adapter_active",
    "adapters_disabled",
    "apply_lora",
    "is_linear_like",
    "head_weight",
    "layers_with",
    "load_adapter",
    "lora_layers",
    "lora_state_dict",
    "merge_adapter",
    "merge_and_unload",
    "resolve_targets",
    "row_adapters",
    "save_adapter",
    "set_adapter",
    "unload",
    "unmerge_adapter",
]
