"""Every supported architecture family goes through the same spine: freeze and LoRA find
their blocks, head and default targets without per-model code, train, save and predict."""

from __future__ import annotations

import pytest
import torch
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DistilBertConfig, DistilBertModel,
                          LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, RobertaConfig, RobertaModel)

import tunelab
from tunelab import models
from conftest import make_rows, write_jsonl

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
    # padding in a batch must not change a prediction (decoders read the last real token)
    for a, b in zip(together, alone):
        assert a["label"] == b["label"] and a["probs"]["pos"] == pytest.approx(b["probs"]["pos"], abs=1e-5)
