"""QLoRA (Dettmers et al. 2023): LoRA on a frozen base whose linear weights are stored 4-bit NF4.

The LoRA side is lora.py's, unchanged: the same `LoRALinear` layers (A and B in float32),
target selection, and the adapter saved in PEFT's LoRA layout, so
`peft.PeftModel.from_pretrained` loads it onto a full-precision base (outputs then differ
from ours by the quantization error only). The base is never saved: `load` re-quantizes
it from model.path, which is deterministic, so a loaded adapter reproduces the trained
model. What this file adds is the quantized base:

- which linears: `quantize: all-linear` (default, as the paper) quantizes every frozen
  linear layer of the body (not the head, not the LM output projection); `targets` only
  the base layers that LoRA wraps.
- NF4 with blocks of 64 weights, each with an absmax scale; `double_quant` quantizes those
  scales again to 8 bits in blocks of up to 256 (~0.127 instead of 0.5 extra bits per weight).
- backends (`backend: auto | torchao | bitsandbytes`): bitsandbytes' `Linear4bit` on CUDA
  (auto picks it when installed and the model is on CUDA), else torchao's `NF4Tensor` (CPU and
  CUDA) through `NF4Matmul`: like torchao's `linear_nf4`, the backward saves the 4-bit weight, not
  a dequantized copy, but the weight is dequantized by `dequantize` (bit for bit torchao's, 3.5x
  faster: a QLoRA step dequantizes every weight twice), into memory each thread reuses (`_scratch`).
  Both are imported only here, and only when qlora is used.
- torchao facts (0.10 - 0.18): NF4Tensor always double-quantizes its scales (so
  `double_quant: false` needs bitsandbytes), and it does not pad: the weight count must be a
  multiple of 64, and the number of 64-weight blocks a multiple of the scale block size. So
  the scales of each layer are quantized in blocks of the largest power of two <= 256 that
  divides its block count (`scaler_block_size`; SmolLM2's 192 x 576 k/v projections: 1728
  blocks, scale blocks of 64), and every linear qualifies but one whose weight count is not a
  multiple of 64, which stays full precision (`describe` says so). qlora_config.json records
  `scaler_block_size: "auto"`; a file from before the rule says 256, and `load` then
  re-quantizes as it was trained (layers not a multiple of 16384 in full precision).
- qlora_config.json also records `head`: the modules apply kept in full precision as the
  task's head. A multi-task run saves its heads apart from the adapter, so they are frozen
  when `load` runs and would otherwise be quantized with the base.
- quantized as it loads: `load_plan` tells models.building (through methods.loading, which
  pipeline.load, GRPO, multi-task runs and tunelab.load use) which linears to quantize; the model is read tensor by
  tensor and each of them becomes an NF4Linear as soon as its weights are read, so the
  full-precision base is never in memory whole. `apply` and `load` then let LoRA wrap those
  4-bit layers through weightless stand-ins of the Linear / Conv1D they were, and quantize
  whatever is left (a layer of the head modules' kind, a model read whole), so the result is
  the same as loading in full precision and quantizing after, NF4 data included. bitsandbytes
  keeps that second path: it quantizes as a layer moves to CUDA.
- torchao's NF4Tensor.clone re-quantizes with scale blocks of 256; `_exact_clone` makes it
  copy the packed tensors (and gives NF4 tensors torch.equal).
- `merge` dequantizes every 4-bit weight to the model dtype and folds LoRA in: a plain model.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .. import models
from ..config import QLoraConfig
from ..errors import TunelabError
from . import lora, targets

ARTIFACT = "adapter"  # PEFT-layout LoRA adapter; the 4-bit base is rebuilt from model.path
CHANGES_BASE = False  # LoRA over a frozen quantized base
MERGEABLE = True  # merge(): dequantized, then W + BA
SWITCHABLE = False  # the base it quantizes cannot be shared
VIRTUAL_TOKENS = None
QUANTIZES_BASE = True  # a 4-bit NF4 base (dry_apply: what apply would quantize)
TRAINABLE_DTYPE = "float32"  # A, B and the head float32 over the 4-bit base
DEFAULT_LR = 1e-3  # new low-rank modules, as LoRA
ACTIVATION_SHARE = lora.ACTIVATION_SHARE  # the same layers train as with LoRA
SETTINGS_NAME = "qlora_config.json"  # tunelab's own: how to re-quantize the base (peft ignores the file)
BLOCK_SIZE = 64  # weights per NF4 absmax scale (the paper's)
SCALER_BLOCK_SIZE = 256  # at most this many scales per block of the second (8-bit) quantization
# scaler_block_size "auto": per layer, the largest power of two <= 256 that divides its number of 64-weight blocks;
# a number (qlora_config.json written before the rule) is that size for every layer, layers it does not divide
# left in full precision, as they were trained
DEFAULTS = {"quantize": "all-linear", "double_quant": True, "backend": "auto", "scaler_block_size": "auto"}
_ATTR = "_tunelab_qlora"  # the settings apply() used, kept on the model for save() and memory_report()


# -- backends (imported lazily) -------------------------------------------------------

@contextmanager
def _quiet():
    """torchao logs warnings about optional CUDA extensions at import; they are not the user's concern."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _torchao():
    """(to_nf4, linear_nf4, NF4Tensor) from torchao, wherever this version keeps them."""
    try:
        with _quiet():
            try:
                from torchao.dtypes.nf4tensor import NF4Tensor, linear_nf4, to_nf4  # torchao <= 0.13
            except ImportError:
                from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor, linear_nf4, to_nf4
    except ImportError:
        raise TunelabError(
            "method.name=qlora stores the base model in 4-bit NF4 through torchao, which is not installed. "
            "Install it with `pip install torchao` (or `pip install 'tunelab[qlora]'`); on CUDA, "
            "`pip install bitsandbytes` with method.backend=bitsandbytes works too."
        ) from None
    _exact_clone(NF4Tensor)
    return to_nf4, linear_nf4, NF4Tensor


def _exact_clone(nf4_tensor: type) -> None:
    """Two ops of torchao's NF4Tensor, made exact: `clone` re-quantizes the dequantized weight with the default
    block sizes, which fails for a tensor whose scales are in blocks of fewer than 256 (and rounds again for the
    others), so it copies the packed tensors instead, as its detach does; `torch.equal`, missing, compares them
    (against a plain tensor: the dequantized weight). Done once; left as torchao's where its module lacks the
    pieces."""
    module = sys.modules[nf4_tensor.__module__]
    table, inner, rebuild = (getattr(module, n, None) for n in ("NF4_OPS_TABLE", "apply_to_inner_tensors",
                                                               "construct_nf4_args"))
    clone, equal = torch.ops.aten.clone.default, torch.ops.aten.equal.default
    if table is None or inner is None or rebuild is None or getattr(table.get(clone), "_tunelab", False):
        return

    # both called as torchao's dispatch calls its table: (op, args, kwargs)
    def copied(func, args, kwargs=None):
        return nf4_tensor(*rebuild(args[0], inner(args[0], func, args[1:], kwargs or {})))

    def same(func, args, kwargs=None):
        a, b = args
        if not (isinstance(a, nf4_tensor) and isinstance(b, nf4_tensor)):
            plain = lambda t: dequantize(t) if isinstance(t, nf4_tensor) else t  # torchao's weight, faster
            return torch.equal(plain(a), plain(b))
        return (a.shape == b.shape and a.dtype == b.dtype and a.block_size == b.block_size
                and a.scaler_block_size == b.scaler_block_size
                and all(torch.equal(x, y) for x, y in zip(inner(a, lambda t: t, (), {}).values(),
                                                           inner(b, lambda t: t, (), {}).values())))

    copied._tunelab = True
    table[clone], table[equal] = copied, same


def _bnb():
    try:
        import bitsandbytes
    except ImportError:
        raise TunelabError(
            "method.backend=bitsandbytes needs bitsandbytes, which is not installed. Install it with "
            "`pip install bitsandbytes` (CUDA), or set method.backend=torchao (CPU and CUDA)."
        ) from None
    return bitsandbytes


def _bnb_installed() -> bool:
    try:
        _bnb()
        return True
    except TunelabError:
        return False


def auto_backend(device_type: str) -> str:
    """What backend=auto picks on a `device_type` device: bitsandbytes on CUDA when installed, else torchao."""
    return "bitsandbytes" if device_type == "cuda" and _bnb_installed() else "torchao"


def _resolve_backend(requested: str, double_quant: bool, device: torch.device) -> str:
    """'torchao' or 'bitsandbytes'; fails here, before the model is touched, when it cannot work."""
    backend = auto_backend(device.type) if requested == "auto" else requested
    if backend == "bitsandbytes":
        _bnb()
        if device.type != "cuda":
            raise TunelabError(f"method.backend=bitsandbytes quantizes on CUDA, but the model is on {device}. Set "
                               f"model.device=cuda, or method.backend=torchao (or auto) to quantize on the CPU.")
        return backend
    _torchao()
    if not double_quant:
        raise TunelabError(
            "method.double_quant=false is not available with the torchao backend: torchao's NF4 tensor always "
            "quantizes its scales. Use method.double_quant=true, or method.backend=bitsandbytes on CUDA."
        )
    return backend


# -- the 4-bit layers ----------------------------------------------------------------

def dequantize(weight, out: torch.Tensor | None = None, codes: torch.Tensor | None = None) -> torch.Tensor:
    """A torchao NF4Tensor's full-precision weight, equal bit for bit to its `get_original_weight()`.

    torchao widens every 4-bit code to int64 and builds the result in about twelve passes over the weight (160 ms
    and ~400 MB of temporaries for a 2048 x 8192 weight on one core); a QLoRA step dequantizes each weight twice, in
    the forward and in the backward. Here each byte (two codes) picks its pair of NF4 values from a 256-row table
    and each block is scaled in place: 3 passes, 45 ms, the result itself the only large allocation. The products
    are torchao's own (the same NF4 value times the same dequantized block scale), so nothing rounds differently.
    Given `out` (the weight's element count, in its dtype) and `codes` (int32, any length), the weight is written
    into `out`, its bytes widened to indices `codes` at a time: no memory of its own (NF4Matmul's `_scratch`).
    """
    scales = weight.dequantize_scalers(weight.quantized_scalers, weight.quantization_factor, weight.scaler_block_size)
    nf4 = weight.nf4
    pairs = torch.stack([nf4.repeat_interleave(16), nf4.repeat(16)], dim=-1)  # byte hi<<4 | lo -> (nf4[hi], nf4[lo])
    packed = weight.quantized_data.view(-1)
    if out is None:
        out = pairs.index_select(0, packed.to(torch.int32))
    else:
        rows, step = out.view(-1, 2), codes.numel()
        for i in range(0, packed.numel(), step):
            part = packed[i:i + step]
            torch.index_select(pairs, 0, codes[:part.numel()].copy_(part), out=rows[i:i + step])
    return out.view(scales.numel(), -1).mul_(scales.unsqueeze(-1)).view(weight.shape)


_SCRATCH = threading.local()  # per thread: {(dtype, device, inference mode): (weights buffer, codes buffer)}
SCRATCH_CODES = 2**18  # bytes of a weight widened to int32 indices at a time by `_scratch` (1 MB)


def _scratch(weight) -> torch.Tensor:
    """`weight` dequantized into memory this thread reuses for every NF4 weight (grown to the largest seen), valid
    until the next call: what NF4Matmul multiplies by and lets go of at once.

    A fresh result (and its int32 codes: 1.5x the weight's bytes) for every weight in every forward and backward
    made the allocator hand out and take back 9 GB a step on the 1B bench model, in 2-64 MB pieces interleaved
    with the activations that stay alive until the backward: freed between them, they fragment the heap, or, once
    glibc has raised its mmap threshold, are faulted in afresh each time. The buffers cost the largest weight
    once (64 MB there) and 1 MB of codes."""
    held = getattr(_SCRATCH, "buffers", None)
    if held is None:
        held = _SCRATCH.buffers = {}
    # Memory made under torch.inference_mode is an inference tensor, which training may not write: one pair each.
    key, n = (weight.dtype, weight.device, torch.is_inference_mode_enabled()), weight.numel()
    buffers = held.get(key)
    if buffers is None or buffers[0].numel() < n:
        held.pop(key, None)  # the smaller pair is freed before the larger one is made
        buffers = held[key] = (torch.empty(n, dtype=weight.dtype, device=weight.device),
                               torch.empty(min(n // 2, SCRATCH_CODES), dtype=torch.int32, device=weight.device))
    return dequantize(weight, buffers[0][:n], buffers[1])


class NF4Matmul(torch.autograd.Function):
    """x @ dequant(W)^T for a frozen NF4 weight: the 4-bit weight is what the backward keeps, dequantized again there
    (a full-precision copy kept from the forward would undo what quantizing saved), each time into the thread's
    scratch memory (`_scratch`), which neither the output nor the input gradient refers to."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return torch.nn.functional.linear(x, _scratch(weight).to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # saved_tensors first: with gradient checkpointing, unpacking them re-runs the block's forward, whose
        # NF4Matmuls use the scratch memory too
        (weight,) = ctx.saved_tensors
        return grad @ _scratch(weight).to(grad.dtype), None


class NF4Linear(nn.Module):
    """A frozen linear layer holding its weight as a torchao NF4Tensor in (out, in) layout.

    y = x @ dequant(W)^T + b through `NF4Matmul`, whose backward keeps the 4-bit weight only (as torchao's
    `linear_nf4`, with a faster dequantization). `fan_in_fan_out` remembers a GPT-2 Conv1D origin, for
    `dequantized()`.
    """

    def __init__(self, layer: nn.Linear | Conv1D, scaler_block_size: int, device: torch.device | None = None):
        super().__init__()
        to_nf4, _, _ = _torchao()
        self.fan_in_fan_out = isinstance(layer, Conv1D)
        weight = layer.weight.detach().to(device or layer.weight.device)
        weight = (weight.T if self.fan_in_fan_out else weight).contiguous()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(to_nf4(weight, BLOCK_SIZE, scaler_block_size), requires_grad=False)
        self.bias = layer.bias  # the same Parameter: frozen, or trained when LoRA's `bias` option says so

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = NF4Matmul.apply(x, self.weight)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """(out, in), in the dtype of the weight before quantization."""
        return dequantize(self.weight)

    def quantized_bytes(self) -> int:
        w = self.weight
        inner = (w.quantized_data, w.quantized_scalers, w.quantization_factor, w.scaler_mean, w.nf4)
        return sum(t.numel() * t.element_size() for t in inner)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nf4 block={BLOCK_SIZE}, "
                f"scaler block={self.weight.scaler_block_size}")


def _bnb_linear(layer: nn.Linear | Conv1D, double_quant: bool) -> nn.Module:
    """bitsandbytes' Linear4bit (NF4, blocks of 64); the weight is quantized as it moves to CUDA."""
    bnb = _bnb()
    weight = layer.weight.detach()
    fan_in_fan_out = isinstance(layer, Conv1D)
    weight = (weight.T if fan_in_fan_out else weight).contiguous()
    device = weight.device
    module = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=layer.bias is not None, compute_dtype=weight.dtype,
                               compress_statistics=double_quant, quant_type="nf4", device="cpu")
    module.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, compress_statistics=double_quant,
                                      quant_type="nf4", blocksize=BLOCK_SIZE)
    module = module.to(device)
    module.bias = layer.bias  # the same Parameter (already on the device), trainable or not
    module.fan_in_fan_out = fan_in_fan_out
    module.original_dtype = weight.dtype
    return module


def _is_bnb4(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit" and hasattr(module, "original_dtype")


def _is_quantized(module: nn.Module) -> bool:
    return isinstance(module, NF4Linear) or _is_bnb4(module)


def _weight_info(module: nn.Module) -> tuple[int, torch.dtype, int]:
    """(number of weights, dtype before quantization, bytes now held for the weight)."""
    if isinstance(module, NF4Linear):
        return module.in_features * module.out_features, module.weight.dtype, module.quantized_bytes()
    state = module.weight.quant_state
    nbytes = module.weight.data.numel() * module.weight.data.element_size()
    for t in (state.absmax, getattr(state.state2, "absmax", None), getattr(state.state2, "code", None), state.offset):
        if isinstance(t, torch.Tensor):
            nbytes += t.numel() * t.element_size()
    return module.in_features * module.out_features, module.original_dtype, nbytes


def _dequantized(module: nn.Module) -> nn.Linear | Conv1D:
    """The plain layer back, its weight dequantized to the dtype it had before quantization."""
    if isinstance(module, NF4Linear):
        weight, dtype = module.dequantized_weight(), module.weight.dtype
    else:
        bnb = _bnb()
        weight, dtype = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state), module.original_dtype
    weight = weight.to(dtype)
    out_f, in_f = weight.shape
    if module.fan_in_fan_out:
        plain = Conv1D(out_f, in_f).to(device=weight.device, dtype=dtype)
        weight = weight.T
    else:
        plain = nn.Linear(in_f, out_f, bias=module.bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        plain.weight.copy_(weight)
    plain.weight.requires_grad_(False)
    if module.bias is not None:
        plain.bias = module.bias  # the same Parameter
    return plain


def scaler_block_size(numel: int, rule: int | str = "auto") -> int | None:
    """How many NF4 scales of a weight of `numel` weights torchao quantizes together, or None where it cannot
    quantize the weight. torchao does not pad: the weights must fill whole blocks of 64, and the scales whole blocks
    of scales. "auto": the largest power of two <= 256 that divides the number of blocks (gcd with 256), so any
    weight count that is a multiple of 64 qualifies (an odd number of blocks: scale blocks of 1, no saving on the
    scales); a number: that size, for the weights whose block count it divides."""
    if numel % BLOCK_SIZE:
        return None
    blocks = numel // BLOCK_SIZE
    if rule == "auto":
        return math.gcd(blocks, SCALER_BLOCK_SIZE)
    return int(rule) if blocks % int(rule) == 0 else None


def _fits(layer: nn.Module, backend: str, settings: dict) -> bool:
    return backend == "bitsandbytes" or scaler_block_size(layer.weight.numel(), settings["scaler_block_size"]) is not None


def _nf4(layer: nn.Module, settings: dict, device: torch.device | None = None) -> NF4Linear:
    return NF4Linear(layer, scaler_block_size(layer.weight.numel(), settings["scaler_block_size"]), device)


def _candidates(model: nn.Module, settings: dict) -> list[str]:
    """Paths of the frozen body linears the settings ask to quantize (quantized or not yet)."""
    if settings["quantize"] == "targets":
        return [p + ".base_layer" for p in lora.lora_layers(model)]
    out = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    head = list(settings.get("head") or [])
    paths = []
    for p, m in model.named_modules():
        if (_is_quantized(m) or targets.is_linear(m)) and m is not out and not targets.inside(p, head) \
                and not m.weight.requires_grad:
            paths.append(p)  # a frozen weight: LoRA's A/B and the (trainable) head are left out
    return paths


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def quantize(model: nn.Module, settings: dict | None = None, head: list[str] = ()) -> nn.Module:
    """Replace the chosen linears by 4-bit ones, in place: frozen ones outside `head` (trainable ones never)."""
    settings = {**DEFAULTS, **(settings or {}), "head": list(head)}
    backend = _resolve_backend(settings["backend"], settings["double_quant"], _device(model))
    with torch.no_grad():
        for path in _candidates(model, settings):
            layer = model.get_submodule(path)
            if _is_quantized(layer) or not _fits(layer, backend, settings):
                continue
            parent, _, child = path.rpartition(".")
            q = _nf4(layer, settings) if backend == "torchao" else _bnb_linear(layer, settings["double_quant"])
            setattr(model.get_submodule(parent), child, q)
    setattr(model, _ATTR, {**settings, "resolved_backend": backend})
    return model


def memory_report(model: nn.Module) -> dict:
    """Bytes of the 4-bit weights against what they took before, and the layers left in full precision."""
    settings = getattr(model, _ATTR, DEFAULTS)
    quantized, skipped = [], []
    for path in _candidates(model, settings):
        (quantized if _is_quantized(model.get_submodule(path)) else skipped).append(path)
    original = packed = 0
    for path in quantized:
        n, dtype, nbytes = _weight_info(model.get_submodule(path))
        original += n * torch.empty((), dtype=dtype).element_size()
        packed += nbytes
    skipped_bytes = sum(model.get_submodule(p).weight.numel() * model.get_submodule(p).weight.element_size() for p in skipped)
    return {
        "backend": settings.get("resolved_backend"), "double_quant": settings["double_quant"],
        "quantize": settings["quantize"], "block_size": BLOCK_SIZE,
        "scaler_block_size": settings.get("scaler_block_size", "auto"),
        "quantized_layers": len(quantized), "original_bytes": original, "quantized_bytes": packed,
        "ratio": original / packed if packed else None,
        "unquantized_layers": skipped, "unquantized_bytes": skipped_bytes,
    }


def describe(report: dict) -> str:
    mb = lambda b: f"{b / 1e6:.2f} MB"
    line = (f"qlora: quantized {report['quantized_layers']} linear layers to NF4 ({report['backend']}, block "
            f"{report['block_size']}{', double-quant' if report['double_quant'] else ''}), "
            f"{mb(report['original_bytes'])} -> {mb(report['quantized_bytes'])}")
    if report["ratio"]:
        line += f" ({report['ratio']:.1f}x smaller)"
    if report["unquantized_layers"]:
        fixed = report.get("scaler_block_size", "auto")
        why = (f"torchao needs a multiple of {BLOCK_SIZE * (1 if fixed == 'auto' else int(fixed))} weights"
               if report["backend"] == "torchao" else "not quantizable")
        line += (f"; {len(report['unquantized_layers'])} left in full precision ({why}), "
                 f"{mb(report['unquantized_bytes'])}")
    return line


# -- the method ----------------------------------------------------------------------

def _settings(cfg: QLoraConfig) -> dict:
    return {**DEFAULTS, "quantize": cfg.quantize, "double_quant": cfg.double_quant, "backend": cfg.backend}


def _saved_settings(out_dir: Path) -> dict:
    """The settings in an adapter directory's qlora_config.json; the defaults without one (any PEFT LoRA adapter)."""
    settings_file = Path(out_dir) / SETTINGS_NAME
    settings = dict(DEFAULTS)
    if not settings_file.is_file():
        return settings
    try:
        saved = json.loads(settings_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TunelabError(f"'{settings_file}' is not valid JSON ({e}); re-save the adapter or delete the file "
                           f"to use the defaults.") from None
    settings.update({k: saved[k] for k in DEFAULTS if k in saved})
    head = saved.get("head", [])
    if not (isinstance(head, list) and all(isinstance(h, str) for h in head)):
        raise TunelabError(f"'{settings_file}' has head {head!r}; it must be a list of module names (those kept in "
                           f"full precision). Re-save the adapter, or delete the key to quantize every frozen linear.")
    settings["head"] = head
    size = settings["scaler_block_size"]
    if size != "auto" and not (type(size) is int and 0 < size <= SCALER_BLOCK_SIZE and size & (size - 1) == 0):
        raise TunelabError(f"'{settings_file}' has scaler_block_size {size!r}; it must be \"auto\" or a power of two "
                           f"up to {SCALER_BLOCK_SIZE}. Re-save the adapter, or delete the key to use \"auto\".")
    return settings


@contextmanager
def _lora_over_quantized(model: nn.Module):
    """Let lora.apply / lora.load wrap layers that are 4-bit already (a base quantized as it loaded): each NF4Linear
    is replaced, while inside, by the Linear (or GPT-2 Conv1D) it came from, holding its bias and a weight of the
    right shape and dtype that takes no memory (one element, expanded); on leaving, they are put back, as the
    base_layer of the LoRA layer that wraps them or where they stood. The LoRA layers are then exactly those LoRA
    puts on a full-precision base, and the quantized layers those `quantize` would have made from it."""
    stand_ins: dict[int, NF4Linear] = {}
    for path, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            stand_in = _stand_in(module)
            stand_ins[id(stand_in)] = module
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, stand_in)
    try:
        yield
    finally:
        for path, module in list(model.named_modules()):
            if isinstance(getattr(module, "base_layer", None), nn.Module) and id(module.base_layer) in stand_ins:
                module.base_layer = stand_ins[id(module.base_layer)]
            elif id(module) in stand_ins:
                parent, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent), child, stand_ins[id(module)])


def _stand_in(q: NF4Linear) -> nn.Linear | Conv1D:
    shape = (q.in_features, q.out_features) if q.fan_in_fan_out else (q.out_features, q.in_features)
    with torch.device("meta"):
        layer = Conv1D(q.out_features, q.in_features) if q.fan_in_fan_out else nn.Linear(q.in_features, q.out_features)
    empty = torch.zeros((), dtype=q.weight.dtype, device=q.weight.device).expand(shape)
    layer.weight = nn.Parameter(empty, requires_grad=False)
    layer.bias = q.bias  # the same Parameter, which LoRA's `bias` option may train
    return layer


def apply(model: PreTrainedModel, cfg: QLoraConfig, head: list[str]) -> PreTrainedModel:
    """LoRA as lora.apply does, then the frozen base linears to 4-bit (those not quantized as the model loaded);
    prints the memory saved."""
    _resolve_backend(cfg.backend, cfg.double_quant, _device(model))  # a missing package fails before any change
    if getattr(cfg, "init", "default") == "pissa":
        raise TunelabError("method.init=pissa cannot be combined with qlora: PiSSA moves the top singular directions "
                           "out of the base weights, and the saved adapter is re-applied to a base quantized from "
                           "the original weights, so a loaded model would differ from the trained one. Use "
                           "method.init=default or gaussian, or method.name=lora for PiSSA.")
    with _lora_over_quantized(model):
        model = lora.apply(model, cfg, head)  # every LoRA option of the config (QLoraConfig is a LoraConfig)
    quantize(model, _settings(cfg), head)
    print(describe(memory_report(model)), flush=True)
    return model


def dry_apply(model: PreTrainedModel, cfg: QLoraConfig, head: list[str], device_type: str) -> tuple[nn.Module, list[str]]:
    """What apply would do to a model on the meta device, where 4-bit tensors cannot be built (advise's memory model):
    LoRA as apply adds it, and the paths of the linears apply would store in 4-bit on a `device_type` device (with
    cfg.backend, auto resolved as apply resolves it). Nothing is quantized, so no backend needs to be installed."""
    model = lora.apply(model, cfg, head)
    backend = auto_backend(device_type) if cfg.backend == "auto" else cfg.backend
    settings = {**_settings(cfg), "head": list(head)}
    return model, [p for p in _candidates(model, settings) if _fits(model.get_submodule(p), backend, settings)]


def load_plan(cfg: QLoraConfig, device: torch.device, saved: Path | None = None):
    """For models.building: the linears to quantize as the base loads, each as soon as its weights are read (so
    the full-precision base is never in memory whole), on `device`, with the settings of `cfg` or, for a saved
    adapter (`saved`, or cfg.init_from), those in its qlora_config.json. The linears chosen are those `apply` (or
    `load`) would quantize that can be told from the bare model: every body linear outside the head modules
    models.head_modules names (with quantize: targets, those of them LoRA wraps). A layer left out is quantized
    by apply as before. None (load as before, quantize after) for the bitsandbytes backend, which quantizes as a
    layer moves to CUDA, and for an init_from adapter with quantize: targets, whose targets are its own."""
    saved = saved or getattr(cfg, "init_from", None)
    settings = _saved_settings(saved) if saved else _settings(cfg)
    backend = _resolve_backend(settings["backend"], settings["double_quant"], device)
    if backend != "torchao" or (settings["quantize"] == "targets" and getattr(cfg, "init_from", None)):
        return None

    def plan(skeleton: nn.Module) -> dict:
        head = models.head_modules(skeleton)
        if settings["quantize"] == "targets":
            # the layers LoRA wraps, found as lora.apply finds them, on a copy (parameters on meta: no memory)
            wrapped = lora.apply(copy.deepcopy(skeleton), cfg, head)
            paths = list(lora.lora_layers(wrapped))
        else:
            paths = targets.body_linears(skeleton, head)
        return {p: (lambda layer: _nf4(layer, settings, device)) for p in paths
                if _fits(skeleton.get_submodule(p), backend, settings)}
    return plan


def save(model: nn.Module, out_dir: Path, base_model_path: str, head: list[str]) -> None:
    """The adapter exactly as lora.save writes it, plus qlora_config.json: how to re-quantize the base."""
    lora.save(model, out_dir, base_model_path, head)
    used = getattr(model, _ATTR, DEFAULTS)
    settings = {k: v for k, v in {**DEFAULTS, **used}.items() if k in DEFAULTS}
    # the modules apply kept in full precision as the task's head: a head saved apart from the adapter (a
    # multi-task run's) is frozen when the adapter loads, and would otherwise be quantized with the base
    settings["head"] = list(used.get("head", []))
    settings.update(block_size=BLOCK_SIZE, max_scaler_block_size=SCALER_BLOCK_SIZE, quant_type="nf4")
    (Path(out_dir) / SETTINGS_NAME).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def load(model: PreTrainedModel, out_dir: Path) -> PreTrainedModel:
    """Attach the adapter to the base (full precision, or quantized as it loaded with `load_plan`), then
    re-quantize the base as at training time.

    Any PEFT LoRA adapter loads this way; without qlora_config.json the defaults are used.
    """
    settings = _saved_settings(out_dir)
    _resolve_backend(settings["backend"], settings["double_quant"], _device(model))
    with _lora_over_quantized(model):
        model = lora.load(model, out_dir)
    return quantize(model, settings, settings["head"])


def merge(model: nn.Module) -> nn.Module:
    """Dequantize every 4-bit weight to the model dtype, then fold LoRA in (lora.merge): a plain model."""
    with torch.no_grad():
        for path, module in list(model.named_modules()):
            if _is_quantized(module):
                parent, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent), child, _dequantized(module))
    if hasattr(model, _ATTR):
        delattr(model, _ATTR)
    return lora.merge(model)
