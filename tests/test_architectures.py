"""Every supported architecture family goes through the same spine: freeze and LoRA find
their blocks, head and default targets without per-model code, train, save and predict."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PROBS_TOL, forward_ops, make_rows, tol, write_jsonl
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DistilBertConfig,
    DistilBertModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaModel,
)

import tunelab
from tunelab import models

ARCHS = {
    # name: (build(vocab_size, tokenizer) -> model, tokenizer fixture, head, blocks prefix, LoRA default targets)
    "roberta": (lambda v, t: RobertaModel(RobertaConfig(vocab_size=v, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                        intermediate_size=64, max_position_embeddings=66, pad_token_id=t.pad_token_id)),
                "tiny_bert", ["classifier"], "roberta.encoder.layer", {"query", "value"}),
    "distilbert": (lambda v, t: DistilBertModel(DistilBertConfig(vocab_size=v, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                                 max_position_embeddings=64, pad_token_id=t.pad_token_id)),
                   "tiny_bert", ["pre_classifier", "classifier"], "distilbert.transformer.layer", {"q_lin", "v_lin"}),
    "llama": (lambda v, t: LlamaForCausalLM(LlamaConfig(vocab_size=v, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                                        eos_token_id=t.eos_token_id, bos_token_id=t.eos_token_id)),
              "tiny_gpt2", ["score"], "model.layers", {"q_proj", "v_proj"}),
    "qwen2": (lambda v, t: Qwen2ForCausalLM(Qwen2Config(vocab_size=v, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                                        eos_token_id=t.eos_token_id, bos_token_id=t.eos_token_id)),
              "tiny_gpt2", ["score"], "model.layers", {"q_proj", "v_proj"}),
}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch(request, tmp_path_factory):
    build, tok_fixture, head, blocks, targets = ARCHS[request.param]
    tok = AutoTokenizer.from_pretrained(request.getfixturevalue(tok_fixture))
    path = tmp_path_factory.mktemp("arch") / request.param
    torch.manual_seed(0)
    build(len(tok), tok).save_pretrained(path)
    tok.save_pretrained(path)
    return request.param, path, head, blocks, targets


def test_anatomy_is_found(arch):
    name, path, head, blocks, targets = arch
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    assert models.head_modules(model) == head
    assert models.blocks(model)[0] == blocks and len(models.blocks(model)[1]) == 2
    from tunelab.methods import lora

    assert set(lora.default_targets(model)) == targets


@pytest.mark.parametrize("method", [["method.name=freeze", "method.freeze_layers=1"], ["method.name=lora", "method.r=4"]],
                         ids=["freeze", "lora"])
def test_trains_saves_and_predicts(arch, method, tmp_path):
    name, path, *_ = arch
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(80, seed=4))
    run = tunelab.train(None, [f"model.path={path}", f"data.train={train}", *method, "train.max_steps=3",
                               "train.batch_size=8", "eval.linear_probe=false", f"output_dir={tmp_path / 'run'}"])
    assert 0 < run.summary["trainable_params"] < run.summary["total_params"]
    texts = ["great film", "a dull and tedious plot that never ends"]
    together = tunelab.load(run.dir).predict(texts)
    alone = [tunelab.load(run.dir).predict([t])[0] for t in texts]
    # padding in a batch must not change a prediction (decoders read the last real token), up to rounding
    for a, b in zip(together, alone):
        assert a["label"] == b["label"] and a["probs"]["pos"] == pytest.approx(b["probs"]["pos"], abs=PROBS_TOL)


def test_padding_free_classification_where_the_classifier_reads_the_first_token(arch, tmp_path):
    """Encoders (classifier on the first token) train on packed rows with the loss of padded ones; decoders (they
    pool the last real token) are found out by the check and fall back to padded rows."""
    from tunelab.ops import packing
    from tunelab.tasks import classification

    name, path, *_ = arch
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    fault = classification.packing_fault(model)
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(40, seed=4))
    run = tunelab.train(None, [f"model.path={path}", f"data.train={train}", "method.name=lora", "train.max_steps=2",
                               "eval.linear_probe=false", "eval.base=false", f"output_dir={tmp_path / 'run'}"])
    record = next(r for r in map(json.loads, (run.dir / "metrics.jsonl").read_text().splitlines())
                  if r["type"] == "padding_free")
    if name in ("llama", "qwen2"):
        assert fault and "no encoder stack" in fault
        assert record == {"type": "padding_free", "on": False, "why_off": fault}
        with pytest.raises(tunelab.TunelabError, match="cannot be trained on packed rows.*no encoder stack"):
            tunelab.train(None, [f"model.path={path}", f"data.train={train}", "method.name=lora", "train.max_steps=2",
                                 "train.padding_free=true", f"output_dir={tmp_path / 'forced'}"])
        assert not (tmp_path / "forced" / "model").exists()
        return
    assert fault is None and record == {"type": "padding_free", "on": True}
    tok = AutoTokenizer.from_pretrained(path)
    rows = make_rows(12, seed=2)
    rows[0]["text"] = " ".join([rows[0]["text"]] * 4)  # a long one, so the short ones share rows
    feats, _ = classification.encode(rows, tok, {"labels": ["neg", "pos"]}, 64)
    longest = max(len(f["input_ids"]) for f in feats)
    with torch.no_grad():
        padded = classification.forward(model, classification.collate(feats, tok.pad_token_id))
        rows = classification.pack(feats, longest)
        packed = classification.forward(model, classification.collate(rows, tok.pad_token_id))
    assert len(rows) < len(feats)
    order = [i for members in packing.first_fit([len(f["input_ids"]) for f in feats], longest) for i in members]
    atol = tol(padded, forward_ops(32, 64, 2, tokens=longest))  # a forward pass, packed against padded
    torch.testing.assert_close(packed, padded[order], atol=atol, rtol=0)


@pytest.mark.parametrize("family,passes", [("albert", True), ("electra", True), ("deberta-v2", False)])
def test_padding_free_check_on_other_encoders(family, passes):
    """The check decides per model: ALBERT and ELECTRA keep packed examples apart; DeBERTa-v2's relative attention
    does not take the 4D mask, so it would fall back to padded rows."""
    from transformers import AlbertConfig, DebertaV2Config, ElectraConfig

    from tunelab.tasks import classification

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=300)
    config = {"albert": lambda: AlbertConfig(**small, embedding_size=16),
              "electra": lambda: ElectraConfig(**small, embedding_size=32),
              "deberta-v2": lambda: DebertaV2Config(**small)}[family]()
    torch.manual_seed(0)
    fault = classification.packing_fault(AutoModelForSequenceClassification.from_config(config))
    assert (fault is None) == passes, fault


def test_padding_free_check_catches_positions_numbered_wrongly(tiny_bert, monkeypatch):
    """A packed row whose examples got positions other than their own (here: RoBERTa's offset applied to BERT)
    differs from the examples alone, and the check says so."""
    from tunelab.tasks import classification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    assert classification.packing_fault(model) is None
    model.bert.embeddings.padding_idx = 1
    fault = classification.packing_fault(model)
    assert fault and "hidden states differ" in fault
