"""Which layers a method wraps: the module-path helpers LoRA, DoRA, QLoRA, IA3, adapters and BitFit share."""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D


def is_linear(module: nn.Module) -> bool:
    """A layer a method may wrap: torch's Linear or GPT-2's Conv1D (a transposed linear)."""
    return isinstance(module, (nn.Linear, Conv1D))


def matches(path: str, name: str) -> bool:
    """`name` is the module path itself or a dotted tail of it (peft's rule for target_modules)."""
    return path == name or path.endswith("." + name)


def inside(path: str, prefixes: list[str]) -> bool:
    """`path` is one of `prefixes` or sits under one of them."""
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def body_linears(model: nn.Module, head: list[str]) -> list[str]:
    """Paths of the linear layers LoRA may wrap: not in the head, not the output (LM) projection."""
    out = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    return [p for p, m in model.named_modules() if is_linear(m) and m is not out and not inside(p, head)]


def available(paths: list[str]) -> str:
    """The distinct last names of `paths`, for an error message that lists what can be targeted."""
    return ", ".join(sorted({p.rsplit(".", 1)[-1] for p in paths}))
