"""Masked-LM domain adaptation (task.type mlm): continued pretraining of an encoder on plain text, BERT's way.

- Rows are causal_lm's (data/chat.py): paragraphs of a .txt file, or a text column (data.text_field) of a
  JSONL / CSV / Parquet file. Each text is tokenized with the tokenizer's special tokens; a text longer than
  data.max_length is cut into several windows, each with its own special tokens (counted in the report).
- Masking (`mask_tokens`, a pure function): each non-special token is chosen with probability
  task.mask_probability (task.whole_word_mask: each word, and then every subword of it, word boundaries from the
  fast tokenizer's word_ids); of the chosen, 80 % become the mask token, 10 % a random non-special token and
  10 % stay as they are. Labels are the original ids at chosen positions and -100 elsewhere. Special tokens
  ([CLS], [SEP], [PAD], [UNK], ...) are never chosen.
- Training windows get a fresh mask every time they are collated (dynamic masking, RoBERTa's), drawn from torch's
  global RNG, which the loop seeds and checkpoints, so a resumed run draws the same masks. Every other window
  (validation, test, an eval file) is masked once when encoded, from a generator seeded with train.seed and its
  row, so the base model and the tuned one are scored on exactly the same positions.
- Only the hidden states at masked positions go through the MLM head (a hook narrows the body's output to them),
  so the (batch, length, vocabulary) logits never exist. The loss is summed over masked tokens; metrics are
  masked-token accuracy, loss and perplexity = exp(mean cross-entropy over masked tokens).
- The head: a checkpoint with MLM head weights keeps its head and, under adapter methods, the head stays frozen
  (its decoder is usually tied to the input embeddings). A checkpoint without one (a sentence-transformers
  encoder) is refused unless task.new_mlm_head=true; then transformers initialises a head and its own modules
  (BERT's cls.predictions.transform) train with every method. The decoder's output bias is a parameter of the
  module that also holds the tied decoder, so under adapter methods it stays at its initial zeros; `full`,
  `freeze` and `bitfit` train it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import models
from ..data import chat
from ..errors import TunelabError
from . import token_classification
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
)
from .causal_lm import length_stats, text_features

MAIN_METRIC = "loss"
METRICS = ("loss", "accuracy", "perplexity")
HEADLINE = ("accuracy", "perplexity")
PROBE = False  # a linear probe needs labels
BASE = True  # the untrained model's metrics are a baseline
PACKS = False  # no pack(): rows are never packed
ROWS_INTERACT = False  # each row's loss is its own: a batch may be split by length
FORGETTING = "linear_probe"  # eval.forgetting: a labelled file's linear-probe accuracy before and after
GENERATES = False  # a masked LM fills in masks, it does not write replies: predict and generate do not apply
EMBEDS = False  # no vectors for users: embed and search need an embedding run
SCORES_REPLIES = False  # scores no replies: not a judge or GRPO reward
PIPELINE_TAG = "fill-mask"  # the Hub's pipeline_tag for the model card (report/card.py)
NEW_HEAD = "tunelab_new_mlm_head"  # set on a model whose MLM head build_model had transformers initialise


def load_splits(cfg, seed: int):
    """causal_lm's readers; training rows are marked for dynamic masking, every other row is masked once."""
    splits, report = chat.load_splits(cfg, seed)
    splits["train"] = [{**r, "dynamic": True} for r in splits["train"]]
    return splits, report


def label_info(splits: dict, cfg) -> dict:
    """What encoding and rebuilding need; saved as the run's labels.json."""
    return {"task": "mlm", "mask_probability": cfg.task.mask_probability, "whole_word_mask": cfg.task.whole_word_mask,
            "new_mlm_head": cfg.task.new_mlm_head, "seed": cfg.train.seed}


# -- the model ------------------------------------------------------------------------

def build_model(model_cfg, info: dict, path=None):
    """AutoModelForMaskedLM, after checking the tokenizer has a mask token and the checkpoint an MLM head."""
    from transformers import AutoModelForMaskedLM

    where = path or model_cfg.path
    p = models.check_model_dir(where)
    tok = models.load_tokenizer(p, model_cfg.trust_remote_code)
    if tok.mask_token_id is None:
        raise TunelabError(
            f"task.type=mlm needs an encoder whose tokenizer has a mask token (BERT's [MASK], RoBERTa's <mask>), "
            f"but the tokenizer of '{where}' (model.path) has none: it looks like a decoder (GPT-2, Llama, ...). "
            f"Point model.path at an encoder such as BERT, RoBERTa or MiniLM, or continue pretraining this model "
            f"with task.type=causal_lm.")
    if not getattr(tok, "is_fast", False):
        raise TunelabError(
            f"The tokenizer of '{where}' (model.path) is a slow (Python) tokenizer; task.type=mlm needs a fast one "
            f"(windows of long texts, word boundaries). Save the model with its tokenizer.json (a fast tokenizer).")
    keys = _checkpoint_keys(p)
    model, tok = models.load(model_cfg, AutoModelForMaskedLM, path=p)
    prefix, _ = models.body_of(model)
    tops = [n for n, m in model.named_children() if n != prefix and any(True for _ in m.parameters())]
    new = keys is not None and not any(k.split(".")[0] in tops for k in keys)
    if new and not info.get("new_mlm_head"):
        raise TunelabError(
            f"'{where}' (model.path) has no masked-LM head weights (no {', '.join(f'{t}.*' for t in tops)} in its "
            f"checkpoint): it is a bare encoder, as sentence-transformers models ship. Set task.new_mlm_head=true to "
            f"train a new head from scratch (the base figures then show that untrained head), or point model.path "
            f"at a checkpoint saved with its MLM head (e.g. bert-base-uncased).")
    setattr(model, NEW_HEAD, new)
    return model, tok


def _checkpoint_keys(path: Path) -> list[str] | None:
    """The tensor names in a model directory's weights, or None when they cannot be listed cheaply."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        if (path / "model.safetensors").is_file():
            with safe_open(str(path / "model.safetensors"), "pt") as f:
                return list(f.keys())
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (path / index).is_file():
                return list(json.loads((path / index).read_text(encoding="utf-8"))["weight_map"])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):  # damaged: loading it names the problem
        return None
    return None  # a single pickle file (model.allow_pickle): not opened twice


def head_modules(model) -> list[str]:
    """[] for a pretrained head (adapters adapt the body). A new head: its own modules, never the output embedding
    (tied to the input embeddings) nor a module holding it: BERT's cls.predictions.transform."""
    if not getattr(model, NEW_HEAD, False):
        return []
    out = model.get_output_embeddings()
    prefix, _ = models.body_of(model)
    names: list[str] = []

    def walk(name: str, module) -> None:
        if module is out or not any(True for _ in module.parameters()):
            return
        if any(m is out for m in module.modules()):
            for child, sub in module.named_children():
                walk(f"{name}.{child}", sub)
        else:
            names.append(name)

    for name, module in model.named_children():
        if name != prefix:
            walk(name, module)
    return names


# -- masking ----------------------------------------------------------------------------

def mask_tokens(ids: torch.Tensor, special: torch.Tensor, word_ids: torch.Tensor | None, probability: float,
                generator: torch.Generator | None, *, mask_id: int, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, labels) of BERT's masking of `ids` (any shape, last dim = positions).

    `special`: bool, True where a token may never be chosen. `word_ids`: None for token-level masking, else the
    word index of each position (-1 for none): a word is chosen with `probability` and all its positions with it.
    Chosen positions: 80 % -> mask_id, 10 % -> a random id from `candidates`, 10 % unchanged; labels are the
    original ids there and -100 elsewhere. `generator` None draws from torch's global RNG."""
    if word_ids is None:
        chosen = torch.rand(ids.shape, generator=generator) < probability
    else:
        words = int(word_ids.max()) + 1 if word_ids.numel() else 0
        picked = torch.rand((*ids.shape[:-1], max(words, 1)), generator=generator) < probability
        chosen = picked.gather(-1, word_ids.clamp(min=0)) & (word_ids >= 0)
    chosen &= ~special
    roll = torch.rand(ids.shape, generator=generator)
    replacement = candidates[torch.randint(len(candidates), ids.shape, generator=generator)]
    inputs = torch.where(chosen & (roll < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), replacement, inputs)
    return inputs, torch.where(chosen, ids, torch.full_like(ids, -100))


def masking(tokenizer, info: dict) -> dict:
    """What masking needs from the tokenizer; one per encoded split, shared by its training windows."""
    specials = sorted(set(tokenizer.all_special_ids))
    candidates = torch.ones(tokenizer.vocab_size, dtype=torch.bool)
    candidates[[i for i in specials if i < tokenizer.vocab_size]] = False
    return {"mask_id": tokenizer.mask_token_id, "probability": info["mask_probability"],
            "whole_word": bool(info.get("whole_word_mask")), "special_ids": torch.tensor(specials, dtype=torch.long),
            "candidates": candidates.nonzero().squeeze(1)}


def _masked(ids: list[int], words: list[int] | None, spec: dict, generator) -> tuple[list[int], list[int]]:
    t = torch.tensor(ids, dtype=torch.long)
    inputs, labels = mask_tokens(t, torch.isin(t, spec["special_ids"]),
                                 torch.tensor(words, dtype=torch.long) if words is not None else None,
                                 spec["probability"], generator, mask_id=spec["mask_id"], candidates=spec["candidates"])
    return inputs.tolist(), labels.tolist()


def _seed(seed: int, row, window: int) -> int:
    return (int(seed) * 1_000_003 + int(row or 0) * 1_009 + window) % (2**63)


# -- rows -> windows -> batches ----------------------------------------------------------

def _windows(text: str, tokenizer, max_length: int, whole_word: bool) -> list[tuple[list[int], list[int] | None]]:
    """(ids with the tokenizer's special tokens, word index per position or -1) for each window of a text: the fast
    tokenizer's own overflowing windows, each with its special tokens."""
    enc = tokenizer(text, truncation=True, max_length=max_length, return_overflowing_tokens=True)
    out = []
    for k, ids in enumerate(enc["input_ids"]):
        if len(ids) <= tokenizer.num_special_tokens_to_add(pair=False):
            continue  # nothing but special tokens
        if not whole_word:
            out.append((ids, None))
            continue
        numbering: dict = {}  # 0, 1, ... within the window; None (a special token) -> -1
        out.append((ids, [-1 if w is None else numbering.setdefault(w, len(numbering)) for w in enc.word_ids(k)]))
    return out


def encode(rows: list[dict], tokenizer, info: dict, max_length: int) -> tuple[list[dict], dict]:
    """Windows of every text. Training rows ("dynamic") keep their ids, masked anew at every collate; the others are
    masked here, once, deterministically. Also the report's counts."""
    spec = masking(tokenizer, info)
    feats, cut, masked, dynamic = [], 0, 0, False
    for r in rows:
        windows = _windows(r["text"], tokenizer, max_length, spec["whole_word"])
        cut += max(0, len(windows) - 1)
        for k, (ids, words) in enumerate(windows):
            if r.get("dynamic"):
                dynamic = True
                feats.append({"input_ids": ids, "row": r["row"], "mask": spec,
                              **({"word_ids": words} if words is not None else {})})
                continue
            generator = torch.Generator().manual_seed(_seed(info.get("seed", 0), r.get("row"), k))
            inputs, labels = _masked(ids, words, spec, generator)
            masked += sum(x != -100 for x in labels)
            feats.append({"input_ids": inputs, "labels": labels, "row": r.get("row")})
    lengths = [len(f["input_ids"]) for f in feats]
    stats = {"examples": len(feats), "texts": len(rows), "split_into_windows": cut, "tokens": sum(lengths),
             "length": length_stats(lengths)}
    stats.update({"masking": "dynamic"} if dynamic else {"masked_tokens": masked})
    return feats, stats


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest window (token classification's padding, labels -100 on padding); training windows are
    masked here (torch's global RNG), the others carry theirs."""
    masked = [f if "labels" in f else dict(zip(("input_ids", "labels"),
                                               _masked(f["input_ids"], f.get("word_ids"), f["mask"], None)))
              for f in features]
    return token_classification.collate(masked, pad_id)


# -- forward, loss, metrics -------------------------------------------------------------

def _masked_logits(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits at the masked positions, their target ids, the row each belongs to). A hook narrows the body's output
    to those positions before the model's own MLM head; it runs after a virtual-token method's hook, which has
    already dropped the virtual positions."""
    keep = batch["labels"] != -100
    where = keep.flatten().nonzero().squeeze(1)
    _, body = models.body_of(model)

    def narrow(module, args, output):
        picked = (output[0] if isinstance(output, tuple) else output["last_hidden_state"]).flatten(0, 1)[where][None]
        if isinstance(output, tuple):
            return (picked, *output[1:])
        output["last_hidden_state"] = picked
        return output

    handle = body.register_forward_hook(narrow)
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0]
    finally:
        handle.remove()
    rows = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)[keep]
    return logits, batch["labels"][keep], rows


def forward(model, batch) -> torch.Tensor:
    """Per window: (summed cross-entropy of its masked tokens, how many were predicted right, how many)."""
    logits, targets_, rows = _masked_logits(model, batch)
    nll = F.cross_entropy(logits.float(), targets_, reduction="none")
    right = (logits.argmax(-1) == targets_).float()
    out = torch.zeros((batch["labels"].shape[0], 3), device=logits.device)
    out[:, 0].index_add_(0, rows, nll)
    out[:, 1].index_add_(0, rows, right)
    out[:, 2] = targets(batch).to(out.dtype)
    return out


def targets(batch) -> torch.Tensor:
    return (batch["labels"] != -100).sum(dim=1)


def loss(model, batch, info: dict) -> torch.Tensor:
    """Summed over the batch's masked tokens; the loop divides by `count` over the accumulated batch."""
    logits, targets_, _ = _masked_logits(model, batch)
    return F.cross_entropy(logits.float(), targets_, reduction="sum")


def count(batch) -> int:
    return int((batch["labels"] != -100).sum())


def metrics(outputs: torch.Tensor, labels: torch.Tensor, info: dict, features: list[dict] | None = None) -> dict:
    tokens = float(outputs[:, 2].sum())
    mean = float(outputs[:, 0].sum()) / max(tokens, 1.0)
    return {"loss": mean, "accuracy": float(outputs[:, 1].sum()) / max(tokens, 1.0),
            "perplexity": math.exp(min(mean, 50.0)), "target_tokens": int(tokens)}


@torch.inference_mode()
def samples(model, tokenizer, rows: list[dict], info: dict, device, max_length: int, max_new_tokens: int,
            outputs) -> list[dict]:
    """The first window of the first rows, as masked, with the original tokens at the masked positions and the
    model's guesses there (the same positions before and after training)."""
    out = []
    was_training = model.training
    model.eval()
    for r in rows:
        feats, _ = encode([{k: v for k, v in r.items() if k != "dynamic"}], tokenizer, info, max_length)
        batch = {k: v.to(device) for k, v in collate(feats[:1], tokenizer.pad_token_id).items()}
        logits, gold, _ = _masked_logits(model, batch)
        show = lambda ids: " ".join(tokenizer.convert_ids_to_tokens([int(i) for i in ids]))
        out.append({"row": r.get("row"), "text": tokenizer.decode(feats[0]["input_ids"]), "gold": show(gold),
                    "predicted": show(logits.argmax(-1))})
    model.train(was_training)
    return out


# -- a finished run: evaluate -----------------------------------------------------------------------------------------

def predict(items, pairs, tokenizer, info: dict, cfg, max_length: int, outputs, run_dir) -> list[dict]:
    """Domain adaptation labels nothing: a later recipe starts from the run, or `tunelab eval` scores text."""
    raise TunelabError(f"'{run_dir}' is an mlm (domain adaptation) run: it labels nothing. Start a later "
                       f"recipe from it (model.path={run_dir}), or score text with `tunelab eval`.")


def eval_features(path, cfg, info: dict, text_field: str | None, label_field: str | None, tokenizer,
                  max_length: int) -> tuple[list[dict], dict]:
    """Text as training reads it (causal_lm's rows), masked once from the run's seed: the same positions each time."""
    return text_features(encode, path, cfg, info, text_field, tokenizer, max_length)
