"""BitFit (Ben Zaken et al. 2022): train only the bias terms of the body, plus the full task head.

Selection rule: every parameter named `bias` outside the head, LayerNorm biases
included (the paper's "all bias terms"). On the bare BERT-base body (BertConfig
defaults) that is 12 x (4x768 attention + 3072 + 768 feed-forward + 2x768
LayerNorm) + 768 embedding LayerNorm + 768 pooler = 102,912, the published
figure; leaving LayerNorm biases out would give 83,712. In a classification
model the pooler belongs to the head (`models.head_modules`) and is trained in
full. Bias-free bodies (Llama, Mistral) cannot use BitFit.

Saved in tunelab's own adapter layout (`layout.py`).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..config import BitFitConfig
from ..errors import TunelabError
from .layout import check_head, read_artifact, restore, save_artifact
from .targets import inside

ARTIFACT = "adapter"  # tensors only; the base model is loaded from model.path
CHANGES_BASE = True  # trains the base's own bias vectors
MERGEABLE = True  # merge(): the trained biases are the base's
SWITCHABLE = False  # it changes the base other adapters would share
VIRTUAL_TOKENS = None
QUANTIZES_BASE = False
TRAINABLE_DTYPE = "base"  # trains the base's own biases (and the head) in its dtype: bf16 over a bf16 base
DEFAULT_LR = 1e-3  # few parameters, large steps for them
ACTIVATION_SHARE = {"llama": 0.70, "gpt2": 0.77, "bert": 0.61}  # of full fine-tuning's saved activations


def _body_biases(model: nn.Module, head: list[str]) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias" and not inside(n, head)}


def apply(model: nn.Module, cfg: BitFitConfig, head: list[str]) -> nn.Module:
    check_head(model, head)
    biases = _body_biases(model, head)
    if not biases:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise TunelabError(
            f"BitFit trains only the bias terms of the model body, but {type(model).__name__} (model type "
            f"'{model_type}') has no biases outside its head: its linear layers and norms are bias-free, as in Llama. "
            f"Use method.name=lora or method.name=ia3 for this model."
        )
    model.requires_grad_(False)
    for p in biases.values():
        p.requires_grad_(True)
    for name in head:
        model.get_submodule(name).requires_grad_(True)
    return model


def save(model: nn.Module, out_dir: Path, base_model_path: str, head: list[str]) -> None:
    save_artifact(model, out_dir, BitFitConfig(name="bitfit").model_dump(), _body_biases(model, head), head, base_model_path)


def load(model: nn.Module, out_dir: Path) -> nn.Module:
    cfg, head = read_artifact(out_dir, BitFitConfig)
    model = apply(model, cfg, head)
    restore(model, out_dir, _body_biases(model, head), head)
    return model


def merge(model: nn.Module) -> nn.Module:
    return model  # the trained biases are the model's own parameters: nothing to fold
