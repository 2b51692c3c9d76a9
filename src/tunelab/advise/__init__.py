"""`tunelab advise`: how much memory each fine-tuning method needs, and which to use.

memory.py    the memory model: weights (a quantized base counted as NF4), gradients, optimizer state, the best
             copy, activations, logits, allocator and runtime, per method, on a meta-device model (`estimate`).
hardware.py  whether the machine multiplies bf16 fast (CPU flags avx512_bf16 / amx_bf16, GPU compute capability
             8.0+), which decides whether a bf16 frozen base is recommended (`bf16_matmul`).
recommend.py the budget (`parse_memory`, `machine_memory`), which methods fit it, the recommendations with their
             reasons (`advise`), and what the command prints (`format_advice`).
"""

from __future__ import annotations

from .hardware import FAST_BF16_CPU_FLAGS, bf16_matmul, cpu_flags
from .memory import (
                     ALLOCATOR_SLACK,
                     AUTO_CLASSES,
                     CUDA_CONTEXT,
                     EVAL_BATCH_DEFAULT,
                     FAMILIES,
                     FAMILY_OF,
                     HEAD_WIDTHS,
                     LOGIT_COPIES,
                     MERGEABLE,
                     METHOD_ORDER,
                     RUNTIME_FALLBACK,
                     TASKS,
                     activation_bytes,
                     count,
                     estimate,
                     eval_batch_that_fits,
                     eval_bytes,
                     logit_bytes,
                     loss_saved_bytes,
                     method_config,
                     model_config,
                     model_dims,
                     model_family,
                     nf4_bytes,
                     runtime_overhead,
)
from .recommend import advise, fmt_bytes, format_advice, machine_memory, parse_memory

# The names tests/test_advise.py has always called.
_method_config, _model_config, _dims, _family = method_config, model_config, model_dims, model_family

__all__ = ["ALLOCATOR_SLACK", "AUTO_CLASSES", "CUDA_CONTEXT", "EVAL_BATCH_DEFAULT", "FAMILIES", "FAMILY_OF",
           "FAST_BF16_CPU_FLAGS", "bf16_matmul", "cpu_flags",
           "HEAD_WIDTHS", "LOGIT_COPIES", "MERGEABLE", "METHOD_ORDER", "RUNTIME_FALLBACK", "TASKS", "activation_bytes",
           "advise", "count", "estimate", "eval_batch_that_fits", "eval_bytes", "fmt_bytes", "format_advice",
           "logit_bytes", "loss_saved_bytes", "machine_memory", "method_config", "model_config", "model_dims",
           "model_family", "nf4_bytes", "parse_memory", "runtime_overhead"]
