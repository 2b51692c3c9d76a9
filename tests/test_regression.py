"""Regression (task.type regression) and text pairs (data.text_pair_field): targets standardised on train and
predictions back in the label's own scale, metrics as scikit-learn computes them, the ridge probe as the baseline,
the tokenizer's own pair encoding, and clear errors for labels that are not numbers."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from conftest import FILLER, FORWARD_OPS, NEGATIVE, POSITIVE, size, tol, write_jsonl

import tunelab
from tunelab import data
from tunelab.config import DataConfig
from tunelab.errors import TunelabError
from tunelab.ops import metrics as M
from tunelab.tasks import classification, regression

QUIET = ["eval.samples=3", "eval.forgetting=none"]


def make_scores(n: int, seed: int = 0, scale: float = 25.0, offset: float = 100.0) -> list[dict]:
    """Texts whose score counts their positive minus negative words, in a scale far from 0..1 (offset 100, x25)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        pos, neg = rng.randint(0, 3), rng.randint(0, 3)
        words = rng.sample(FILLER, 3) + [rng.choice(POSITIVE) for _ in range(pos)] + [rng.choice(NEGATIVE) for _ in range(neg)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words) + f" {FILLER[i % len(FILLER)]}", "score": offset + scale * (pos - neg)})
    return rows


def test_regression_metrics_equal_scikit_learn():
    from sklearn.metrics import mean_absolute_error, mean_squared_error

    rng = np.random.default_rng(0)
    gold = rng.normal(size=200)
    pred = gold + rng.normal(scale=0.5, size=200)
    pred[:20] = pred[20:40]  # ties, for Spearman's average ranks
    got = M.regression(pred, gold)
    # float64 sums over the 200 rows (n·eps relative); a correlation takes 3 of them (and means, a square root)
    rel, corr = tol(1.0, 200 + 2, torch.float64), tol(1.0, 3 * 200 + 4, torch.float64)
    assert got["mse"] == pytest.approx(mean_squared_error(gold, pred), rel=rel)
    assert got["rmse"] == pytest.approx(mean_squared_error(gold, pred) ** 0.5, rel=rel)
    assert got["mae"] == pytest.approx(mean_absolute_error(gold, pred), rel=rel)
    assert got["pearson"] == pytest.approx(np.corrcoef(pred, gold)[0, 1], rel=corr)
    ranks = lambda x: np.array([np.mean(np.flatnonzero(np.sort(x) == v)) + 1 for v in x])  # average ranks, naively
    assert got["spearman"] == pytest.approx(np.corrcoef(ranks(pred), ranks(gold))[0, 1], rel=corr)
    assert M.regression(np.ones(5), np.arange(5.0))["pearson"] == 0.0  # constant: no correlation, not NaN


def test_targets_round_trip_through_standardisation():
    info = {"target": {"mean": 100.0, "std": 25.0, "field": "score"}}
    values = torch.tensor([50.0, 100.0, 162.5])
    standard = torch.tensor([regression.standardise(v, info) for v in values])
    assert standard.tolist() == [-2.0, 0.0, 2.5]
    # x * 25 + 100, rounded to float32: 2 roundings of values up to 162.5
    assert torch.allclose(regression.own_scale(standard, info).float(), values, atol=tol(values, 2), rtol=0)


def test_a_regression_run_learns_and_predicts_in_the_labels_scale(tiny_bert, tmp_path, cli_run):
    train = write_jsonl(tmp_path / "train.jsonl", make_scores(240, seed=0))
    test = write_jsonl(tmp_path / "test.jsonl", make_scores(60, seed=1))
    run = tunelab.train(None, [f"model.path={tiny_bert}", f"data.train={train}", f"data.test={test}",
                               "data.label_field=score", "task.type=regression", "method.name=full", "train.lr=1e-2",
                               "train.max_steps=30", "train.batch_size=16", "train.eval_every=10", "train.log_every=1",
                               *QUIET, f"output_dir={tmp_path / 'run'}"])
    s = run.summary
    losses = [r["loss"] for r in map(json.loads, (run.dir / "metrics.jsonl").read_text().splitlines()) if r.get("type") == "train"]
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert "base" not in s  # an untrained head is no baseline; the ridge probe is
    assert set(s["linear_probe"]["validation"]) >= {"pearson", "spearman", "mae", "rmse", "mse"}
    assert s["test"]["pearson"] > 0.5 and s["test"]["mae"] < 25.0  # in the label's scale: a point is 25
    info = json.loads((run.dir / "labels.json").read_text())
    rows = [json.loads(x) for x in train.read_text().splitlines()]
    assert info["target"]["mean"] == pytest.approx(np.mean([r["score"] for r in rows if True]), abs=15)

    # predict: numbers in the label's own scale, as scores of the training rows would be
    r = cli_run("predict", run.dir, "--text", rows[0]["text"], "--text", rows[1]["text"])
    assert r.code == 0, r.err
    preds = [json.loads(x) for x in r.out.splitlines()]
    assert all(isinstance(p["score"], float) for p in preds)
    model = tunelab.load(run.dir)
    scores = [p["score"] for p in model.predict([x["text"] for x in rows[:80]])]
    gold = [x["score"] for x in rows[:80]]
    assert abs(np.mean(scores) - np.mean(gold)) < 0.5 * np.std(gold)  # not standardised units around 0
    assert np.corrcoef(scores, gold)[0, 1] > 0.5
    ev = model.evaluate(test, label_field="score")
    # The same weights and batches: predictions equal up to a forward pass's rounding of values up to their largest,
    # which moves Pearson's r by at most about 2 x that / the predictions' spread
    spread = np.max(np.abs(scores)) / np.std(scores)
    assert ev["pearson"] == pytest.approx(s["test"]["pearson"], abs=tol(2 * spread, FORWARD_OPS))


@pytest.mark.parametrize("value, shown", [("high", "'high'"), (float("nan"), "nan"), ("1e999", "'1e999'")])
def test_a_label_that_is_not_a_number_is_named(value, shown, tmp_path):
    rows = [{"text": f"row {i}", "score": i} for i in range(10)]
    rows[6]["score"] = value
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TunelabError, match=rf"row 7 has {shown} in 'score', which is not a finite number"):
        data.load_splits(DataConfig(train=str(path), label_field="score"), 0, kind="number")


def test_an_empty_regression_label_is_dropped_and_counted(tmp_path):
    rows = [{"text": f"row {i}", "score": i if i % 4 else None} for i in range(40)]
    splits, report = data.load_splits(DataConfig(train=str(write_jsonl(tmp_path / "t.jsonl", rows)),
                                                 label_field="score"), 0, kind="number")
    assert report["splits"]["train"]["dropped"]["missing_label"] == 10
    assert report["split"]["method"] == "random" and len(splits["validation"]) == 3
    assert report["splits"]["train"]["targets"]["max"] == 39.0
    assert "targets: min" in data.format_report(report)


def test_constant_targets_are_refused(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": f"row {i}", "score": 3} for i in range(20)])
    splits, _ = data.load_splits(DataConfig(train=str(train), label_field="score"), 0, kind="number")
    fake = type("C", (), {"data": DataConfig(train=str(train), label_field="score"),
                          "task": type("T", (), {"regression_loss": "mse", "huber_delta": 1.0})})
    with pytest.raises(TunelabError, match="is 3, so there is nothing to learn"):
        regression.label_info(splits, fake)


def test_pair_encoding_is_the_tokenizers_own(tiny_bert):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    rows = [{"text": "the film was good and the cast", "pair": "a really great plot", "label": "yes"},
            {"text": "bad", "pair": " ".join(FILLER * 3), "label": "no"}]
    feats, stats = classification.encode_texts(rows, tok, 16)
    want = tok([r["text"] for r in rows], [r["pair"] for r in rows], truncation="longest_first", max_length=16)
    assert [f["input_ids"] for f in feats] == want["input_ids"]
    assert [f["token_type_ids"] for f in feats] == want["token_type_ids"]
    assert stats["truncated"] == 1 and max(want["token_type_ids"][1]) == 1


def test_pairs_pack_like_they_pad(tiny_bert):
    """A packed row of pairs gives the logits of the pairs alone (segment ids travel with the tokens)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).eval()
    rows = [{"text": "the film", "pair": "was good", "label": "yes"}, {"text": "a plot", "pair": "bad acting", "label": "no"}]
    feats, _ = classification.encode(rows, tok, {"labels": ["no", "yes"]}, 32)
    with torch.no_grad():
        padded = classification.forward(model, classification.collate(feats, tok.pad_token_id))
        packed = classification.forward(model, classification.collate(classification.pack(feats, 64), tok.pad_token_id))
        no_types = model(**{k: v for k, v in classification.collate(feats, 0).items()
                            if k in ("input_ids", "attention_mask")}).logits
    assert torch.allclose(padded, packed, atol=tol(padded, FORWARD_OPS), rtol=0)
    assert not torch.allclose(padded, no_types, atol=1e-5)  # the segment ids matter, so they are really passed


def test_a_pair_classification_run_and_predict(tiny_bert, tmp_path, cli_run):
    rng = random.Random(0)
    rows = []
    for i in range(160):
        a, b = rng.sample(POSITIVE + NEGATIVE, 2)
        rows.append({"premise": f"{a} {FILLER[i % 15]} {i}", "hypothesis": f"{b} film",
                     "label": "same" if (a in POSITIVE) == (b in POSITIVE) else "different"})
    train = write_jsonl(tmp_path / "pairs.jsonl", rows)
    run = tunelab.train(None, [f"model.path={tiny_bert}", f"data.train={train}", "data.text_field=premise",
                               "data.text_pair_field=hypothesis", "method.name=full", "train.max_steps=4",
                               "train.batch_size=8", *QUIET, f"output_dir={tmp_path / 'run'}"])
    samples = json.loads((run.dir / "samples.json").read_text())["after"]
    assert samples and "pair" in samples[0]
    r = cli_run("predict", run.dir, "--text", "good film", "--pair", "bad film")
    assert r.code == 0, r.err
    assert json.loads(r.out)["label"] in ("same", "different") and json.loads(r.out)["pair"] == "bad film"
    r = cli_run("predict", run.dir, train, "-o", tmp_path / "out.jsonl")
    assert r.code == 0, r.err
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 160


def test_a_missing_pair_column_lists_the_columns(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "second": "b", "label": "x"}])
    with pytest.raises(TunelabError, match=r"no 'hypothesis' column .*'text', 'second', 'label'.*data.text_pair_field"):
        data.load_splits(DataConfig(train=str(train), text_pair_field="hypothesis"), 0)


def test_huber_is_squared_near_and_linear_far(tiny_bert):
    """task.regression_loss=huber: the same as MSE/2 for errors under task.huber_delta, linear beyond it."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=1).eval()
    batch = {"input_ids": torch.tensor([[2, 7, 8, 3], [2, 9, 3, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}
    with torch.no_grad():
        pred = regression.forward(model, batch).squeeze(-1)
        for offsets, delta in (([0.3, -0.2], 1.0), ([5.0, -4.0], 1.0), ([5.0, -4.0], 10.0)):
            batch["labels"] = pred + torch.tensor(offsets)
            huber = regression.loss(model, batch, {"loss": "huber", "huber_delta": delta})
            mse = regression.loss(model, batch, {"loss": "mse"})
            err = torch.tensor(offsets).abs()
            want = torch.where(err <= delta, 0.5 * err ** 2, delta * (err - 0.5 * delta)).sum()
            # float32: the labels (up to size(labels)) minus the predictions is each offset to 2 roundings, which
            # moves a loss term by up to 2 |offset| (or delta) times that; then the loss's own few roundings
            moved = 2 * max(size(err), delta) * tol(batch["labels"], 2)
            assert float(huber) == pytest.approx(float(want), abs=moved + tol(want, 4))
            assert float(mse) == pytest.approx(float((err ** 2).sum()), abs=moved + tol((err ** 2).sum(), 4))
