"""Linear probe: logistic regression (ridge regression, for regression tasks) on the frozen base model's mean-pooled
features.

A classification head at initialisation predicts nothing meaningful, so the
honest baseline for "was fine-tuning worth it?" is the best linear classifier
on the features the pretrained model already has.
"""

from __future__ import annotations

import random

import torch

from ..data.batching import length_sorted_batches
from ..models import body_of

MAX_TRAIN_ROWS = 10_000  # the probe is a baseline: a sample this size fits it as well, in bounded memory


@torch.inference_mode()
def pooled_features(model, task, features: list[dict], batch_size: int, pad_id: int, device, then=None) -> torch.Tensor:
    """Mean-pooled final states of every example; `then` maps each batch of them (to the probe's scores), so a
    long split's features are never held whole."""
    _, body = body_of(model)
    model.eval()
    out = None
    for idx in length_sorted_batches(features, batch_size):
        batch = task.collate([features[i] for i in idx], pad_id)
        mask = batch["attention_mask"].to(device)
        hidden = body(input_ids=batch["input_ids"].to(device), attention_mask=mask).last_hidden_state.float()
        m = mask.unsqueeze(-1).float()
        pooled = ((hidden * m).sum(1) / m.sum(1).clamp(min=1)).cpu()
        pooled = then(pooled) if then is not None else pooled
        if out is None:
            out = torch.empty(len(features), pooled.shape[1])
        out[idx] = pooled
    return out


def fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float = 1e-3, steps: int = 200):
    """Multinomial logistic regression by L-BFGS on standardised features; returns a scoring function. With `y`
    of 0/1 rows (multi-label), one independent logistic regression per label."""
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    xs = (x - mean) / std
    w = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = xs @ w + b
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits, y.float(), reduction="sum") / len(y)
                if y.ndim == 2 else torch.nn.functional.cross_entropy(logits, y)) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return lambda z: ((z - mean) / std) @ w.detach() + b.detach()


def fit_ridge(x: torch.Tensor, y: torch.Tensor, alphas=(0.1, 1.0, 10.0, 100.0, 1000.0), folds: int = 5):
    """Ridge regression on standardised features, its penalty picked from `alphas` by `folds`-fold cross-validation
    on the training rows; returns a scoring function giving one column."""
    x, y = x.double(), y.double().reshape(-1)
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    xs = (x - mean) / std
    eye = torch.eye(x.shape[1], dtype=torch.float64)

    def solve(a: torch.Tensor, b: torch.Tensor, alpha: float):
        centre = b.mean()
        return torch.linalg.solve(a.T @ a + alpha * eye, a.T @ (b - centre)), centre

    fold = torch.arange(len(y)) % folds
    def cv_error(alpha: float) -> float:
        err = 0.0
        for k in range(folds):
            held = fold == k
            w, c = solve(xs[~held], y[~held], alpha)
            err += float(((xs[held] @ w + c - y[held]) ** 2).sum())
        return err

    alpha = min(alphas, key=cv_error) if len(y) >= 2 * folds else alphas[-1]
    w, c = solve(xs, y, alpha)
    return lambda z: (((z.double() - mean) / std) @ w + c).float()[:, None]


def run(model, task, feats: dict[str, list[dict]], info: dict, batch_size: int, pad_id: int, device) -> dict:
    """Fit on train (a seeded sample of MAX_TRAIN_ROWS when it is longer), report the task's metrics on every
    other split."""
    train = feats["train"]
    if len(train) > MAX_TRAIN_ROWS:
        print(f"linear probe: fitted on a seeded sample of {MAX_TRAIN_ROWS:,} of the {len(train):,} training rows",
              flush=True)
        train = [train[i] for i in sorted(random.Random(0).sample(range(len(train)), MAX_TRAIN_ROWS))]
    x = pooled_features(model, task, train, batch_size, pad_id, device)
    y = torch.tensor([f["label"] for f in train])
    score = fit_ridge(x, y) if task.PROBE == "ridge" else fit(x, y, len(info["labels"]))
    return {name: task.metrics(pooled_features(model, task, f, batch_size, pad_id, device, then=score),
                               torch.tensor([r["label"] for r in f]), info)
            for name, f in feats.items() if name != "train"}
