"""LoRA: init equals the base, exact parameter counts, output parity with HF peft
(live and through a saved adapter), merge, what a training step touches, errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import FORWARD_OPS, tol
from conftest import base_classifier as _base
from conftest import text_batch as _batch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForSequenceClassification
from transformers.pytorch_utils import Conv1D

from tunelab.config import LoraConfig
from tunelab.errors import TunelabError
from tunelab.methods import lora

peft = pytest.importorskip("peft")

HEADS = {"bert": ["bert.pooler", "classifier"], "gpt2": ["score"]}
TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn"]}


def _cfg(targets, r=4, alpha=8, dropout=0.0):
    return LoraConfig(name="lora", r=r, alpha=alpha, dropout=dropout, target_modules=targets)


def _randomize(model, seed=1):
    """Non-zero A and B, and a changed head, so that comparisons test something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _lora_params(model):
    return {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def test_init_equals_base(arch):
    kind, path, batch = arch
    base = _base(path)
    model = lora.apply(copy.deepcopy(base), _cfg(None), HEADS[kind])
    assert any(isinstance(m, lora.LoRALinear) for m in model.modules())
    assert torch.equal(_logits(model, batch), _logits(base, batch))


def test_trainable_count_tiny_bert(tiny_bert):
    model = lora.apply(_base(tiny_bert), _cfg(["query", "value"], r=4), ["bert.pooler", "classifier"])
    h, layers, r, labels = 32, 2, 4, 2
    lora_count = layers * 2 * (h * r + r * h)
    head = (h * h + h) + (h * labels + labels)  # pooler dense + classifier
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == lora_count + head
    assert {n for n, p in model.named_parameters() if p.requires_grad} - _lora_params(model) == {
        "bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}


def test_trainable_count_tiny_gpt2(tiny_gpt2):
    model = lora.apply(_base(tiny_gpt2), _cfg(["c_attn"], r=4), ["score"])
    h, layers, r, labels = 32, 2, 4, 2
    lora_count = layers * (h * r + r * 3 * h)  # c_attn: 32 -> 96
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == lora_count + h * labels
    assert isinstance(model.transformer.h[0].attn.c_attn.base_layer, Conv1D)


def test_roberta_base_published_count():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    with torch.device("meta"):
        model = RobertaForSequenceClassification(RobertaConfig())
    lora.apply(model, _cfg(None, r=8, alpha=16), ["classifier"])  # default targets: query, value
    assert sum(p.numel() for n, p in model.named_parameters() if n in _lora_params(model)) == 294_912


def _peft_name(name, head):
    """Our parameter name -> peft's live one (adapter name `default`, head copies under modules_to_save)."""
    name = name.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
    for h in head:
        if name.startswith(h + "."):
            name = h + ".modules_to_save.default." + name[len(h) + 1:]
    return "base_model.model." + name


def test_parity_with_peft(arch):
    kind, path, batch = arch
    base = _base(path)
    ours = lora.apply(copy.deepcopy(base), _cfg(TARGETS[kind]), HEADS[kind])
    _randomize(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS[kind], modules_to_save=HEADS[kind]))
    state = {_peft_name(n, HEADS[kind]): p for n, p in ours.named_parameters() if p.requires_grad}
    theirs_params = dict(theirs.named_parameters())
    assert set(state) == {n for n, p in theirs_params.items() if p.requires_grad}
    with torch.no_grad():
        for name, p in state.items():
            theirs_params[name].copy_(p)
    theirs.eval()
    expected = _logits(ours, batch)
    torch.testing.assert_close(_logits(theirs, batch), expected, atol=tol(expected, FORWARD_OPS), rtol=0)


@pytest.mark.parametrize("all_linear", [False, True], ids=["targets", "all-linear"])
def test_save_loads_in_peft_and_tunelab(arch, all_linear, tmp_path):
    kind, path, batch = arch
    model = lora.apply(_base(path), _cfg("all-linear" if all_linear else TARGETS[kind]), HEADS[kind])
    _randomize(model)
    expected = _logits(model, batch)
    lora.save(model, tmp_path, str(path), HEADS[kind])

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    head_keys = {f"base_model.model.{h}.{k}" for h in HEADS[kind] for k in model.get_submodule(h).state_dict()}
    assert set(saved) == {"base_model.model." + n for n in _lora_params(model)} | head_keys
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert config["fan_in_fan_out"] is (kind == "gpt2")
    if not all_linear:
        assert sorted(config["target_modules"]) == sorted(TARGETS[kind])

    in_peft = peft.PeftModel.from_pretrained(_base(path), tmp_path).eval()
    torch.testing.assert_close(_logits(in_peft, batch), expected, atol=tol(expected, FORWARD_OPS), rtol=0)
    in_tunelab = lora.load(_base(path), tmp_path).eval()
    torch.testing.assert_close(_logits(in_tunelab, batch), expected, atol=tol(expected, FORWARD_OPS), rtol=0)


def test_load_reads_a_peft_adapter(tiny_bert, tmp_path):
    base, batch = _base(tiny_bert), _batch(tiny_bert)
    theirs = peft.get_peft_model(base, peft.LoraConfig(
        r=2, lora_alpha=6, target_modules=["query", "key", "value"], modules_to_save=["classifier"],
        task_type="SEQ_CLS"))
    _randomize(theirs)
    theirs.save_pretrained(tmp_path)
    ours = lora.load(_base(tiny_bert), tmp_path).eval()
    expected = _logits(theirs.eval(), batch)
    torch.testing.assert_close(_logits(ours, batch), expected, atol=tol(expected, FORWARD_OPS), rtol=0)


def test_merge_equals_unmerged(arch):
    kind, path, batch = arch
    base_names = [n for n, _ in _base(path).named_parameters()]
    model = lora.apply(_base(path), _cfg(TARGETS[kind]), HEADS[kind])
    _randomize(model)
    unmerged = _logits(model, batch)
    merged = lora.merge(model)
    assert not any(isinstance(m, lora.LoRALinear) for m in merged.modules())
    assert [n for n, _ in merged.named_parameters()] == base_names
    torch.testing.assert_close(_logits(merged, batch), unmerged, atol=tol(unmerged, FORWARD_OPS), rtol=0)


def test_step_changes_only_lora_and_head(arch):
    kind, path, batch = arch
    model = lora.apply(_base(path), _cfg(TARGETS[kind], dropout=0.1), HEADS[kind]).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**batch, labels=torch.tensor([1, 0, 1, 0])).loss.backward()
    opt.step()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if name in trainable:
            # A gets no gradient while B is still zero; everything else must move.
            assert ".lora_A." in name or not torch.equal(p, before[name]), name
        else:
            assert p.grad is None and torch.equal(p, before[name]), name
    assert trainable == _lora_params(model) | {
        n for n, _ in model.named_parameters() if any(n.startswith(h + ".") for h in HEADS[kind])}


def test_all_linear_wraps_body_not_head(arch):
    kind, path, _ = arch
    base = _base(path)
    head = HEADS[kind]
    linears = {n for n, m in base.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    body = {n for n in linears if not any(n == h or n.startswith(h + ".") for h in head)}
    assert body and body != linears
    model = lora.apply(base, _cfg("all-linear"), head)
    assert {n for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)} == body


def test_unknown_target_lists_available(tiny_bert):
    with pytest.raises(TunelabError, match="method.target_modules") as e:
        lora.apply(_base(tiny_bert), _cfg(["query", "q_proj"]), ["classifier"])
    assert "'q_proj'" in str(e.value) and "query" in str(e.value) and "dense" in str(e.value)


def test_unknown_architecture_needs_targets():
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=8, vocab_size=10))
    model.config.model_type = "mystery"
    with pytest.raises(TunelabError, match="method.target_modules.*query"):
        lora.apply(model, _cfg(None), ["classifier"])


def test_load_without_adapter_config(tiny_bert, tmp_path):
    with pytest.raises(TunelabError, match="adapter_config.json"):
        lora.load(_base(tiny_bert), tmp_path)


def test_load_onto_wrong_head(tiny_bert, tmp_path):
    model = lora.apply(_base(tiny_bert), _cfg(["query"]), ["classifier"])
    lora.save(model, tmp_path, str(tiny_bert), ["classifier"])
    other = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    with pytest.raises(TunelabError, match="same number of labels"):
        lora.load(other, tmp_path)


def test_bf16_base_keeps_float32_adapters(tiny_bert):
    batch = _batch(tiny_bert)
    model = lora.apply(_base(tiny_bert).to(torch.bfloat16), _cfg(["query", "value"]), ["classifier"])
    layer = model.bert.encoder.layer[0].attention.self.query
    assert layer.lora_A.weight.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    _randomize(model)
    out = model(**batch, labels=torch.tensor([1, 0, 1, 0]))
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert layer.lora_B.weight.grad is not None and layer.lora_B.weight.grad.dtype == torch.float32


def test_adapters_disabled_restores_base(arch):
    from tunelab.methods import adapters_disabled

    kind, path, batch = arch
    base = _logits(_base(path), batch)
    model = lora.apply(_base(path), _cfg(TARGETS[kind]), HEADS[kind])  # same seeded head as the base
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in _lora_params(model):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    adapted = _logits(model, batch)
    assert not torch.allclose(adapted, base)
    with adapters_disabled(model):
        assert torch.equal(_logits(model, batch), base)
    assert torch.equal(_logits(model, batch), adapted)  # re-enabled afterwards


# -- options: rsLoRA, init, bias, rank/alpha patterns, layers_to_transform ------------------------------

def _opt_cfg(kind, **kw):
    return LoraConfig(name="lora", r=4, alpha=8, dropout=0.0, target_modules=TARGETS[kind], **kw)


def _peft_opt_cfg(kind, **kw):
    # peft extends the modules_to_save list it is given: pass a copy.
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS[kind],
                           modules_to_save=list(HEADS[kind]), **kw)


def _both_ways(kind, path, batch, tmp_path, ours_kw, peft_kw, layer_cls=lora.LoRALinear, loader=None):
    """Live parity (our trained values copied into peft), then save by tunelab -> peft and tunelab load it,
    and save by peft -> tunelab loads it. Returns (ours, theirs, our adapter config)."""
    loader = loader or lora.load
    base = _base(path)
    ours = lora.apply(copy.deepcopy(base), _opt_cfg(kind, **ours_kw), HEADS[kind], layer_cls=layer_cls)
    _randomize(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), _peft_opt_cfg(kind, **peft_kw))
    mag = ".lora_magnitude_vector"  # DoRA's magnitude: a ParameterDict-like module in peft
    state = {_peft_name(n, HEADS[kind]).replace(mag, mag + ".default.weight"): p
             for n, p in ours.named_parameters() if p.requires_grad}
    theirs_params = dict(theirs.named_parameters())
    assert set(state) == {n for n, p in theirs_params.items() if p.requires_grad}
    with torch.no_grad():
        for name, p in state.items():
            theirs_params[name].copy_(p)
    theirs.eval()
    expected = _logits(ours, batch)
    torch.testing.assert_close(_logits(theirs, batch), expected, atol=tol(expected, FORWARD_OPS), rtol=0)

    lora.save(ours, tmp_path / "ours", str(path), HEADS[kind])
    in_peft = peft.PeftModel.from_pretrained(_base(path), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(in_peft, batch), expected, atol=tol(expected, FORWARD_OPS), rtol=0)
    torch.testing.assert_close(_logits(loader(_base(path), tmp_path / "ours").eval(), batch), expected,
                               atol=tol(expected, FORWARD_OPS), rtol=0)

    theirs.save_pretrained(tmp_path / "theirs")
    from_peft = loader(_base(path), tmp_path / "theirs").eval()
    torch.testing.assert_close(_logits(from_peft, batch), _logits(theirs, batch), atol=tol(expected, FORWARD_OPS),
                               rtol=0)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    return ours, theirs, config


def _wrapped(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)}


def test_rslora_scaling_and_peft_parity(arch, tmp_path):
    kind, path, batch = arch
    ours, _, config = _both_ways(kind, path, batch, tmp_path, {"use_rslora": True}, {"use_rslora": True})
    assert {m.scaling for m in _wrapped(ours).values()} == {8 / 2.0}  # alpha / sqrt(r), not alpha / r = 2
    assert config["use_rslora"] is True


def test_gaussian_init_matches_peft_statistics(tiny_bert):
    base, batch, r = _base(tiny_bert), _batch(tiny_bert), 16
    ours = lora.apply(copy.deepcopy(base), LoraConfig(name="lora", r=r, alpha=8, target_modules="all-linear",
                                                      init="gaussian"), ["classifier"]).eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=r, lora_alpha=8, target_modules=["query", "key", "value", "dense"], init_lora_weights="gaussian"))
    for model in (ours, theirs):
        a = torch.cat([p.flatten() for n, p in model.named_parameters() if ".lora_A." in n])
        b = [p for n, p in model.named_parameters() if ".lora_B." in n]
        assert a.numel() > 5000 and all(torch.count_nonzero(p) == 0 for p in b)
        assert abs(a.std().item() * r - 1) < 0.05 and abs(a.mean().item()) < 0.005  # std 1/r (peft), not 1/sqrt(r)
    default = lora.apply(copy.deepcopy(base), LoraConfig(name="lora", r=r, alpha=8, target_modules="all-linear"),
                         ["classifier"])
    a_default = torch.cat([p.flatten() for n, p in default.named_parameters() if ".lora_A." in n])
    assert a_default.std().item() * r > 1.3  # kaiming-uniform: a different init
    assert torch.equal(_logits(ours, batch), _logits(base, batch))


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/r", "rslora"])
def test_pissa_init_keeps_outputs_and_matches_peft(arch, rslora):
    kind, path, batch = arch
    base = _base(path)
    ours = lora.apply(copy.deepcopy(base), _opt_cfg(kind, init="pissa", use_rslora=rslora), HEADS[kind]).eval()
    expected = _logits(base, batch)
    torch.testing.assert_close(_logits(ours, batch), expected, atol=tol(expected, FORWARD_OPS), rtol=0)
    theirs = peft.get_peft_model(copy.deepcopy(base), _peft_opt_cfg(kind, init_lora_weights="pissa",
                                                                    use_rslora=rslora)).eval()
    theirs_modules = dict(theirs.base_model.model.named_modules())
    for name, layer in _wrapped(ours).items():
        other = theirs_modules[name]
        a, b = layer.lora_A.weight, layer.lora_B.weight
        a_ref, b_ref = other.lora_A["default"].weight, other.lora_B["default"].weight
        sign = torch.sign((a * a_ref).sum(dim=1))  # each singular pair is defined up to sign
        assert set(sign.tolist()) <= {-1.0, 1.0}
        # The same SVD of the same weight; then s / scaling, a square root and a product, in another order
        torch.testing.assert_close(a, sign[:, None] * a_ref, atol=tol(a_ref, ops=4), rtol=0)
        torch.testing.assert_close(b, b_ref * sign[None, :], atol=tol(b_ref, ops=4), rtol=0)
        # the residual W - scaling·B·A: r-term products of up to W's size, scaled and subtracted from W
        weight = base.get_submodule(name).weight
        torch.testing.assert_close(layer.base_layer.weight, other.base_layer.weight, atol=tol(weight, ops=layer.r + 2),
                                   rtol=0)
        assert not torch.allclose(layer.base_layer.weight, base.get_submodule(name).weight, atol=1e-3)


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/r", "rslora"])
def test_pissa_saved_adapter_reproduces_outputs(arch, rslora, tmp_path):
    kind, path, batch = arch
    model = lora.apply(_base(path), _opt_cfg(kind, init="pissa", use_rslora=rslora), HEADS[kind]).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # "training": move A, B and the head off their init
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    expected = _logits(model, batch)
    lora.save(model, tmp_path, str(path), HEADS[kind])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True  # converted: [A; A0], [B, -B0] on the plain base
    assert config["lora_alpha"] == pytest.approx(8 * (2 ** 0.5 if rslora else 2))
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert all(t.shape[0] == 8 for k, t in saved.items() if k.endswith("lora_A.weight"))
    for loaded in (lora.load(_base(path), tmp_path), peft.PeftModel.from_pretrained(_base(path), tmp_path)):
        torch.testing.assert_close(_logits(loaded.eval(), batch), expected, atol=tol(expected, FORWARD_OPS), rtol=0)
    torch.testing.assert_close(_logits(lora.merge(model), batch), expected, atol=tol(expected, FORWARD_OPS), rtol=0)


def test_pissa_with_dora_keeps_outputs_and_reloads(tiny_bert, tmp_path):
    from tunelab.config import DoraConfig
    from tunelab.methods import dora

    base, batch = _base(tiny_bert), _batch(tiny_bert)
    cfg = DoraConfig(name="dora", r=4, alpha=8, dropout=0.0, target_modules=["query", "value"], init="pissa")
    model = lora.apply(copy.deepcopy(base), cfg, ["classifier"], layer_cls=dora.DoRALinear).eval()
    before = _logits(base, batch)
    torch.testing.assert_close(_logits(model, batch), before, atol=tol(before, FORWARD_OPS), rtol=0)
    _randomize(model)
    expected = _logits(model, batch)
    dora.save(model, tmp_path, str(tiny_bert), ["classifier"])
    torch.testing.assert_close(_logits(dora.load(_base(tiny_bert), tmp_path).eval(), batch), expected,
                               atol=tol(expected, FORWARD_OPS), rtol=0)


def test_load_refuses_unconverted_peft_pissa(tiny_bert, tmp_path):
    theirs = peft.get_peft_model(_base(tiny_bert), peft.LoraConfig(r=2, target_modules=["query"],
                                                                   init_lora_weights="pissa"))
    theirs.save_pretrained(tmp_path)
    with pytest.raises(TunelabError, match="path_initial_model_for_weight_conversion"):
        lora.load(_base(tiny_bert), tmp_path)


def test_bias_trainable_counts_tiny_bert(tiny_bert):
    h, inter, layers, r, labels = 32, 64, 2, 4, 2
    lora_count = layers * 2 * (h * r + r * h)
    head = (h * h + h) + (h * labels + labels)
    per_block = 4 * h + h + inter + h + h  # q, k, v, attention output dense; attention LN; FFN in, out; output LN
    counts = {"none": 0, "lora_only": layers * 2 * h, "all": h + layers * per_block}  # "all": + embeddings LN
    for bias, extra in counts.items():
        model = lora.apply(_base(tiny_bert), _cfg(["query", "value"], r=r).model_copy(update={"bias": bias}),
                           ["bert.pooler", "classifier"])
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == lora_count + head + extra, bias
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "bert.encoder.layer.0.attention.self.query.base_layer.bias" in trained
    assert "bert.embeddings.LayerNorm.bias" in trained and "bert.embeddings.LayerNorm.weight" not in trained


def test_bias_lora_only_tiny_gpt2(tiny_gpt2):
    h, layers, r = 32, 2, 4
    model = lora.apply(_base(tiny_gpt2), _opt_cfg("gpt2", bias="lora_only"), ["score"])
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == (
        layers * (h * r + r * 3 * h) + h * 2 + layers * 3 * h)  # + c_attn biases (96 each)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_peft_parity_both_ways(arch, bias, tmp_path):
    kind, path, batch = arch
    ours, _, config = _both_ways(kind, path, batch, tmp_path, {"bias": bias}, {"bias": bias})
    assert config["bias"] == bias
    saved = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    wrapped = next(iter(_wrapped(ours)))
    assert f"base_model.model.{wrapped}.base_layer.bias" in saved  # peft's key for a wrapped layer's bias
    others = {k for k in saved if k.endswith(".bias") and ".base_layer." not in k
              and not any(k.startswith(f"base_model.model.{h}.") for h in HEADS[kind])}
    assert bool(others) is (bias == "all")


PATTERNS = {
    "bert": ({"value": 2, r"layer\.1\.attention\.self\.query": 6}, {"query": 3},
             {"bert.encoder.layer.0.attention.self.query": (4, 3), "bert.encoder.layer.1.attention.self.query": (6, 3),
              "bert.encoder.layer.0.attention.self.value": (2, 8), "bert.encoder.layer.1.attention.self.value": (2, 8)}),
    "gpt2": ({r"h\.1\.attn\.c_attn": 2}, {r"transformer\.h\.0\..*": 5.5},
             {"transformer.h.0.attn.c_attn": (4, 5.5), "transformer.h.1.attn.c_attn": (2, 8)}),
}


def test_rank_and_alpha_patterns(arch, tmp_path):
    kind, path, batch = arch
    ranks, alphas, want = PATTERNS[kind]
    ours, _, config = _both_ways(kind, path, batch, tmp_path, {"rank_pattern": ranks, "alpha_pattern": alphas},
                                 {"rank_pattern": ranks, "alpha_pattern": alphas})
    got = {n: (m.r, m.alpha) for n, m in _wrapped(ours).items()}
    assert got == want
    assert all(m.lora_A.weight.shape[0] == m.r and m.scaling == m.alpha / m.r for m in _wrapped(ours).values())
    assert config["rank_pattern"] and config["alpha_pattern"]
    reloaded = lora.load(_base(path), tmp_path / "ours")
    assert {n: (m.r, m.alpha) for n, m in _wrapped(reloaded).items()} == want


LAYERS = {"bert": ([1], "layer", {"bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.value"}),
          "gpt2": ([0], "h", {"transformer.h.0.attn.c_attn"})}


def test_layers_to_transform(arch, tmp_path):
    kind, path, batch = arch
    blocks, pattern, want = LAYERS[kind]
    ours, _, config = _both_ways(kind, path, batch, tmp_path, {"layers_to_transform": blocks},
                                 {"layers_to_transform": blocks})
    assert set(_wrapped(ours)) == want
    h, r = 32, 4
    out = {"bert": h, "gpt2": 3 * h}[kind]
    assert sum(p.numel() for n, p in ours.named_parameters() if n in _lora_params(ours)) == len(want) * (h * r + r * out)
    assert sorted(config["target_modules"]) == sorted(TARGETS[kind]) and config["layers_to_transform"] == blocks
    named = lora.apply(_base(path), _opt_cfg(kind, layers_to_transform=blocks, layers_pattern=pattern), HEADS[kind])
    assert set(_wrapped(named)) == want
    with pytest.raises(TunelabError, match="layers_to_transform"):
        lora.apply(_base(path), _opt_cfg(kind, layers_to_transform=[7]), HEADS[kind])


def test_dora_with_options_peft_parity(arch, tmp_path):
    from tunelab.methods import dora

    kind, path, batch = arch
    opts = {"use_rslora": True, "bias": "lora_only", "layers_to_transform": [1], "rank_pattern": {TARGETS[kind][0]: 2}}
    ours, _, config = _both_ways(kind, path, batch, tmp_path, opts, {**opts, "use_dora": True},
                                 layer_cls=dora.DoRALinear, loader=dora.load)
    assert config["use_dora"] is True and all(isinstance(m, dora.DoRALinear) for m in _wrapped(ours).values())


# -- the fused branch (LoRABranch): what nn.Dropout -> Linear -> Linear -> mul -> add would give, kept cheaper -----

def _reference(layer: lora.LoRALinear, x: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """The branch as separate modules, peft's order, with the given dropout mask."""
    xa = x.to(layer.lora_A.weight.dtype)
    if keep is not None:
        xa = xa * keep / (1 - p)
    return (layer.base_layer(x) + layer.lora_B(layer.lora_A(xa)) * layer.scaling).to(x.dtype)


def _grads(layer, x):
    return [t.grad.clone() for t in (x, layer.lora_A.weight, layer.lora_B.weight, layer.base_layer.bias)]


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.05, 0.3], ids=["p0", "sparse-drop", "mask-drop"])
def test_the_fused_branch_equals_the_modules_in_output_and_every_gradient(conv1d, dtype, p):
    torch.manual_seed(0)
    base = (Conv1D(10, 24) if conv1d else nn.Linear(24, 10)).to(dtype)
    layer = lora.LoRALinear(base, 4, 8, p).train()
    base.bias.requires_grad_(True)  # bias="all": the base output, modified in place, must still give its gradient
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 24, dtype=dtype, requires_grad=True)

    torch.manual_seed(1)
    y = layer(x)
    y.float().pow(2).sum().backward()
    got = [y.detach()] + _grads(layer, x)
    for t in (x, layer.lora_A.weight, layer.lora_B.weight, base.bias):
        t.grad = None

    torch.manual_seed(1)  # the same draw: drop_mask is the first use of the generator in forward
    keep = ~lora.dropped(lora.drop_mask(x.shape, p, x.device), x.shape) if p else None
    want_y = _reference(layer, x, keep, p)
    want_y.float().pow(2).sum().backward()
    want = [want_y.detach()] + _grads(layer, x)
    if keep is not None:
        assert 0 < int((~keep).sum()) < keep.numel()  # the mask drops some, not all
    for name, g, w in zip(["output", "x", "A", "B", "bias"], got, want):
        # both round in the adapters' float32, then the output to the base dtype once: a few roundings of the sums
        atol = tol(w.float(), 24, dtype) if name in ("output", "x", "bias") else tol(w, 24)
        torch.testing.assert_close(g.float(), w.float(), atol=atol, rtol=0, msg=f"{name} differs")


def _step_and_grads(layer, x, seed):
    torch.manual_seed(seed)
    y = layer(x)
    y.pow(2).sum().backward()
    got = [y.detach().clone(), y.grad_fn.name()] + _grads(layer, x)
    for t in (x, layer.lora_A.weight, layer.lora_B.weight, layer.base_layer.bias):
        t.grad = None
    return got


@pytest.mark.parametrize("p", [0.0, 0.05, 0.3], ids=["p0", "sparse-drop", "mask-drop"])
def test_over_a_plain_frozen_linear_base_and_adapter_are_one_node_with_the_same_results(monkeypatch, p):
    """LoRALinearStep (one node, the base's input gradient added by the matmul into the adapter's) gives what the
    base layer's own node and LoRABranch give, with the same mask; anything else takes the two-node path."""
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(48, 40), 8, 16, p).train()
    layer.base_layer.bias.requires_grad_(True)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 7, 48, requires_grad=True)
    one = _step_and_grads(layer, x, 1)
    monkeypatch.setattr(lora, "_one_step", lambda *a: False)
    two = _step_and_grads(layer, x, 1)
    assert one[1] == "LoRALinearStepBackward" and two[1] == "LoRABranchBackward"
    for name, g, w in zip(["output", "x", "A", "B", "bias"], one[:1] + one[2:], two[:1] + two[2:]):
        torch.testing.assert_close(g, w, atol=tol(w, 48), rtol=0, msg=f"{name} differs")


def test_a_hook_on_the_base_layer_still_runs():
    """Hooks on the wrapped layer (an inspection tool's, a user's) see its output: the one-node path steps aside."""
    layer = lora.LoRALinear(nn.Linear(16, 8), 4, 8, 0.0).train()
    seen = []
    layer.base_layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    y = layer(torch.randn(3, 16, requires_grad=True))
    assert seen == [torch.Size([3, 8])] and y.grad_fn.name() == "LoRABranchBackward"
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert lora.LoRALinear(nn.Linear(16, 8), 4, 8).train()(torch.randn(3, 16, requires_grad=True)).grad_fn.name() \
            == "LoRABranchBackward"
    finally:
        handle.remove()


def test_sparse_dropout_zeroes_the_shared_input_only_for_its_own_matmuls():
    """At a low rate the branch zeroes the dropped elements of x in x's own memory for its matmul and puts them back.
    Two layers reading one x (as q_proj and v_proj do), each saving it for backward: x is bit for bit what it was
    after the forward and after the backward, and every gradient is the reference's with the same two masks."""
    torch.manual_seed(0)
    layers = [lora.LoRALinear(nn.Linear(64, 32), 4, 8, 0.1).train() for _ in range(2)]
    for layer in layers:
        nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(6, 64, requires_grad=True)
    before = x.detach().clone()
    torch.manual_seed(1)
    y = layers[0](x) + layers[1](x)
    assert torch.equal(x.detach(), before)
    y.pow(2).sum().backward()
    assert torch.equal(x.detach(), before)
    got = [x.grad.clone()] + [t.grad.clone() for layer in layers for t in (layer.lora_A.weight, layer.lora_B.weight)]
    for t in [x] + [t for layer in layers for t in (layer.lora_A.weight, layer.lora_B.weight)]:
        t.grad = None
    torch.manual_seed(1)  # the same two draws, in the same order
    keeps = [~lora.dropped(lora.drop_mask(x.shape, 0.1, x.device), x.shape) for _ in layers]
    assert all(0 < int((~k).sum()) < k.numel() for k in keeps)
    (_reference(layers[0], x, keeps[0], 0.1) + _reference(layers[1], x, keeps[1], 0.1)).pow(2).sum().backward()
    want = [x.grad] + [t.grad for layer in layers for t in (layer.lora_A.weight, layer.lora_B.weight)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=tol(w, 24), rtol=0)


@pytest.mark.parametrize("p", [0.05, 0.5], ids=["sparse", "mask"])
def test_dropout_drops_each_input_with_probability_p_and_follows_the_seed(p):
    n = 1_000_000
    drop = lora.dropped(lora.drop_mask((n,), p, torch.device("cpu")), (n,))
    assert abs(int(drop.sum()) - n * p) < 6 * (n * p * (1 - p)) ** 0.5  # 6 sigma of the binomial
    # independent of position: even and odd elements (the two halves of one 32-bit draw), each tenth of the input
    # and the runs between drops look alike
    for half in drop.view(-1, 2).T:
        assert abs(int(half.sum()) - n / 2 * p) < 6 * (n / 2 * p * (1 - p)) ** 0.5
    tenths = drop.view(10, -1).sum(1).float()
    assert float((tenths - n * p / 10).abs().max()) < 6 * (n / 10 * p * (1 - p)) ** 0.5
    gaps = torch.diff(torch.nonzero(drop)[:, 0]).float()
    assert abs(float(gaps.mean()) - 1 / p) < 6 * ((1 - p) / p**2 / len(gaps)) ** 0.5  # geometric: mean 1/p
    assert abs(float((gaps == 1).float().mean()) - p) < 6 * (p * (1 - p) / len(gaps)) ** 0.5  # P(next dropped) = p
    torch.manual_seed(3)
    a = lora.dropped(lora.drop_mask((4, 1000), p, torch.device("cpu")), (4, 1000))
    torch.manual_seed(3)
    assert torch.equal(a, lora.dropped(lora.drop_mask((4, 1000), p, torch.device("cpu")), (4, 1000)))
    assert not torch.equal(a, lora.dropped(lora.drop_mask((4, 1000), p, torch.device("cpu")), (4, 1000)))


def test_sparse_drops_reach_the_last_element_and_draw_on_when_the_first_round_falls_short(monkeypatch):
    """The gaps are drawn in rounds of about p·n + 8 sigma; a short first round must be continued, not cut."""
    n, p = 5000, 0.1
    real_rand = torch.rand
    rounds = []

    def short_first_round(size, **kw):  # the first round draws only a tenth of what it asks for
        rounds.append(size)
        return real_rand(size // 10 if len(rounds) == 1 else size, **kw)

    monkeypatch.setattr(lora.torch, "rand", short_first_round)
    idx = lora.drop_mask((n,), p, torch.device("cpu"))
    assert len(rounds) >= 2
    assert torch.all(torch.diff(idx) > 0) and int(idx[0]) >= 0 and int(idx[-1]) < n
    assert abs(len(idx) - n * p) < 6 * (n * p * (1 - p)) ** 0.5
    assert int(idx[-1]) > n * 0.9  # drops continue to the end, not only in the first round's span


@pytest.mark.parametrize("p", [0.1, 0.3], ids=["sparse", "mask"])
def test_the_branch_keeps_a_one_byte_mask_not_a_float_copy_of_the_dropped_input(p):
    """What makes a LoRA step lighter than nn.Dropout -> Linear: the saved tensors are x (which the base layer
    holds anyway), the mask (at most a byte an element) and the small (tokens, r) product, not a float32 copy of
    the dropped input."""
    layer = lora.LoRALinear(nn.Linear(256, 256), 8, 16, p).train()
    x = torch.randn(64, 256, requires_grad=True)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    weights = sum(p.numel() * p.element_size() for p in layer.parameters())
    activations = sum(saved.values()) - sum(saved.get(p.untyped_storage().data_ptr(), 0) for p in layer.parameters())
    assert activations <= x.numel() * (4 + 1) + 64 * 8 * 4, (activations, weights)


def test_gradient_checkpointing_redraws_the_same_mask():
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(16, 16), 4, 8, 0.5).train()
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(8, 16, requires_grad=True)
    torch.manual_seed(5)
    layer(x).pow(2).sum().backward()
    plain = [x.grad.clone(), layer.lora_A.weight.grad.clone()]
    x.grad = layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
    torch.manual_seed(5)
    checkpoint(layer, x, use_reentrant=False).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, plain[0], atol=0, rtol=0)
    torch.testing.assert_close(layer.lora_A.weight.grad, plain[1], atol=0, rtol=0)
