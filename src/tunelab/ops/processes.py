"""Where this process stands in a torchrun job: whether there are several, this one's rank, how many. Tasks ask
it (e.g. an option that works in one process only) without importing training."""

from __future__ import annotations

import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1
