"""LoRA: init equals the base, exact parameter counts, output parity with HF peft
(live and through a saved adapter), merge, what a training step touches, errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from tunelab.config import LoraConfig
from tunelab.errors import TunelabError
from tunelab.methods import lora

peft = pytest.importorskip("peft")

TEXTS = ["the film was great and fun", "awful boring plot", "a really moving story", "dull"]
HEADS = {"bert": ["bert.pooler", "classifier"], "gpt2": ["score"]}
TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn"]}


def _base(path):
    torch.manual_seed(0)  # the head is freshly initialised on every load
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    if model.config.model_type == "gpt2":
        model.config.pad_token_id = model.config.eos_token_id
    return model.eval()


def _batch(path):
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return dict(tok(TEXTS, padding=True, return_tensors="pt"))


@pytest.fixture(params=["bert", "gpt2"])
def arch(request, tiny_bert, tiny_gpt2):
    """(model_type, model dir, inputs) for each tiny model."""
    path = tiny_bert if request.param == "bert" else tiny_gpt2
    return request.param, path, _batch(path)


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
    torch.testing.assert_close(_logits(theirs, batch), _logits(ours, batch), atol=1e-6, rtol=0)


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
    torch.testing.assert_close(_logits(in_peft, batch), expected, atol=1e-6, rtol=0)
    in_tunelab = lora.load(_base(path), tmp_path).eval()
    torch.testing.assert_close(_logits(in_tunelab, batch), expected, atol=1e-6, rtol=0)


def test_load_reads_a_peft_adapter(tiny_bert, tmp_path):
    base, batch = _base(tiny_bert), _batch(tiny_bert)
    theirs = peft.get_peft_model(base, peft.LoraConfig(
        r=2, lora_alpha=6, target_modules=["query", "key", "value"], modules_to_save=["classifier"],
        task_type="SEQ_CLS"))
    _randomize(theirs)
    theirs.save_pretrained(tmp_path)
    ours = lora.load(_base(tiny_bert), tmp_path).eval()
    torch.testing.assert_close(_logits(ours, batch), _logits(theirs.eval(), batch), atol=1e-6, rtol=0)


def test_merge_equals_unmerged(arch):
    kind, path, batch = arch
    base_names = [n for n, _ in _base(path).named_parameters()]
    model = lora.apply(_base(path), _cfg(TARGETS[kind]), HEADS[kind])
    _randomize(model)
    unmerged = _logits(model, batch)
    merged = lora.merge(model)
    assert not any(isinstance(m, lora.LoRALinear) for m in merged.modules())
    assert [n for n, _ in merged.named_parameters()] == base_names
    torch.testing.assert_close(_logits(merged, batch), unmerged, atol=1e-5, rtol=0)


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
