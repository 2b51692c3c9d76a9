"""An exponential moving average of the trainable weights (train.ema_decay).

Training steps the raw weights; evaluation and the best state use the average, swapped into the model for as
long as they need it (`applied`). Off (no decay), every method is a no-op and nothing is copied.
"""

from __future__ import annotations

import contextlib

import torch


class EMA:
    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float | None):
        """`params`: the trainable parameters by name, averaged with `decay` per step; None or 0: off."""
        self.decay = decay
        self.params = params
        self.average = {n: p.detach().clone() for n, p in params.items()} if decay else None

    @property
    def on(self) -> bool:
        return self.average is not None

    def update(self) -> None:
        """After an optimizer step: average <- decay * average + (1 - decay) * weights."""
        if self.on:
            with torch.no_grad():
                for n, p in self.params.items():
                    self.average[n].lerp_(p.detach(), 1.0 - self.decay)

    def _swap(self) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                tmp = p.detach().clone()
                p.copy_(self.average[n])
                self.average[n].copy_(tmp)

    @contextlib.contextmanager
    def applied(self):
        """The average in the model inside the block, the raw weights kept aside and put back after it."""
        if not self.on:
            yield
            return
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def load(self, saved: dict[str, torch.Tensor], like) -> None:
        """The average as a checkpoint saved it; `like(tensor, param)` shards a whole tensor as the parameter is."""
        if self.on:
            with torch.no_grad():
                for n, e in self.average.items():
                    e.copy_(like(saved[n], e))
