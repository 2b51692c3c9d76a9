"""Training controls: layer-wise learning-rate decay, schedules, lowering the LR on a plateau."""

from __future__ import annotations

import pytest
import torch
from conftest import make_rows, size, tol

from tunelab import config, models
from tunelab.tasks import classification
from tunelab.training import loop, optim

INFO = {"labels": ["neg", "pos"]}


def _train_cfg(**kw):
    return config.validate({"model": {"path": "m"}, "data": {"train": "x.jsonl"}, "train": kw}).train


def test_layer_wise_decay_gives_every_group_its_exact_lr(tiny_bert):
    cfg_model = config.validate({"model": {"path": str(tiny_bert)}, "data": {"train": "x"}}).model
    model, _ = classification.build_model(cfg_model, INFO)
    head = models.head_modules(model)
    cfg = _train_cfg(lr=1e-3, head_lr=5e-3, layer_lr_decay=0.5)
    groups = {g["name"]: g for g in optim.param_groups(model, head, cfg)}
    # tiny BERT: 2 blocks -> block_1 lr, block_0 lr/2, embeddings lr/4; head at head_lr
    assert groups["block_1"]["lr"] == pytest.approx(1e-3)
    assert groups["block_0"]["lr"] == pytest.approx(5e-4)
    assert groups["embeddings"]["lr"] == pytest.approx(2.5e-4)
    assert groups["head"]["lr"] == pytest.approx(5e-3)
    assert all(n.startswith("bert.encoder.layer.0.") for n in groups["block_0"]["param_names"])
    assert "bert.embeddings.word_embeddings.weight" in groups["embeddings"]["param_names"]
    assert groups["embeddings_no_decay"]["weight_decay"] == 0.0  # LayerNorm and biases
    names = [n for g in groups.values() for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("kind,expected", [("linear", [0.25, 0.5, 0.75, 1.0, 0.75, 0.5]),
                                           ("constant", [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]),
                                           ("inverse_sqrt", [0.25, 0.5, 0.75, (3 / 4) ** 0.5, (3 / 5) ** 0.5, (3 / 6) ** 0.5])])
def test_schedules(kind, expected):
    got = [optim.lr_factor(s, 3, 7, kind) for s in range(6)]
    assert got == pytest.approx(expected)


def test_the_lr_is_lowered_after_patience_evaluations_without_improvement(tiny_bert):
    cfg_model = config.validate({"model": {"path": str(tiny_bert)}, "data": {"train": "x"}}).model
    torch.manual_seed(0)
    model, tok = classification.build_model(cfg_model, INFO)
    feats, _ = classification.encode(make_rows(32, seed=1), tok, INFO, 32)
    # lr 0 for the body and a tiny head lr: validation cannot improve after the first evaluation
    cfg = _train_cfg(lr=1e-9, batch_size=8, max_steps=8, eval_every=1, plateau_factor=0.5, plateau_patience=2,
                     min_lr=2e-10, warmup_steps=0, scheduler="constant")
    records = []
    loop.run(model, classification, feats, feats[:8], INFO, cfg, models.head_modules(model), tok.pad_token_id,
             torch.device("cpu"), 8, records.append)
    plateaus = [r for r in records if r["type"] == "plateau"]
    assert [r["step"] for r in plateaus][:2] == [3, 5] and plateaus[0]["lr_scale"] == 0.5
    assert plateaus[-1]["lr_scale"] >= 0.2 - 1e-12  # never below min_lr / lr
    lrs = [r["lr"] for r in records if r["type"] == "train"]
    assert lrs[-1] == pytest.approx(1e-9 * plateaus[-1]["lr_scale"])


def test_gradual_unfreezing_opens_one_block_per_stage_from_the_top(tiny_bert, tmp_path):
    import json

    from conftest import write_jsonl

    import tunelab

    train = write_jsonl(tmp_path / "train.jsonl", make_rows(80, seed=2))
    run = tunelab.train(None, [f"model.path={tiny_bert}", f"data.train={train}", "method.name=freeze",
                               "method.freeze_layers=all", "train.unfreeze=gradual", "train.unfreeze_every=2",
                               "train.max_steps=6", "train.lr=1e-2", "train.batch_size=8", "eval.linear_probe=false",
                               f"output_dir={tmp_path / 'run'}"])
    records = [json.loads(l) for l in (run.dir / "metrics.jsonl").read_text().splitlines()]
    stages = [(r["step"], r["unfrozen"], r["still_frozen"]) for r in records if r["type"] == "unfreeze"]
    assert stages == [(2, "block_1", ["block_0"]), (4, "block_0", [])]
    # what trained: both blocks (they are in the saved model and moved from the base), embeddings never
    from transformers import AutoModelForSequenceClassification
    tuned = AutoModelForSequenceClassification.from_pretrained(run.dir / "model")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    changed = lambda prefix: any(not torch.equal(p, base.state_dict()[n]) for n, p in tuned.state_dict().items()
                                 if n.startswith(prefix))
    assert changed("bert.encoder.layer.1.") and changed("bert.encoder.layer.0.")
    assert not changed("bert.embeddings.")


def test_gradual_unfreezing_needs_the_freeze_method():
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="train.unfreeze=gradual unfreezes the blocks"):
        config.validate({"model": {"path": "m"}, "data": {"train": "x"}, "method": {"name": "lora"},
                         "train": {"unfreeze": "gradual"}})


def test_dropout_overrides_reach_the_loaded_model(tiny_bert):
    cfg_model = config.validate({"model": {"path": str(tiny_bert), "hidden_dropout": 0.3, "attention_dropout": 0.2,
                                           "classifier_dropout": 0.4}, "data": {"train": "x"}}).model
    model, _ = classification.build_model(cfg_model, INFO)
    assert model.config.hidden_dropout_prob == 0.3 and model.config.attention_probs_dropout_prob == 0.2
    assert model.dropout.p == 0.4 and model.bert.embeddings.dropout.p == 0.3


def test_label_smoothing_is_the_smoothed_cross_entropy(tiny_bert):
    cfg_model = config.validate({"model": {"path": str(tiny_bert)}, "data": {"train": "x"}}).model
    torch.manual_seed(0)
    model, tok = classification.build_model(cfg_model, INFO)
    feats, _ = classification.encode(make_rows(8, seed=1), tok, INFO, 32)
    batch = classification.collate(feats, tok.pad_token_id)
    with torch.no_grad():
        logp = classification.forward(model.eval(), batch).log_softmax(-1)
        smoothed = -(0.9 * logp.gather(1, batch["labels"][:, None]).squeeze(1) + 0.1 * logp.mean(-1)).sum()
        # the same logits; float32 log-softmaxes over 2 labels, smoothed and summed over the 8 rows, in another order
        atol = tol(8 * size(logp), 2 + 8 + 3)
        torch.testing.assert_close(classification.loss(model, batch, {"label_smoothing": 0.1}), smoothed, atol=atol, rtol=0)


def test_ema_weights_are_what_evaluation_and_the_best_state_use(tiny_bert):
    cfg_model = config.validate({"model": {"path": str(tiny_bert)}, "data": {"train": "x"}}).model
    results = {}
    for ema in (None, 0.999999):
        torch.manual_seed(0)
        model, tok = classification.build_model(cfg_model, INFO)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        feats, _ = classification.encode(make_rows(32, seed=1), tok, INFO, 32)
        cfg = _train_cfg(lr=5e-2, batch_size=8, max_steps=4, eval_every=4, ema_decay=ema)
        loop.run(model, classification, feats, feats[:8], INFO, cfg, models.head_modules(model), tok.pad_token_id,
                 torch.device("cpu"), 8, lambda r: None)
        results[ema] = max((p - start[n]).abs().max().item() for n, p in model.named_parameters())
    assert results[None] > 1e-2 and results[0.999999] < 1e-4  # the average has barely left the start
