"""Cleaning raw examples: whitespace, empty texts, missing labels, duplicates, conflicts.

Every dropped row is counted under one reason so the data report can say where
rows went (rows_read == rows + sum(dropped)).
"""

from __future__ import annotations

import math
import numbers
import unicodedata
from collections import Counter, defaultdict

from ..config import DataConfig
from ..errors import TunelabError
from .sources import describe

DROP_REASONS = ("empty_text", "missing_label", "duplicate", "conflicting_label")

# A text longer than 2 * max_length * CHARS_PER_TOKEN characters is cut before it is cleaned and tokenised, keeping
# its first and last max_length * CHARS_PER_TOKEN characters. No tokenizer puts anywhere near 64 characters in one
# token on average (prose runs 3-5, code vocabularies' longest runs of spaces or dashes ~30), so each kept end still
# holds more than max_length tokens, and truncation from either side (classification keeps the start, sft cuts the
# prompt from the left) sees the same tokens as with the whole text; a 50 MB row no longer costs minutes and
# gigabytes to normalise and tokenise. Applied where a text is truncated to max_length tokens, not where it is cut
# into windows (causal_lm, mlm, qa contexts) and every character counts.
CHARS_PER_TOKEN = 64


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


def kept_chars(max_length: int) -> int:
    """How many characters of each end of a long text are kept (CHARS_PER_TOKEN)."""
    return max_length * CHARS_PER_TOKEN


def cut_long_texts(rows: list[dict], fields: tuple[str, ...], keep: int) -> int:
    """Cut, in place, each string in `fields` of each row that is longer than 2 * keep characters to its first and
    last `keep` characters (joined by a space); returns how many rows had a text cut."""
    cut = 0
    for row in rows:
        long = [f for f in fields if isinstance(row.get(f), str) and len(row[f]) > 2 * keep]
        for f in long:
            row[f] = f"{row[f][:keep]} {row[f][-keep:]}"
        cut += bool(long)
    return cut


def cut_report(rows_cut: int, keep: int) -> dict:
    """The data report's fields for texts cut before tokenising (none when no text was)."""
    return {"rows_cut": rows_cut, "cut_to_chars": keep} if rows_cut else {}


def is_empty_text(text: str) -> bool:
    """Nothing but whitespace and invisible format characters (Unicode category Cf: zero-width space U+200B,
    (non-)joiners U+200C/U+200D, word joiner U+2060, byte-order mark U+FEFF, direction marks ...). A text with
    anything else keeps its format characters: joiners matter inside emoji and in Persian or Hindi words."""
    return all(c.isspace() or unicodedata.category(c) == "Cf" for c in text)


def same_number_spellings(labels) -> list[list[str]]:
    """Groups of two or more distinct labels that read as the same number ("1" and "1.0", "2" and "02"): each is a
    class of its own, which is rarely what the data meant. Sorted lists, in label order."""
    by_value = defaultdict(list)
    for label in labels:
        try:
            value = float(label)
        except (TypeError, ValueError, OverflowError):
            continue
        if math.isfinite(value):
            by_value[value].append(label)
    return [sorted(group, key=label_sort_key) for _, group in sorted(by_value.items()) if len(group) > 1]


def spelling_report(labels) -> dict:
    """The data report's field for labels spelled two ways (none when there are none)."""
    groups = same_number_spellings(labels)
    return {"label_spellings": groups} if groups else {}


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
        if is_empty_text(text) or (pair is not None and is_empty_text(pair)):
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


def no_rows_left(path: str, key: str, cfg: DataConfig, rows_read: int, dropped: dict) -> TunelabError:
    reasons = ", ".join(f"{n} {reason}" for reason, n in dropped.items() if n)
    return TunelabError(
        f"{describe(path, key, cfg)} has no rows left after cleaning: all {rows_read} rows were dropped ({reasons}). "
        f"Check that data.text_field ('{cfg.text_field}') and data.label_field ('{cfg.label_field}') "
        f"name the columns holding the text and the label, and that those columns are filled in."
    )
