"""Loading, cleaning and splitting labelled text data, and reporting what happened to it.

    splits, report = load_splits(cfg.data, seed=cfg.train.seed)

Each example is {"text": str, "label": <raw label value>, "row": int}; compare
labels with `canonical_label` (CSV "1" and JSONL 1 are the same class). The
report says, per split, how many rows were read, dropped (and why) and kept,
and the label counts; it is saved as data_report.json in each run directory.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter

from ..config import DataConfig
from ..errors import TunelabError
from . import stream
from .clean import (
    CHARS_PER_TOKEN,
    DROP_REASONS,
    canonical_label,
    clean_examples,
    cut_long_texts,
    cut_report,
    kept_chars,
    label_counts,
    label_sort_key,
    no_rows_left,
    spelling_report,
)
from .sources import SUPPORTED_EXTENSIONS, absolute, describe, read_examples
from .split import random_split, stratified_split, too_few_to_split

__all__ = ["load_splits", "load_file", "inspect", "format_report", "format_tokens", "drop_warning", "canonical_label",
           "SUPPORTED_EXTENSIONS"]

DEDUPE_REASONS = ("duplicate", "conflicting_label")  # the drop reasons data.dedupe=false turns off
LARGE_DROP = 0.2  # cleaning that drops this share of a file is worth a warning: a count alone is easy to miss


def load_splits(cfg: DataConfig, seed: int, kind: str = "class") -> tuple[dict[str, list[dict]], dict]:
    """Read cfg.train (and cfg.validation / cfg.test when given), clean each, and when there is no
    validation file hold out a stratified, seeded cfg.val_fraction of train. Returns
    (splits, report): splits = {"train": [...], "validation": [...], "test": [...] (only when cfg.test)}.
    Each example is {"text": str, "label": <raw label value>, "row": int} where row is the 1-based
    data row number in the source file (line number for JSONL; for CSV the line the record starts on).
    With cfg.streaming the splits are `stream.Rows`, read from the files on access. `kind` is what a label is:
    "class" (one name), "number" (regression: a row whose label is not a number is an error; the report gives the
    targets' range) or "set" (multi-label: a list of names, or a string split on cfg.label_separator, kept as a
    sorted tuple). Numbers and sets are held out at random, not stratified."""
    if cfg.streaming:
        return stream.load_splits(cfg, seed)
    files = {"train": cfg.train, "validation": cfg.validation, "test": cfg.test}
    splits: dict[str, list[dict]] = {}
    entries: dict[str, dict] = {}

    for name, path in files.items():
        if path is not None:
            splits[name], entries[name] = load_file(path, f"data.{name}", cfg, kind)

    if cfg.validation is not None:
        split_info = {"method": "file", "val_fraction": None, "seed": seed}
    elif kind != "class":
        split_info = {"method": "random", "val_fraction": cfg.val_fraction, "seed": seed}
        train, validation = random_split(splits["train"], cfg.val_fraction, seed, cfg.train)
        splits["train"], splits["validation"] = train, validation
        entries["train"].update(rows=len(train), held_out=len(validation), **_label_summary(train, kind))
        entries["validation"] = {"from": "train", "rows_read": len(validation), "dropped": dict.fromkeys(DROP_REASONS, 0),
                                 "rows": len(validation), **_label_summary(validation, kind)}
    else:
        split_info = {"method": "stratified", "val_fraction": cfg.val_fraction, "seed": seed}
        train, validation = stratified_split(splits["train"], cfg.val_fraction, seed)
        if not validation:
            raise too_few_to_split(cfg, len(train))
        splits["train"], splits["validation"] = train, validation
        entries["train"].update(rows=len(train), labels=label_counts(train), held_out=len(validation))
        entries["validation"] = {
            "from": "train",
            "rows_read": len(validation),
            "dropped": dict.fromkeys(DROP_REASONS, 0),
            "rows": len(validation),
            "labels": label_counts(validation),
        }

    train_texts = {(ex["text"], ex.get("pair")) for ex in splits["train"]}
    for name in ("validation", "test"):
        if name in splits:
            # Reported, not dropped: the user decides whether leakage matters for their data.
            entries[name]["overlap_with_train"] = sum((ex["text"], ex.get("pair")) in train_texts for ex in splits[name])

    report = {
        "files": {name: absolute(path) for name, path in files.items()},
        "split": split_info,
        "splits": {name: entries[name] for name in ("train", "validation", "test") if name in entries},
    }
    return {name: splits[name] for name in ("train", "validation", "test") if name in splits}, report


def inspect(path, text_field: str = "text", label_field: str = "label", dedupe: bool = True) -> dict:
    """Report for one file, same shape as one split's entry in load_splits' report, plus text length
    stats (chars and whitespace words: min / median / mean / max)."""
    examples = read_examples(path, text_field, label_field)
    kept, dropped = clean_examples(examples, dedupe=dedupe)
    texts = [ex["text"] for ex in kept]
    return {
        "file": absolute(path),
        "rows_read": len(examples),
        "dropped": dropped,
        "rows": len(kept),
        "labels": label_counts(kept),
        **spelling_report(label_counts(kept)),
        "length": {
            "chars": _stats([len(t) for t in texts]),
            "words": _stats([len(t.split()) for t in texts]),
        },
    }


def format_report(report: dict) -> str:
    """Human-readable plain-text rendering (used by `tunelab data inspect` and printed at train start)."""
    if "splits" not in report:  # a single-file report from inspect()
        return "\n".join(_format_entry(report.get("file") or "file", report))

    split = report["split"]
    if split["method"] == "stratified":
        how = f"validation held out from train: {split['val_fraction']:.0%} per label, stratified, seed {split['seed']}"
    elif split["method"] == "random":
        how = f"validation held out from train: {split['val_fraction']:.0%} at random, seed {split['seed']}"
    else:
        how = "validation read from data.validation"
    lines = [f"Data ({how})"]
    for name, entry in report["splits"].items():
        path = report["files"].get(name)
        title = f"{name}: {path}" if path else f"{name}: held out from train"
        lines += [""] + _format_entry(title, entry)
    return "\n".join(lines)


def drop_warning(entry: dict) -> tuple[str, str] | None:
    """(what happened, the fix) when cleaning dropped a fifth or more of a file's rows (one split's report entry), else
    None. Repetition is often meant (upsampling a small set by repeating it), and dedupe silently undoes it."""
    read = entry.get("rows_read") or 0
    dropped = {reason: n for reason, n in (entry.get("dropped") or {}).items() if n}
    total = sum(dropped.values())
    if entry.get("from") or not read or total < LARGE_DROP * read:
        return None
    detail = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in dropped.items())
    what = f"cleaning dropped {total} of {read} rows ({total / read:.0%}: {detail})"
    if any(reason in DEDUPE_REASONS for reason in dropped):
        return what, "if the repetition is intended (upsampling), keep those rows with data.dedupe=false"
    return what, "fix or fill in those rows, or check that the data.*_field keys name the right columns"


def format_tokens(stats: dict) -> str:
    """One line from a task's encode report: examples, tokens, and whatever was cut or dropped."""
    parts = [f"{stats['examples']} examples", f"{stats['tokens']:,} tokens"]
    if stats.get("target_tokens") is not None:
        parts.append(f"{stats['target_tokens']:,} trained on")
    if stats.get("length"):
        parts.append(f"length {stats['length']['min']}-{stats['length']['max']} (median {stats['length']['median']:g})")
    parts += [f"{n} {k.replace('_', ' ')}" for k, n in stats.items()
              if k not in ("examples", "tokens", "target_tokens", "length", "texts") and n]
    return ", ".join(parts)


# -- helpers -------------------------------------------------------------------

def load_file(path: str, key: str, cfg: DataConfig, kind: str = "class") -> tuple[list[dict], dict]:
    """One labelled file (`key` names it in messages, e.g. data.train) read, cut to data.max_length and cleaned:
    (rows, what was read and dropped). `kind`: the label is a class, a number or a set of labels."""
    origin: dict = {}
    examples = read_examples(path, cfg.text_field, cfg.label_field, key=key, pair_field=cfg.text_pair_field,
                             label_lists=kind == "set", options=cfg, origin=origin)
    keep = kept_chars(cfg.max_length)
    rows_cut = cut_long_texts(examples, ("text", "pair"), keep)
    if kind == "number":
        examples = [{**ex, "label": number(ex, path, key, cfg.label_field, cfg)} for ex in examples]
    elif kind == "set":
        examples = [{**ex, "label": label_set(ex, path, key, cfg)} for ex in examples]
    kept, dropped = clean_examples(examples, dedupe=cfg.dedupe)
    if not kept:
        raise no_rows_left(path, key, cfg, len(examples), dropped)
    return kept, {"rows_read": len(examples), "dropped": dropped, "rows": len(kept), **cut_report(rows_cut, keep),
                  **_label_summary(kept, kind), **({"dataset": origin} if origin else {})}


def _label_summary(rows: list[dict], kind: str) -> dict:
    if kind == "number":
        return {"targets": target_stats(rows)}
    if kind == "set":
        counts = Counter(name for r in rows for name in r["label"])
        sizes = Counter(len(r["label"]) for r in rows)
        return {"labels": {n: counts[n] for n in sorted(counts, key=label_sort_key)},
                "labels_per_row": {str(k): sizes[k] for k in sorted(sizes)}, **spelling_report(counts)}
    counts = label_counts(rows)
    return {"labels": counts, **spelling_report(counts)}


def label_set(ex: dict, path, key: str, cfg: DataConfig) -> tuple | None:
    """A multi-label row's labels as a sorted tuple of names: a list, or a string split on data.label_separator.
    An empty set is None (dropped as a missing label) unless data.allow_empty_labels."""
    value = ex["label"]
    if value is None or isinstance(value, float) and math.isnan(value):
        names = []
    elif isinstance(value, str):
        names = value.split(cfg.label_separator) if cfg.label_separator else [value]
    elif isinstance(value, list) and all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        names = [str(v) for v in value]
    else:
        raise TunelabError(
            f"{describe(path, key, cfg)} row {ex['row']} has {value!r:.60} in '{cfg.label_field}': task.type multilabel "
            f"needs a list of label names (e.g. [\"sports\", \"politics\"]) or a string of them joined by "
            f"data.label_separator. Fix that row, or point data.label_field at the column that holds the labels.")
    names = tuple(sorted({canonical_label(n) for n in names} - {""}, key=label_sort_key))
    return names if names or cfg.allow_empty_labels else None


def number(ex: dict, path, key: str, field: str, options=None) -> float | None:
    """A regression row's label as a float; None (no label) is left for cleaning to drop and count. `options`: the
    data section, which names a dataset's split in the message."""
    value = ex["label"]
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        out = float(value.strip() if isinstance(value, str) else value) if not isinstance(value, bool) else None
    except (TypeError, ValueError, OverflowError):
        out = None
    if out is None or not math.isfinite(out):
        raise TunelabError(
            f"{describe(path, key, options)} row {ex['row']} has {value!r:.60} in '{field}', which is not a finite number; "
            f"task.type regression needs a numeric label in every row. Fix or remove that row (an empty label is "
            f"dropped and counted), or point data.label_field at the column that holds the score.")
    return out


def target_stats(rows: list[dict]) -> dict:
    values = [float(r["label"]) for r in rows]
    return {"min": min(values), "mean": round(statistics.fmean(values), 4),
            "std": round(statistics.pstdev(values), 4), "max": max(values)}


def _stats(values: list[int]) -> dict | None:
    if not values:
        return None
    return {
        "min": min(values),
        "median": statistics.median(values),
        "mean": round(statistics.fmean(values), 2),
        "max": max(values),
    }


def dataset_line(origin: dict) -> str:
    """Where a dataset split came from, in a few words: its split, Hub config and commit, or content hash."""
    parts = [f"split {origin['split']}" if origin.get("split") else "a single Dataset (no splits)"]
    if origin.get("kind") == "hub":
        parts += [f"config {origin['config']}", f"revision {origin['revision']}",
                  f"commit {origin['commit'] or 'unknown'}"]
    elif origin.get("sha256"):
        parts.append(f"content sha256 {origin['sha256']}")
    return ", ".join(parts) + f", {origin['rows']} rows"


def _format_entry(title: str, entry: dict) -> list[str]:
    lines = [title]
    if entry.get("from"):
        lines.append(f"  rows: {entry['rows']} (from {entry['from']})")
    else:
        dropped = {reason: n for reason, n in entry["dropped"].items() if n}
        detail = ", ".join(f"{n} {reason}" for reason, n in dropped.items()) or "none"
        kept = entry["rows"] + entry.get("held_out", 0)
        lines.append(f"  rows read: {entry['rows_read']}, dropped: {sum(dropped.values())} ({detail}), kept: {kept}")
        if entry.get("held_out"):
            lines.append(f"  held out for validation: {entry['held_out']}, left in train: {entry['rows']}")
        if warning := drop_warning(entry):
            lines.append(f"  warning: {warning[0]}; {warning[1]}")
    if entry.get("dataset"):
        lines.append(f"  dataset: {dataset_line(entry['dataset'])}")
    if "format" in entry:
        lines.append(f"  format: {entry['format']}" + (f", {entry['assistant_turns']} assistant turns" if "assistant_turns" in entry else ""))
    if "targets" in entry:
        t = entry["targets"]
        lines.append(f"  targets: min {t['min']:g}, mean {t['mean']:g}, std {t['std']:g}, max {t['max']:g}")
    if "labels" in entry:
        total = sum(entry["labels"].values()) or 1
        labels = ", ".join(f"{label or '(empty)'} {n} ({n / total:.0%})" for label, n in entry["labels"].items())
        lines.append(f"  labels ({len(entry['labels'])}): {labels or 'none'}")
    for group in entry.get("label_spellings", []):
        lines.append(f"  warning: the labels {' and '.join(map(repr, group))} read as the same number but are "
                     f"different classes; if they are one class, write them the same way in the file")
    if entry.get("rows_cut"):
        lines.append(f"  {entry['rows_cut']} rows cut to their first and last {entry['cut_to_chars']:,} characters "
                     f"before tokenising (data.max_length x {CHARS_PER_TOKEN}; far more than fits in the model's "
                     f"window either way)")
    if "overlap_with_train" in entry:
        lines.append(f"  texts also in train: {entry['overlap_with_train']}")
    for unit, stats in (entry.get("length") or {}).items():
        if stats:
            lines.append(
                f"  length in {unit}: min {stats['min']}, median {stats['median']:g}, "
                f"mean {stats['mean']:g}, max {stats['max']}"
            )
    return lines
