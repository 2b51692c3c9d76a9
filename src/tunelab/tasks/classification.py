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
from ..data.clean import canonical_label, clean_examples, label_sort_key
from ..data.sources import read_examples
from ..errors import TunelabError
from ..ops import metrics as M
from ..ops import packing
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
    texts_to_predict,
)

MAIN_METRIC = "accuracy"
METRICS = ("accuracy", "macro_f1", "loss")  # scalar metrics usable for early stopping
HEADLINE = ("accuracy",)
PROBE = True  # a logistic-regression probe on frozen features is a fair baseline here
BASE = True  # the untrained model's metrics are a baseline
PACKS = True  # examples pack end to end into rows (data.packing, train.padding_free)
ROWS_INTERACT = False  # each row's loss is its own: a batch may be split by length
FORGETTING = "linear_probe"  # eval.forgetting: a labelled file's linear-probe accuracy before and after
GENERATES = False  # labels text: predict, not generate
EMBEDS = False  # no vectors for users: embed and search need an embedding run
SCORES_REPLIES = False  # scores no replies: not a judge or GRPO reward
PIPELINE_TAG = "text-classification"  # the Hub's pipeline_tag for the model card (report/card.py)


def load_splits(cfg, seed: int):
    return data.load_splits(cfg.data, seed)


def head_modules(model) -> list[str]:
    return models.head_modules(model)


def label_info(splits: dict[str, list[dict]], cfg) -> dict:
    """Label names from the training split; integer-like labels sort numerically."""
    data_cfg = cfg.data
    train = sorted(labels_of(splits["train"]), key=label_sort_key)
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
    unseen = sorted(labels_of(rows) - set(info["labels"]), key=label_sort_key)
    if unseen:
        raise TunelabError(
            f"The {where} has labels never seen in training: {', '.join(map(repr, unseen[:10]))} (training labels: "
            f"{', '.join(map(repr, info['labels'][:20]))}). Fix those labels, or add examples of them to data.train and retrain."
        )


def labels_of(rows) -> set[str]:
    """The canonical labels of a split; streamed rows (data.streaming) know theirs without reading the file."""
    return rows.labels() if hasattr(rows, "labels") else {canonical_label(r["label"]) for r in rows}


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
    feats, stats = encode_texts(rows, tokenizer, max_length)
    for f, r in zip(feats, rows):
        f["label"] = ids.get(canonical_label(r["label"]), -1) if r.get("label") is not None else -1
    return feats, stats


def encode_texts(rows: list[dict], tokenizer, max_length: int) -> tuple[list[dict], dict]:
    """{"input_ids"} per row, with "token_type_ids" for text pairs (rows with a "pair": the tokenizer's own pair
    encoding, the longer side cut first); and the report's counts."""
    texts = [r["text"] for r in rows]
    pairs = [r["pair"] for r in rows] if rows and "pair" in rows[0] else None
    if not rows:
        return [], {"examples": 0, "truncated": 0, "tokens": 0}
    enc = tokenizer(texts, pairs, truncation="longest_first" if pairs else True, max_length=max_length)
    feats = [{"input_ids": x} for x in enc["input_ids"]]
    if pairs is not None and "token_type_ids" in enc:
        for f, types in zip(feats, enc["token_type_ids"]):
            f["token_type_ids"] = types
    # Counted on an untruncated pass: a text of exactly max_length tokens is not a cut one.
    full = lambda i: len(tokenizer(texts[i], pairs[i] if pairs else None)["input_ids"])
    cut = sum(len(f["input_ids"]) == max_length and full(i) > max_length for i, f in enumerate(feats))
    return feats, {"examples": len(feats), "truncated": cut, "tokens": sum(len(f["input_ids"]) for f in feats)}


def pack(features: list[dict], max_length: int) -> list[dict]:
    """train.padding_free: examples end to end in rows of at most max_length tokens (first-fit decreasing), each
    with its own positions (and segment ids, for pairs); `starts` and `labels` list the row's examples in order."""
    rows = []
    types = "token_type_ids" in features[0]
    for members in packing.first_fit([len(f["input_ids"]) for f in features], max_length):
        row = {"input_ids": [], "position_ids": [], "starts": [], "labels": [], **({"token_type_ids": []} if types else {})}
        for f in (features[i] for i in members):
            row["starts"].append(len(row["input_ids"]))
            row["input_ids"] += f["input_ids"]
            row["position_ids"] += list(range(len(f["input_ids"])))
            row["labels"].append(f["label"])
            if types:
                row["token_type_ids"] += f["token_type_ids"]
        rows.append(row)
    return rows


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence in the batch (dynamic padding); pairs carry their segment ids. Packed rows
    (`pack`) also carry position ids, `segments` (which example each token belongs to, 0 for padding) and `first`,
    the flat index of each example's first token, whose state the classifier reads."""
    longest = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), longest), dtype=torch.long)
    types = torch.zeros((len(features), longest), dtype=torch.long) if "token_type_ids" in features[0] else None
    for i, f in enumerate(features):
        input_ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[i, : len(f["input_ids"])] = 1
        if types is not None:
            types[i, : len(f["input_ids"])] = torch.tensor(f["token_type_ids"])
    extra = {"token_type_ids": types} if types is not None else {}
    if "starts" not in features[0]:
        return {"input_ids": input_ids, "attention_mask": mask, **extra,
                "labels": torch.tensor([f["label"] for f in features])}
    positions = torch.zeros_like(input_ids)
    segments = torch.zeros_like(input_ids)
    first, labels = [], []
    for i, f in enumerate(features):
        ends = f["starts"][1:] + [len(f["input_ids"])]
        for k, (a, b) in enumerate(zip(f["starts"], ends)):
            segments[i, a:b] = k + 1
            first.append(i * longest + a)
        positions[i, : len(f["input_ids"])] = torch.tensor(f["position_ids"])
        labels += f["labels"]
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions, "segments": segments,
            "first": torch.tensor(first), "labels": torch.tensor(labels), **extra}


def forward(model, batch) -> torch.Tensor:
    if "segments" in batch:
        return _packed_forward(model, batch)
    types = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **types).logits


def _encoder(model):
    """The body's stack whose output is every token's final state (BERT, RoBERTa, ELECTRA, ...: encoder;
    DistilBERT: transformer), or None for a body without one (decoders pool the last token instead)."""
    _, body = models.body_of(model)
    return next((m for m in (getattr(body, "encoder", None), getattr(body, "transformer", None))
                 if isinstance(m, torch.nn.Module)), None)


def _packed_forward(model, batch, keep: list | None = None) -> torch.Tensor:
    """Logits of packed rows: attention limited to each example by a block-diagonal mask, positions restarting per
    example, and the encoder's output narrowed to each example's first token, so the model's own pooler and head
    (which read position 0) see one example per row. `keep` receives the encoder's full output (packing_fault)."""
    segments = batch["segments"]
    same = (segments[:, None, :, None] == segments[:, None, None, :])
    _, body = models.body_of(model)
    if model.config._attn_implementation != "sdpa":  # eager attention adds the mask to its scores
        dtype = body.get_input_embeddings().weight.dtype
        same = torch.zeros(same.shape, dtype=dtype, device=same.device).masked_fill_(~same, torch.finfo(dtype).min)
    positions = batch["position_ids"]
    offset = getattr(getattr(body, "embeddings", None), "padding_idx", None)
    if offset is not None:  # RoBERTa and its kin number positions from padding_idx + 1
        positions = positions + offset + 1

    def narrow(module, args, output):
        states = output[0]
        if keep is not None:
            keep.append(states)
        firsts = states.flatten(0, 1)[batch["first"]][:, None]
        if isinstance(output, tuple):
            return (firsts, *output[1:])
        output["last_hidden_state"] = firsts
        return output

    handle = _encoder(model).register_forward_hook(narrow)
    try:
        types = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
        return model(input_ids=batch["input_ids"], attention_mask=same, position_ids=positions, **types).logits
    finally:
        handle.remove()


def packing_fault(model) -> str | None:
    """None when packed rows give the same encoder states and logits as the examples alone (train.padding_free),
    else why not: an architecture that pools elsewhere than the first token, numbers positions its own way or
    ignores a 4D mask falls back to padded rows."""
    if _encoder(model) is None:
        return f"{type(model).__name__} has no encoder stack whose first-token state the classifier reads"
    vocab = model.get_input_embeddings().num_embeddings
    lengths = (5, 3)
    examples = [{"input_ids": [(7 * k + 3 + j) % vocab for j in range(n)], "label": 0} for k, n in enumerate(lengths)]
    device = next(model.parameters()).device
    packed = {k: v.to(device) for k, v in collate(pack(examples, sum(lengths)), 0).items()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            states: list = []
            together = _packed_forward(model, packed, keep=states)
            alone_states, alone = [], []
            for f in examples:
                one = {k: v.to(device) for k, v in collate([f], 0).items()}
                out = model(input_ids=one["input_ids"], attention_mask=one["attention_mask"], output_hidden_states=True)
                alone_states.append(out.hidden_states[-1][0])
                alone.append(out.logits[0])
    except (TypeError, ValueError, RuntimeError, IndexError) as e:  # e.g. a forward without position_ids
        return f"its forward failed on a packed row ({type(e).__name__}: {str(e)[:200]})"
    finally:
        model.train(was_training)
    # pack() puts the longer example first, as `examples` already is; states and logits each against their own
    # scale, since a new head's logits are far smaller than the states and a leak would hide in the states' scale
    for name, got, want in (("hidden states", states[0][0], torch.cat(alone_states)),
                            ("logits", together, torch.stack(alone))):
        gap, scale = float((got.float() - want.float()).abs().max()), float(want.float().abs().max())
        if gap > 1e-2 * max(scale, 1e-6):
            return (f"a packed row's {name} differ from the examples' own by {gap:.3g} (scale {scale:.3g}), so its "
                    f"attention, positions or pooling do not keep packed examples apart")
    return None


def loss(model, batch, info: dict) -> torch.Tensor:
    """Loss summed over the batch; the loop divides by `count` over the whole accumulated batch. The loop puts
    train.label_smoothing into `info` when it is set."""
    return F.cross_entropy(forward(model, batch).float(), batch["labels"], reduction="sum",
                           label_smoothing=info.get("label_smoothing", 0.0))


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


def samples(model, tokenizer, rows: list[dict], info: dict, device, max_length: int, max_new_tokens: int,
            outputs) -> list[dict]:
    """Predictions for the first rows of a split, beside their labels ("gold" / "predicted", as NER and QA)."""
    return [{**shown, "gold": r["label"], "predicted": p["label"], "score": p["score"], "probs": p["probs"]}
            for r, shown, p in predicted(sys.modules[__name__], tokenizer, rows, info, max_length, outputs)]


def predicted(task, tokenizer, rows: list[dict], info: dict, max_length: int, outputs) -> list[tuple]:
    """(row, its row number and text (and pair), the task's prediction) for each row: the samples of a run."""
    if not rows:  # eval.samples=0
        return []
    feats, _ = task.encode(rows, tokenizer, info, max_length)
    out, _ = outputs(feats)
    return [(r, {"row": r.get("row"), "text": r["text"], **({"pair": r["pair"]} if "pair" in r else {})}, p)
            for r, p in zip(rows, task.predictions(out, info))]


# -- a finished run: predict, evaluate ----------------------------------------------------------------------------

def predict(items, pairs, tokenizer, info: dict, cfg, max_length: int, outputs, run_dir) -> list[dict]:
    """Label, its probability and the probability of every class, for each text (and its pair)."""
    return predict_texts(sys.modules[__name__], items, pairs, tokenizer, info, cfg, max_length, outputs, run_dir)


def predict_texts(task, items, pairs, tokenizer, info: dict, cfg, max_length: int, outputs, run_dir) -> list[dict]:
    """`predict` of the classification family (`task`: classification, multilabel, regression): {"text"[, "pair"]}
    and the task's `predictions` of each text, whitespace normalised as in training."""
    texts = texts_to_predict(items)
    if not texts:
        return []
    rows = [{"text": " ".join(str(t).split()), "label": None} for t in texts]
    pairs = checked_pairs(pairs, len(texts), cfg, run_dir)
    for row, pair in zip(rows, pairs or []):
        row["pair"] = " ".join(str(pair).split())
    feats, _ = task.encode(rows, tokenizer, info, max_length)
    out, _ = outputs(feats)
    return [{"text": t, **({"pair": pairs[i]} if pairs else {}), **p}
            for i, (t, p) in enumerate(zip(texts, task.predictions(out, info)))]


def checked_pairs(pairs, n: int, cfg, run_dir) -> list[str] | None:
    """The second texts, checked against what the run was trained on."""
    pairs = [pairs] if isinstance(pairs, str) else (list(pairs) if pairs is not None else None)
    trained_on = getattr(cfg.data, "text_pair_field", None)
    if trained_on and pairs is None:
        raise TunelabError(f"'{run_dir}' was trained on text pairs (data.text_pair_field={trained_on}): give each "
                           f"text its second text, `--text A --pair B` (or a file with a '{trained_on}' column).")
    if pairs is not None and not trained_on:
        raise TunelabError(f"'{run_dir}' was trained on single texts, not pairs: leave out --pair.")
    if pairs is not None and len(pairs) != n:
        raise TunelabError(f"{n} texts but {len(pairs)} pairs: give one --pair per --text, in the same order.")
    if pairs is not None and not all(isinstance(p, str) for p in pairs):
        raise TunelabError("Every --pair (pair column value) must be a string.")
    return pairs


def eval_features(path, cfg, info: dict, text_field: str | None, label_field: str | None, tokenizer,
                  max_length: int) -> tuple[list[dict], dict]:
    """A file of texts (and pairs) with labels: whitespace normalised, empty or unlabelled rows dropped and counted."""
    return labelled_features(sys.modules[__name__], path, cfg, info, text_field, label_field, tokenizer, max_length)


def labelled_features(task, path, cfg, info: dict, text_field: str | None, label_field: str | None, tokenizer,
                      max_length: int, label=None, label_lists: bool = False) -> tuple[list[dict], dict]:
    """`eval_features` of the classification family; `label(example, label_field)` turns a raw label into the
    task's (a number, a label set), `label_lists` reads list-valued labels (multilabel)."""
    text_field = text_field or cfg.data.text_field
    label_field = label_field or cfg.data.label_field
    examples = read_examples(path, text_field, label_field, key="eval file", pair_field=cfg.data.text_pair_field,
                             label_lists=label_lists)
    if label is not None:
        examples = [{**ex, "label": label(ex, label_field)} for ex in examples]
    rows, dropped = clean_examples(examples, dedupe=False)
    if not rows:
        reasons = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in dropped.items() if n)
        raise TunelabError(f"Eval file '{path}' has no rows with both a text and a label ({reasons}). "
                           f"Check --text-field and --label-field name the right columns.")
    task.check_labels(rows, info, f"file '{path}'")
    feats, _ = task.encode(rows, tokenizer, info, max_length)
    return feats, {"dropped": dropped}
