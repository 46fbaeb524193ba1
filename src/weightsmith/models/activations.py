"""The activation functions a config.json may name in `hidden_act`, by that name.

Its own module so that both the config (which checks the name) and the model (which
calls the function) import it, and neither imports the other.
Not here: the MLP that uses them (model.py).
"""

from __future__ import annotations

import torch.nn.functional as F

#: Activation functions by config.json `hidden_act` name.
ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
