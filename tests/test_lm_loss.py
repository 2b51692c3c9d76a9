"""The chunked / fused cross-entropy (ops/lm_loss.py) gives the plain full-logits cross-entropy's value and
gradients, over several chunks, with a frozen or trained head, a bias, a LoRA-wrapped head and bf16 autocast;
and the sft loss built on it equals transformers' own loss of the model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FORWARD_OPS, size, tol
from torch import nn

from tunelab.ops import lm_loss

# float32 rounding, the n·eps bound: a row's log-softmax rounds its 16-term logits and a log-sum-exp over the 50
# words; a sum adds the 37 rows; a gradient sums 50 words (the hidden states') or 37 rows (the head's) of terms.
ROW_OPS, SUM_OPS, GRAD_OPS = 16 + 50, 16 + 50 + 37, 16 + 50 + 50 + 37


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(lm_loss, "CHUNK_BYTES", 4 * 50 * 7)  # vocab 50 -> 7 rows a chunk: 37 rows = 6 chunks


def _case(bias: bool, head_trains: bool, seed: int = 0):
    torch.manual_seed(seed)
    head = nn.Linear(16, 50, bias=bias)
    head.requires_grad_(head_trains)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    return head, hidden, targets


def _grads(loss, head, hidden):
    params = [hidden] + [p for p in head.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


def _row_size(logits):
    """The size of the terms of a row's NLL: log-sum-exp and target logit, each up to max |logit| + log(vocab)."""
    return 2 * size(logits) + math.log(logits.shape[-1])


def _grad_tol(scale, hidden, weight, ops=GRAD_OPS):
    """A gradient of `scale` x the NLL sums terms of scale x |p - onehot| (at most 1) times a weight (for the hidden
    states), a hidden state (for the weight) or 1 (for the bias)."""
    return tol(scale * max(size(hidden), size(weight), 1.0), ops)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("head_trains", [False, True])
def test_fused_sum_matches_the_plain_cross_entropy(bias, head_trains):
    head, hidden, targets = _case(bias, head_trains)
    want = F.cross_entropy(head(hidden), targets, reduction="sum")
    got = lm_loss.summed_nll(head, hidden, targets)
    assert lm_loss.chunk_rows(50) == 7
    torch.testing.assert_close(got, want, atol=tol(37 * _row_size(head(hidden)), SUM_OPS), rtol=0)
    for g, w in zip(_grads(3.0 * got, head, hidden), _grads(3.0 * want, head, hidden)):  # a scaled loss, as the loop's
        torch.testing.assert_close(g, w, atol=_grad_tol(3.0, hidden, head.weight), rtol=0)


def test_per_token_nll_with_gradient_matches_and_takes_any_head():
    from tunelab.config import LoraConfig
    from tunelab.methods import lora

    head, hidden, targets = _case(True, True)
    wrapped = nn.Sequential(head)
    wrapped = lora.apply(wrapped, LoraConfig(name="lora", r=2, target_modules=["0"], dropout=0.0), [])
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.normal_()
    layer = wrapped[0]
    weights = torch.rand(37)  # per-token weights: DPO's per-sequence sums differ from a plain sum
    logits = layer(hidden)
    want = F.cross_entropy(logits, targets, reduction="none")
    got = lm_loss.token_nll(layer, hidden, targets)
    torch.testing.assert_close(got, want, atol=tol(_row_size(logits), ROW_OPS + 2), rtol=0)  # + LoRA's rank-2 path
    params = [hidden] + [p for p in wrapped.parameters() if p.requires_grad]
    wants = torch.autograd.grad((want * weights).sum(), params)
    # A's and B's gradients sum terms through B or A as well: the largest gradient stands for the terms' size
    for g, w in zip(torch.autograd.grad((got * weights).sum(), params), wants):
        torch.testing.assert_close(g, w, atol=tol(wants, GRAD_OPS + 2), rtol=0)
    summed = lm_loss.summed_nll(layer, hidden, targets).item()  # not fusable: chunked
    assert summed == pytest.approx(want.sum().item(), abs=tol(37 * _row_size(logits), SUM_OPS + 2))


def test_softcapping_is_applied_on_both_paths():
    head, hidden, targets = _case(False, False)
    capped = torch.tanh(head(hidden) / 3.0) * 3.0
    want = F.cross_entropy(capped, targets, reduction="none")
    # + the division, tanh and product of the cap
    torch.testing.assert_close(lm_loss.token_nll(head, hidden, targets, 3.0), want,
                               atol=tol(_row_size(capped), ROW_OPS + 3), rtol=0)
    assert lm_loss.summed_nll(head, hidden, targets, 3.0).item() == pytest.approx(
        want.sum().item(), abs=tol(37 * _row_size(capped), SUM_OPS + 3))


def test_under_bf16_autocast_the_fused_loss_stays_close():
    head, hidden, targets = _case(False, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
        got = lm_loss.summed_nll(head, hidden, targets)
    assert got.dtype == torch.float32
    # bf16 rounds each logit on both paths, to eps_bf16 x its size apart at most; a row's NLL moves by at most
    # twice as much (|p - onehot| sums to 2 at most)
    logits = head(hidden).detach()
    assert got.item() == pytest.approx(want.item(), abs=tol(37 * 2 * size(logits), 1, torch.bfloat16))
    # The gradients sum terms |p - onehot| x |W| (the hidden states') or x |h| (the head's), each rounded to bf16
    # (on one path after rounding p - onehot, on the other before), and round the result.
    p = (logits.float().softmax(-1) - F.one_hot(targets, 50)).abs()
    terms = max(size(p @ head.weight.abs()), size(p.T @ hidden.abs()))
    for g, w in zip(_grads(got, head, hidden), _grads(want, head, hidden)):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, atol=tol(terms, 2, torch.bfloat16), rtol=0)


def test_the_sft_loss_equals_transformers_own_loss(tiny_chat_llama):
    from tunelab.config import ModelConfig
    from tunelab.tasks import causal_lm

    info = {"task": "sft", "template": "auto", "train_on_prompt": False, "truncation": "cut"}
    model, tok = causal_lm.build_model(ModelConfig(path=str(tiny_chat_llama)), info)
    rows = [{"messages": [{"role": "user", "content": f"question {i} " * (i + 1)},
                          {"role": "assistant", "content": f"answer {i} " * (3 * i + 1)}], "row": i} for i in range(4)]
    feats, _ = causal_lm.encode(rows, tok, info, 64)
    batch = causal_lm.collate(feats, tok.pad_token_id)
    ours = causal_lm.loss(model, batch, info) / causal_lm.count(batch)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    theirs = out.loss
    # a forward pass, then per token a log-softmax over the vocabulary, and the mean over the tokens
    vocab, tokens = out.logits.shape[-1], batch["input_ids"].numel()
    torch.testing.assert_close(ours, theirs, atol=tol(_row_size(out.logits), FORWARD_OPS + vocab + tokens), rtol=0)
    g_ours = torch.autograd.grad(ours, model.model.embed_tokens.weight)[0]
    g_theirs = torch.autograd.grad(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                         labels=batch["labels"]).loss, model.model.embed_tokens.weight)[0]
    # the backward retraces the forward and the softmax, and sums over the tokens
    torch.testing.assert_close(g_ours, g_theirs, atol=tol(g_theirs, 2 * FORWARD_OPS + vocab + tokens), rtol=0)
