"""Several processes, one model: PyTorch's DistributedDataParallel, or FSDP with --fsdp, under torchrun.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them (or with one process and no FSDP) the
model is used as it is and every function here is a no-op. Rank 0 prepares the data, logs and saves;
every rank computes its share of each batch. Checkpoints always hold full, unsharded tensors, so a run
saved by N processes resumes on M. Backend: nccl on CUDA, gloo on CPU. Stopping is by signal
(StopSignals), which the ranks agree on at step boundaries.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from gpt.config import UsageError


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    fsdp: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def start(device: torch.device, fsdp: bool) -> tuple[World, torch.device]:
    """Join the process group torchrun describes; on CUDA each process takes the GPU of its local rank."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1 and not fsdp:
        return World(), device
    if "RANK" not in os.environ:
        raise UsageError("--fsdp needs the torchrun launcher: torchrun --standalone --nproc_per_node=N -m gpt train "
                         "--fsdp ...")
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")), fsdp)
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, device


def stop(world: World) -> None:
    if world.active:
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """The module the training step calls: DDP averages gradients, FSDP also shards parameters and state."""
    if world.fsdp:
        try:
            from torch.distributed.fsdp import fully_shard  # torch >= 2.6
        except ImportError:  # torch 2.4-2.5
            from torch.distributed._composable.fsdp import fully_shard
        for block in model.blocks:
            fully_shard(block)
        return fully_shard(model)
    if world.size > 1:
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def gradient_sync(wrapped: nn.Module, world: World, enabled: bool):
    """Skip the all-reduce on the micro-steps before the last one of a step: gradients just accumulate."""
    if enabled or not world.active:
        return contextlib.nullcontext()
    if world.fsdp:
        wrapped.set_requires_gradient_sync(False)
        return _restore_sync(wrapped)
    return wrapped.no_sync()


@contextlib.contextmanager
def _restore_sync(wrapped: nn.Module):
    try:
        yield
    finally:
        wrapped.set_requires_gradient_sync(True)


def share(value, world: World):
    """Rank 0's value (any picklable object) on every rank; a barrier too."""
    if not world.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def average(value: torch.Tensor, world: World) -> torch.Tensor:
    if world.active:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= world.size
    return value


def agree(values: list[float], world: World) -> list[float]:
    """Every rank gets the largest of each value (elapsed time, stop requests): all ranks decide alike."""
    if not world.active:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def full_state(wrapped: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, world: World):
    """Unsharded model and optimizer state dicts (complete on rank 0), keyed like a single-process run."""
    if not world.fsdp:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optimizer_state = get_state_dict(wrapped, optimizer, options=options)  # a collective
    if not world.is_main:  # cpu_offload leaves the full tensors on rank 0 only
        return {}, {}
    return model_state, _optimizer_by_index(optimizer_state, _order(wrapped, optimizer))


def load_state(wrapped: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
               optimizer_state: dict, world: World) -> None:
    """Load a full (single-process-style) state into the possibly sharded model and its optimizer."""
    if not world.fsdp:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_state_dict(wrapped, optimizer, model_state_dict=model_state,
                   optim_state_dict=_optimizer_by_name(optimizer_state, _order(wrapped, optimizer)),
                   options=options)


def _order(wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's numbering (group by group), as a single process numbers them."""
    name_of = {id(p): name for name, p in wrapped.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _optimizer_by_index(state: dict, order: list[str]) -> dict:
    """FSDP's full optimizer state is keyed by parameter name; a single process keys it by index."""
    index = {name: i for i, name in enumerate(order)}
    groups = [dict(g, params=[index[n] for n in g["params"]]) for g in state["param_groups"]]
    return {"state": {index[n]: s for n, s in state["state"].items()}, "param_groups": groups}


def _optimizer_by_name(state: dict, order: list[str]) -> dict:
    groups = [dict(g, params=[order[i] for i in g["params"]]) for g in state["param_groups"]]
    return {"state": {order[i]: s for i, s in state["state"].items()}, "param_groups": groups}


class StopSignals:
    """SIGINT and SIGTERM ask the loop to stop after the current step; the same signal again stops at once.

    (Ctrl-C under torchrun delivers SIGINT, then the launcher's SIGTERM: that still saves.)
    """

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received == name:
            raise KeyboardInterrupt
        self.received = self.received or name

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
