"""Training controls: layer-wise learning-rate decay, schedules, lowering the LR on a plateau."""

from __future__ import annotations

import pytest
import torch

from tunelab import config, models
from tunelab.tasks import classification
from tunelab.training import loop, optim
from conftest import make_rows

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

    import tunelab
    from conftest import write_jsonl

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
