"""P-tuning (Liu et al. 2021): virtual tokens produced by a trainable prompt encoder, prepended to the input.

The encoder is peft's PromptEncoder: trainable embeddings (n, hidden) fed through an MLP
(Linear(hidden, h), ReLU, Linear(h, h), ReLU, Linear(h, hidden)) or a bidirectional LSTM
(`encoder_num_layers`, `encoder_dropout`) followed by Linear(2h, 2h), ReLU, Linear(2h, hidden);
h = `encoder_hidden_size`, by default the model's hidden size. The virtual tokens are prepended exactly
as in prompt tuning (virtual_tokens.py; the decoder/padding note in prompt.py applies here too).

Saved in peft's layout (peft 0.21.2): peft_type P_TUNING, `prompt_embeddings` = the encoder's output
for the n virtual tokens, encoder_reparameterization_type MLP | LSTM, encoder_hidden_size,
encoder_num_layers, encoder_dropout; with inference_mode true peft uses the stored output directly,
and so does `load` here: the encoder is a training-time device and is not kept.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import PTuningConfig
from . import virtual_tokens as vt

ARTIFACT = "adapter"  # PEFT-layout adapter dir; the base model is loaded from model.path
CHANGES_BASE = False  # adds virtual tokens from a prompt encoder
MERGEABLE = False  # merge(): virtual tokens are not weights
SWITCHABLE = True  # its encoder (model.prompt_encoder) swaps in and out
VIRTUAL_TOKENS = "inputs"  # prepended to the input embeddings: they take positions and pass through every block
QUANTIZES_BASE = False
TRAINABLE_DTYPE = "float32"  # the prompt encoder and the head float32 over a bf16 base
DEFAULT_LR = 1e-3  # the prompt encoder is a small network
ACTIVATION_SHARE = {"llama": 0.84, "gpt2": 0.77, "bert": 0.61}  # of full fine-tuning's saved activations
PEFT_TYPE = "P_TUNING"


class PromptEncoder(nn.Module):
    """`forward()` -> (n, hidden): the encoder applied to its n trainable token embeddings."""

    def __init__(self, n: int, dim: int, hidden: int, kind: str, num_layers: int, dropout: float, device=None):
        super().__init__()
        self.kind, self.hidden, self.num_layers, self.dropout = kind, hidden, num_layers, dropout
        self.embedding = nn.Embedding(n, dim, device=device)
        if kind == "lstm":
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=num_layers, dropout=dropout, bidirectional=True,
                                     batch_first=True, device=device)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden, device=device), nn.ReLU(),
                                          nn.Linear(2 * hidden, dim, device=device))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden, device=device), nn.ReLU(),
                                          nn.Linear(hidden, hidden, device=device), nn.ReLU(),
                                          nn.Linear(hidden, dim, device=device))
        self.adapter_disabled = False

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight.unsqueeze(0)
        if self.kind == "lstm":
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)[0]


def apply(model: nn.Module, cfg: PTuningConfig, head: list[str]) -> nn.Module:
    """Freeze the base; prepend the prompt encoder's virtual tokens; train the encoder and the head."""
    vt.check_head(model, head)
    words = model.get_input_embeddings().weight
    dim = words.shape[1]
    enc = PromptEncoder(cfg.num_virtual_tokens, dim, cfg.encoder_hidden_size or dim, cfg.encoder,
                        cfg.encoder_num_layers, cfg.encoder_dropout, device=words.device)
    vt.attach_prompt(model, enc)
    vt.freeze_all_but(model, head)
    return model


def save(model: nn.Module, out_dir: Path, base_model_path: str, head: list[str]) -> None:
    enc = vt.encoder_of(model, "ptuning")
    was_training = enc.training
    enc.eval()  # no LSTM dropout in the stored tokens
    with torch.no_grad():
        table = enc()
    enc.train(was_training)
    if isinstance(enc, PromptEncoder):
        fields = {"encoder_reparameterization_type": enc.kind.upper(), "encoder_hidden_size": enc.hidden,
                  "encoder_num_layers": enc.num_layers, "encoder_dropout": enc.dropout}
    else:  # a loaded adapter: keep what it was saved with
        fields = dict(getattr(enc, "saved_fields", {}))
    vt.save(model, out_dir, base_model_path, head, PEFT_TYPE, table, fields)


_FIELDS = ("encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers", "encoder_dropout")


def load(model: nn.Module, out_dir: Path) -> nn.Module:
    config, saved = vt.read(out_dir, PEFT_TYPE, "P-tuning")
    table = saved[vt.TABLE_KEY]
    vt.check_table(table, model.get_input_embeddings().weight.shape[1], out_dir, "virtual tokens")
    head = vt.load_head(model, config, saved, out_dir)
    enc = vt.StaticTable(table.to(model.get_input_embeddings().weight.device))
    enc.saved_fields = {k: config[k] for k in _FIELDS if k in config}
    vt.attach_prompt(model, enc)
    vt.freeze_all_but(model, head)
    return model


def merge(model: nn.Module) -> nn.Module:
    raise vt.cannot_merge("P-tuning")
