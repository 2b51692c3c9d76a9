"""Task metrics from predictions and targets (no sklearn needed): classification, regression."""

from __future__ import annotations

import numpy as np


def classification(pred: np.ndarray, true: np.ndarray, names: list[str]) -> dict:
    k = len(names)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (true, pred), 1)
    tp = np.diag(cm).astype(float)
    predicted = cm.sum(axis=0).astype(float)
    support = cm.sum(axis=1).astype(float)
    # A class never predicted (or never present) gets precision (recall) 0, as sklearn's zero_division=0.
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    present = support > 0
    return {
        "accuracy": float(tp.sum() / max(cm.sum(), 1)),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            n: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, n in enumerate(names)
        },
        "confusion_matrix": {"labels": list(names), "rows_true_cols_pred": cm.tolist()},
        "examples": int(cm.sum()),
    }


def regression(pred: np.ndarray, true: np.ndarray) -> dict:
    """MSE, RMSE, MAE, Pearson and Spearman (average ranks for ties) of predictions against targets, in the targets'
    own scale. A constant prediction or target has no correlation: 0.0, not NaN, so early stopping can compare it."""
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    err = pred - true
    mse = float(np.mean(err ** 2)) if len(err) else 0.0
    return {"mse": mse, "rmse": mse ** 0.5, "mae": float(np.mean(np.abs(err))) if len(err) else 0.0,
            "pearson": _pearson(pred, true), "spearman": _pearson(_ranks(pred), _ranks(true)), "examples": len(err)}


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean() if len(a) else a, b - b.mean() if len(b) else b
    scale = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / scale) if scale > 0 else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def multilabel(pred: np.ndarray, true: np.ndarray, names: list[str]) -> dict:
    """Micro and macro F1 (macro over every label, 0 for a label never true nor predicted, as scikit-learn's
    zero_division=0), per-label precision / recall / F1 / support, subset accuracy (the whole set right) and Hamming
    loss (the fraction of label decisions wrong), from (examples, labels) 0/1 arrays."""
    pred, true = np.asarray(pred, dtype=bool), np.asarray(true, dtype=bool)
    tp, fp, fn = (pred & true).sum(0), (pred & ~true).sum(0), (~pred & true).sum(0)
    f1 = lambda t, p, n: np.divide(2 * t, 2 * t + p + n, out=np.zeros(np.shape(t)), where=(2 * t + p + n) > 0)
    precision = np.divide(tp, tp + fp, out=np.zeros(len(tp)), where=(tp + fp) > 0)
    recall = np.divide(tp, tp + fn, out=np.zeros(len(tp)), where=(tp + fn) > 0)
    per_label = f1(tp.astype(float), fp, fn)
    return {
        "micro_f1": float(f1(float(tp.sum()), fp.sum(), fn.sum())),
        "macro_f1": float(per_label.mean()) if len(per_label) else 0.0,
        "subset_accuracy": float((pred == true).all(1).mean()) if len(true) else 0.0,
        "hamming_loss": float((pred != true).mean()) if true.size else 0.0,
        "per_label": {n: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(per_label[i]),
                          "support": int(true[:, i].sum())} for i, n in enumerate(names)},
        "examples": int(len(true)),
    }
