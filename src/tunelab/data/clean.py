"""Cleaning raw examples: whitespace, empty texts, missing labels, duplicates, conflicts.

Every dropped row is counted under one reason so the data report can say where
rows went (rows_read == rows + sum(dropped)).
"""

from __future__ import annotations

import math
import numbers
from collections import Counter, defaultdict

DROP_REASONS = ("empty_text", "missing_label", "duplicate", "conflicting_label")


def canonical_label(value) -> str:
    """Label comparison key: ints -> str(int); integral floats (1.0) -> "1"; bool -> "true"/"false";
    strings stripped. So CSV "1" and JSONL 1 are the same label."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool):  # before Integral: bool is an int subclass
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        f = float(value)
        return str(int(f)) if f.is_integer() else str(f)
    return "" if value is None else str(value).strip()


def is_missing_label(value) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and math.isnan(value)


def normalise_text(value) -> str:
    """Strip and collapse every run of whitespace (newlines, tabs, NBSP...) to one space.
    None and NaN become "" (how pandas-written files spell a missing text)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if not isinstance(value, str):
        value = str(value)
    return " ".join(value.split())


def clean_examples(examples: list[dict], dedupe: bool = True) -> tuple[list[dict], dict[str, int]]:
    """Return (kept examples with normalised text (and pair), {reason: rows dropped}); an empty pair counts as an
    empty text.

    With `dedupe`, a text seen with two or more different labels loses ALL its rows
    (we cannot tell which label is right), and only then are exact repeats of
    (text, label) dropped, keeping the first. Order of the kept rows is preserved.
    """
    dropped = dict.fromkeys(DROP_REASONS, 0)
    kept = []
    for ex in examples:
        text = normalise_text(ex["text"])
        pair = normalise_text(ex["pair"]) if "pair" in ex else None
        if not text or pair == "":
            dropped["empty_text"] += 1
        elif is_missing_label(ex["label"]):
            dropped["missing_label"] += 1
        else:
            kept.append({**ex, "text": text, **({"pair": pair} if pair is not None else {})})
    if not dedupe:
        return kept, dropped

    key = lambda ex: (ex["text"], ex["pair"]) if "pair" in ex else ex["text"]  # a text pair is one input
    labels_of = defaultdict(set)
    for ex in kept:
        labels_of[key(ex)].add(canonical_label(ex["label"]))
    seen = set()
    result = []
    for ex in kept:
        if len(labels_of[key(ex)]) > 1:
            dropped["conflicting_label"] += 1
            continue
        # One label per input remains, so the input alone identifies a duplicate.
        if key(ex) in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key(ex))
        result.append(ex)
    return result, dropped


def label_counts(examples: list[dict]) -> dict[str, int]:
    """Counts per canonical label, sorted (numerically when the labels are integers)."""
    counts = Counter(canonical_label(ex["label"]) for ex in examples)
    return {label: counts[label] for label in sorted(counts, key=label_sort_key)}


def label_sort_key(label: str):
    """Sort key putting integer-like labels first, in numeric order ("2" before "10")."""
    try:
        return (0, int(label), "")
    except ValueError:
        return (1, 0, label)
