"""`model_fingerprint`: one SHA-256 over a loaded model's weights, the model's identity in caches
(eval.cache), the server's `weights_sha256` and the provenance of inspect's directions.

It hashes every parameter and buffer (names, dtypes, shapes and bytes, adapters merged in as
they are) and the device type, so a changed fork, precision or device never passes for another.
Not here: hashing checkpoint files (the store), what the callers key on it.
"""

from __future__ import annotations

import hashlib

import torch


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(memoryview(t.view(-1).view(torch.uint8).numpy()))
    device = next(model.parameters()).device.type
    h.update(device.encode())
    return h.hexdigest()
