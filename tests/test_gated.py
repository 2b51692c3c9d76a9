"""ops.gated: silu(gate) * up as one autograd node keeping gate and up, and the MLPs pointed at it."""

import pytest
import torch
from conftest import in_use, tol
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from tunelab.ops import gated
from tunelab.training import heap


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_equals_the_two_ops_in_output_and_both_gradients(dtype):
    torch.manual_seed(0)
    gate = torch.randn(4, 7, 24, dtype=dtype, requires_grad=True)
    up = torch.randn(4, 7, 24, dtype=dtype, requires_grad=True)
    out = gated.silu_mul(gate, up)
    out.float().pow(2).sum().backward()
    got = [out.detach(), gate.grad.clone(), up.grad.clone()]
    gate.grad = up.grad = None
    want_out = nn.functional.silu(gate) * up
    want_out.float().pow(2).sum().backward()
    want = [want_out.detach(), gate.grad, up.grad]
    assert torch.equal(got[0], want[0])  # the same two ops, in the same order
    for g, w in zip(got[1:], want[1:]):  # silu recomputed, the products grouped alike: a few roundings apart
        torch.testing.assert_close(g.float(), w.float(), atol=tol(w.float(), 4, dtype), rtol=0)


def test_it_keeps_two_tensors_for_backward_not_three():
    gate = torch.randn(8, 32, requires_grad=True)
    up = torch.randn(8, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        gated.silu_mul(gate, up)
    assert len(saved) == 2
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        nn.functional.silu(gate) * up
    assert len(saved) == 3


def _tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def test_a_llama_trains_to_the_same_gradients_with_its_mlps_fused():
    model, ids = _tiny_llama(), torch.randint(0, 100, (2, 9))
    model(ids, labels=ids).loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    assert gated.fuse_gated_mlps(model) == 2
    assert gated.fuse_gated_mlps(model) == 0  # already fused
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], atol=tol(want[name], 64), rtol=0, msg=name)


def test_an_mlp_that_computes_something_else_is_left_alone():
    class Swapped(nn.Module):  # the same children, another formula: silu(up) * gate
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = nn.Linear(8, 16), nn.Linear(8, 16)
            self.down_proj, self.act_fn = nn.Linear(16, 8), nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))

    model = nn.Sequential(Swapped())
    assert gated.fuse_gated_mlps(model) == 0
    assert "forward" not in model[0].__dict__


@pytest.mark.skipif(heap._glibc() is None, reason="counts glibc's malloc")
def test_the_fused_mlp_keeps_gate_and_up_and_nothing_else_of_its_width():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=4096, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)
    mlp = LlamaForCausalLM(config).model.layers[0].mlp
    x = torch.randn(256, 32, requires_grad=True)
    wide = 256 * 4096 * 4  # one (tokens, intermediate) float32 tensor

    def kept() -> int:
        before = in_use()
        out = mlp(x)
        return in_use() - before - out.nbytes

    plain = kept()
    assert gated.fuse_gated_mlps(mlp) == 1
    fused = kept()
    assert plain >= 4 * wide  # gate, silu(gate), up and the product
    assert 2 * wide <= fused < 2.5 * wide, (fused / wide, plain / wide)


def test_under_someone_elses_saved_tensor_hooks_the_product_is_theirs():
    """(non-reentrant checkpointing frees what it packs: the fused MLP must not keep gate and up alive past it)"""
    model = _tiny_llama()
    gated.fuse_gated_mlps(model)
    wide = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: wide.append(t.shape == (5, 64)) or t, lambda t: t):
        model.model.layers[0].mlp(torch.randn(5, 32, requires_grad=True))
    assert sum(wide) == 3  # gate and up (SiluMul) and the product (down_proj), all through their hooks


def test_lora_on_every_projection_trains_to_the_same_gradients_fused():
    from tunelab import config, methods

    def grads(fuse: bool) -> dict:
        model = _tiny_llama()
        if fuse:  # as pipeline.load does: on the loaded model, before the method wraps its layers
            assert gated.fuse_gated_mlps(model) == 2
        model = methods.prepare(model, config.LoraConfig(name="lora", r=4, dropout=0.05,
                                                         target_modules="all-linear"), ["lm_head"]).train()
        torch.manual_seed(1)  # the same dropout draws, in the same order
        ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(2))
        model(ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    want, got = grads(False), grads(True)
    assert set(got) == set(want) and any("down_proj" in n for n in got)
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], atol=tol(want[name], 64), rtol=0, msg=name)
