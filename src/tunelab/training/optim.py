"""AdamW parameter groups and learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import TrainConfig


def _no_decay(name: str, p: nn.Parameter) -> bool:
    # Biases and norm gains are 1-D; decaying them only hurts (BERT/AdamW practice). IA3 scales
    # and DoRA magnitudes are vectors that start at their useful value (1, ||W||), not near 0.
    return p.ndim < 2 or "norm" in name.lower() or name.endswith((".ia3_l", "magnitude_vector"))


def param_groups(model: nn.Module, head: list[str], cfg: TrainConfig) -> list[dict]:
    """Four groups: body/head x decay/no-decay. Only trainable parameters are handed to the optimizer."""
    groups: dict[tuple[bool, bool], list] = {}
    names: dict[tuple[bool, bool], list[str]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = any(name == h or name.startswith(h + ".") for h in head)
        key = (is_head, _no_decay(name, p))
        groups.setdefault(key, []).append(p)
        names.setdefault(key, []).append(name)
    out = []
    for (is_head, no_decay), params in sorted(groups.items()):
        out.append({
            "name": f"{'head' if is_head else 'body'}{'_no_decay' if no_decay else ''}",
            "params": params,
            "param_names": names[(is_head, no_decay)],
            "lr": (cfg.head_lr or cfg.lr) if is_head else cfg.lr,
            "weight_decay": 0.0 if no_decay else cfg.weight_decay,
        })
    return out


def build(model: nn.Module, head: list[str], cfg: TrainConfig, total_steps: int):
    groups = param_groups(model, head, cfg)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "param_names"} for g in groups])
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, warmup, total_steps, cfg.scheduler))
    return opt, sched, groups


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based): linear warmup, then decay to 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress
