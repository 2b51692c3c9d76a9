"""Catastrophic forgetting: how much of what the base model could do survives the fine-tune.

A probe (`eval.forgetting`) is measured on the model before the method touches it and again after training:

- a text file (.txt: one passage per line; .jsonl/.csv/.parquet: the `text` column) gives the **perplexity** of a
  causal LM on general text; a rise means the tuned model lost some of its language modelling;
- a labelled file (`text` and `label` columns: a second task) gives the accuracy of a **linear probe** (logistic
  regression on the mean-pooled features of the body, fitted on a stratified half, scored on the other half);
  a drop means the representation lost information the base had. Works for every model.

For sft / causal_lm runs the default (`auto`) is the general text shipped with tunelab (resources/general_text.txt,
320 passages written for the project); other tasks have no default probe.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import torch

from ..data import sources
from ..data.split import stratified_split
from ..errors import TunelabError
from ..tasks import causal_lm, classification
from . import probe as linear_probe
from . import run as evaluate_run

MAX_ROWS = 2000  # a probe is a check, not a second training set: cap the time it takes


def default_text() -> Path:
    return Path(str(resources.files("tunelab") / "resources" / "general_text.txt"))


def load(setting: str | None, task, task_type: str, seed: int) -> dict | None:
    """The probe named by `eval.forgetting` ('auto', a path, or none), read and checked; None for no probe.
    `task.FORGETTING` says which kind the task can measure: perplexity (a causal LM) or a linear probe."""
    if setting in (None, "", "none"):
        return None
    if setting == "auto":
        if task.FORGETTING != "perplexity":
            return None
        path = default_text()
    else:
        path = Path(setting)
    key = "eval.forgetting"
    if path.suffix.lower() == ".txt":
        p = sources.resolve_path(path, key, (".txt",))
        texts = [line.strip() for line in p.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        labels = None
    else:
        records = [r["record"] for r in sources.read_records(path, key)]
        if not records or "text" not in records[0]:
            found = ", ".join(list(records[0])[:8]) if records else "nothing"
            raise TunelabError(f"eval.forgetting: '{path}' needs a 'text' column (and 'label' for a linear-probe "
                               f"task); found {found}. Rename the column, or give a .txt file with one passage per line.")
        rows = [r for r in records if isinstance(r.get("text"), str) and r["text"].strip()]
        texts = [r["text"] for r in rows]
        labels = [r.get("label") for r in rows] if all(r.get("label") not in (None, "") for r in rows) else None
    if len(texts) < 20:
        raise TunelabError(f"eval.forgetting: '{path}' has {len(texts)} usable passages; a probe needs at least 20 "
                           f"(a few hundred measure it well). Add text, or set eval.forgetting=none.")
    if labels is None:
        if task.FORGETTING != "perplexity":
            raise TunelabError(
                f"eval.forgetting: '{path}' has no label column, so it would measure perplexity, which needs a "
                f"causal language model; this is a {task_type} run. Give a labelled file (text, label) of a second "
                f"task, whose linear-probe accuracy before and after shows the forgetting, or set eval.forgetting=none.")
        return {"kind": "perplexity", "metric": "perplexity", "file": str(path), "texts": texts[:MAX_ROWS]}
    rows = [{"text": t, "label": str(lab)} for t, lab in zip(texts, labels)][:MAX_ROWS]
    names = sorted({r["label"] for r in rows})
    if len(names) < 2:
        raise TunelabError(f"eval.forgetting: '{path}' has a single label ({names[0]!r}); a linear probe needs "
                           f"two or more. Give a file of a task with several labels.")
    fit_rows, score_rows = stratified_split(rows, 0.5, seed)
    return {"kind": "probe", "metric": "accuracy", "file": str(path), "labels": names,
            "fit": fit_rows, "score": score_rows}


def measure(probe: dict, model, tokenizer, device, max_length: int, batch_size: int) -> float:
    """The probe's figure for the model as it is now (adapters active). Not under inference_mode: the probe's
    logistic regression needs autograd; the forward passes turn it off themselves."""
    if probe["kind"] == "perplexity":
        feats, _ = causal_lm.encode([{"text": t, "row": i} for i, t in enumerate(probe["texts"], 1)], tokenizer, {"task": "causal_lm"}, max_length)
        result = evaluate_run(model, causal_lm, feats, {"task": "causal_lm"}, batch_size, tokenizer.pad_token_id, device)
        return float(result["perplexity"]) if math.isfinite(result["perplexity"]) else float("inf")
    def features(rows):
        ids = tokenizer([r["text"] for r in rows], truncation=True, max_length=max_length)["input_ids"]
        return [{"input_ids": x, "label": probe["labels"].index(r["label"])} for x, r in zip(ids, rows)]

    fit, score = features(probe["fit"]), features(probe["score"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    x_fit, x_score = (linear_probe.pooled_features(model, classification, f, batch_size, pad, device) for f in (fit, score))
    predict = linear_probe.fit(x_fit, torch.tensor([f["label"] for f in fit]), len(probe["labels"]))
    truth = torch.tensor([f["label"] for f in score])
    return float((predict(x_score).argmax(-1) == truth).float().mean())


def summary(probe: dict, before: float, after: float) -> dict:
    return {"kind": probe["kind"], "metric": probe["metric"], "file": probe["file"], "before": before, "after": after,
            "change": after - before}


def describe(result: dict) -> str:
    worse = result["change"] > 0 if result["metric"] == "perplexity" else result["change"] < 0
    return (f"forgetting probe ({result['kind']}, {Path(result['file']).name}): {result['metric']} "
            f"{result['before']:.4f} -> {result['after']:.4f} ({result['change']:+.4f}, {'worse' if worse else 'not worse'})")
