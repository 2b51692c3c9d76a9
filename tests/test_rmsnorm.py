"""ops.rmsnorm and ops.recompute: the norms' outputs are not kept by autograd, gradients are unchanged."""

import copy

import pytest
import torch
from conftest import in_use
from transformers import LlamaConfig, LlamaForCausalLM

from tunelab import config, methods
from tunelab.ops import gated, recompute, rmsnorm
from tunelab.training import heap


def _llama(hidden=32, intermediate=64, layers=2):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=100))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_llama_trains_to_the_same_gradients_bit_for_bit(method):
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(2))

    def grads(fuse: bool) -> dict:
        model = _llama()
        if fuse:
            assert (gated.fuse_gated_mlps(model), rmsnorm.fuse_rms_norms(model)) == (2, 4)
        cfg = config.LoraConfig(name="lora", r=4, dropout=0.05, target_modules="all-linear") if method == "lora" \
            else config.FullConfig(name="full")
        model = methods.prepare(model, cfg, ["lm_head"]).train()
        torch.manual_seed(1)  # the same dropout draws
        model(ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    want, got = grads(False), grads(True)
    assert set(got) == set(want)
    for name, g in got.items():  # the same ops on the same numbers, recomputed: equal, not close
        assert torch.equal(g, want[name]), name


@pytest.mark.skipif(heap._glibc() is None, reason="counts glibc's malloc")
def test_a_block_keeps_neither_norm_output_nor_the_mlp_product():
    tokens, hidden, intermediate = 256, 512, 2048
    model = _llama(hidden, intermediate, layers=1)
    block = model.model.layers[0]
    x = torch.randn(1, tokens, hidden, requires_grad=True)
    position = model.model.rotary_emb(x, torch.arange(tokens)[None])

    def kept() -> int:
        before = in_use()
        out = block(x, position_embeddings=position)
        return in_use() - before - out.nbytes

    plain = kept()
    gated.fuse_gated_mlps(model)
    mlp_only = kept()
    assert rmsnorm.fuse_rms_norms(model) == 2
    fused = kept()
    narrow, wide = tokens * hidden * 4, tokens * intermediate * 4
    assert plain - mlp_only >= 2 * wide - narrow, (plain, mlp_only)  # silu(gate) and the product
    assert mlp_only - fused >= 2 * narrow - narrow / 2, (mlp_only, fused)  # the two norms' outputs


def test_a_deep_copy_runs_its_own_weights():
    """(GRPO's reference model is a deep copy of the model being trained)"""
    model = _llama()
    gated.fuse_gated_mlps(model)
    rmsnorm.fuse_rms_norms(model)
    ids = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(0))
    reference = copy.deepcopy(model)
    with torch.no_grad():
        want = reference(ids).logits
        for p in model.parameters():
            p.add_(0.5)
        assert torch.equal(reference(ids).logits, want)
        assert not torch.equal(model(ids).logits, want)


def test_under_someone_elses_hooks_a_recipe_is_not_kept():
    t = torch.randn(4, 8, requires_grad=True)
    y = t * 2
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: kept.append(s) or s, lambda s: s):
        with recompute.recomputed(y, lambda a: a * 2, t) as on:
            y.sin()
    assert not on and any(s is y for s in kept)
    with recompute.recomputed(y, lambda a: a * 2, t) as on:
        z = y.sin()
    assert on
    z.sum().backward()
    torch.testing.assert_close(t.grad, 2 * torch.cos(2 * t.detach()), rtol=0, atol=0)


def test_a_norm_written_otherwise_is_left_alone():
    model = _llama()
    norm = model.model.layers[0].input_layernorm
    norm.variance_epsilon = 1e-6
    type_ = type("OffsetRMSNorm", (type(norm),), {"forward": lambda self, x: type(norm).forward(self, x) + 1})
    norm.__class__ = type_
    assert rmsnorm.fuse_rms_norms(model) == 3
    assert "forward" not in norm.__dict__


@pytest.mark.skipif(heap._glibc() is None, reason="counts glibc's malloc")
def test_a_forward_without_a_backward_lets_go_of_its_graph():
    """A node that saves its own output (attention, rsqrt) must not hold it by a Python reference: that is a cycle
    through C++ that only a backward breaks (each such forward kept its whole graph, 12 MB here)."""
    model = _llama(256, 688).train()
    gated.fuse_gated_mlps(model)
    rmsnorm.fuse_rms_norms(model)
    ids = torch.randint(5, 90, (2, 256), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids)
    before = in_use()
    for _ in range(3):
        model(input_ids=ids)
    assert in_use() - before < 2**20, (in_use() - before) / 2**20


def test_every_reader_of_a_recomputed_tensor_shares_one_recomputation_per_backward():
    """q, k and v read one norm output: one recomputation serves the three, in each backward of a retained graph."""
    t = torch.randn(4, 8, requires_grad=True)
    weights = [torch.randn(8, 8, requires_grad=True) for _ in range(3)]
    calls = []

    def again(a):
        calls.append(1)
        return a * 2

    y = t * 2
    with recompute.recomputed(y, again, t) as on:
        z = sum((y @ w).sin().sum() for w in weights)  # each matmul saves y for its weight's gradient
    assert on
    for n in (1, 2):
        for w in weights:
            w.grad = None
        z.backward(retain_graph=True)
        assert len(calls) == n
        for w in weights:
            want = (2 * t.detach()).T @ torch.cos(2 * t.detach() @ w.detach())
            torch.testing.assert_close(w.grad, want, rtol=0, atol=0)
