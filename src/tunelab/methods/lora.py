"""LoRA: a trainable low-rank update B @ A * (alpha / r) beside frozen linear layers.

Modelled on torchtune's lora.py: one small module and plain functions. The
child names (`base_layer`, `lora_A`, `lora_B`) and the saved file layout match
Hugging Face PEFT, so an adapter saved here loads with
`peft.PeftModel.from_pretrained` and a PEFT adapter loads here. PEFT itself is
not imported; the layout facts it relies on (checked against peft 0.21):

- adapter_model.safetensors keys are `base_model.model.<module path>.lora_A.weight`
  (shape (r, in)) and `...lora_B.weight` (shape (out, r)), also for GPT-2's
  Conv1D; fully trained modules (`modules_to_save`) are stored under their
  plain state-dict names, `base_model.model.<module path>.<param>`.
- adapter_config.json needs peft_type "LORA", r, lora_alpha, target_modules
  (names matched as `path == name or path.endswith("." + name)`), modules_to_save
  and fan_in_fan_out (true for Conv1D, whose weight is stored (in, out)).

- options (peft 0.21 semantics): `use_rslora` scales by alpha / sqrt(r); init "gaussian"
  draws A ~ N(0, std 1/r) (std 1/r, not 1/sqrt(r): peft's reset_lora_parameters);
  `rank_pattern` / `alpha_pattern` keys are regexes, and a module takes the value of
  the first key with `re.match(rf"(.*\\.)?({key})$", path)` (peft's get_pattern_key);
  `layers_to_transform` filters list targets matched by suffix (not exact full paths),
  the block index being the first `<name>.<digits>.` after at least one segment
  (`layers_pattern` names the list, e.g. "layer" or "h"); bias "all" trains every
  parameter named `*.bias`, "lora_only" the base biases of the wrapped layers, and they
  are saved under their state-dict names, which for a wrapped layer is
  `<module path>.base_layer.bias` (what peft 0.21 writes and reads back).
- PiSSA (init "pissa", peft's `pissa_init`): with W = U S V^T, A = sqrt(S_r / s) V_r^T,
  B = U_r sqrt(S_r / s) and the base weight becomes W - s·B·A, so outputs are unchanged
  at init. The saved adapter is converted to a plain LoRA delta on the original base,
  as peft's `save_pretrained(path_initial_model_for_weight_conversion=...)` does:
  A' = [A; A0], B' = [B, -B0], r' = 2r and alpha' = 2·alpha (sqrt(2)·alpha with
  rsLoRA), so W + s'·B'A' = W_res + s·BA. The adapter dir thus loads onto the
  unmodified base model (by tunelab and peft, init_lora_weights true). A0 and B0 are
  kept on the layer as non-persistent buffers. While the PiSSA model is live its base
  layers hold the residual, so `adapters_disabled` runs W_res, not W (peft too).

DoRA (dora.py) subclasses `LoRALinear` and reuses everything below: a layer's saved
tensors are its own state minus `base_layer` (peft's rule too), and `use_dora`
and `merged_weight` come from the layer class. DoRA's update depends on W + s·BA
only, so the PiSSA conversion holds for it too.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from ..config import LoraConfig
from ..errors import TunelabError
from . import precision
from .layout import PEFT_CONFIG, check_head, copy_checked, peft_head, peft_task_type, read_peft, write_peft
from .targets import available, body_linears, inside, matches

ARTIFACT = "adapter"  # PEFT-layout adapter dir; the base model is loaded from model.path
CHANGES_BASE = False  # adds low-rank matrices beside frozen weights (its `bias` option aside)
MERGEABLE = True  # merge(): W + BA/r·alpha
SWITCHABLE = True  # its layers swap in and out; with bias all/lora_only named.py refuses it, as it trains base biases
VIRTUAL_TOKENS = None
QUANTIZES_BASE = False
TRAINABLE_DTYPE = "float32"  # A, B and the head float32 over a bf16 base (bias=all/lora_only biases are the base's)
DEFAULT_LR = 1e-3  # new low-rank modules
# of full fine-tuning's saved activations, default targets and dropout 0.05: the wrapped layers' inputs (which
# LoRABranch keeps, as full fine-tuning does for its weight gradients) and a dropout mask of at most a byte each
ACTIVATION_SHARE = {"llama": 0.86, "gpt2": 0.85, "bert": 0.75}
PREFIX = "base_model.model."

# The LoRA paper's choice (attention query and value) per architecture; names from peft's mapping table.
DEFAULT_TARGETS = {
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "layoutlm", "camembert", "ernie"], ["query", "value"]),
    **dict.fromkeys(["distilbert"], ["q_lin", "v_lin"]),
    **dict.fromkeys(["deberta-v2"], ["query_proj", "value_proj"]),
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["c_attn"]),
    **dict.fromkeys(["bloom", "gpt_neox", "falcon"], ["query_key_value"]),
    **dict.fromkeys(["t5", "mt5"], ["q", "v"]),
    **dict.fromkeys(
        ["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3",
         "opt", "bart", "gptj", "gpt_neo", "stablelm", "olmo", "olmo2", "smollm3"],
        ["q_proj", "v_proj"],
    ),
}

# Below this dropout rate a CPU draws the gaps between dropped elements instead of a mask: fewer random numbers
# (p·n, each costing about two a mask element costs) and cheaper zeroing (p·n writes). Above it the mask wins.
SPARSE_DROP_BELOW = 0.15


def drop_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Which elements dropout zeroes, each independently with probability p.

    On CPU at p < SPARSE_DROP_BELOW: the flat indices of the dropped elements (int64, ascending), drawn as the
    geometric gaps between them, so only about p·n numbers are drawn (mt19937, which draws them, runs on one
    core). Otherwise a bool tensor of `shape`, True where dropped, drawn as 16-bit integers against a threshold
    (p rounded to a multiple of 2^-15): two a 32-bit draw, and 4x faster than `bernoulli_` on floats.
    """
    n = math.prod(shape)
    if device.type == "cpu" and p < SPARSE_DROP_BELOW:
        return _dropped_indices(n, p, device)
    # random_() fills an int32 with 31 random bits: as two int16, the low half is uniform over [-2^15, 2^15) and
    # the high half over [0, 2^15). Thresholds 2t - 2^15 and t drop either with probability t / 2^15.
    t = min(round(p * 2**15), 2**15 - 1)
    low_high = [2 * t - 2**15, t] if sys.byteorder == "little" else [t, 2 * t - 2**15]
    bits = torch.empty((n + 1) // 2, dtype=torch.int32, device=device).random_().view(torch.int16).view(-1, 2)
    drop = bits < torch.tensor(low_high, dtype=torch.int16, device=device)
    return drop.view(-1)[:n].reshape(shape)


def _dropped_indices(n: int, p: float, device: torch.device) -> torch.Tensor:
    # The gap G from one dropped element to the next is geometric, P(G = g) = (1-p)^(g-1)·p, drawn by inversion:
    # G = floor(log(U) / log(1-p)) + 1 with U uniform on (0, 1], in float64 so each probability holds to 2^-53.
    log_keep, parts, last = math.log1p(-p), [], -1
    while True:
        left = (n - 1 - last) * p
        u = torch.rand(int(left + 8 * math.sqrt(left) + 64), dtype=torch.float64, device=device)  # [0, 1)
        positions = u.neg_().log1p_().div_(log_keep).floor_().add_(1).cumsum_(0).add_(last).to(torch.int64)
        last = int(positions[-1])
        if last >= n:  # past the end: keep those inside (8 sigma of draws: one round but for ~1e-15 of calls)
            parts.append(positions[: int(torch.searchsorted(positions, n))])
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        parts.append(positions)


def zero_dropped_(t: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Zero, in place, the elements of the contiguous t that `drop` (from drop_mask, for t's shape) names."""
    if drop.dtype == torch.bool:
        return t.masked_fill_(drop.view(t.shape), 0)
    # put_ writes p·n elements on one core; index_fill_ cost 3.5x as much here (it splits them across threads)
    t.view(-1).put_(drop, t.new_zeros(drop.shape))
    return t


def dropped(drop: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """drop_mask's answer as a bool tensor of `shape`, True where dropped."""
    if drop.dtype == torch.bool:
        return drop.reshape(shape)
    return torch.zeros(math.prod(shape), dtype=torch.bool, device=drop.device).index_fill_(0, drop, True).reshape(shape)


class LoRABranch(torch.autograd.Function):
    """`result + s·B·A·drop(x)` as one autograd node, computed so that a LoRA step costs less than a full one.

    What nn.Dropout -> nn.Linear -> nn.Linear -> mul -> add would do on their own, and this does not:
    - store the dropped input (4 bytes an element, per wrapped layer) for A's gradient: only the mask is kept (at
      p 0.05 on CPU the dropped elements' indices, 0.4 bytes an element; else 1 byte), and x itself, which the base
      layer already holds; the dropped input is rebuilt in the backward (at a low rate by zeroing x's dropped
      elements for the matmul and putting them back: no copy);
    - scale the (tokens, out) update by s and then add it to the base output: s and 1/(1 - p) scale the small
      (tokens, r) tensor instead, and the add is the matmul's own (addmm);
    - copy a bf16 input to float32 for the whole backward: it is converted where a matmul needs it.
    Sums are grouped as peft groups them (result + (x·Aᵀ)·Bᵀ, in the adapters' dtype, rounded once).
    """

    @staticmethod
    def forward(ctx, result, x, a, b, scaling: float, p: float):
        drop, h, ctx.scale = _adapter_forward(x, a, scaling, p)
        ctx.save_for_backward(x, drop, a, b, h)
        if result.dtype == a.dtype and result._base is None and result.is_contiguous():
            # Into the base output itself: no backward reads it (a linear layer keeps its input, not its output),
            # and a fresh (tokens, out) tensor would cost its page faults as well as the copy.
            result.view(-1, result.shape[-1]).addmm_(h, b.T)
            ctx.mark_dirty(result)
            return result
        out = torch.addmm(result.reshape(-1, result.shape[-1]).to(a.dtype), h, b.T)
        return out.reshape(result.shape).to(result.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, drop, a, b, h = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(a.dtype)
        need_result, need_x, need_a, need_b = ctx.needs_input_grad[:4]
        grad_x, grad_a, grad_b = _adapter_backward(g, x, drop, a, b, h, ctx.scale, need_x, need_a, need_b)
        if grad_x is not None:
            grad_x = grad_x.reshape(x.shape).to(x.dtype)
        return grad if need_result else None, grad_x, grad_a, grad_b, None, None


class LoRALinearStep(torch.autograd.Function):
    """`x·Wᵀ + bias + s·B·A·drop(x)` over a frozen nn.Linear, base and adapter as one autograd node.

    LoRABranch beside the base layer's own node costs, per wrapped layer and step, a second node (its Python and
    bookkeeping) and one more pass over (tokens, in): the two input gradients, the base's and the adapter's, each a
    fresh tensor that autograd then adds. Here the adapter's input gradient is made first, its dropped elements
    zeroed, and the base's `g·W` is added into it by the matmul itself (addmm). Same saved tensors as LoRABranch
    (x, the mask, the small (tokens, r) product); the frozen weight is a parameter, kept anyway.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling: float, p: float):
        flat = x.reshape(-1, x.shape[-1])
        out = torch.addmm(bias, flat, weight.T) if bias is not None else flat @ weight.T
        drop, h, ctx.scale = _adapter_forward(x, a, scaling, p)
        out.addmm_(h, b.T)
        ctx.save_for_backward(x, drop, weight, a, b, h)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, drop, weight, a, b, h = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        grad_x, grad_a, grad_b = _adapter_backward(g, x, drop, a, b, h, ctx.scale, need_x, need_a, need_b)
        if grad_x is not None:  # the base's share, added by the matmul into the adapter's fresh tensor
            grad_x = grad_x.addmm_(g, weight).view(x.shape)
        grad_bias = g.sum(0) if need_bias else None
        return grad_x, None, grad_bias, grad_a, grad_b, None, None


def _adapter_forward(x: torch.Tensor, a: torch.Tensor, scaling: float, p: float):
    """(the dropout mask or None, s/(1-p) · drop(x)·Aᵀ as (tokens, r), that scale): the adapter's half of a forward."""
    drop = drop_mask(x.shape, p, x.device) if p > 0 else None
    scale = scaling / (1 - p)
    return drop, _with_dropped_input(x, drop, a.dtype, lambda xd: xd @ a.T).mul_(scale), scale


def _adapter_backward(g, x, drop, a, b, h, scale: float, need_x: bool, need_a: bool, need_b: bool):
    """The adapter's gradients from g (tokens, out): its share of x's as a fresh (tokens, in) tensor with the dropped
    elements zeroed (for the caller to add to or convert in place), A's and B's; None where not needed."""
    # hᵀ·g, transposed back: the same sums as gᵀ·h, twice as fast through MKL at r 16 (its kernel for a 16-wide
    # result is the slow one)
    grad_b = (h.T @ g).T if need_b else None
    grad_x = grad_a = None
    if need_x or need_a:
        gh = (g @ b).mul_(scale)  # (tokens, r)
        if need_a:
            grad_a = _with_dropped_input(x, drop, a.dtype, lambda xd: gh.T @ xd)
        if need_x:
            grad_x = gh @ a
            if drop is not None:
                zero_dropped_(grad_x, drop)
    return grad_x, grad_a, grad_b


def _with_dropped_input(x: torch.Tensor, drop: torch.Tensor | None, dtype: torch.dtype, product):
    """product(x with the dropped elements zeroed, as (tokens, in) in `dtype`), unscaled (the caller scales the small
    product). `product` must return a new tensor (a matmul) and keep no reference to its argument."""
    flat = x.reshape(-1, x.shape[-1])
    if drop is None:
        return product(flat.to(dtype))
    if drop.dtype == torch.bool or x.dtype != dtype or not x.is_contiguous() or x.is_inference():
        return product(zero_dropped_(flat.to(dtype, memory_format=torch.contiguous_format, copy=True), drop))
    # Sparse drops: zeroed in x's own memory and put back before returning. A copy of x per wrapped layer, in the
    # forward and again in the backward, costs more than three passes over p·n elements (gather, zero, scatter).
    # `.data` bumps no version counter: the sibling layers that read the same x keep it for their backward, and
    # they find it as it was, bit for bit, once this returns.
    raw = x.data.view(-1)
    values = raw.take(drop)
    raw.put_(drop, torch.zeros_like(values))
    try:
        return product(raw.view(flat.shape))
    finally:
        raw.put_(drop, values)


def _one_step(base: nn.Module, x: torch.Tensor, a: torch.Tensor) -> bool:
    """Whether LoRALinearStep may stand in for `base(x)` + LoRABranch: a plain frozen nn.Linear (no hooks of its own
    or global ones, which calling it would run; its weight a plain tensor, not a quantized or sharded subclass) in
    the adapters' dtype."""
    weight = base.__dict__["_parameters"].get("weight") if type(base) is nn.Linear else None
    return (weight is not None and type(weight.data) is torch.Tensor and not weight.requires_grad
            and weight.dtype == a.dtype == x.dtype and x.is_contiguous()
            and not (base._forward_hooks or base._forward_pre_hooks or _global_hooks()))


def _global_hooks() -> bool:
    module = nn.modules.module
    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


class LoRALinear(nn.Module):
    """`base_layer(x) + lora_B(lora_A(dropout(x))) * alpha / r`, with the base layer frozen."""

    use_dora = False  # written to adapter_config.json; DoRALinear sets it

    def __init__(self, base_layer: nn.Linear | Conv1D, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        weight = base_layer.weight
        in_features, out_features = weight.shape[::-1] if isinstance(base_layer, nn.Linear) else weight.shape
        # Adapters stay in float32 under a bf16 base (as peft does): small updates survive rounding.
        dtype = torch.promote_types(weight.dtype, torch.float32)
        self.base_layer = base_layer.requires_grad_(False)
        self.lora_A = nn.Linear(in_features, r, bias=False, device=weight.device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=weight.device, dtype=dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.use_rslora, self.init = False, "default"
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.adapter_disabled = False  # set by methods.adapters_disabled: compute the base layer only
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # so the wrapped model starts out equal to the base

    def configure(self, use_rslora: bool = False, init: str = "default") -> None:
        """Set the scaling rule and re-initialise A and B; "default" keeps the constructor's draw.

        A separate step (not constructor arguments) so subclasses with the plain signature get it too.
        """
        self.use_rslora, self.init = use_rslora, init
        self.scaling = self.alpha / (math.sqrt(self.r) if use_rslora else self.r)
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1 / self.r)
                nn.init.zeros_(self.lora_B.weight)
            elif init == "pissa":
                self._pissa_init()
            elif init != "default":
                raise TunelabError(f"Unknown LoRA init '{init}'; use default, gaussian or pissa.")

    def _pissa_init(self) -> None:
        weight = self.base_layer.weight
        w = weight.float().T if self.fan_in_fan_out else weight.float()  # (out, in)
        if self.r > min(w.shape):
            raise TunelabError(f"PiSSA needs r <= min(out, in) = {min(w.shape)} of every adapted layer, got r={self.r}; "
                               f"lower method.r (or its rank_pattern entry).")
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = torch.sqrt(s[: self.r] / self.scaling)
        a, b = root[:, None] * vh[: self.r], u[:, : self.r] * root[None, :]
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.copy_(b)
        residual = w - self.scaling * (b @ a)
        weight.copy_((residual.T if self.fan_in_fan_out else residual).to(weight.dtype))
        # The initial A0, B0: save() turns the adapter into a plain LoRA delta with them (not saved themselves).
        self.register_buffer("pissa_A0", self.lora_A.weight.detach().clone(), persistent=False)
        self.register_buffer("pissa_B0", self.lora_B.weight.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapter_disabled:
            return self.base_layer(x)
        p = self.dropout.p if self.training and isinstance(self.dropout, nn.Dropout) else 0.0
        if not torch.is_autocast_enabled(x.device.type):
            base, a = self.base_layer, self.lora_A.weight
            if _one_step(base, x, a):
                return LoRALinearStep.apply(x, base.weight, base.bias, a, self.lora_B.weight, self.scaling, p)
            return LoRABranch.apply(base(x), x, a, self.lora_B.weight, self.scaling, p)
        result = self.base_layer(x)
        # Under autocast the matmuls' dtypes are autocast's to choose: the plain modules, in peft's order.
        x = x.to(self.lora_A.weight.dtype)
        return (result + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update in the base weight's layout: (out, in) for Linear, (in, out) for Conv1D."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    def merged_weight(self) -> torch.Tensor:
        """The base weight with the update folded in, in float32 (rounded once, by the caller)."""
        return self.base_layer.weight.float() + self.delta_weight()


# -- choosing layers ----------------------------------------------------------

def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[model_type])
    raise TunelabError(
        f"LoRA has no default target layers for model type '{model_type}'. Set method.target_modules to the "
        f"names of the linear layers to adapt (e.g. [q_proj,v_proj]) or to all-linear; this model's linear "
        f"layers are: {available(body_linears(model, []))}."
    )


def _layer_index(path: str, layers_pattern: str | list[str] | None) -> int | None:
    """peft's block index of a module path: the first `<segment>.<digits>.` (or `<layers_pattern>.<digits>.`)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if match:
                break
    return int(match["idx"]) if match else None


def _pattern_value(patterns: dict | None, path: str, default):
    """peft's get_pattern_key: the value of the first key that matches the path or a dotted tail of it."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _select(model: nn.Module, targets: list[str] | str | None, head: list[str],
            layers_to_transform: list[int] | int | None = None, layers_pattern: str | None = None) -> list[str]:
    candidates = body_linears(model, head)
    if targets is None:
        targets = default_targets(model)
    if isinstance(layers_to_transform, int):
        layers_to_transform = [layers_to_transform]
    if layers_to_transform:  # peft: exact full paths are taken as named; suffix matches must sit in those blocks
        if isinstance(targets, str) and targets != "all-linear":
            raise TunelabError("method.layers_to_transform cannot be used with a regex target_modules string (as in "
                               "peft); list the module names instead.")
        chosen = _select(model, targets, head)
        exact = set(targets) if isinstance(targets, list) else set()
        chosen = [p for p in chosen if p in exact or _layer_index(p, layers_pattern) in layers_to_transform]
        if not chosen:
            found = sorted({i for p in candidates if (i := _layer_index(p, layers_pattern)) is not None})
            raise TunelabError(f"method.layers_to_transform {list(layers_to_transform)} selects no target layer; the "
                               f"block indices found{' under ' + repr(layers_pattern) if layers_pattern else ''} are "
                               f"{found or 'none (set method.layers_pattern to the name of the block list)'}.")
        return chosen
    if targets == "all-linear":
        return candidates
    if isinstance(targets, str):  # peft's convention: a single string is a regex on the full module path
        chosen = [p for p in candidates if re.fullmatch(targets, p)]
        if not chosen:
            raise TunelabError(f"LoRA target pattern '{targets}' matches no linear layer of the model. Set "
                               f"method.target_modules to names among: {available(candidates)}.")
        return chosen
    missing = [t for t in targets if not any(matches(p, t) for p in candidates)]
    if missing:
        raise TunelabError(
            f"method.target_modules names {', '.join(repr(t) for t in missing)}, which matches no linear layer "
            f"outside the head. Available linear layer names: {available(candidates)}."
        )
    return [p for p in candidates if any(matches(p, t) for t in targets)]


# -- the method ----------------------------------------------------------------

def apply(model: PreTrainedModel, cfg: LoraConfig, head: list[str], layer_cls=LoRALinear) -> PreTrainedModel:
    """Freeze everything, wrap the target layers with LoRA, train the head modules (and cfg.bias) in full."""
    return _apply(model, cfg.target_modules, cfg.r, cfg.alpha, cfg.dropout, head, layer_cls,
                  use_rslora=cfg.use_rslora, init=cfg.init, bias=cfg.bias, rank_pattern=cfg.rank_pattern,
                  alpha_pattern=cfg.alpha_pattern, layers_to_transform=cfg.layers_to_transform,
                  layers_pattern=cfg.layers_pattern)


def _apply(model, targets, r: int, alpha: float, dropout: float, head: list[str], layer_cls=LoRALinear, *,
           use_rslora: bool = False, init: str = "default", bias: str = "none", rank_pattern: dict | None = None,
           alpha_pattern: dict | None = None, layers_to_transform: list[int] | None = None,
           layers_pattern: str | None = None):
    """Wrap the chosen layers in `layer_cls` (LoRALinear, or a subclass such as DoRALinear)."""
    check_head(model, head)
    if bias not in ("none", "all", "lora_only"):
        raise TunelabError(f"LoRA bias '{bias}' is not one of none, all, lora_only.")
    paths = _select(model, targets, head, layers_to_transform, layers_pattern)
    model.requires_grad_(False)
    for path in paths:
        parent, _, child = path.rpartition(".")
        owner = model.get_submodule(parent)
        layer = layer_cls(getattr(owner, child), _pattern_value(rank_pattern, path, r),
                          _pattern_value(alpha_pattern, path, alpha), dropout)
        layer.configure(use_rslora=use_rslora, init=init)
        if init == "pissa" and hasattr(layer, "lora_magnitude_vector"):  # DoRA: ||W_res + s·BA||, as peft computes it
            with torch.no_grad():
                layer.lora_magnitude_vector.copy_(layer._weight_norm(layer._out_in(
                    layer.base_layer.weight.to(layer.lora_A.weight.dtype))))
        setattr(owner, child, layer)
    for name in head:
        model.get_submodule(name).requires_grad_(True)
    for name, p in _trainable_biases(model, bias).items():
        p.requires_grad_(True)
    return model


def _trainable_biases(model: nn.Module, bias: str) -> dict[str, nn.Parameter]:
    """peft's rule: "all" = every parameter named bias; "lora_only" = the base biases of the wrapped layers."""
    if bias == "all":
        return {n: p for n, p in model.named_parameters() if n == "bias" or n.endswith(".bias")}
    if bias == "lora_only":
        return {f"{path}.base_layer.bias": layer.base_layer.bias for path, layer in lora_layers(model).items()
                if layer.base_layer.bias is not None}
    return {}


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {p: m for p, m in model.named_modules() if isinstance(m, LoRALinear)}


def _adapter_tensors(path: str, layer: LoRALinear) -> dict[str, torch.Tensor]:
    """Saved key -> live parameter: everything the layer holds but its base layer (lora_A/B, DoRA's magnitude)."""
    return {f"{PREFIX}{path}.{key}": t for key, t in layer.state_dict(keep_vars=True).items()
            if not key.startswith("base_layer.")}


def _target_names(model: nn.Module, paths: list[str]) -> list[str]:
    """Short names (e.g. query, value) when they pick exactly the wrapped layers, else full paths.

    peft matches names against every module, the head included, so `dense` would also hit a pooler's dense.
    """
    short = sorted({p.rsplit(".", 1)[-1] for p in paths})
    picked = {p for p, m in model.named_modules() if any(matches(p, s) for s in short)}
    return short if picked == set(paths) else sorted(paths)


def _target_spec(model: nn.Module, paths: list[str]) -> tuple[list[str], list[int] | None]:
    """target_modules, and layers_to_transform when short names need it to pick exactly the wrapped layers."""
    names = _target_names(model, paths)
    short = sorted({p.rsplit(".", 1)[-1] for p in paths})
    if names == short:
        return names, None
    blocks = {_layer_index(p, None) for p in paths}
    if None not in blocks:
        picked = {p for p, _ in model.named_modules() if p in short or (
            any(p.endswith("." + s) for s in short) and _layer_index(p, None) in blocks)}
        if picked == set(paths):
            return short, sorted(blocks)
    return names, None


def _bias_mode(model: nn.Module, head: list[str]) -> tuple[str, dict[str, torch.Tensor]]:
    """peft's `bias` value and the biases it covers, read off what trains outside the head."""
    trained = {n: p for n, p in model.named_parameters()
               if (n == "bias" or n.endswith(".bias")) and p.requires_grad and not inside(n, head)}
    if not trained:
        return "none", {}
    wrapped = {f"{path}.base_layer.bias" for path in lora_layers(model)}
    return ("lora_only" if set(trained) <= wrapped else "all"), trained


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _most_common(values):
    return max(values, key=values.count)


def save(model: nn.Module, out_dir: Path, base_model_path: str, head: list[str]) -> None:
    """Write the adapter in peft's layout; a PiSSA adapter is written as the equivalent plain LoRA (see top)."""
    layers = lora_layers(model)
    if not layers:
        raise TunelabError("This model has no LoRA layers to save; save it as a full model instead.")
    tensors, ranks, alphas = {}, {}, {}
    for path, layer in layers.items():
        tensors.update(_adapter_tensors(path, layer))
        ranks[path], alphas[path] = layer.r, layer.alpha
        if getattr(layer, "pissa_A0", None) is not None:  # delta to the original base: [A; A0], [B, -B0]
            key = f"{PREFIX}{path}."
            tensors[key + "lora_A.weight"] = torch.cat([layer.lora_A.weight, layer.pissa_A0], dim=0)
            tensors[key + "lora_B.weight"] = torch.cat([layer.lora_B.weight, -layer.pissa_B0], dim=1)
            ranks[path], alphas[path] = 2 * layer.r, layer.alpha * (math.sqrt(2) if layer.use_rslora else 2)
    for name in head:
        for key, t in model.get_submodule(name).state_dict().items():
            tensors[f"{PREFIX}{name}.{key}"] = t
    bias, biases = _bias_mode(model, head)
    for name, t in biases.items():  # state-dict names: `<path>.base_layer.bias` for a wrapped layer, as peft
        tensors[PREFIX + name] = t
    # clone: safetensors refuses tensors that share storage (e.g. tied weights).
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()}

    first = next(iter(layers.values()))
    r, alpha = _most_common(list(ranks.values())), _most_common(list(alphas.values()))
    targets, blocks = _target_spec(model, list(layers))
    config = {
        "peft_type": "LORA",
        "task_type": peft_task_type(model),
        "base_model_name_or_path": str(base_model_path),
        "r": r,
        "lora_alpha": _num(alpha),
        # Escaped full paths: peft takes each key as a regex on the path or a dotted tail of it.
        "rank_pattern": {re.escape(p): v for p, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(p): _num(v) for p, v in alphas.items() if v != alpha},
        "lora_dropout": first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0,
        "target_modules": targets,
        "layers_to_transform": blocks,
        "layers_pattern": None,
        "modules_to_save": list(head),
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "bias": bias,
        "use_rslora": first.use_rslora,
        "use_dora": first.use_dora,
        # A PiSSA adapter is saved converted (a plain delta), so it loads with the default init.
        "init_lora_weights": "gaussian" if all(layer.init == "gaussian" for layer in layers.values()) else True,
        "inference_mode": True,
    }
    write_peft(out_dir, tensors, config)


def load(model: PreTrainedModel, out_dir: Path, layer_cls=LoRALinear) -> PreTrainedModel:
    """Restore an adapter onto a fresh base with `layer_cls`, whose `use_dora` must match the adapter's."""
    out_dir = Path(out_dir)
    config, weights_file = read_peft(out_dir, "LORA", "LoRA")
    if "r" not in config or "lora_alpha" not in config:
        raise TunelabError(f"'{out_dir / PEFT_CONFIG}' is a LoRA adapter config without r and lora_alpha; re-save the adapter.")
    if bool(config.get("use_dora")) != layer_cls.use_dora:
        saved_as, use = ("DoRA", "dora") if config.get("use_dora") else ("plain LoRA", "lora")
        raise TunelabError(f"The adapter in '{out_dir}' is a {saved_as} adapter (use_dora: "
                           f"{bool(config.get('use_dora'))}); load it with method.name={use} "
                           f"(tunelab.methods.{use}.load).")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(("pissa", "corda", "olora", "lora_ga", "loftq")):
        raise TunelabError(
            f"The adapter in '{out_dir}' was saved with init_lora_weights={init!r}: it belongs to a base model whose "
            f"weights that init changed, not to the original base. Re-save it with peft's save_pretrained(..., "
            f"path_initial_model_for_weight_conversion=...) to get a plain LoRA adapter, then load that.")
    bias = config.get("bias") or "none"
    unsupported = [k for k in ("lora_bias", "layer_replication", "exclude_modules", "target_parameters")
                   if config.get(k)] + ([f"bias={bias}"] if bias not in ("none", "all", "lora_only") else [])
    if unsupported:
        raise TunelabError(f"The adapter in '{out_dir}' uses {', '.join(unsupported)}, which tunelab's LoRA does not "
                           f"support; load it with peft instead.")

    head = peft_head(model, config)
    _apply(model, config.get("target_modules"), config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0), head,
           layer_cls, use_rslora=bool(config.get("use_rslora")), bias=bias, rank_pattern=config.get("rank_pattern"),
           alpha_pattern=config.get("alpha_pattern"), layers_to_transform=config.get("layers_to_transform"),
           layers_pattern=config.get("layers_pattern"))

    saved = load_file(str(weights_file))
    expected = {}
    for path, layer in lora_layers(model).items():
        expected.update(_adapter_tensors(path, layer))
    for name in head:
        for key, t in model.get_submodule(name).state_dict(keep_vars=True).items():
            expected[f"{PREFIX}{name}.{key}"] = t
    for name, t in _trainable_biases(model, bias).items():
        if not inside(name, head):
            expected[PREFIX + name] = t
    if bias == "all":  # peft also writes the biases of its head wrappers' inner copies; the plain ones are used
        wrappers = [f"{PREFIX}{h}" for h in head]
        saved = {k: v for k, v in saved.items() if not (
            inside(k.split(".original_module.")[0].split(".modules_to_save.")[0], wrappers)
            and (".original_module." in k or ".modules_to_save." in k))}
    copy_checked(expected, saved, out_dir, config.get('base_model_name_or_path'))
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold each update into its base weight and put the plain layer back."""
    with torch.no_grad():
        for path, layer in lora_layers(model).items():
            base = layer.base_layer
            base.weight.copy_(layer.merged_weight())  # computed in float32, rounded once
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, base)
    return precision.base_dtype_head(model)  # a head trained in float32 over a bf16 base goes back to bf16
