"""Token-classification (NER) data: CoNLL column files and JSONL rows -> sentences of words with IOB2 tags.

Formats, chosen by the file's extension:
- `.conll`, `.txt`: CoNLL columns. One token per line, the token in the first column and its tag in the last
  (split on tabs when the line has one, else on runs of spaces, so CoNLL-2003's `word POS chunk NER` reads as
  it is); a blank line ends a sentence; `-DOCSTART-` lines are skipped.
- `.jsonl`, `.json` (JSON lines) or a Hugging Face dataset (data/hub.py), one sentence per row, either
  `{"tokens": [...], "tags": [...]}` (the tag column named by data.tags_field; a ClassLabel column's ids read as their
  names, as in conll2003's `ner_tags`) or
  `{"text": "...", "entities": [{"start", "end", "label"}]}` with character offsets (end exclusive). A text row is
  cut into words by `split_words`, with a cut at every entity boundary, so an entity is exactly a run of words.

Tags are `O`, `B-TYPE`, `I-TYPE` (IOB2). An `I-TYPE` that does not continue an entity of its type (IOB1 files, or
a slip) starts one, as seqeval's default mode and conlleval read it; it is rewritten as `B-TYPE` on reading and
counted (`tags_repaired`), so training only ever sees IOB2 and the entities are the ones the file means.

Each example is {"tokens": [str], "tags": [str], "text": str, "spans": [(start, end)] of each token in text,
"row": n} where row is the line the sentence starts on (CoNLL) or the JSONL line. CoNLL and token rows get
text = the tokens joined by single spaces.
"""

from __future__ import annotations

import re
from collections import Counter

from ..errors import TunelabError
from .hub import is_source
from .sources import absolute, decode_utf8, describe, field_names, read_records, resolve_path
from .split import random_split

CONLL_EXTENSIONS = (".conll", ".txt")
EXTENSIONS = CONLL_EXTENSIONS + (".jsonl", ".json")
# Words of raw text (JSONL text rows, texts to predict): runs of letters/digits, joined by inner hyphens or
# apostrophes (Jean-Pierre, O'Brien), and every other non-space character on its own, as CoNLL splits punctuation.
WORD_RE = re.compile(r"\w+(?:['’-]\w+)*|[^\w\s]")
TAG_HELP = "tags must be O, B-TYPE or I-TYPE (IOB2, e.g. B-PER, I-PER, B-LOC)"
ROW_EXAMPLE = ('{"tokens": ["Ada", "Lovelace", "visited", "Paris"], "tags": ["B-PER", "I-PER", "O", "B-LOC"]} or '
               '{"text": "Ada Lovelace visited Paris", "entities": [{"start": 0, "end": 12, "label": "PER"}, '
               '{"start": 21, "end": 26, "label": "LOC"}]}')


def split_words(text: str, cuts=()) -> list[tuple[int, int]]:
    """(start, end) of every word of `text`; no word crosses a position in `cuts`."""
    bounds = sorted({0, len(text), *cuts})
    return [(m.start(), m.end()) for a, b in zip(bounds, bounds[1:]) for m in WORD_RE.finditer(text, a, b)]


def check_tag(tag: str) -> str | None:
    """None when `tag` is valid BIO, else what is wrong with it."""
    if tag == "O":
        return None
    prefix, dash, kind = tag.partition("-")
    if dash and prefix in ("B", "I") and kind.strip():
        return None
    hint = ""
    if not dash and tag.strip():
        hint = f" (a type without its prefix: B-{tag} on an entity's first word, I-{tag} on the rest)"
    elif dash and prefix in ("E", "S", "L", "U"):
        hint = " (IOBES/BILOU tags are not read: convert the file to BIO)"
    return f"tag '{tag}' is not in the BIO scheme{hint}; {TAG_HELP}"


def to_iob2(tags: list[str]) -> tuple[list[str], int]:
    """Each I-X that does not follow B-X / I-X becomes B-X (the entity it starts under seqeval's default mode)."""
    out, prev, fixed = [], "O", 0
    for tag in tags:
        kind = tag[2:]
        if tag.startswith("I-") and prev not in (f"B-{kind}", f"I-{kind}"):
            tag, fixed = f"B-{kind}", fixed + 1
        out.append(tag)
        prev = tag
    return out, fixed


def _joined(tokens: list[str]) -> tuple[str, list[tuple[int, int]]]:
    spans, pos = [], 0
    for t in tokens:
        spans.append((pos, pos + len(t)))
        pos += len(t) + 1
    return " ".join(tokens), spans


# -- CoNLL ------------------------------------------------------------------------

def _read_conll(text: str, what: str) -> list[dict]:
    sentences, tokens, tags, start = [], [], [], None

    def close():
        nonlocal tokens, tags, start
        if tokens:
            sentences.append({"tokens": tokens, "tags": tags, "row": start})
        tokens, tags, start = [], [], None

    for line_no, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            close()
            continue
        cols = line.split("\t") if "\t" in line else line.split()
        cols = [c.strip() for c in cols]
        if cols[0] == "-DOCSTART-":
            close()
            continue
        if len(cols) < 2 or not cols[0]:
            raise TunelabError(
                f"{what} line {line_no} has {'one column' if len(cols) < 2 else 'an empty token'} ({line.strip()!r}), "
                f"but a CoNLL line needs the token in the first column and its tag in the last, e.g. 'Paris B-LOC' "
                f"(or 'Paris<TAB>NNP<TAB>B-LOC'). Add the tag (O outside entities), or leave the line empty to end a sentence."
            )
        problem = check_tag(cols[-1])
        if problem:
            raise TunelabError(f"{what} line {line_no}: {problem}. The tag is the last column of the line; fix it there.")
        start = start or line_no
        tokens.append(cols[0])
        tags.append(cols[-1])
    close()
    return sentences


# -- JSONL ------------------------------------------------------------------------

def _token_row(record: dict, tags_field: str = "tags") -> dict:
    tokens, tags = record["tokens"], record.get(tags_field)
    if not isinstance(tokens, list) or not isinstance(tags, list):
        hint = "" if tags_field in record else f" (there is no '{tags_field}' field: set data.tags_field to the tag column)"
        raise ValueError(f"'tokens' and '{tags_field}' must both be lists (of strings){hint}")
    if len(tokens) != len(tags):
        raise ValueError(f"'tokens' has {len(tokens)} items but '{tags_field}' has {len(tags)}; every token needs "
                         f"exactly one tag")
    for i, (tok, tag) in enumerate(zip(tokens, tags), start=1):
        if not isinstance(tok, str) or not tok.strip() or len(tok.split()) > 1:
            raise ValueError(f"token {i} is {tok!r}: each token must be a non-empty string without spaces")
        if not isinstance(tag, str):
            raise ValueError(f"tag {i} is {tag!r}, not a string; {TAG_HELP}")
        problem = check_tag(tag)
        if problem:
            raise ValueError(f"tag {i} (of token {tok!r}): {problem}")
    return {"tokens": list(tokens), "tags": list(tags)}


def _entity_row(record: dict, text_field: str) -> dict:
    text, ents = record[text_field], record.get("entities", [])
    if not isinstance(text, str):
        raise ValueError(f"'{text_field}' is {type(text).__name__}, not a string")
    if not isinstance(ents, list):
        raise ValueError("'entities' must be a list of {\"start\", \"end\", \"label\"} objects")
    checked = []
    for i, e in enumerate(ents, start=1):
        if not isinstance(e, dict) or not {"start", "end", "label"} <= set(e):
            raise ValueError(f"entity {i} is {e!r}; each entity needs 'start', 'end' (character offsets, end exclusive) and 'label'")
        s, t, label = e["start"], e["end"], e["label"]
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (s, t)):
            raise ValueError(f"entity {i} has start {s!r} and end {t!r}; both must be integer character offsets")
        if not 0 <= s < t <= len(text):
            raise ValueError(f"entity {i} ({label}, {s}-{t}) lies outside the text, which has {len(text)} characters; "
                             f"offsets must satisfy 0 <= start < end <= {len(text)} (end exclusive)")
        if not isinstance(label, str) or not label.strip() or len(label.split()) > 1 or label == "O" or label[:2] in ("B-", "I-"):
            raise ValueError(f"entity {i} has label {label!r}; a label is an entity type without a B-/I- prefix and "
                             f"without spaces, e.g. PER")
        if not text[s:t].strip():
            raise ValueError(f"entity {i} ({label}, {s}-{t}) covers only whitespace")
        checked.append((s, t, label, i))
    checked.sort()
    for (s1, t1, l1, i1), (s2, t2, l2, i2) in zip(checked, checked[1:]):
        if s2 < t1:
            raise ValueError(f"entities {i1} ({l1} {text[s1:t1]!r}, {s1}-{t1}) and {i2} ({l2} {text[s2:t2]!r}, {s2}-{t2}) "
                             f"overlap; BIO tags give each word at most one entity, so keep one of them")
    spans = split_words(text, [x for s, t, _, _ in checked for x in (s, t)])
    tags = ["O"] * len(spans)
    for s, t, label, _ in checked:
        inside = [k for k, (a, b) in enumerate(spans) if s <= a and b <= t]
        for n, k in enumerate(inside):
            tags[k] = ("B-" if n == 0 else "I-") + label
    return {"tokens": [text[a:b] for a, b in spans], "tags": tags, "text": text, "spans": spans}


def _read_jsonl(path, key: str, what: str, data_cfg, origin: dict | None = None) -> list[dict]:
    """JSON-lines rows, or a dataset's (data_cfg names its split and the tag column), as sentences."""
    out, problems = [], []
    text_field, tags_field = data_cfg.text_field, getattr(data_cfg, "tags_field", "tags")
    for r in read_records(path, key, data_cfg, origin):
        rec = r["record"]
        try:
            if "tokens" in rec:
                ex = _token_row(rec, tags_field)
            elif text_field in rec:
                ex = _entity_row(rec, text_field)
            else:
                raise ValueError(f"has neither 'tokens' + '{tags_field}' nor '{text_field}' + 'entities' (its fields: "
                                 f"{field_names(rec)})")
        except ValueError as e:
            problems.append((r["row"], str(e)))
            continue
        out.append({**ex, "row": r["row"]})
    if problems:
        row, msg = problems[0]
        more = f" ({len(problems)} rows have problems: {', '.join(str(p[0]) for p in problems[:10])}" \
               f"{', ...' if len(problems) > 10 else ''})" if len(problems) > 1 else ""
        raise TunelabError(f"{what} row {row}: {msg}{more}. A valid row looks like {ROW_EXAMPLE}; fix or remove the row.")
    return out


# -- files and splits ---------------------------------------------------------------

def read(path, key: str, data_cfg) -> tuple[list[dict], dict]:
    """(examples, report entry) of one file or dataset. Empty sentences and (with data.dedupe) exact repeats are
    dropped and counted; every malformed line or row is an error naming it."""
    what = describe(path, key, data_cfg)
    origin: dict = {}
    if is_source(path):
        examples = _read_jsonl(path, key, what, data_cfg, origin)
        fmt = "dataset: " + "/".join(sorted({"text+entities" if "spans" in ex else "tokens+tags" for ex in examples}))
    elif (p := resolve_path(path, key, EXTENSIONS)).suffix.lower() in CONLL_EXTENSIONS:
        fmt = "conll"
        if p.stat().st_size == 0:
            raise TunelabError(f"{what} is empty. It should hold CoNLL columns: one 'token tag' line per word, a blank line between sentences.")
        examples = _read_conll(decode_utf8(p.read_bytes(), path, what), what)
    else:
        examples = _read_jsonl(path, key, what, data_cfg)
        fmt = "jsonl: " + "/".join(sorted({"text+entities" if "spans" in ex else "tokens+tags" for ex in examples}))
    read_n = len(examples)
    kept, seen, dropped, repaired = [], set(), {"empty": 0, "duplicate": 0}, 0
    for ex in examples:
        if not ex["tokens"]:
            dropped["empty"] += 1
            continue
        ex["tags"], fixed = to_iob2(ex["tags"])
        repaired += fixed
        sig = (tuple(ex["tokens"]), tuple(ex["tags"]))
        if data_cfg.dedupe and sig in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(sig)
        if "spans" not in ex:
            ex["text"], ex["spans"] = _joined(ex["tokens"])
        kept.append(ex)
    if not kept:
        raise TunelabError(f"{what} has no sentences ({read_n} read, {dropped['empty']} empty, {dropped['duplicate']} "
                           f"duplicates). It should hold {'CoNLL token/tag lines' if fmt == 'conll' else ROW_EXAMPLE}.")
    entry = {"format": fmt, "rows_read": read_n, "dropped": dropped, "rows": len(kept), "labels": entity_counts(kept),
             "words": sum(len(ex["tokens"]) for ex in kept), "tags_repaired": repaired,
             **({"dataset": origin} if origin else {})}
    return kept, entry


def entity_counts(examples: list[dict]) -> dict[str, int]:
    counts = Counter(tag[2:] for ex in examples for tag in ex["tags"] if tag.startswith("B-"))
    return dict(sorted(counts.items()))


def load_splits(cfg, seed: int) -> tuple[dict[str, list[dict]], dict]:
    """Read train (and validation / test); without a validation file hold out a seeded random data.val_fraction
    of the training sentences."""
    files = {"train": cfg.data.train, "validation": cfg.data.validation, "test": cfg.data.test}
    splits, entries = {}, {}
    for name, path in files.items():
        if path is not None:
            splits[name], entries[name] = read(path, f"data.{name}", cfg.data)
    if cfg.data.validation is None:
        train, splits["validation"] = random_split(splits["train"], cfg.data.val_fraction, seed, cfg.data.train,
                                                   "sentences")
        splits["train"], n_val = train, len(splits["validation"])
        entries["train"].update(rows=len(train), held_out=n_val, labels=entity_counts(train))
        entries["validation"] = {"from": "train", "rows": n_val, "labels": entity_counts(splits["validation"])}
        split = {"method": "random", "val_fraction": cfg.data.val_fraction, "seed": seed}
    else:
        split = {"method": "file", "val_fraction": None, "seed": seed}
    train_sentences = {tuple(ex["tokens"]) for ex in splits["train"]}
    for name in ("validation", "test"):
        if name in splits:  # reported, not dropped: the user decides whether leakage matters
            entries[name]["overlap_with_train"] = sum(tuple(ex["tokens"]) in train_sentences for ex in splits[name])
    report = {"files": {k: absolute(v) for k, v in files.items()},
              "split": split, "splits": {k: entries[k] for k in ("train", "validation", "test") if k in entries}}
    return {k: splits[k] for k in ("train", "validation", "test") if k in splits}, report
