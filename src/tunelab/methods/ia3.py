"""IA3 (Liu et al. 2022): learned vectors that rescale keys, values and feed-forward activations.

Each chosen linear layer gets one vector `ia3_l`, initialised to ones so that the
model starts out equal to the base. On attention layers it scales the layer's
output (shape (out, 1)); on feed-forward layers it scales the input of the FFN's
second projection (shape (1, in)). The saved layout matches Hugging Face PEFT, so
adapters load both ways; PEFT itself is not imported. Facts relied on (peft 0.21):

- default target and feedforward names per model type are peft's
  TRANSFORMERS_MODELS_TO_IA3_{TARGET,FEEDFORWARD}_MODULES_MAPPING (DEFAULTS below);
- a layer is a target when `path == name or path.endswith("." + name)` (a regex
  fullmatch when target_modules is a string), and feed-forward when
  `path.endswith(name)`, a plain suffix test with no dot boundary. So BERT's
  `output.dense` also picks `attention.output.dense`, and as a feed-forward layer;
- adapter_model.safetensors keys are `base_model.model.<module path>.ia3_l`, with
  the (out, 1) / (1, in) shapes also for GPT-2's Conv1D, whose weight is stored
  (in, out): hence fan_in_fan_out, and the transposed vector when merging;
- merging scales the weight, and the bias of non-feed-forward layers.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from ..config import IA3Config
from ..errors import TunelabError
from . import precision
from .layout import copy_checked, peft_head, peft_task_type, read_peft, write_peft
from .lora import PREFIX
from .targets import available, body_linears, matches

ARTIFACT = "adapter"  # PEFT-layout adapter dir; the base model is loaded from model.path
CHANGES_BASE = False  # adds scaling vectors beside frozen weights
MERGEABLE = True  # merge(): the scales fold into W
SWITCHABLE = True  # its scaled layers swap in and out
VIRTUAL_TOKENS = None
QUANTIZES_BASE = False
TRAINABLE_DTYPE = "float32"  # the scaling vectors and the head float32 over a bf16 base
DEFAULT_LR = 1e-2  # scaling vectors need large steps
ACTIVATION_SHARE = {"llama": 0.92, "gpt2": 1.0, "bert": 1.0}  # of full fine-tuning's saved activations

# model type -> (target_modules, feedforward_modules): peft's tables.
DEFAULTS = {
    "t5": (["k", "v", "wo"], ["wo"]),
    "mt5": (["k", "v", "wi_1"], []),
    **dict.fromkeys(["gpt2", "gpt_bigcode"], (["c_attn", "mlp.c_proj"], ["mlp.c_proj"])),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
    **dict.fromkeys(["bert", "roberta"], (["key", "value", "output.dense"], ["output.dense"])),
    "deberta-v2": (["key_proj", "value_proj", "output.dense"], ["output.dense"]),
    "deberta": (["in_proj", "output.dense"], ["output.dense"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    **dict.fromkeys(["bart", "phi"], (["q_proj", "v_proj", "fc2"], ["fc2"])),
    "gptj": (["q_proj", "v_proj", "fc_out"], ["fc_out"]),
    "gpt_neo": (["q_proj", "v_proj", "c_proj"], ["c_proj"]),
    **dict.fromkeys(["gpt_neox", "falcon", "RefinedWeb", "RefinedWebModel"],
                    (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"])),
    **dict.fromkeys(["llama", "mistral"], (["k_proj", "v_proj", "down_proj"], ["down_proj"])),
    "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    **dict.fromkeys(["llama4", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3"],
                    (["q_proj", "v_proj", "down_proj"], ["down_proj"])),
}


class IA3Linear(nn.Module):
    """`base_layer(x) * l` (attention), or `base_layer(x * l)` (feed-forward), with the base layer frozen."""

    def __init__(self, base_layer: nn.Linear | Conv1D, is_feedforward: bool):
        super().__init__()
        weight = base_layer.weight
        in_features, out_features = weight.shape[::-1] if isinstance(base_layer, nn.Linear) else weight.shape
        # The vector stays in float32 under a bf16 base (as peft does): small updates survive rounding.
        dtype = torch.promote_types(weight.dtype, torch.float32)
        self.base_layer = base_layer.requires_grad_(False)
        self.ia3_l = nn.Parameter(torch.ones((1, in_features) if is_feedforward else (out_features, 1),
                                             device=weight.device, dtype=dtype))
        self.is_feedforward = is_feedforward
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.adapter_disabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapter_disabled:
            return self.base_layer(x)
        scale = self.ia3_l.flatten()
        # Scale in the vector's dtype and cast back, in the same order as peft, so outputs match it.
        if self.is_feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype))
        result = self.base_layer(x)
        return (result * scale).to(result.dtype)


# -- choosing layers ----------------------------------------------------------

def default_targets(model: nn.Module) -> list[str]:
    return list(_defaults(model)[0])


def _defaults(model: nn.Module) -> tuple[list[str], list[str]]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULTS:
        return DEFAULTS[model_type]
    raise TunelabError(
        f"IA3 has no default layers for model type '{model_type}'. Set method.target_modules to the attention "
        f"key/value layers and the FFN's second projection (e.g. [k_proj,v_proj,down_proj]) and "
        f"method.feedforward_modules to the latter (e.g. [down_proj], or [] for none); this model's linear "
        f"layers are: {available(body_linears(model, []))}."
    )


def _is_target(path: str, targets: list[str] | str) -> bool:
    return bool(re.fullmatch(targets, path)) if isinstance(targets, str) else any(matches(path, t) for t in targets)


def _is_feedforward(path: str, feedforward: list[str] | str) -> bool:
    if isinstance(feedforward, str):
        return bool(re.fullmatch(feedforward, path))
    return any(path.endswith(f) for f in feedforward)  # peft's test: no dot boundary


def _select(model: nn.Module, targets, feedforward, head: list[str]) -> dict[str, bool]:
    """Path of each layer to wrap -> whether it is feed-forward. Missing lists take the architecture's defaults."""
    candidates = body_linears(model, head)
    explicit_ff = feedforward is not None
    if targets is None or feedforward is None:
        default_t, default_f = _defaults(model)
        targets = default_t if targets is None else targets
        feedforward = default_f if feedforward is None else feedforward
    if isinstance(targets, str):  # only from a peft adapter config: a regex on the full path
        paths = [p for p in candidates if _is_target(p, targets)]
        if not paths:
            raise TunelabError(f"The IA3 target pattern '{targets}' (method.target_modules) matches no linear layer "
                               f"of the model. Available linear layer names: {available(candidates)}.")
        return {p: _is_feedforward(p, feedforward) for p in paths}
    missing = [t for t in targets if not any(matches(p, t) for p in candidates)]
    if missing:
        raise TunelabError(
            f"method.target_modules names {', '.join(map(repr, missing))}, which matches no linear layer outside "
            f"the head. Available linear layer names: {available(candidates)}.")
    # As peft requires; a default feedforward list is exempt (peft applies it to whatever targets match it).
    extra = [f for f in feedforward if f not in targets] if explicit_ff and isinstance(feedforward, list) else []
    if extra:
        raise TunelabError(
            f"method.feedforward_modules names {', '.join(map(repr, extra))}, which is not in method.target_modules "
            f"({', '.join(targets)}): a feed-forward layer must also be a target. Available linear layer names: "
            f"{available(candidates)}.")
    return {p: _is_feedforward(p, feedforward) for p in candidates if _is_target(p, targets)}


# -- the method ----------------------------------------------------------------

def apply(model: PreTrainedModel, cfg: IA3Config, head: list[str]) -> PreTrainedModel:
    """Freeze everything, wrap the target layers with IA3 vectors, train the head modules in full."""
    return _apply(model, cfg.target_modules, cfg.feedforward_modules, head)


def _apply(model, targets, feedforward, head: list[str]):
    layers = _select(model, targets, feedforward, head)
    model.requires_grad_(False)
    for path, is_feedforward in layers.items():
        parent, _, child = path.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, IA3Linear(getattr(owner, child), is_feedforward))
    for name in head:
        model.get_submodule(name).requires_grad_(True)
    return model


def _ia3_layers(model: nn.Module) -> dict[str, IA3Linear]:
    return {p: m for p, m in model.named_modules() if isinstance(m, IA3Linear)}


def _config_names(model: nn.Module, layers: dict[str, IA3Linear]) -> tuple[list[str], list[str]]:
    """target_modules and feedforward_modules that pick exactly these layers under peft's rules.

    Each layer is named by its shortest dotted suffix that picks no other module (key, output.dense), as a
    user would write them; full paths when those names would make a non-feed-forward layer feed-forward.
    """
    others = [p for p, _ in model.named_modules() if p not in layers]

    def name(path: str) -> str:
        parts = path.split(".")
        suffixes = (".".join(parts[-k:]) for k in range(1, len(parts) + 1))
        return next((s for s in suffixes if not any(matches(o, s) for o in others)), path)

    names = {p: name(p) for p in layers}
    feedforward = sorted({names[p] for p, m in layers.items() if m.is_feedforward})
    if any(_is_feedforward(p, feedforward) != m.is_feedforward for p, m in layers.items()):
        names = {p: p for p in layers}
        feedforward = sorted(p for p, m in layers.items() if m.is_feedforward)
    return sorted(set(names.values())), feedforward


def _tensors(model: nn.Module, head: list[str], keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """The adapter's state under peft's saved key names: the vectors, and the head modules in full."""
    tensors = {f"{PREFIX}{path}.ia3_l": layer.ia3_l for path, layer in _ia3_layers(model).items()}
    for name in head:
        for key, t in model.get_submodule(name).state_dict(keep_vars=keep_vars).items():
            tensors[f"{PREFIX}{name}.{key}"] = t
    return tensors


def save(model: nn.Module, out_dir: Path, base_model_path: str, head: list[str]) -> None:
    layers = _ia3_layers(model)
    if not layers:
        raise TunelabError("This model has no IA3 layers to save; save it as a full model instead.")
    # clone: safetensors refuses tensors that share storage (e.g. tied weights).
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in _tensors(model, head).items()}
    targets, feedforward = _config_names(model, layers)
    config = {
        "peft_type": "IA3",
        "task_type": peft_task_type(model),
        "base_model_name_or_path": str(base_model_path),
        "target_modules": targets,
        "feedforward_modules": feedforward,
        "exclude_modules": None,
        "modules_to_save": list(head),
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "init_ia3_weights": True,
        "inference_mode": True,
    }
    write_peft(out_dir, tensors, config)


def load(model: PreTrainedModel, out_dir: Path) -> PreTrainedModel:
    out_dir = Path(out_dir)
    config, weights_file = read_peft(out_dir, "IA3", "IA3")
    if config.get("exclude_modules"):
        raise TunelabError(f"The adapter in '{out_dir}' uses exclude_modules, which tunelab's IA3 does not support; "
                           f"load it with peft instead.")

    head = peft_head(model, config)
    _apply(model, config.get("target_modules"), config.get("feedforward_modules"), head)

    saved, expected = load_file(str(weights_file)), _tensors(model, head, keep_vars=True)
    copy_checked(expected, saved, out_dir, config.get('base_model_name_or_path'))
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold each vector into its base weight (and, for output scaling, the bias); put the plain layer back."""
    with torch.no_grad():
        for path, layer in _ia3_layers(model).items():
            base, scale = layer.base_layer, layer.ia3_l
            # (out, 1) scales rows of an (out, in) weight, (1, in) its columns; Conv1D stores (in, out).
            base.weight.copy_(base.weight * (scale.T if layer.fan_in_fan_out else scale))
            if not layer.is_feedforward and base.bias is not None:
                base.bias.copy_(base.bias * scale.flatten())
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, base)
    return precision.base_dtype_head(model)  # a head trained in float32 over a bf16 base goes back to bf16
