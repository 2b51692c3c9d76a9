"""Token classification (NER): a BIO tag per word, entity-level metrics, entity spans out.

- Data (data/conll.py): CoNLL column files or JSONL (tokens + tags, or text + character-offset entities), read
  into sentences of words with IOB2 tags.
- Alignment: words go through the fast tokenizer pre-split (`is_split_into_words`). A word's tag sits on its first
  subword and -100 on the rest, or with task.label_all_subwords on every subword (B-X becomes I-X after the
  first, so no word holds two entity starts). Byte-level BPE tokenizers (RoBERTa, GPT-2) mark a word start by the
  space before it, which a pre-split word lacks: `build_model` reloads them with add_prefix_space=True, so a word
  is tokenized as it is inside running text.
- Truncation: subwords beyond data.max_length are cut; the words that lose their first subword are unlabelled,
  not trained on and not scored. Counted per split (`truncated` sentences, `words_cut`).
- Metrics follow seqeval's default mode (conlleval): an entity is a B-X followed by I-X of the same type; an I-X
  that does not continue an entity of type X starts one. Scores are micro-averaged over exact (sentence, first
  word, last word, type) matches; per type likewise. They are word-level: always read at each word's first
  subword, with label_all_subwords too. `token_accuracy` is the fraction of words whose decoded tag equals the gold one.
- Decoding: each word takes the argmax tag at its first subword; then the sequence is repaired: an I-X after O,
  after an entity of another type, or first in the sentence becomes B-X (the same entities seqeval reads).
  A predicted entity's `score` is the mean, over its words, of the probability of the argmax tag at the
  word's first subword.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import models
from ..data import conll
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
    read_predict,
    search,
    texts_to_predict,
)

MAIN_METRIC = "f1"
METRICS = ("f1", "precision", "recall", "token_accuracy", "loss")  # scalar metrics usable for early stopping
HEADLINE = ("f1", "precision", "recall")
PROBE = False  # a probe on pooled sentence features says nothing about per-word tags
BASE = True  # the untrained model's metrics are a baseline
PACKS = False  # no pack(): rows are never packed
ROWS_INTERACT = False  # each row's loss is its own: a batch may be split by length
FORGETTING = "linear_probe"  # eval.forgetting: a labelled file's linear-probe accuracy before and after
GENERATES = False  # labels text: predict, not generate
EMBEDS = False  # no vectors for users: embed and search need an embedding run
SCORES_REPLIES = False  # scores no replies: not a judge or GRPO reward
PIPELINE_TAG = "token-classification"  # the Hub's pipeline_tag for the model card (report/card.py)


def load_splits(cfg, seed: int):
    return conll.load_splits(cfg, seed)


def head_modules(model) -> list[str]:
    return models.head_modules(model)


# -- labels and model -------------------------------------------------------------

def label_info(splits: dict[str, list[dict]], cfg) -> dict:
    """The tag set: O, then B-/I- of every entity type in training (sorted); saved as the run's labels.json."""
    types = sorted({t[2:] for ex in splits["train"] for t in ex["tags"] if t != "O"})
    if not types:
        raise TunelabError(f"The training data '{cfg.data.train}' (data.train) has no entity: every tag is O, so there "
                           f"is nothing to learn. Check that the tag is the last column (CoNLL) or that 'tags' / "
                           f"'entities' are filled in (JSONL).")
    for split in ("validation", "test"):
        unseen = sorted({t[2:] for ex in splits.get(split, []) for t in ex["tags"] if t != "O"} - set(types))
        if unseen:
            raise TunelabError(f"The {split} data ('{getattr(cfg.data, split) or cfg.data.train}') has entity types "
                               f"never seen in training: {', '.join(unseen)} (training types: {', '.join(types)}). "
                               f"Add training sentences with them, or fix those tags.")
    tags = ["O"] + [f"{p}-{t}" for t in types for p in "BI"]
    return {"labels": tags, "entity_types": types, "label_all_subwords": cfg.task.label_all_subwords}


def build_model(model_cfg, info: dict, path=None):
    from transformers import AutoModelForTokenClassification

    tags = info["labels"]
    where = path or model_cfg.path
    model, tok = models.load(model_cfg, AutoModelForTokenClassification, path=path, num_labels=len(tags),
                             id2label=dict(enumerate(tags)), label2id={t: i for i, t in enumerate(tags)})
    if not getattr(tok, "is_fast", False):
        raise TunelabError(f"The tokenizer of '{where}' is a slow (Python) tokenizer; token classification needs a fast "
                           f"one to map subwords to words. Save the model with its tokenizer.json (a fast tokenizer).")
    if not _pre_split_like_text(tok):
        tok = _with_prefix_space(where, tok, model_cfg.trust_remote_code)
    return model, tok


def _pre_split_like_text(tok) -> bool:
    """Whether a pre-split word gets the subwords it has inside running text (false for byte-level BPE without
    add_prefix_space: 'Paris' alone is not ' Paris')."""
    split = tok(["in", "Paris"], is_split_into_words=True, add_special_tokens=False)
    as_word = [t for t, w in zip(split["input_ids"], split.word_ids()) if w == 1]
    text = tok("in Paris", add_special_tokens=False, return_offsets_mapping=True)
    in_text = [t for t, (a, b) in zip(text["input_ids"], text["offset_mapping"]) if b > 2]  # after "in"
    return as_word == in_text


def _with_prefix_space(where, tok, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        fixed = AutoTokenizer.from_pretrained(str(where), add_prefix_space=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        return tok  # a tokenizer without the option: keep it as it is
    fixed.pad_token, fixed.padding_side = tok.pad_token, "right"
    return fixed if _pre_split_like_text(fixed) else tok


# -- rows -> tensors ----------------------------------------------------------------

def encode(rows: list[dict], tokenizer, info: dict, max_length: int) -> tuple[list[dict], dict]:
    """Features {"input_ids", "labels", "word_starts" (position of each word's first subword), "word_index" (its
    word), "words_cut", "row"}; rows without "tags" (texts to predict) get labels -100. Stats for the data report."""
    ids = {t: i for i, t in enumerate(info["labels"])}
    stats = {"examples": len(rows), "tokens": 0, "target_tokens": 0, "words": 0, "truncated": 0, "words_cut": 0,
             "words_without_subwords": 0}
    if not rows:
        return [], stats
    words = [r["tokens"] for r in rows]
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
    full = tokenizer(words, is_split_into_words=True)  # untruncated: which words have subwords at all
    feats = []
    for i, r in enumerate(rows):
        tags = r.get("tags")
        labels, starts, index, prev = [], [], [], None
        for pos, w in enumerate(enc.word_ids(i)):
            if w is None:
                labels.append(-100)
            elif w != prev:
                labels.append(ids[tags[w]] if tags else -100)
                starts.append(pos)
                index.append(w)
            elif tags and info["label_all_subwords"]:
                labels.append(ids["I-" + tags[w][2:] if tags[w].startswith("B-") else tags[w]])
            else:
                labels.append(-100)
            prev = w
        present = {w for w in full.word_ids(i) if w is not None}
        stats["words"] += len(r["tokens"])
        stats["words_without_subwords"] += len(r["tokens"]) - len(present)
        cut = len(present) - len(index)
        stats["words_cut"] += cut
        stats["truncated"] += cut > 0
        stats["tokens"] += len(enc["input_ids"][i])
        stats["target_tokens"] += sum(x != -100 for x in labels)
        feats.append({"input_ids": enc["input_ids"][i], "labels": labels, "word_starts": starts, "word_index": index,
                      "words_cut": cut, "row": r.get("row")})
    return feats, stats


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence in the batch; padding gets label -100."""
    longest = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(features), longest), -100, dtype=torch.long)
    mask = torch.zeros((len(features), longest), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def forward(model, batch) -> torch.Tensor:
    """Per-token logits (batch, length, tags)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def targets(batch) -> torch.Tensor:
    return batch["labels"]


def loss(model, batch, info: dict) -> torch.Tensor:
    """Cross-entropy summed over labelled subwords; the loop divides by `count` over the accumulated batch."""
    logits = forward(model, batch)
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100, reduction="sum")


def count(batch) -> int:
    return int((batch["labels"] != -100).sum())


# -- BIO ------------------------------------------------------------------------------

def entities(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, first word, end word exclusive) of every entity, read as seqeval's default mode does: B-X starts
    one; I-X continues an entity of type X and starts one otherwise."""
    out, start, kind = [], None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, t = tag.partition("-")
        continues = prefix == "I" and start is not None and kind == t
        if start is not None and not continues:
            out.append((kind, start, i))
            start = kind = None
        if prefix in ("B", "I") and not continues:
            start, kind = i, t
    return out


def repair(tags: list[str]) -> list[str]:
    """Valid IOB2 with the same entities: an I-X not continuing an entity of type X becomes B-X."""
    return conll.to_iob2(list(tags))[0]


def scores(gold: list[list[str]], predicted: list[list[str]]) -> dict:
    """Entity precision / recall / F1 (micro over all entities, and per type) and token accuracy, for sentences of
    gold and predicted tags. No predicted entity gives precision 0 (seqeval's zero_division default)."""
    def spans(seqs):
        return {(i, *e) for i, s in enumerate(seqs) for e in entities(s)}

    g, p = spans(gold), spans(predicted)
    per_type = {}
    for kind in sorted({e[1] for e in g | p}):
        gk, pk = {e for e in g if e[1] == kind}, {e for e in p if e[1] == kind}
        per_type[kind] = {**_prf(len(gk & pk), len(pk), len(gk)), "support": len(gk), "predicted": len(pk)}
    words = sum(len(s) for s in gold)
    right = sum(a == b for gs, ps in zip(gold, predicted) for a, b in zip(gs, repair(ps)))
    return {**_prf(len(g & p), len(p), len(g)), "token_accuracy": right / words if words else 0.0,
            "entities": len(g), "predicted_entities": len(p), "per_type": per_type}


def _prf(tp: int, n_pred: int, n_gold: int) -> dict:
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def metrics(outputs: torch.Tensor, labels: torch.Tensor, info: dict, features: list[dict] | None = None) -> dict:
    """Entity and token metrics of a split from its concatenated per-token logits and labels, read at each word's
    first subword (the features' word_starts; without features, at every labelled position)."""
    tags = info["labels"]
    predicted = outputs.argmax(-1)
    gold_seqs, pred_seqs = [], []
    for i in range(labels.shape[0]):
        pos = torch.tensor(features[i]["word_starts"], dtype=torch.long) if features is not None \
            else (labels[i] != -100).nonzero().flatten()
        keep = labels[i, pos] != -100
        gold_seqs.append([tags[j] for j in labels[i, pos][keep].tolist()])
        pred_seqs.append([tags[j] for j in predicted[i, pos][keep].tolist()])
    out = scores(gold_seqs, pred_seqs)
    valid = labels != -100
    loss_value = float(F.cross_entropy(outputs[valid].float(), labels[valid])) if valid.any() else math.nan
    return {"f1": out.pop("f1"), "precision": out.pop("precision"), "recall": out.pop("recall"),
            "token_accuracy": out.pop("token_accuracy"), "loss": loss_value, "examples": len(gold_seqs),
            "words": sum(len(s) for s in gold_seqs), **out}


# -- predictions ----------------------------------------------------------------------

def _spans(ex: dict, tags: list[str], probs: list[float] | None = None) -> list[dict]:
    out = []
    for kind, a, b in entities(tags):
        start, end = ex["spans"][a][0], ex["spans"][b - 1][1]
        span = {"label": kind, "start": start, "end": end, "text": ex["text"][start:end]}
        if probs is not None:
            span["score"] = sum(probs[a:b]) / (b - a)
        out.append(span)
    return out


def predict_rows(rows: list[dict], tokenizer, info: dict, max_length: int, outputs) -> list[dict]:
    """Decoded entities of sentences {"tokens", "text", "spans"}: [{"entities": [{"label", "start", "end", "text",
    "score"}], "truncated": bool}]. A word whose first subword was cut (or that has no subword) is tagged O."""
    out = [{"entities": [], "truncated": False} for _ in rows]
    todo = [i for i, r in enumerate(rows) if r["tokens"]]
    if not todo:
        return out
    feats, _ = encode([rows[i] for i in todo], tokenizer, info, max_length)
    logits, _ = outputs(feats)
    names = info["labels"]
    for i, f, lg in zip(todo, feats, logits):
        n = len(rows[i]["tokens"])
        tags, probs = ["O"] * n, [0.0] * n
        p = lg[torch.tensor(f["word_starts"], dtype=torch.long)].softmax(-1)
        best, which = p.max(-1)
        for w, prob, k in zip(f["word_index"], best.tolist(), which.tolist()):
            tags[w], probs[w] = names[k], prob
        out[i] = {"entities": _spans(rows[i], repair(tags), probs), "truncated": f["words_cut"] > 0}
    return out


def predict(items, pairs, tokenizer, info: dict, cfg, max_length: int, outputs, run_dir) -> list[dict]:
    """Entities of raw texts, with character offsets into each text as given: {"text", "entities", "truncated"}.
    Texts are cut into words by data.conll.split_words (punctuation on its own, as CoNLL does) and tagged word by
    word. `pairs` are not read (a sentence is tagged alone)."""
    texts = texts_to_predict(items)
    if not texts:
        return []
    rows = []
    for t in texts:
        spans = conll.split_words(t)
        rows.append({"tokens": [t[a:b] for a, b in spans], "text": t, "spans": spans})
    return [{"text": t, **p} for t, p in zip(texts, predict_rows(rows, tokenizer, info, max_length, outputs))]


def eval_features(path, cfg, info: dict, text_field: str | None, label_field: str | None, tokenizer,
                  max_length: int) -> tuple[list[dict], dict]:
    """A labelled file (CoNLL or JSONL, as training reads) checked against the run's entity types."""
    rows, entry = conll.read(path, "eval file", cfg.data.model_copy(update={"dedupe": False}))
    unseen = sorted({t[2:] for ex in rows for t in ex["tags"] if t != "O"} - set(info["entity_types"]))
    if unseen:
        raise TunelabError(f"File '{path}' has entity types this model was not trained on: {', '.join(unseen)} "
                           f"(its types: {', '.join(info['entity_types'])}). Fix those tags, or retrain with them.")
    feats, stats = encode(rows, tokenizer, info, max_length)
    return feats, {"dropped": entry["dropped"], "truncated": stats["truncated"]}


def samples(model, tokenizer, rows: list[dict], info: dict, device, max_length: int, max_new_tokens: int,
            outputs) -> list[dict]:
    """Gold and predicted entities of the first validation sentences."""
    preds = predict_rows(rows, tokenizer, info, max_length, outputs)
    return [{"row": r.get("row"), "text": r["text"], "gold": _spans(r, r["tags"]), "predicted": p["entities"]}
            for r, p in zip(rows, preds)]
