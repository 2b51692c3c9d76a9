"""The training loop: one, written out top to bottom, for every method and task.

Features:
- gradient accumulation (== one big batch), bf16 autocast, gradient clipping, AdamW with per-group LRs
  (head, layer-wise decay) and a warmup/decay schedule (optim.py)
- batch order: seeded epochs, length grouping, splitting by length, padding-free packing, several tasks mixed
  by a sampling rule (batches.py)
- evaluation every N steps or epochs; the best weights kept and restored at the end; early stopping
- an EMA of the weights for evaluation (ema.py); LR lowered on a plateau (plateau.py)
- the NaN guard (non-finite steps skipped) and a loss-spike report (guard.py)
- gradual unfreezing of blocks in stages
- checkpoints every N steps and at each evaluation, and a resume that gives bit-identical weights (state.py)
- several processes: DDP or FSDP2 (distributed.py)
- SIGTERM / Ctrl-C: the step under way finishes, a checkpoint is saved, the run ends resumable (stop.py)

What varies between tasks lives in the task module (collate, loss, count,
metrics); what varies between methods is already decided by which parameters
have requires_grad. So nothing here branches on either.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .. import evaluate, methods
from ..config import TrainConfig
from ..errors import TunelabError
from . import batches, distributed, heap, optim, state
from .batches import batch_stream, mixed_stream, split_by_length
from .ema import EMA
from .guard import Guard, finite
from .plateau import Plateau
from .stop import Interrupted, on_signal

# batch_stream, mixed_stream and split_by_length moved to batches.py; named here too, as callers know them
__all__ = ["LOWER_IS_BETTER", "Job", "accumulate", "autocast", "batch_stream", "evaluate_jobs", "mixed_stream",
           "resolve_metric", "run", "run_jobs", "split_by_length"]

LOWER_IS_BETTER = ("loss", "perplexity", "mse", "rmse", "mae", "hamming_loss")


def resolve_metric(task, name: str) -> tuple[str, bool]:
    """(metric name, greater is better) for best-checkpoint selection and early stopping."""
    metric = task.MAIN_METRIC if name == "auto" else name
    if metric not in task.METRICS:
        raise TunelabError(
            f"train.metric='{name}' is not a metric of this task. Choose one of: {', '.join(task.METRICS)} (or 'auto')."
        )
    return metric, metric not in LOWER_IS_BETTER


def _selection_metric(jobs: list[Job], cfg: TrainConfig) -> tuple[str, bool]:
    """resolve_metric for one job; for several, a `<job>/<metric>` as named, or `score` (evaluate_jobs)."""
    if len(jobs) == 1:
        return resolve_metric(jobs[0].task, cfg.metric)
    if cfg.metric == "auto":
        return "score", True
    return cfg.metric, cfg.metric.rsplit("/", 1)[-1] not in LOWER_IS_BETTER


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
    loss_info: dict | None = None  # what task.loss is given: `info`, plus train settings a loss reads

    def __post_init__(self):
        if self.loss_info is None:
            self.loss_info = self.info


def run(model, task, train: list[dict], validation: list[dict], info: dict, cfg: TrainConfig, head: list[str],
        pad_id: int, device, eval_batch_size: int, log: Callable[[dict], None],
        unfreeze: list[tuple[str, list[str]]] = (), checkpoints=None, resume=None) -> dict:
    """Train one task: `run_jobs` with a single job of weight 1."""
    loss_info = {**info, "label_smoothing": cfg.label_smoothing} if cfg.label_smoothing else info
    job = Job("default", task, model, train, validation, info, pad_id, loss_info=loss_info)
    return run_jobs(model, [job], cfg, head, device, eval_batch_size, log, unfreeze=unfreeze,
                    checkpoints=checkpoints, resume=resume)


def _oriented(metrics: dict, metric: str) -> float:
    return -metrics[metric] if metric in LOWER_IS_BETTER else metrics[metric]


def evaluate_jobs(jobs: list[Job], owner, eval_batch_size: int, device) -> dict:
    """Validation metrics: the task's own for one job; for several, `<job>/<metric>` for each and `score`, the
    loss-weighted mean of every job's main metric (lower-is-better ones negated), for model selection."""
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


@functools.cache
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
            summed = parallel(batch, job.loss_info) if parallel is not None else job.task.loss(job.model, batch, job.loss_info)
            loss = job.weight * summed * (scale if counts else 0.0) / max(n_items[job.name], 1)
            loss.backward()
        total += loss.item() / scale
    return distributed.total([total])[0] if parallel is not None else total


def _check_not_empty(jobs: list[Job]) -> None:
    for j in jobs:
        if not j.train:
            raise TunelabError(f"The training split{'' if len(jobs) == 1 else ' of task ' + repr(j.name)} is empty "
                               f"after cleaning; see data_report.json for what was dropped.")


def _distribute(model, jobs: list[Job], stages: list, device, header_log: Callable[[dict], None]) -> tuple:
    """(the DDP or FSDP2 module of the task loss, sharded?) with several processes; (None, False) in one."""
    if distributed.world() == 1:
        return None, False
    if len(jobs) > 1 or stages:
        distributed.refuse("multi-task training" if len(jobs) > 1 else "gradual unfreezing (train.unfreeze)")
    parallel, sharded = distributed.wrap(model, jobs[0].task, device)
    header_log({"type": "distributed", "processes": distributed.world(), "strategy": "fsdp2" if sharded else "ddp",
                "backend": torch.distributed.get_backend()})
    return parallel, sharded


def _log_groups(groups: list[dict], cfg: TrainConfig, header_log: Callable[[dict], None]) -> None:
    header_log({"type": "optimizer", "groups": [{"name": g["name"], "lr": g["lr"], "weight_decay": g["weight_decay"],
                                                 "params": sum(p.numel() for p in g["params"])} for g in groups]})
    if cfg.layer_lr_decay:
        print("optimizer groups: " + ", ".join(f"{g['name']} lr {g['lr']:.3g}" for g in groups
                                               if not g["name"].endswith("_no_decay")), flush=True)


def _validate(jobs: list[Job], owner, eval_batch_size: int, device, parallel, metric: str) -> dict:
    """evaluate_jobs, with the weights gathered whole (FSDP2); `metric` must be among the results."""
    with distributed.gathered(parallel):
        metrics = evaluate_jobs(jobs, owner, eval_batch_size, device)
    if metric not in metrics:
        raise TunelabError(f"train.metric='{metric}' is not among the validation metrics ({', '.join(metrics)}).")
    return metrics


def _unfreeze_next(model, stages: list[tuple[str, list[str]]]) -> str:
    """Make the next stage of gradual unfreezing trainable; its label."""
    label, names = stages.pop(0)
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(True)
    return label


def _restore_best(best: state.Best, params: dict, metric: str, write: Callable[[str], None]) -> None:
    """The best evaluation's weights into the model; frozen parameters never changed, so the trainable ones suffice."""
    if best.weights is None:
        write(f"warning: validation {metric} was never a number (diverged?); keeping the last weights")
    with torch.no_grad():
        for name, value in (best.weights or {}).items():
            params[name].copy_(value)


def _stopped(halt, step: int, total_steps: int, checkpoints, log: Callable[[dict], None],
             write: Callable[[str], None]) -> Interrupted:
    """The run was asked to stop (stop.py): logged, and the error that ends it as interrupted, saying how to go on."""
    # after_step, not step: trackers take a record with a step for metrics
    by = halt.signal or "a signal to another process of the run"
    log({"type": "stopped", "after_step": step, "signal": by, "checkpoint": checkpoints is not None})
    run_dir = checkpoints.root.parent if checkpoints is not None else None
    how = (f"its checkpoint is saved: `tunelab train --resume {run_dir}` goes on from there" if run_dir else
           "train.save_checkpoints is off, so there is no checkpoint to resume from")
    message = f"stopped by {by} after step {step} of {total_steps}; {how}"
    write(message)
    return Interrupted(message)


def run_jobs(model, jobs: list[Job], cfg: TrainConfig, head: list[str], device, eval_batch_size: int,
             log: Callable[[dict], None], sampling: str = "proportional", temperature: float = 1.0,
             owner=None, unfreeze: list[tuple[str, list[str]]] = (), checkpoints=None, resume=None) -> dict:
    """The loop. `model` holds every trainable parameter (one task's model, or a container of several sharing
    a body); each step's loss is sum over jobs of weight_t * (their summed loss / their item count in the step).
    `unfreeze`: (label, parameter names) stages made trainable one at a time (gradual unfreezing); they are in the
    optimizer from the start, and AdamW keeps no state for them and leaves them alone until they get gradients.
    `checkpoints` (checkpoint.Checkpoints): saved at each evaluation and every train.checkpoint_every steps;
    `resume` (what Checkpoints.latest returned): the loop goes on from that step as if it had never stopped."""
    # --- setup: data order, devices and processes, optimizer, the loop's state
    _check_not_empty(jobs)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * batches.steps_per_epoch(jobs, cfg)))
    metric, greater = _selection_metric(jobs, cfg)
    stages = list(unfreeze)
    header_log = log if resume is None else (lambda record: None)  # a resumed run's log has its header already
    padding_free = batches.resolve_padding_free(cfg.padding_free, jobs, header_log)  # checked on the model as it is
    # before the optimizer: sharding (FSDP2) replaces the parameters
    parallel, sharded = _distribute(model, jobs, stages, device, header_log)
    opt, sched, groups = optim.build(model, head, cfg, total_steps, [n for _, names in stages for n in names])
    trainable = [p for g in groups for p in g["params"]]
    _log_groups(groups, cfg, header_log)
    split_cost = batches.split_cost(cfg, device, sharded)
    stream = batches.mixed_stream(jobs, cfg, sampling, temperature)
    optimized = {id(p) for p in trainable}  # the best state covers what the optimizer may change
    params = {n: p for n, p in model.named_parameters() if id(p) in optimized}
    ema = EMA(params, cfg.ema_decay)
    progress, best = state.Progress(), state.Best(greater)
    guard, plateau = Guard(cfg.max_bad_steps), Plateau(cfg, opt, sched)
    captured = (progress, best, guard, plateau, params, ema, opt, sched)  # what a checkpoint saves (state.py)
    bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True,
               disable=None if distributed.is_main() else True)
    write = bar.write if distributed.is_main() else (lambda message: None)  # one process speaks for all

    first_step = 1
    if resume is not None:
        saved = state.restore(resume, checkpoints, *captured, groups)
        for _ in range(saved["stages_done"]):  # the blocks unfrozen by then train again
            _unfreeze_next(model, stages)
        for _ in range(saved["step"]):  # the data order is a seeded stream: replayed, it is where it was
            next(stream)
        state.restore_rng(resume)
        first_step = saved["step"] + 1
        bar.update(saved["step"])
        log({"type": "resume", "step": saved["step"], "checkpoint": resume[0].name})
        write(f"resumed from {resume[0].name}: step {saved['step']} of {total_steps}")

    # where training (re)starts and when, for progress and ETA (tunelab ui); no step, so trackers take no metric
    log({"type": "steps", "total": total_steps, "from_step": first_step - 1, "time": round(time.time(), 3)})

    # --- train: one optimizer step per iteration, then evaluate and save when due
    model.train()
    step, stopped_early = first_step - 1, False
    # SIGTERM / Ctrl-C: the step finishes, a checkpoint, the run ends interrupted; each step reuses the last one's
    # freed memory instead of faulting it in afresh (heap.py)
    with on_signal() as halt, heap.kept():
        for step in range(first_step, total_steps + 1):
            t0 = time.perf_counter()
            epoch_pos, chunks, epoch_end = next(stream)
            step_batches, real = batches.step_batches(jobs, chunks, padding_free, split_cost, device)
            step_loss = accumulate(step_batches, owner, cfg.precision, parallel, real)
            progress.tokens += int(distributed.total([sum(int(b["attention_mask"].sum())
                                                          for (_, b), r in zip(step_batches, real) if r)])[0])
            grad_norm = distributed.full(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm or float("inf")))
            lrs = {g["name"]: pg["lr"] for g, pg in zip(groups, opt.param_groups)}
            lr = max((v for k, v in lrs.items() if not k.startswith("head")), default=next(iter(lrs.values())))
            ok = finite(step_loss, grad_norm)
            if ok:  # the NaN guard: otherwise the weights stay as they were
                opt.step()
                ema.update()
            sched.step()  # the schedule follows the step count, skipped steps included
            opt.zero_grad(set_to_none=True)
            progress.train_seconds += time.perf_counter() - t0
            if guard.record(step, step_loss, grad_norm, log, write):
                bar.close()
                raise guard.error(step, cfg.lr, checkpoints.list() if checkpoints else [])
            progress.running.append(step_loss if ok else float("nan"))
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")

            if step % cfg.log_every == 0 or step == total_steps:
                mean_loss = progress.mean_loss()
                log({"type": "train", "step": step, "epoch": round(epoch_pos, 4), "loss": mean_loss,
                     "lr": lr, "lrs": lrs, "grad_norm": float(grad_norm), "tokens": progress.tokens})
                if bar.disable and distributed.is_main():  # no terminal (CI, nohup, a pipe): a plain line for the bar
                    eta = progress.train_seconds / step * (total_steps - step)
                    print(f"step {step}/{total_steps} loss {mean_loss:.4f} lr {lr:.2e} eta {eta / 60:.1f} min", flush=True)
            if stages and (epoch_end if cfg.unfreeze_every == "epoch" else step % cfg.unfreeze_every == 0):
                label = _unfreeze_next(model, stages)
                progress.stages_done += 1
                log({"type": "unfreeze", "step": step, "unfrozen": label, "still_frozen": [s[0] for s in stages]})
                write(f"step {step}: unfroze {label}" +
                      (f"; still frozen: {', '.join(s[0] for s in stages)}" if stages else "; all blocks train now"))

            due = epoch_end if cfg.eval_every == "epoch" else step % cfg.eval_every == 0
            stop = False
            if due or step == total_steps:
                progress.last_eval = step
                with ema.applied():  # evaluation and the best state use the average; training the raw weights
                    metrics = _validate(jobs, owner, eval_batch_size, device, parallel, metric)
                    improved = best.offer(metrics[metric], step, metrics, params)
                    log({"type": "eval", "step": step, "epoch": round(epoch_pos, 4), "split": "validation",
                         "improved": improved, **metrics})
                    plateau.after_eval(improved, step, log, write)
                    write(f"step {step}: validation {metric}={metrics[metric]:.4f} ({best.so_far(improved)})")
                stop = cfg.patience is not None and best.bad_evals >= cfg.patience and step < total_steps
            checkpointed = checkpoints is not None and (due or step == total_steps or
                                                        (cfg.checkpoint_every and step % cfg.checkpoint_every == 0))
            if checkpointed:
                state.save(checkpoints, step, epoch_pos, total_steps, *captured)
            if halt.asked():  # after this step's checkpoint, if it had one
                if checkpoints is not None and not checkpointed:
                    state.save(checkpoints, step, epoch_pos, total_steps, *captured)
                bar.close()
                raise _stopped(halt, step, total_steps, checkpoints, log, write)
            if stop:
                stopped_early = True
                write(f"early stopping at step {step}: no improvement in {cfg.patience} evaluations")
                break
    bar.close()

    # --- finish: the best weights back
    _restore_best(best, params, metric, write)
    model.eval()
    return {
        "steps": step, "total_steps": total_steps, "best_step": best.step, "best_metric": {metric: best.value},
        "stopped_early": stopped_early, "last_eval_step": progress.last_eval, "train_seconds": progress.train_seconds,
        "train_tokens": progress.tokens, "tokens_per_second": progress.tokens / max(progress.train_seconds, 1e-9),
        "eval": best.metrics,
        "optimizer_groups": [{"name": g["name"], "lr": g["lr"], "weight_decay": g["weight_decay"],
                              "params": g["param_names"]} for g in groups],
        "sharded": sharded,
    }
