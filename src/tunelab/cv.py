"""k-fold cross-validation (`tunelab cv RECIPE --folds 5`): one run per fold under a parent directory.

The cleaned training file is cut into k stratified folds (data/split.py); run i trains on the other folds and
validates (best checkpoint, early stopping) on fold i, each a normal run directory `fold_<i>/` with its data in
`folds/`. The recipe's test file, when given, is evaluated by every fold's model. `cv_summary.json` holds every
metric's mean and standard deviation over the folds (sample std, n - 1) and, with `ensemble`, the test metrics of
the fold models' averaged class probabilities.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from . import atomic, evaluate, hub, pipeline, predict, runs
from . import config as config_mod
from .data import load_file
from .data.split import stratified_folds
from .errors import TunelabError


def _write(path: Path, rows: list[dict], text_field: str, label_field: str) -> None:
    atomic.write_text(path, "".join(json.dumps({text_field: r["text"], label_field: r["label"]}, ensure_ascii=False)
                                    + "\n" for r in rows), "a fold's data")


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "folds": values}


def run(recipe, overrides: list[str], folds: int = 5, overwrite: bool = False, ensemble: bool = False,
        echo=print) -> dict:
    cfg = config_mod.load(recipe, overrides)
    if cfg.tasks is not None or cfg.task.type != "classification":
        raise TunelabError("`tunelab cv` makes stratified folds of a classification task; this recipe is "
                           f"{'multi-task' if cfg.tasks else cfg.task.type}.")
    if folds < 2:
        raise TunelabError(f"--folds {folds}: cross-validation needs at least 2 folds.")
    parent = runs.expand(cfg.output_dir or runs.default_output_dir(f"cv-{Path(recipe).stem if recipe else 'run'}"))
    claim = runs.claim(parent, overwrite, "cv", cfg)
    with claim:  # an earlier cross-validation there stays as it was until this one has finished
        cfg.model = hub.pinned(cfg.model)  # a Hub id: every fold trains the commit its branch points at now
        if cfg.data.validation:
            echo(f"note: data.validation ({cfg.data.validation}) is not used: each fold validates on its held-out part")
        rows, _ = load_file(cfg.data.train, "data.train", cfg.data)
        parts = stratified_folds(rows, folds, cfg.train.seed)
        if min(len(p) for p in parts) == 0:
            raise TunelabError(f"Data file '{cfg.data.train}' has {len(rows)} usable rows: too few for {folds} folds.")
        parent = claim.make()
        atomic.write_text(parent / "config.yaml", config_mod.to_yaml(cfg), "the cross-validation's config")

        results, probs = [], []
        for i, held in enumerate(parts, start=1):
            held_set = set(held)
            data_dir = parent / "folds"
            _write(data_dir / f"fold_{i}_train.jsonl", [r for j, r in enumerate(rows) if j not in held_set],
                   cfg.data.text_field, cfg.data.label_field)
            _write(data_dir / f"fold_{i}_validation.jsonl", [rows[j] for j in held], cfg.data.text_field, cfg.data.label_field)
            fold_cfg = cfg.model_copy(deep=True)
            fold_cfg.data.train = str(data_dir / f"fold_{i}_train.jsonl")
            fold_cfg.data.validation = str(data_dir / f"fold_{i}_validation.jsonl")
            fold_cfg.output_dir = str(parent / f"fold_{i}")
            echo(f"== fold {i}/{folds}: {len(rows) - len(held)} train, {len(held)} validation")
            run_ = pipeline.train(fold_cfg)
            results.append(run_.summary)
            if ensemble and cfg.data.test:
                probs.append(_test_probs(run_.dir, cfg.model))

        summary = {"folds": folds, "seed": cfg.train.seed, "rows": len(rows), "runs": [f"fold_{i}" for i in range(1, folds + 1)]}
        for split, key in (("validation", "eval"), ("test", "test")):
            if key in results[0]:
                metrics = [m for m, v in results[0][key].items() if isinstance(v, (int, float))]
                summary[split] = {m: _stats([r[key][m] for r in results]) for m in metrics}
        if probs:
            summary["ensemble_test"] = _ensemble(parent / "fold_1", probs, cfg.model)
        atomic.write_json(parent / "cv_summary.json", summary, "the cross-validation summary")
        parent = claim.finish()
        for split in ("validation", "test"):
            for m, s in summary.get(split, {}).items():
                echo(f"{split:10} {m:12} {s['mean']:.4f} ± {s['std']:.4f}")
        if "ensemble_test" in summary:
            echo(f"ensemble test accuracy {summary['ensemble_test']['accuracy']:.4f}")
    return summary


def _test_probs(run_dir: Path, model_cfg) -> torch.Tensor:
    model = predict.load(run_dir, trust_remote_code=model_cfg.trust_remote_code, allow_pickle=model_cfg.allow_pickle)
    feats = _test_features(model)
    out, _ = evaluate.outputs(model.model, model.task, feats, model.cfg.eval.batch_size, model.tokenizer.pad_token_id,
                              model.device)
    return out.float().softmax(-1)


def _test_features(model):
    rows, _ = load_file(model.cfg.data.test, "data.test", model.cfg.data)
    return model.encode(rows)


def _ensemble(first_run: Path, probs: list[torch.Tensor], model_cfg) -> dict:
    model = predict.load(first_run, trust_remote_code=model_cfg.trust_remote_code, allow_pickle=model_cfg.allow_pickle)
    feats = _test_features(model)
    labels = torch.tensor([f["label"] for f in feats])
    return model.task.metrics(torch.stack(probs).mean(0).log(), labels, model.info, feats)
