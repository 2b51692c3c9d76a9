"""The loop's state between steps, and a checkpoint of it: captured in `save`, restored in one place (`restore`).

A resumed run goes on as if it had never stopped (bit-identical weights): the trainable weights, the EMA, the
optimizer's moments and groups, the schedule (with its plateau scale), every counter below, the best evaluation
and its weights, and the random generators all come back. The data order is a seeded stream the loop replays;
the blocks unfrozen by then (`stages_done`) the loop unfreezes again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import checkpoint, distributed
from .ema import EMA
from .guard import Guard
from .plateau import Plateau


@dataclass
class Progress:
    """What the loop counts as it goes."""

    tokens: int = 0  # attention-mask tokens trained on, all processes together
    train_seconds: float = 0.0  # time in training steps (not evaluation or checkpoints)
    running: list[float] = field(default_factory=list)  # step losses since the last train record (NaN: skipped)
    last_eval: int = 0  # the step of the last evaluation
    stages_done: int = 0  # gradual-unfreezing stages unfrozen so far

    def mean_loss(self) -> float:
        """The mean finite loss since the last call, which starts the next window."""
        finite_losses = [x for x in self.running if math.isfinite(x)]
        self.running = []
        return sum(finite_losses) / len(finite_losses) if finite_losses else float("nan")


@dataclass
class Best:
    """The best evaluation so far (train.metric), the trainable weights it had, and the evaluations since without
    improvement (train.patience)."""

    greater: bool  # a greater metric is better
    value: float | None = None
    step: int = 0
    metrics: dict | None = None
    weights: dict[str, torch.Tensor] | None = None  # parameter name -> a copy
    bad_evals: int = 0

    def offer(self, value: float, step: int, metrics: dict, params: dict[str, torch.nn.Parameter]) -> bool:
        """Keep `params` when `value` is better; True when it was. NaN never counts as better, so a diverged run
        keeps the last sane weights."""
        improved = not math.isnan(value) and \
            (self.value is None or (value > self.value if self.greater else value < self.value))
        if improved:
            self.value, self.step, self.metrics = value, step, metrics
            self.weights = {n: p.detach().clone() for n, p in params.items()}
            self.bad_evals = 0
        else:
            self.bad_evals += 1
        return improved

    def so_far(self, improved: bool) -> str:
        if improved:
            return "best"
        return f"best {self.value if self.value is not None else float('nan'):.4f} at step {self.step}"


def save(checkpoints: checkpoint.Checkpoints, step: int, epoch: float, total_steps: int, progress: Progress,
         best: Best, guard: Guard, plateau: Plateau, params: dict[str, torch.nn.Parameter], ema: EMA, opt,
         sched) -> None:
    """The checkpoint of `step`. Sharded tensors are gathered whole (every process takes part); the first process
    writes them."""
    tensors, rng = checkpoint.rng_state()
    moments, opt_groups = checkpoint.optimizer_state(opt)
    full = distributed.full
    files = {"trainable": {n: full(p) for n, p in params.items()},
             "optimizer": {k: full(v) for k, v in moments.items()}, "rng": tensors}
    if ema.on:
        files["ema"] = {n: full(e) for n, e in ema.average.items()}
    state = {"step": step, "epoch": epoch, "total_steps": total_steps, "tokens": progress.tokens,
             "train_seconds": progress.train_seconds, "running": progress.running, "bad_evals": best.bad_evals,
             "plateau_bad": plateau.bad, "last_eval": progress.last_eval, "bad_steps": guard.bad_steps,
             "spikes": guard.spikes, "stages_done": progress.stages_done, "plateau": sched.plateau,
             "scheduler": sched.state_dict(), "optimizer_groups": opt_groups, "rng": rng,
             "log_bytes": checkpoints.log_bytes(),
             "best": {"value": best.value, "step": best.step, "metrics": best.metrics}}
    checkpoints.save(step, files, state, best.step if best.weights is not None else None)


def restore(resume: tuple, checkpoints: checkpoint.Checkpoints, progress: Progress, best: Best, guard: Guard,
            plateau: Plateau, params: dict[str, torch.nn.Parameter], ema: EMA, opt, sched, groups: list[dict]) -> dict:
    """Everything `save` captured, back in place from `resume` (what Checkpoints.latest returned), except the
    random generators (`restore_rng`, last) and what the loop replays; returns the checkpoint's state."""
    path, state, files = resume
    checkpoint.check_fits(path, files["trainable"], {n: tuple(p.shape) for n, p in params.items()})
    like = distributed.like  # a whole tensor, sharded as the parameter is
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(like(files["trainable"][n], p))
    ema.load(files["ema"] if ema.on else None, like)
    checkpoint.load_optimizer_state(opt, files["optimizer"], state["optimizer_groups"], like)
    sched.load_state_dict(state["scheduler"])
    sched.plateau.update(state["plateau"])  # in place: the schedule's lambda reads this dict
    for i, (g, pg) in enumerate(zip(groups, opt.param_groups)):  # config.yaml's LR, edited (--resume-anyway)
        if g["lr"] != sched.base_lrs[i]:
            sched.base_lrs[i] = pg["initial_lr"] = g["lr"]
            pg["lr"] = g["lr"] * sched.lr_lambdas[i](sched.last_epoch)
        pg["weight_decay"] = g["weight_decay"]
    progress.tokens, progress.train_seconds = state["tokens"], state["train_seconds"]
    progress.running = state["running"]
    progress.last_eval, progress.stages_done = state["last_eval"], state["stages_done"]
    best.bad_evals, plateau.bad = state["bad_evals"], state["plateau_bad"]
    guard.bad_steps, guard.spikes = state["bad_steps"], state["spikes"]
    best.value, best.step, best.metrics = state["best"]["value"], state["best"]["step"], state["best"]["metrics"]
    if best.value is not None:  # the best weights are the trainable (or EMA) ones of the best step's checkpoint
        kept = checkpoints.read(best.step)
        best.weights = {n: like(kept["ema" if ema.on else "trainable"][n], p).clone() for n, p in params.items()}
    return state


def restore_rng(resume: tuple) -> None:
    """The random generators as they were at the checkpoint: the last thing restored."""
    _, state, files = resume
    checkpoint.set_rng_state(files["rng"], state["rng"])
