"""`tunelab sweep`: a 3-trial Optuna search on a tiny model completes, with a table and the best config."""

from __future__ import annotations

import json

import pytest
from conftest import make_rows, write_jsonl

from tunelab import config, sweep
from tunelab.errors import TunelabError


def test_a_three_trial_sweep_completes_and_saves_the_best_config(tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(60, seed=1))
    (tmp_path / "space.yaml").write_text("train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n"
                                         "train.batch_size: {choices: [8, 16]}\n")
    lines = []
    summary = sweep.run(None, [f"model.path={tiny_bert}", f"data.train={train}", "train.max_steps=4",
                               "train.eval_every=2", "eval.linear_probe=false", f"output_dir={tmp_path / 'sweep'}"],
                        tmp_path / "space.yaml", 3, echo=lines.append)
    assert len(summary["trials"]) == 3 and summary["metric"] == "accuracy" and summary["direction"] == "maximize"
    best = config.load(tmp_path / "sweep" / "best.yaml")
    assert best.train.lr == pytest.approx(summary["best_params"]["train.lr"])
    assert json.loads((tmp_path / "sweep" / "sweep_summary.json").read_text())["best_trial"] == summary["best_trial"]
    assert any(line.startswith("best: trial") for line in lines)


def test_a_bad_space_names_the_key(tmp_path):
    (tmp_path / "space.yaml").write_text("train.lr: 0.1\n")
    with pytest.raises(TunelabError, match="'train.lr' needs {low, high"):
        sweep.read_space(tmp_path / "space.yaml")
