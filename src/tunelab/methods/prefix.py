"""Prefix tuning (Li & Liang 2021): trainable key/value prefixes of `num_virtual_tokens` for every attention layer.

The prefixes reach the model as `past_key_values` (a DynamicCache filled by a hook on the body,
virtual_tokens.py, at every call without a cache; in generation once, at the first step, and then
kept in the cache) with the attention mask extended by n ones, so encoders (BERT) and decoders
(GPT-2, Llama) attend to them and the training loop calls the model as usual. The hidden states hold
only the real tokens, so every head reads its usual position; decoders find their last non-pad token
from input_ids as without the method, with or without padding.

Parameters (peft's PrefixEncoder, peft 0.21.2): without `prefix_projection` one table
(n, num_layers * 2 * token_dim), N(0, 1) as nn.Embedding; with it, embeddings (n, token_dim) through
Linear(token_dim, h), Tanh, Linear(h, num_layers * 2 * token_dim), h = `encoder_hidden_size` (default
token_dim). token_dim is num_key_value_heads * head_dim (the hidden size without grouped-query
attention) and num_attention_heads the key/value head count, as peft sets them. The table row
(2 * layers, heads, head_dim) puts layer i's keys at 2i and its values at 2i + 1.

Saved in peft's layout: `prompt_embeddings` = the computed table (the MLP is dropped after training, as
peft does with inference_mode), peft_type PREFIX_TUNING, prefix_projection false in the saved config
(the stored table needs no projection), encoder_hidden_size, and num_layers / token_dim /
num_attention_heads as above. Positions of the real tokens start at n (transformers' rule for a cache),
in peft too, so BERT classification agrees with peft within float error.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import PrefixConfig
from ..errors import TunelabError
from . import virtual_tokens as vt

ARTIFACT = "adapter"  # PEFT-layout adapter dir; the base model is loaded from model.path
CHANGES_BASE = False  # adds key/value prefixes in every layer
MERGEABLE = False  # merge(): prefixes are not weights
SWITCHABLE = True  # its encoder (model.prompt_encoder) swaps in and out
VIRTUAL_TOKENS = "keys"  # prepended to every attention layer's keys and values: they take positions but enter no block as input
QUANTIZES_BASE = False
TRAINABLE_DTYPE = "float32"  # the prefix encoder and the head float32 over a bf16 base
DEFAULT_LR = 1e-2  # virtual tokens need large steps
ACTIVATION_SHARE = {"llama": 1.02, "gpt2": 0.81, "bert": 0.68}  # of full fine-tuning's saved activations
PEFT_TYPE = "PREFIX_TUNING"


class PrefixEncoder(nn.Module):
    """`forward()` -> (n, num_layers * 2 * token_dim): every layer's key and value prefix."""

    def __init__(self, n: int, token_dim: int, num_layers: int, projection: bool, hidden: int, device=None):
        super().__init__()
        self.prefix_projection, self.hidden = projection, hidden
        out = num_layers * 2 * token_dim
        if projection:
            self.embedding = nn.Embedding(n, token_dim, device=device)
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden, device=device), nn.Tanh(),
                                           nn.Linear(hidden, out, device=device))
        else:
            self.embedding = nn.Embedding(n, out, device=device)
        self.adapter_disabled = False

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight
        return self.transform(x) if self.prefix_projection else x


def kv_shape(model: nn.Module) -> dict:
    """num_layers, token_dim, num_attention_heads, head_dim of the key/value cache (peft's values)."""
    s = vt.shape(model)
    cfg = vt.text_config(model)
    heads = s["num_attention_heads"]
    head_dim = getattr(cfg, "head_dim", None) or s["token_dim"] // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return {"num_layers": s["num_layers"], "token_dim": kv_heads * head_dim, "num_attention_heads": kv_heads,
            "head_dim": head_dim}


def _attach(model: nn.Module, enc: nn.Module, shape: dict) -> None:
    vt.attach_prefix(model, enc, shape["num_layers"], shape["num_attention_heads"], shape["head_dim"])


def apply(model: nn.Module, cfg: PrefixConfig, head: list[str]) -> nn.Module:
    """Freeze the base; give every attention layer a trainable key/value prefix; train the head in full."""
    vt.check_head(model, head)
    shape = kv_shape(model)
    device = model.get_input_embeddings().weight.device
    enc = PrefixEncoder(cfg.num_virtual_tokens, shape["token_dim"], shape["num_layers"], cfg.prefix_projection,
                        cfg.encoder_hidden_size or shape["token_dim"], device=device)
    _attach(model, enc, shape)
    vt.freeze_all_but(model, head)
    return model


def save(model: nn.Module, out_dir: Path, base_model_path: str, head: list[str]) -> None:
    enc = vt.encoder_of(model, "prefix")
    with torch.no_grad():
        table = enc()
    shape = kv_shape(model)
    vt.save(model, out_dir, base_model_path, head, PEFT_TYPE, table, {
        "token_dim": shape["token_dim"], "num_attention_heads": shape["num_attention_heads"],
        "prefix_projection": False, "encoder_hidden_size": getattr(enc, "hidden", shape["token_dim"]),
        "init_weights": None,
    })


def load(model: nn.Module, out_dir: Path) -> nn.Module:
    config, saved = vt.read(out_dir, PEFT_TYPE, "prefix tuning")
    shape = kv_shape(model)
    for key in ("num_layers", "token_dim", "num_attention_heads"):
        if key in config and config[key] != shape[key]:
            raise TunelabError(f"The prefix adapter in '{out_dir}' was saved for {key}={config[key]}, but this model has "
                               f"{shape[key]}; load it onto the base model it was trained from "
                               f"({config.get('base_model_name_or_path')}).")
    table = saved[vt.TABLE_KEY]
    vt.check_table(table, shape["num_layers"] * 2 * shape["token_dim"], out_dir, "key/value prefixes")
    head = vt.load_head(model, config, saved, out_dir)
    enc = vt.StaticTable(table.to(model.get_input_embeddings().weight.device))
    enc.hidden = config.get("encoder_hidden_size") or shape["token_dim"]
    _attach(model, enc, shape)
    vt.freeze_all_but(model, head)
    return model


def merge(model: nn.Module) -> nn.Module:
    raise vt.cannot_merge("prefix tuning")
