"""The training loop and the whole pipeline: accumulation == one big batch, seeded determinism,
early stopping with best-weights restore, what a run writes, that a tiny model learns, GPT-2."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import PROBS_TOL, forward_ops, make_rows, tol, write_jsonl
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

import tunelab
from tunelab import config as config_mod
from tunelab import methods, models
from tunelab.config import FullConfig, ModelConfig, TrainConfig
from tunelab.tasks import classification
from tunelab.training import loop, optim

INFO = {"labels": ["neg", "pos"]}
FAST = ["eval.linear_probe=false", "train.batch_size=16", "train.log_every=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """train (160 rows), validation (40) and test (40) files with distinct texts in each."""
    root = tmp_path_factory.mktemp("data")
    rows, seen = [], set()
    for r in make_rows(400, seed=7):
        if r["text"] not in seen:
            seen.add(r["text"])
            rows.append(r)
    return {
        "train": write_jsonl(root / "train.jsonl", rows[:160]),
        "validation": write_jsonl(root / "validation.jsonl", rows[160:200]),
        "test": write_jsonl(root / "test.jsonl", rows[200:240]),
    }


@pytest.fixture(scope="module")
def bert_no_dropout(tiny_bert, tmp_path_factory) -> Path:
    """tiny_bert with every dropout off, so a training step is a deterministic function of the batch."""
    path = tmp_path_factory.mktemp("models") / "tiny-bert-no-dropout"
    shutil.copytree(tiny_bert, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=None)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _train(out: Path, model_dir: Path, data: dict[str, Path], *overrides: str, splits=("train", "validation")):
    args = [f"model.path={model_dir}", "model.device=cpu", f"output_dir={out}", *FAST]
    args += [f"data.{s}={data[s]}" for s in splits]
    return tunelab.train(None, args + list(overrides), overwrite=False)


def _records(run_dir: Path, kind: str, split: str | None = None) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    recs = [json.loads(line) for line in lines]
    return [r for r in recs if r["type"] == kind and (split is None or r.get("split") == split)]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


# -- gradient accumulation --------------------------------------------------------

def _loop(model_dir: Path, rows: list[dict], opt_kind: str, monkeypatch, dtype=torch.float32, **train_kw):
    """Run the loop directly (the model in `dtype`); returns (trained model, train log records)."""
    if opt_kind == "sgd":
        # SGD is not invariant to the gradient's scale (AdamW almost is), so it also catches
        # a wrong normalisation (e.g. a mean per micro-batch instead of per optimizer step).
        real_build = optim.build

        def sgd_build(model, head, cfg, total_steps, extra=()):
            _, _, groups = real_build(model, head, cfg, total_steps, extra)
            opt = torch.optim.SGD([{"params": g["params"], "lr": g["lr"]} for g in groups])
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
            sched.plateau = {"scale": 1.0}
            return opt, sched, groups

        monkeypatch.setattr(loop.optim, "build", sgd_build)
    torch.manual_seed(0)
    model, tok = classification.build_model(ModelConfig(path=str(model_dir), device="cpu"), INFO)
    model = model.to(dtype)
    head = models.head_modules(model)
    model = methods.get("full").apply(model, FullConfig(name="full"), head)
    feats, _ = classification.encode(rows, tok, INFO, 64)
    records = []
    cfg = TrainConfig(**{"log_every": 1, "eval_every": 1000, "scheduler": "constant", "max_grad_norm": None, "seed": 3,
                         **train_kw})
    loop.run(model, classification, feats, feats[:4], INFO, cfg, head, tok.pad_token_id, torch.device("cpu"), 16,
             records.append)
    return model, [r for r in records if r["type"] == "train"]


def _weights_tol(model_dir: Path, rows: list[dict], opt_kind: str, lr: float, steps: int) -> float:
    """How far float64 runs of the same steps, batched otherwise, may leave a weight apart: each step's gradients
    round like a forward and backward pass over the rows (n·eps64 of the largest gradient, taken at the start); SGD
    moves a weight by lr x that, AdamW by at most lr / its eps (1e-8) x that (g / (sqrt(v) + eps) is steepest at
    g = 0). The loss's float32 cast rounds the same logits alike on both sides."""
    torch.manual_seed(0)
    model, tok = classification.build_model(ModelConfig(path=str(model_dir), device="cpu"), INFO)
    feats, _ = classification.encode(rows, tok, INFO, 64)
    batch = classification.collate(feats, tok.pad_token_id)
    (classification.loss(model.double(), batch, INFO) / len(rows)).backward()
    length = batch["input_ids"].shape[1]
    ops = 2 * forward_ops(32, 128, 2, tokens=length) + batch["input_ids"].numel()
    step = lr * tol([p.grad for p in model.parameters() if p.grad is not None], ops, torch.float64)
    return steps * step / (1e-8 if opt_kind == "adamw" else 1.0)


@pytest.mark.parametrize("opt_kind,lr", [("adamw", 1e-3), ("sgd", 0.5)])
def test_grad_accum_equals_one_big_batch(bert_no_dropout, monkeypatch, opt_kind, lr):
    # 14 rows of 4..9 words: per epoch the 8x1 run takes steps of [8], [6] examples and the 4x2 run
    # [4+4], [4+2], so padding differs and the last step has unequal micro-batches.
    rows = make_rows(14, seed=5)
    assert len({len(r["text"].split()) for r in rows}) > 3
    # In float64, mathematically the same steps: the margin is wide (the logged loss is still float32).
    big, big_log = _loop(bert_no_dropout, rows, opt_kind, monkeypatch, torch.float64, batch_size=8, grad_accum=1,
                         max_steps=4, lr=lr)
    acc, acc_log = _loop(bert_no_dropout, rows, opt_kind, monkeypatch, torch.float64, batch_size=4, grad_accum=2,
                         max_steps=4, lr=lr)

    assert [r["step"] for r in big_log] == [r["step"] for r in acc_log] == [1, 2, 3, 4]
    # the same 8 float32 cross-entropies (positive), summed in another grouping: n·eps relative
    assert [r["loss"] for r in acc_log] == pytest.approx([r["loss"] for r in big_log], rel=tol(1.0, 8 + 2))
    assert [r["tokens"] for r in acc_log] == [r["tokens"] for r in big_log]
    big_params, moved = dict(big.named_parameters()), 0.0
    torch.manual_seed(0)
    start = dict(classification.build_model(ModelConfig(path=str(bert_no_dropout)), INFO)[0].named_parameters())
    atol = _weights_tol(bert_no_dropout, rows[:8], opt_kind, lr, 4)
    for name, p in acc.named_parameters():
        torch.testing.assert_close(p, big_params[name], atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")
        moved = max(moved, (p - start[name]).abs().max().item())
    assert moved > 1e-3  # the steps did move the weights



@pytest.mark.parametrize("opt_kind,lr", [("adamw", 1e-3), ("sgd", 0.5)])
def test_split_by_length_trains_exactly_as_one_micro_batch(bert_no_dropout, monkeypatch, opt_kind, lr):
    """Each step's 12 examples, 3 long and 9 short, run as micro-batches of similar length: the same losses,
    token counts and weights as one padded micro-batch, with fewer padded tokens computed."""
    long_rows = [{"text": " ".join(["great"] * 40 + [f"w{i}"]), "label": "pos"} for i in range(3)]
    rows = long_rows + [{"text": f"bad {i}", "label": "neg"} for i in range(9)]
    collated = []
    real_collate = classification.collate
    monkeypatch.setattr(classification, "collate",
                        lambda features, pad_id: collated.append(len(features)) or real_collate(features, pad_id))
    runs = {}
    for split in (False, True):
        collated.clear()
        runs[split] = _loop(bert_no_dropout, rows, opt_kind, monkeypatch, torch.float64, batch_size=12, max_steps=3,
                            lr=lr, split_by_length=split, padding_free=False)  # float64: a wide margin
        runs[split] += (list(collated),)
    (whole, whole_log, whole_calls), (split, split_log, split_calls) = runs[False], runs[True]
    assert whole_calls[:3] == [12, 12, 12] and split_calls[:6] == [3, 9] * 3  # long ones, then short ones
    # the same 12 float32 cross-entropies (positive), summed in another grouping: n·eps relative
    assert [r["loss"] for r in split_log] == pytest.approx([r["loss"] for r in whole_log], rel=tol(1.0, 12 + 2))
    assert [r["tokens"] for r in split_log] == [r["tokens"] for r in whole_log]
    whole_params = dict(whole.named_parameters())
    atol = _weights_tol(bert_no_dropout, rows, opt_kind, lr, 3)
    for name, p in split.named_parameters():
        torch.testing.assert_close(p, whole_params[name], atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("opt_kind,lr", [("adamw", 1e-3), ("sgd", 0.5)])
def test_padding_free_classification_trains_exactly_as_padded_rows(bert_no_dropout, monkeypatch, opt_kind, lr):
    """Each step's examples packed end to end (block-diagonal attention, positions from 0 per example, the
    classifier reading each example's first token): the same losses, token counts and weights as padded rows."""
    rows = make_rows(20, seed=7)
    rows[0]["text"] = " ".join(["great"] * 30)  # one long example, so rows hold several short ones
    shapes = []
    real_collate = classification.collate
    monkeypatch.setattr(classification, "collate",
                        lambda features, pad_id: shapes.append((len(features), "starts" in features[0]))
                        or real_collate(features, pad_id))
    padded, padded_log = _loop(bert_no_dropout, rows, opt_kind, monkeypatch, torch.float64, batch_size=10,
                               grad_accum=2, max_steps=4, lr=lr, padding_free=False, split_by_length=False)
    assert all(not packed for _, packed in shapes)
    shapes.clear()
    packed, packed_log = _loop(bert_no_dropout, rows, opt_kind, monkeypatch, torch.float64, batch_size=10,
                               grad_accum=2, max_steps=4, lr=lr, padding_free=True)  # float64: a wide margin
    packed_rows = [n for n, is_packed in shapes if is_packed]
    assert len(packed_rows) == 1 + 4 * 2  # packing_fault's check, then every training micro-batch
    assert sum(packed_rows[1:]) < 4 * 2 * 10  # fewer rows than examples
    # the same 20 float32 cross-entropies (positive), summed in another grouping: n·eps relative
    assert [r["loss"] for r in packed_log] == pytest.approx([r["loss"] for r in padded_log], rel=tol(1.0, 20 + 2))
    assert [r["tokens"] for r in packed_log] == [r["tokens"] for r in padded_log]
    padded_params = dict(padded.named_parameters())
    atol = _weights_tol(bert_no_dropout, rows, opt_kind, lr, 4)
    for name, p in packed.named_parameters():
        torch.testing.assert_close(p, padded_params[name], atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


def test_split_by_length_finds_the_cheapest_cut():
    import itertools
    import random

    assert loop.split_by_length([5, 5, 5], 64) == [[0, 1, 2]]  # nothing to gain
    assert loop.split_by_length([3, 50, 4, 2], 10) == [[1], [2, 0, 3]]  # 50+10 + 3*4+10 < 4*50+10
    assert loop.split_by_length([3, 50, 4, 2], 1000) == [[1, 2, 0, 3]]
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 7))]
        cost = rng.choice([0, 5, 30, 200])
        groups = loop.split_by_length(lengths, cost)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))

        def price(gs):
            return sum(len(g) * max(lengths[i] for i in g) + cost for g in gs)

        ordered = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        cheapest = min(price([ordered[a:b] for a, b in zip((0, *cuts), (*cuts, len(ordered)))])
                       for k in range(len(ordered)) for cuts in itertools.combinations(range(1, len(ordered)), k))
        assert price(groups) == cheapest


def test_adamw_is_the_fused_kernel_on_cpu(bert_no_dropout):
    model, _ = classification.build_model(ModelConfig(path=str(bert_no_dropout), device="cpu"), INFO)
    opt, _, _ = optim.build(model, models.head_modules(model), TrainConfig(), 10)
    assert opt.defaults["fused"] is True


def test_batch_stream_order_is_seeded_and_independent_of_accumulation():
    def steps(seed, bs, accum, n_steps=6, n=14):
        stream = loop.batch_stream(n, TrainConfig(batch_size=bs, grad_accum=accum), torch.Generator().manual_seed(seed))
        return [next(stream) for _ in range(n_steps)]

    big, acc = steps(3, 8, 1), steps(3, 4, 2)
    # one optimizer step sees the same examples however it is split into micro-batches
    assert [sorted(sum(chunks, [])) for _, chunks, _ in big] == [sorted(sum(chunks, [])) for _, chunks, _ in acc]
    assert [len(c) for c in acc[1][1]] == [4, 2]
    assert [(e, end) for e, _, end in big] == [(e, end) for e, _, end in acc] == [(0.5, False), (1.0, True), (1.5, False), (2.0, True), (2.5, False), (3.0, True)]
    # each epoch is a permutation of all rows, reshuffled per epoch
    epochs = [sum((sum(c, []) for e, c, _ in big if k < e <= k + 1), []) for k in range(3)]
    assert all(sorted(ep) == list(range(14)) for ep in epochs)
    assert epochs[0] != epochs[1]
    assert steps(3, 8, 1) == big
    assert [c for _, c, _ in steps(4, 8, 1)] != [c for _, c, _ in big]


# -- determinism ---------------------------------------------------------------

def test_same_seed_same_run_other_seed_differs(tiny_bert, data, tmp_path):
    # tiny_bert keeps its dropout, so the dropout RNG is covered too.
    args = ["train.max_steps=6", "train.lr=1e-3", "train.eval_every=3"]
    a = _train(tmp_path / "a", tiny_bert, data, *args, "train.seed=1")
    b = _train(tmp_path / "b", tiny_bert, data, *args, "train.seed=1")
    c = _train(tmp_path / "c", tiny_bert, data, *args, "train.seed=2")

    losses = {k: [r["loss"] for r in _records(r.dir, "train")] for k, r in {"a": a, "b": b, "c": c}.items()}
    assert len(losses["a"]) == 6
    assert losses["a"] == losses["b"]
    assert losses["a"] != losses["c"]
    wa, wb, wc = _weights(a.dir), _weights(b.dir), _weights(c.dir)
    assert wa.keys() == wb.keys() == wc.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert a.summary["eval"] == b.summary["eval"]


def test_loop_data_order_follows_train_seed(bert_no_dropout, monkeypatch):
    # Same initial weights and no dropout: only the seeded data order can make the losses differ.
    rows = make_rows(32, seed=5)
    run = lambda seed: [r["loss"] for r in _loop(bert_no_dropout, rows, "adamw", monkeypatch, batch_size=8,
                                                  max_steps=3, lr=1e-3, seed=seed)[1]]
    first = run(1)
    assert run(1) == first
    assert run(2) != first


# -- early stopping and best restore --------------------------------------------------

def test_early_stopping_restores_best(tiny_bert, data, tmp_path):
    # A learning rate far too high makes the validation loss climb after the first steps.
    run = _train(tmp_path / "run", tiny_bert, data, "train.lr=0.05", "train.max_steps=30", "train.eval_every=1",
                 "train.patience=2", "train.metric=loss", "train.scheduler=constant", "train.seed=0",
                 splits=("train", "validation", "test"))
    s = run.summary
    evals = _records(run.dir, "eval", "validation")
    # (a) stopped before the planned 30 steps, right when patience ran out
    assert s["stopped_early"] is True
    assert s["steps"] < 30
    assert s["steps"] == s["best_step"] + 2
    assert [e["step"] for e in evals] == list(range(1, s["steps"] + 1))
    assert [e["improved"] for e in evals[-2:]] == [False, False]
    # (b) the best record in metrics.jsonl is the one at best_step, and it is the minimum loss
    best = next(e for e in evals if e["step"] == s["best_step"])
    assert best["loss"] == min(e["loss"] for e in evals)
    assert s["metric"] == {"loss": best["loss"]}
    strip = lambda m: {k: v for k, v in m.items() if k not in ("type", "step", "epoch", "split", "improved")}
    assert s["eval"] == strip(best)
    # (c) the model kept (and saved) is the best one, not the last one
    last = evals[-1]
    assert last["loss"] > best["loss"]
    reloaded = tunelab.load(run.dir, device="cpu").evaluate(data["validation"])
    assert reloaded["loss"] == best["loss"]  # the same weights through the same evaluate(): the same kernels
    assert reloaded["accuracy"] == best["accuracy"]
    assert reloaded["loss"] != pytest.approx(last["loss"], abs=1e-4)
    # the test split is evaluated once, with the best model
    (test_rec,) = _records(run.dir, "eval", "test")
    assert strip(test_rec) == s["test"]
    assert tunelab.load(run.dir, device="cpu").evaluate(data["test"])["loss"] == s["test"]["loss"]  # likewise


# -- metrics.jsonl and summary.json ---------------------------------------------------------

def test_metrics_log_and_summary(tiny_bert, data, tmp_path):
    run = _train(tmp_path / "run", tiny_bert, data, "train.max_steps=7", "train.log_every=3", "train.eval_every=4",
                 "train.lr=1e-3", "train.warmup_steps=2", "train.scheduler=linear", "eval.base=true",
                 splits=("train", "validation", "test"))
    train = _records(run.dir, "train")
    assert [r["step"] for r in train] == [3, 6, 7]  # every log_every steps, and the last step
    for r in train:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert r["lr"] == pytest.approx(1e-3 * optim.lr_factor(r["step"] - 1, 2, 7, "linear"))
    assert [r["step"] for r in _records(run.dir, "eval", "validation")] == [4, 7]
    assert [r["step"] for r in _records(run.dir, "eval", "test")] == [7]
    for r in _records(run.dir, "eval"):
        assert {"accuracy", "macro_f1", "loss", "per_class", "confusion_matrix"} <= set(r)

    on_disk = json.loads((run.dir / "summary.json").read_text(encoding="utf-8"))
    for key in ("method", "trainable_params", "total_params", "trainable_percent", "train_seconds",
                "tokens_per_second", "peak_memory_mb", "eval", "test", "base"):
        assert key in on_disk, key
    assert on_disk["method"] == "full"
    assert on_disk["trainable_params"] == on_disk["total_params"] == sum(v.numel() for v in _weights(run.dir).values())
    assert on_disk["trainable_percent"] == pytest.approx(100.0)
    assert on_disk["train_seconds"] > 0 and on_disk["tokens_per_second"] > 0 and on_disk["peak_memory_mb"] > 0
    assert on_disk["steps"] == 7
    assert set(on_disk["base"]) == {"validation", "test"}
    n = {"validation": 40, "test": 40}
    for split, metrics in [("validation", on_disk["base"]["validation"]), ("test", on_disk["base"]["test"]),
                           ("validation", on_disk["eval"]), ("test", on_disk["test"])]:
        assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["macro_f1"] <= 1
        assert set(metrics["per_class"]) == {"neg", "pos"}
        for c in metrics["per_class"].values():
            assert 0 <= c["precision"] <= 1 and 0 <= c["recall"] <= 1
        cm = metrics["confusion_matrix"]
        assert cm["labels"] == ["neg", "pos"]
        assert sum(map(sum, cm["rows_true_cols_pred"])) == n[split]
        assert metrics["accuracy"] == pytest.approx((cm["rows_true_cols_pred"][0][0] + cm["rows_true_cols_pred"][1][1]) / n[split])


# -- it learns ----------------------------------------------------------------

def test_tiny_bert_learns_sentiment(tiny_bert, data, tmp_path):
    run = _train(tmp_path / "run", tiny_bert, data, "train.lr=3e-3", "train.epochs=4", "train.scheduler=constant",
                 "train.seed=0", "train.log_every=10", splits=("train", "validation", "test"))
    s = run.summary
    assert s["base"]["validation"]["accuracy"] < 0.7
    assert s["eval"]["accuracy"] >= 0.9
    assert s["eval"]["accuracy"] >= s["base"]["validation"]["accuracy"] + 0.25
    assert s["test"]["accuracy"] >= 0.85
    assert s["eval"]["loss"] < s["base"]["validation"]["loss"]


# -- what a run directory holds -------------------------------------------------------

@pytest.mark.parametrize("method,extra", [
    ("full", []),
    ("freeze", ["method.freeze_layers=1"]),
    ("lora", ["method.r=4", "method.target_modules=[query,value]"]),
])
def test_run_directory(method, extra, tiny_bert, data, tmp_path, monkeypatch):
    # Relative paths, as a user types them; the saved config must hold them resolved.
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    rel = lambda p: os.path.relpath(p, work)
    overrides = [f"model.path={rel(tiny_bert)}", "model.device=cpu", f"data.train={rel(data['train'])}",
                 f"data.test={rel(data['test'])}", "output_dir=run", "train.max_steps=2", "train.lr=1e-3",
                 "eval.base=false", f"method.name={method}", *FAST, *extra]
    run = tunelab.train(None, overrides)
    run_dir = run.dir.resolve()  # Run.dir is as given (relative to the cwd of the call)
    assert run_dir == (work / "run").resolve()
    monkeypatch.chdir(tmp_path)  # everything below must work from another directory
    files = {p.name for p in run_dir.iterdir()}
    artifact = "adapter" if method == "lora" else "model"
    assert {"config.yaml", "data_report.json", "labels.json", "metrics.jsonl", "summary.json", artifact} <= files
    assert ({"adapter", "model"} - {artifact}).isdisjoint(files)

    # config.yaml is what ran: the same settings, with paths made absolute
    saved = config_mod.load(run_dir / "config.yaml")
    expected = config_mod.load(None, overrides)
    expected.model.path = str(tiny_bert.resolve())
    expected.data.train = str(data["train"].resolve())
    expected.data.test = str(data["test"].resolve())
    expected.output_dir = str((work / "run").resolve())
    assert saved == expected
    assert json.loads((run_dir / "labels.json").read_text()) == INFO
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["splits"]["train"]["rows"] + report["splits"]["validation"]["rows"] == 160
    assert run.summary["method"] == method

    if artifact == "model":
        model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model")
        assert model.config.num_labels == 2
        assert model.config.id2label == {0: "neg", 1: "pos"}
        # the saved weights are the trained ones: the same weights through the same evaluate(), the same kernels
        assert tunelab.load(run_dir, device="cpu").evaluate(data["test"])["loss"] == run.summary["test"]["loss"]
    else:
        cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
        assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
        assert tunelab.load(run_dir, device="cpu").evaluate(data["test"])["loss"] == run.summary["test"]["loss"]


# -- GPT-2: a decoder without a pad token -------------------------------------------------

def test_gpt2_trains_and_predicts(tiny_gpt2, data, tmp_path):
    run = _train(tmp_path / "run", tiny_gpt2, data, "train.max_steps=6", "train.lr=1e-3", "eval.base=false")
    assert run.summary["steps"] == 6
    assert all(math.isfinite(r["loss"]) for r in _records(run.dir, "train"))
    clf = tunelab.load(run.dir, device="cpu")
    texts = ["great film", "the plot was awful and the acting really quite dull and boring", "fun"]
    batch = clf.predict(texts)
    assert [p["text"] for p in batch] == texts
    for p in batch:
        assert p["label"] in ("neg", "pos")
        # a float32 softmax: an exp, a sum over the labels and a division, each rounding
        assert sum(p["probs"].values()) == pytest.approx(1.0, abs=tol(1.0, len(p["probs"]) + 4))
        assert p["score"] == pytest.approx(max(p["probs"].values()))
    # Right padding (pad = EOS) must not change a prediction: batched == one at a time, up to rounding.
    for text, p in zip(texts, batch):
        (alone,) = clf.predict([text])
        assert alone["probs"] == pytest.approx(p["probs"], abs=PROBS_TOL)
    assert clf.evaluate(data["validation"])["loss"] == run.summary["eval"]["loss"]  # same weights, same evaluate()


def test_inputs_longer_than_the_model_takes_are_cut_not_crashed(tiny_bert, tmp_path):
    # tiny BERT has 64 position embeddings; data.max_length=512 must not index past them.
    long_rows = [{"text": " ".join([r["text"]] * 20), "label": r["label"]} for r in make_rows(60, seed=5)]
    train = write_jsonl(tmp_path / "long.jsonl", long_rows)
    run = tunelab.train(None, [f"model.path={tiny_bert}", f"data.train={train}", "data.max_length=512",
                               "train.max_steps=2", "eval.linear_probe=false", f"output_dir={tmp_path / 'run'}"])
    preds = tunelab.load(run.dir).predict([long_rows[0]["text"]])
    assert preds[0]["label"] in ("neg", "pos")


def test_cuda_device_without_a_gpu_is_a_clear_error(tiny_bert, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(tunelab.TunelabError, match="model.device='cuda'.*model.device=cpu"):
        tunelab.train(None, [f"model.path={tiny_bert}", f"data.train={tmp_path / 'x.jsonl'}", "model.device=cuda",
                             f"output_dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run").exists()


# -- gradient checkpointing ----------------------------------------------------------

@pytest.mark.parametrize("method", ["full", "lora"])
def test_gradient_checkpointing_trains_exactly_as_without(method, tmp_path, bert_no_dropout, data):
    """Recomputing activations in backward changes memory, not the maths: same losses step by step."""
    runs = [_train(tmp_path / f"gc-{on}", bert_no_dropout, data, f"method.name={method}", "train.max_steps=6",
                   f"train.gradient_checkpointing={on}") for on in ("false", "true")]
    losses = [[r["loss"] for r in _records(run.dir, "train")] for run in runs]
    assert len(losses[0]) == 6
    assert losses[1] == losses[0]  # the recomputed forward runs the same kernels on the same inputs


def test_gradient_checkpointing_is_active_on_a_decoder_with_frozen_embeddings(tiny_chat_llama):
    """With a LoRA (frozen embedding) the non-reentrant checkpoint still yields the adapter gradients of a
    plain backward, and HF's flag is really set on every block."""
    from transformers import AutoModelForCausalLM

    from tunelab.config import LoraConfig

    grads = []
    for on in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_chat_llama)
        model = methods.prepare(model, LoraConfig(name="lora", r=4, dropout=0.0), ["lm_head"])
        if on:
            models.enable_gradient_checkpointing(model)
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        model.train()
        ids = torch.randint(5, 100, (2, 12))
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name  # the same kernels, recomputed


# -- TensorBoard -------------------------------------------------------------------------

def test_tensorboard_gets_the_same_scalars_as_metrics_jsonl(tmp_path, bert_no_dropout, data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _train(tmp_path / "tb", bert_no_dropout, data, "train.max_steps=4", "train.eval_every=2",
                 "train.log_to=[tensorboard]")
    events = EventAccumulator(str(run.dir / "tensorboard"))
    events.Reload()
    tb_loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    # TensorBoard stores float32: one rounding, relative
    assert tb_loss == [(r["step"], pytest.approx(r["loss"], rel=tol(1.0))) for r in _records(run.dir, "train")]
    tb_acc = [(e.step, e.value) for e in events.Scalars("validation/accuracy")]
    assert tb_acc == [(r["step"], pytest.approx(r["accuracy"], rel=tol(1.0))) for r in _records(run.dir, "eval", "validation")]
    assert "lr/body" in events.Tags()["scalars"]


def test_tensorboard_missing_is_a_clear_error_before_any_run_dir(tmp_path, bert_no_dropout, data, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what a machine without the package sees
    with pytest.raises(tunelab.TunelabError, match=r"train.log_to: 'tensorboard' needs the tensorboard package.*pip install"):
        _train(tmp_path / "tb", bert_no_dropout, data, "train.log_to=[tensorboard]")
    assert not (tmp_path / "tb").exists()


def test_no_samples_is_fine(tmp_path, bert_no_dropout, data):
    run = _train(tmp_path / "r", bert_no_dropout, data, "train.max_steps=2", "eval.samples=0")
    assert json.loads((run.dir / "samples.json").read_text()) == {"before": [], "after": []}


def test_bf16_autocast_trains_with_float32_weights_close_to_fp32(tmp_path, tiny_chat_llama):
    from conftest import make_chat_rows

    train = write_jsonl(tmp_path / "train.jsonl", make_chat_rows(80, seed=3))
    runs = {p: tunelab.train(None, [f"model.path={tiny_chat_llama}", f"data.train={train}", "task.type=sft",
                                    "data.dedupe=false", "data.max_length=64", "train.batch_size=8", "train.lr=1e-2",
                                    "train.max_steps=8", "train.log_every=1", "method.name=full", "eval.samples=0",
                                    "eval.forgetting=none", f"train.precision={p}", f"output_dir={tmp_path / p}"])
            for p in ("fp32", "bf16")}
    fp32, bf16 = ([r["loss"] for r in _records(runs[p].dir, "train")] for p in ("fp32", "bf16"))
    # The same model and batch, matmuls rounded to bf16 (accumulating in float32): each of 2 layers' 7 matmuls
    # rounds its inputs and output, and the head's; independent roundings add like sqrt(n)
    assert bf16[0] == pytest.approx(fp32[0], rel=tol(1.0, math.sqrt(2 * 7 * 2 + 2), torch.bfloat16))
    assert bf16[0] != fp32[0]  # autocast was on
    assert bf16[-1] < bf16[0]
    weights = _weights(runs["bf16"].dir)
    assert {w.dtype for w in weights.values()} == {torch.float32}


def test_bf16_autocast_changes_nothing_in_evaluation(tmp_path, tiny_chat_llama):
    from conftest import make_chat_rows

    train = write_jsonl(tmp_path / "train.jsonl", make_chat_rows(80, seed=3))
    base = [tunelab.train(None, [f"model.path={tiny_chat_llama}", f"data.train={train}", "task.type=sft",
                                 "data.dedupe=false", "data.max_length=64", "train.max_steps=1", "method.name=lora",
                                 "eval.samples=0", "eval.forgetting=none", f"train.precision={p}",
                                 f"output_dir={tmp_path / p}"]).summary["base"]["validation"]["loss"] for p in ("fp32", "bf16")]
    assert base[0] == base[1]


def test_import_tunelab_turns_on_huge_pages_for_torch_unless_the_user_chose():
    """THP_MEM_ALLOC_ENABLE must be set before torch's first allocation, so `import tunelab` sets it; a value
    the user set is kept."""
    import subprocess
    import sys

    code = "import os, tunelab, torch; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = [subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                          check=True).stdout.strip() for extra in ({}, {"THP_MEM_ALLOC_ENABLE": "0"})]
    assert out == ["1", "0"]
