"""Full fine-tuning: every parameter is trained and the whole model is saved."""

from __future__ import annotations

from pathlib import Path

ARTIFACT = "model"  # a complete HF model dir, loadable with from_pretrained
CHANGES_BASE = True  # trains the base weights themselves
MERGEABLE = True  # merge(): already plain weights
SWITCHABLE = False  # it changes the base other adapters would share
VIRTUAL_TOKENS = None
QUANTIZES_BASE = False
TRAINABLE_DTYPE = "base"  # trains the base's own weights, in the dtype it was loaded in
DEFAULT_LR = 5e-5  # moves pretrained weights: small steps
ACTIVATION_SHARE = {"llama": 1.0, "gpt2": 1.0, "bert": 1.0}  # of full fine-tuning's saved activations


def apply(model, cfg, head: list[str]):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def save(model, out_dir: Path, base_model_path: str, head: list[str]) -> None:
    model.save_pretrained(out_dir)


def merge(model):
    return model  # nothing to fold: the weights are the model
