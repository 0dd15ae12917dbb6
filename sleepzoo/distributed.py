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

The model under several processes: :func:`replicate` wraps it in DDP (``train.parallel: ddp``, once per
stage), :func:`shard` shards it with FSDP2 (``fsdp``, block by block); :class:`PlainTwin` keeps a plain
one-process copy of a sharded model, so that checkpoints are written and read in the plain format.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .config import TrainConfig
from .optim import build_optimizers
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


# ---------------------------------------------------------------------------------------------------------
# the model under DDP and FSDP2


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """FSDP's units of sharding: the model's ``shard_units()`` (every distinct block once, registered under the
    model: for Ouro the loop body, not its shared step), else ``model.layers`` or ``model.model.layers``."""
    if hasattr(model, "shard_units"):
        return list(model.shard_units())
    for owner in (model, getattr(model, "model", None)):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return list(layers)
    return []


def shard(model: nn.Module, device: torch.device, source: str) -> nn.Module:
    """FSDP2: shard every block, then the rest (embedding, norms, head) as the root; in place."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise SleepzooError(f"{source}: train.parallel: 'fsdp' needs torch.distributed.fsdp.fully_shard "
                            f"(torch >= 2.6), which this torch ({torch.__version__}) lacks; use "
                            f"train.parallel=ddp") from None
    try:
        for block in fsdp_units(model):
            fully_shard(block)
        fully_shard(model)
    except Exception as exc:
        raise SleepzooError(f"{source}: train.parallel: 'fsdp' could not shard {type(model).__name__} on "
                            f"{device.type} ({type(exc).__name__}: {exc}); use train.parallel=ddp") from exc
    return model


def replicate(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the parameters the current stage trains (built per stage: DDP fixes its set at construction).

    ``find_unused_parameters``: a trained parameter need not take part in every forward (an early-exit
    gate, a block a loop range skips); DDP then still finishes the step instead of waiting for it.
    """
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


def first_names(model: nn.Module) -> dict[int, str]:
    """Each parameter's first name in ``model.named_parameters()``, by ``id``."""
    return {id(p): name for name, p in model.named_parameters()}


class PlainTwin:
    """A one-process copy of an FSDP-sharded model with its optimizers, to save and load checkpoints in
    the plain format (full tensors, no sharding): a K-process FSDP run resumes on one process with DDP or
    none, and the other way round. Holds a full copy of the weights (and, while saving or loading, of the
    optimizer states) in CPU memory."""

    def __init__(self, model: nn.Module):
        self.model = copy.deepcopy(model).to("cpu")  # taken before sharding

    def follow(self, stage_params: set[str], cfg: TrainConfig) -> list[torch.optim.Optimizer]:
        """Freeze what the stage freezes and build the stage's optimizers over the copy (same order)."""
        for name, p in self.model.named_parameters():
            p.requires_grad_(name in stage_params)
        self.optimizers = build_optimizers(self.model, cfg)
        names = first_names(self.model)
        # per optimizer, its parameters' names in the order of its state dict's indices (groups concatenated)
        self.order = [[names[id(p)] for group in opt.param_groups for p in group["params"]]
                      for opt in self.optimizers]
        return self.optimizers

    def gather(self, model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
        """Collective: the sharded model's full weights and optimizer states into the copy."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=full)
        states = [get_optimizer_state_dict(model, opt, options=full) for opt in optimizers]
        if not is_main():
            return
        self.model.load_state_dict(weights, strict=False)  # a tied weight may be listed under one name
        for twin, state in zip(self.optimizers, states):
            names = [n for group in state["param_groups"] for n in group["params"]]
            index = {n: i for i, n in enumerate(names)}
            twin.load_state_dict({
                "state": {index[n]: v for n, v in state["state"].items()},
                "param_groups": [{**group, "params": [index[n] for n in group["params"]]}
                                 for group in state["param_groups"]]})

    def scatter(self, model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
        """The copy's weights and optimizer states (every rank loaded them) into the sharded model."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, self.model.state_dict(), options=full)
        for twin, opt, names in zip(self.optimizers, optimizers, self.order):
            state = twin.state_dict()  # indices count this optimizer's parameters only
            set_optimizer_state_dict(model, opt, {
                "state": {names[i]: v for i, v in state["state"].items()},
                "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                 for group in state["param_groups"]]}, options=full)
