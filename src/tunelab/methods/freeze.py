"""Partial fine-tuning: freeze the embeddings and the lower N transformer blocks.

With `freeze_layers: all` only the head trains (a linear probe when the head
is one layer). Blocks are found by `models.blocks`, so any architecture whose
body holds a ModuleList of blocks works without a table of names.
"""

from __future__ import annotations

from ..errors import TunelabError
from ..models import parameter_groups
from .full import ARTIFACT, merge, save  # noqa: F401  (same artifact as full: a complete model dir)

CHANGES_BASE = True  # trains the upper blocks of the base itself
MERGEABLE = True  # merge(): already plain weights
SWITCHABLE = False  # it changes the base other adapters would share
VIRTUAL_TOKENS = None
QUANTIZES_BASE = False
TRAINABLE_DTYPE = "base"  # trains the base's own unfrozen weights, in the dtype it was loaded in
DEFAULT_LR = 1e-4  # moves pretrained weights (the upper blocks): small steps
ACTIVATION_SHARE = {"llama": 0.0, "gpt2": 0.0, "bert": 0.0}  # (default freeze_layers=all: no block trains)


def apply(model, cfg, head: list[str]):
    groups = parameter_groups(model)
    n_blocks = sum(1 for g in groups if g.startswith("block_"))
    n = n_blocks if cfg.freeze_layers == "all" else cfg.freeze_layers
    if n > n_blocks:
        raise TunelabError(
            f"method.freeze_layers={n} but the model has only {n_blocks} transformer blocks. Set method.freeze_layers "
            f"to at most {n_blocks}, or to 'all' to train the head only."
        )
    frozen = {f"block_{i}" for i in range(n)}
    if cfg.freeze_embeddings:
        frozen.add("embeddings")
    if n == n_blocks:
        frozen.add("top")  # final norms sit above every block: head-only means they freeze too
    params = dict(model.named_parameters())
    for group, names in groups.items():
        for name in names:
            params[name].requires_grad_(group not in frozen)
    return model


def unfreeze_stages(model) -> list[tuple[str, list[str]]]:
    """Gradual unfreezing (ULMFiT): the frozen block groups, from the top down, each with its parameter names.
    The final norms ("top") come with the highest block; the embeddings stay as the method left them."""
    groups = parameter_groups(model)
    params = dict(model.named_parameters())
    frozen = sorted((int(g.split("_")[1]) for g, names in groups.items()
                     if g.startswith("block_") and names and not params[names[0]].requires_grad), reverse=True)
    stages = [(f"block_{i}", list(groups[f"block_{i}"])) for i in frozen]
    top = [n for n in groups["top"] if not params[n].requires_grad]
    if stages and top:
        stages[0] = (stages[0][0], stages[0][1] + top)
    return stages
