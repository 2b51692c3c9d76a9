"""Bottleneck adapters: exact trainable counts by hand, init equals the base, what one optimizer step touches,
save -> load on a fresh base, adapters_disabled, the merge error, RoBERTa/DistilBERT/Llama/Qwen2, the pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import base_classifier as _base
from conftest import make_rows, tol, write_jsonl
from conftest import text_batch as _batch
from safetensors.torch import load_file
from test_architectures import ARCHS
from transformers import AutoTokenizer
from transformers.pytorch_utils import Conv1D

import tunelab
from tunelab import methods
from tunelab.config import AdapterConfig, TrainConfig
from tunelab.errors import TunelabError
from tunelab.methods import adapter
from tunelab.training import optim

HEADS = {"bert": ["bert.pooler", "classifier"], "gpt2": ["score"]}
# (attention output, feed-forward output) per block, written out here rather than read from adapter.SUBLAYERS.
SUBLAYERS = {
    "bert": ("bert.encoder.layer.{}.attention.output.dense", "bert.encoder.layer.{}.output.dense"),
    "gpt2": ("transformer.h.{}.attn.c_proj", "transformer.h.{}.mlp.c_proj"),
    "roberta": ("roberta.encoder.layer.{}.attention.output.dense", "roberta.encoder.layer.{}.output.dense"),
    "distilbert": ("distilbert.transformer.layer.{}.attention.out_lin", "distilbert.transformer.layer.{}.ffn.lin2"),
    "llama": ("model.layers.{}.self_attn.o_proj", "model.layers.{}.mlp.down_proj"),
    "qwen2": ("model.layers.{}.self_attn.o_proj", "model.layers.{}.mlp.down_proj"),
}


def _cfg(placement="pfeiffer", reduction_factor=16, bottleneck_size=None, non_linearity="relu"):
    return AdapterConfig(name="adapter", placement=placement, reduction_factor=reduction_factor,
                         bottleneck_size=bottleneck_size, non_linearity=non_linearity)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _in_head(name, head):
    return any(name.startswith(h + ".") for h in head)


def _wrapped(model):
    return {n for n, m in model.named_modules() if isinstance(m, adapter.BottleneckAdapter)}


def _expected_paths(kind, placement, n_blocks=2):
    attn, ffn = SUBLAYERS[kind]
    return {p.format(i) for i in range(n_blocks) for p in ([attn, ffn] if placement == "houlsby" else [ffn])}


def _perturb_adapters(model, seed=1):
    """Move the adapters off their identity init (the head is left alone)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapter_down." in n or ".adapter_up." in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("placement,kw,width", [("pfeiffer", {}, 2), ("houlsby", {}, 2), ("pfeiffer", {"reduction_factor": 4}, 8),
                                                ("houlsby", {"bottleneck_size": 5}, 5), ("houlsby", {"bottleneck_size": 5, "reduction_factor": 2}, 5)])
def test_trainable_counts(arch, placement, kw, width):
    kind, path, _ = arch
    model = adapter.apply(_base(path), _cfg(placement, **kw), HEADS[kind])
    h, layers, labels = 32, 2, 2
    per_adapter = (h * width + width) + (width * h + h)  # down and up, with biases
    n_adapters = layers * (2 if placement == "houlsby" else 1)
    head = {"bert": (h * h + h) + (h * labels + labels), "gpt2": h * labels}[kind]  # pooler + classifier / score
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n_adapters * per_adapter + head
    assert _wrapped(model) == _expected_paths(kind, placement)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".adapter_down." in n or ".adapter_up." in n or _in_head(n, HEADS[kind]) for n in trainable)
    if kind == "gpt2":
        assert isinstance(model.transformer.h[0].mlp.c_proj.base_layer, Conv1D)


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
def test_init_equals_base(arch, placement):
    kind, path, batch = arch
    model = adapter.apply(_base(path), _cfg(placement, bottleneck_size=4), HEADS[kind]).eval()
    layer = model.get_submodule(SUBLAYERS[kind][1].format(0))
    assert layer.adapter_down.weight.abs().sum() > 0 and layer.adapter_up.weight.abs().sum() == 0
    assert torch.equal(_logits(model, batch), _logits(_base(path), batch))


def test_step_changes_only_adapters_and_head(arch):
    kind, path, batch = arch
    head = HEADS[kind]
    model = adapter.apply(_base(path), _cfg("houlsby", bottleneck_size=4), head).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt, _, _ = optim.build(model, head, TrainConfig(lr=1e-2, weight_decay=0.1), total_steps=1)
    model(**batch, labels=torch.tensor([1, 0, 1, 0])).loss.backward()
    opt.step()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in before if ".adapter_down." in n or ".adapter_up." in n or _in_head(n, head)}
    for name, p in model.named_parameters():
        if name in trainable:
            # While up is zero, down gets no gradient: its weight moves by weight decay only, its bias not at all.
            assert name.endswith("adapter_down.bias") or not torch.equal(p, before[name]), name
        else:
            assert p.grad is None and torch.equal(p, before[name]), name


def test_save_load_round_trip(arch, tmp_path):
    kind, path, batch = arch
    head = HEADS[kind]
    model = adapter.apply(_base(path), _cfg("houlsby", non_linearity="gelu"), head)
    _perturb_adapters(model)
    with torch.no_grad():
        for h in head:
            for p in model.get_submodule(h).parameters():
                p.mul_(1.5)  # the head must come back too
    expected = _logits(model, batch)
    adapter.save(model, tmp_path, str(path), head)

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    own = {f"{p}.adapter_{ud}.{wb}" for p in _expected_paths(kind, "houlsby") for ud in ("down", "up") for wb in ("weight", "bias")}
    head_keys = {f"{h}.{k}" for h in head for k in model.get_submodule(h).state_dict()}
    assert set(saved) == own | head_keys
    info = json.loads((tmp_path / "tunelab_adapter.json").read_text())
    assert info == {"method": "adapter", "config": {"name": "adapter", "placement": "houlsby", "reduction_factor": 16,
                                                    "bottleneck_size": None, "non_linearity": "gelu"},
                    "base_model_name_or_path": str(path), "head": head, "format_version": 1}

    loaded = adapter.load(_base(path, seed=5), tmp_path).eval()
    torch.testing.assert_close(_logits(loaded, batch), expected, atol=0, rtol=0)
    assert isinstance(loaded.get_submodule(SUBLAYERS[kind][0].format(0)).act, torch.nn.GELU)


def test_adapters_disabled_is_the_base(arch):
    kind, path, batch = arch
    base = _logits(_base(path), batch)
    model = adapter.apply(_base(path), _cfg("houlsby"), HEADS[kind]).eval()
    _perturb_adapters(model)
    assert not torch.allclose(_logits(model, batch), base)
    with methods.adapters_disabled(model):
        assert torch.equal(_logits(model, batch), base)
    assert not torch.allclose(_logits(model, batch), base)


def test_merge_is_an_error(tiny_bert):
    model = adapter.apply(_base(tiny_bert), _cfg(), HEADS["bert"])
    with pytest.raises(TunelabError) as e:
        adapter.merge(model)
    assert str(e.value) == ("bottleneck adapters add layers and cannot be merged into the base weights; export the adapter "
                            "or use lora/ia3 for a mergeable method")


def test_bf16_base_keeps_float32_adapters(tiny_bert):
    batch = _batch(tiny_bert)
    base = _logits(_base(tiny_bert).to(torch.bfloat16), batch)
    model = adapter.apply(_base(tiny_bert).to(torch.bfloat16), _cfg("houlsby"), HEADS["bert"])
    layer = model.bert.encoder.layer[0].output.dense
    assert layer.adapter_up.weight.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    assert torch.equal(_logits(model, batch), base)  # zero update survives the round trip through float32
    out = model(**batch, labels=torch.tensor([1, 0, 1, 0]))
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert layer.adapter_up.weight.grad is not None and layer.adapter_up.weight.grad.dtype == torch.float32


def test_unknown_architecture_is_an_error(tiny_bert):
    model = _base(tiny_bert)
    model.config.model_type = "mystery"
    with pytest.raises(TunelabError, match=r"model type 'mystery'.*method\.name=lora"):
        adapter.apply(model, _cfg(), HEADS["bert"])


def test_reduction_factor_larger_than_hidden(tiny_bert):
    with pytest.raises(TunelabError, match=r"method\.reduction_factor=64 .*hidden size \(32\)"):
        adapter.apply(_base(tiny_bert), _cfg(reduction_factor=64), HEADS["bert"])


def test_load_from_missing_dir_names_it(tiny_bert, tmp_path):
    with pytest.raises(TunelabError, match=r"nowhere.*tunelab_adapter\.json.*method\.name=adapter"):
        adapter.load(_base(tiny_bert), tmp_path / "nowhere")


def test_save_without_adapters(tiny_bert, tmp_path):
    with pytest.raises(TunelabError, match="no bottleneck adapters"):
        adapter.save(_base(tiny_bert), tmp_path, str(tiny_bert), HEADS["bert"])


# -- other architectures (built as in test_architectures.py) -------------------------

@pytest.fixture(scope="module", params=sorted(ARCHS))
def other_arch(request, tmp_path_factory):
    build, tok_fixture, head, *_ = ARCHS[request.param]
    tok_dir = request.getfixturevalue(tok_fixture)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    path = tmp_path_factory.mktemp("adapter-arch") / request.param
    torch.manual_seed(0)
    build(len(tok), tok).save_pretrained(path)
    tok.save_pretrained(path)
    return request.param, path, head, _batch(path)


def test_other_architectures(other_arch, tmp_path):
    kind, path, head, batch = other_arch
    base = _logits(_base(path), batch)
    model = adapter.apply(_base(path), _cfg("houlsby", bottleneck_size=4), head).eval()
    assert _wrapped(model) == _expected_paths(kind, "houlsby")
    assert torch.equal(_logits(model, batch), base)
    _perturb_adapters(model)
    expected = _logits(model, batch)
    assert not torch.allclose(expected, base)
    with methods.adapters_disabled(model):
        assert torch.equal(_logits(model, batch), base)
    adapter.save(model, tmp_path, str(path), head)
    torch.testing.assert_close(_logits(adapter.load(_base(path), tmp_path).eval(), batch), expected, atol=0, rtol=0)


# -- the pipeline ------------------------------------------------------------------

def test_through_the_pipeline(tiny_bert, tmp_path):
    if "adapter" not in methods.METHODS:
        pytest.skip("adapter is not in METHODS (src/tunelab/methods/__init__.py): add `\"adapter\": adapter`")
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(80, seed=4))
    run = tunelab.train(None, [f"model.path={tiny_bert}", f"data.train={train}", "method.name=adapter", "method.placement=houlsby",
                               "method.bottleneck_size=4", "train.max_steps=3", "train.batch_size=8", "eval.linear_probe=false",
                               f"output_dir={tmp_path / 'run'}"])
    assert run.summary["trainable_params"] == 4 * (32 * 4 + 4 + 4 * 32 + 32) + (32 * 32 + 32) + (32 * 2 + 2)
    assert json.loads((run.dir / "adapter" / "tunelab_adapter.json").read_text())["config"]["placement"] == "houlsby"
    preds = tunelab.load(run.dir).predict(["great film", "a dull and tedious plot"])
    assert [p["label"] in ("neg", "pos") for p in preds] == [True, True]
    # a float32 softmax: an exp, a sum over the labels and a division, each rounding
    assert all(sum(p["probs"].values()) == pytest.approx(1.0, abs=tol(1.0, len(p["probs"]) + 4)) for p in preds)
