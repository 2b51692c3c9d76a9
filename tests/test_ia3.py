"""IA3: init equals the base, peft's defaults and shapes, exact parameter counts, output parity with
HF peft (live, and through adapters saved by either side), merge, disabling, what a step touches, errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import FORWARD_OPS, tol
from conftest import base_classifier as _base
from conftest import text_batch as _batch
from safetensors.torch import load_file

import tunelab
from tunelab import methods
from tunelab.config import IA3Config
from tunelab.errors import TunelabError
from tunelab.methods import ia3

peft = pytest.importorskip("peft")

HEADS = {"bert": ["bert.pooler", "classifier"], "gpt2": ["score"]}
# peft's defaults for these architectures, spelled out so that the tests do not depend on them.
TARGETS = {"bert": ["key", "value", "output.dense"], "gpt2": ["c_attn", "mlp.c_proj"]}
FEEDFORWARD = {"bert": ["output.dense"], "gpt2": ["mlp.c_proj"]}


def _cfg(targets=None, feedforward=None):
    return IA3Config(name="ia3", target_modules=targets, feedforward_modules=feedforward)


def _randomize(model, seed=1):
    """Vectors away from one and a changed head, so that comparisons test something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g)
                p.copy_(1 + 0.5 * noise if "ia3_l" in n else 0.1 * noise)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _ia3_params(model):
    return {n for n, _ in model.named_parameters() if n.endswith(".ia3_l") or ".ia3_l." in n}


def _peft_name(name, head):
    """Our parameter name -> peft's live one (adapter name `default`, head copies under modules_to_save)."""
    name = name.replace(".ia3_l", ".ia3_l.default")
    for h in head:
        if name.startswith(h + "."):
            name = h + ".modules_to_save.default." + name[len(h) + 1:]
    return "base_model.model." + name


def _peft_model(base, kind, **kw):
    return peft.get_peft_model(base, peft.IA3Config(
        target_modules=TARGETS[kind], feedforward_modules=FEEDFORWARD[kind], modules_to_save=HEADS[kind],
        fan_in_fan_out=kind == "gpt2", **kw))


def test_defaults_are_peft_tables():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FF
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGET

    assert {k: t for k, (t, _) in ia3.DEFAULTS.items()} == TARGET
    assert {k: f for k, (_, f) in ia3.DEFAULTS.items()} == FF


def test_init_equals_base(arch):
    kind, path, batch = arch
    base = _base(path)
    model = ia3.apply(copy.deepcopy(base), _cfg(), HEADS[kind])
    assert _ia3_params(model)
    assert all(torch.equal(m.ia3_l, torch.ones_like(m.ia3_l)) for m in model.modules() if isinstance(m, ia3.IA3Linear))
    assert torch.equal(_logits(model, batch), _logits(base, batch))


def test_defaults_wrap_what_peft_wraps(arch):
    # peft's feed-forward test is a plain suffix match, so BERT's attention.output.dense is feed-forward too.
    kind, path, _ = arch
    ours = ia3.apply(_base(path), _cfg(), HEADS[kind])
    theirs = peft.get_peft_model(_base(path), peft.IA3Config(task_type="SEQ_CLS"))
    layers = {n: (m.is_feedforward, tuple(m.ia3_l.shape)) for n, m in ours.named_modules()
              if isinstance(m, ia3.IA3Linear)}
    assert layers == {n.removeprefix("base_model.model."): (m.is_feedforward, tuple(m.ia3_l["default"].shape))
                      for n, m in theirs.named_modules() if hasattr(m, "ia3_l")}
    if kind == "bert":
        layer = "bert.encoder.layer.0."
        assert layers[layer + "attention.self.key"] == (False, (32, 1))
        assert layers[layer + "attention.output.dense"] == (True, (1, 32))
        assert layers[layer + "output.dense"] == (True, (1, 64))
        assert layer + "intermediate.dense" not in layers
    else:
        assert layers["transformer.h.0.attn.c_attn"] == (False, (96, 1))  # Conv1D 32 -> 96
        assert layers["transformer.h.0.mlp.c_proj"] == (True, (1, 128))
        assert "transformer.h.0.attn.c_proj" not in layers


def test_trainable_count_tiny_bert(tiny_bert):
    model = ia3.apply(_base(tiny_bert), _cfg(), ["bert.pooler", "classifier"])
    h, ffn, layers, labels = 32, 64, 2, 2
    vectors = layers * (h + h + h + ffn)  # key, value (outputs); attention.output.dense, output.dense (inputs)
    head = (h * h + h) + (h * labels + labels)  # pooler dense + classifier
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == vectors + head
    assert {n for n, p in model.named_parameters() if p.requires_grad} - _ia3_params(model) == {
        "bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}


def test_trainable_count_tiny_gpt2(tiny_gpt2):
    model = ia3.apply(_base(tiny_gpt2), _cfg(), ["score"])
    h, layers, labels = 32, 2, 2
    vectors = layers * (3 * h + 4 * h)  # c_attn output (32 -> 96), mlp.c_proj input (128 -> 32)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == vectors + h * labels


def test_parity_with_peft(arch):
    kind, path, batch = arch
    base = _base(path)
    ours = ia3.apply(copy.deepcopy(base), _cfg(TARGETS[kind], FEEDFORWARD[kind]), HEADS[kind])
    _randomize(ours)
    theirs = _peft_model(copy.deepcopy(base), kind)
    state = {_peft_name(n, HEADS[kind]): p for n, p in ours.named_parameters() if p.requires_grad}
    theirs_params = dict(theirs.named_parameters())
    assert set(state) == {n for n, p in theirs_params.items() if p.requires_grad}
    with torch.no_grad():
        for name, p in state.items():
            theirs_params[name].copy_(p)
    theirs.eval()
    expected = _logits(ours, batch)
    assert not torch.allclose(expected, _logits(base, batch), atol=1e-3)
    torch.testing.assert_close(_logits(theirs, batch), expected, atol=tol(expected, FORWARD_OPS), rtol=0)

    # Merging gives the weights (and biases) peft's merge gives (layer by layer: peft's merge_and_unload
    # fails on a non-leaf modules_to_save such as bert.pooler).
    merged = ia3.merge(ours)
    for name, layer in theirs.base_model.model.named_modules():
        if hasattr(layer, "ia3_l"):
            layer.merge()
            for key, p in layer.base_layer.named_parameters():
                # a weight (or bias) times the vector: one rounding, whichever side does it
                torch.testing.assert_close(merged.get_submodule(name).get_parameter(key), p, atol=tol(p, ops=1), rtol=0)


def test_save_loads_in_peft_and_tunelab(arch, tmp_path):
    kind, path, batch = arch
    model = ia3.apply(_base(path), _cfg(), HEADS[kind])
    _randomize(model)
    expected = _logits(model, batch)
    ia3.save(model, tmp_path, str(path), HEADS[kind])

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    head_keys = {f"base_model.model.{h}.{k}" for h in HEADS[kind] for k in model.get_submodule(h).state_dict()}
    assert set(saved) == {"base_model.model." + n for n in _ia3_params(model)} | head_keys
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["task_type"] == "SEQ_CLS"
    assert config["fan_in_fan_out"] is (kind == "gpt2")
    assert config["modules_to_save"] == HEADS[kind]
    # The names a user would write (peft's own for these defaults), not one full path per layer.
    assert config["target_modules"] == sorted(TARGETS[kind])
    assert config["feedforward_modules"] == FEEDFORWARD[kind]

    in_peft = peft.PeftModel.from_pretrained(_base(path), tmp_path).eval()
    torch.testing.assert_close(_logits(in_peft, batch), expected, atol=tol(expected, FORWARD_OPS), rtol=0)
    in_tunelab = ia3.load(_base(path), tmp_path).eval()
    torch.testing.assert_close(_logits(in_tunelab, batch), expected, atol=tol(expected, FORWARD_OPS), rtol=0)


def test_save_names_an_unusual_choice_exactly(tiny_bert, tmp_path):
    # Only the FFN's output.dense of layer 1: short names would pick more, so the saved names must not.
    batch = _batch(tiny_bert)
    target = "bert.encoder.layer.1.output.dense"
    model = ia3.apply(_base(tiny_bert), _cfg(["key", target], [target]), ["classifier"])
    _randomize(model)
    ia3.save(model, tmp_path, str(tiny_bert), ["classifier"])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(["key", "1.output.dense"])
    assert config["feedforward_modules"] == ["1.output.dense"]
    in_peft = peft.PeftModel.from_pretrained(_base(tiny_bert), tmp_path).eval()
    assert sum(1 for m in in_peft.modules() if hasattr(m, "ia3_l")) == 3
    expected = _logits(model, batch)
    torch.testing.assert_close(_logits(in_peft, batch), expected, atol=tol(expected, FORWARD_OPS), rtol=0)


def test_load_reads_a_peft_adapter(arch, tmp_path):
    kind, path, batch = arch
    theirs = peft.get_peft_model(_base(path), peft.IA3Config(task_type="SEQ_CLS"))  # peft's defaults
    _randomize(theirs)
    theirs.save_pretrained(tmp_path)
    ours = ia3.load(_base(path), tmp_path).eval()
    expected = _logits(theirs.eval(), batch)
    torch.testing.assert_close(_logits(ours, batch), expected, atol=tol(expected, FORWARD_OPS), rtol=0)


def test_merge_equals_unmerged(arch):
    kind, path, batch = arch
    base_names = [n for n, _ in _base(path).named_parameters()]
    model = ia3.apply(_base(path), _cfg(), HEADS[kind])
    _randomize(model)
    unmerged = _logits(model, batch)
    merged = ia3.merge(model)
    assert not any(isinstance(m, ia3.IA3Linear) for m in merged.modules())
    assert [n for n, _ in merged.named_parameters()] == base_names
    torch.testing.assert_close(_logits(merged, batch), unmerged, atol=tol(unmerged, FORWARD_OPS), rtol=0)


def test_adapters_disabled_gives_base(arch):
    kind, path, batch = arch
    base = _base(path)
    model = ia3.apply(copy.deepcopy(base), _cfg(), HEADS[kind])
    _randomize(model)
    model.get_submodule(HEADS[kind][-1]).load_state_dict(base.get_submodule(HEADS[kind][-1]).state_dict())
    if kind == "bert":
        model.bert.pooler.load_state_dict(base.bert.pooler.state_dict())
    tuned = _logits(model, batch)
    with methods.adapters_disabled(model):
        assert torch.equal(_logits(model, batch), _logits(base, batch))
    assert torch.equal(_logits(model, batch), tuned)
    assert not torch.allclose(tuned, _logits(base, batch), atol=1e-6)  # the adapters do change the outputs


def test_step_changes_only_ia3_and_head(arch):
    kind, path, batch = arch
    model = ia3.apply(_base(path), _cfg(), HEADS[kind]).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # Adam moves every parameter that has a gradient by about lr: the key vectors' gradients are tiny
    # (~1e-7, near-uniform attention in a random model), too small for an SGD step to change a 1.0.
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(**batch, labels=torch.tensor([1, 0, 1, 0])).loss.backward()
    opt.step()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == _ia3_params(model) | {
        n for n, _ in model.named_parameters() if any(n.startswith(h + ".") for h in HEADS[kind])}
    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), name
        else:
            assert p.grad is None and torch.equal(p, before[name]), name


def test_bf16_base_keeps_float32_vectors(tiny_bert):
    model = ia3.apply(_base(tiny_bert).to(torch.bfloat16), _cfg(), ["classifier"])
    layer = model.bert.encoder.layer[0].output.dense
    assert layer.ia3_l.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    out = model(**_batch(tiny_bert), labels=torch.tensor([1, 0, 1, 0]))
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert layer.ia3_l.grad is not None and layer.ia3_l.grad.dtype == torch.float32


# -- errors -------------------------------------------------------------------------

def test_unknown_target_lists_available(tiny_bert):
    with pytest.raises(TunelabError, match="method.target_modules") as e:
        ia3.apply(_base(tiny_bert), _cfg(["key", "k_proj"], []), ["classifier"])
    msg = str(e.value)
    assert "'k_proj'" in msg and "key" in msg and "dense" in msg and "query" in msg


def test_feedforward_must_be_a_target(tiny_bert):
    with pytest.raises(TunelabError, match="method.feedforward_modules") as e:
        ia3.apply(_base(tiny_bert), _cfg(["key", "value"], ["output.dense"]), ["classifier"])
    msg = str(e.value)
    assert "'output.dense'" in msg and "method.target_modules" in msg and "dense" in msg and "query" in msg


def test_unknown_architecture_needs_targets():
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=8, vocab_size=10))
    model.config.model_type = "mystery"
    with pytest.raises(TunelabError, match="method.target_modules.*method.feedforward_modules.*query"):
        ia3.apply(copy.deepcopy(model), _cfg(), ["classifier"])
    ia3.apply(model, _cfg(["key", "value"], []), ["classifier"])  # both given: no defaults needed


def test_load_rejects_other_adapters(tiny_bert, tmp_path):
    with pytest.raises(TunelabError, match="adapter_config.json"):
        ia3.load(_base(tiny_bert), tmp_path)
    peft.get_peft_model(_base(tiny_bert), peft.LoraConfig(target_modules=["query"])).save_pretrained(tmp_path)
    with pytest.raises(TunelabError, match="not an IA3 adapter.*LORA"):
        ia3.load(_base(tiny_bert), tmp_path)


# -- through the pipeline -------------------------------------------------------------

@pytest.mark.skipif("ia3" not in methods.METHODS, reason='add "ia3": ia3 to METHODS in tunelab/methods/__init__.py')
def test_pipeline_trains_and_predicts(tiny_bert, sentiment_files, tmp_path):
    run = tunelab.train(None, [f"model.path={tiny_bert}", f"data.train={sentiment_files['train']}", "method.name=ia3",
                               "train.max_steps=3", "eval.linear_probe=false", f"output_dir={tmp_path / 'run'}"])
    config = json.loads((run.dir / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3"
    preds = tunelab.load(run.dir).predict(["great film", "awful plot"])
    assert [p["label"] in ("neg", "pos") for p in preds] == [True, True]
