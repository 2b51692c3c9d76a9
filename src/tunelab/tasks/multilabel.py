"""Multi-label classification: any number of labels per text (or text pair), one sigmoid per label, BCE with logits.

Rows, batches, packing and the forward pass are classification's; the target is a 0/1 vector over the training
split's labels. A label is predicted when its probability reaches task.threshold (0.5), or, with
task.threshold=tuned, the per-label threshold with the best F1 on validation, chosen once training is done and
stored in labels.json.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F

from .. import data, models
from ..data.clean import label_sort_key
from ..errors import TunelabError
from ..ops import metrics as M
from . import classification
from .base import (  # noqa: F401  (the interface's defaults)
    embed_texts,
    generate,
    generate_replies,
    generation_prompt,
    generation_rows,
    predict_summary,
    prepare,
    read_generation,
    read_predict,
    search,
)
from .classification import collate, forward, head_modules, pack, packing_fault  # noqa: F401  (the task's API)

MAIN_METRIC = "micro_f1"
METRICS = ("micro_f1", "macro_f1", "subset_accuracy", "hamming_loss", "loss")
HEADLINE = ("micro_f1", "macro_f1")
PROBE = "multilabel"  # one logistic regression per label on the frozen features
BASE = True  # the untrained model's metrics are a baseline
PACKS = True  # examples pack end to end into rows (data.packing, train.padding_free)
ROWS_INTERACT = False  # each row's loss is its own: a batch may be split by length
FORGETTING = "linear_probe"  # eval.forgetting: a labelled file's linear-probe accuracy before and after
GENERATES = False  # labels text: predict, not generate
EMBEDS = False  # no vectors for users: embed and search need an embedding run
SCORES_REPLIES = False  # scores no replies: not a judge or GRPO reward
PIPELINE_TAG = "text-classification"  # one sequence-classification head, several labels
GRID = np.round(np.arange(0.05, 0.96, 0.05), 2)  # thresholds tried per label with task.threshold=tuned


def load_splits(cfg, seed: int):
    splits, report = data.load_splits(cfg.data, seed, kind="set")
    rows = splits["train"]
    joined = next((sep for sep in (",", ";", "|", "/") if sum(sep in r["label"][0] for r in rows if r["label"]) >
                   len(rows) // 2), None)
    if rows and all(len(r["label"]) <= 1 for r in rows):
        hint = (f" Most of them contain {joined!r}: if that joins several labels, set data.label_separator='{joined}'."
                if joined and not cfg.data.label_separator else "")
        print(f"warning: every training row of '{cfg.data.train}' has at most one label, so this is single-label "
              f"data.{hint or ' If it is, task.type classification fits it better.'}", flush=True)
    return splits, report


def label_info(splits: dict[str, list[dict]], cfg) -> dict:
    names = sorted({n for r in splits["train"] for n in r["label"]}, key=label_sort_key)
    if not names:
        raise TunelabError(f"No training row of '{cfg.data.train}' (data.train) has a label in "
                           f"'{cfg.data.label_field}'. Check data.label_field and data.label_separator.")
    info = {"labels": names, "threshold": cfg.task.threshold if cfg.task.threshold != "tuned" else 0.5,
            "tune_threshold": cfg.task.threshold == "tuned"}
    for split in ("validation", "test"):
        check_labels(splits.get(split, []), info, f"{split} data")
    return info


def check_labels(rows: list[dict], info: dict, where: str) -> None:
    unseen = sorted({n for r in rows for n in (r["label"] or ())} - set(info["labels"]), key=label_sort_key)
    if unseen:
        raise TunelabError(
            f"The {where} has labels never seen in training: {', '.join(map(repr, unseen[:10]))} (training labels: "
            f"{', '.join(map(repr, info['labels'][:20]))}). Fix those labels, or add examples of them to data.train.")


def build_model(model_cfg, info: dict, path=None):
    from transformers import AutoModelForSequenceClassification

    labels = info["labels"]
    return models.load(model_cfg, AutoModelForSequenceClassification, path=path, num_labels=len(labels),
                       problem_type="multi_label_classification", id2label=dict(enumerate(labels)),
                       label2id={l: i for i, l in enumerate(labels)})


def encode(rows: list[dict], tokenizer, info: dict, max_length: int) -> tuple[list[dict], dict]:
    """Tokenised like classification; the label becomes a 0/1 vector (all -1 for rows without labels)."""
    ids = {l: i for i, l in enumerate(info["labels"])}
    feats, stats = classification.encode_texts(rows, tokenizer, max_length)
    for f, r in zip(feats, rows):
        if r.get("label") is None:
            f["label"] = [-1.0] * len(ids)
            continue
        f["label"] = [0.0] * len(ids)
        for name in r["label"]:
            f["label"][ids[name]] = 1.0
    return feats, stats


def loss(model, batch, info: dict) -> torch.Tensor:
    """BCE summed over labels and examples; the loop divides by the examples (`count`)."""
    return F.binary_cross_entropy_with_logits(forward(model, batch).float(), batch["labels"].float(), reduction="sum")


def count(batch) -> int:
    return int(batch["labels"].shape[0])


def targets(batch) -> torch.Tensor:
    return batch["labels"].float()


def thresholds(info: dict) -> np.ndarray:
    t = info["threshold"]
    return np.asarray([t[n] for n in info["labels"]] if isinstance(t, dict) else [t] * len(info["labels"]))


def metrics(outputs: torch.Tensor, labels: torch.Tensor, info: dict, features: list[dict] | None = None) -> dict:
    probs = outputs.float().sigmoid().numpy()
    out = M.multilabel(probs >= thresholds(info), labels.numpy() > 0.5, info["labels"])
    out["loss"] = float(F.binary_cross_entropy_with_logits(outputs.float(), labels.float(), reduction="sum")
                        / max(len(labels), 1))
    return out


def calibrate(outputs: torch.Tensor, labels: torch.Tensor, info: dict) -> dict:
    """task.threshold=tuned: per label, the threshold of GRID with the best F1 on these (validation) outputs; ties
    go to the one nearest 0.5. A label never true there keeps 0.5."""
    probs, gold = outputs.float().sigmoid().numpy(), labels.numpy() > 0.5
    chosen = {}
    for i, name in enumerate(info["labels"]):
        if not gold[:, i].any():
            chosen[name] = 0.5
            continue
        pred = probs[:, i][None, :] >= GRID[:, None]
        tp, fp, fn = (pred & gold[:, i]).sum(1), (pred & ~gold[:, i]).sum(1), (~pred & gold[:, i]).sum(1)
        f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
        best = np.flatnonzero(f1 == f1.max())
        chosen[name] = float(GRID[best[np.argmin(np.abs(GRID[best] - 0.5))]])
    return {**info, "threshold": chosen}


def finish(info: dict, validation_outputs, say) -> tuple[dict, dict]:
    """task.threshold=tuned: per-label thresholds from the validation outputs of the best weights."""
    if not info.get("tune_threshold"):
        return info, {}
    info = calibrate(*validation_outputs(), info)
    say("thresholds tuned on validation: " + ", ".join(f"{k} {v:g}" for k, v in info["threshold"].items()))
    return info, {"thresholds": info["threshold"]}


def predictions(outputs: torch.Tensor, info: dict) -> list[dict]:
    probs = outputs.float().sigmoid().numpy()
    names, cut = info["labels"], thresholds(info)
    return [{"labels": [n for n, p, t in zip(names, row, cut) if p >= t],
             "scores": {n: float(p) for n, p in zip(names, row)}} for row in probs]


def samples(model, tokenizer, rows: list[dict], info: dict, device, max_length: int, max_new_tokens: int,
            outputs) -> list[dict]:
    return [{**shown, "gold": list(r["label"] or ()), "predicted": p["labels"], "scores": p["scores"]}
            for r, shown, p in classification.predicted(sys.modules[__name__], tokenizer, rows, info, max_length, outputs)]


def predict(items, pairs, tokenizer, info: dict, cfg, max_length: int, outputs, run_dir) -> list[dict]:
    """The labels at or above their thresholds, and every label's probability, for each text (and its pair)."""
    return classification.predict_texts(sys.modules[__name__], items, pairs, tokenizer, info, cfg, max_length, outputs,
                                        run_dir)


def eval_features(path, cfg, info: dict, text_field: str | None, label_field: str | None, tokenizer,
                  max_length: int) -> tuple[list[dict], dict]:
    """classification's, with each label read as a set of labels (data.label_separator)."""
    data_cfg = cfg.data.model_copy(update={"label_field": label_field or cfg.data.label_field})
    return classification.labelled_features(sys.modules[__name__], path, cfg, info, text_field, label_field, tokenizer,
                                            max_length, label=lambda ex, _: data.label_set(ex, path, "eval file", data_cfg),
                                            label_lists=True)
