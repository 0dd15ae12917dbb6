"""Multi-process training: the process group, who does what, and the few collectives the trainer needs.

``torchrun --nproc_per_node=K -m sleepzoo train RECIPE`` starts K processes with the torchrun environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); :func:`setup` joins them into
one process group (gloo on a CPU, nccl on CUDA, one GPU per process: ``cuda:LOCAL_RANK``). A process
started without that environment is a group of one: every helper here then does nothing, so single-process
training is exactly what it was. Everything goes through torch.distributed (DDP, FSDP2); nothing is home-made.

Who does what (see sleepzoo.train): every rank builds the same model from the same seed, generates the same
seeded global batch and trains on its own contiguous slice of it (:func:`shard_bounds`); rank 0 alone writes
the run directory, logs, checkpoints and evaluates, through :func:`on_main`, which hands its result (or its
error) to the other ranks so that none of them waits forever for a rank that failed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .registry import SleepzooError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

T = TypeVar("T")


def launched() -> bool:
    """Whether this process was started by torchrun (or anything else that sets its environment)."""
    return all(name in os.environ for name in TORCHRUN_ENV)


def active() -> bool:
    """Whether a process group is up (this process is one rank of several, or of a launched group of one)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if active() else 0


def is_main() -> bool:
    """Rank 0: the one process that writes files, logs, shows progress and evaluates."""
    return rank() == 0


def device_for(device: torch.device) -> torch.device:
    """The device this rank trains on: ``cuda:LOCAL_RANK`` for a CUDA run under torchrun (one GPU per
    process, whatever index ``train.device`` names), otherwise ``device`` itself."""
    if active() and device.type == "cuda":
        return torch.device("cuda", local_rank())
    return device


def setup(device: torch.device) -> bool:
    """Join the torchrun process group if this process was launched by torchrun and none is up yet.

    Backend: nccl for CUDA, gloo for a CPU. Returns True when it started the group (the caller then owns
    :func:`teardown`), False for a plain single process or a group someone else started.
    """
    if not launched() or active():
        return False
    if not dist.is_available():
        raise SleepzooError("torchrun started this process, but this torch build has no torch.distributed; "
                            "run without torchrun or install a torch with distributed support")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise SleepzooError(f"train.device: {str(device)!r} has no torch.distributed back end here; "
                            f"multi-process training runs on cpu (gloo) or cuda (nccl)")
    dist.init_process_group(backend)
    return True


def teardown() -> None:
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    if not active():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[local_rank()])
    else:
        dist.barrier()


def _comm_device() -> torch.device:
    return torch.device("cuda", local_rank()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(values: list[float] | torch.Tensor) -> torch.Tensor:
    """The sum over ranks of ``values`` (a list of numbers or a 1-D tensor), as a float64 CPU tensor.

    Float64 so that summing per-rank losses and target counts loses nothing before the division; a
    single process gets its own values back.
    """
    tensor = torch.as_tensor(values, dtype=torch.float64).detach().reshape(-1)
    if not active():
        return tensor.cpu()
    tensor = tensor.to(_comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it, on every rank (picklable objects only)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only; every rank returns its result, and every rank raises if it raised.

    The other ranks wait here (the broadcast is their barrier). An exception on rank 0 is re-raised there
    as itself and on the other ranks as a :class:`SleepzooError` with the same message, so a refused run
    directory or a failed checkpoint stops the whole group instead of leaving ranks waiting in a collective.
    """
    if not active():
        return fn()
    outcome: tuple[bool, Any] = (True, None)
    error: BaseException | None = None
    if is_main():
        try:
            outcome = (True, fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the other ranks, then re-raised
            error = exc
            outcome = (False, f"rank 0: {exc}" if str(exc) else f"rank 0 failed: {type(exc).__name__}")
    ok, value = broadcast_object(outcome)
    if error is not None:
        raise error
    if not ok:
        raise SleepzooError(value)
    return value


def loss_weight(num_targets: int, total_targets: float, world: int) -> float:
    """What this rank multiplies its loss by before backward, so that averaged gradients are exact.

    A rank's loss is the mean over its ``num_targets`` targets; the step's loss is the mean over all
    ``total_targets`` of them, i.e. the sum over ranks of ``loss_r * n_r / N``. DDP and FSDP average
    gradients over the ``world`` ranks, dividing by world; so each rank scales by ``n_r * world / N``. With
    uneven slices or uneven numbers of targets per example this still gives the one-process gradient.
    """
    return num_targets * world / total_targets


def shard_bounds(total: int, world: int, index: int) -> tuple[int, int]:
    """Rank ``index``'s contiguous slice ``[start, end)`` of ``total`` rows split over ``world`` ranks.

    Rank r gets rows ``[r * total // world, (r + 1) * total // world)``: slices in rank order that cover
    every row exactly once. When ``total`` is not a multiple of ``world`` their sizes differ by one row
    (5 rows over 2 ranks: 2 and 3); the trainer weights every rank's loss by its number of targets, so
    uneven slices still give the one-process loss and gradient. Fewer rows than ranks is an error.
    """
    if world < 1 or not 0 <= index < world:
        raise ValueError(f"rank {index} is not one of {world} ranks")
    if total < world:
        raise SleepzooError(f"train.batch_size: {total} is smaller than the {world} processes training it; "
                            f"every process needs at least one example: use train.batch_size >= {world} "
                            f"or fewer processes (torchrun --nproc_per_node)")
    return index * total // world, (index + 1) * total // world
