"""Bottleneck adapters: `h + up(act(down(h)))` on the output h of a frozen sublayer.

Placement (config `placement`):
- houlsby (Houlsby et al. 2019): after the attention output projection and after the feed-forward output;
- pfeiffer (Pfeiffer et al. 2020): after the feed-forward output only.

The adapter wraps that output linear layer itself, so it acts on the projection's output before dropout, the
residual add and the LayerNorm, which is where Houlsby placed it. Per block (found by `models.blocks`):

    bert, roberta, xlm-roberta, electra, camembert   attention.output.dense, output.dense
    distilbert                                       attention.out_lin,      ffn.lin2
    gpt2                                             attn.c_proj,            mlp.c_proj
    llama, mistral, qwen2, qwen3, gemma, gemma2, phi3  self_attn.o_proj,     mlp.down_proj

Width = bottleneck_size, or hidden size // reduction_factor. The up projection starts at zero, so the model
starts out equal to the base; the down projection is drawn from N(0, 0.01^2) as in Houlsby et al.
Trainable: the adapters (weights and biases) and the head. Adapters cannot be merged: they add layers.

Saved in tunelab's adapter layout (see `bitfit.py`): adapter_model.safetensors holds each adapter's
`<layer path>.adapter_down.{weight,bias}` and `<layer path>.adapter_up.{weight,bias}` plus the head's tensors;
tunelab_adapter.json holds {"method": "adapter", "config": {placement, reduction_factor, bottleneck_size,
non_linearity}, "base_model_name_or_path", "head", "format_version": 1}.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import AdapterConfig
from ..errors import TunelabError
from ..models import blocks
from .layout import check_head, read_artifact, restore, save_artifact
from .targets import is_linear

ARTIFACT = "adapter"  # tensors only, tunelab's layout; the base model is loaded from model.path
CHANGES_BASE = False  # adds bottleneck layers beside frozen weights
MERGEABLE = False  # merge(): added layers
SWITCHABLE = True  # its wrapped sublayers swap in and out
VIRTUAL_TOKENS = None
QUANTIZES_BASE = False
TRAINABLE_DTYPE = "float32"  # the bottleneck layers and the head float32 over a bf16 base
DEFAULT_LR = 1e-3  # new small modules
ACTIVATION_SHARE = {"llama": 0.93, "gpt2": 0.80, "bert": 0.67}  # of full fine-tuning's saved activations

# model_type -> (attention output projection, feed-forward output projection), as paths inside one block.
SUBLAYERS = {
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "camembert"], ("attention.output.dense", "output.dense")),
    "distilbert": ("attention.out_lin", "ffn.lin2"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"], ("self_attn.o_proj", "mlp.down_proj")),
}
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckAdapter(nn.Module):
    """`h + adapter_up(act(adapter_down(h)))` with `h = base_layer(x)`, the base layer frozen."""

    def __init__(self, base_layer: nn.Module, width: int, non_linearity: str):
        super().__init__()
        weight, hidden = base_layer.weight, _out_features(base_layer)
        # Adapters stay in float32 under a bf16 base (as LoRA does): small updates survive rounding.
        dtype = torch.promote_types(weight.dtype, torch.float32)
        self.base_layer = base_layer.requires_grad_(False)
        self.adapter_down = nn.Linear(hidden, width, device=weight.device, dtype=dtype)
        self.act = ACTIVATIONS[non_linearity]()
        self.adapter_up = nn.Linear(width, hidden, device=weight.device, dtype=dtype)
        self.adapter_disabled = False
        nn.init.normal_(self.adapter_down.weight, std=1e-2)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)  # zero update: the wrapped model starts out equal to the base
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        if self.adapter_disabled:
            return h
        return (h + self.adapter_up(self.act(self.adapter_down(h.to(self.adapter_down.weight.dtype))))).to(h.dtype)


def _out_features(layer: nn.Module) -> int:
    return layer.weight.shape[0] if isinstance(layer, nn.Linear) else layer.weight.shape[1]  # Conv1D stores (in, out)


def _sublayers(model: nn.Module, placement: str) -> list[str]:
    """Full paths of the output projections to wrap, block by block."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUBLAYERS:
        raise TunelabError(
            f"Bottleneck adapters do not know where the attention and feed-forward outputs of model type "
            f"'{model_type}' are (known: {', '.join(sorted(SUBLAYERS))}). Use method.name=lora with "
            f"method.target_modules for this model."
        )
    attn, ffn = SUBLAYERS[model_type]
    prefix, stack = blocks(model)
    paths = [f"{prefix}.{i}.{name}" for i in range(len(stack)) for name in ([attn, ffn] if placement == "houlsby" else [ffn])]
    for path in paths:
        try:
            layer = model.get_submodule(path)
        except AttributeError:
            layer = None
        if layer is None or not is_linear(layer):
            raise TunelabError(
                f"Expected a linear layer at '{path}' for a bottleneck adapter ({model_type}), found "
                f"{type(layer).__name__ if layer is not None else 'nothing'}. Apply adapters once, to an unmodified "
                f"base model, or use method.name=lora for this model."
            )
    return paths


def _adapters(model: nn.Module) -> dict[str, BottleneckAdapter]:
    return {p: m for p, m in model.named_modules() if isinstance(m, BottleneckAdapter)}


def _own_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    return {f"{path}.{name}": p for path, m in _adapters(model).items()
            for name, p in m.named_parameters() if not name.startswith("base_layer.")}


def apply(model: nn.Module, cfg: AdapterConfig, head: list[str]) -> nn.Module:
    check_head(model, head)
    paths = _sublayers(model, cfg.placement)
    hidden = _out_features(model.get_submodule(paths[0]))
    width = cfg.bottleneck_size or hidden // cfg.reduction_factor
    if width < 1:
        raise TunelabError(f"method.reduction_factor={cfg.reduction_factor} is larger than the hidden size ({hidden}), "
                           f"leaving no bottleneck. Set method.reduction_factor to at most {hidden}, or set method.bottleneck_size.")
    model.requires_grad_(False)
    for path in paths:
        parent, _, child = path.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, BottleneckAdapter(getattr(owner, child), width, cfg.non_linearity))
    for name in head:
        model.get_submodule(name).requires_grad_(True)
    # save() is handed only the model, so the config travels with it (a plain attribute, not in config.json).
    model.tunelab_adapter_config = cfg.model_dump()
    return model


def save(model: nn.Module, out_dir: Path, base_model_path: str, head: list[str]) -> None:
    config = getattr(model, "tunelab_adapter_config", None)
    if not _adapters(model) or config is None:
        raise TunelabError("This model has no bottleneck adapters added by tunelab to save; apply method.name=adapter "
                           "first, or save it as a full model instead.")
    save_artifact(model, out_dir, config, _own_tensors(model), head, base_model_path)


def load(model: nn.Module, out_dir: Path) -> nn.Module:
    cfg, head = read_artifact(out_dir, AdapterConfig)
    model = apply(model, cfg, head)
    restore(model, out_dir, _own_tensors(model), head)
    return model


def merge(model: nn.Module) -> nn.Module:
    raise TunelabError("bottleneck adapters add layers and cannot be merged into the base weights; export the adapter "
                       "or use lora/ia3 for a mergeable method")
