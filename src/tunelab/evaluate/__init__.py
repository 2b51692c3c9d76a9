"""Evaluation: run a task's forward over a split and compute its metrics."""

from __future__ import annotations

import torch


def length_sorted_batches(features: list[dict], batch_size: int) -> list[list[int]]:
    """Index batches of similar length: padding (and so CPU time) drops several-fold on real text."""
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def outputs(model, task, features: list[dict], batch_size: int, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated model outputs and labels for a split, in the order of `features`."""
    was_training = model.training
    model.eval()
    outs, labels, index = [], [], []
    for idx in length_sorted_batches(features, batch_size):
        batch = {k: v.to(device) for k, v in task.collate([features[i] for i in idx], pad_id).items()}
        outs.append(task.forward(model, batch).float().cpu())
        labels.append(task.targets(batch).cpu())
        index += idx
    model.train(was_training)
    inverse = torch.empty(len(index), dtype=torch.long)
    inverse[torch.tensor(index)] = torch.arange(len(index))
    return torch.cat(outs)[inverse], torch.cat(labels)[inverse]


def run(model, task, features: list[dict], info: dict, batch_size: int, pad_id: int, device) -> dict:
    out, labels = outputs(model, task, features, batch_size, pad_id, device)
    return task.metrics(out, labels, info)
