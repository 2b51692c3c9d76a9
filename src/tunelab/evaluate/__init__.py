"""Evaluation: run a task's forward over a split and compute its metrics."""

from __future__ import annotations

import torch

from ..data.batching import feature_length, length_sorted_batches  # noqa: F401  (feature_length: the loop's)


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
    return _cat(outs, 0.0)[inverse], _cat(labels, -100)[inverse]


def runner(model, task, batch_size: int | None, pad_id: int, device):
    """`outputs` bound to a model, as tasks are given it (samples, predict, embed_texts): a callable
    `(features, via=None) -> (outputs, targets)` running `task`'s collate and forward, or `via`'s when given (a
    reward model scores single replies with classification's). batch_size None: all the features in one batch."""
    def run(features: list[dict], via=None) -> tuple[torch.Tensor, torch.Tensor]:
        return outputs(model, via or task, features, batch_size or max(len(features), 1), pad_id, device)

    return run


def _cat(tensors: list[torch.Tensor], fill) -> torch.Tensor:
    """Concatenate batches; per-token outputs (token classification, QA) are padded along dim 1 to the longest
    batch with `fill` (-100 for targets: the ignored label)."""
    if tensors[0].ndim < 2 or len({t.shape[1] for t in tensors}) == 1:
        return torch.cat(tensors)
    longest = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, 0) * (t.ndim - 2) + (0, longest - t.shape[1]), value=fill)
                      for t in tensors])


def run(model, task, features: list[dict], info: dict, batch_size: int, pad_id: int, device) -> dict:
    """The task's metrics on a split; `features` are passed on for tasks whose metrics map outputs back to
    the examples (QA windows -> answer text)."""
    out, labels = outputs(model, task, features, batch_size, pad_id, device)
    return task.metrics(out, labels, info, features)
