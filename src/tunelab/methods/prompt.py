"""Prompt tuning (Lester et al. 2021): `num_virtual_tokens` trainable embeddings prepended to the input.

Only the prompt table and the head train. The prompt is prepended by a hook on the model's body
(virtual_tokens.py), so the task and the training loop call the model as usual. Saved in peft's
layout (`prompt_embeddings`, peft_type PROMPT_TUNING), so `peft.PeftModel.from_pretrained` loads it
and a peft prompt-tuning adapter loads here. PEFT is not imported. Facts relied on (peft 0.21.2):

- init RANDOM is a plain `nn.Embedding(n, hidden)` (N(0, 1)); init TEXT takes
  `tokenizer(init_text)["input_ids"]` (special tokens included), repeated then cut to n, looked up in
  the word embeddings, kept in float32;
- forward: `inputs_embeds = cat(prompts, word_embeddings(input_ids))`, attention_mask gets n ones in
  front, token_type_ids n zeros, position_ids are dropped;
- BERT's pooler (classification) reads position 0, i.e. the first virtual token.

Where tunelab differs from peft: for decoders (GPT-2, Llama) peft hands the model inputs_embeds only,
so transformers cannot find the last non-pad token and classifies from the last position, which is a
pad token in a right-padded batch. tunelab removes the virtual positions from the body's output and
the model finds the last real token from input_ids, so batched predictions equal one-at-a-time ones.
On unpadded inputs both agree. Position ids, when given (generate derives them from a left-padded mask),
are kept, after 0..n-1 for the virtual tokens, where peft drops them: in peft the real tokens of a
left-padded row then take positions after its pads, so its batched generations can differ from
one-at-a-time ones; tunelab's are the same (virtual_tokens.py, generation with the KV cache).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from .. import models
from ..config import PromptConfig
from ..errors import TunelabError
from . import virtual_tokens as vt

ARTIFACT = "adapter"  # PEFT-layout adapter dir; the base model is loaded from model.path
CHANGES_BASE = False  # adds virtual tokens in front of the input
MERGEABLE = False  # merge(): virtual tokens are not weights
SWITCHABLE = True  # its encoder (model.prompt_encoder) swaps in and out
VIRTUAL_TOKENS = "inputs"  # prepended to the input embeddings: they take positions and pass through every block
QUANTIZES_BASE = False
TRAINABLE_DTYPE = "float32"  # the prompt table and the head float32 over a bf16 base
DEFAULT_LR = 3e-2  # a few input embeddings need the largest steps
ACTIVATION_SHARE = {"llama": 0.84, "gpt2": 0.77, "bert": 0.61}  # of full fine-tuning's saved activations
PEFT_TYPE = "PROMPT_TUNING"


def _text_ids(model: nn.Module, text: str, n: int) -> list[int]:
    path = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not path:
        raise TunelabError("method.init=text needs the model's tokenizer, but this model does not say which directory "
                           "it was loaded from. Use method.init=random, or load the model from its directory.")
    ids = models.load_tokenizer(path)(text)["input_ids"]
    if not ids:
        raise TunelabError(f"method.init_text {text!r} tokenizes to nothing; give a text of real words.")
    return (ids * math.ceil(n / len(ids)))[:n]


def _initial_table(model: nn.Module, cfg: PromptConfig) -> torch.Tensor:
    words = model.get_input_embeddings()
    n, dim = cfg.num_virtual_tokens, words.weight.shape[1]
    if cfg.init == "text":
        if not cfg.init_text:
            raise TunelabError("method.init=text needs method.init_text, the text whose token embeddings start the "
                               "prompt (e.g. method.init_text='Classify the sentiment of this review').")
        ids = torch.tensor(_text_ids(model, cfg.init_text, n), device=words.weight.device)
        return words(ids).detach().clone().float()
    table = nn.Embedding(n, dim, device=words.weight.device)  # peft's RANDOM: nn.Embedding's own N(0, 1) init
    return table.weight.detach()


def apply(model: nn.Module, cfg: PromptConfig, head: list[str]) -> nn.Module:
    """Freeze the base; prepend a trainable prompt of `cfg.num_virtual_tokens` embeddings; train the head in full."""
    vt.check_head(model, head)
    vt.attach_prompt(model, vt.StaticTable(_initial_table(model, cfg)))
    vt.freeze_all_but(model, head)
    return model


def save(model: nn.Module, out_dir: Path, base_model_path: str, head: list[str]) -> None:
    enc = vt.encoder_of(model, "prompt")
    with torch.no_grad():
        table = enc()
    vt.save(model, out_dir, base_model_path, head, PEFT_TYPE, table, {
        "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
    })


def load(model: nn.Module, out_dir: Path) -> nn.Module:
    config, saved = vt.read(out_dir, PEFT_TYPE, "prompt tuning")
    table = saved[vt.TABLE_KEY]
    vt.check_table(table, model.get_input_embeddings().weight.shape[1], out_dir, "virtual tokens")
    head = vt.load_head(model, config, saved, out_dir)
    vt.attach_prompt(model, vt.StaticTable(table.to(model.get_input_embeddings().weight.device)))
    vt.freeze_all_but(model, head)
    return model


def merge(model: nn.Module) -> nn.Module:
    raise vt.cannot_merge("prompt tuning")
