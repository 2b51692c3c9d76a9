"""DPO (task.type dpo): the loss on one batch from a real model equals TRL's formula on the same log-probs, the
reference is the adapter-disabled model (or precomputed log-probs), and training raises the chosen-vs-rejected
margin from 0."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import forward_ops, size, tol, write_jsonl

import tunelab
from tunelab import methods
from tunelab.config import LoraConfig, ModelConfig
from tunelab.tasks import dpo

INFO = {"task": "dpo", "template": "auto", "truncation": "cut", "beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0}


def _pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    good, bad = ["thanks", "please", "glad", "kind"], ["no", "go", "away", "never"]
    return [{"prompt": f"say something {i} about " + rng.choice(["cats", "rain", "tea"]),
             "chosen": " ".join(rng.sample(good, 3)), "rejected": " ".join(rng.sample(bad, 3))} for i in range(n)]


def _logp_tol(model, batch) -> float:
    """float32 rounding of summed reply log-probs, the n·eps bound: per token a forward pass of the tiny Llama and a
    log-softmax over the vocabulary, of terms up to 2 max |logit| + log(vocab), summed over a reply's tokens."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    length, vocab = logits.shape[1:]
    replies = int((batch["labels"] != -100).sum(1).max())
    ops = forward_ops(32, 64, 2, tokens=length) + vocab + replies
    return tol(replies * (2 * size(logits) + math.log(vocab)), ops)


def _batch(model_path):
    info = dict(INFO)
    model, tok = dpo.build_model(ModelConfig(path=str(model_path)), info)
    rows = [{**p, "prompt": [{"role": "user", "content": p["prompt"]}], "row": i} for i, p in enumerate(_pairs(4), 1)]
    feats, _ = dpo.encode(rows, tok, info, 128)
    return model, tok, info, feats


def test_the_loss_is_dpo_on_reply_log_probs_with_the_adapter_disabled_reference(tiny_chat_llama):
    base, tok, info, feats = _batch(tiny_chat_llama)
    batch = dpo.collate(feats, tok.pad_token_id)
    torch.manual_seed(0)
    model = methods.prepare(base, LoraConfig(name="lora", r=4), [])
    with torch.no_grad():  # a trained-looking adapter: B is zero at init, which would make policy == reference
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.eval()

    def reply_logp(m, ids, labels):  # by hand: sum of log p(token) over the reply tokens of one sequence
        logits = m(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        lp = logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        return float(sum(v for v, lab in zip(lp, labels[1:]) if lab != -100))

    with torch.no_grad():
        policy = [[reply_logp(model, f[f"{s}_ids"], f[f"{s}_labels"]) for s in ("chosen", "rejected")] for f in feats]
        with methods.adapters_disabled(model):
            ref = [[reply_logp(model, f[f"{s}_ids"], f[f"{s}_labels"]) for s in ("chosen", "rejected")] for f in feats]
        out = dpo.forward(model, batch)
        logp_tol = _logp_tol(model, batch)  # the same sums, batched and padded here, one sequence at a time by hand
        torch.testing.assert_close(out[:, :2], torch.tensor(policy), atol=logp_tol, rtol=0)
        torch.testing.assert_close(out[:, 2:4], torch.tensor(ref), atol=logp_tol, rtol=0)
        h = torch.tensor([(p[0] - r[0]) - (p[1] - r[1]) for p, r in zip(policy, ref)])
        assert h.abs().max() > 1e-3  # the adapter moved the policy away from the reference
        # DPO's formula on the log-probs just checked, the batched ones the loss uses: h's float32 roundings (4 sums
        # of up to max |sum|, 3 subtractions) through beta 0.1 and a log-sigmoid of slope under 1, over 4 pairs
        h = (out[:, 0] - out[:, 2]) - (out[:, 1] - out[:, 3])
        expected = -F.logsigmoid(0.1 * h).sum()
        atol = tol(0.1 * 4 * size(out[:, :4]), ops=4 * 4)
        assert dpo.loss(model, batch, info).item() == pytest.approx(expected.item(), abs=atol)


def test_precomputed_reference_equals_the_starting_model(tiny_chat_llama):
    model, tok, info, feats = _batch(tiny_chat_llama)
    dpo.precompute_reference(model, {"train": feats}, tok.pad_token_id, "cpu", 2)
    batch = dpo.collate(feats, tok.pad_token_id)
    with torch.no_grad():
        out = dpo.forward(model.eval(), batch)
    logp_tol = _logp_tol(model, batch)  # the reference was computed 2 pairs a batch, the policy 4
    torch.testing.assert_close(out[:, 2:4], out[:, :2], atol=logp_tol, rtol=0)  # reference == policy before training
    # h from 4 sums, through beta 0.1 and the log-sigmoid's slope 1/2 at 0
    assert dpo.metrics(out, None, info)["loss"] == pytest.approx(math.log(2), abs=0.1 * 4 * 0.5 * logp_tol)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_training_raises_the_margin(tmp_path, tiny_chat_llama, method):
    train = write_jsonl(tmp_path / "train.jsonl", _pairs(80, seed=1))
    run = tunelab.train(None, [f"model.path={tiny_chat_llama}", f"data.train={train}", "task.type=dpo",
                               f"method.name={method}", "train.lr=" + ("5e-3" if method == "lora" else "1e-3"),
                               "train.batch_size=8", "train.max_steps=20", "eval.samples=1", "eval.max_new_tokens=4",
                               "data.max_length=64", "eval.forgetting=none", f"output_dir={tmp_path / method}"])
    s = run.summary
    base, tok, _, feats = _batch(tiny_chat_llama)  # the rounding of such pairs' log-prob sums under the base model
    margin_tol = 0.1 * 4 * _logp_tol(base, dpo.collate(feats, tok.pad_token_id))  # beta x 4 sums
    assert s["base"]["validation"]["margin"] == pytest.approx(0.0, abs=margin_tol)  # the base is the reference
    assert s["eval"]["margin"] > 0.1 and s["eval"]["accuracy"] >= 0.8 and s["eval"]["loss"] < 0.69 - 0.05
    report = json.loads((run.dir / "summary.json").read_text())
    assert report["task"] == "dpo"
    assert tunelab.load(run.dir).generate(["say something about tea"], max_new_tokens=4)


@pytest.mark.parametrize("sft_method", ["lora", "full"])
def test_dpo_starts_from_an_sft_run_dir_whose_model_is_the_reference(tmp_path, tiny_chat_llama, sft_method):
    from conftest import make_chat_rows

    sft_train = write_jsonl(tmp_path / "sft.jsonl", make_chat_rows(80, seed=3))
    sft = tunelab.train(None, [f"model.path={tiny_chat_llama}", f"data.train={sft_train}", "task.type=sft",
                               f"method.name={sft_method}", "train.lr=1e-2", "train.max_steps=8", "train.batch_size=8",
                               "data.dedupe=false", "data.max_length=64", "eval.samples=0", "eval.forgetting=none",
                               f"output_dir={tmp_path / 'sft'}"])
    train = write_jsonl(tmp_path / "train.jsonl", _pairs(40, seed=1))
    run = tunelab.train(None, [f"model.path={sft.dir}", f"data.train={train}", "task.type=dpo", "method.name=lora",
                               "train.lr=5e-3", "train.batch_size=8", "train.max_steps=4", "eval.samples=0",
                               "data.max_length=64", "eval.forgetting=none", f"output_dir={tmp_path / 'dpo'}"])
    sft_model = tunelab.load(sft.dir).model
    base, tok, info, feats = _batch(tiny_chat_llama)
    batch = dpo.collate(feats, tok.pad_token_id)
    logp_tol = _logp_tol(sft_model, batch)  # the rounding of such pairs' log-prob sums under the starting model
    assert run.summary["base"]["validation"]["margin"] == pytest.approx(0.0, abs=0.1 * 4 * logp_tol)  # beta x 4 sums

    tuned = tunelab.load(run.dir).model
    with torch.no_grad():
        want = dpo.forward(sft_model, batch)[:, :2]  # the sft model's own reply log-probs
        assert (want - dpo.forward(base.eval(), batch)[:, :2]).abs().max() > 1e-2  # sft moved away from the base
        reference = dpo.forward(tuned, batch)[:, 2:4]  # the dpo run with its adapter switched off
    torch.testing.assert_close(reference, want, atol=logp_tol, rtol=0)


def test_a_run_dir_that_cannot_stand_for_a_model_says_why(tmp_path, tiny_chat_llama):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text("model: {path: x}\n")
    (tmp_path / "half" / "labels.json").write_text("{}")
    train = write_jsonl(tmp_path / "train.jsonl", _pairs(20))
    with pytest.raises(tunelab.TunelabError, match="is a tunelab run directory, and its model could not be rebuilt"):
        tunelab.train(None, [f"model.path={tmp_path / 'half'}", f"data.train={train}", "task.type=dpo",
                             "method.name=lora", f"output_dir={tmp_path / 'out'}"])


def test_chunked_reply_log_probs_equal_the_trl_pinned_sequence_logps(tiny_chat_llama):
    """dpo._logps (lm_loss, no batch-wide logits) against preference.sequence_logps on the full logits, the
    function tests/test_preference_loss.py pins to TRL: values and gradients."""
    from tunelab.ops import preference

    model, tok, info, feats = _batch(tiny_chat_llama)
    batch = dpo.collate(feats, tok.pad_token_id)
    ours, n = dpo._logps(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref, ref_n = preference.sequence_logps(logits, batch["labels"])
    torch.testing.assert_close(ours, ref.view(2, -1).T, atol=_logp_tol(model, batch), rtol=0)
    assert torch.equal(n, ref_n.view(2, -1).T)
    w = model.model.embed_tokens.weight
    want = torch.autograd.grad(ref.sum(), w)[0]
    # the backward retraces the forward and the log-softmax, and sums over the batch's tokens
    length, vocab = logits.shape[1:]
    ops = 2 * forward_ops(32, 64, 2, tokens=length) + vocab + batch["input_ids"].numel()
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), w)[0], want, atol=tol(want, ops), rtol=0)
