"""ops/packed_attention.py: a packed row's examples attend one at a time, as the block-diagonal mask would have them."""

from __future__ import annotations

import types

import pytest
import torch
from conftest import forward_ops, tol
from transformers import LlamaConfig, LlamaForCausalLM

from tunelab.ops import packed_attention
from tunelab.tasks import causal_lm

LENGTHS = [[5, 3, 4], [7, 2, 3]]  # two rows of 12: three examples each (the second row's last could be padding)


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                        attn_implementation="sdpa"))


def _batch():
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([[p for n in row for p in range(n)] for row in LENGTHS])
    labels = ids.clone()
    labels[:, 0] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = causal_lm.loss(model, batch, {})
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture
def sdpa_calls(monkeypatch):
    """The lengths of the examples packed_attention runs SDPA on (transformers' own calls are not counted)."""
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counted(q, *args, **kwargs):
        calls.append(q.shape[2])
        return real(q, *args, **kwargs)

    monkeypatch.setattr(packed_attention, "F", types.SimpleNamespace(scaled_dot_product_attention=counted))
    return calls


def test_examples_attend_one_at_a_time_with_the_masks_results(sdpa_calls, monkeypatch):
    """A padding-free step (causal_lm tags its positions) gives the loss and every gradient that transformers' own
    block-diagonal mask gives, through one causal SDPA call per example and layer (GQA: 4 heads over 2)."""
    model = _llama()
    batch = _batch()
    assert packed_attention.TAG not in batch["position_ids"].__dict__
    loss, grads = _loss_and_grads(model, batch)  # causal_lm.loss tags the positions
    assert sdpa_calls == [n for _ in range(2) for row in LENGTHS for n in row]  # forward, both layers
    assert getattr(batch["position_ids"], packed_attention.TAG) == LENGTHS

    plain = _batch()  # untagged positions: transformers' function and mask, as before
    monkeypatch.setattr(packed_attention, "mark", lambda positions: None)
    want_loss, want = _loss_and_grads(model, plain)
    assert len(sdpa_calls) == 12
    ops = forward_ops(32, 64, 2, head_dim=8, tokens=12)
    torch.testing.assert_close(loss, want_loss, atol=tol(want_loss, ops), rtol=0)
    for name, g in grads.items():
        torch.testing.assert_close(g, want[name], atol=tol(want[name], 3 * ops), rtol=0, msg=name)


def test_anything_but_a_tagged_packed_row_goes_to_transformers_own_function(sdpa_calls):
    model = _llama()
    batch = _batch()
    packed_attention.mark(batch["position_ids"])
    with torch.no_grad():
        model(input_ids=batch["input_ids"][:, :5])  # a prompt with no positions given (generation's prefill)
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"].clone())  # a copy is not tagged
        assert not sdpa_calls
        for layer in model.model.layers:  # a window shorter than an example: the mask says more than causal
            layer.self_attn.sliding_window = 4
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
        assert not sdpa_calls
        for layer in model.model.layers:  # a window no example reaches: per example again
            layer.self_attn.sliding_window = 7
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
        assert len(sdpa_calls) == 12


def test_a_row_that_does_not_start_an_example_at_0_is_not_tagged():
    positions = torch.tensor([[3, 4, 0, 1], [0, 1, 2, 0]])  # a row cut from a longer sequence
    packed_attention.mark(positions)
    assert packed_attention.TAG not in positions.__dict__
