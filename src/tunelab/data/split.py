"""Seeded, stratified hold-out of a validation set from train."""

from __future__ import annotations

import random
from collections import defaultdict

from ..config import DataConfig
from ..errors import TunelabError
from .clean import canonical_label, label_sort_key
from .sources import describe


def stratified_split(examples: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split into (train, validation), holding out about `val_fraction` of every class.

    Per class, round(n * val_fraction) rows go to validation, at least one when the
    class has two or more rows and never all of them, so every class stays in train.
    Both outputs keep the input order. The same seed always gives the same split.
    """
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        by_class[canonical_label(ex["label"])].append(i)

    rng = random.Random(seed)
    held_out: set[int] = set()
    # One generator over classes in a fixed order: independent of dict/hash order,
    # and classes of equal size do not all get the same permutation.
    for label in sorted(by_class, key=label_sort_key):
        indices = list(by_class[label])
        n = len(indices)
        k = round(n * val_fraction)
        if n >= 2:
            k = min(max(k, 1), n - 1)
        else:
            k = 0
        rng.shuffle(indices)
        held_out.update(indices[:k])

    train = [ex for i, ex in enumerate(examples) if i not in held_out]
    validation = [ex for i, ex in enumerate(examples) if i in held_out]
    return train, validation


def stratified_folds(examples: list[dict], k: int, seed: int) -> list[list[int]]:
    """k disjoint folds covering every example (indices, input order kept within a fold); each class is dealt
    round-robin over the folds after a seeded shuffle, so every fold has about 1/k of every class."""
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        by_class[canonical_label(ex["label"])].append(i)
    rng = random.Random(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    start = 0  # continue dealing where the previous class stopped: fold sizes differ by at most one
    for label in sorted(by_class, key=label_sort_key):
        indices = list(by_class[label])
        rng.shuffle(indices)
        for j, i in enumerate(indices):
            folds[(start + j) % k].append(i)
        start = (start + len(indices)) % k
    return [sorted(f) for f in folds]


def random_split(examples: list[dict], val_fraction: float, seed: int, train_path: str,
                 unit: str = "rows") -> tuple[list[dict], list[dict]]:
    """(train, validation): a seeded random `val_fraction` held out (at least one), both in input order; for
    tasks without class labels to stratify on (sft, causal_lm, token classification)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(val_fraction * len(order)))
    if len(order) - n_val < 1:
        raise TunelabError(f"{describe(train_path, 'data.train')} has {len(order)} usable {unit}: too few to hold "
                           f"out a validation set. Add {unit}, or give data.validation.")
    held = set(order[:n_val])
    return [ex for i, ex in enumerate(examples) if i not in held], [ex for i, ex in enumerate(examples) if i in held]


def too_few_to_split(cfg: DataConfig, rows: int) -> TunelabError:
    return TunelabError(
        f"{describe(cfg.train, 'data.train', cfg)} has too few rows to hold out a validation set: "
        f"after cleaning no label has 2 or more rows ({rows} rows in all). "
        f"Add more training data, or give a separate validation file in data.validation."
    )
