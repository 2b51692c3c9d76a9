"""The interface's defaults: what a task that has nothing to do at a point gets. A task module imports the ones it
does not write itself, so every task has every name of `tasks.Task` and its callers never probe for one."""

from __future__ import annotations

from ..errors import TunelabError


def pack(features: list[dict], max_length: int) -> list[dict]:
    """Only tasks with PACKS = True pack; config's rules stop data.packing and train.padding_free elsewhere."""
    raise TunelabError("This task does not pack examples into rows: set data.packing=false and train.padding_free=false.")


def packing_fault(model) -> str | None:
    """Why packed rows would be wrong for this model (None: they are fine, or the task does not pack)."""
    return None


def prepare(model, feats: dict, cfg, pad_id: int, device, batch_size: int, say) -> None:
    """Before the first step, once the method is applied (DPO: the reference log-probs). Nothing by default."""


def finish(info: dict, validation_outputs, say) -> tuple[dict, dict]:
    """After training, on the best weights: (info, figures for the summary). `validation_outputs()` runs the model
    over validation and gives (outputs, labels) (multilabel: thresholds tuned there). Nothing by default."""
    return info, {}
