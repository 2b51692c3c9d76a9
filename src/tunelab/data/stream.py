"""data.streaming: classification data kept on disk and read row by row, so memory stays flat however big the file.

A Hugging Face dataset (data/hub.py) streams the same way, its rows found by index in the Arrow files `datasets`
memory-maps (the Hub download in the HF cache, a save_to_disk folder) instead of by byte offset in a text file: the
same index, cleaning, seeded split and resume. A Hub dataset is downloaded in full first (to disk, not memory):
`datasets`' own streaming (an IterableDataset, read once in order) could not give a seeded order over every row, a
stratified validation split, dedupe across the whole split or an exact resume position.

One pass over each file checks and cleans every row with the same rules, errors and drop reasons as the in-memory
path (same kept rows, same order, same seeded validation split), keeping of each row only where it lies in the file,
its line number, a 64-bit hash of its text, its label id and its position in its split: about 40 bytes a row, 40 MB
for a million. `Rows` reads the rows back when asked; `Features` tokenises them when the loop asks for them. A token
pass fills in the report and the lengths that batching sorts by, without keeping the tokens.
"""

from __future__ import annotations

import csv
import ctypes
import hashlib
import io
import json
import os
import random
import re
import weakref
from array import array
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import TunelabError
from . import hub, sources
from .batching import feature_length
from .clean import (
    DROP_REASONS,
    canonical_label,
    cut_long_texts,
    cut_report,
    is_empty_text,
    is_missing_label,
    kept_chars,
    label_sort_key,
    no_rows_left,
    normalise_text,
    spelling_report,
)
from .sources import absolute
from .split import too_few_to_split

FORMATS = (".jsonl", ".json", ".csv", ".tsv")
ENCODE_CHUNK = 1024  # rows tokenised at a time in the token pass
CACHE = 4096  # tokenised rows kept for the loop's repeated reads of one step's examples


class Index:
    """Where each usable row of one file is: byte offset and size, line number, text hash and label id, as arrays."""

    def __init__(self, path: Path | None, what: str, delimiter: str | None, text_field: str, label_field: str,
                 keep: int, text_at=None):
        self.path, self.what, self.delimiter = path, what, delimiter
        self.text_at = text_at  # a dataset: the text of a row by its index (Split.column); offsets are indices
        self.text_field, self.label_field = text_field, label_field
        self.keep = keep  # clean.kept_chars: a longer text is cut to its first and last `keep` characters
        self.rows_cut = 0
        self.columns: tuple | None = None  # CSV: sources.header_columns
        self.names: list[str] = []  # canonical labels; label ids index this list
        self.rows_read = 0
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self._fd: int | None = None

    def read(self, i: int) -> str:
        """The normalised text of row i (a position in the index arrays)."""
        if self.text_at is not None:
            return self.clean({"text": self.text_at(self.offsets[i])})[0]
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
            weakref.finalize(self, os.close, self._fd)
        try:
            raw = os.pread(self._fd, int(self.sizes[i]), int(self.offsets[i])).decode("utf-8")
            if self.delimiter is None:
                text = json.loads(raw)[self.text_field]
            else:
                text = next(csv.reader(io.StringIO(raw, newline=""), delimiter=self.delimiter))[self.columns[1]]
            return self.clean({"text": text})[0]
        except (ValueError, KeyError, IndexError, TypeError, StopIteration):  # UnicodeDecodeError and JSON's are ValueErrors
            raise TunelabError(
                f"{self.what} changed while training read it (line {int(self.rows[i])} is no longer the row indexed at "
                f"the start). With data.streaming the file is read throughout the run: leave it unchanged until the "
                f"run ends, and resume it (`tunelab train --resume RUN_DIR`).") from None

    def clean(self, row: dict) -> tuple[str, bool]:
        """(the normalised text of a row as read, whether it was cut first): as the in-memory path does it."""
        cut = cut_long_texts([row], ("text",), self.keep)
        return normalise_text(row["text"]), bool(cut)


def index(path, key: str, text_field: str, label_field: str, max_length: int, options=None,
          origin: dict | None = None) -> Index:
    """Check and clean every row of a .jsonl/.csv/.tsv file or a dataset in one pass, as read_examples +
    clean_examples would, keeping only the row's whereabouts (before dedupe: `deduped` does that). `options` and
    `origin`: as for sources.read_examples."""
    if hub.is_source(path):
        split = hub.open_split(path, key, options)
        if origin is not None:
            origin.update(split.origin)
        columns = sources.dataset_columns(split, text_field, label_field)
        ix = Index(None, split.what, None, text_field, label_field, kept_chars(max_length), split.column(text_field))
        return _fill(ix, _dataset(ix, split, columns), "rows")
    p = sources.resolve_path(path, key)
    what = sources.describe(path, key)
    ext = p.suffix.lower()
    if ext not in FORMATS:
        raise TunelabError(
            f"{what}: data.streaming reads {', '.join(FORMATS)} files, not {ext}. Convert it to JSON lines, e.g. "
            f"`python -c \"import pandas as pd; pd.read_parquet('{p}').to_json('{p.with_suffix('.jsonl')}', "
            f"orient='records', lines=True)\"`, or set data.streaming=false to read it into memory.")
    if p.stat().st_size == 0:
        raise TunelabError(f"{what} is empty. It should hold {sources.FORMAT_HINTS[ext]}.")
    delimiter = None if ext in (".jsonl", ".json") else ("\t" if ext == ".tsv" else ",")
    ix = Index(p, what, delimiter, text_field, label_field, kept_chars(max_length))
    return _fill(ix, _jsonl(ix, path) if delimiter is None else _delimited(ix), sources.FORMAT_HINTS[ext])


def _fill(ix: Index, records, hint: str) -> Index:
    """The index arrays of (offset, size, row, text, label) records, cleaned as clean_examples would."""
    offsets, sizes, rows, hashes, labels = array("q"), array("i"), array("q"), array("Q"), array("i")
    ids: dict[str, int] = {}
    for offset, size, row, text, label in records:
        ix.rows_read += 1
        text, cut = ix.clean({"text": text})
        ix.rows_cut += cut
        if is_empty_text(text):
            ix.dropped["empty_text"] += 1
            continue
        if is_missing_label(label):
            ix.dropped["missing_label"] += 1
            continue
        name = canonical_label(label)
        if name not in ids:
            ids[name] = len(ix.names)
            ix.names.append(name)
        offsets.append(offset)
        sizes.append(size)
        rows.append(row)
        hashes.append(int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little"))
        labels.append(ids[name])
    if ix.rows_read == 0:
        raise TunelabError(f"{ix.what} has no data rows. It should hold {hint}.")
    ix.offsets, ix.rows, ix.hashes = np.frombuffer(offsets, np.int64), np.frombuffer(rows, np.int64), np.frombuffer(hashes, np.uint64)
    ix.sizes, ix.labels = np.frombuffer(sizes, np.int32), np.frombuffer(labels, np.int32)
    return ix


def _dataset(ix: Index, split: hub.Split, columns: list[str]):
    """A dataset's rows as index records: the offset and the row are the row's index, the size unused."""
    for i, r in split.rows(columns):
        ex = {"text": r[ix.text_field], "label": r[ix.label_field], "row": i}
        sources.check_types([ex], ix.what, ix.text_field, ix.label_field, "row")
        yield i, 0, i, ex["text"], ex["label"]


def _lines(path: Path, what: str):
    """(byte offset, line number, bytes, text) of every line, split on \n as the in-memory reader does; the first
    line's UTF-8 byte-order mark is left out."""
    offset = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            # decoded line by line: the same checks (UTF-16/32 mark, NUL bytes, invalid UTF-8) and messages as a
            # whole-file read, with the file's own line numbers and byte offsets
            if line_no == 1 or b"\0" in raw:
                text = sources.decode_utf8(raw, path, what, line_no, offset)
            else:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = sources.decode_utf8(raw, path, what, line_no, offset)
            bom = 3 if line_no == 1 and raw.startswith(b"\xef\xbb\xbf") else 0
            yield offset + bom, line_no, raw[bom:], text
            offset += len(raw)


def _jsonl(ix: Index, given_path):
    first = True
    for offset, line_no, raw, text in _lines(ix.path, ix.what):
        if not text.strip():
            continue
        if first:
            sources.check_not_array(text, given_path, ix.what)
        obj = sources.parse_json_line(text[:-1] if text.endswith("\n") else text, line_no, ix.what)
        ex = sources.example_of(obj, line_no, first, ix.what, ix.text_field, ix.label_field)
        sources.check_types([ex], ix.what, ix.text_field, ix.label_field, "line")
        first = False
        yield offset, len(raw), line_no, ex["text"], ex["label"]


_LINE_ENDS = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n|$)")


def _delimited(ix: Index):
    """CSV/TSV records with the byte range each spans: csv.reader pulls exactly the lines of one record."""
    where = {"offset": 0, "line": 0}  # the end of the last line handed to the reader

    def lines():
        for offset, _, raw, _ in _lines(ix.path, ix.what):
            # a lone \r ends a line too, as in the in-memory reader's io.StringIO(newline="")
            for piece in [raw] if b"\r" not in raw[:-2] else [m for m in _LINE_ENDS.findall(raw) if m]:
                offset += len(piece)
                where.update(offset=offset, line=where["line"] + 1)
                yield piece.decode("utf-8")

    reader = csv.reader(lines(), delimiter=ix.delimiter)
    try:
        while True:
            start, first_line = where["offset"], where["line"] + 1
            record = next(reader, None)
            if record is None:
                break
            if sources.is_blank(record):
                continue
            if ix.columns is None:
                ix.columns = sources.header_columns(record, first_line, ix.what, ix.text_field, ix.label_field)
                continue
            sources.check_width(record, ix.columns, first_line, ix.what, ix.delimiter)
            ex = sources.from_columns(record, ix.columns, first_line)
            sources.check_types([ex], ix.what, ix.text_field, ix.label_field, "line")
            yield start, where["offset"] - start, first_line, ex["text"], ex["label"]
    except csv.Error as e:
        raise sources.csv_error(e, reader.line_num, ix.what, ix.delimiter) from None
    if ix.columns is None:
        raise sources.no_header(ix.what, ix.delimiter)


def deduped(ix: Index, dedupe: bool) -> np.ndarray:
    """Positions of the rows kept, in file order: a text seen with two or more labels loses all its rows, then
    repeats of a text keep the first (clean_examples' rules, on 64-bit hashes of the normalised texts)."""
    if not dedupe or not len(ix.hashes):
        return np.arange(len(ix.hashes))
    order = np.argsort(ix.hashes, kind="stable")  # equal texts side by side, each group in file order
    hashes = ix.hashes[order]
    starts = np.flatnonzero(np.r_[True, hashes[1:] != hashes[:-1]])
    del hashes
    labels = ix.labels[order]
    conflicting = np.minimum.reduceat(labels, starts) != np.maximum.reduceat(labels, starts)
    sizes = np.diff(np.r_[starts, len(order)])
    ix.dropped["conflicting_label"] += int(sizes[conflicting].sum())
    ix.dropped["duplicate"] += int((sizes[~conflicting] - 1).sum())
    return np.sort(order[starts[~conflicting]])


def stratified(ix: Index, keep: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """split.stratified_split on positions: the same generator calls in the same order, so the same rows."""
    rng = random.Random(seed)
    held = []
    labels = ix.labels[keep]
    for label_id in sorted(range(len(ix.names)), key=lambda i: label_sort_key(ix.names[i])):
        indices = np.flatnonzero(labels == label_id).tolist()
        n = len(indices)
        k = min(max(round(n * val_fraction), 1), n - 1) if n >= 2 else 0
        rng.shuffle(indices)
        held += indices[:k]
    out = np.zeros(len(keep), dtype=bool)
    out[np.asarray(held, dtype=np.int64)] = True
    return keep[~out], keep[out]


class Rows(Sequence):
    """The kept rows of one split as {"text", "label", "row"} dicts, read from the file on access."""

    def __init__(self, ix: Index, positions: np.ndarray):
        self.index, self.positions = ix, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._row(int(p)) for p in self.positions[i]]
        return self._row(int(self.positions[i]))

    def _row(self, p: int) -> dict:
        ix = self.index
        return {"text": ix.read(p), "label": ix.names[ix.labels[p]], "row": int(ix.rows[p])}

    def label_counts(self) -> dict[str, int]:
        counts = np.bincount(self.index.labels[self.positions], minlength=len(self.index.names))
        return {self.index.names[i]: int(counts[i]) for i in sorted(range(len(counts)),
                key=lambda i: label_sort_key(self.index.names[i])) if counts[i]}

    def labels(self) -> set[str]:
        return {self.index.names[i] for i in np.unique(self.index.labels[self.positions])}

    def hashes(self) -> np.ndarray:
        return self.index.hashes[self.positions]


class Features(Sequence):
    """A split's model inputs, tokenised from `rows` when asked (`encode`: rows -> one feature per row)."""

    def __init__(self, rows: Rows, encode, lengths: np.ndarray):
        self.rows, self.encode, self.lengths = rows, encode, lengths
        self._cache: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.encode(self.rows[i])
        i = range(len(self))[i]
        if i not in self._cache:
            if len(self._cache) >= CACHE:
                self._cache.clear()
            self._cache[i] = self.encode([self.rows[i]])[0]
        return self._cache[i]


def encode(rows: Rows, task, tokenizer, info: dict, max_length: int) -> tuple[Features, dict]:
    """Lazy features of a split, and the token report of its rows (one tokenising pass, nothing kept but lengths)."""
    def one_per_row(chunk: list[dict]) -> list[dict]:
        feats, _ = task.encode(chunk, tokenizer, info, max_length)
        if len(feats) != len(chunk):
            raise TunelabError(f"Internal error: task {task.__name__} dropped rows while encoding; data.streaming "
                               f"needs one feature per row.")
        return feats

    lengths = np.zeros(len(rows), dtype=np.int32)
    stats: dict = {}
    for start in range(0, len(rows), ENCODE_CHUNK):
        chunk = rows[start:start + ENCODE_CHUNK]
        feats, part = task.encode(chunk, tokenizer, info, max_length)
        lengths[start:start + len(feats)] = [feature_length(f) for f in feats]
        for k, v in part.items():
            if isinstance(v, int):
                stats[k] = stats.get(k, 0) + v
    release_freed_memory()
    return Features(rows, one_per_row, lengths), stats


def release_freed_memory() -> None:
    """Hand the heap freed by a pass over every row back to the system (glibc keeps it otherwise, and the resident
    set would grow with the file's size although nothing of it is in use). A no-op where glibc is not the libc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_splits(cfg, seed: int) -> tuple[dict, dict]:
    """data.load_splits, streamed: the same report, and Rows in place of lists."""
    files = {"train": cfg.train, "validation": cfg.validation, "test": cfg.test}
    splits, entries = {}, {}
    for name, path in files.items():
        if path is None:
            continue
        origin: dict = {}
        ix = index(path, f"data.{name}", cfg.text_field, cfg.label_field, cfg.max_length, cfg, origin)
        keep = deduped(ix, cfg.dedupe)
        if not len(keep):
            raise no_rows_left(path, f"data.{name}", cfg, ix.rows_read, ix.dropped)
        splits[name] = Rows(ix, keep)
        counts = splits[name].label_counts()
        entries[name] = {"rows_read": ix.rows_read, "dropped": ix.dropped, "rows": len(keep),
                         **cut_report(ix.rows_cut, ix.keep), "labels": counts, **spelling_report(counts),
                         **({"dataset": origin} if origin else {})}
    if cfg.validation is not None:
        split_info = {"method": "file", "val_fraction": None, "seed": seed}
    else:
        split_info = {"method": "stratified", "val_fraction": cfg.val_fraction, "seed": seed}
        whole = splits["train"]
        train, validation = stratified(whole.index, whole.positions, cfg.val_fraction, seed)
        if not len(validation):
            raise too_few_to_split(cfg, len(train))
        splits["train"], splits["validation"] = Rows(whole.index, train), Rows(whole.index, validation)
        entries["train"].update(rows=len(train), labels=splits["train"].label_counts(), held_out=len(validation))
        entries["validation"] = {"from": "train", "rows_read": len(validation), "dropped": dict.fromkeys(DROP_REASONS, 0),
                                 "rows": len(validation), "labels": splits["validation"].label_counts()}
    train_hashes = splits["train"].hashes()
    for name in ("validation", "test"):
        if name in splits:
            entries[name]["overlap_with_train"] = int(np.isin(splits[name].hashes(), train_hashes).sum())
    for entry in entries.values():
        entry["streamed"] = True
    release_freed_memory()
    report = {"files": {name: absolute(path) for name, path in files.items()}, "split": split_info,
              "splits": {name: entries[name] for name in ("train", "validation", "test") if name in entries}}
    return {name: splits[name] for name in ("train", "validation", "test") if name in splits}, report
