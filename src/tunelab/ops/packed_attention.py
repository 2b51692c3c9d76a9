"""Causal attention over packed rows, one example at a time, on the CPU.

A padding-free step packs its examples end to end into rows, each example with its own positions (0, 1, ...).
transformers keeps them apart with a block-diagonal causal mask built from those positions, and SDPA with a mask
computes every (query, key) pair of the row before masking: a 512-token row of four 128-token examples computes
all 512² pairs where the examples need 4 × 128² / 2, one eighth. `mark(position_ids)` tags a packed batch's
positions with its examples' lengths; transformers' "sdpa" attention, given positions so tagged, runs SDPA once
per example, causal and unmasked (the CPU kernel then skips the upper triangle), on views of the row, and joins the
outputs with one copy. Positions not tagged (generation, evaluation on padded rows, anyone else's model) go to
transformers' own function, untouched.

The example path stands aside where the mask would say more than "causal within an example": a sliding window
shorter than an example, logit soft-capping, attention sinks, a position bias, a KV cache longer than the row.
Checkpointed blocks recompute through the same path: the tag lives on the positions tensor they are called with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

TAG = "_tunelab_examples"  # on a position_ids tensor: the lengths of the examples of each row, in order
_installed: dict = {}  # "sdpa": the function this one stands in front of


def mark(position_ids: torch.Tensor) -> None:
    """Tag a packed batch's (rows, length) positions with its examples' lengths (each starts at position 0) and make
    sure transformers' "sdpa" attention looks for the tag. CPU rows only: on a GPU, flash-attention's varlen kernels
    are the tool for this."""
    if position_ids.device.type != "cpu" or position_ids.dim() != 2:
        return
    length = position_ids.shape[1]
    lengths = []
    for row in position_ids:
        starts = (row == 0).nonzero()[:, 0].tolist()
        if not starts or starts[0] != 0:  # not a packed row as tunelab makes them
            return
        lengths.append([b - a for a, b in zip(starts, starts[1:] + [length])])
    setattr(position_ids, TAG, lengths)
    _install()


def _install() -> None:
    if _installed:
        return
    _installed["sdpa"] = AttentionInterface._global_mapping["sdpa"]
    AttentionInterface.register("sdpa", attention)


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
              **kwargs):
    """transformers' "sdpa" attention function, per example where the positions are tagged (see the module doc)."""
    rows = _examples(module, query, key, is_causal, kwargs)
    if rows is None:
        return _installed["sdpa"](module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)
    gqa = key.shape[1] != query.shape[1]
    parts = []
    for b, lengths in enumerate(rows):
        for q, k, v in zip(query[b].split(lengths, 1), key[b].split(lengths, 1), value[b].split(lengths, 1)):
            out = F.scaled_dot_product_attention(q[None], k[None], v[None], dropout_p=dropout, is_causal=True,
                                                 scale=scaling, enable_gqa=gqa)
            parts.append(out.transpose(1, 2))  # (1, n, heads, dim): the kernel's own layout, a view
    out = torch.cat(parts, dim=1)  # every example of every row in order: (1, rows x length, heads, dim)
    return out.view(query.shape[0], query.shape[2], query.shape[1], query.shape[3]), None


def _examples(module, query, key, is_causal, kwargs) -> list[list[int]] | None:
    positions = kwargs.get("position_ids")
    rows = getattr(positions, TAG, None) if isinstance(positions, torch.Tensor) else None
    if rows is None or query.device.type != "cpu" or query.shape[0] != len(rows):
        return None
    length = query.shape[2]
    if key.shape[2] != length or positions.shape[-1] != length or length < 2:  # a cache: keys beyond the row
        return None
    if is_causal is False or not getattr(module, "is_causal", True):
        return None
    if any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "sinks", "position_bias", "cache")):
        return None
    window = getattr(module, "sliding_window", None)
    if window is not None and max(max(r) for r in rows) > window:
        return None
    return rows
