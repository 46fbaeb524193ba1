"""Training on several processes with torch.distributed: launch, join, shard, reduce.

`--nproc-per-node N` re-runs the same command on N ranks through `torch.distributed.run`
(the library behind `torchrun`); the parent only waits, then reports the first rank that
failed. A process started by an external `torchrun` or by SLURM (`srun`) joins the group
from its environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; SLURM's
SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID when RANK is not set). Backend gloo on CPU,
NCCL on CUDA, with a collective timeout (`--dist-timeout`) so a dead rank ends the job.

`--train.batch-size` stays the size of one micro-batch across all ranks: each micro-batch
of the single-process order (`BatchOrder`) is cut into `world` contiguous slices, one per
rank, so the world size must divide the batch size, and a run gives the same steps on any
number of processes (and resumes on a different one). The loss of a step is divided by
the target count summed over every rank (`World.all_sum`), and the gradients are summed
over ranks, so a step equals the single-process step.

Strategies: `ddp` (each rank holds the whole model; only trainable gradients, the LoRA
adapters for lora/qlora, are all-reduced, once per optimizer step) and `fsdp`
(`fully_shard` per decoder layer, then the root; see fsdp.py).

Not here: the loop (loop.py) or what is trained (runs.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from weightsmith.config import opt
from weightsmith.errors import ConfigError, UsageError, WeightsmithError

log = logging.getLogger(__name__)

#: Set in the ranks that `launch` starts, so they leave printing the result to the parent.
LAUNCHED_ENV = "WEIGHTSMITH_LAUNCHED"
#: Set to 1 (benchmarks/distributed.py does) to time the gradient all-reduce of each step:
#: metrics.jsonl then gets `allreduce_s` (the all-reduce itself) and `wait_s` (a barrier just
#: before it: this rank waiting for the slowest). Off, nothing is timed or synchronised more.
TIME_COMM_ENV = "WEIGHTSMITH_TIME_COMM"


@dataclass(kw_only=True)
class DistOptions:
    """Distributed training (torch.distributed)."""

    nproc_per_node: int | None = opt(
        None, "run on N processes of this machine through torch.distributed.run (torchrun)"
    )
    strategy: Literal["ddp", "fsdp"] = opt(
        "ddp", "ddp: every rank holds the model; fsdp: parameters sharded per decoder layer (FSDP2)"
    )
    dist_timeout: float = opt(300.0, "seconds a rank waits for the others before the job fails")
    cpu_offload: bool = opt(False, "fsdp: keep sharded parameters and optimizer state in CPU memory")

    def __post_init__(self) -> None:
        if self.nproc_per_node is not None and self.nproc_per_node < 1:
            raise ConfigError(
                f"--nproc-per-node {self.nproc_per_node}: must be at least 1 (omit it for one process)"
            )
        if not self.dist_timeout > 0:
            raise ConfigError(f"--dist-timeout {self.dist_timeout}: must be greater than 0 seconds")


class RankError(WeightsmithError):
    """A rank failed or lost contact with the others."""


class LostContact(RankError):
    """This rank stopped because a collective failed: another rank died or hung. Its own exit
    status (3) tells the launcher that this failure is a consequence, not the cause."""

    exit_code = 3


# ----- the group ----------------------------------------------------------------------------------


@dataclass
class World:
    """This process's place in the job; `World()` is the single process (every call a no-op)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    strategy: str = "ddp"
    timed: bool = field(default_factory=lambda: os.environ.get(TIME_COMM_ENV) == "1")
    _seconds: dict[str, float] = field(default_factory=dict, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Parameters are sharded over the ranks (FSDP with more than one rank)."""
        return self.size > 1 and self.strategy == "fsdp"

    @property
    def grad_scale(self) -> int:
        """What each rank's loss is multiplied by before backward: FSDP averages the gradients
        over ranks where the loop wants their sum."""
        return self.size if self.sharded else 1

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """`values` summed over every rank (float64, so counts stay exact)."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self._device)
        _collective(torch.distributed.all_reduce, t)
        return t.tolist()

    def gather(self, obj: Any) -> list[Any]:
        """`obj` from every rank, in rank order (picklable; for small things such as RNG states)."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        _collective(torch.distributed.all_gather_object, out, obj)
        return out

    def share_of(self, n: int, batch_size: int, *, split: bool = True) -> range:
        """The starts of the batches of `n` items this rank works on: every size-th batch (all of
        them when not `split`, as when a sharded model must run every forward on every rank)."""
        if not split or self.size == 1:
            return range(0, n, batch_size)
        return range(self.rank * batch_size, n, self.size * batch_size)

    def gather_shares(self, parts: dict[int, Any], *, split: bool = True) -> list[Any]:
        """The parts of every rank's `share_of` (keyed by batch start), in start order."""
        if split and self.size > 1:
            parts = {start: part for gathered in self.gather(parts) for start, part in gathered.items()}
        return [parts[start] for start in sorted(parts)]

    def reduce_gradients(self, params: Iterable[nn.Parameter]) -> None:
        """Sum the trainable gradients over ranks (DDP); one flat all-reduce per step."""
        if self.size == 1 or self.sharded:  # FSDP reduce-scatters in backward
            return
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch.cat([g.reshape(-1) for g in grads])
        if self.timed:
            with self._timing("wait_s"):
                _collective(torch.distributed.barrier)
        with self._timing("allreduce_s"):
            _collective(torch.distributed.all_reduce, flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def comm_seconds(self) -> dict[str, float]:
        """The seconds timed since the last call (with TIME_COMM_ENV set; else nothing)."""
        taken, self._seconds = self._seconds, {}
        return taken

    @contextlib.contextmanager
    def _timing(self, key: str) -> Iterator[None]:
        if not self.timed:
            yield
            return
        start = time.perf_counter()
        yield
        self._seconds[key] = self._seconds.get(key, 0.0) + time.perf_counter() - start

    def barrier(self) -> None:
        if self.size > 1:
            _collective(torch.distributed.barrier)

    def shard(self, indices: Sequence[int]) -> tuple[list[int], bool]:
        """This rank's contiguous slice of a global micro-batch, and whether it counts: a rank
        whose slice is empty (a short last batch) gets the batch's first item as a stand-in
        whose loss is multiplied by 0, so every rank runs the same forwards and backwards."""
        if self.size == 1:
            return list(indices), True
        per = -(-len(indices) // self.size)
        mine = list(indices[self.rank * per : (self.rank + 1) * per])
        return (mine, True) if mine else ([indices[0]], False)

    @property
    def _device(self) -> torch.device:
        if torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def _collective(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except (RuntimeError, torch.distributed.DistError) as e:  # gloo/NCCL: a peer died or timed out
        raise LostContact(
            f"rank {torch.distributed.get_rank()}: lost contact with the other ranks "
            f"({str(e).splitlines()[0]}); another rank failed or hung"
        ) from e


def rendezvous_env() -> dict[str, str] | None:
    """RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_*) from torchrun's or SLURM's variables; None
    when this process was not started as a rank."""
    env = dict(os.environ)
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env.update(
            RANK=env["SLURM_PROCID"],
            WORLD_SIZE=env["SLURM_NTASKS"],
            LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
        )
    if "RANK" not in env:
        return None
    if env.get("WORLD_SIZE", "1") == "1":
        return env
    missing = [k for k in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise UsageError(
            f"RANK is set but {', '.join(missing)} is not: a rank needs the rendezvous endpoint; start it "
            "with torchrun, or export MASTER_ADDR=<rank 0 host> MASTER_PORT=<free port> (SLURM too)"
        )
    return env


def check_batch(batch_size: int, world: int) -> None:
    if batch_size % world:
        raise UsageError(
            f"--train.batch-size {batch_size} is the micro-batch over all ranks and must be a multiple of "
            f"the world size {world}; use --train.batch-size {batch_size - batch_size % world or world}"
        )


def join(opts: DistOptions, batch_size: int, device: str) -> World:
    """Enter the process group when this process is a rank of a job of several (else `World()`)."""
    env = rendezvous_env()
    if env is None:
        return World(strategy=opts.strategy)
    rank, size, local = int(env["RANK"]), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0"))
    check_batch(batch_size, size)
    world = World(rank, size, local, opts.strategy)
    if not world.is_main:  # one log stream: the other ranks report only errors
        logging.getLogger("weightsmith").setLevel(logging.ERROR)
    if size == 1 or torch.distributed.is_initialized():
        return world
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        os.environ[key] = env[key]
    torch.distributed.init_process_group(
        "nccl" if cuda else "gloo",
        init_method="env://",
        rank=rank,
        world_size=size,
        timeout=timedelta(seconds=opts.dist_timeout),
    )
    log.info("rank %d of %d joined (%s)", rank, size, torch.distributed.get_backend())
    return world


def leave() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def name_rank(error: BaseException, world: World) -> BaseException:
    """The error, its message prefixed with this rank when the job has several."""
    if world.size == 1 or str(error).startswith("rank "):
        return error
    if isinstance(error, WeightsmithError):
        error.args = (f"rank {world.rank}: {error}", *error.args[1:])
        return error
    return RankError(f"rank {world.rank}: {type(error).__name__}: {error}")


# ----- launching ----------------------------------------------------------------------------------


def should_launch(opts: DistOptions) -> bool:
    """--nproc-per-node was given and this process is not already a rank."""
    return opts.nproc_per_node is not None and rendezvous_env() is None


def launch(cfg: Any, command: str) -> None:
    """Run `weightsmith COMMAND --config <cfg as YAML>` on `--nproc-per-node` local ranks and
    wait; raise RankError naming the first rank that failed."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from weightsmith.config import dump_config_yaml

    nproc = cfg.dist.nproc_per_node
    check_batch(cfg.train.batch_size, nproc)
    with tempfile.TemporaryDirectory(prefix="weightsmith-launch-") as tmp:
        path = Path(tmp) / f"{command}.yaml"
        dump_config_yaml(dataclasses.replace(cfg, json=False), path)  # the parent prints the result
        args = get_args_parser().parse_args(
            [
                "--nproc-per-node", str(nproc), "--standalone", "--max-restarts", "0",
                "--monitor-interval", "0.2", "-m", "weightsmith",
                *(["--verbose"] if log.isEnabledFor(logging.INFO) else []),
                command, "--config", str(path),
            ]
        )  # fmt: skip
        os.environ[LAUNCHED_ENV] = "1"
        try:
            run(args)
        except ChildFailedError as e:
            rank, failure = root_cause(e.failures)
            raise RankError(f"rank {rank} failed: {_how(failure.exitcode)}; see its error above") from None
        finally:
            os.environ.pop(LAUNCHED_ENV, None)


def root_cause(failures: Mapping[int, Any]) -> tuple[int, Any]:
    """The rank whose failure caused the others: ranks that exited with `LostContact`'s status
    only noticed it. torchrun's own choice (the earliest timestamp) cannot tell them apart:
    a rank killed without writing an error file is stamped, to the whole second, when the
    launcher saw it, so a rank that lost contact within the same second could be named."""
    return min(
        failures.items(),
        key=lambda item: (item[1].exitcode == LostContact.exit_code, item[1].timestamp, item[0]),
    )


def exit_rank(code: int) -> None:
    """End a launched rank that finished, or lost contact, without running interpreter
    shutdown: gloo's threads, left joinable by a broken pair (a peer that closed its sockets
    first: a rank that finished a moment earlier, or one that hung), abort the process there
    (SIGABRT, "terminate called without an active exception"). That would fail a run whose
    every step and output was done (seen once in CI: FSDP, two ranks, after the last step), or
    hide the status that tells the launcher this rank was not the cause. Its outputs are
    written (atomically) and its streams are flushed here."""
    if code in (0, LostContact.exit_code) and launched_rank():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _how(exitcode: int) -> str:
    if exitcode == LostContact.exit_code:  # every rank that failed only noticed: one hung
        return "lost contact with the other ranks (one of them hung)"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def launched_rank() -> bool:
    """This process is a rank started by `launch` (the parent prints the result)."""
    return os.environ.get(LAUNCHED_ENV) == "1"
