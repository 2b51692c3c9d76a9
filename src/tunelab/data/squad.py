"""Extractive question-answering data (task.type qa): SQuAD v1.1 / v2.0 JSON, or the same fields flat.

Two layouts are read:
- SQuAD JSON (a .json file holding one object): {"data": [{"title", "paragraphs": [{"context", "qas": [{"id",
  "question", "answers": [{"text", "answer_start"}], "is_impossible"}]}]}]};
- flat rows (.jsonl, JSON-lines .json, .parquet, or a Hugging Face dataset such as hf://rajpurkar/squad), one
  question per row: id, question, context, answers either as Hugging Face datasets has them ({"text": [...],
  "answer_start": [...]}) or as a list of {"text", "answer_start"}.

Every question becomes {"id", "question", "context", "answers": [{"text", "start"}], "row", "where"}. A question
with no answers is unanswerable (SQuAD v2). Each answer must be found in the context at its answer_start, exactly:
a mismatch is an error naming the question and showing the context there, because a silently shifted span trains
the model on the wrong tokens. Surrounding whitespace is then trimmed from answers (moving the start), so spans
begin and end on tokens. The context is kept exactly as given: the character offsets point into it.

Without a validation file, whole paragraphs (contexts) are held out, never single questions: questions on one
paragraph share its text and often its answers, so splitting them would leak validation answers into training.
"""

from __future__ import annotations

import json
import numbers
import random

from ..errors import TunelabError
from . import hub, sources

FLAT_EXAMPLE = ('{"id": "q1", "question": "Where was Ada born?", "context": "Ada was born in Leeds.", '
                '"answers": {"text": ["Leeds"], "answer_start": [16]}}')


# -- reading -----------------------------------------------------------------------

def read(path: str, key: str, dedupe: bool = True, need_answers: bool = True,
         options=None) -> tuple[list[dict], dict]:
    """(questions, report entry) of one file or dataset; the first malformed question is an error naming it.
    With need_answers=False (questions to answer) rows need only a question and a context. `options`: the data
    section (a dataset's split)."""
    what = sources.describe(path, key, options)
    origin: dict = {}
    records, fmt = _records(path, key, what, options, origin)
    if not records:
        raise TunelabError(f"{what} holds no questions. It should hold SQuAD JSON ({{\"data\": [{{\"paragraphs\": "
                           f"[{{\"context\", \"qas\": [...]}}]}}]}}) or one question per line, e.g. {FLAT_EXAMPLE}.")
    examples, problems = [], []
    for rec in records:
        try:
            examples.append(_example(rec, need_answers))
        except ValueError as e:
            problems.append((rec["where"], str(e)))
    if problems:
        where, msg = problems[0]
        more = f" ({len(problems)} questions have problems)" if len(problems) > 1 else ""
        raise TunelabError(f"{what}, {where}: {msg}{more}.")
    kept, seen = [], set()
    for ex in examples:
        k = (ex["question"], ex["context"])
        if dedupe and k in seen:
            continue
        seen.add(k)
        kept.append(ex)
    unanswerable = sum(not ex["answers"] for ex in kept)
    entry = {"format": fmt, "rows_read": len(examples), "dropped": {"duplicate": len(examples) - len(kept)},
             "rows": len(kept), "labels": {"answerable": len(kept) - unanswerable, "unanswerable": unanswerable},
             "contexts": len({ex["context"] for ex in kept}), **({"dataset": origin} if origin else {})}
    return kept, entry


def _records(path: str, key: str, what: str, options=None, origin: dict | None = None) -> tuple[list[dict], str]:
    """Raw question records, each with "where" (how an error names it), and the layout's name."""
    if hub.is_source(path):
        return _flat(sources.read_records(path, key, options, origin), "row"), "dataset rows"
    p = sources.resolve_path(path, key)
    if p.suffix.lower() == ".json":
        text = sources.decode_utf8(p.read_bytes(), path, what)
        if text.lstrip().startswith("{"):
            try:
                tree = sources.decode_json(text)
            except sources.DuplicateKey as e:
                raise sources.duplicate_key(e, what, "in the file") from None
            except (ValueError, RecursionError) as e:
                tree = None  # several objects: JSON lines, read below
                first = text.lstrip().split("\n", 1)[0]
                try:
                    json.loads(first)
                except (ValueError, RecursionError):
                    # Not even the first line is an object of its own: one JSON document (SQuAD JSON), broken, which
                    # the JSON-lines reader would misreport as "line 1 is not one object per line".
                    where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
                    raise TunelabError(
                        f"{what} is not valid JSON: {getattr(e, 'msg', None) or 'nested too deeply'}{where}. It should "
                        f"hold SQuAD JSON ({{\"data\": [{{\"paragraphs\": [...]}}]}}) or one question per line; if "
                        f"the file was cut short, download or export it again.") from None
            if isinstance(tree, dict) and "data" in tree:
                if sources.may_hold_surrogates(text):
                    sources.check_no_surrogates(tree, what)
                return _nested(tree, what), "SQuAD JSON"
    return _flat(sources.read_records(path, key), "row" if p.suffix.lower() == ".parquet" else "line"), "flat rows"


def _flat(rows: list[dict], line: str) -> list[dict]:
    out = []
    for r in rows:
        rec = r["record"]
        qid = rec.get("id")
        out.append({**rec, "id": str(qid) if qid is not None else f"{line}-{r['row']}", "row": r["row"],
                    "where": f"{line} {r['row']}" + (f", question id '{qid}'" if qid is not None else ""),
                    "flat": True})
    return out


def _nested(tree: dict, what: str) -> list[dict]:
    articles = tree["data"]
    if not isinstance(articles, list):
        raise TunelabError(f"{what}: 'data' is a {type(articles).__name__}, not a list of articles. SQuAD JSON is "
                           f"{{\"data\": [{{\"title\", \"paragraphs\": [{{\"context\", \"qas\": [...]}}]}}]}}.")
    out = []
    for a, article in enumerate(articles, start=1):
        title = article.get("title") if isinstance(article, dict) else None
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise TunelabError(f"{what}: article {a}{f' ({title!r})' if title else ''} has no 'paragraphs' list. Each "
                               f"article is {{\"title\", \"paragraphs\": [{{\"context\", \"qas\": [...]}}]}}; fix or "
                               f"remove it.")
        for p, para in enumerate(paragraphs, start=1):
            place = f"article {a}{f' ({title!r})' if title else ''}, paragraph {p}"
            qas = para.get("qas") if isinstance(para, dict) else None
            if not isinstance(qas, list):
                raise TunelabError(f"{what}: {place} has no 'qas' list of questions. Each paragraph is "
                                   f"{{\"context\", \"qas\": [{{\"id\", \"question\", \"answers\"}}]}}; fix or remove it.")
            for q, qa in enumerate(qas, start=1):
                if not isinstance(qa, dict):
                    raise TunelabError(f"{what}: {place}, question {q} is a {type(qa).__name__}, not an object.")
                qid = qa.get("id")
                out.append({**qa, "context": para.get("context"), "id": str(qid) if qid is not None else f"{a}.{p}.{q}",
                            "row": len(out) + 1, "where": f"question id '{qid}' ({place})" if qid is not None
                            else f"{place}, question {q}"})
    return out


def _example(rec: dict, need_answers: bool) -> dict:
    question, context = rec.get("question"), rec.get("context")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"the question is {'missing' if question is None else repr(question)}: there is nothing to "
                         f"answer. Add the question text in 'question', or remove the question")
    if not isinstance(context, str) or not context.strip():
        raise ValueError(f"the context is {'missing' if context is None else 'empty' if isinstance(context, str) else repr(context)}: "
                         f"there is no passage to take the answer from. Give the paragraph in 'context', or remove "
                         f"the question")
    # Leading whitespace in questions only wastes tokens (some SQuAD questions have dozens of spaces).
    ex = {"id": rec["id"], "question": question.strip(), "context": context, "answers": [], "row": rec["row"],
          "where": rec["where"]}
    if "answers" not in rec and not need_answers:
        return ex
    impossible = rec.get("is_impossible")
    answers = _answers(rec.get("answers"), rec.get("flat", False))
    if impossible is True and answers:
        raise ValueError(f"is_impossible is true but it has {len(answers)} answer(s). Keep the answers and set "
                         f"is_impossible to false, or empty 'answers' (SQuAD v2 puts them in 'plausible_answers')")
    if impossible is False and not answers:
        raise ValueError("has no answers but is_impossible is false. Add the answer (text and answer_start), or set "
                         "is_impossible to true if the context does not answer it")
    for n, (text, start) in enumerate(answers, start=1):
        ex["answers"].append(_span(context, text, start, n, len(answers)))
    return ex


def _answers(value, flat: bool) -> list[tuple]:
    """[(text, answer_start)] from either layout; raw values, checked by _span."""
    if value is None:
        shape = '{"text": [...], "answer_start": [...]}' if flat else '[{"text", "answer_start"}]'
        raise ValueError(f"has no 'answers'. Give 'answers': {shape} (empty for an unanswerable question)")
    if isinstance(value, dict):  # Hugging Face datasets: {"text": [...], "answer_start": [...]}
        texts, starts = value.get("text"), value.get("answer_start")
        if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
            raise ValueError(f"'answers' is {json.dumps(value)[:120]}; as a mapping it needs lists 'text' and "
                             f"'answer_start' of the same length")
        return list(zip(texts, starts))
    if isinstance(value, list):
        out = []
        for n, a in enumerate(value, start=1):
            if not isinstance(a, dict) or "text" not in a or "answer_start" not in a:
                raise ValueError(f"answer {n} is {json.dumps(a)[:120]}; each answer needs 'text' and 'answer_start'")
            out.append((a["text"], a["answer_start"]))
        return out
    raise ValueError(f"'answers' is a {type(value).__name__}; give a list of {{\"text\", \"answer_start\"}} or "
                     f"{{\"text\": [...], \"answer_start\": [...]}}")


def _span(context: str, text, start, n: int, total: int) -> dict:
    which = f"answer {n}" if total > 1 else "the answer"
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{which} has text {text!r}; give the answer's words (an unanswerable question has no answers)")
    if isinstance(start, bool) or not isinstance(start, numbers.Integral):
        raise ValueError(f"{which} {text!r} has answer_start {start!r}, not a whole number; give the character offset "
                         f"of the answer in the context, counted from 0")
    start = int(start)
    if start < 0 or start + len(text) > len(context):
        found = context.find(text)
        hint = f" The text occurs at character {found}." if found >= 0 else ""
        raise ValueError(f"{which} {text!r} has answer_start {start}, out of range: the context has {len(context)} "
                         f"characters, so the answer must start between 0 and {len(context) - len(text)}.{hint} Correct "
                         f"answer_start (the character offset, from 0)")
    if context[start : start + len(text)] != text:
        found = context.find(text)
        hint = (f" The text does occur at character {found}." if found >= 0 else
                " The text does not occur anywhere in the context.")
        raise ValueError(f"{which} {text!r} is not at answer_start {start}: the context there reads "
                         f"{_snippet(context, start, len(text))}.{hint} Correct answer_start (the character offset, "
                         f"from 0) or the answer text")
    stripped = text.lstrip()
    start += len(text) - len(stripped)
    return {"text": stripped.rstrip(), "start": start}


def _snippet(context: str, start: int, length: int, margin: int = 25) -> str:
    """The context around a span, the span itself in [brackets]."""
    a, b = max(0, start - margin), min(len(context), start + length + margin)
    return (f"'{'…' if a else ''}{context[a:start]}[{context[start:start + length]}]{context[start + length:b]}"
            f"{'…' if b < len(context) else ''}'")


# -- splits --------------------------------------------------------------------------

def load_splits(cfg, seed: int) -> tuple[dict[str, list[dict]], dict]:
    """Read train (and validation / test); without a validation file hold out whole paragraphs, seeded, until
    about data.val_fraction of the questions are held out."""
    files = {"train": cfg.data.train, "validation": cfg.data.validation, "test": cfg.data.test}
    splits, entries = {}, {}
    for name, path in files.items():
        if path is not None:
            splits[name], entries[name] = read(path, f"data.{name}", cfg.data.dedupe, options=cfg.data)
    if cfg.data.validation is None:
        splits["train"], splits["validation"] = hold_out(splits["train"], cfg.data.val_fraction, seed, cfg.data.train)
        entries["train"].update(rows=len(splits["train"]), held_out=len(splits["validation"]))
        entries["validation"] = {"from": "train", "rows": len(splits["validation"]),
                                 "contexts": len({ex["context"] for ex in splits["validation"]})}
        split = {"method": "random", "by": "context", "val_fraction": cfg.data.val_fraction, "seed": seed}
    else:
        split = {"method": "file", "val_fraction": None, "seed": seed}
    train_contexts = {ex["context"] for ex in splits["train"]}
    for name in ("validation", "test"):
        if name in splits:
            # Questions whose paragraph is also in train: reported, not dropped (SQuAD's own splits share none).
            entries[name]["overlap_with_train"] = sum(ex["context"] in train_contexts for ex in splits[name])
    report = {"files": {k: sources.absolute(v) for k, v in files.items()},
              "split": split, "splits": {k: entries[k] for k in ("train", "validation", "test") if k in entries}}
    return {k: splits[k] for k in ("train", "validation", "test") if k in splits}, report


def hold_out(examples: list[dict], fraction: float, seed: int, path: str) -> tuple[list[dict], list[dict]]:
    """(train, validation): paragraphs in a seeded random order go to validation until it holds
    round(fraction * questions) questions or more; both keep the input order."""
    contexts = list(dict.fromkeys(ex["context"] for ex in examples))
    if len(contexts) < 2:
        raise TunelabError(f"{sources.describe(path, 'data.train')} has {len(contexts)} distinct context(s): too few to hold out "
                           f"a validation paragraph (questions on one paragraph stay together). Add paragraphs, or give "
                           f"data.validation.")
    random.Random(seed).shuffle(contexts)
    per_context: dict[str, int] = {}
    for ex in examples:
        per_context[ex["context"]] = per_context.get(ex["context"], 0) + 1
    target, held = max(1, round(fraction * len(examples))), set()
    count = 0
    for c in contexts[:-1]:  # the last paragraph always stays in train
        if count >= target:
            break
        held.add(c)
        count += per_context[c]
    return [ex for ex in examples if ex["context"] not in held], [ex for ex in examples if ex["context"] in held]
