"""Reward model (task.type reward): a scalar head on the body, trained on preference pairs with the Bradley–Terry
pairwise loss -log sigmoid(r(chosen) - r(rejected)), as TRL's RewardTrainer.

Rows are prompt / chosen / rejected pairs (data/preference.py), rendered with the sft template, so a reward model
scores exactly the text an sft model of the same template writes. The score of a sequence is the head's output at
its last non-pad token (transformers' *ForSequenceClassification with num_labels=1). A batch of B pairs is one
forward over 2B rows (the chosen ones, then the rejected ones). Metrics: pairwise accuracy (chosen scored higher)
and the mean margin r(chosen) - r(rejected).
"""

from __future__ import annotations

import torch

from .. import models
from ..data import chat
from ..data import preference as pairs
from ..data.sources import read_records
from ..errors import TunelabError
from ..ops import preference
from . import classification  # score(): plain padding of single sequences
from .base import (  # noqa: F401  (the interface's defaults)
    embed_texts,
    eval_features,
    finish,
    generate,
    generate_replies,
    generation_prompt,
    generation_rows,
    pack,
    packing_fault,
    prepare,
    read_generation,
    search,
)

MAIN_METRIC = "accuracy"
METRICS = ("accuracy", "margin", "loss")
HEADLINE = ("accuracy", "margin")
PROBE = False  # no labels to probe: the pairs are the supervision
BASE = True  # the untrained model's metrics are a baseline
PACKS = False  # no pack(): rows are never packed
ROWS_INTERACT = False  # each row's loss is its own: a batch may be split by length
FORGETTING = "linear_probe"  # eval.forgetting: a labelled file's linear-probe accuracy before and after
GENERATES = False  # scores replies: predict, not generate
EMBEDS = False  # no vectors for users: embed and search need an embedding run
SCORES_REPLIES = True  # a reward for a (prompt, reply): a judge (eval.judge) and a GRPO reward (task.reward_model)
PIPELINE_TAG = "text-classification"  # a sequence-classification head scoring replies


def load_splits(cfg, seed: int):
    return pairs.load_splits(cfg, seed)


def label_info(splits: dict, cfg) -> dict:
    return {"task": "reward", "template": cfg.task.template, "truncation": cfg.data.truncation}


def build_model(model_cfg, info: dict, path=None):
    from transformers import AutoModelForSequenceClassification

    model, tok = models.load(model_cfg, AutoModelForSequenceClassification, path=path, num_labels=1)
    info["template"] = chat.resolve_template(info["template"], tok, f"'{path or model_cfg.path}'")
    return model, tok


def head_modules(model) -> list[str]:
    return models.head_modules(model)


def encode(rows: list[dict], tokenizer, info: dict, max_length: int) -> tuple[list[dict], dict]:
    feats, stats = pairs.encode(rows, tokenizer, info["template"], max_length, info["truncation"])
    for f in feats:
        f["length"] = max(len(f["chosen_ids"]), len(f["rejected_ids"]))
    return feats, stats


collate = pairs.collate  # labels unused: the score is the head's output at the last token


def forward(model, batch) -> torch.Tensor:
    """(pairs, 2) scores: column 0 the chosen reply's, column 1 the rejected one's."""
    scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float()
    return scores.view(2, -1).T


def loss(model, batch, info: dict) -> torch.Tensor:
    scores = forward(model, batch)
    return preference.reward_loss(scores[:, 0], scores[:, 1]).sum()  # pinned to TRL's RewardTrainer in the tests


def count(batch) -> int:
    return batch["input_ids"].shape[0] // 2


def targets(batch) -> torch.Tensor:
    return torch.zeros(count(batch))


def metrics(outputs: torch.Tensor, labels: torch.Tensor, info: dict, features: list[dict] | None = None) -> dict:
    return {**preference.reward_metrics(outputs[:, 0], outputs[:, 1]),
            "loss": float(preference.reward_loss(outputs[:, 0], outputs[:, 1]).mean()), "pairs": len(outputs)}


def samples(model, tokenizer, rows: list[dict], info: dict, device, max_length: int, max_new_tokens: int,
            outputs) -> list[dict]:
    """The first pairs of a split with the score of each reply."""
    if not rows:
        return []
    feats, _ = encode(rows, tokenizer, info, max_length)
    out, _ = outputs(feats)
    by_row = {r["row"]: r for r in rows}
    return [{"row": f["row"], "prompt": by_row[f["row"]]["prompt"][-1]["content"], "chosen": by_row[f["row"]]["chosen"],
             "rejected": by_row[f["row"]]["rejected"], "score_chosen": float(o[0]), "score_rejected": float(o[1])}
            for f, o in zip(feats, out)]


def score(items: list[dict], tokenizer, info: dict, max_length: int, outputs) -> list[dict]:
    """The reward of each {"prompt": str or chat messages, "response": str}, rendered as in training; single
    sequences, batched as classification batches them (the head's output at the last token)."""
    feats = []
    for i, item in enumerate(items, start=1):
        if not isinstance(item, dict) or not isinstance(item.get("response"), str) or item.get("prompt") is None:
            raise TunelabError(f"Item #{i} to score is {item!r}: a reward model scores a reply to a prompt; give "
                               f"{{\"prompt\": ..., \"response\": ...}} (on the command line: --prompt P --text R).")
        prompt = item["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        text, _ = chat.render(messages + [{"role": "assistant", "content": item["response"]}], info["template"], tokenizer)
        ids = tokenizer(text, add_special_tokens=info["template"] == "alpaca")["input_ids"][:max_length]
        feats.append({"input_ids": ids, "label": 0})
    out, _ = outputs(feats, classification)
    return [{"prompt": item["prompt"], "response": item["response"], "score": float(o[0])} for item, o in zip(items, out)]


def predict(items, pairs, tokenizer, info: dict, cfg, max_length: int, outputs, run_dir) -> list[dict]:
    """Items are {"prompt", "response"}: the reward of each reply (`score`)."""
    return score(list(items), tokenizer, info, max_length, outputs)


def read_predict(path, text_field: str | None, cfg) -> tuple[list, list | None]:
    """Rows with a prompt and a response, as they are."""
    return [r["record"] for r in read_records(path, "predict file")], None


def predict_summary(predictions: list[dict]) -> str | None:
    """The figure to compare two policies' replies by: the mean reward."""
    if not predictions:
        return None
    return f"mean reward {sum(p['score'] for p in predictions) / len(predictions):.4f} over {len(predictions)} replies"
