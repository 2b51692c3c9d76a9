"""Prompt tuning and P-tuning: published parameter counts, what trains, peft's layout both ways (logits
within 1e-5 of HF peft), text init as peft does it, decoders' batched == one-at-a-time, disabling,
errors, and the pipeline end to end."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FORWARD_OPS, PROBS_TOL, tol
from safetensors.torch import load_file
from test_method_matrix import tiny_llama  # noqa: F401  (the matrix's tiny Llama fixture)
from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import tunelab
from tunelab import methods, models
from tunelab.config import PromptConfig, PTuningConfig
from tunelab.errors import TunelabError
from tunelab.methods import prompt, ptuning

peft = pytest.importorskip("peft")

TEXTS = ["the film was great and fun", "awful boring plot", "a really moving story", "dull"]


def _base(path, seed=0):
    torch.manual_seed(seed)  # the head is freshly initialised on every load
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model.eval()


def _tok(path):
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def _batch(path, texts=TEXTS):
    return dict(_tok(path)(texts, padding=True, return_tensors="pt", return_token_type_ids=False))


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


METHODS = {
    "prompt": (prompt, lambda: PromptConfig(name="prompt", num_virtual_tokens=4)),
    "ptuning": (ptuning, lambda: PTuningConfig(name="ptuning", num_virtual_tokens=4, encoder_hidden_size=16)),
    "ptuning-lstm": (ptuning, lambda: PTuningConfig(name="ptuning", num_virtual_tokens=4, encoder="lstm",
                                                    encoder_hidden_size=16)),
}


@pytest.fixture(params=sorted(METHODS))
def method(request):
    mod, cfg = METHODS[request.param]
    return request.param, mod, cfg()


def _applied(path, mod, cfg):
    model = _base(path)
    head = models.head_modules(model)
    mod.apply(model, cfg, head)
    _randomize(model)
    return model.eval(), head


# -- counts and what trains ----------------------------------------------------------

def test_published_count_prompt_5_tokens_4096_wide():
    # Lester et al.: a prompt of 5 tokens on a 4096-wide model (T5-XXL / 7B-class) is 5 x 4096 parameters.
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                             num_attention_heads=32, vocab_size=32000))
    prompt.apply(model, PromptConfig(name="prompt", num_virtual_tokens=5), [])
    assert models.count_params(model)[0] == 20_480


def test_ptuning_count_is_peft_prompt_encoder(tiny_bert):
    for kind, cfg in (("MLP", METHODS["ptuning"][1]()), ("LSTM", METHODS["ptuning-lstm"][1]())):
        ours = ptuning.apply(_base(tiny_bert), cfg, [])
        theirs = peft.get_peft_model(_base(tiny_bert), peft.PromptEncoderConfig(
            task_type="SEQ_CLS", num_virtual_tokens=4, encoder_hidden_size=16, encoder_reparameterization_type=kind))
        n_theirs = sum(p.numel() for n, p in theirs.named_parameters() if n.startswith("prompt_encoder."))
        assert models.count_params(ours)[0] == n_theirs


def test_only_the_prompt_and_head_train(tiny_bert, method):
    _, mod, cfg = method
    model, head = _applied(tiny_bert, mod, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("prompt_encoder.", *[h + "." for h in head])) for n in trainable)
    assert any(n.startswith("prompt_encoder.") for n in trainable)
    model.train()
    batch = _batch(tiny_bert)
    torch.nn.functional.cross_entropy(model(**batch).logits, torch.tensor([1, 0, 1, 0])).backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


def test_random_init_is_normal_like_peft(tiny_bert):
    torch.manual_seed(0)
    model = prompt.apply(_base(tiny_bert), PromptConfig(name="prompt", num_virtual_tokens=200), [])
    w = model.prompt_encoder.embedding.weight
    assert w.dtype == torch.float32 and abs(w.std().item() - 1) < 0.05


def test_text_init_matches_peft(tiny_bert):
    text = "great boring film"  # 3 words + [CLS] [SEP] = 5 ids, repeated to 7 and cut
    ours = prompt.apply(_base(tiny_bert), PromptConfig(name="prompt", num_virtual_tokens=7, init="text",
                                                       init_text=text), [])
    theirs = peft.get_peft_model(_base(tiny_bert), peft.PromptTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=7, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(tiny_bert)))
    torch.testing.assert_close(ours.prompt_encoder.embedding.weight,
                               theirs.prompt_encoder["default"].embedding.weight, atol=0, rtol=0)
    ids = _tok(tiny_bert)(text)["input_ids"]
    words = ours.get_input_embeddings().weight
    torch.testing.assert_close(ours.prompt_encoder.embedding.weight, words[(ids * 2)[:7]], atol=0, rtol=0)


# -- peft's layout, both ways ------------------------------------------------------

def test_save_loads_in_peft_and_tunelab(tiny_bert, method, tmp_path):
    name, mod, cfg = method
    model, head = _applied(tiny_bert, mod, cfg)
    batch = _batch(tiny_bert)
    expected = _logits(model, batch)
    mod.save(model, tmp_path, str(tiny_bert), head)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == ("PROMPT_TUNING" if name == "prompt" else "P_TUNING")
    assert config["task_type"] == "SEQ_CLS" and config["num_virtual_tokens"] == 4 and config["token_dim"] == 32
    assert config["num_layers"] == 2 and config["num_attention_heads"] == 4
    if name != "prompt":
        assert config["encoder_reparameterization_type"] == ("LSTM" if "lstm" in name else "MLP")
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert saved["prompt_embeddings"].shape == (4, 32)
    assert set(saved) == {"prompt_embeddings", "base_model.bert.pooler.dense.weight",
                          "base_model.bert.pooler.dense.bias", "base_model.classifier.weight",
                          "base_model.classifier.bias"}

    in_peft = peft.PeftModel.from_pretrained(_base(tiny_bert, seed=5), tmp_path).eval()
    torch.testing.assert_close(_logits(in_peft, batch), expected, atol=tol(expected, FORWARD_OPS), rtol=0)
    ours = mod.load(_base(tiny_bert, seed=5), tmp_path).eval()
    torch.testing.assert_close(_logits(ours, batch), expected, atol=tol(expected, FORWARD_OPS), rtol=0)
    assert not any(n.startswith("prompt_encoder.mlp") for n, _ in ours.named_parameters())  # encoder dropped


@pytest.mark.parametrize("kind", ["prompt", "ptuning"])
def test_load_reads_a_peft_adapter(tiny_bert, kind, tmp_path):
    config = (peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3) if kind == "prompt" else
              peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=3, encoder_hidden_size=8))
    theirs = peft.get_peft_model(_base(tiny_bert), config)
    _randomize(theirs)
    theirs.save_pretrained(tmp_path)
    theirs.eval()
    batch = _batch(tiny_bert)
    ours = methods.get(kind).load(_base(tiny_bert, seed=7), tmp_path).eval()
    expected = _logits(theirs, batch)
    torch.testing.assert_close(_logits(ours, batch), expected, atol=tol(expected, FORWARD_OPS), rtol=0)


def test_gpt2_unpadded_input_matches_peft(tiny_gpt2, tmp_path):
    # peft gives the decoder inputs_embeds only, so it classifies from the last position: right for an unpadded input.
    model, head = _applied(tiny_gpt2, prompt, PromptConfig(name="prompt", num_virtual_tokens=4))
    prompt.save(model, tmp_path, str(tiny_gpt2), head)
    in_peft = peft.PeftModel.from_pretrained(_base(tiny_gpt2, seed=5), tmp_path).eval()
    one = _batch(tiny_gpt2, TEXTS[:1])
    expected = _logits(model, one)
    torch.testing.assert_close(_logits(in_peft, one), expected, atol=tol(expected, FORWARD_OPS), rtol=0)
    # The documented difference: on a right-padded batch peft reads a pad position for the shorter rows.
    batch = _batch(tiny_gpt2)
    padded = batch["attention_mask"][:, -1] == 0
    assert padded.any()
    ours, theirs = _logits(model, batch), _logits(in_peft, batch)
    torch.testing.assert_close(theirs[~padded], ours[~padded], atol=tol(ours, FORWARD_OPS), rtol=0)
    assert not torch.allclose(theirs[padded], ours[padded], atol=1e-3)


# -- decoders, padding, disabling ------------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_equals_one_at_a_time(arch, method, request):
    path = request.getfixturevalue("tiny_gpt2" if arch == "gpt2" else "tiny_llama")
    _, mod, cfg = method
    model, _ = _applied(path, mod, cfg)
    batched = _logits(model, _batch(path))
    singles = torch.cat([_logits(model, _batch(path, [t])) for t in TEXTS])
    torch.testing.assert_close(batched, singles, atol=tol(singles, FORWARD_OPS), rtol=0)


def test_disabled_is_the_base_and_comes_back(tiny_gpt2, method):
    _, mod, cfg = method
    base = _base(tiny_gpt2)
    batch = _batch(tiny_gpt2)
    model, _ = _applied(tiny_gpt2, mod, cfg)
    with torch.no_grad():  # the same head as the base, so that only the prompt differs
        model.score.weight.copy_(base.score.weight)
    expected = _logits(base, batch)
    assert not torch.allclose(_logits(model, batch), expected)
    with methods.adapters_disabled(model):
        torch.testing.assert_close(_logits(model, batch), expected, atol=0, rtol=0)
    assert not torch.allclose(_logits(model, batch), expected)


def test_hidden_states_hold_the_real_tokens_only(tiny_gpt2):
    model, _ = _applied(tiny_gpt2, prompt, PromptConfig(name="prompt", num_virtual_tokens=4))
    batch = _batch(tiny_gpt2)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    assert all(h.shape[1] == batch["input_ids"].shape[1] for h in out.hidden_states)


# -- errors ------------------------------------------------------------------------

def test_text_init_needs_text(tiny_bert):
    with pytest.raises(TunelabError, match="method.init_text"):
        prompt.apply(_base(tiny_bert), PromptConfig(name="prompt", init="text"), [])


def test_merge_says_it_cannot(tiny_bert, method):
    _, mod, cfg = method
    model, _ = _applied(tiny_bert, mod, cfg)
    with pytest.raises(TunelabError, match="cannot be merged"):
        mod.merge(model)


def test_applying_twice_is_refused(tiny_bert):
    model = prompt.apply(_base(tiny_bert), PromptConfig(name="prompt"), [])
    with pytest.raises(TunelabError, match="already has virtual tokens"):
        ptuning.apply(model, PTuningConfig(name="ptuning"), [])


def test_load_refuses_other_adapters(tiny_bert, tmp_path):
    with pytest.raises(TunelabError, match="is not a prompt tuning adapter directory"):
        prompt.load(_base(tiny_bert), tmp_path)
    model, head = _applied(tiny_bert, ptuning, PTuningConfig(name="ptuning", num_virtual_tokens=2))
    ptuning.save(model, tmp_path, str(tiny_bert), head)
    with pytest.raises(TunelabError, match="peft_type 'P_TUNING', not PROMPT_TUNING"):
        prompt.load(_base(tiny_bert), tmp_path)


def test_load_refuses_another_base(tiny_bert, tiny_gpt2, tmp_path):
    model, head = _applied(tiny_bert, prompt, PromptConfig(name="prompt", num_virtual_tokens=2))
    prompt.save(model, tmp_path, str(tiny_bert), head)
    with pytest.raises(TunelabError, match="does not fit this model"):
        prompt.load(_base(tiny_gpt2), tmp_path)


# -- through the pipeline --------------------------------------------------------------

@pytest.mark.parametrize("name", ["prompt", "ptuning"])
def test_pipeline_trains_and_predicts(tiny_bert, sentiment_files, tmp_path, name):
    run = tunelab.train(None, [f"model.path={tiny_bert}", f"data.train={sentiment_files['train']}", f"method.name={name}",
                               "method.num_virtual_tokens=5", "train.max_steps=3", "eval.linear_probe=false",
                               f"output_dir={tmp_path / 'run'}"])
    config = json.loads((run.dir / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == {"prompt": "PROMPT_TUNING", "ptuning": "P_TUNING"}[name]
    texts = ["great film", "awful plot", "a really moving and charming story"]
    clf = tunelab.load(run.dir)
    preds = clf.predict(texts)
    assert [p["label"] in ("neg", "pos") for p in preds] == [True] * 3
    singles = [clf.predict([t])[0] for t in texts]
    assert [p["probs"]["pos"] for p in preds] == pytest.approx([p["probs"]["pos"] for p in singles], abs=PROBS_TOL)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_virtual_tokens_leave_room_in_the_position_table(method, tiny_bert, tmp_path):
    """tiny BERT has 64 positions: 10 virtual tokens + texts cut at 54 must fit, not crash."""
    from conftest import make_rows, write_jsonl

    import tunelab

    rows = [{"text": " ".join([r["text"]] * 20), "label": r["label"]} for r in make_rows(40, seed=8)]
    train = write_jsonl(tmp_path / "long.jsonl", rows)
    run = tunelab.train(None, [f"model.path={tiny_bert}", f"data.train={train}", f"method.name={method}",
                               "method.num_virtual_tokens=10", "data.max_length=512", "train.max_steps=2",
                               "eval.linear_probe=false", f"output_dir={tmp_path / 'run'}"])
    assert tunelab.load(run.dir).predict([rows[0]["text"]])[0]["label"] in ("neg", "pos")
