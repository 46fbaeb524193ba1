"""FSDP2 (`--strategy fsdp`): parameters sharded per decoder layer, and DCP checkpoints.

`shard_model` applies `fully_shard` to each decoder layer, then to the whole model (the
embeddings, final norm and LM head), with bf16 mixed precision on GPUs (fp32 gradient
reduction) and optional CPU offload. FSDP averages gradients over ranks, so the loop scales
each rank's loss by the world size (`World.grad_scale`): the gradient is then the sum over
ranks divided by the target count of every rank together. (Asking FSDP for a sum instead,
`set_gradient_divide_factor(1.0)`, needs ReduceOp.PREMUL_SUM, which gloo lacks in torch 2.13.) The loop calls
`model.hidden_states` rather than `forward`, so that method is registered to gather the
root's parameters. QLoRA's 4-bit weights are buffers, which `fully_shard` leaves whole on
every rank; only its parameters (adapters, norms, embeddings) are sharded.

Checkpoints of an fsdp run are written with `torch.distributed.checkpoint` (DCP): every
rank writes its shards of the model and optimizer (`get_state_dict`) into a hidden temp
folder; after a barrier rank 0 adds the RNG and trainer state and renames it into place,
so a step's folder is complete or absent. DCP reshards on load, so a run resumes on a
different number of processes (also on one, where no process group exists).

Not here: launching and the DDP path (distributed.py), the loop (loop.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weightsmith.train import checkpoints as ckpt
from weightsmith.train.distributed import World

DCP_MARKER = ".metadata"  # written by DCP into every complete checkpoint


def shard_model(model: nn.Module, *, device: torch.device, cpu_offload: bool) -> None:
    """fully_shard each decoder layer, then the root."""
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    register_fsdp_forward_method(model, "hidden_states")


@contextlib.contextmanager
def gathered(model: nn.Module, world: World) -> Iterator[None]:
    """Every parameter whole on every rank (to save the final output), sharded again after."""
    if not world.sharded:
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()


def is_sharded_checkpoint(path: Path) -> bool:
    return (path / DCP_MARKER).is_file()


def save_sharded(
    root: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int,
    world: World,
) -> Path:
    """Checkpoint `step` as DCP shards, atomically; the newest `keep` are kept."""
    final, tmp = root / f"step-{step:08d}", root / f".step-{step:08d}.dcp-tmp"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    world.barrier()
    import torch.distributed.checkpoint as dcp  # here: importing it costs a second at every start
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    rng = ckpt.rng_state(world.gather(ckpt.rng_state()))
    if world.is_main:
        torch.save(rng, tmp / "rng_state.pt")
        with open(tmp / ckpt.STATE_FILE, "w", encoding="utf-8") as f:
            f.write(json.dumps(state, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # a resumed run saving a step again
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in ckpt.checkpoint_dirs(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    world.barrier()
    return final


def load_sharded(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, world: World
) -> dict[str, Any]:
    """Restore model, optimizer and RNG from DCP checkpoint `path` (any world size); return
    its trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    try:
        model_state, optim_state = get_state_dict(model, optimizer)
        both = {"model": model_state, "optim": optim_state}
        dcp.load(both, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optim"])
        ckpt.set_rng_state(torch.load(path / "rng_state.pt", weights_only=True), world.rank, world.size)
        return json.loads((path / ckpt.STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ckpt.ResumeError(
            f"{path}: cannot restore the checkpoint ({e}); resume from an older one"
        ) from e
