"""LoRA: a trainable low-rank update B @ A * (alpha / r) beside frozen linear layers.

Modelled on torchtune's lora.py: one small module and plain functions. The
child names (`base_layer`, `lora_A`, `lora_B`) and the saved file layout match
Hugging Face PEFT, so an adapter saved here loads with
`peft.PeftModel.from_pretrained` and a PEFT adapter loads here. PEFT itself is
not imported; the layout facts it relies on (checked against peft 0.21):

- adapter_model.safetensors keys are `base_model.model.<module path>.lora_A.weight`
  (shape (r, in)) and `...lora_B.weight` (shape (out, r)), also for GPT-2's
  Conv1D; fully trained modules (`modules_to_save`) are stored under their
  plain state-dict names, `base_model.model.<module path>.<param>`.
- adapter_config.json needs peft_type "LORA", r, lora_alpha, target_modules
  (names matched as `path == name or path.endswith("." + name)`), modules_to_save
  and fan_in_fan_out (true for Conv1D, whose weight is stored (in, out)).

DoRA (dora.py) subclasses `LoRALinear` and reuses everything below: a layer's saved
tensors are its own state minus `base_layer` (peft's rule too), and `use_dora`
and `merged_weight` come from the layer class.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from ..config import LoraConfig
from ..errors import TunelabError

ARTIFACT = "adapter"  # PEFT-layout adapter dir; the base model is loaded from model.path
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# The LoRA paper's choice (attention query and value) per architecture; names from peft's mapping table.
DEFAULT_TARGETS = {
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "layoutlm", "camembert", "ernie"], ["query", "value"]),
    **dict.fromkeys(["distilbert"], ["q_lin", "v_lin"]),
    **dict.fromkeys(["deberta-v2"], ["query_proj", "value_proj"]),
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["c_attn"]),
    **dict.fromkeys(["bloom", "gpt_neox", "falcon"], ["query_key_value"]),
    **dict.fromkeys(["t5", "mt5"], ["q", "v"]),
    **dict.fromkeys(
        ["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3",
         "opt", "bart", "gptj", "gpt_neo", "stablelm", "olmo", "olmo2", "smollm3"],
        ["q_proj", "v_proj"],
    ),
}

# peft's task_type for adapter_config.json; save() is not told the task, the model class name says it.
_TASK_TYPES = {"ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS",
               "ForQuestionAnswering": "QUESTION_ANS", "ForCausalLM": "CAUSAL_LM"}


class LoRALinear(nn.Module):
    """`base_layer(x) + lora_B(lora_A(dropout(x))) * alpha / r`, with the base layer frozen."""

    use_dora = False  # written to adapter_config.json; DoRALinear sets it

    def __init__(self, base_layer: nn.Linear | Conv1D, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        weight = base_layer.weight
        in_features, out_features = weight.shape[::-1] if isinstance(base_layer, nn.Linear) else weight.shape
        # Adapters stay in float32 under a bf16 base (as peft does): small updates survive rounding.
        dtype = torch.promote_types(weight.dtype, torch.float32)
        self.base_layer = base_layer.requires_grad_(False)
        self.lora_A = nn.Linear(in_features, r, bias=False, device=weight.device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=weight.device, dtype=dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.adapter_disabled = False  # set by methods.adapters_disabled: compute the base layer only
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # so the wrapped model starts out equal to the base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.adapter_disabled:
            return result
        x = x.to(self.lora_A.weight.dtype)
        # Add in the adapter dtype and round once, in the same order as peft, so outputs match it exactly.
        return (result + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update in the base weight's layout: (out, in) for Linear, (in, out) for Conv1D."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    def merged_weight(self) -> torch.Tensor:
        """The base weight with the update folded in, in float32 (rounded once, by the caller)."""
        return self.base_layer.weight.float() + self.delta_weight()


# -- choosing layers ----------------------------------------------------------

def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def _matches(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


def _inside(path: str, prefixes: list[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def _body_linears(model: nn.Module, head: list[str]) -> list[str]:
    """Paths of the linear layers LoRA may wrap: not in the head, not the output (LM) projection."""
    out = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    return [p for p, m in model.named_modules() if _is_linear(m) and m is not out and not _inside(p, head)]


def _available(paths: list[str]) -> str:
    return ", ".join(sorted({p.rsplit(".", 1)[-1] for p in paths}))


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[model_type])
    raise TunelabError(
        f"LoRA has no default target layers for model type '{model_type}'. Set method.target_modules to the "
        f"names of the linear layers to adapt (e.g. [q_proj,v_proj]) or to all-linear; this model's linear "
        f"layers are: {_available(_body_linears(model, []))}."
    )


def _select(model: nn.Module, targets: list[str] | str | None, head: list[str]) -> list[str]:
    candidates = _body_linears(model, head)
    if targets is None:
        targets = default_targets(model)
    if targets == "all-linear":
        return candidates
    if isinstance(targets, str):  # peft's convention: a single string is a regex on the full module path
        chosen = [p for p in candidates if re.fullmatch(targets, p)]
        if not chosen:
            raise TunelabError(f"LoRA target pattern '{targets}' matches no linear layer of the model. Set "
                               f"method.target_modules to names among: {_available(candidates)}.")
        return chosen
    missing = [t for t in targets if not any(_matches(p, t) for p in candidates)]
    if missing:
        raise TunelabError(
            f"method.target_modules names {', '.join(repr(t) for t in missing)}, which matches no linear layer "
            f"outside the head. Available linear layer names: {_available(candidates)}."
        )
    return [p for p in candidates if any(_matches(p, t) for t in targets)]


# -- the method ----------------------------------------------------------------

def apply(model: PreTrainedModel, cfg: LoraConfig, head: list[str]) -> PreTrainedModel:
    """Freeze everything, wrap the target layers with LoRA, train the head modules in full."""
    return _apply(model, cfg.target_modules, cfg.r, cfg.alpha, cfg.dropout, head)


def _apply(model, targets, r: int, alpha: float, dropout: float, head: list[str], layer_cls=LoRALinear):
    """Wrap the chosen layers in `layer_cls` (LoRALinear, or a subclass such as DoRALinear)."""
    for name in head:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise TunelabError(f"Head module '{name}' is not in the model ({type(model).__name__}); its top-level "
                               f"modules are: {', '.join(n for n, _ in model.named_children())}.") from None
    paths = _select(model, targets, head)
    model.requires_grad_(False)
    for path in paths:
        parent, _, child = path.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, layer_cls(getattr(owner, child), r, alpha, dropout))
    for name in head:
        model.get_submodule(name).requires_grad_(True)
    return model


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {p: m for p, m in model.named_modules() if isinstance(m, LoRALinear)}


def _adapter_tensors(path: str, layer: LoRALinear) -> dict[str, torch.Tensor]:
    """Saved key -> live parameter: everything the layer holds but its base layer (lora_A/B, DoRA's magnitude)."""
    return {f"{PREFIX}{path}.{key}": t for key, t in layer.state_dict(keep_vars=True).items()
            if not key.startswith("base_layer.")}


def _target_names(model: nn.Module, paths: list[str]) -> list[str]:
    """Short names (e.g. query, value) when they pick exactly the wrapped layers, else full paths.

    peft matches names against every module, the head included, so `dense` would also hit a pooler's dense.
    """
    short = sorted({p.rsplit(".", 1)[-1] for p in paths})
    picked = {p for p, m in model.named_modules() if any(_matches(p, s) for s in short)}
    return short if picked == set(paths) else sorted(paths)


def save(model: nn.Module, out_dir: Path, base_model_path: str, head: list[str]) -> None:
    layers = _lora_layers(model)
    if not layers:
        raise TunelabError("This model has no LoRA layers to save; save it as a full model instead.")
    tensors = {}
    for path, layer in layers.items():
        tensors.update(_adapter_tensors(path, layer))
    for name in head:
        for key, t in model.get_submodule(name).state_dict().items():
            tensors[f"{PREFIX}{name}.{key}"] = t
    # clone: safetensors refuses tensors that share storage (e.g. tied weights).
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()}

    first = next(iter(layers.values()))
    config = {
        "peft_type": "LORA",
        "task_type": next((t for s, t in _TASK_TYPES.items() if type(model).__name__.endswith(s)), None),
        "base_model_name_or_path": str(base_model_path),
        "r": first.r,
        "lora_alpha": int(first.alpha) if float(first.alpha).is_integer() else first.alpha,
        "lora_dropout": first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0,
        "target_modules": _target_names(model, list(layers)),
        "modules_to_save": list(head),
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "bias": "none",
        "use_rslora": False,
        "use_dora": first.use_dora,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def load(model: PreTrainedModel, out_dir: Path) -> PreTrainedModel:
    return _load(model, out_dir, LoRALinear)


def _load(model: PreTrainedModel, out_dir: Path, layer_cls) -> PreTrainedModel:
    """Restore an adapter onto a fresh base with `layer_cls`, whose `use_dora` must match the adapter's."""
    out_dir = Path(out_dir)
    config_file, weights_file = out_dir / CONFIG_NAME, out_dir / WEIGHTS_NAME
    if not config_file.is_file() or not weights_file.is_file():
        raise TunelabError(f"'{out_dir}' is not a LoRA adapter directory: it needs {CONFIG_NAME} and {WEIGHTS_NAME}. "
                           f"Pass the directory a LoRA adapter was saved to (by tunelab or peft's save_pretrained).")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TunelabError(f"'{config_file}' is not valid JSON ({e}); re-save the adapter.") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA" or "r" not in config or "lora_alpha" not in config:
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise TunelabError(f"'{config_file}' is not a LoRA adapter config (peft_type {kind!r}; it needs peft_type "
                           f"LORA with r and lora_alpha). Pass the directory of a LoRA adapter.")
    if bool(config.get("use_dora")) != layer_cls.use_dora:
        saved_as, use = ("DoRA", "dora") if config.get("use_dora") else ("plain LoRA", "lora")
        raise TunelabError(f"The adapter in '{out_dir}' is a {saved_as} adapter (use_dora: "
                           f"{bool(config.get('use_dora'))}); load it with method.name={use} "
                           f"(tunelab.methods.{use}.load).")
    unsupported = [k for k in ("use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform")
                   if config.get(k)] + (["bias"] if config.get("bias", "none") != "none" else [])
    if unsupported:
        raise TunelabError(f"The adapter in '{out_dir}' uses {', '.join(unsupported)}, which tunelab's LoRA does not "
                           f"support; load it with peft instead.")

    # peft adds the usual head names (classifier, score) for SEQ_CLS whether or not the model has them.
    modules = [p for p, _ in model.named_modules() if p]
    head = [p for p in modules if any(_matches(p, n) for n in config.get("modules_to_save") or [])]
    head = [p for p in head if not _inside(p, [h for h in head if h != p])]  # outermost only
    _apply(model, config.get("target_modules"), config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0), head,
           layer_cls)

    saved = load_file(str(weights_file))
    expected = {}
    for path, layer in _lora_layers(model).items():
        expected.update(_adapter_tensors(path, layer))
    for name in head:
        for key, t in model.get_submodule(name).state_dict(keep_vars=True).items():
            expected[f"{PREFIX}{name}.{key}"] = t
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise TunelabError(
            f"The adapter in '{out_dir}' does not fit this model: missing {missing[:5] or 'none'}, unexpected "
            f"{unexpected[:5] or 'none'}. Load it onto the base model it was trained from "
            f"({config.get('base_model_name_or_path')})."
        )
    with torch.no_grad():
        for key, target in expected.items():
            if saved[key].shape != target.shape:
                raise TunelabError(
                    f"The adapter in '{out_dir}' stores {key} with shape {tuple(saved[key].shape)}, but this model has "
                    f"{tuple(target.shape)}; load it onto a base with the same head (same number of labels).")
            target.copy_(saved[key])
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold each update into its base weight and put the plain layer back."""
    with torch.no_grad():
        for path, layer in _lora_layers(model).items():
            base = layer.base_layer
            base.weight.copy_(layer.merged_weight())  # computed in float32, rounded once
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, base)
    return model
