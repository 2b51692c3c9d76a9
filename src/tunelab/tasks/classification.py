"""Single-label text classification: rows -> tensors, head, loss, metrics.

The training loop only calls the functions below, so it never needs to know
which task it is training.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F

from .. import data, models
from ..data.clean import canonical_label, label_sort_key
from ..errors import TunelabError
from ..evaluate import metrics as M

MAIN_METRIC = "accuracy"
METRICS = ("accuracy", "macro_f1", "loss")  # scalar metrics usable for early stopping
HEADLINE = ("accuracy",)
PROBE = True  # a logistic-regression probe on frozen features is a fair baseline here


def load_splits(cfg, seed: int):
    return data.load_splits(cfg.data, seed)


def head_modules(model) -> list[str]:
    return models.head_modules(model)


def label_info(splits: dict[str, list[dict]], cfg) -> dict:
    """Label names from the training split; integer-like labels sort numerically."""
    data_cfg = cfg.data
    train = sorted({canonical_label(r["label"]) for r in splits["train"]}, key=label_sort_key)
    if len(train) < 2:
        only = train[0] if train else "none"
        raise TunelabError(
            f"The training data '{data_cfg.train}' (data.train) has a single label class ('{only}' in column "
            f"'{data_cfg.label_field}'), so there is nothing to classify. Check that data.label_field names the label "
            f"column and that the file holds examples of at least two classes."
        )
    info = {"labels": train}
    for split in ("validation", "test"):
        check_labels(splits.get(split, []), info, f"{split} data")
    return info


def check_labels(rows: list[dict], info: dict, where: str) -> None:
    unseen = sorted({canonical_label(r["label"]) for r in rows} - set(info["labels"]), key=label_sort_key)
    if unseen:
        raise TunelabError(
            f"The {where} has labels never seen in training: {', '.join(map(repr, unseen[:10]))} (training labels: "
            f"{', '.join(map(repr, info['labels'][:20]))}). Fix those labels, or add examples of them to data.train and retrain."
        )


def build_model(model_cfg, info: dict, path=None):
    from transformers import AutoModelForSequenceClassification

    labels = info["labels"]
    return models.load(
        model_cfg, AutoModelForSequenceClassification, path=path, num_labels=len(labels),
        id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
    )


def encode(rows: list[dict], tokenizer, info: dict, max_length: int) -> tuple[list[dict], dict]:
    """Tokenize once up front; labels become ids (absent labels -> -1 for unlabelled prediction).
    Also returns {"examples", "truncated", "tokens"} for the data report."""
    ids = {l: i for i, l in enumerate(info["labels"])}
    texts = [r["text"] for r in rows]
    enc = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"] if rows else []
    feats = [
        {"input_ids": input_ids, "label": ids.get(canonical_label(r["label"]), -1) if r.get("label") is not None else -1}
        for input_ids, r in zip(enc, rows)
    ]
    # Counted on an untruncated pass: a text of exactly max_length tokens is not a cut one.
    cut = sum(len(x) == max_length and len(tokenizer(t)["input_ids"]) > max_length for x, t in zip(enc, texts))
    stats = {"examples": len(feats), "truncated": cut, "tokens": sum(len(f["input_ids"]) for f in feats)}
    return feats, stats


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence in the batch (dynamic padding)."""
    longest = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), longest), dtype=torch.long)
    for i, f in enumerate(features):
        input_ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[i, : len(f["input_ids"])] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor([f["label"] for f in features])}


def forward(model, batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def loss(model, batch, label_smoothing: float = 0.0) -> torch.Tensor:
    """Loss summed over the batch; the loop divides by `count` over the whole accumulated batch."""
    return F.cross_entropy(forward(model, batch).float(), batch["labels"], reduction="sum",
                           label_smoothing=label_smoothing)


def count(batch) -> int:
    return int(batch["labels"].numel())


def targets(batch) -> torch.Tensor:
    return batch["labels"]


def metrics(outputs: torch.Tensor, labels: torch.Tensor, info: dict, features: list[dict] | None = None) -> dict:
    """Metrics from concatenated logits and label ids of a whole split."""
    out = M.classification(outputs.argmax(-1).numpy(), labels.numpy(), info["labels"])
    out["loss"] = float(F.cross_entropy(outputs.float(), labels).item())
    return {"accuracy": out.pop("accuracy"), "macro_f1": out.pop("macro_f1"), "loss": out.pop("loss"), **out}


def predictions(outputs: torch.Tensor, info: dict) -> list[dict]:
    probs = outputs.float().softmax(-1).numpy()
    names = info["labels"]
    return [
        {"label": names[int(np.argmax(p))], "score": float(p.max()), "probs": {n: float(x) for n, x in zip(names, p)}}
        for p in probs
    ]


def samples(model, tokenizer, rows: list[dict], info: dict, device, max_length: int, max_new_tokens: int) -> list[dict]:
    """Predictions for the first rows of a split, beside their labels."""
    from .. import evaluate

    if not rows:  # eval.samples=0
        return []
    feats, _ = encode(rows, tokenizer, info, max_length)
    out, _ = evaluate.outputs(model, sys.modules[__name__], feats, len(rows), tokenizer.pad_token_id, device)
    # "gold" / "predicted", as the NER and QA samples
    return [{"row": r.get("row"), "text": r["text"], "gold": r["label"], "predicted": p["label"], "score": p["score"],
             "probs": p["probs"]} for r, p in zip(rows, predictions(out, info))]
