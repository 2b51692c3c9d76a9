"""BitFit: exact trainable counts (by hand, and BERT-base's published 102,912), what one optimizer step
touches, save -> load on a fresh base, the no-bias error, load errors, and a run through the pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import base_classifier as _base
from conftest import make_rows, tol, write_jsonl
from conftest import text_batch as _batch
from safetensors.torch import load_file
from transformers import (
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    Qwen2Config,
    Qwen2ForSequenceClassification,
)

import tunelab
from tunelab import methods
from tunelab.config import AdapterConfig, BitFitConfig, TrainConfig
from tunelab.errors import TunelabError
from tunelab.methods import adapter, bitfit
from tunelab.training import optim

HEADS = {"bert": ["bert.pooler", "classifier"], "gpt2": ["score"]}
CFG = BitFitConfig(name="bitfit")


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _in_head(name, head):
    return any(name.startswith(h + ".") for h in head)


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_trainable_count_tiny_bert(tiny_bert):
    model = bitfit.apply(_base(tiny_bert), CFG, HEADS["bert"])
    h, ff, layers, labels = 32, 64, 2, 2
    # per block: q, k, v, attention-output biases, intermediate, output, and both LayerNorm biases
    block = 4 * h + ff + h + 2 * h
    body = layers * block + h  # + the embedding LayerNorm bias
    head = (h * h + h) + (h * labels + labels)  # pooler dense + classifier, in full
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == body + head == 608 + 1122
    body_names = _trainable(model) - {n for n in _trainable(model) if _in_head(n, HEADS["bert"])}
    assert all(n.endswith(".bias") for n in body_names)
    assert "bert.encoder.layer.0.attention.output.LayerNorm.bias" in body_names
    assert "bert.embeddings.LayerNorm.bias" in body_names
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith(".weight") and not _in_head(n, HEADS["bert"]))


def test_trainable_count_tiny_gpt2(tiny_gpt2):
    model = bitfit.apply(_base(tiny_gpt2), CFG, HEADS["gpt2"])
    h, layers, labels = 32, 2, 2
    # per block: ln_1, c_attn (q, k, v), attn c_proj, ln_2, mlp c_fc (4h), mlp c_proj; then ln_f
    body = layers * (h + 3 * h + h + h + 4 * h + h) + h
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == body + h * labels == 736 + 64


def test_bert_base_published_count():
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        model = BertModel(BertConfig())
    # The bare body has no head; its pooler's bias is one of the 102,912 (with LayerNorm biases).
    bitfit.apply(model, CFG, [])
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 102_912


def test_apply_leaves_outputs_unchanged(arch):
    _, path, batch = arch
    expected = _logits(_base(path), batch)
    assert torch.equal(_logits(bitfit.apply(_base(path), CFG, HEADS[arch[0]]), batch), expected)


def test_step_changes_only_biases_and_head(arch):
    kind, path, batch = arch
    head = HEADS[kind]
    model = bitfit.apply(_base(path), CFG, head).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt, _, _ = optim.build(model, head, TrainConfig(lr=1e-2, weight_decay=0.1), total_steps=1)
    model(**batch, labels=torch.tensor([1, 0, 1, 0])).loss.backward()
    opt.step()
    trainable = _trainable(model)
    assert trainable == {n for n in before if n.endswith(".bias") or _in_head(n, head)}
    for name, p in model.named_parameters():
        if name in trainable:
            # Softmax ignores a shift shared by all scores, so BERT's key bias has (near) zero gradient.
            assert name.endswith("attention.self.key.bias") or not torch.equal(p, before[name]), name
        else:
            assert p.grad is None and torch.equal(p, before[name]), name


def _perturb(model, seed=1):
    """Move every trainable tensor (biases and head) so that a round trip tests something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_save_load_round_trip(arch, tmp_path):
    kind, path, batch = arch
    head = HEADS[kind]
    model = bitfit.apply(_base(path), CFG, head)
    _perturb(model)
    expected = _logits(model, batch)
    bitfit.save(model, tmp_path, str(path), head)

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    body_biases = {n for n, _ in model.named_parameters() if n.endswith(".bias") and not _in_head(n, head)}
    head_keys = {f"{h}.{k}" for h in head for k in model.get_submodule(h).state_dict()}
    assert set(saved) == body_biases | head_keys
    info = json.loads((tmp_path / "tunelab_adapter.json").read_text())
    assert info == {"method": "bitfit", "config": {"name": "bitfit"}, "base_model_name_or_path": str(path),
                    "head": head, "format_version": 1}

    fresh = _base(path, seed=5)
    assert not torch.allclose(_logits(fresh, batch), expected)
    loaded = bitfit.load(fresh, tmp_path).eval()
    torch.testing.assert_close(_logits(loaded, batch), expected, atol=0, rtol=0)
    assert _trainable(loaded) == _trainable(model)  # loaded ready to train on


def test_merge_returns_the_model_unchanged(tiny_bert):
    batch = _batch(tiny_bert)
    model = bitfit.apply(_base(tiny_bert), CFG, HEADS["bert"])
    _perturb(model)
    expected, names = _logits(model, batch), [n for n, _ in model.named_parameters()]
    merged = bitfit.merge(model)
    assert merged is model and [n for n, _ in merged.named_parameters()] == names
    assert torch.equal(_logits(merged, batch), expected)


def _tiny(config_cls, model_cls):
    torch.manual_seed(0)
    return model_cls(config_cls(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=64, max_position_embeddings=64, pad_token_id=0, num_labels=2))


def test_body_without_biases_is_an_error():
    model = _tiny(LlamaConfig, LlamaForSequenceClassification)
    with pytest.raises(TunelabError, match=r"no biases.*method\.name=lora or method\.name=ia3"):
        bitfit.apply(model, CFG, ["score"])


def test_qwen2_trains_its_attention_biases():
    # Qwen2 keeps biases on q, k and v only (k, v: 2 key-value heads of width 8).
    model = bitfit.apply(_tiny(Qwen2Config, Qwen2ForSequenceClassification), CFG, ["score"])
    assert {n.split(".", 3)[-1] for n in _trainable(model) if not n.startswith("score.")} == {
        "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * (32 + 16 + 16) + 32 * 2


def test_load_from_missing_dir_names_it(tiny_bert, tmp_path):
    with pytest.raises(TunelabError, match=r"nowhere.*tunelab_adapter\.json.*method\.name=bitfit"):
        bitfit.load(_base(tiny_bert), tmp_path / "nowhere")


def test_load_of_another_methods_dir(tiny_bert, tmp_path):
    model = adapter.apply(_base(tiny_bert), AdapterConfig(name="adapter"), ["classifier"])
    adapter.save(model, tmp_path, str(tiny_bert), ["classifier"])
    with pytest.raises(TunelabError, match="'adapter' adapter, not a bitfit one"):
        bitfit.load(_base(tiny_bert), tmp_path)


def test_load_onto_wrong_head(tiny_bert, tmp_path):
    bitfit.save(bitfit.apply(_base(tiny_bert), CFG, ["classifier"]), tmp_path, str(tiny_bert), ["classifier"])
    other = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    with pytest.raises(TunelabError, match="same number of labels"):
        bitfit.load(other, tmp_path)


def test_through_the_pipeline(tiny_bert, tmp_path):
    if "bitfit" not in methods.METHODS:
        pytest.skip("bitfit is not in METHODS (src/tunelab/methods/__init__.py): add `\"bitfit\": bitfit`")
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(80, seed=4))
    run = tunelab.train(None, [f"model.path={tiny_bert}", f"data.train={train}", "method.name=bitfit", "train.max_steps=3",
                               "train.batch_size=8", "eval.linear_probe=false", f"output_dir={tmp_path / 'run'}"])
    assert run.summary["trainable_params"] == 608 + 1122  # as counted by hand above
    assert (run.dir / "adapter" / "adapter_model.safetensors").is_file()
    preds = tunelab.load(run.dir).predict(["great film", "a dull and tedious plot"])
    assert [p["label"] in ("neg", "pos") for p in preds] == [True, True]
    # a float32 softmax: an exp, a sum over the labels and a division, each rounding
    assert all(sum(p["probs"].values()) == pytest.approx(1.0, abs=tol(1.0, len(p["probs"]) + 4)) for p in preds)
