"""The training loop: one, written out top to bottom, for every method and task.

What varies between tasks lives in the task module (collate, loss, count,
metrics); what varies between methods is already decided by which parameters
have requires_grad. So nothing here branches on either.
"""

from __future__ import annotations

import functools
import inspect
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from .. import evaluate
from ..config import TrainConfig
from ..errors import TunelabError
from . import checkpoint, distributed, optim


LOWER_IS_BETTER = ("loss", "perplexity", "mse", "rmse", "mae", "hamming_loss")


def resolve_metric(task, name: str) -> tuple[str, bool]:
    """(metric name, greater is better) for best-checkpoint selection and early stopping."""
    metric = task.MAIN_METRIC if name == "auto" else name
    if metric not in task.METRICS:
        raise TunelabError(
            f"train.metric='{name}' is not a metric of this task. Choose one of: {', '.join(task.METRICS)} (or 'auto')."
        )
    return metric, metric not in LOWER_IS_BETTER


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


@dataclass
class Job:
    """One task of a run: its module, its model (sharing the body with the others), its data and loss weight.
    `adapter` names the adapter to activate for it (one adapter per task), None when all share one."""

    name: str
    task: object
    model: object
    train: list
    validation: list
    info: dict
    pad_id: int
    weight: float = 1.0
    adapter: str | None = None
    loss_options: dict | None = None  # keyword arguments of task.loss, e.g. label_smoothing


def run(model, task, train: list[dict], validation: list[dict], info: dict, cfg: TrainConfig, head: list[str],
        pad_id: int, device, eval_batch_size: int, log: Callable[[dict], None],
        unfreeze: list[tuple[str, list[str]]] = (), checkpoints=None, resume=None) -> dict:
    """Train one task: `run_jobs` with a single job of weight 1."""
    options = {"label_smoothing": cfg.label_smoothing} if cfg.label_smoothing else {}
    if "info" in inspect.signature(task.loss).parameters:  # a loss with settings of its own (dpo: beta, loss type)
        options["info"] = info
    return run_jobs(model, [Job("default", task, model, train, validation, info, pad_id, loss_options=options)], cfg,
                    head, device, eval_batch_size, log, unfreeze=unfreeze, checkpoints=checkpoints, resume=resume)


def mixed_stream(jobs: list[Job], cfg: TrainConfig, sampling: str = "proportional", temperature: float = 1.0):
    """Yield (epoch position, [(job index, example indices) per micro-batch of one optimizer step], epoch end?).

    One job: `batch_stream` as it is. Several: each job walks its own shuffled epochs; every micro-batch
    picks its job by `sampling` — proportional to the jobs' sizes, temperature-scaled (size ** (1/T)),
    uniform, or round-robin — from one seeded generator. An "epoch" is as many micro-batches as all jobs'
    epochs together hold.
    """
    lengths = [_lengths(j.train) if cfg.group_by_length else None for j in jobs]
    if len(jobs) == 1:
        for pos, chunks, end in batch_stream(len(jobs[0].train), cfg, torch.Generator().manual_seed(cfg.seed), lengths[0]):
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


def _steps_per_epoch(jobs: list[Job], cfg: TrainConfig) -> int:
    return math.ceil(sum(math.ceil(len(j.train) / cfg.batch_size) for j in jobs) / cfg.grad_accum)


def _oriented(metrics: dict, metric: str) -> float:
    return -metrics[metric] if metric in LOWER_IS_BETTER else metrics[metric]


def evaluate_jobs(jobs: list[Job], owner, eval_batch_size: int, device) -> dict:
    """Validation metrics: the task's own for one job; for several, `<job>/<metric>` for each and `score`, the
    loss-weighted mean of every job's main metric (lower-is-better ones negated), for model selection."""
    from .. import methods

    results = {}
    for j in jobs:
        if j.adapter:
            methods.set_adapter(owner, j.adapter)
        results[j.name] = evaluate.run(j.model, j.task, j.validation, j.info, eval_batch_size, j.pad_id, device)
    if len(jobs) == 1:
        return results[jobs[0].name]
    flat = {f"{name}/{k}": v for name, m in results.items() for k, v in m.items() if isinstance(v, (int, float))}
    total = sum(j.weight for j in jobs)
    flat["score"] = sum(j.weight * _oriented(results[j.name], j.task.MAIN_METRIC) for j in jobs) / total
    return flat


def resolve_padding_free(setting: bool | str, jobs: list[Job], log: Callable[[dict], None]) -> bool:
    """train.padding_free as on or off: checked on the model first (true: an error if it fails, 'auto': off)."""
    packing = [j for j in jobs if hasattr(j.task, "pack")]
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


def _split(job: Job, rows: list[int], padding_free: bool, cost: float | None) -> list[list[int]]:
    """One micro-batch's examples as micro-batches of similar length (train.split_by_length), so less padding is
    computed. The step's loss and gradient stay the same, since the loop sums each example's loss over the step
    and divides by the step's count; a task whose loss couples the rows of a batch (in-batch negatives) must set
    ROWS_INTERACT = True to be left whole. Packed rows (padding-free) have no padding to drop."""
    if cost is None or len(rows) < 2 or getattr(job.task, "ROWS_INTERACT", False) or \
            (padding_free and hasattr(job.task, "pack")):
        return [rows]
    lengths = [evaluate.feature_length(job.train[x]) for x in rows]
    return [[rows[k] for k in group] for group in split_by_length(lengths, cost)]


def _collate(job: Job, rows: list[dict], padding_free: bool) -> dict:
    """A micro-batch as tensors: padded rows, or (train.padding_free, tasks that pack) its examples packed end to
    end into as few rows as fit the longest of them."""
    if padding_free and hasattr(job.task, "pack"):
        # Rows no longer than the longest example: attention runs over a whole packed row (the mask only hides the
        # other examples), so one row of everything costs (total tokens)^2. On the 58M LoRA bench: 599 tok/s
        # against 513 for a single row, and the single row of 8 x 320 tokens raised peak RSS by ~50 %.
        rows = job.task.pack(rows, max(len(r["input_ids"]) for r in rows))
    return job.task.collate(rows, job.pad_id)


@functools.lru_cache(maxsize=None)
def _bf16_ok(device: torch.device) -> bool:
    return device.type != "cuda" or torch.cuda.is_bf16_supported()  # asked once per device, not per micro-batch


def autocast(device, precision: str):
    """The training forward's precision: bf16 autocast (fp32 master weights), or nothing for fp32."""
    device = torch.device(device)
    if precision == "bf16" and not _bf16_ok(device):
        raise TunelabError(f"train.precision=bf16: the GPU {torch.cuda.get_device_name(device)} has no bfloat16 "
                           f"support. Use train.precision=fp32.")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def accumulate(batches: list[tuple[Job, dict]], owner=None, precision: str = "fp32", parallel=None,
               real: list[bool] | None = None) -> float:
    """Backward of one optimizer step's loss, sum over jobs of weight_t * L_t, L_t being job t's summed loss over
    its items in the step (all its micro-batches: accumulation == one big batch). Returns the loss value.
    Several processes (`parallel`: the DDP or FSDP2 module of the task loss, one job): each holds its share of the
    step's items, the count is the step's over all of them, and each loss is scaled by the process count, which
    the gradient average divides out again; a batch not `real` (a process whose share of a micro-batch is empty)
    only takes part, with weight 0."""
    from .. import methods

    real = real or [True] * len(batches)
    n_items: dict[str, int] = {}
    for (job, batch), counts in zip(batches, real):
        n_items[job.name] = n_items.get(job.name, 0) + (job.task.count(batch) if counts else 0)
    if parallel is not None:
        (name,) = n_items
        n_items[name] = distributed.total([n_items[name]])[0]
    scale = distributed.world() if parallel is not None else 1
    total = 0.0
    for i, ((job, batch), counts) in enumerate(zip(batches, real)):
        if job.adapter:
            methods.set_adapter(owner, job.adapter)
        device = next(iter(batch.values())).device
        with distributed.no_sync(parallel, last=i == len(batches) - 1), autocast(device, precision):
            options = job.loss_options or {}
            summed = parallel(batch, options) if parallel is not None else job.task.loss(job.model, batch, **options)
            loss = job.weight * summed * (scale if counts else 0.0) / max(n_items[job.name], 1)
            loss.backward()
        total += loss.item() / scale
    return distributed.total([total])[0] if parallel is not None else total


def run_jobs(model, jobs: list[Job], cfg: TrainConfig, head: list[str], device, eval_batch_size: int,
             log: Callable[[dict], None], sampling: str = "proportional", temperature: float = 1.0,
             owner=None, unfreeze: list[tuple[str, list[str]]] = (), checkpoints=None, resume=None) -> dict:
    """The loop. `model` holds every trainable parameter (one task's model, or a container of several sharing
    a body); each step's loss is sum over jobs of weight_t * (their summed loss / their item count in the step).
    `unfreeze`: (label, parameter names) stages made trainable one at a time (gradual unfreezing); they are in the
    optimizer from the start, and AdamW keeps no state for them and leaves them alone until they get gradients.
    `checkpoints` (checkpoint.Checkpoints): saved at each evaluation and every train.checkpoint_every steps;
    `resume` (what Checkpoints.latest returned): the loop goes on from that step as if it had never stopped."""
    for j in jobs:
        if not j.train:
            raise TunelabError(f"The training split{'' if len(jobs) == 1 else ' of task ' + repr(j.name)} is empty after "
                               f"cleaning; see data_report.json for what was dropped.")
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * _steps_per_epoch(jobs, cfg)))
    if len(jobs) == 1:
        metric, greater = resolve_metric(jobs[0].task, cfg.metric)
    else:
        metric, greater = (cfg.metric, cfg.metric.rsplit("/", 1)[-1] not in LOWER_IS_BETTER) if cfg.metric != "auto" \
            else ("score", True)
    stages = list(unfreeze)
    header_log = log if resume is None else (lambda record: None)  # a resumed run's log has its header already
    padding_free = resolve_padding_free(cfg.padding_free, jobs, header_log)  # checked on the model as it is
    rank, world = distributed.rank(), distributed.world()
    parallel, sharded = None, False
    if world > 1:  # before the optimizer: sharding (FSDP2) replaces the parameters
        if len(jobs) > 1 or stages:
            distributed.refuse("multi-task training" if len(jobs) > 1 else "gradual unfreezing (train.unfreeze)")
        parallel, sharded = distributed.wrap(model, jobs[0].task, device)
        header_log({"type": "distributed", "processes": world, "strategy": "fsdp2" if sharded else "ddp",
                    "backend": torch.distributed.get_backend()})
    opt, sched, groups = optim.build(model, head, cfg, total_steps, [n for _, names in stages for n in names])
    trainable = [p for g in groups for p in g["params"]]
    header_log({"type": "optimizer", "groups": [{"name": g["name"], "lr": g["lr"], "weight_decay": g["weight_decay"],
                                                 "params": sum(p.numel() for p in g["params"])} for g in groups]})

    optimized = {id(p) for g in groups for p in g["params"]}  # the best state covers what the optimizer may change
    plateau_bad = 0
    if cfg.layer_lr_decay:
        print("optimizer groups: " + ", ".join(f"{g['name']} lr {g['lr']:.3g}" for g in groups if not g["name"].endswith("_no_decay")),
              flush=True)
    # Sharded, every process must make the same forward calls (each gathers weights): no per-process cut.
    split_cost = (SPLIT_COST_GPU if torch.device(device).type == "cuda" else SPLIT_COST_CPU) \
        if cfg.split_by_length and not sharded else None
    stream = mixed_stream(jobs, cfg, sampling, temperature)
    best = {"value": None, "step": 0, "state": None, "metrics": None}
    bad_evals, tokens, train_seconds, running = 0, 0, 0.0, []
    stopped_early = False
    bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True,
               disable=None if distributed.is_main() else True)
    write = bar.write if distributed.is_main() else (lambda message: None)  # one process speaks for all

    # EMA of the weights (train.ema_decay): evaluation and the best state use the average, training the raw weights.
    live = [p for n, p in model.named_parameters() if id(p) in optimized]
    ema = [p.detach().clone() for p in live] if cfg.ema_decay else None

    def swap_ema() -> None:
        with torch.no_grad():
            for p, e in zip(live, ema):
                tmp = p.detach().clone()
                p.copy_(e)
                e.copy_(tmp)

    def evaluate_now(step: int, epoch: float) -> bool:
        """Evaluate, keep the best trainable state; True when patience has run out."""
        if ema:
            swap_ema()  # the average in the model, the raw weights kept aside
        try:
            return _evaluate_now(step, epoch)
        finally:
            if ema:
                swap_ema()

    def _evaluate_now(step: int, epoch: float) -> bool:
        nonlocal bad_evals, plateau_bad
        with distributed.gathered(parallel):
            metrics = evaluate_jobs(jobs, owner, eval_batch_size, device)
        if metric not in metrics:
            raise TunelabError(f"train.metric='{metric}' is not among the validation metrics ({', '.join(metrics)}).")
        value = metrics[metric]
        # NaN never counts as better, so a diverged run keeps the last sane weights.
        improved = not math.isnan(value) and (best["value"] is None or (value > best["value"] if greater else value < best["value"]))
        if improved:
            best.update(value=value, step=step, metrics=metrics,
                        state={n: p.detach().clone() for n, p in model.named_parameters() if id(p) in optimized})
            bad_evals = plateau_bad = 0
        else:
            bad_evals += 1
            plateau_bad += 1
        log({"type": "eval", "step": step, "epoch": round(epoch, 4), "split": "validation", "improved": improved, **metrics})
        if cfg.plateau_factor and plateau_bad >= cfg.plateau_patience:
            plateau = sched.plateau
            lowered = max(plateau["scale"] * cfg.plateau_factor, cfg.min_lr / cfg.lr)
            if lowered < plateau["scale"]:
                for g in opt.param_groups:  # at once, not from the scheduler's next step
                    g["lr"] *= lowered / plateau["scale"]
                plateau["scale"], plateau_bad = lowered, 0
                log({"type": "plateau", "step": step, "lr_scale": lowered})
                write(f"step {step}: no improvement in {cfg.plateau_patience} evaluations, LR x{lowered:.3g} from now on")
        best_so_far = "best" if improved else f"best {best['value'] if best['value'] is not None else float('nan'):.4f} at step {best['step']}"
        write(f"step {step}: validation {metric}={value:.4f} ({best_so_far})")
        return cfg.patience is not None and bad_evals >= cfg.patience

    name_of = {id(p): n for n, p in model.named_parameters()}
    bad_steps, spikes = 0, {"mean": None, "var": 0.0}  # the NaN guard's count in a row; the loss's running mean/var
    last_eval, first_step = 0, 1

    def save_checkpoint(step: int, epoch: float) -> None:
        # sharded tensors are gathered whole (every process takes part); the first process writes them
        tensors, rng = checkpoint.rng_state()
        moments, opt_groups = checkpoint.optimizer_state(opt)
        full = distributed.full
        files = {"trainable": {name_of[id(p)]: full(p) for p in live}, "optimizer": {k: full(v) for k, v in moments.items()},
                 "rng": tensors}
        if ema:
            files["ema"] = {name_of[id(p)]: full(e) for p, e in zip(live, ema)}
        state = {"step": step, "epoch": epoch, "total_steps": total_steps, "tokens": tokens,
                 "train_seconds": train_seconds, "running": running, "bad_evals": bad_evals, "plateau_bad": plateau_bad,
                 "last_eval": last_eval, "bad_steps": bad_steps, "spikes": spikes,
                 "stages_done": len(unfreeze) - len(stages), "plateau": sched.plateau, "scheduler": sched.state_dict(),
                 "optimizer_groups": opt_groups, "rng": rng, "log_bytes": checkpoints.log_bytes(),
                 "best": {k: best[k] for k in ("value", "step", "metrics")}}
        checkpoints.save(step, files, state, best["step"] if best["state"] is not None else None)

    if resume is not None:
        path, state, files = resume
        checkpoint.check_fits(path, files["trainable"], {name_of[id(p)]: tuple(p.shape) for p in live})
        like = distributed.like  # a whole tensor, sharded as the parameter is
        with torch.no_grad():
            for p in live:
                p.copy_(like(files["trainable"][name_of[id(p)]], p))
            for p, e in zip(live, ema or []):
                e.copy_(like(files["ema"][name_of[id(p)]], e))
        checkpoint.load_optimizer_state(opt, files["optimizer"], state["optimizer_groups"], like)
        sched.load_state_dict(state["scheduler"])
        sched.plateau.update(state["plateau"])  # in place: the schedule's lambda reads this dict
        for i, (g, pg) in enumerate(zip(groups, opt.param_groups)):  # config.yaml's LR, edited (--resume-anyway)
            if g["lr"] != sched.base_lrs[i]:
                sched.base_lrs[i] = pg["initial_lr"] = g["lr"]
                pg["lr"] = g["lr"] * sched.lr_lambdas[i](sched.last_epoch)
            pg["weight_decay"] = g["weight_decay"]
        params = dict(model.named_parameters())
        for _ in range(state["stages_done"]):  # the blocks unfrozen by then train again
            for name in stages.pop(0)[1]:
                params[name].requires_grad_(True)
        for _ in range(state["step"]):  # the data order is a seeded stream: replayed, it is where it was
            next(stream)
        tokens, train_seconds, running = state["tokens"], state["train_seconds"], state["running"]
        bad_evals, plateau_bad, last_eval = state["bad_evals"], state["plateau_bad"], state["last_eval"]
        bad_steps, spikes = state["bad_steps"], state["spikes"]
        best.update(state["best"])
        if best["value"] is not None:  # the best weights are the trainable (or EMA) ones of the best step's checkpoint
            kept = checkpoints.read(best["step"])
            best["state"] = {name_of[id(p)]: like(kept["ema" if ema else "trainable"][name_of[id(p)]], p).clone()
                             for p in live}
        checkpoint.set_rng_state(files["rng"], state["rng"])
        first_step = state["step"] + 1
        bar.update(state["step"])
        log({"type": "resume", "step": state["step"], "checkpoint": path.name})
        write(f"resumed from {path.name}: step {state['step']} of {total_steps}")

    model.train()
    step = first_step - 1
    for step in range(first_step, total_steps + 1):
        t0 = time.perf_counter()
        epoch_pos, chunks, epoch_end = next(stream)
        # Each process takes every N-th example of each micro-batch (all of it in one process).
        shares = [(i, c[rank::world] or c[:1], bool(c[rank::world])) for i, c in chunks]
        batches, real = [], []
        for i, share, counts in shares:
            for part in _split(jobs[i], share, padding_free, split_cost):
                batches.append((jobs[i], {k: v.to(device) for k, v in
                                          _collate(jobs[i], [jobs[i].train[x] for x in part], padding_free).items()}))
                real.append(counts)
        step_loss = accumulate(batches, owner, cfg.precision, parallel, real)
        tokens += int(distributed.total([sum(int(b["attention_mask"].sum()) for (_, b), r in zip(batches, real) if r)])[0])
        grad_norm = distributed.full(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm or float("inf")))
        lrs = {g["name"]: pg["lr"] for g, pg in zip(groups, opt.param_groups)}
        lr = max((v for k, v in lrs.items() if not k.startswith("head")), default=next(iter(lrs.values())))
        finite = math.isfinite(step_loss) and math.isfinite(float(grad_norm))
        if finite:
            opt.step()
            if ema:
                with torch.no_grad():
                    for p, e in zip(live, ema):
                        e.lerp_(p.detach(), 1.0 - cfg.ema_decay)
        sched.step()  # the schedule follows the step count, skipped steps included
        opt.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - t0

        if not finite:  # the NaN guard: the weights stay as they were
            bad_steps += 1
            log({"type": "skipped", "step": step, "loss": step_loss, "grad_norm": float(grad_norm), "in_a_row": bad_steps})
            write(f"step {step}: loss {step_loss:.4g}, gradient norm {float(grad_norm):.4g}: not finite, step skipped")
            if bad_steps >= cfg.max_bad_steps:
                bar.close()
                kept = checkpoints.list() if checkpoints else []
                raise TunelabError(
                    f"Training stopped at step {step}: the loss or gradient was not finite for {bad_steps} steps in a "
                    f"row (train.max_bad_steps={cfg.max_bad_steps}), so every update since step {step - bad_steps} "
                    f"was skipped. " + (f"The last good checkpoint is {kept[-1]}. " if kept else "") +
                    f"Lower train.lr (now {cfg.lr:g}), set train.max_grad_norm (e.g. 1.0), use train.precision=fp32, or "
                    f"look for extreme values in the data; then start again" +
                    (", or edit config.yaml in the run directory and `tunelab train --resume RUN_DIR --resume-anyway` "
                     "it (--resume-anyway: go on although the config changed)." if kept else "."))
            running.append(float("nan"))
        else:
            bad_steps = 0
            running.append(step_loss)
            mean = spikes["mean"]
            # a loss far above its running mean (4 standard deviations, and 50 % over it) is reported, not acted on
            if mean is not None and step > 10 and step_loss > mean + 4 * spikes["var"] ** 0.5 and step_loss > 1.5 * mean:
                log({"type": "loss_spike", "step": step, "loss": step_loss, "running_mean": mean})
                write(f"step {step}: loss spike, {step_loss:.4f} against a running mean of {mean:.4f}")
            spikes["mean"] = step_loss if mean is None else 0.9 * mean + 0.1 * step_loss
            spikes["var"] = 0.9 * spikes["var"] + 0.1 * (step_loss - spikes["mean"]) ** 2
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
        if step % cfg.log_every == 0 or step == total_steps:
            finite_losses = [x for x in running if math.isfinite(x)]
            mean_loss = sum(finite_losses) / len(finite_losses) if finite_losses else float("nan")
            log({"type": "train", "step": step, "epoch": round(epoch_pos, 4), "loss": mean_loss,
                 "lr": lr, "lrs": lrs, "grad_norm": float(grad_norm), "tokens": tokens})
            running = []
            if bar.disable and distributed.is_main():  # no terminal (CI, nohup, a pipe): a plain line stands in for the bar
                eta = train_seconds / step * (total_steps - step)
                print(f"step {step}/{total_steps} loss {mean_loss:.4f} lr {lr:.2e} eta {eta / 60:.1f} min", flush=True)
        if stages and (epoch_end if cfg.unfreeze_every == "epoch" else step % cfg.unfreeze_every == 0):
            label, names = stages.pop(0)
            params = dict(model.named_parameters())
            for name in names:
                params[name].requires_grad_(True)
            log({"type": "unfreeze", "step": step, "unfrozen": label, "still_frozen": [s[0] for s in stages]})
            write(f"step {step}: unfroze {label}" + (f"; still frozen: {', '.join(s[0] for s in stages)}" if stages else "; all blocks train now"))
        due = epoch_end if cfg.eval_every == "epoch" else step % cfg.eval_every == 0
        stop = False
        if due or step == total_steps:
            last_eval = step
            stop = evaluate_now(step, epoch_pos) and step < total_steps
        if checkpoints is not None and (due or step == total_steps or
                                        (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
            save_checkpoint(step, epoch_pos)
        if stop:
            stopped_early = True
            write(f"early stopping at step {step}: no improvement in {cfg.patience} evaluations")
            break
    bar.close()

    # Restore the best weights; frozen parameters never changed, so the trainable ones suffice.
    params = dict(model.named_parameters())
    if best["state"] is None:
        write(f"warning: validation {metric} was never a number (diverged?); keeping the last weights")
    with torch.no_grad():
        for name, value in (best["state"] or {}).items():
            params[name].copy_(value)
    model.eval()
    return {
        "steps": step, "total_steps": total_steps, "best_step": best["step"], "best_metric": {metric: best["value"]},
        "stopped_early": stopped_early, "last_eval_step": last_eval, "train_seconds": train_seconds,
        "train_tokens": tokens, "tokens_per_second": tokens / max(train_seconds, 1e-9), "eval": best["metrics"],
        "optimizer_groups": [{"name": g["name"], "lr": g["lr"], "weight_decay": g["weight_decay"], "params": g["param_names"]} for g in groups],
        "sharded": sharded,
    }
