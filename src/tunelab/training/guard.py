"""The NaN guard and the loss-spike detector.

A step whose loss or gradient norm is not finite is skipped (the weights stay as they were); train.max_bad_steps
such steps in a row stop the run with advice. A finite loss far above its running mean (4 standard deviations, and
50 % over it) is reported, not acted on.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..errors import TunelabError


def finite(loss: float, grad_norm: float) -> bool:
    """The step may update the weights."""
    return math.isfinite(loss) and math.isfinite(float(grad_norm))


class Guard:
    def __init__(self, max_bad_steps: int):
        self.max_bad_steps = max_bad_steps
        self.bad_steps = 0  # not finite, in a row
        self.spikes = {"mean": None, "var": 0.0}  # the loss's running mean and variance

    def record(self, step: int, loss: float, grad_norm: float, log: Callable[[dict], None],
               write: Callable[[str], None]) -> bool:
        """Note one step's loss; True when the run must stop (too many steps in a row not finite)."""
        if not finite(loss, grad_norm):
            self.bad_steps += 1
            log({"type": "skipped", "step": step, "loss": loss, "grad_norm": float(grad_norm),
                 "in_a_row": self.bad_steps})
            write(f"step {step}: loss {loss:.4g}, gradient norm {float(grad_norm):.4g}: not finite, step skipped")
            return self.bad_steps >= self.max_bad_steps
        self.bad_steps = 0
        mean = self.spikes["mean"]
        if mean is not None and step > 10 and loss > mean + 4 * self.spikes["var"] ** 0.5 and loss > 1.5 * mean:
            log({"type": "loss_spike", "step": step, "loss": loss, "running_mean": mean})
            write(f"step {step}: loss spike, {loss:.4f} against a running mean of {mean:.4f}")
        self.spikes["mean"] = loss if mean is None else 0.9 * mean + 0.1 * loss
        self.spikes["var"] = 0.9 * self.spikes["var"] + 0.1 * (loss - self.spikes["mean"]) ** 2
        return False

    def error(self, step: int, lr: float, kept: list) -> TunelabError:
        """Why the run stopped and what to do; `kept`: the run's finished checkpoints."""
        return TunelabError(
            f"Training stopped at step {step}: the loss or gradient was not finite for {self.bad_steps} steps in a "
            f"row (train.max_bad_steps={self.max_bad_steps}), so every update since step {step - self.bad_steps} "
            f"was skipped. " + (f"The last good checkpoint is {kept[-1]}. " if kept else "") +
            f"Lower train.lr (now {lr:g}), set train.max_grad_norm (e.g. 1.0), use train.precision=fp32, or "
            f"look for extreme values in the data; then start again" +
            (", or edit config.yaml in the run directory and `tunelab train --resume RUN_DIR --resume-anyway` "
             "it (--resume-anyway: go on although the config changed)." if kept else "."))
