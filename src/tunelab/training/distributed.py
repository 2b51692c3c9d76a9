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

from ..errors import TunelabError


def setup(device) -> None:
    """Join the process group when torchrun started this process (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


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

    def forward(self, batch: dict, options: dict) -> torch.Tensor:
        return self.task.loss(self.model, batch, **options)


def wrap(model: nn.Module, task, device):
    """DistributedDataParallel around the task's loss, or None in one process."""
    if not active():
        return None
    from torch.nn.parallel import DistributedDataParallel

    device = torch.device(device)
    return DistributedDataParallel(TaskLoss(model, task), device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(ddp, last: bool):
    """Gradients are averaged once per optimizer step, at its last micro-batch."""
    return ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext()


def refuse(what: str) -> None:
    if active():
        raise TunelabError(f"{what} does not run in several processes yet; train it with one process "
                           f"(without torchrun or --nproc).")
