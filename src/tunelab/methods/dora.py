"""DoRA (Liu et al. 2024): LoRA on the direction of each weight plus a trained magnitude per output.

    W' = m * (W + s·BA) / ||W + s·BA||_c

with the norm taken per output row (over the input dimension) and `m` initialised to
||W||_c, so the model starts equal to the base. Everything but the layer comes from
lora.py: target selection, defaults, save/load in PEFT layout (peft_type LORA with
`use_dora: true`, the magnitude saved as `<module path>.lora_magnitude_vector`) and merge.

The forward matches peft 0.21's (tuners/lora/variants.py, DoraLinearVariant) step for
step, so outputs agree with `PeftModel` to float rounding:

- the norm is detached, "treated as a constant" (paper section 4.3): no gradient flows
  through it, which saves the memory of its graph;
- without active dropout the base output is reused: y = base(x) + (m/n - 1)·(base(x) - bias)
  + (m/n)·s·B(A(x));
- with active dropout (training, p > 0) the direction term uses the dropped input on both
  paths: y = base(x) + (m/n - 1)·W·drop(x) + (m/n)·s·B(A(drop(x))).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from ..config import DoraConfig
from . import lora

ARTIFACT = "adapter"  # PEFT-layout adapter dir, as for LoRA
CHANGES_BASE = False  # adds a magnitude and low-rank direction beside frozen weights
MERGEABLE = True  # merge(): folded into W
SWITCHABLE = True  # its layers swap in and out, as LoRA's
VIRTUAL_TOKENS = None
QUANTIZES_BASE = False
TRAINABLE_DTYPE = "float32"  # A, B, the magnitude and the head float32 over a bf16 base
DEFAULT_LR = 1e-3  # new low-rank modules
ACTIVATION_SHARE = {"llama": 1.41, "gpt2": 1.04, "bert": 1.06}  # of full fine-tuning's saved activations
save = lora.save  # reads use_dora and the magnitude off the layers
merge = lora.merge  # folds each layer's merged_weight() into its base and removes the DoRA modules


class DoRALinear(lora.LoRALinear):
    """A LoRALinear whose update is rescaled, per output, to the learned magnitude `lora_magnitude_vector`."""

    use_dora = True

    def __init__(self, base_layer: nn.Linear | Conv1D, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(base_layer, r, alpha, dropout)
        # B is zero here, so this is ||W||_c and m/n is exactly 1 at init. Named as peft names it, so the
        # parameter's state-dict key is also its key in adapter_model.safetensors. Float32, like A and B.
        weight = self._out_in(base_layer.weight.to(self.lora_A.weight.dtype))
        self.lora_magnitude_vector = nn.Parameter(self._weight_norm(weight))

    def _out_in(self, weight: torch.Tensor) -> torch.Tensor:
        """A base weight in (out, in) layout: Conv1D stores it transposed."""
        return weight.T if self.fan_in_fan_out else weight

    def _weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """||W + s·BA|| per output row, for W in (out, in) layout; a constant (no gradient), as in peft."""
        with torch.no_grad():
            return torch.linalg.norm(weight + self.scaling * (self.lora_B.weight @ self.lora_A.weight), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.adapter_disabled:
            return result
        x = x.to(self.lora_A.weight.dtype)
        weight = self._out_in(self.base_layer.weight.to(x.dtype))
        scale = self.lora_magnitude_vector / self._weight_norm(weight)  # (out,), broadcasts over the last dim
        if self.training and isinstance(self.dropout, nn.Dropout):
            x = self.dropout(x)
            base = F.linear(x, weight)  # W·drop(x): the base output cannot be reused for a dropped input
        else:
            bias = self.base_layer.bias
            base = result if bias is None else result - bias
        # Same grouping as peft (result + dora term), rounded once to the base dtype.
        return (result + ((scale - 1) * base + scale * self.lora_B(self.lora_A(x)) * self.scaling)).to(result.dtype)

    def merged_weight(self) -> torch.Tensor:
        """(m / ||W + s·BA||_c) * (W + s·BA) in float32 and the base weight's layout."""
        weight = self._out_in(self.base_layer.weight.float())
        merged = (self.lora_magnitude_vector / self._weight_norm(weight)).unsqueeze(1) * (
            weight + self.scaling * (self.lora_B.weight @ self.lora_A.weight))
        return self._out_in(merged)  # back to the base layout (the transpose is its own inverse)


def apply(model: PreTrainedModel, cfg: DoraConfig, head: list[str]) -> PreTrainedModel:
    """Freeze everything, wrap the target layers with DoRA, train the head modules in full."""
    return lora.apply(model, cfg, head, layer_cls=DoRALinear)


def load(model: PreTrainedModel, out_dir) -> PreTrainedModel:
    """Restore a DoRA adapter (saved by tunelab or by peft with use_dora=True) onto a fresh base."""
    return lora.load(model, out_dir, DoRALinear)
