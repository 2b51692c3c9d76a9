"""k-fold cross-validation: folds disjoint, stratified and covering; one run per fold; mean ± std."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import make_rows, write_jsonl

from tunelab import cv
from tunelab.data.split import stratified_folds


def test_folds_are_disjoint_stratified_and_cover_the_data():
    rows = [{"text": str(i), "label": "a" if i % 3 else "b"} for i in range(100)]
    folds = stratified_folds(rows, 5, seed=3)
    flat = [i for f in folds for i in f]
    assert sorted(flat) == list(range(100)) and len(flat) == len(set(flat))
    assert max(len(f) for f in folds) - min(len(f) for f in folds) <= 1
    for f in folds:
        share = Counter(rows[i]["label"] for i in f)["b"] / len(f)
        assert share == pytest.approx(34 / 100, abs=0.06)
    assert stratified_folds(rows, 5, seed=3) == folds and stratified_folds(rows, 5, seed=4) != folds


def test_cv_runs_one_run_per_fold_and_summarises(tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(60, seed=1))
    test = write_jsonl(tmp_path / "test.jsonl", make_rows(20, seed=2))
    summary = cv.run(None, [f"model.path={tiny_bert}", f"data.train={train}", f"data.test={test}", "train.max_steps=2",
                            "eval.linear_probe=false", f"output_dir={tmp_path / 'cv'}"], folds=3, ensemble=True,
                     echo=lambda *a: None)
    parent = tmp_path / "cv"
    assert sorted(p.name for p in parent.iterdir() if p.name.startswith("fold_")) == ["fold_1", "fold_2", "fold_3"]
    sizes = [len((parent / "folds" / f"fold_{i}_validation.jsonl").read_text().splitlines()) for i in (1, 2, 3)]
    assert sum(sizes) == 60
    acc = summary["validation"]["accuracy"]
    assert len(acc["folds"]) == 3 and acc["mean"] == pytest.approx(sum(acc["folds"]) / 3)
    assert "accuracy" in summary["test"] and 0 <= summary["ensemble_test"]["accuracy"] <= 1
    assert json.loads((parent / "cv_summary.json").read_text())["folds"] == 3
