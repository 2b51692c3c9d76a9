"""Multi-task runs: several tasks with their own data, heads and loss weights on one shared body; the
combined gradient is the weighted sum; task sampling; per-task adapters; predicting for any task."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import torch
from conftest import FORWARD_OPS, make_rows, tol, write_jsonl
from typer.testing import CliRunner

import tunelab
from tunelab import config, pipeline
from tunelab.cli import app
from tunelab.errors import TunelabError
from tunelab.tasks import classification
from tunelab.training import loop


def _topic_rows(n, seed):
    """A second labelled task on the same kind of text: does it talk about the film or the story?"""
    rows = make_rows(n, seed=seed)
    return [{"text": r["text"], "label": "film" if ("film" in r["text"] or "movie" in r["text"]) else "other"} for r in rows]


def _recipe(tmp_path, model_path, method="lora", **extra):
    files = {"sentiment": write_jsonl(tmp_path / "sent.jsonl", make_rows(160, seed=1)),
             "topic": write_jsonl(tmp_path / "topic.jsonl", _topic_rows(120, seed=2))}
    tree = {"model": {"path": str(model_path)}, "method": {"name": method},
            "tasks": [{"name": "sentiment", "weight": 1.0, "data": {"train": str(files["sentiment"])}},
                      {"name": "topic", "weight": 0.5, "data": {"train": str(files["topic"])}}],
            "train": {"max_steps": 24, "lr": 5e-3, "batch_size": 8, "eval_every": 12},
            "eval": {"linear_probe": False, "samples": 1}, "output_dir": str(tmp_path / "run")}
    for key, value in extra.items():
        section, _, name = key.partition("__")
        tree.setdefault(section, {})[name] = value
    return config.validate(tree)


def test_the_combined_gradient_is_the_weighted_sum_of_the_task_gradients(tiny_bert, tmp_path):
    cfg = _recipe(tmp_path, tiny_bert, method="full")
    info_a, info_b = {"labels": ["neg", "pos"]}, {"labels": ["film", "other"]}
    torch.manual_seed(0)
    a, tok = classification.build_model(cfg.model, info_a)
    b, _ = classification.build_model(cfg.model, info_b)
    from tunelab.multitask import share_body
    share_body(a, b, classification.head_modules(a), classification.head_modules(b))
    feats_a, _ = classification.encode(make_rows(6, seed=3), tok, info_a, 32)
    feats_b, _ = classification.encode(_topic_rows(6, seed=4), tok, info_b, 32)
    # eval(): no dropout, so both computations see the same function
    jobs = [loop.Job("a", classification, a.eval(), feats_a, [], info_a, tok.pad_token_id, weight=0.7),
            loop.Job("b", classification, b.eval(), feats_b, [], info_b, tok.pad_token_id, weight=0.3)]
    batches = [(jobs[0], classification.collate(feats_a[:3], tok.pad_token_id)),
               (jobs[1], classification.collate(feats_b, tok.pad_token_id)),
               (jobs[0], classification.collate(feats_a[3:], tok.pad_token_id))]
    params = {id(p): p for p in list(a.parameters()) + list(b.parameters())}.values()
    for p in params:
        p.grad = None
    loop.accumulate(batches)
    got = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    for p in params:
        p.grad = None
    by_hand = 0.7 * classification.loss(a, classification.collate(feats_a, tok.pad_token_id), {}) / 6 \
        + 0.3 * classification.loss(b, classification.collate(feats_b, tok.pad_token_id), {}) / 6
    by_hand.backward()
    want = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    # micro-batches against whole batches: a forward and backward pass each, summed over the tokens; a gradient
    # that cancels to near 0 rounds like the largest
    tokens = sum(classification.collate(f, tok.pad_token_id)["input_ids"].numel() for f in (feats_a, feats_b))
    atol = tol(want, 2 * FORWARD_OPS + tokens)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=atol, rtol=0)
    assert a.bert.encoder is b.bert.encoder and a.classifier is not b.classifier


@pytest.mark.parametrize("sampling,expected", [("proportional", {0: 0.75, 1: 0.25}), ("uniform", {0: 0.5, 1: 0.5}),
                                               ("temperature", {0: 3 ** 0.5 / (3 ** 0.5 + 1), 1: 1 / (3 ** 0.5 + 1)})])
def test_task_sampling_follows_the_strategy_and_is_seeded(sampling, expected):
    jobs = [loop.Job(n, classification, None, [{"input_ids": [1]}] * size, [], {}, 0)
            for n, size in (("a", 300), ("b", 100))]
    cfg = config.validate({"model": {"path": "m"}, "data": {"train": "x"}, "train": {"batch_size": 4, "grad_accum": 2}}).train
    draws = [i for _, step, _ in (next(s) for s in [loop.mixed_stream(jobs, cfg, sampling, 2.0)] * 2000) for i, _ in step]
    counts = Counter(draws)
    for i, share in expected.items():
        assert counts[i] / len(draws) == pytest.approx(share, abs=0.03)
    again = [i for _, step, _ in (next(s) for s in [loop.mixed_stream(jobs, cfg, sampling, 2.0)] * 2000) for i, _ in step]
    assert again == draws


def test_round_robin_alternates_and_every_task_walks_its_own_epochs():
    jobs = [loop.Job(n, classification, None, [{"input_ids": [1]}] * size, [], {}, 0) for n, size in (("a", 12), ("b", 8))]
    cfg = config.validate({"model": {"path": "m"}, "data": {"train": "x"}, "train": {"batch_size": 4}}).train
    stream = loop.mixed_stream(jobs, cfg, "round_robin")
    steps = [next(stream) for _ in range(10)]
    assert [step[0][0] for _, step, _ in steps] == [0, 1] * 5
    seen_a = sorted(i for _, step, _ in steps[:6:2] for j, c in step if j == 0 for i in c)
    assert seen_a == list(range(12))  # three batches of 4 = one epoch of task a
    assert [end for _, _, end in steps].index(True) == 4  # (3 + 2) micro-batches make one epoch


@pytest.mark.parametrize("method,adapters", [("lora", "shared"), ("lora", "per_task"), ("full", "shared")])
def test_a_multitask_run_trains_both_heads_and_predicts_for_each_task(tiny_bert, tmp_path, method, adapters):
    cfg = _recipe(tmp_path, tiny_bert, method, multitask__adapters=adapters, multitask__sampling="round_robin")
    run = pipeline.train(cfg)
    s = run.summary
    assert set(s["eval"]) == {"sentiment", "topic"} and "score" in s["metric"]
    for name in ("sentiment", "topic"):
        assert s["eval"][name]["accuracy"] > s["base"][name]["validation"]["accuracy"] - 0.05
    evals = [json.loads(l) for l in (run.dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
    assert "sentiment/accuracy" in evals[0] and "topic/accuracy" in evals[0]
    assert json.loads((run.dir / "labels.json").read_text())["tasks"]["topic"]["labels"] == ["film", "other"]

    for name, labels in (("sentiment", {"neg", "pos"}), ("topic", {"film", "other"})):
        model = tunelab.load(run.dir, task=name)
        pred = model.predict(["the film was great"])[0]
        assert pred["label"] in labels
        assert model.evaluate(cfg.tasks[0 if name == "sentiment" else 1].data.train)["accuracy"] == \
            pytest.approx(s["eval"][name]["accuracy"], abs=0.2)
    res = CliRunner().invoke(app, ["predict", str(run.dir), "--task", "topic", "--text", "a dull film"])
    assert res.exit_code == 0 and json.loads(res.output)["label"] in {"film", "other"}
    with pytest.raises(TunelabError, match="multi-task run; say which task.*sentiment, topic"):
        tunelab.load(run.dir)


def test_per_task_adapters_are_distinct(tiny_bert, tmp_path):
    cfg = _recipe(tmp_path, tiny_bert, "lora", multitask__adapters="per_task")
    run = pipeline.train(cfg)
    from safetensors.torch import load_file
    a = load_file(str(run.dir / "adapters" / "sentiment" / "adapter_model.safetensors"))
    b = load_file(str(run.dir / "adapters" / "topic" / "adapter_model.safetensors"))
    assert set(a) == set(b) and any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("change,message", [
    (lambda t: t["tasks"].append(dict(t["tasks"][0])), "task names must be unique, 'a' appears more than once"),
    (lambda t: t["tasks"][0].update(weight=0), r"tasks.0.weight' = 0: Input should be greater than 0"),
    (lambda t: t.update(data={"train": "x.jsonl"}), "either `data` \\(one task\\) or `tasks`"),
    (lambda t: t["method"].update(name="prompt"), "not supported for multi-task"),
    # a task's name names files of the run directory: it may not lead out of it
    (lambda t: t["tasks"][0].update(name="../../outside"), r"tasks.0.name' = '../../outside'.*no '/', no '..'"),
    (lambda t: t["tasks"][0].update(name="/etc/x"), r"tasks.0.name'.*letters, digits"),
])
def test_bad_multitask_configs_say_what_to_fix(change, message):
    tree = {"model": {"path": "m"}, "method": {"name": "lora"},
            "tasks": [{"name": "a", "data": {"train": "a.jsonl"}}, {"name": "b", "data": {"train": "b.jsonl"}}]}
    change(tree)
    with pytest.raises(TunelabError, match=message):
        config.validate(tree)


def _tag_rows(n, seed):
    """Token classification on the same words: sentiment words are entities (B-POS / B-NEG)."""
    from conftest import NEGATIVE, POSITIVE

    return [{"tokens": r["text"].split(),
             "tags": ["B-POS" if w in POSITIVE else "B-NEG" if w in NEGATIVE else "O" for w in r["text"].split()]}
            for r in make_rows(n, seed=seed)]


@pytest.mark.parametrize("adapters", ["shared", "per_task"])
def test_a_loaded_task_scores_exactly_what_the_run_scored(tiny_bert, tmp_path, adapters):
    # The token task comes first: its body has no pooler, the classification task's has (its own).
    files = {name: write_jsonl(tmp_path / f"{name}.jsonl", rows) for name, rows in (
        ("tags", _tag_rows(120, 1)), ("tags_test", _tag_rows(30, 2)),
        ("sent", make_rows(120, seed=3)), ("sent_test", make_rows(30, seed=4)))}
    cfg = config.validate({
        "model": {"path": str(tiny_bert)}, "method": {"name": "lora", "target_modules": "all-linear"},
        "multitask": {"adapters": adapters},
        "tasks": [{"name": "tags", "task": {"type": "token_classification"},
                   "data": {"train": str(files["tags"]), "test": str(files["tags_test"])}},
                  {"name": "sentiment", "data": {"train": str(files["sent"]), "test": str(files["sent_test"])}}],
        "train": {"max_steps": 12, "lr": 1e-2, "batch_size": 8, "eval_every": 6},
        "eval": {"linear_probe": False, "samples": 1}, "output_dir": str(tmp_path / "run")})
    run = pipeline.train(cfg)
    for name, test_file in (("tags", files["tags_test"]), ("sentiment", files["sent_test"])):
        got = tunelab.load(run.dir, task=name).evaluate(test_file)
        main = "f1" if name == "tags" else "accuracy"
        # the same weights through the same evaluate(): the same kernels in the same order
        assert got[main] == run.summary["test"][name][main]
        assert got["loss"] == run.summary["test"][name]["loss"]


def test_a_misspelt_key_inside_a_task_gets_a_did_you_mean():
    with pytest.raises(TunelabError, match="unknown key 'tasks.0.data.trian' — did you mean 'tasks.0.data.train'"):
        config.validate({"model": {"path": "m"}, "tasks": [{"name": "a", "data": {"trian": "x"}}]})
    with pytest.raises(TunelabError, match="did you mean 'tasks.0.weight'"):
        config.validate({"model": {"path": "m"}, "tasks": [{"name": "a", "wieght": 2, "data": {"train": "x"}}]})


@pytest.mark.parametrize("adapters", ["shared", "per_task"])
def test_a_multitask_run_resumes_to_the_same_weights(tiny_bert, tmp_path, adapters):
    """Checkpointed every step; a copy cut back to step 9 (as a crash would leave it) resumes to the same heads and
    adapters as the run that went through, bit for bit: task sampling, data order and dropout all replayed."""
    from safetensors.torch import load_file

    from tunelab.training import checkpoint

    cfg = _recipe(tmp_path, tiny_bert, "lora", multitask__adapters=adapters, train__checkpoint_every=1, train__keep_finished_checkpoints=True,
                  train__keep_checkpoints=30)
    run = pipeline.train(cfg)
    crashed = tmp_path / "crashed"
    shutil.copytree(run.dir, crashed)
    for p in (crashed / checkpoint.DIR).glob("step-*"):
        if int(p.name.split("-")[1]) > 9:
            shutil.rmtree(p)
    (crashed / "summary.json").unlink()
    resumed = tunelab.resume(crashed)
    files = lambda d: {f.relative_to(d): load_file(str(f)) for sub in ("heads", "adapter", "adapters")
                       for f in sorted((d / sub).rglob("*.safetensors"))}
    a, b = files(run.dir), files(resumed.dir)
    assert a.keys() == b.keys() and a
    for name in a:
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name
    assert resumed.summary["eval"] == run.summary["eval"]


def test_each_task_head_over_a_bf16_base_loads_back_float32_unrounded(tiny_bert, tmp_path):
    """Over `model.dtype: bfloat16` an adapter method trains each task's head float32; tunelab.load must load the
    saved heads into float32 modules, not round them to the base's dtype."""
    from safetensors.torch import load_file

    run = pipeline.train(_recipe(tmp_path, tiny_bert, model__dtype="bfloat16", train__max_steps=2, train__eval_every=2))
    for name in ("sentiment", "topic"):
        saved = load_file(str(run.dir / "heads" / f"{name}.safetensors"))
        weight = next(t for k, t in saved.items() if k.endswith("classifier.weight"))
        model = tunelab.load(run.dir, task=name).model
        assert weight.dtype == torch.float32
        assert torch.equal(model.classifier.weight.detach().cpu(), weight)
