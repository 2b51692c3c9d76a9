"""Multi-label classification (task.type multilabel): label lists or separated strings, BCE, metrics as
scikit-learn computes them, thresholds fixed or tuned per label on validation, and predict returning label sets."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from conftest import FILLER, NEGATIVE, POSITIVE, make_rows, tol, write_jsonl

import tunelab
from tunelab import config, data
from tunelab.config import DataConfig
from tunelab.errors import TunelabError
from tunelab.ops import metrics as M
from tunelab.tasks import multilabel

# cue words from the tiny test tokenizer's vocabulary (other words would all be [UNK])
TOPICS = {"sport": POSITIVE[:3], "music": NEGATIVE[:3], "food": POSITIVE[3:6]}


def make_tagged(n: int, seed: int = 0, as_string: bool = False) -> list[dict]:
    """Texts tagged with every topic whose cue words they contain (none, one, two or three)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        tags = sorted(t for t in TOPICS if rng.random() < 0.4) or [rng.choice(list(TOPICS))]
        words = rng.sample(FILLER, 3) + [rng.choice(TOPICS[t]) for t in tags] + [str(i)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "tags": "|".join(tags) if as_string else tags})
    return rows


def test_multilabel_metrics_equal_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score, hamming_loss, precision_score, recall_score

    rng = np.random.default_rng(0)
    true = rng.random((120, 5)) < 0.3
    pred = true ^ (rng.random((120, 5)) < 0.2)
    true[:, 4], pred[:, 4] = False, False  # a label never true nor predicted: F1 0 in the macro average
    got = M.multilabel(pred, true, list("abcde"))
    # ratios of counts in float64, a few roundings each, and a mean over the 5 labels: n·eps64 relative
    rel = tol(1.0, 4 + 5, torch.float64)
    assert got["micro_f1"] == pytest.approx(f1_score(true, pred, average="micro", zero_division=0), rel=rel)
    assert got["macro_f1"] == pytest.approx(f1_score(true, pred, average="macro", zero_division=0), rel=rel)
    assert got["subset_accuracy"] == pytest.approx(accuracy_score(true, pred), rel=rel)
    assert got["hamming_loss"] == pytest.approx(hamming_loss(true, pred), rel=rel)
    per = f1_score(true, pred, average=None, zero_division=0)
    assert [got["per_label"][n]["f1"] for n in "abcde"] == pytest.approx(per, rel=rel)
    assert [got["per_label"][n]["precision"] for n in "abcde"] == pytest.approx(
        precision_score(true, pred, average=None, zero_division=0), rel=rel)
    assert [got["per_label"][n]["recall"] for n in "abcde"] == pytest.approx(
        recall_score(true, pred, average=None, zero_division=0), rel=rel)


def test_label_lists_and_separated_strings_read_alike(tmp_path):
    lists = write_jsonl(tmp_path / "lists.jsonl", make_tagged(60))
    strings = write_jsonl(tmp_path / "strings.jsonl", make_tagged(60, as_string=True))
    a, report = data.load_splits(DataConfig(train=str(lists), label_field="tags"), 0, kind="set")
    b, _ = data.load_splits(DataConfig(train=str(strings), label_field="tags", label_separator="|"), 0, kind="set")
    assert a == b
    assert all(isinstance(r["label"], tuple) and r["label"] for r in a["train"])
    assert set(report["splits"]["train"]["labels"]) == set(TOPICS)
    assert sum(report["splits"]["train"]["labels_per_row"].values()) == len(a["train"])


def test_empty_label_sets_are_dropped_and_counted_unless_allowed(tmp_path):
    rows = make_tagged(40)
    for r in rows[:7]:
        r["tags"] = []
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    _, report = data.load_splits(DataConfig(train=str(path), label_field="tags"), 0, kind="set")
    assert report["splits"]["train"]["dropped"]["missing_label"] == 7
    splits, report = data.load_splits(DataConfig(train=str(path), label_field="tags", allow_empty_labels=True), 0,
                                      kind="set")
    assert report["splits"]["train"]["dropped"]["missing_label"] == 0
    assert sum(r["label"] == () for name in splits for r in splits[name]) == 7


@pytest.mark.parametrize("bad", [{"a": 1}, 3, [["nested"]], True])
def test_a_label_that_is_not_a_list_or_string_is_named(bad, tmp_path):
    rows = make_tagged(12)
    rows[4]["tags"] = bad
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(TunelabError, match=r"(row|line) 5 has .* in 'tags'.*(multilabel needs a list|multilabel takes)"):
        data.load_splits(DataConfig(train=str(path), label_field="tags"), 0, kind="set")


def test_single_labels_everywhere_warn_about_the_separator(tmp_path, capsys):
    rows = [{"text": r["text"], "tags": r["tags"].replace("|", ",")} for r in make_tagged(60, as_string=True, seed=3)]
    for r in rows:
        r["tags"] += ",extra"  # every row "sport,extra"-like: joined labels read as one
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = config.load(None, ["model.path=m", f"data.train={path}", "data.label_field=tags", "task.type=multilabel"])
    multilabel.load_splits(cfg, 0)
    out = capsys.readouterr().out
    assert "at most one label" in out and "data.label_separator=','" in out


def test_tuned_thresholds_take_each_labels_best_f1():
    probs = torch.tensor([[0.9, 0.4], [0.7, 0.36], [0.6, 0.3], [0.2, 0.1], [0.1, 0.05]])
    gold = torch.tensor([[1, 1], [1, 1], [1, 0], [0, 0], [0, 0]]).float()
    info = multilabel.calibrate(torch.logit(probs), gold, {"labels": ["a", "b"], "threshold": 0.5})
    # a: every threshold in (0.2, 0.6] is perfect, the nearest to 0.5 is kept; b: only (0.3, 0.35] separates
    assert info["threshold"] == {"a": 0.5, "b": 0.35}
    assert [p["labels"] for p in multilabel.predictions(torch.logit(probs[:3]), info)] == [["a", "b"], ["a", "b"], ["a"]]


def test_a_multilabel_run_learns_and_predicts_label_sets(tiny_bert, tmp_path, cli_run):
    train = write_jsonl(tmp_path / "train.jsonl", make_tagged(240, seed=0))
    test = write_jsonl(tmp_path / "test.jsonl", make_tagged(60, seed=1))
    run = tunelab.train(None, [f"model.path={tiny_bert}", f"data.train={train}", f"data.test={test}",
                               "data.label_field=tags", "task.type=multilabel", "task.threshold=tuned",
                               "method.name=full", "train.lr=1e-2", "train.max_steps=30", "train.batch_size=16",
                               "train.eval_every=10", "train.log_every=1", "eval.samples=3", "eval.forgetting=none",
                               f"output_dir={tmp_path / 'run'}"])
    losses = [r["loss"] for r in map(json.loads, (run.dir / "metrics.jsonl").read_text().splitlines())
              if r.get("type") == "train"]
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.95 * np.mean(losses[:5])
    s = run.summary
    assert s["test"]["micro_f1"] > s["base"]["test"]["micro_f1"] + 0.05
    assert set(s["linear_probe"]["test"]) >= {"micro_f1", "macro_f1", "subset_accuracy", "hamming_loss"}
    info = json.loads((run.dir / "labels.json").read_text())
    assert set(info["threshold"]) == set(TOPICS) == set(s["thresholds"])

    r = cli_run("predict", run.dir, "--text", f"the {POSITIVE[0]} film was {POSITIVE[4]}")
    assert r.code == 0, r.err
    pred = json.loads(r.out)
    assert set(pred["scores"]) == set(TOPICS) and set(pred["labels"]) <= set(TOPICS)
    assert pred["labels"] == [n for n in info["labels"] if pred["scores"][n] >= info["threshold"][n]]
    ev = tunelab.load(run.dir).evaluate(test, label_field="tags")
    assert ev["micro_f1"] == s["test"]["micro_f1"]  # the same weights through the same evaluate(): the same kernels


def test_a_multitask_run_tunes_its_multilabel_tasks_thresholds(tiny_bert, tmp_path):
    from tunelab import config, pipeline

    tags = write_jsonl(tmp_path / "tags.jsonl", make_tagged(120, seed=3))
    sentiment = write_jsonl(tmp_path / "sent.jsonl", make_rows(120, seed=4))
    cfg = config.validate({
        "model": {"path": str(tiny_bert)}, "method": {"name": "full"},
        "tasks": [{"name": "tags", "data": {"train": str(tags), "label_field": "tags"},
                   "task": {"type": "multilabel", "threshold": "tuned"}},
                  {"name": "sentiment", "data": {"train": str(sentiment)}}],
        "train": {"max_steps": 4, "batch_size": 8}, "eval": {"linear_probe": False, "samples": 0,
                                                            "forgetting": "none"},
        "output_dir": str(tmp_path / "run")})
    run = pipeline.train(cfg)
    saved = json.loads((run.dir / "labels.json").read_text())["tasks"]["tags"]["threshold"]
    assert set(saved) == set(TOPICS) == set(run.summary["thresholds"]["tags"])
    model = tunelab.load(run.dir, task="tags")
    assert model.info["threshold"] == saved
