"""The training loop: one, written out top to bottom, for every method and task.

What varies between tasks lives in the task module (collate, loss, count,
metrics); what varies between methods is already decided by which parameters
have requires_grad. So nothing here branches on either.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
from tqdm.auto import tqdm

from .. import evaluate
from ..config import TrainConfig
from ..errors import TunelabError
from . import optim


LOWER_IS_BETTER = ("loss", "perplexity")


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
    epoch = 0
    while True:
        perm = torch.randperm(n, generator=generator).tolist()
        if lengths is not None:
            window = GROUP_WINDOW * cfg.batch_size
            perm = [i for w in range(0, n, window) for i in sorted(perm[w : w + window], key=lambda i: -lengths[i])]
        chunks = [perm[i : i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
        if lengths is not None:
            chunks = [chunks[i] for i in torch.randperm(len(chunks), generator=generator).tolist()]
        for start in range(0, len(chunks), cfg.grad_accum):
            done = min(start + cfg.grad_accum, len(chunks))
            yield epoch + done / len(chunks), chunks[start:done], done == len(chunks)
        epoch += 1


def run(model, task, train: list[dict], validation: list[dict], info: dict, cfg: TrainConfig, head: list[str],
        pad_id: int, device, eval_batch_size: int, log: Callable[[dict], None]) -> dict:
    if not train:
        raise TunelabError("The training split is empty after cleaning; see data_report.json for what was dropped.")
    steps_per_epoch = math.ceil(math.ceil(len(train) / cfg.batch_size) / cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    metric, greater = resolve_metric(task, cfg.metric)
    opt, sched, groups = optim.build(model, head, cfg, total_steps)
    trainable = [p for g in groups for p in g["params"]]
    log({"type": "optimizer", "groups": [{"name": g["name"], "lr": g["lr"], "weight_decay": g["weight_decay"],
                                          "params": sum(p.numel() for p in g["params"])} for g in groups]})

    generator = torch.Generator().manual_seed(cfg.seed)
    lengths = [len(f["input_ids"]) for f in train] if cfg.group_by_length else None
    stream = batch_stream(len(train), cfg, generator, lengths)
    best = {"value": None, "step": 0, "state": None, "metrics": None}
    bad_evals, tokens, train_seconds, running = 0, 0, 0.0, []
    stopped_early = False
    bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True, disable=None)

    def evaluate_now(step: int, epoch: float) -> bool:
        """Evaluate, keep the best trainable state; True when patience has run out."""
        nonlocal bad_evals
        metrics = evaluate.run(model, task, validation, info, eval_batch_size, pad_id, device)
        value = metrics[metric]
        # NaN never counts as better, so a diverged run keeps the last sane weights.
        improved = not math.isnan(value) and (best["value"] is None or (value > best["value"] if greater else value < best["value"]))
        if improved:
            best.update(value=value, step=step, metrics=metrics,
                        state={n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
            bad_evals = 0
        else:
            bad_evals += 1
        log({"type": "eval", "step": step, "epoch": round(epoch, 4), "split": "validation", "improved": improved, **metrics})
        best_so_far = "best" if improved else f"best {best['value'] if best['value'] is not None else float('nan'):.4f} at step {best['step']}"
        bar.write(f"step {step}: validation {metric}={value:.4f} ({best_so_far})")
        return cfg.patience is not None and bad_evals >= cfg.patience

    model.train()
    last_eval = 0
    for step in range(1, total_steps + 1):
        t0 = time.perf_counter()
        epoch_pos, chunks, epoch_end = next(stream)
        batches = [{k: v.to(device) for k, v in task.collate([train[i] for i in c], pad_id).items()} for c in chunks]
        # Normalise by the items of the whole accumulated batch, so accumulation == one big batch.
        n_items = sum(task.count(b) for b in batches)
        step_loss = 0.0
        for batch in batches:
            loss = task.loss(model, batch) / n_items
            loss.backward()
            step_loss += loss.item()
            tokens += int(batch["attention_mask"].sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm or float("inf"))
        lrs = {g["name"]: lr for g, lr in zip(groups, sched.get_last_lr())}
        lr = next((v for k, v in lrs.items() if k.startswith("body")), next(iter(lrs.values())))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - t0

        running.append(step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
        if step % cfg.log_every == 0 or step == total_steps:
            mean_loss = sum(running) / len(running)
            log({"type": "train", "step": step, "epoch": round(epoch_pos, 4), "loss": mean_loss,
                 "lr": lr, "lrs": lrs, "grad_norm": float(grad_norm), "tokens": tokens})
            running = []
            if bar.disable:  # no terminal (CI, nohup, a pipe): a plain line stands in for the bar
                eta = train_seconds / step * (total_steps - step)
                print(f"step {step}/{total_steps} loss {mean_loss:.4f} lr {lr:.2e} eta {eta / 60:.1f} min", flush=True)
        due = epoch_end if cfg.eval_every == "epoch" else step % cfg.eval_every == 0
        if due or step == total_steps:
            last_eval = step
            if evaluate_now(step, epoch_pos) and step < total_steps:
                stopped_early = True
                bar.write(f"early stopping at step {step}: no improvement in {cfg.patience} evaluations")
                break
    bar.close()

    # Restore the best weights; frozen parameters never changed, so the trainable ones suffice.
    params = dict(model.named_parameters())
    if best["state"] is None:
        bar.write(f"warning: validation {metric} was never a number (diverged?); keeping the last weights")
    with torch.no_grad():
        for name, value in (best["state"] or {}).items():
            params[name].copy_(value)
    model.eval()
    return {
        "steps": step, "total_steps": total_steps, "best_step": best["step"], "best_metric": {metric: best["value"]},
        "stopped_early": stopped_early, "last_eval_step": last_eval, "train_seconds": train_seconds,
        "train_tokens": tokens, "tokens_per_second": tokens / max(train_seconds, 1e-9), "eval": best["metrics"],
        "optimizer_groups": [{"name": g["name"], "lr": g["lr"], "weight_decay": g["weight_decay"], "params": g["param_names"]} for g in groups],
    }
