"""Evaluation: run a task's forward over a split and compute its metrics."""

from __future__ import annotations

import torch


@torch.no_grad()
def outputs(model, task, features: list[dict], batch_size: int, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated model outputs and labels for a split, in order."""
    was_training = model.training
    model.eval()
    outs, labels = [], []
    for i in range(0, len(features), batch_size):
        batch = {k: v.to(device) for k, v in task.collate(features[i : i + batch_size], pad_id).items()}
        outs.append(task.forward(model, batch).float().cpu())
        labels.append(batch["labels"].cpu())
    model.train(was_training)
    return torch.cat(outs), torch.cat(labels)


def run(model, task, features: list[dict], info: dict, batch_size: int, pad_id: int, device) -> dict:
    out, labels = outputs(model, task, features, batch_size, pad_id, device)
    return task.metrics(out, labels, info)
