"""DoRA: init equals the base, output (and gradient) parity with HF peft's use_dora, save/load both
ways through the PEFT layout, merge, exact parameter counts, what a training step touches,
adapters_disabled, errors, and a run through the pipeline."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import FORWARD_OPS, make_rows, size, tol, write_jsonl
from conftest import base_classifier as _base
from conftest import text_batch as _batch
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

import tunelab
from tunelab.config import DoraConfig, LoraConfig
from tunelab.errors import TunelabError
from tunelab.methods import adapters_disabled, dora, lora

peft = pytest.importorskip("peft")

LABELS = torch.tensor([1, 0, 1, 0])
HEADS = {"bert": ["bert.pooler", "classifier"], "gpt2": ["score"]}
TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn"]}
MAG = ".lora_magnitude_vector"


def _cfg(targets, r=4, alpha=8, dropout=0.0):
    return DoraConfig(name="dora", r=r, alpha=alpha, dropout=dropout, target_modules=targets)


def _peft_cfg(kind, dropout=0.0, **kw):
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS[kind],
                           modules_to_save=list(HEADS[kind]), use_dora=True, **kw)  # peft extends the list it is given


def _randomize(model, seed=1, only=lambda name: True):
    """Non-zero A and B, magnitudes off ||W||, a changed head: so that comparisons test something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and only(name):
                noise = torch.randn(p.shape, generator=g)
                # A magnitude stays near the norm it starts at (positive), as training leaves it.
                p.mul_(1 + 0.1 * noise) if MAG in name else p.copy_(0.1 * noise)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _dora_params(model):
    return {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n or n.endswith(MAG)}


def _peft_name(name, head):
    """Our parameter name -> peft's live one (adapter `default`, magnitude in a DoraLinearLayer, head copies)."""
    name = name.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
    if name.endswith(MAG):
        name += ".default.weight"
    for h in head:
        if name.startswith(h + "."):
            name = h + ".modules_to_save.default." + name[len(h) + 1:]
    return "base_model.model." + name


def _pair(kind, path, dropout=0.0):
    """Our DoRA model and peft's on the same base, with the same random adapter and head weights."""
    base = _base(path)
    ours = dora.apply(copy.deepcopy(base), _cfg(TARGETS[kind], dropout=dropout), HEADS[kind])
    _randomize(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), _peft_cfg(kind, dropout))
    theirs_params = dict(theirs.named_parameters())
    state = {_peft_name(n, HEADS[kind]): p for n, p in ours.named_parameters() if p.requires_grad}
    assert set(state) == {n for n, p in theirs_params.items() if p.requires_grad}
    with torch.no_grad():
        for name, p in state.items():
            theirs_params[name].copy_(p)
    return ours, theirs, state


def test_init_equals_base(arch):
    kind, path, batch = arch
    base = _base(path)
    model = dora.apply(copy.deepcopy(base), _cfg(None), HEADS[kind])  # the architecture's default targets
    assert any(isinstance(m, dora.DoRALinear) for m in model.modules())
    assert torch.equal(_logits(model, batch), _logits(base, batch))


def test_parity_with_peft(arch):
    kind, path, batch = arch
    ours, theirs, _ = _pair(kind, path)
    expected = _logits(ours.eval(), batch)
    torch.testing.assert_close(_logits(theirs.eval(), batch), expected, atol=tol(expected, FORWARD_OPS), rtol=0)


def test_training_step_parity_with_peft(arch):
    """Train mode with adapter dropout: same outputs (same dropout masks) and the same gradients, which
    checks that the weight norm is detached and that dropout reaches the base path as in peft."""
    kind, path, batch = arch
    ours, theirs, state = _pair(kind, path, dropout=0.2)
    losses = []
    for model in (ours.train(), theirs.train()):
        torch.manual_seed(3)
        out = model(**batch, labels=LABELS)
        out.loss.backward()
        losses.append(out.loss.detach())
    # the loss moves with the logits (a cross-entropy's slope is under 1)
    torch.testing.assert_close(losses[0], losses[1], atol=tol(size(out.logits), FORWARD_OPS), rtol=0)
    # the backward retraces the forward and sums each weight's gradient over the batch's tokens; a gradient that
    # cancels to near 0 rounds like the largest
    grad_tol = tol([p.grad for p in state.values()], 2 * FORWARD_OPS + batch["input_ids"].numel())
    theirs_params = dict(theirs.named_parameters())
    for name, p in state.items():
        torch.testing.assert_close(p.grad, theirs_params[name].grad, atol=grad_tol, rtol=0, msg=name)


def test_save_loads_in_peft_and_tunelab(arch, tmp_path):
    kind, path, batch = arch
    model = dora.apply(_base(path), _cfg(TARGETS[kind]), HEADS[kind])
    _randomize(model)
    expected = _logits(model, batch)
    dora.save(model, tmp_path, str(path), HEADS[kind])

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    head_keys = {f"base_model.model.{h}.{k}" for h in HEADS[kind] for k in model.get_submodule(h).state_dict()}
    assert set(saved) == {"base_model.model." + n for n in _dora_params(model)} | head_keys
    assert any(k.endswith(MAG) for k in saved)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is True
    assert config["fan_in_fan_out"] is (kind == "gpt2")

    in_peft = peft.PeftModel.from_pretrained(_base(path), tmp_path).eval()
    torch.testing.assert_close(_logits(in_peft, batch), expected, atol=tol(expected, FORWARD_OPS), rtol=0)
    in_tunelab = dora.load(_base(path), tmp_path).eval()
    assert any(isinstance(m, dora.DoRALinear) for m in in_tunelab.modules())
    torch.testing.assert_close(_logits(in_tunelab, batch), expected, atol=tol(expected, FORWARD_OPS), rtol=0)


def test_load_reads_a_peft_adapter(arch, tmp_path):
    kind, path, batch = arch
    theirs = peft.get_peft_model(_base(path), _peft_cfg(kind, task_type="SEQ_CLS"))
    _randomize(theirs)
    theirs.save_pretrained(tmp_path)
    ours = dora.load(_base(path), tmp_path).eval()
    expected = _logits(theirs.eval(), batch)
    torch.testing.assert_close(_logits(ours, batch), expected, atol=tol(expected, FORWARD_OPS), rtol=0)


def test_merge_equals_unmerged(arch):
    kind, path, batch = arch
    base_names = [n for n, _ in _base(path).named_parameters()]
    model = dora.apply(_base(path), _cfg(TARGETS[kind]), HEADS[kind])
    _randomize(model)
    unmerged = _logits(model, batch)
    merged = dora.merge(model)
    assert not any(isinstance(m, lora.LoRALinear) for m in merged.modules())
    assert [n for n, _ in merged.named_parameters()] == base_names
    torch.testing.assert_close(_logits(merged, batch), unmerged, atol=tol(unmerged, FORWARD_OPS), rtol=0)


def test_trainable_count_tiny_bert(tiny_bert):
    model = dora.apply(_base(tiny_bert), _cfg(["query", "value"], r=4), ["bert.pooler", "classifier"])
    h, layers, r, labels = 32, 2, 4, 2
    dora_count = layers * 2 * (h * r + r * h + h)  # A, B, and one magnitude per output of query and value
    head = (h * h + h) + (h * labels + labels)  # pooler dense + classifier
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == dora_count + head


def test_trainable_count_tiny_gpt2(tiny_gpt2):
    model = dora.apply(_base(tiny_gpt2), _cfg(["c_attn"], r=4), ["score"])
    h, layers, r, labels = 32, 2, 4, 2
    dora_count = layers * (h * r + r * 3 * h + 3 * h)  # c_attn: 32 -> 96, so 96 magnitudes
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == dora_count + h * labels
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer.base_layer, Conv1D) and layer.lora_magnitude_vector.shape == (3 * h,)


def test_step_changes_only_dora_and_head(arch):
    kind, path, batch = arch
    model = dora.apply(_base(path), _cfg(TARGETS[kind], dropout=0.1), HEADS[kind]).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**batch, labels=LABELS).loss.backward()
    opt.step()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if name in trainable:
            # A gets no gradient while B is still zero; everything else (the magnitudes too) must move.
            assert ".lora_A." in name or not torch.equal(p, before[name]), name
        else:
            assert p.grad is None and torch.equal(p, before[name]), name
    assert trainable == _dora_params(model) | {
        n for n, _ in model.named_parameters() if any(n.startswith(h + ".") for h in HEADS[kind])}


def test_adapters_disabled_restores_base(arch):
    kind, path, batch = arch
    base = _logits(_base(path), batch)
    model = dora.apply(_base(path), _cfg(TARGETS[kind]), HEADS[kind])  # same seeded head as the base
    _randomize(model, only=lambda name: name in _dora_params(model))
    adapted = _logits(model, batch)
    assert not torch.allclose(adapted, base)
    with adapters_disabled(model):
        assert torch.equal(_logits(model, batch), base)
    assert torch.equal(_logits(model, batch), adapted)  # re-enabled afterwards


def test_bf16_base_keeps_float32_magnitude(tiny_bert):
    batch = _batch(tiny_bert)
    base = _base(tiny_bert).to(torch.bfloat16)
    model = dora.apply(copy.deepcopy(base), _cfg(["query", "value"]), ["classifier"])
    layer = model.bert.encoder.layer[0].attention.self.query
    assert layer.lora_magnitude_vector.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    assert torch.equal(_logits(model, batch), _logits(base, batch))
    _randomize(model)
    out = model(**batch, labels=LABELS)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert layer.lora_magnitude_vector.grad is not None and layer.lora_magnitude_vector.grad.dtype == torch.float32


def test_lora_and_dora_adapters_are_told_apart(tiny_bert, tmp_path):
    plain, with_dora = tmp_path / "lora", tmp_path / "dora"
    lora.save(lora.apply(_base(tiny_bert), LoraConfig(name="lora", r=2), ["classifier"]), plain, str(tiny_bert),
              ["classifier"])
    dora.save(dora.apply(_base(tiny_bert), _cfg(None, r=2), ["classifier"]), with_dora, str(tiny_bert), ["classifier"])
    with pytest.raises(TunelabError, match="is a DoRA adapter.*method.name=dora"):
        lora.load(_base(tiny_bert), with_dora)
    with pytest.raises(TunelabError, match="is a plain LoRA adapter.*method.name=lora"):
        dora.load(_base(tiny_bert), plain)


def test_trains_saves_and_predicts_through_the_pipeline(tiny_bert, tmp_path):
    if "dora" not in tunelab.methods.METHODS:
        pytest.skip('dora is not in METHODS (src/tunelab/methods/__init__.py): add `"dora": dora`')
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(80, seed=4))
    run = tunelab.train(None, [f"model.path={tiny_bert}", f"data.train={train}", "method.name=dora", "method.r=4",
                               "train.max_steps=3", "train.batch_size=8", "eval.linear_probe=false",
                               f"output_dir={tmp_path / 'run'}"])
    assert 0 < run.summary["trainable_params"] < run.summary["total_params"]
    config = json.loads((run.dir / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    predictions = tunelab.load(run.dir).predict(["great film", "a dull and tedious plot"])
    assert [set(p["probs"]) for p in predictions] == [{"neg", "pos"}] * 2


def test_dora_takes_the_lora_options(tiny_bert):
    """DoRA inherits LoRA's options (rsLoRA, layers_to_transform, ...) through the pipeline's apply."""
    from transformers import AutoModelForSequenceClassification

    from tunelab import models
    from tunelab.config import DoraConfig
    from tunelab.methods import dora

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    cfg = DoraConfig(name="dora", r=4, alpha=8, use_rslora=True, layers_to_transform=[1], target_modules=["query"])
    dora.apply(model, cfg, models.head_modules(model))
    layers = {p: m for p, m in model.named_modules() if isinstance(m, dora.DoRALinear)}
    assert list(layers) == ["bert.encoder.layer.1.attention.self.query"]
    assert next(iter(layers.values())).scaling == 8 / 4 ** 0.5
