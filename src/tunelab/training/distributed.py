"""Training in several processes on PyTorch's own engine: torchrun starts them, torch.distributed connects them
(gloo on CPU, nccl on GPU), DistributedDataParallel averages the gradients.

tunelab's semantics do not change with the process count: train.batch_size is the micro-batch of the whole
job, and each process takes every N-th example of it; each step's loss is divided by the step's item count over
all processes. So one process and two see the same examples per step and compute the same update.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn

from .. import models
from ..errors import TunelabError
from ..ops.processes import active, rank, world  # noqa: F401  (this module's API: distributed.world())


def setup(device) -> None:
    """Join the process group when torchrun started this process (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")


def is_main() -> bool:
    return rank() == 0


def total(values: list[float]) -> list[float]:
    """Element-wise sums over all processes (the values themselves in one process)."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def broadcast(value):
    """Rank 0's value, on every process (e.g. the run directory a rank-0 decision made)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class TaskLoss(nn.Module):
    """The task's loss as a module, so the whole of it (the body, and heads or LM losses the task reaches
    directly) runs inside DistributedDataParallel's forward and every gradient it makes is averaged."""

    def __init__(self, model: nn.Module, task):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, batch: dict, info: dict) -> torch.Tensor:
        return self.task.loss(self.model, batch, info)


def wrap(model: nn.Module, task, device):
    """(module whose forward is the task's loss, sharded?) in several processes, (None, False) in one.
    Full fine-tuning (every parameter trains) is sharded with FSDP2: each transformer block and then the rest
    own a 1/N slice of the weights, gradients and AdamW moments, gathered block by block as the forward needs
    them. Anything else (adapters, frozen layers) is small to train, so DDP keeps a whole copy per process."""
    if not active():
        return None, False
    device = torch.device(device)
    root = TaskLoss(model, task)
    if all(p.requires_grad for p in model.parameters()):
        from torch.distributed.fsdp import fully_shard

        for block in models.blocks(model)[1]:
            fully_shard(block)
        return fully_shard(root), True
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(root, device_ids=[device.index] if device.type == "cuda" else None), False


def no_sync(wrapped, last: bool):
    """DDP averages the gradients once per optimizer step, at its last micro-batch (FSDP2 reduces each one)."""
    if wrapped is not None and not last and hasattr(wrapped, "no_sync"):
        return wrapped.no_sync()
    return contextlib.nullcontext()


@contextlib.contextmanager
def gathered(wrapped):
    """The sharded weights outside the blocks gathered whole, for a forward that does not go through the task
    loss (evaluation); the blocks gather their own."""
    if wrapped is None or not hasattr(wrapped, "unshard"):
        yield
        return
    wrapped.unshard()
    try:
        yield
    finally:
        wrapped.reshard()


def full(t):
    """A sharded tensor (DTensor) gathered whole on every process (every process must call this); others as
    they are."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def like(whole: torch.Tensor, ref):
    """`whole` sharded as `ref` is (its own slice on this process), or itself when `ref` is not sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(ref, DTensor):
        return whole
    return distribute_tensor(whole.to(ref.device_mesh.device_type), ref.device_mesh, ref.placements)


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of a sharded model, whole (every process must call this)."""
    return {name: full(t.detach()) for name, t in [*model.named_parameters(), *model.named_buffers()]}


def refuse(what: str) -> None:
    if active():
        raise TunelabError(f"{what} does not run in several processes yet; train it with one process "
                           f"(without torchrun or --nproc).")
