"""Which examples each optimizer step sees, and how they become tensors.

- `batch_stream` / `mixed_stream`: a seeded, endless order of steps (one job, or several mixed by a sampling rule);
  replayed from the start, it reaches the same step again, which is how a resumed run finds its place.
- `step_batches`: one step's examples as tensors on the device: each process's share, optionally split into
  micro-batches of similar length (train.split_by_length), optionally packed end to end (train.padding_free).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .. import evaluate
from ..config import TrainConfig
from ..errors import TunelabError
from . import distributed

GROUP_WINDOW = 50  # micro-batches whose examples are sorted by length together (train.group_by_length)


def batch_stream(n: int, cfg: TrainConfig, generator: torch.Generator, lengths: list[int] | None = None):
    """Yield (epoch position, [index lists of the micro-batches of one optimizer step], last step of epoch?) forever.

    The permutation is drawn per epoch and then cut into micro-batches, so the
    examples seen by one optimizer step do not depend on how the step is split
    into micro-batches (8x1 and 4x2 see the same 8 examples). With `lengths`
    (train.group_by_length), each window of GROUP_WINDOW micro-batches of the
    permutation is sorted by length before cutting, and the micro-batches are
    then shuffled: similar lengths share a batch, the order stays random.
    """
    epoch, size = 0, cfg.batch_size
    while True:
        # a tensor, not a list: a million-row epoch is 8 MB of indices instead of ~40 MB of Python ints
        perm = torch.randperm(n, generator=generator)
        if lengths is not None:
            window = GROUP_WINDOW * size
            perm = torch.tensor([i for w in range(0, n, window)
                                 for i in sorted(perm[w : w + window].tolist(), key=lambda i: -lengths[i])])
        n_chunks = math.ceil(n / size)
        order = torch.randperm(n_chunks, generator=generator).tolist() if lengths is not None else range(n_chunks)
        for start in range(0, n_chunks, cfg.grad_accum):
            done = min(start + cfg.grad_accum, n_chunks)
            yield (epoch + done / n_chunks, [perm[c * size : (c + 1) * size].tolist() for c in order[start:done]],
                   done == n_chunks)
        epoch += 1


def mixed_stream(jobs: list, cfg: TrainConfig, sampling: str = "proportional", temperature: float = 1.0):
    """Yield (epoch position, [(job index, example indices) per micro-batch of one optimizer step], epoch end?).

    `jobs`: the loop's Jobs. One job: `batch_stream` as it is. Several: each job walks its own shuffled epochs;
    every micro-batch picks its job by `sampling` — proportional to the jobs' sizes, temperature-scaled
    (size ** (1/T)), uniform, or round-robin — from one seeded generator. An "epoch" is as many micro-batches as
    all jobs' epochs together hold.
    """
    lengths = [_lengths(j.train) if cfg.group_by_length else None for j in jobs]
    if len(jobs) == 1:
        generator = torch.Generator().manual_seed(cfg.seed)
        for pos, chunks, end in batch_stream(len(jobs[0].train), cfg, generator, lengths[0]):
            yield pos, [(0, c) for c in chunks], end
        return
    single = cfg.model_copy(update={"grad_accum": 1})
    streams = [batch_stream(len(j.train), single, torch.Generator().manual_seed(cfg.seed + i), lengths[i])
               for i, j in enumerate(jobs)]
    sizes = torch.tensor([float(len(j.train)) for j in jobs])
    probs = {"proportional": sizes, "temperature": sizes ** (1.0 / temperature),
             "uniform": torch.ones(len(jobs))}.get(sampling)
    per_epoch = sum(math.ceil(len(j.train) / cfg.batch_size) for j in jobs)
    picker, drawn = torch.Generator().manual_seed(cfg.seed), 0
    while True:
        step = []
        for _ in range(cfg.grad_accum):
            i = drawn % len(jobs) if sampling == "round_robin" else int(torch.multinomial(probs, 1, generator=picker))
            step.append((i, next(streams[i])[1][0]))
            drawn += 1
        yield drawn / per_epoch, step, drawn // per_epoch != (drawn - cfg.grad_accum) // per_epoch


def _lengths(features):
    """Token lengths of a split's examples; streamed features (data.streaming) know them without tokenising."""
    known = getattr(features, "lengths", None)
    return known if known is not None else [evaluate.feature_length(f) for f in features]


def steps_per_epoch(jobs: list, cfg: TrainConfig) -> int:
    return math.ceil(sum(math.ceil(len(j.train) / cfg.batch_size) for j in jobs) / cfg.grad_accum)


def resolve_padding_free(setting: bool | str, jobs: list, log: Callable[[dict], None]) -> bool:
    """train.padding_free as on or off: checked on the model first (true: an error if it fails, 'auto': off)."""
    packing = [j for j in jobs if j.task.PACKS]
    if setting is False or not packing:
        return False
    fault = packing[0].task.packing_fault(packing[0].model)
    if fault and setting is True:
        raise TunelabError(f"train.padding_free=true, but this model cannot be trained on packed rows: {fault}. "
                           f"Set train.padding_free=false (or leave it 'auto', which falls back to padded rows).")
    log({"type": "padding_free", "on": fault is None, **({"why_off": fault} if fault else {})})
    if fault and distributed.is_main():
        print(f"train.padding_free=auto: padded rows, since {fault}", flush=True)
    return fault is None


# What one more forward + backward call costs, in tokens' worth of compute: measured for MiniLM on this project's
# 2-core CPU (33 ms per call, 0.45 ms per token: ~73), rounded down; on a GPU a call's fixed cost is far larger.
SPLIT_COST_CPU, SPLIT_COST_GPU = 64, 4096


def split_cost(cfg: TrainConfig, device, sharded: bool) -> float | None:
    """The cost per micro-batch that train.split_by_length weighs against padding; None when it is off. Sharded,
    every process must make the same forward calls (each gathers weights): no per-process cut."""
    if not cfg.split_by_length or sharded:
        return None
    return SPLIT_COST_GPU if torch.device(device).type == "cuda" else SPLIT_COST_CPU


def split_by_length(lengths: list[int], cost: float) -> list[list[int]]:
    """Positions of `lengths` in groups of similar length, minimising the padded tokens computed (group size times
    its longest) plus `cost` per group: sorted longest first, then the best cut points (dynamic programming)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    longest_first = [lengths[i] for i in order]
    best, cut = [0.0], [0]
    for end in range(1, len(order) + 1):  # groups of at most 256 rows, so a step costs O(256 n), not O(n^2)
        value, start = min((best[s] + (end - s) * longest_first[s] + cost, s) for s in range(max(0, end - 256), end))
        best.append(value)
        cut.append(start)
    groups, end = [], len(order)
    while end > 0:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]


def split(job, rows: list[int], padding_free: bool, cost: float | None) -> list[list[int]]:
    """One micro-batch's examples as micro-batches of similar length (train.split_by_length), so less padding is
    computed. The step's loss and gradient stay the same, since the loop sums each example's loss over the step
    and divides by the step's count; a task whose loss couples the rows of a batch (in-batch negatives) must set
    ROWS_INTERACT = True to be left whole. Packed rows (padding-free) have no padding to drop."""
    if cost is None or len(rows) < 2 or job.task.ROWS_INTERACT or (padding_free and job.task.PACKS):
        return [rows]
    lengths = [evaluate.feature_length(job.train[x]) for x in rows]
    return [[rows[k] for k in group] for group in split_by_length(lengths, cost)]


def collate(job, rows: list[dict], padding_free: bool) -> dict:
    """A micro-batch as tensors: padded rows, or (train.padding_free, tasks that pack) its examples packed end to
    end into as few rows as fit the longest of them."""
    if padding_free and job.task.PACKS:
        # Rows no longer than the longest example: attention runs over a whole packed row (the mask only hides the
        # other examples), so one row of everything costs (total tokens)^2. On the 58M LoRA bench: 599 tok/s
        # against 513 for a single row, and the single row of 8 x 320 tokens raised peak RSS by ~50 %.
        rows = job.task.pack(rows, max(len(r["input_ids"]) for r in rows))
    return job.task.collate(rows, job.pad_id)


def step_batches(jobs: list, chunks: list[tuple[int, list[int]]], padding_free: bool, cost: float | None,
                 device) -> tuple[list[tuple[object, dict]], list[bool]]:
    """One optimizer step's micro-batches (`chunks`, from the stream) as ([(job, tensors on `device`)], real?).
    Each process takes every N-th example of each micro-batch (all of it in one process); a process whose share
    is empty takes the first example, not `real`, so that it still takes part in the step (with weight 0)."""
    rank, world = distributed.rank(), distributed.world()
    batches, real = [], []
    for i, c in chunks:
        share, counts = c[rank::world] or c[:1], bool(c[rank::world])
        for part in split(jobs[i], share, padding_free, cost):
            tensors = collate(jobs[i], [jobs[i].train[x] for x in part], padding_free)
            batches.append((jobs[i], {k: v.to(device) for k, v in tensors.items()}))
            real.append(counts)
    return batches, real
