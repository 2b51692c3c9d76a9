"""The float32 side of a method over a bf16 frozen base (`model.dtype: bfloat16`).

A method whose `TRAINABLE_DTYPE` is "float32" trains only tensors of its own (LoRA's A and B, IA3's vectors,
adapters, virtual-token encoders: each created float32 in its own file) and the task head. Those stay float32
whatever the base's dtype, so their gradients and AdamW state are float32 too and small updates are not lost to
bf16 rounding (its relative step is 2^-8). The head is a module of the base model, loaded in the base's dtype, so
`float32_head` upcasts it here: its parameters become float32, its floating inputs are cast up on the way in and
its outputs back to the base's dtype on the way out, as LoRA's layers hand on their sum. `base_dtype_head` undoes
it, so a merged model is a plain model of one dtype.

A head module that shares a parameter with the rest of the model (an output embedding tied to the input one) is
left as it is: upcasting the shared tensor would upcast the embedding too. The tasks never name one as their head.

A method whose `TRAINABLE_DTYPE` is "base" trains tensors of the base itself (full fine-tuning, frozen layers,
BitFit's biases), in the dtype the base was loaded in.
"""

from __future__ import annotations

import torch
from torch import nn

MARK = "tunelab_base_dtype"  # set on a head module upcast here: the dtype it had


def _up(module: nn.Module, args: tuple, kwargs: dict):
    return tuple(_cast(a, torch.float32) for a in args), {k: _cast(v, torch.float32) for k, v in kwargs.items()}


def _down(module: nn.Module, args: tuple, kwargs: dict, output):
    return _cast(output, getattr(module, MARK))


def _cast(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_cast(v, dtype) for v in value)
    return value


def _shares_outside(model: nn.Module, name: str) -> bool:
    inside = {id(p) for p in model.get_submodule(name).parameters()}
    return any(id(p) in inside for n, p in model.named_parameters(remove_duplicate=False)
               if not n.startswith(name + "."))


def float32_head(model: nn.Module, head: list[str]) -> nn.Module:
    """Make the head modules train in float32 over a base of lower precision (no-op over a float32 base)."""
    for name in head:
        module = model.get_submodule(name)
        dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
        if not dtypes or dtypes == {torch.float32} or hasattr(module, MARK) or _shares_outside(model, name):
            continue
        setattr(module, MARK, next(iter(dtypes)) if len(dtypes) == 1 else torch.promote_types(*dtypes))
        module.float()
        # Module-level functions, found again by identity in base_dtype_head (also on a deep copy of the module).
        module.register_forward_pre_hook(_up, with_kwargs=True)
        module.register_forward_hook(_down, with_kwargs=True)
    return model


def base_dtype_head(model: nn.Module) -> nn.Module:
    """Round every upcast head module back to the dtype it had and drop its casts."""
    for module in model.modules():
        dtype = module.__dict__.pop(MARK, None)
        if dtype is None:
            continue
        for hooks, kw, fn in ((module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs, _up),
                              (module._forward_hooks, module._forward_hooks_with_kwargs, _down)):
            for key in [k for k, h in hooks.items() if h is fn]:
                del hooks[key]
                kw.pop(key, None)
        module.to(dtype)
    return model
