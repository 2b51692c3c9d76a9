"""The method section: one model per fine-tuning method, a union discriminated on `method.name`.

A method's keys are accepted only with that method (`method.r` with method.name=freeze is an unknown key). The
method modules (methods/*.py) take their own model from here.

Each model also declares the facts about its method that the rules between sections read (rules.py), as class
variables beside its keys: config sits below the method modules and cannot ask them. The method module declares
the same facts (tests/test_method_facts.py checks that the two agree).
"""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal, Union

from pydantic import Field, field_validator

from .sections import Section


class _Method(Section):
    """The facts every method section declares; each method's model sets those that hold for it."""

    # Prepends virtual tokens once per row: examples packed after a row's first would not see them, and they hook one
    # task's model (no multi-task runs).
    VIRTUAL_TOKENS: ClassVar[bool] = False
    # Its trained state can be one named adapter among others on a shared base (multitask.adapters=per_task, unless
    # it has virtual tokens).
    SWITCHABLE: ClassVar[bool] = False
    # Leaves blocks frozen that train.unfreeze=gradual can unfreeze.
    UNFREEZES: ClassVar[bool] = False


class FullConfig(_Method):
    name: Literal["full"] = Field(description="Full fine-tuning: every parameter is trained.")


class FreezeConfig(_Method):
    name: Literal["freeze"] = Field(description="Partial fine-tuning: embeddings and the lower blocks frozen.")
    UNFREEZES = True
    freeze_layers: int | Literal["all"] = Field(
        "all", description="Number of lower transformer blocks to freeze; 'all' trains the head only."
    )
    freeze_embeddings: bool = Field(True, description="Freeze the embedding layer too.")

    @field_validator("freeze_layers")
    @classmethod
    def _non_negative(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError("must be >= 0, or 'all' to train the head only")
        return v


class _AdapterMethod(_Method):
    """Methods whose trained state is an adapter kept apart from the base."""

    init_from: str | None = Field(
        None, description="Start from the adapter saved in this directory (by tunelab or peft) and keep training it; its own saved hyperparameters apply."
    )


class LoraConfig(_AdapterMethod):
    name: Literal["lora"] = Field(description="LoRA: low-rank adapters on chosen linear layers; the head is trained in full.")
    SWITCHABLE = True
    r: int = Field(8, ge=1, description="Rank of the low-rank update.")
    alpha: float = Field(16, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="Module names to adapt (e.g. [query, value]), 'all-linear', or empty for the architecture's default."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA: scale the update by alpha / sqrt(r) instead of alpha / r.")
    init: Literal["default", "gaussian", "pissa"] = Field(
        "default", description="Adapter init: 'default' (Kaiming-uniform A, zero B), 'gaussian' (A ~ N(0, std 1/r), zero B, as peft), 'pissa' (A, B from W's top-r singular vectors; W keeps the residual)."
    )
    bias: Literal["none", "all", "lora_only"] = Field(
        "none", description="Biases that also train: 'all' of the body, 'lora_only' those of the adapted layers, or 'none'."
    )
    rank_pattern: dict[str, int] = Field(
        default_factory=dict, description="Per-module rank overrides: regex on the module path (as peft: the path or its tail after a dot) -> r."
    )
    alpha_pattern: dict[str, float] = Field(
        default_factory=dict, description="Per-module alpha overrides: regex on the module path (as rank_pattern) -> alpha."
    )
    layers_to_transform: list[int] | None = Field(
        None, description="Only blocks with these indices get LoRA (the first number in the module path, as peft); empty for all."
    )
    layers_pattern: str | None = Field(
        None, description="Name of the block list before the index (e.g. layer, h) for layers_to_transform; empty: the first numbered segment."
    )

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _patterns(cls, v: dict, info) -> dict:
        for key, value in v.items():
            try:
                re.compile(key)
            except re.error as e:
                raise ValueError(f"key '{key}' is not a valid regular expression ({e})") from None
            if (value < 1) if info.field_name == "rank_pattern" else (value <= 0):
                raise ValueError(f"'{key}': {value} must be {'>= 1' if info.field_name == 'rank_pattern' else '> 0'}")
        return v

    @field_validator("layers_to_transform")
    @classmethod
    def _layers(cls, v: list[int] | None, info) -> list[int] | None:
        if v is not None and any(i < 0 for i in v):
            raise ValueError("block indices must be >= 0")
        targets = info.data.get("target_modules")
        if v and isinstance(targets, str) and targets != "all-linear":
            raise ValueError("cannot be used when target_modules is a regex string (as in peft); list the module names")
        return v

    @field_validator("layers_pattern")
    @classmethod
    def _layers_pattern(cls, v: str | None, info) -> str | None:
        if v and not info.data.get("layers_to_transform"):
            raise ValueError("needs layers_to_transform (the block indices to adapt)")
        return v


class DoraConfig(LoraConfig):
    name: Literal["dora"] = Field(description="DoRA: LoRA on the direction of each weight plus a trained magnitude vector; mergeable.")
    SWITCHABLE = True


class BitFitConfig(_AdapterMethod):
    name: Literal["bitfit"] = Field(description="BitFit: train only the bias terms of the body (and the head).")


class IA3Config(_AdapterMethod):
    name: Literal["ia3"] = Field(description="IA3: learned vectors that rescale keys, values and feed-forward activations.")
    SWITCHABLE = True
    target_modules: list[str] | None = Field(
        None, description="Module names to rescale (e.g. [key, value, output.dense]); empty for the architecture's default."
    )
    feedforward_modules: list[str] | None = Field(
        None, description="Which of target_modules are feed-forward layers (scaled on their input); empty for the default."
    )


class AdapterConfig(_AdapterMethod):
    name: Literal["adapter"] = Field(description="Bottleneck adapters: small down/up projections inserted after sublayers.")
    SWITCHABLE = True
    placement: Literal["houlsby", "pfeiffer"] = Field(
        "pfeiffer", description="'houlsby': after attention and after the feed-forward block; 'pfeiffer': after the feed-forward block only."
    )
    reduction_factor: int = Field(16, ge=1, description="Bottleneck width = hidden size / reduction_factor (unless bottleneck_size is set).")
    bottleneck_size: int | None = Field(None, ge=1, description="Bottleneck width; overrides reduction_factor.")
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = Field("relu", description="Activation between the down and up projections.")


class PromptConfig(_AdapterMethod):
    name: Literal["prompt"] = Field(description="Prompt tuning (Lester et al. 2021): trainable virtual token embeddings prepended to the input; the head is trained in full.")
    VIRTUAL_TOKENS = SWITCHABLE = True
    num_virtual_tokens: int = Field(20, ge=1, description="Number of virtual tokens prepended to every input.")
    init: Literal["random", "text"] = Field("random", description="'random' (as peft: N(0, 1)) or 'text': the token embeddings of init_text, repeated or cut to length.")
    init_text: str | None = Field(None, description="Text whose token embeddings initialise the prompt when init is 'text'.")


class PTuningConfig(_AdapterMethod):
    name: Literal["ptuning"] = Field(description="P-tuning (Liu et al. 2021): virtual tokens produced by a trainable prompt encoder (MLP or LSTM) and prepended to the input.")
    VIRTUAL_TOKENS = SWITCHABLE = True
    num_virtual_tokens: int = Field(20, ge=1, description="Number of virtual tokens prepended to every input.")
    encoder: Literal["mlp", "lstm"] = Field("mlp", description="Prompt encoder over the virtual token embeddings: 'mlp' or 'lstm' (bidirectional, then an MLP).")
    encoder_hidden_size: int | None = Field(None, ge=1, description="Hidden width of the prompt encoder; empty for the model's hidden size.")
    encoder_num_layers: int = Field(2, ge=1, description="LSTM layers of the 'lstm' encoder (the 'mlp' encoder always has 3 linear layers).")
    encoder_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout between the LSTM layers.")


class PrefixConfig(_AdapterMethod):
    name: Literal["prefix"] = Field(description="Prefix tuning (Li & Liang 2021): trainable key/value prefixes for every attention layer; the head is trained in full.")
    VIRTUAL_TOKENS = SWITCHABLE = True
    num_virtual_tokens: int = Field(20, ge=1, description="Length of the key/value prefix of every attention layer.")
    prefix_projection: bool = Field(False, description="Reparameterise the prefixes through a two-layer MLP during training (only the computed prefixes are saved).")
    encoder_hidden_size: int | None = Field(None, ge=1, description="Hidden width of the reparameterisation MLP; empty for the model's hidden size.")


class QLoraConfig(LoraConfig):
    name: Literal["qlora"] = Field(description="QLoRA: LoRA on a frozen base whose linear weights are stored 4-bit NF4 (block size 64).")
    SWITCHABLE = False  # unlike LoRA's: the base it quantizes cannot be shared
    double_quant: bool = Field(True, description="Quantize the per-block NF4 scales too (8-bit, blocks of 256): ~0.4 fewer bits per weight.")
    backend: Literal["auto", "torchao", "bitsandbytes"] = Field(
        "auto", description="NF4 kernels: 'auto' (bitsandbytes on CUDA when installed, else torchao), 'torchao' or 'bitsandbytes'."
    )
    quantize: Literal["all-linear", "targets"] = Field(
        "all-linear", description="Which frozen linear layers go 4-bit: every one of the body outside the head, or only the LoRA targets."
    )


METHOD_CONFIGS = (FullConfig, FreezeConfig, LoraConfig, DoraConfig, BitFitConfig, IA3Config, AdapterConfig, PromptConfig, PTuningConfig, PrefixConfig, QLoraConfig)
METHOD_NAMES = tuple(m.model_fields["name"].annotation.__args__[0] for m in METHOD_CONFIGS)
BY_NAME = dict(zip(METHOD_NAMES, METHOD_CONFIGS))
MethodConfig = Annotated[Union[METHOD_CONFIGS], Field(discriminator="name")]  # noqa: UP007 (a Union of a tuple)
