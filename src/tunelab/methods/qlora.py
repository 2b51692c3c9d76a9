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
  scales again to 8 bits in blocks of 256 (~0.127 instead of 0.5 extra bits per weight).
- backends (`backend: auto | torchao | bitsandbytes`): bitsandbytes' `Linear4bit` on CUDA
  (auto picks it when installed and the model is on CUDA), else torchao's `NF4Tensor` with
  `linear_nf4` (CPU and CUDA; the backward saves the 4-bit weight, not a dequantized copy).
  Both are imported only here, and only when qlora is used.
- torchao facts (0.10 - 0.18): NF4Tensor always double-quantizes its scales (so
  `double_quant: false` needs bitsandbytes), and it needs the weight count to be a multiple
  of 64 * 256 = 16384 (no padding). Layers that do not fit stay in full precision; `apply`
  prints how many, and `memory_report` lists them. Tiny test models (hidden 32) have no layer
  that fits, so there qlora is plain LoRA; hidden 128 fits.
- `merge` dequantizes every 4-bit weight to the model dtype and folds LoRA in: a plain model.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

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
SCALER_BLOCK_SIZE = 256  # scales per block of the second (8-bit) quantization
DEFAULTS = {"quantize": "all-linear", "double_quant": True, "backend": "auto"}
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
    return to_nf4, linear_nf4, NF4Tensor


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

class NF4Linear(nn.Module):
    """A frozen linear layer holding its weight as a torchao NF4Tensor in (out, in) layout.

    y = x @ dequant(W)^T + b, through torchao's `linear_nf4`, whose backward keeps the 4-bit
    weight only. `fan_in_fan_out` remembers a GPT-2 Conv1D origin, for `dequantized()`.
    """

    def __init__(self, layer: nn.Linear | Conv1D):
        super().__init__()
        to_nf4, self._linear_nf4, _ = _torchao()
        self.fan_in_fan_out = isinstance(layer, Conv1D)
        weight = layer.weight.detach()
        weight = (weight.T if self.fan_in_fan_out else weight).contiguous()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(to_nf4(weight, BLOCK_SIZE, SCALER_BLOCK_SIZE), requires_grad=False)
        self.bias = layer.bias  # the same Parameter: frozen, or trained when LoRA's `bias` option says so

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._linear_nf4(x, self.weight)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """(out, in), in the dtype of the weight before quantization."""
        return self.weight.get_original_weight()

    def quantized_bytes(self) -> int:
        w = self.weight
        inner = (w.quantized_data, w.quantized_scalers, w.quantization_factor, w.scaler_mean, w.nf4)
        return sum(t.numel() * t.element_size() for t in inner)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 block={BLOCK_SIZE}"


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


def _fits(layer: nn.Module, backend: str) -> bool:
    """torchao does not pad: the weight count must fill whole blocks and whole blocks of scales."""
    return backend == "bitsandbytes" or layer.weight.numel() % (BLOCK_SIZE * SCALER_BLOCK_SIZE) == 0


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
            if _is_quantized(layer) or not _fits(layer, backend):
                continue
            parent, _, child = path.rpartition(".")
            q = NF4Linear(layer) if backend == "torchao" else _bnb_linear(layer, settings["double_quant"])
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
        why = (f"torchao needs a multiple of {BLOCK_SIZE * SCALER_BLOCK_SIZE} weights"
               if report["backend"] == "torchao" else "not quantizable")
        line += (f"; {len(report['unquantized_layers'])} left in full precision ({why}), "
                 f"{mb(report['unquantized_bytes'])}")
    return line


# -- the method ----------------------------------------------------------------------

def _settings(cfg: QLoraConfig) -> dict:
    return {"quantize": cfg.quantize, "double_quant": cfg.double_quant, "backend": cfg.backend}


def apply(model: PreTrainedModel, cfg: QLoraConfig, head: list[str]) -> PreTrainedModel:
    """LoRA as lora.apply does, then the frozen base linears to 4-bit; prints the memory saved."""
    _resolve_backend(cfg.backend, cfg.double_quant, _device(model))  # a missing package fails before any change
    if getattr(cfg, "init", "default") == "pissa":
        raise TunelabError("method.init=pissa cannot be combined with qlora: PiSSA moves the top singular directions "
                           "out of the base weights, and the saved adapter is re-applied to a base quantized from "
                           "the original weights, so a loaded model would differ from the trained one. Use "
                           "method.init=default or gaussian, or method.name=lora for PiSSA.")
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
    return model, [p for p in _candidates(model, settings) if _fits(model.get_submodule(p), backend)]


def save(model: nn.Module, out_dir: Path, base_model_path: str, head: list[str]) -> None:
    """The adapter exactly as lora.save writes it, plus qlora_config.json: how to re-quantize the base."""
    lora.save(model, out_dir, base_model_path, head)
    settings = {k: v for k, v in getattr(model, _ATTR, DEFAULTS).items() if k in DEFAULTS}
    settings.update(block_size=BLOCK_SIZE, scaler_block_size=SCALER_BLOCK_SIZE, quant_type="nf4")
    (Path(out_dir) / SETTINGS_NAME).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def load(model: PreTrainedModel, out_dir: Path) -> PreTrainedModel:
    """Attach the adapter to the full-precision base, then re-quantize the base as at training time.

    Any PEFT LoRA adapter loads this way; without qlora_config.json the defaults are used.
    """
    settings_file = Path(out_dir) / SETTINGS_NAME
    settings = dict(DEFAULTS)
    if settings_file.is_file():
        try:
            saved = json.loads(settings_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise TunelabError(f"'{settings_file}' is not valid JSON ({e}); re-save the adapter or delete the file "
                               f"to use the defaults.") from None
        settings.update({k: saved[k] for k in DEFAULTS if k in saved})
    _resolve_backend(settings["backend"], settings["double_quant"], _device(model))
    model = lora.load(model, out_dir)
    return quantize(model, settings)


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
