"""Cross-entropy of a causal LM without the logits of the whole batch.

The logits of a batch are positions x vocabulary floats: 8 x 256 positions at a 32,000-token vocabulary are
262 MB in float32, and as much again for their gradient. Here they exist one chunk of positions at a time
(CHUNK_BYTES of float32 logits):

- `summed_nll` (the training loss, a sum over target tokens): a fused linear + cross-entropy. Each chunk's
  gradient is known in the forward pass (softmax minus one-hot), so it is applied there and only the gradients
  of the hidden states (and of the head weight, when it trains) are kept for backward. The head's matmuls are
  the same three (two when the head is frozen) as the plain path; nothing is recomputed.
- `token_nll` (per-token losses, for evaluation and for DPO's per-sequence log-probs): chunk by chunk, each
  chunk checkpointed when it needs a gradient, so backward recomputes that chunk's logits instead of keeping them.

Heads other than a plain nn.Linear (a LoRA-wrapped head, Gemma's logit soft-capping) take the chunked path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

CHUNK_BYTES = 64 * 2**20


def chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab))


def _fusable(head: nn.Module, softcap) -> bool:
    return type(head) is nn.Linear and not softcap


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows):
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], rows):
            h, t = hidden[s : s + rows], targets[s : s + rows]
            logits = F.linear(h, weight, bias).float()
            target = logits.gather(1, t[:, None])[:, 0]
            # Four passes over the (rows, vocabulary) chunk, in place: max, subtract, exp, sum. The softmax's
            # division is left to the small side of each matmul: d(sum of nll)/d(logits) = (e - norm·one_hot) / norm
            # with e = exp(logits - max), so the rows of grad_h (and of h, for the head's own gradient) are divided
            # by norm instead of the chunk.
            peak = logits.amax(dim=-1, keepdim=True)
            e = logits.sub_(peak).exp_()
            norm = e.sum(dim=-1, keepdim=True)
            total += (peak[:, 0] + norm[:, 0].log() - target).sum()
            e[torch.arange(len(t), device=t.device), t] -= norm[:, 0]
            if grad_h is not None:  # bf16 under autocast, like the forward
                grad_h[s : s + rows] = ((e.to(weight.dtype) @ weight) / norm).to(grad_h.dtype)
            if grad_w is not None:
                grad_w += (e.T @ (h.to(e.dtype) / norm)).float()
            if grad_b is not None:
                grad_b += (e.T @ norm.reciprocal())[:, 0]
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = lambda g, dtype=None: None if g is None else (g * grad_out).to(dtype or g.dtype)
        return scale(grad_h), scale(grad_w, ctx.weight_dtype), scale(grad_b, ctx.weight_dtype), None, None


def _chunk_nll(head: nn.Module, softcap, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="none")


def token_nll(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap=None) -> torch.Tensor:
    """Negative log-likelihood of each target, (N,) from hidden (N, H) and targets (N,)."""
    rows = chunk_rows(head.weight.shape[0] if hasattr(head, "weight") else 32000)
    grad = torch.is_grad_enabled() and hidden.requires_grad
    parts = [checkpoint(_chunk_nll, head, softcap, hidden[s : s + rows], targets[s : s + rows], use_reentrant=False)
             if grad else _chunk_nll(head, softcap, hidden[s : s + rows], targets[s : s + rows])
             for s in range(0, hidden.shape[0], rows)]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def summed_nll(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap=None) -> torch.Tensor:
    """Sum of the targets' negative log-likelihoods, a scalar with its gradient."""
    if not _fusable(head, softcap):
        return token_nll(head, hidden, targets, softcap).sum()
    return _FusedLinearCE.apply(hidden, head.weight, head.bias, targets, chunk_rows(head.weight.shape[0]))
