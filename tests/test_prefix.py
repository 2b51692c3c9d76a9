"""Prefix tuning: published parameter count, grouped-query shapes, what trains, peft's layout both ways
(logits within 1e-5 of HF peft), the reparameterisation MLP dropped on save, decoders' batched ==
one-at-a-time, disabling, errors, and the pipeline end to end."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FORWARD_OPS, PROBS_TOL, tol
from safetensors.torch import load_file
from test_method_matrix import tiny_llama  # noqa: F401  (the matrix's tiny Llama fixture)
from test_prompt import TEXTS, _base, _batch, _logits, _randomize
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import tunelab
from tunelab import methods, models
from tunelab.config import PrefixConfig
from tunelab.errors import TunelabError
from tunelab.methods import prefix

peft = pytest.importorskip("peft")


def _cfg(n=4, projection=False, hidden=None):
    return PrefixConfig(name="prefix", num_virtual_tokens=n, prefix_projection=projection, encoder_hidden_size=hidden)


def _applied(path, cfg):
    model = _base(path)
    head = models.head_modules(model)
    prefix.apply(model, cfg, head)
    _randomize(model)
    return model.eval(), head


@pytest.fixture(params=["bert", "gpt2", "llama"])
def arch(request):
    return request.param, request.getfixturevalue({"bert": "tiny_bert", "gpt2": "tiny_gpt2", "llama": "tiny_llama"}[request.param])


# -- counts and shapes ---------------------------------------------------------------

def test_published_count_24_layers_1024_hidden():
    # Li & Liang: 20 virtual tokens on a 24-layer, 1024-wide decoder (GPT-2 medium): 2 x 24 x 1024 x 20.
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(n_layer=24, n_embd=1024, n_head=16))
    prefix.apply(model, _cfg(20), [])
    assert models.count_params(model)[0] == 983_040


def test_grouped_query_prefix_has_kv_width():
    # As peft: token_dim = num_key_value_heads * head_dim; 2 of 8 heads -> a quarter of the hidden size.
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(hidden_size=512, num_hidden_layers=3, num_attention_heads=8,
                                             num_key_value_heads=2, intermediate_size=64, vocab_size=100))
    prefix.apply(model, _cfg(10), [])
    assert models.count_params(model)[0] == 10 * 3 * 2 * 128
    assert prefix.kv_shape(model) == {"num_layers": 3, "token_dim": 128, "num_attention_heads": 2, "head_dim": 64}


def test_projection_count_is_peft_prefix_encoder(tiny_bert):
    ours = prefix.apply(_base(tiny_bert), _cfg(4, True, 16), [])
    theirs = peft.get_peft_model(_base(tiny_bert), peft.PrefixTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16))
    assert models.count_params(ours)[0] == sum(p.numel() for n, p in theirs.named_parameters()
                                               if n.startswith("prompt_encoder."))


@pytest.mark.parametrize("projection", [False, True])
def test_only_the_prefix_and_head_train(arch, projection):
    _, path = arch
    model, head = _applied(path, _cfg(4, projection, 16))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("prompt_encoder.") for n in trainable)
    assert all(n.startswith(("prompt_encoder.", *[h + "." for h in head])) for n in trainable)
    model.train()
    torch.nn.functional.cross_entropy(model(**_batch(path)).logits, torch.tensor([1, 0, 1, 0])).backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


# -- peft's layout, both ways ------------------------------------------------------

@pytest.mark.parametrize("projection", [False, True])
def test_save_loads_in_peft_and_tunelab(arch, projection, tmp_path):
    kind, path = arch
    model, head = _applied(path, _cfg(4, projection, 16))
    batch = _batch(path)
    expected = _logits(model, batch)
    prefix.save(model, tmp_path, str(path), head)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    width = 32 if kind != "llama" else 16  # the tiny Llama has 2 key/value heads of 8
    assert config["peft_type"] == "PREFIX_TUNING" and config["task_type"] == "SEQ_CLS"
    assert config["num_layers"] == 2 and config["token_dim"] == width and config["prefix_projection"] is False
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert saved["prompt_embeddings"].shape == (4, 2 * 2 * width)  # computed prefixes only: the MLP is dropped
    assert all(k == "prompt_embeddings" or k.startswith(tuple(f"base_model.{h}." for h in head)) for k in saved)

    ours = prefix.load(_base(path, seed=5), tmp_path).eval()
    torch.testing.assert_close(_logits(ours, batch), expected, atol=tol(expected, FORWARD_OPS), rtol=0)
    assert [n for n, _ in ours.prompt_encoder.named_parameters()] == ["embedding.weight"]
    in_peft = peft.PeftModel.from_pretrained(_base(path, seed=5), tmp_path).eval()
    # peft hands prefix-tuned decoders input_ids too, so it agrees on padded batches as well.
    torch.testing.assert_close(_logits(in_peft, batch), expected, atol=tol(expected, FORWARD_OPS), rtol=0)


@pytest.mark.parametrize("projection", [False, True])
def test_load_reads_a_peft_adapter(tiny_bert, projection, tmp_path):
    theirs = peft.get_peft_model(_base(tiny_bert), peft.PrefixTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=3, prefix_projection=projection, encoder_hidden_size=8))
    _randomize(theirs)
    theirs.save_pretrained(tmp_path)
    theirs.eval()
    batch = _batch(tiny_bert)
    ours = prefix.load(_base(tiny_bert, seed=7), tmp_path).eval()
    expected = _logits(theirs, batch)
    torch.testing.assert_close(_logits(ours, batch), expected, atol=tol(expected, FORWARD_OPS), rtol=0)


# -- decoders, padding, disabling ------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_batched_equals_one_at_a_time(name, request):
    path = request.getfixturevalue("tiny_gpt2" if name == "gpt2" else "tiny_llama")
    model, _ = _applied(path, _cfg(4))
    batched = _logits(model, _batch(path))
    singles = torch.cat([_logits(model, _batch(path, [t])) for t in TEXTS])
    torch.testing.assert_close(batched, singles, atol=tol(singles, FORWARD_OPS), rtol=0)


def test_disabled_is_the_base_and_comes_back(arch):
    _, path = arch
    batch = _batch(path)
    model, head = _applied(path, _cfg(4, True, 16))
    with torch.no_grad():  # the base's own head, so that only the prefix differs
        for h in head:
            for n, p in _base(path).get_submodule(h).named_parameters():
                model.get_submodule(h).get_parameter(n).copy_(p)
    expected = _logits(_base(path), batch)
    assert not torch.allclose(_logits(model, batch), expected)
    with methods.adapters_disabled(model):
        torch.testing.assert_close(_logits(model, batch), expected, atol=0, rtol=0)
    assert not torch.allclose(_logits(model, batch), expected)


# -- errors ------------------------------------------------------------------------

def test_merge_says_it_cannot(tiny_bert):
    model, _ = _applied(tiny_bert, _cfg())
    with pytest.raises(TunelabError, match="cannot be merged"):
        prefix.merge(model)


def test_load_refuses_another_base(tiny_bert, tiny_gpt2, tmp_path):
    model, head = _applied(tiny_bert, _cfg())
    prefix.save(model, tmp_path, str(tiny_bert), head)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["num_layers"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(TunelabError, match="saved for num_layers=3, but this model has 2"):
        prefix.load(_base(tiny_bert), tmp_path)


def test_load_refuses_a_prompt_adapter(tiny_bert, tmp_path):
    from tunelab.config import PromptConfig
    from tunelab.methods import prompt

    model = _base(tiny_bert)
    head = models.head_modules(model)
    prompt.save(prompt.apply(model, PromptConfig(name="prompt", num_virtual_tokens=2), head), tmp_path, str(tiny_bert), head)
    with pytest.raises(TunelabError, match="not a prefix tuning adapter config"):
        prefix.load(_base(tiny_bert), tmp_path)


# -- through the pipeline --------------------------------------------------------------

def test_pipeline_trains_and_predicts(tiny_bert, sentiment_files, tmp_path):
    run = tunelab.train(None, [f"model.path={tiny_bert}", f"data.train={sentiment_files['train']}", "method.name=prefix",
                               "method.num_virtual_tokens=5", "method.prefix_projection=true", "train.max_steps=3",
                               "eval.linear_probe=false", f"output_dir={tmp_path / 'run'}"])
    config = json.loads((run.dir / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING"
    texts = ["great film", "awful plot", "a really moving and charming story"]
    clf = tunelab.load(run.dir)
    preds = clf.predict(texts)
    assert [p["label"] in ("neg", "pos") for p in preds] == [True] * 3
    singles = [clf.predict([t])[0] for t in texts]
    assert [p["probs"]["pos"] for p in preds] == pytest.approx([p["probs"]["pos"] for p in singles], abs=PROBS_TOL)
