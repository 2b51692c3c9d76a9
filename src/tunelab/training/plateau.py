"""Lower the LR on a plateau (train.plateau_factor): after train.plateau_patience evaluations in a row without
improvement, the LR is multiplied by the factor, never below train.min_lr, at once and for the rest of the run.

The schedule's factor is multiplied by `sched.plateau["scale"]` (optim.build), so the lowered LR carries through
warmup and decay; a checkpoint saves that scale and the count of evaluations without improvement.
"""

from __future__ import annotations

from collections.abc import Callable

from ..config import TrainConfig


class Plateau:
    def __init__(self, cfg: TrainConfig, opt, sched):
        self.cfg, self.opt, self.sched = cfg, opt, sched
        self.bad = 0  # evaluations without improvement since the best one or the last lowering

    def after_eval(self, improved: bool, step: int, log: Callable[[dict], None], write: Callable[[str], None]) -> None:
        cfg = self.cfg
        self.bad = 0 if improved else self.bad + 1
        if not (cfg.plateau_factor and self.bad >= cfg.plateau_patience):
            return
        plateau = self.sched.plateau
        lowered = max(plateau["scale"] * cfg.plateau_factor, cfg.min_lr / cfg.lr)
        if lowered < plateau["scale"]:
            for g in self.opt.param_groups:  # at once, not from the scheduler's next step
                g["lr"] *= lowered / plateau["scale"]
            plateau["scale"], self.bad = lowered, 0
            log({"type": "plateau", "step": step, "lr_scale": lowered})
            write(f"step {step}: no improvement in {cfg.plateau_patience} evaluations, LR x{lowered:.3g} from now on")
