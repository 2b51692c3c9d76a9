"""Extractive question answering (SQuAD v1.1 / v2.0): the answer is a span of the context.

- Encoding is the Hugging Face recipe: question first, context second, `truncation="only_second"` with
  `return_overflowing_tokens`, so a long context becomes several windows of data.max_length tokens that share
  task.doc_stride tokens. Each window (a feature) keeps the character offsets of its context tokens. The target
  is the first and last token of the (first) answer; a window that does not hold the whole answer, and every
  window of an unanswerable question, points at position 0 (CLS): "no answer here".
- Loss per window: (cross-entropy of the start + of the end) / 2 over its real tokens, summed; count = windows.
- Decoding: per window the task.n_best highest start and end logits over context tokens, pairs with
  start <= end and at most task.max_answer_length tokens, score = start + end logit; the best pair over all
  windows of a question is its answer. With unanswerable questions (task.version_2), "no answer" wins when
  score(no answer) - best span > task.null_threshold, score(no answer) being the lowest CLS start + end
  logit over the windows (as HF's run_qa).
- Metrics: exact match and F1 over words with the official SQuAD normalisation (lowercase, no punctuation,
  no articles a/an/the, single spaces), the maximum over the gold answers; an unanswerable question's gold is
  the empty answer. On a 0-1 scale like every tunelab metric (the official script prints 0-100).
"""

from __future__ import annotations

import math
import re
import statistics
import string
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from .. import models
from ..data import squad
from ..errors import TunelabError
from .base import (  # noqa: F401  (the interface's defaults)
    embed_texts,
    finish,
    generate,
    generate_replies,
    generation_prompt,
    generation_rows,
    pack,
    packing_fault,
    predict_summary,
    prepare,
    read_generation,
    search,
)

MAIN_METRIC = "f1"
METRICS = ("f1", "exact_match", "loss")
HEADLINE = ("exact_match", "f1")
PROBE = False  # a linear probe on pooled features cannot point at a span
BASE = True  # the untrained model's metrics are a baseline
PACKS = False  # no pack(): rows are never packed
ROWS_INTERACT = False  # each row's loss is its own: a batch may be split by length
FORGETTING = "linear_probe"  # eval.forgetting: a labelled file's linear-probe accuracy before and after
GENERATES = False  # points at answers in a context: predict, not generate
EMBEDS = False  # no vectors for users: embed and search need an embedding run
SCORES_REPLIES = False  # scores no replies: not a judge or GRPO reward
PIPELINE_TAG = "question-answering"  # the Hub's pipeline_tag for the model card (report/card.py)

MASKED = -1e9  # logit of padding positions: never a start or end, and no weight in the loss


def load_splits(cfg, seed: int):
    return squad.load_splits(cfg, seed)


def label_info(splits: dict, cfg) -> dict:
    """What encoding and decoding need; saved as the run's labels.json."""
    train = splits["train"]
    unanswerable = sum(not r["answers"] for r in train)
    if unanswerable == len(train):
        raise TunelabError(f"Every question in the training data '{cfg.data.train}' (data.train) is unanswerable (no "
                           f"answers), so there are no answer spans to learn. Check that the file holds the answers "
                           f"('answers' with text and answer_start).")
    t = cfg.task
    return {"task": "qa", "doc_stride": t.doc_stride, "max_answer_length": t.max_answer_length, "n_best": t.n_best,
            "null_threshold": t.null_threshold, "version_2": t.version_2 if t.version_2 is not None else unanswerable > 0}


def build_model(model_cfg, info: dict, path=None):
    from transformers import AutoModelForQuestionAnswering

    model, tok = models.load(model_cfg, AutoModelForQuestionAnswering, path=path)
    if not getattr(tok, "is_fast", False):
        raise TunelabError(f"The tokenizer of '{path or model_cfg.path}' is a slow (Python) tokenizer; qa needs a fast "
                           f"one for character offsets. Save the model with its tokenizer.json (a fast tokenizer).")
    return model, tok


def head_modules(model) -> list[str]:
    return models.head_modules(model)


# -- encoding --------------------------------------------------------------------------

def encode(rows: list[dict], tokenizer, info: dict, max_length: int) -> tuple[list[dict], dict]:
    """Windows (features) of every question, in question order; rows need "question" and "context", and
    "answers" ([{"text", "start"}]) for targets."""
    # truncated: questions cut to half a window (contexts are never cut: they slide).
    counts = {"questions": len(rows), "split_into_windows": 0, "answer_in_no_window": 0, "truncated": 0,
              "stride_capped": 0}
    if not rows:
        return [], {"examples": 0, "tokens": 0, **counts, "length": None}
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    # A question may take at most half the window: the context needs room, and the stride must fit in it.
    q_limit = max(1, max_length // 2 - specials)
    q_enc = tokenizer([r["question"] for r in rows], add_special_tokens=False, return_offsets_mapping=True)
    questions, capped, by_stride = [], [], {}
    for i, (r, ids, offsets) in enumerate(zip(rows, q_enc["input_ids"], q_enc["offset_mapping"])):
        question = r["question"]
        if len(ids) > q_limit:
            question = question[: offsets[q_limit - 1][1]]
            counts["truncated"] += 1
        room = max_length - min(len(ids), q_limit) - specials
        stride = min(info["doc_stride"], max(0, room // 2))
        capped.append(stride < info["doc_stride"])
        questions.append(question)
        by_stride.setdefault(stride, []).append(i)

    feats = []
    for stride, idx in by_stride.items():
        enc = tokenizer([questions[i] for i in idx], [rows[i]["context"] for i in idx], truncation="only_second",
                        max_length=max_length, stride=stride, return_overflowing_tokens=True,
                        return_offsets_mapping=True)
        for j, ids in enumerate(enc["input_ids"]):
            i = idx[enc["overflow_to_sample_mapping"][j]]
            seq = enc.sequence_ids(j)
            offsets = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][j], seq)]
            f = {"input_ids": ids, "example": i, "id": rows[i].get("id"), "offsets": offsets,
                 "context": rows[i]["context"], "answers": [a["text"] for a in rows[i].get("answers") or []]}
            if "token_type_ids" in enc:
                f["token_type_ids"] = enc["token_type_ids"][j]
            f["start"], f["end"] = _target(offsets, (rows[i].get("answers") or [None])[0])
            feats.append(f)
    feats.sort(key=lambda f: f["example"])  # stable: windows stay in context order

    windows = Counter(f["example"] for f in feats)
    counts["split_into_windows"] = sum(n > 1 for n in windows.values())
    counts["stride_capped"] = sum(n > 1 and capped[i] for i, n in windows.items())  # only where windows overlap
    found = {f["example"] for f in feats if f["start"] > 0}
    counts["answer_in_no_window"] = sum(bool(r.get("answers")) and i not in found for i, r in enumerate(rows))
    lengths = [len(f["input_ids"]) for f in feats]
    length = {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)}
    return feats, {"examples": len(feats), "tokens": sum(lengths), **counts, "length": length}


def _target(offsets: list, answer: dict | None) -> tuple[int, int]:
    """(first, last) token of the answer in this window, or (0, 0) when the window does not hold all of it."""
    if answer is None:
        return 0, 0
    a, b = answer["start"], answer["start"] + len(answer["text"])
    ctx = [t for t, o in enumerate(offsets) if o is not None]
    if not ctx or offsets[ctx[0]][0] > a or offsets[ctx[-1]][1] < b:
        return 0, 0
    # The first token ending after the answer starts, and the last starting before it ends.
    start = next(t for t in ctx if offsets[t][1] > a)
    end = next(t for t in reversed(ctx) if offsets[t][0] < b)
    return start, end


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest window in the batch; token type ids (BERT's segment ids) when the tokenizer makes them."""
    longest = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), longest), dtype=torch.long)
    types = torch.zeros((len(features), longest), dtype=torch.long) if "token_type_ids" in features[0] else None
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[i, :n] = torch.tensor(f["input_ids"])
        mask[i, :n] = 1
        if types is not None:
            types[i, :n] = torch.tensor(f["token_type_ids"])
    batch = {"input_ids": input_ids, "attention_mask": mask,
             "start_positions": torch.tensor([f["start"] for f in features]),
             "end_positions": torch.tensor([f["end"] for f in features])}
    if types is not None:
        batch["token_type_ids"] = types
    return batch


def forward(model, batch) -> torch.Tensor:
    """(windows, tokens, 2) start and end logits; padding positions get MASKED."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    out = model(**inputs)
    logits = torch.stack((out.start_logits, out.end_logits), dim=-1).float()
    return logits.masked_fill(batch["attention_mask"][..., None] == 0, MASKED)


def targets(batch) -> torch.Tensor:
    return torch.stack((batch["start_positions"], batch["end_positions"]), dim=1)


def _losses(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (F.cross_entropy(logits[..., 0], target[:, 0], reduction="none")
            + F.cross_entropy(logits[..., 1], target[:, 1], reduction="none")) / 2


def loss(model, batch, info: dict) -> torch.Tensor:
    """Summed over windows; the loop divides by `count` over the whole accumulated batch."""
    return _losses(forward(model, batch), targets(batch)).sum()


def count(batch) -> int:
    return int(batch["start_positions"].numel())


# -- decoding and metrics ------------------------------------------------------------------

def decode(outputs: torch.Tensor, features: list[dict], info: dict) -> list[dict]:
    """The answer of every question that has windows, in question order:
    {"example", "answer", "start", "end" (characters in the context; None for no answer), "score"}.
    score is the softmax probability of the chosen answer among the candidates searched (HF's convention)."""
    logits = outputs.float().numpy()
    n_best, max_len = info["n_best"], info["max_answer_length"]
    per_example: dict[int, dict] = {}
    for k, f in enumerate(features):
        ex = per_example.setdefault(f["example"], {"spans": [], "null": math.inf, "context": f["context"]})
        start, end = logits[k, : len(f["input_ids"]), 0], logits[k, : len(f["input_ids"]), 1]
        ex["null"] = min(ex["null"], float(start[0] + end[0]))
        ctx = np.array([t for t, o in enumerate(f["offsets"]) if o is not None], dtype=np.int64)
        if not len(ctx):
            continue
        # The n best starts and ends among context tokens only: padding and question tokens never qualify.
        starts = ctx[np.argsort(-start[ctx], kind="stable")[:n_best]]
        ends = ctx[np.argsort(-end[ctx], kind="stable")[:n_best]]
        scores = start[starts][:, None] + end[ends][None, :]
        width = ends[None, :] - starts[:, None]
        for a, b in zip(*np.nonzero((width >= 0) & (width < max_len))):
            s, e = int(starts[a]), int(ends[b])
            ex["spans"].append((float(scores[a, b]), f["offsets"][s][0], f["offsets"][e][1]))
    out = []
    for i, ex in sorted(per_example.items()):
        spans = sorted(ex["spans"], key=lambda x: -x[0])[: n_best]
        pool = [s[0] for s in spans] + ([ex["null"]] if info["version_2"] else [])
        total = _logsumexp(pool) if pool else 0.0
        best = spans[0] if spans else None
        if best is None or (info["version_2"] and ex["null"] - best[0] > info["null_threshold"]):
            score = math.exp(ex["null"] - total) if info["version_2"] else 0.0
            out.append({"example": i, "answer": "", "start": None, "end": None, "score": score})
        else:
            out.append({"example": i, "answer": ex["context"][best[1]:best[2]], "start": best[1], "end": best[2],
                        "score": math.exp(best[0] - total)})
    return out


def _logsumexp(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def normalize_answer(s: str) -> str:
    """The official SQuAD normalisation: lowercase, drop punctuation, drop articles, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s, flags=re.UNICODE)
    return " ".join(s.split())


def exact_match(prediction: str, golds: list[str]) -> float:
    return max(float(normalize_answer(prediction) == normalize_answer(g)) for g in _golds(golds))


def f1(prediction: str, golds: list[str]) -> float:
    """Word-overlap F1, the maximum over the gold answers; an empty side scores 1 only against an empty other."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for g in _golds(golds):
        gold = normalize_answer(g).split()
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        same = sum((Counter(pred) & Counter(gold)).values())
        if same:
            p, r = same / len(pred), same / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


def _golds(golds: list[str]) -> list[str]:
    # As the official v2 script: answers that normalise to nothing do not count; none left = unanswerable.
    return [g for g in golds if normalize_answer(g)] or [""]


def metrics(outputs: torch.Tensor, labels: torch.Tensor, info: dict, features: list[dict] | None = None) -> dict:
    """Exact match and F1 per question (its windows decoded together), and the windows' mean loss."""
    if features is None or len(features) != outputs.shape[0]:
        raise TunelabError("qa metrics need the features the outputs were computed from (evaluate.run passes them).")
    # Outputs of different batches were padded with 0 to a common width: mask every position past a window's end.
    lengths = torch.tensor([len(f["input_ids"]) for f in features])
    beyond = torch.arange(outputs.shape[1])[None, :] >= lengths[:, None]
    window_loss = _losses(outputs.float().masked_fill(beyond[..., None], MASKED), labels)
    golds = {f["example"]: f["answers"] for f in features}
    em, f1s, has = [], [], []
    for p in decode(outputs, features, info):
        gold = golds[p["example"]]
        em.append(exact_match(p["answer"], gold))
        f1s.append(f1(p["answer"], gold))
        has.append(bool(_golds(gold)[0]))
    out = {"f1": _mean(f1s), "exact_match": _mean(em), "loss": float(window_loss.mean()), "questions": len(em),
           "windows": len(features)}
    if info["version_2"] or not all(has):
        for name, keep in (("has_answer", True), ("no_answer", False)):
            idx = [i for i, h in enumerate(has) if h == keep]
            out[f"{name}_exact_match"] = _mean([em[i] for i in idx])
            out[f"{name}_f1"] = _mean([f1s[i] for i in idx])
            out[f"{name}_total"] = len(idx)
    return out


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


# -- answering -----------------------------------------------------------------------------

def question_rows(items) -> list[dict]:
    """{"question", "context"[, "id"]} items to answer (a single one allowed), checked."""
    items = [items] if isinstance(items, dict) else list(items)
    rows = []
    for n, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise TunelabError(f"Item #{n} to answer is {item!r}; a qa run answers {{\"question\": ..., \"context\": ...}} "
                               f"mappings. Give one per question, e.g. predict([{{\"question\": \"Where was Ada born?\", "
                               f"\"context\": \"Ada was born in Leeds.\"}}]).")
        for key in ("question", "context"):
            if not isinstance(item.get(key), str) or not item[key].strip():
                named = f" (id {item['id']!r})" if item.get("id") is not None else ""
                raise TunelabError(f"Item #{n} to answer{named} "
                                   f"has {'no' if item.get(key) is None else 'an empty'} '{key}'. Give both a question and "
                                   f"the context to take the answer from.")
        rows.append({"id": item.get("id"), "question": item["question"].strip(), "context": item["context"],
                     "row": item.get("row", n)})
    return rows


def answers(outputs: torch.Tensor, features: list[dict], info: dict, rows: list[dict]) -> list[dict]:
    """One answer per row: {"id", "question", "answer", "start", "end", "score"}; "" and None for no answer."""
    found = {p["example"]: p for p in decode(outputs, features, info)}
    empty = {"answer": "", "start": None, "end": None, "score": 0.0}
    return [{"id": r.get("id"), "question": r["question"], **{k: v for k, v in found.get(i, empty).items() if k != "example"}}
            for i, r in enumerate(rows)]


def samples(model, tokenizer, rows: list[dict], info: dict, device, max_length: int, max_new_tokens: int,
            outputs) -> list[dict]:
    """Answers to the first questions of a split, beside the gold ones."""
    if not rows:
        return []
    feats, _ = encode(rows, tokenizer, info, max_length)
    out, _ = outputs(feats)
    preds = answers(out, feats, info, rows)
    return [{"row": r.get("row"), "id": r.get("id"), "question": r["question"], "context": r["context"],
             "gold": [a["text"] for a in r.get("answers") or []], "predicted": p["answer"], "score": p["score"]}
            for r, p in zip(rows, preds)]


def predict(items, pairs, tokenizer, info: dict, cfg, max_length: int, outputs, run_dir) -> list[dict]:
    """Items are {"question", "context"[, "id"]}: the answer text, its character span in the context and its score
    (`answers`)."""
    rows = question_rows(items)
    if not rows:
        return []
    feats, _ = encode(rows, tokenizer, info, max_length)
    out, _ = outputs(feats)
    return answers(out, feats, info, rows)


def read_predict(path, text_field: str | None, cfg) -> tuple[list, list | None]:
    """Questions with their contexts: SQuAD JSON, or rows with question and context."""
    return squad.read(str(path), "predict file", dedupe=False, need_answers=False)[0], None


def eval_features(path, cfg, info: dict, text_field: str | None, label_field: str | None, tokenizer,
                  max_length: int) -> tuple[list[dict], dict]:
    """Questions with their answers from a file (SQuAD JSON or rows), every window of each."""
    rows, entry = squad.read(str(path), "eval file", dedupe=False)
    feats, stats = encode(rows, tokenizer, info, max_length)
    return feats, {"dropped": entry["dropped"], "truncated": stats["truncated"]}
