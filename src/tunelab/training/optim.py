"""AdamW parameter groups and learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import models
from ..config import TrainConfig


def _no_decay(name: str, p: nn.Parameter) -> bool:
    # Biases and norm gains are 1-D; decaying them only hurts (BERT/AdamW practice). IA3 scales
    # and DoRA magnitudes are vectors that start at their useful value (1, ||W||), not near 0.
    return p.ndim < 2 or "norm" in name.lower() or name.endswith((".ia3_l", "magnitude_vector"))


def _layer_of(model: nn.Module, decay: float):
    """name -> (group label, LR scale) by depth: the top block 1, each block below one more factor of `decay`,
    embeddings (what comes before the blocks) decay ** L, what comes after the blocks (final norms) 1."""
    prefix, stack = models.blocks(model)
    depth, seen = len(stack), {"blocks": False}

    def layer(name: str) -> tuple[str, float]:
        if name.startswith(prefix + "."):
            seen["blocks"] = True
            i = int(name[len(prefix) + 1:].split(".")[0])
            return f"block_{i}", decay ** (depth - 1 - i)
        # Registration order puts embeddings before the blocks and final norms after them.
        return ("top", 1.0) if seen["blocks"] else ("embeddings", decay ** depth)

    return layer


def param_groups(model: nn.Module, head: list[str], cfg: TrainConfig, extra: list[str] = ()) -> list[dict]:
    """AdamW groups: body/head x decay/no-decay, or with train.layer_lr_decay one group per layer (x decay/no-decay).
    Only trainable parameters are handed to the optimizer, and those named in `extra` (frozen now, trained later:
    gradual unfreezing; AdamW skips them until they have gradients)."""
    layer = _layer_of(model, cfg.layer_lr_decay) if cfg.layer_lr_decay else None
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if layer:
            label, scale = layer(name)  # called for every parameter: it tracks the registration order
        if not p.requires_grad and name not in extra:
            continue
        is_head = any(name == h or name.startswith(h + ".") for h in head)
        if is_head:
            label, lr = "head", cfg.head_lr or cfg.lr
        elif layer:
            lr = cfg.lr * scale
        else:
            label, lr = "body", cfg.lr
        no_decay = _no_decay(name, p)
        group = groups.setdefault((label, no_decay), {
            "name": f"{label}{'_no_decay' if no_decay else ''}", "params": [], "param_names": [], "lr": lr,
            "weight_decay": 0.0 if no_decay else cfg.weight_decay})
        group["params"].append(p)
        group["param_names"].append(name)
    ordered = groups.values() if layer else [g for _, g in sorted(groups.items())]
    return list(ordered)


def build(model: nn.Module, head: list[str], cfg: TrainConfig, total_steps: int, extra: list[str] = ()):
    """AdamW, and a schedule whose factor is the warmup/decay rule times `plateau["scale"]` (lowered by the loop
    when validation stops improving)."""
    groups = param_groups(model, head, cfg, extra)
    params = [p for g in groups for p in g["params"]]
    # torch's default AdamW on CPU updates one tensor at a time; the fused kernel does all of a group in one call,
    # the same arithmetic: MiniLM's step went from 162 to 30 ms. It needs float tensors on one CPU/GPU device.
    from torch.distributed.tensor import DTensor  # sharded (FSDP2) parameters take the default kernel

    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") and
                                 not isinstance(p, DTensor) for p in params) and len({p.device for p in params}) == 1
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "param_names"} for g in groups], fused=fused or None)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)
    plateau = {"scale": 1.0}
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(step, warmup, total_steps, cfg.scheduler) * plateau["scale"])
    sched.plateau = plateau
    return opt, sched, groups


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based): linear warmup, then decay to 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    if kind == "inverse_sqrt":
        return math.sqrt(max(warmup, 1) / (step + 1))
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress
