"""Look inside a loaded model: named hook points, logit lens, activation patching, direct logit
attribution, integrated gradients, attention patterns, difference-of-means directions and steering.

Everything runs on the very model weightsmith serves (quantized layers and adapters included),
through hook points with TransformerLens's names (hooks.py). Not here: the `inspect` command and
its reports (weightsmith.commands.inspect, weightsmith.report.inspect_report).
"""

from weightsmith.inspect.api import (
    attention_patterns,
    difference_of_means,
    direct_logit_attribution,
    integrated_gradients,
    logit_lens,
    patch,
)
from weightsmith.inspect.hooks import HookState, InspectError, hook_names, hooked
from weightsmith.inspect.interventions import Ablate, Add, ProjectOut, Replace
from weightsmith.inspect.trace import Trace, run_hooked

__all__ = [
    "Ablate",
    "Add",
    "HookState",
    "InspectError",
    "ProjectOut",
    "Replace",
    "Trace",
    "attention_patterns",
    "difference_of_means",
    "direct_logit_attribution",
    "hook_names",
    "hooked",
    "integrated_gradients",
    "logit_lens",
    "patch",
    "run_hooked",
]
