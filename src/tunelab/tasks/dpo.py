"""Direct preference optimisation (task.type dpo): a causal LM learns to prefer `chosen` over `rejected` replies
relative to a reference policy, without a reward model (Rafailov et al. 2023; IPO with task.dpo_loss=ipo).

Rows are prompt / chosen / rejected pairs (data/preference.py) rendered with the sft template; a reply's
log-probability is the sum over its tokens only. A batch of B pairs is one forward over 2B rows.

The reference policy is the model as training starts (an sft model: `model.path` a merged or full-FT sft model,
or `method.init_from` an sft adapter). Where it comes from (task.reference):
- `adapters_disabled` (default for adapter methods started fresh): the same model with its adapters switched off
  at each step, so no second copy of the weights is held (as TRL does with peft);
- `precomputed`: the reference log-probs of every pair, computed once before the first step and stored with the
  pair (default for methods that change the base weights, full / freeze / bitfit, and for init_from, where
  disabling the adapter would also remove the sft adapter). It costs one forward pass over the data and no memory.
"""

from __future__ import annotations

import torch

from .. import methods
from ..data import preference as pairs
from ..data.batching import length_sorted_batches
from ..ops import preference
from . import causal_lm, reward
from .base import (  # noqa: F401  (the interface's defaults)
    embed_texts,
    eval_features,
    finish,
    pack,
    packing_fault,
    predict_summary,
    read_predict,
    search,
)

MAIN_METRIC = "loss"
METRICS = ("loss", "accuracy", "margin")
HEADLINE = ("loss", "accuracy", "margin")
PROBE = False
BASE = True  # the untrained model's metrics are a baseline
PACKS = False  # no pack(): rows are never packed
ROWS_INTERACT = False  # each row's loss is its own: a batch may be split by length
FORGETTING = "perplexity"  # eval.forgetting=auto: perplexity on general text
GENERATES = True  # a policy writes text: generate (the sft template, as causal_lm's sft)
EMBEDS = False  # no vectors for users: embed and search need an embedding run
SCORES_REPLIES = False  # scores no replies: not a judge or GRPO reward
PIPELINE_TAG = "text-generation"  # a policy that writes replies

load_splits = reward.load_splits
head_modules = causal_lm.head_modules
encode = reward.encode
count = reward.count
targets = reward.targets


def label_info(splits: dict, cfg) -> dict:
    return {"task": "dpo", "template": cfg.task.template, "truncation": cfg.data.truncation, "beta": cfg.task.beta,
            "loss_type": cfg.task.dpo_loss, "label_smoothing": cfg.task.dpo_label_smoothing}


def build_model(model_cfg, info: dict, path=None):
    as_sft = {**info, "task": "sft"}  # load and settle the template exactly as sft does
    model, tok = causal_lm.build_model(model_cfg, as_sft, path)
    info["template"] = as_sft["template"]
    return model, tok


def reference_mode(cfg) -> str:
    if cfg.task.reference != "auto":
        return cfg.task.reference
    # a method that trains the base itself leaves no "adapters off" model to serve as the reference
    changes_base = methods.get(cfg.method.name).CHANGES_BASE or getattr(cfg.method, "bias", "none") != "none"
    return "precomputed" if changes_base or getattr(cfg.method, "init_from", None) else "adapters_disabled"


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    batch = pairs.collate(features, pad_id)
    if all("ref_logps" in f for f in features):  # (chosen, rejected) per pair, from precompute_reference
        batch["ref_logps"] = torch.tensor([f["ref_logps"] for f in features], dtype=torch.float32)
    return batch


def _logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(pairs, 2) summed reply log-probs and (pairs, 2) reply token counts; the same sums as
    preference.sequence_logps on the model's logits, without holding the logits of the batch (lm_loss)."""
    nll, rows = causal_lm.token_nll(model, batch)
    logps = torch.zeros(batch["labels"].shape[0], device=nll.device).index_add(0, rows, -nll)
    return logps.view(2, -1).T, causal_lm.targets(batch).view(2, -1).T


def _reference(model, batch) -> torch.Tensor:
    if "ref_logps" in batch:
        return batch["ref_logps"].to(batch["input_ids"].device)
    with torch.no_grad(), methods.adapters_disabled(model):
        return _logps(model, batch)[0]


def forward(model, batch) -> torch.Tensor:
    """(pairs, 6): policy chosen / rejected log-probs, reference chosen / rejected, reply tokens chosen / rejected."""
    policy, n = _logps(model, batch)
    return torch.cat([policy, _reference(model, batch), n.float()], dim=1)


def _loss_terms(out: torch.Tensor, info: dict):
    return preference.dpo_loss(out[:, 0], out[:, 1], out[:, 2], out[:, 3], info["beta"], info["label_smoothing"],
                               info["loss_type"], out[:, 4], out[:, 5])


def loss(model, batch, info: dict) -> torch.Tensor:
    return _loss_terms(forward(model, batch), info)[0].sum()


def metrics(outputs: torch.Tensor, labels: torch.Tensor, info: dict, features: list[dict] | None = None) -> dict:
    losses, chosen, rejected = _loss_terms(outputs, info)
    m = preference.dpo_metrics(chosen, rejected)
    return {"loss": float(losses.mean()), "accuracy": m["rewards/accuracies"], "margin": m["rewards/margins"],
            "rewards_chosen": m["rewards/chosen"], "rewards_rejected": m["rewards/rejected"], "pairs": len(losses)}


def prepare(model, feats: dict, cfg, pad_id: int, device, batch_size: int, say) -> None:
    """With a precomputed reference (reference_mode), the starting model's log-probs of every pair, before the
    first step."""
    if reference_mode(cfg) == "precomputed":
        say("reference log-probs: computing them once with the starting model")
        precompute_reference(model, feats, pad_id, device, batch_size)


@torch.inference_mode()
def precompute_reference(model, feats: dict, pad_id: int, device, batch_size: int) -> None:
    """Store the reference log-probs in every pair of every split (the model as it is now: before training)."""
    was_training = model.training
    model.eval()
    for rows in feats.values():
        for idx in length_sorted_batches(rows, batch_size):
            batch = {k: v.to(device) for k, v in collate([rows[i] for i in idx], pad_id).items()}
            ref = _logps(model, batch)[0].cpu()
            for i, r in zip(idx, ref.tolist()):
                rows[i]["ref_logps"] = r
    model.train(was_training)


generate = causal_lm.generate
generate_replies = causal_lm.generate_replies
prompt_text = causal_lm.prompt_text
generation_prompt = causal_lm.generation_prompt
predict = causal_lm.predict  # a policy writes text: generate, not predict


def _conversations(rows: list[dict]) -> list[dict]:
    """Preference rows as sft conversations: the prompt, then the chosen reply (the reference a reply is scored on)."""
    return [{"messages": r["prompt"] + [{"role": "assistant", "content": r["chosen"]}], "row": r["row"]} for r in rows]


def generation_rows(rows: list[dict], tokenizer, info: dict) -> list[dict]:
    """{"row", "prompt", "reference"}: each pair's prompt rendered with the sft template, its chosen reply."""
    return causal_lm.generation_rows(_conversations(rows), tokenizer, {**info, "task": "sft"})


def read_generation(path, cfg, text_field: str | None) -> list[dict]:
    """The pairs of a preference file (prompt / chosen / rejected): the chosen reply is the reference."""
    return pairs.read(str(path), "eval file", cfg.data)[0]


def samples(model, tokenizer, rows: list[dict], info: dict, device, max_length: int, max_new_tokens: int,
            outputs) -> list[dict]:
    """The model's own reply to the first prompts, beside the chosen one (as sft's samples)."""
    return causal_lm.samples(model, tokenizer, _conversations(rows), {**info, "task": "sft"}, device, max_length,
                             max_new_tokens, outputs)
