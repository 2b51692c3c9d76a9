"""The gated MLP's `silu(gate) * up` as one autograd node that keeps two tensors for backward instead of three.

Llama-family MLPs compute `down_proj(act_fn(gate_proj(x)) * up_proj(x))`. Through autograd, SiLU keeps its input
(gate) and the product keeps both of its factors (silu(gate) and up): three (tokens, intermediate) tensors a layer,
the largest activations of the model (intermediate is 2.7-4x hidden). `silu_mul` keeps gate and up and recomputes
silu(gate) in the backward (one elementwise pass). down_proj keeps its input, the product, a fourth such tensor
(for its weight's gradient, or its adapter's): the fused forward has autograd keep gate and up in its place and
recompute the product when the backward needs it. Two (tokens, intermediate) tensors a layer instead of four: on
the 1B bench model, 16 layers x 1,024 tokens x 8,192 float32, 1 GiB less at the peak of every step, for LoRA,
QLoRA and full fine-tuning alike, for two more elementwise passes in each layer's backward.

`fuse_gated_mlps(model)` points each such MLP's forward at `silu_mul`, only where the module is the plain pattern
(gate_proj, up_proj, down_proj, a SiLU act_fn) and its own forward gives the same output as the fused one on a
random input, checked once per MLP class: an MLP written differently is left as it is.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from . import recompute


class SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_up = F.silu(gate).mul_(grad)
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return grad_gate, grad_up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; as one autograd node (gate and up saved) when a gradient is wanted."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad) and gate.shape == up.shape \
            and gate.dtype == up.dtype:
        return SiluMul.apply(gate, up)
    return F.silu(gate) * up


def _product(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate).mul_(up)  # as SiluMul.forward makes it, bit for bit


def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    product = silu_mul(gate, up)
    if not product.requires_grad:  # inference (generation, serving): nothing is saved, so nothing to arrange
        return self.down_proj(product)
    # down_proj (plain, LoRA, QLoRA, DoRA...) keeps its input for the weight's or the adapter's gradient: autograd
    # keeps gate and up in its place (SiluMul keeps them anyway) and makes the product again when the backward
    # reads it (ops/recompute.py)
    with recompute.recomputed(product, _product, gate, up):
        return self.down_proj(product)


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def _candidate(module: nn.Module) -> bool:
    return (all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj"))
            and _is_silu(getattr(module, "act_fn", None)) and "forward" not in module.__dict__)


@torch.no_grad()
def _same_as_fused(module: nn.Module) -> bool:
    weight = next((p for p in module.parameters() if p.is_floating_point()), None)
    if weight is None:
        return False
    generator = torch.Generator().manual_seed(0)
    gate = module.gate_proj
    width = getattr(gate, "in_features", None) or getattr(getattr(gate, "weight", None), "shape", [None])[-1]
    if not isinstance(width, int):
        return False
    x = torch.randn(2, 3, width, generator=generator).to(device=weight.device, dtype=weight.dtype)
    try:
        return torch.equal(type(module).forward(module, x), _fused_forward(module, x))
    except Exception:  # noqa: BLE001 - any MLP this cannot run is simply not fused
        return False


def fuse_gated_mlps(model: nn.Module) -> int:
    """Point every plain gated SiLU MLP of `model` at `silu_mul`; returns how many were."""
    checked: dict[type, bool] = {}
    fused = 0
    for module in model.modules():
        if not _candidate(module):
            continue
        kind = type(module)
        if kind not in checked:
            checked[kind] = _same_as_fused(module)
        if checked[kind]:
            module.forward = types.MethodType(_fused_forward, module)
            fused += 1
    return fused
