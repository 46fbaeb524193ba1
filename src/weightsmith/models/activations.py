"""The activation functions a config.json may name in `hidden_act`, by that name.

Its own module so that both the config (which checks the name) and the model (which
calls the function) import it, and neither imports the other. The config reads `NAMES` only,
so that reading a config does not import torch; `activations()` is the functions.
Not here: the MLP that uses them (model.py).
"""

from __future__ import annotations

from collections.abc import Callable

#: The `hidden_act` names supported.
NAMES = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "relu")


def activations() -> dict[str, Callable]:
    """Activation functions by config.json `hidden_act` name (NAMES, in order)."""
    import torch.nn.functional as F

    return {
        "silu": F.silu,
        "swish": F.silu,
        "gelu": F.gelu,
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
    }
