"""The chunked / fused cross-entropy (training/lm_loss.py) gives the plain full-logits cross-entropy's value and
gradients, over several chunks, with a frozen or trained head, a bias, a LoRA-wrapped head and bf16 autocast;
and the sft loss built on it equals transformers' own loss of the model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tunelab.training import lm_loss


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


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("head_trains", [False, True])
def test_fused_sum_matches_the_plain_cross_entropy(bias, head_trains):
    head, hidden, targets = _case(bias, head_trains)
    want = F.cross_entropy(head(hidden), targets, reduction="sum")
    got = lm_loss.summed_nll(head, hidden, targets)
    assert lm_loss.chunk_rows(50) == 7
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)
    for g, w in zip(_grads(3.0 * got, head, hidden), _grads(3.0 * want, head, hidden)):  # a scaled loss, as the loop's
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


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
    want = F.cross_entropy(layer(hidden), targets, reduction="none")
    got = lm_loss.token_nll(layer, hidden, targets)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)
    params = [hidden] + [p for p in wrapped.parameters() if p.requires_grad]
    for g, w in zip(torch.autograd.grad((got * weights).sum(), params), torch.autograd.grad((want * weights).sum(), params)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert lm_loss.summed_nll(layer, hidden, targets).item() == pytest.approx(want.sum().item(), rel=1e-6)  # not fusable: chunked


def test_softcapping_is_applied_on_both_paths():
    head, hidden, targets = _case(False, False)
    capped = torch.tanh(head(hidden) / 3.0) * 3.0
    want = F.cross_entropy(capped, targets, reduction="none")
    torch.testing.assert_close(lm_loss.token_nll(head, hidden, targets, 3.0), want, atol=1e-5, rtol=1e-6)
    assert lm_loss.summed_nll(head, hidden, targets, 3.0).item() == pytest.approx(want.sum().item(), rel=1e-6)


def test_under_bf16_autocast_the_fused_loss_stays_close():
    head, hidden, targets = _case(False, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
        got = lm_loss.summed_nll(head, hidden, targets)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=2e-2)
    for g, w in zip(_grads(got, head, hidden), _grads(want, head, hidden)):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, atol=5e-2, rtol=5e-2)


def test_the_sft_loss_equals_transformers_own_loss(tiny_chat_llama):
    from tunelab.config import ModelConfig
    from tunelab.tasks import causal_lm

    info = {"task": "sft", "template": "auto", "train_on_prompt": False, "truncation": "cut"}
    model, tok = causal_lm.build_model(ModelConfig(path=str(tiny_chat_llama)), info)
    rows = [{"messages": [{"role": "user", "content": f"question {i} " * (i + 1)},
                          {"role": "assistant", "content": f"answer {i} " * (3 * i + 1)}], "row": i} for i in range(4)]
    feats, _ = causal_lm.encode(rows, tok, info, 64)
    batch = causal_lm.collate(feats, tok.pad_token_id)
    ours = causal_lm.loss(model, batch) / causal_lm.count(batch)
    theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    g_ours = torch.autograd.grad(ours, model.model.embed_tokens.weight)[0]
    g_theirs = torch.autograd.grad(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                         labels=batch["labels"]).loss, model.model.embed_tokens.weight)[0]
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-6, rtol=1e-4)
