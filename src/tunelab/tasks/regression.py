"""Regression: a score per text (or text pair), learnt with MSE (or Huber) on targets standardised with the training
split's mean and standard deviation; metrics and predictions are in the label's own scale.

Rows, batches, packing and the forward pass are classification's with a single output; what differs is the
targets, the loss, the metrics and the baseline: a head at initialisation predicts nothing meaningful, so the
model before training is judged by a ridge probe on its frozen pooled features instead.
"""

from __future__ import annotations

import math
import statistics
import sys

import torch
import torch.nn.functional as F

from .. import data, models
from ..errors import TunelabError
from ..ops import metrics as M
from . import classification
from .base import (  # noqa: F401  (the interface's defaults)
    embed_texts,
    finish,
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

MAIN_METRIC = "rmse"
METRICS = ("rmse", "mse", "mae", "pearson", "spearman", "loss")
HEADLINE = ("pearson", "mae")
PROBE = "ridge"  # the baseline: ridge regression on the frozen model's mean-pooled features
PACKS = True  # examples pack end to end into rows (data.packing, train.padding_free)
ROWS_INTERACT = False  # each row's loss is its own: a batch may be split by length
FORGETTING = "linear_probe"  # eval.forgetting: a labelled file's linear-probe accuracy before and after
BASE = False  # an untrained regression head says nothing about the base model
GENERATES = False  # scores text: predict, not generate
EMBEDS = False  # no vectors for users: embed and search need an embedding run
SCORES_REPLIES = False  # scores no replies: not a judge or GRPO reward
PIPELINE_TAG = "text-classification"  # a score from a sequence-classification head, as the Hub files regression models


def load_splits(cfg, seed: int):
    return data.load_splits(cfg.data, seed, kind="number")


def label_info(splits: dict[str, list[dict]], cfg) -> dict:
    """The training targets' mean and standard deviation (targets are standardised with them), and the loss."""
    values = [float(r["label"]) for r in splits["train"]]
    std = statistics.pstdev(values)
    if not std > 0:
        raise TunelabError(
            f"Every training target in '{cfg.data.train}' (data.train, column '{cfg.data.label_field}') is "
            f"{values[0]:g}, so there is nothing to learn. Check that data.label_field names the score column.")
    return {"target": {"mean": statistics.fmean(values), "std": std, "field": cfg.data.label_field},
            "loss": cfg.task.regression_loss, "huber_delta": cfg.task.huber_delta}


def build_model(model_cfg, info: dict, path=None):
    from transformers import AutoModelForSequenceClassification

    return models.load(model_cfg, AutoModelForSequenceClassification, path=path, num_labels=1,
                       problem_type="regression", id2label={0: info["target"]["field"]},
                       label2id={info["target"]["field"]: 0})


def standardise(value, info: dict) -> float:
    return (float(value) - info["target"]["mean"]) / info["target"]["std"]


def encode(rows: list[dict], tokenizer, info: dict, max_length: int) -> tuple[list[dict], dict]:
    """Tokenised like classification; the label becomes the standardised target (NaN for rows without one)."""
    feats, stats = classification.encode_texts(rows, tokenizer, max_length)
    for f, r in zip(feats, rows):
        f["label"] = standardise(r["label"], info) if r.get("label") is not None else math.nan
    return feats, stats


def check_labels(rows: list[dict], info: dict, where: str) -> None:
    """Any finite number is a valid target (the readers have checked that already)."""


def loss(model, batch, info: dict) -> torch.Tensor:
    """Summed over the batch, in standardised units."""
    pred = forward(model, batch).float().squeeze(-1)
    if info.get("loss") == "huber":
        return F.huber_loss(pred, batch["labels"].float(), reduction="sum", delta=info["huber_delta"])
    return F.mse_loss(pred, batch["labels"].float(), reduction="sum")


def count(batch) -> int:
    return int(batch["labels"].numel())


def targets(batch) -> torch.Tensor:
    return batch["labels"].float()


def own_scale(values: torch.Tensor, info: dict) -> torch.Tensor:
    return values.double().reshape(-1) * info["target"]["std"] + info["target"]["mean"]


def metrics(outputs: torch.Tensor, labels: torch.Tensor, info: dict, features: list[dict] | None = None) -> dict:
    """In the label's own scale; `loss` is the MSE in standardised units (what is trained)."""
    pred, gold = outputs.float().reshape(-1), labels.float().reshape(-1)
    out = M.regression(own_scale(pred, info).numpy(), own_scale(gold, info).numpy())
    out["loss"] = float(F.mse_loss(pred, gold)) if len(gold) else 0.0
    return out


def predictions(outputs: torch.Tensor, info: dict) -> list[dict]:
    return [{"score": float(v)} for v in own_scale(outputs.float(), info)]


def samples(model, tokenizer, rows: list[dict], info: dict, device, max_length: int, max_new_tokens: int,
            outputs) -> list[dict]:
    return [{**shown, "gold": r["label"], "predicted": p["score"]}
            for r, shown, p in classification.predicted(sys.modules[__name__], tokenizer, rows, info, max_length, outputs)]


def predict(items, pairs, tokenizer, info: dict, cfg, max_length: int, outputs, run_dir) -> list[dict]:
    """The score of each text (and its pair), in the label's own scale."""
    return classification.predict_texts(sys.modules[__name__], items, pairs, tokenizer, info, cfg, max_length, outputs,
                                        run_dir)


def eval_features(path, cfg, info: dict, text_field: str | None, label_field: str | None, tokenizer,
                  max_length: int) -> tuple[list[dict], dict]:
    """classification's, with each label read as a number."""
    return classification.labelled_features(sys.modules[__name__], path, cfg, info, text_field, label_field, tokenizer,
                                            max_length, label=lambda ex, field: data.number(ex, path, "eval file", field))
