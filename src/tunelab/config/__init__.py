"""Typed, validated configuration: YAML recipe + dotted `key=value` overrides.

Every field carries a one-line description (shown by `tunelab config explain`).
Unknown keys are errors with a "did you mean" suggestion; out-of-range values
are errors naming the key. Relative paths are taken relative to the current
working directory, like every other command-line tool.
"""

from __future__ import annotations

import difflib
import re
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import TunelabError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    path: str = Field(description="Local Hugging Face model directory (config.json + weights + tokenizer), or a finished "
                                  "tunelab run directory: its trained model, adapters merged in (sft -> dpo).")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Dtype the weights are loaded and trained in.")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the model dir; off unless you trust it.")
    allow_pickle: bool = Field(False, description="Also load weights stored as pickle (.bin/.pt), which can run code "
                                                  "when loaded; off unless you trust the files (safetensors only).")
    device: str = Field("auto", description="'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'.")
    hidden_dropout: float | None = Field(None, ge=0, lt=1, description="Override the model's hidden / residual dropout "
                                         "(hidden_dropout_prob, resid_pdrop, dropout, ...: whichever its config has).")
    attention_dropout: float | None = Field(None, ge=0, lt=1, description="Override the model's attention dropout "
                                            "(attention_probs_dropout_prob, attn_pdrop, attention_dropout).")
    classifier_dropout: float | None = Field(None, ge=0, lt=1, description="Override the dropout before the "
                                             "classification head (classifier_dropout, summary_first_dropout).")


class DataConfig(_Section):
    train: str = Field(description="Training data file: .jsonl, .csv or .parquet.")
    validation: str | None = Field(None, description="Validation file; when absent a stratified split of train is held out.")
    test: str | None = Field(None, description="Optional test file, evaluated once with the best model.")
    text_field: str = Field("text", description="Column holding the input text.")
    label_field: str = Field("label", description="Column holding the label (string or integer; regression: a number).")
    label_separator: str | None = Field(None, description="multilabel: labels given as one string are split on this "
                                        "(e.g. ',' or '|'); lists need none.")
    allow_empty_labels: bool = Field(False, description="multilabel: keep rows with no label at all (they teach 'none of "
                                     "these'); off, they are dropped and counted as missing_label.")
    text_pair_field: str | None = Field(None, description="Classification / regression of text pairs (NLI, paraphrase, "
                                        "similarity): the column holding each row's second text; the tokenizer encodes "
                                        "the two as a pair, cutting the longer first.")
    anchor_field: str = Field("anchor", description="embedding: the column holding each row's query / anchor text.")
    positive_field: str = Field("positive", description="embedding: the column holding the text that matches the anchor.")
    negative_field: str | None = Field(None, description="embedding: optional column holding a hard negative per row "
                                       "(a text that does not match the anchor).")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Fraction of train held out for validation when no validation file is given.")
    max_length: int = Field(128, ge=8, le=8192, description="Inputs are truncated to this many tokens.")
    dedupe: bool = Field(True, description="Drop exact duplicate rows and texts that appear with conflicting labels.")
    format: Literal["auto", "alpaca", "messages", "sharegpt", "text"] = Field(
        "auto", description="sft / causal_lm rows: 'alpaca' (instruction, input, output), 'messages' (role/content list), "
                            "'sharegpt' (conversations with from/value), 'text' (data.text_field, or paragraphs of a .txt file); "
                            "'auto' reads it off the first row.")
    truncation: Literal["cut", "drop"] = Field(
        "cut", description="sft examples longer than data.max_length: 'cut' prompt tokens from the left (then the response "
                           "from the right if it alone is too long), or 'drop' the example. Counted in the data report.")
    augment_copies: int = Field(0, ge=0, description="Classification: altered copies added per training example "
                                                   "(EDA; train split only, seeded; counted in the data report).")
    augment_ops: list[Literal["delete", "swap", "insert", "synonym"]] = Field(
        ["delete", "swap", "insert", "synonym"], min_length=1,
        description="Operations each copy draws from: random deletion, swap, insertion of an in-sentence word, "
                    "synonym replacement (nearest words in the model's embedding table).")
    augment_rate: float = Field(0.1, gt=0, le=0.5, description="Fraction of a text's words each operation changes (at least one).")
    streaming: bool = Field(False, description="Classification: keep the data on disk and read rows when training needs "
                                               "them (files larger than memory); only where each row lies is kept, "
                                               "about 40 bytes a row. .jsonl, .csv and .tsv.")
    packing: bool = Field(False, description="sft / causal_lm: concatenate training examples into rows of data.max_length "
                                             "tokens; each example attends only to itself and keeps its own positions.")


class TaskConfig(_Section):
    type: Literal["classification", "regression", "multilabel", "embedding", "mlm", "sft", "causal_lm", "token_classification", "qa", "reward", "dpo", "grpo"] = Field(
        "classification", description="What is learned: 'classification' (single-label), 'regression' (a score per "
                                      "text; MSE on standardised targets), 'multilabel' (any number of labels per text; BCE), "
                                      "'embedding' (a bi-encoder for search: (anchor, positive) rows, in-batch "
                                      "negatives), 'mlm' (masked-LM domain adaptation of an encoder on plain text), "
                                      "'sft' (instruction / chat "
                                      "tuning of a causal LM), 'causal_lm' (continued pretraining on plain text), "
                                      "'token_classification' (NER: BIO tags per word), 'qa' (extractive question "
                                      "answering), 'reward' (a scalar reward model on prompt/chosen/rejected pairs), 'dpo' "
                                      "(direct preference optimisation of a causal LM on such pairs), 'grpo' (online RL: sampled replies to "
                                      "prompts scored by task.reward_function or task.reward_model).")
    template: Literal["auto", "chat", "alpaca"] = Field(
        "auto", description="sft and reward prompt format: 'chat' (the tokenizer's chat template), 'alpaca' (built-in), 'auto' "
                            "(chat when the tokenizer has a template, else alpaca).")
    train_on_prompt: bool = Field(False, description="sft: also train on prompt / user / system tokens (default: loss on "
                                                     "assistant tokens only, every assistant turn).")
    # -- regression --
    regression_loss: Literal["mse", "huber"] = Field("mse", description="regression: 'mse', or 'huber' (less pulled "
                                                     "by outliers), on targets standardised with train's mean and std.")
    huber_delta: float = Field(1.0, gt=0, description="regression with huber: where the loss turns from squared to "
                                                      "linear, in standard deviations of the training targets.")
    # -- multilabel --
    threshold: float | Literal["tuned"] = Field(0.5, description="multilabel: a label is predicted when its probability "
                                                "reaches this; 'tuned': per label, the threshold with the best F1 on "
                                                "validation, chosen after training and stored with the run.")
    # -- embedding --
    pooling: Literal["mean", "cls", "last"] = Field("mean", description="embedding: a text's vector is the mean of its "
                                                    "token states, the first token's ([CLS]) or the last token's (decoders).")
    normalize: bool = Field(True, description="embedding: L2-normalise the vectors (cosine similarity).")
    scale: float = Field(20.0, gt=0, description="embedding: similarities are multiplied by this before the softmax of "
                                                 "the contrastive loss (inverse temperature; sentence-transformers' 20).")
    symmetric: bool = Field(False, description="embedding: also pick each positive's anchor among the batch's anchors "
                                               "(the loss averaged over both directions).")
    gradient_cache: int = Field(0, ge=0, description="embedding: embed each batch in chunks of this many rows without "
                                "keeping activations, then backpropagate chunk by chunk (GradCache): a large contrastive "
                                "batch in the memory of a small one, at about one more forward pass. 0: off.")
    # -- mlm --
    mask_probability: float = Field(0.15, gt=0, lt=1, description="mlm: fraction of tokens (words with "
                                    "task.whole_word_mask) chosen for prediction; of those 80 % become the mask token, "
                                    "10 % a random token and 10 % stay as they are.")
    whole_word_mask: bool = Field(False, description="mlm: choose whole words, masking every subword of a chosen word.")
    new_mlm_head: bool = Field(False, description="mlm: train a masked-LM head from scratch when the model has none (a "
                                                  "sentence-transformers encoder); the base model's figures then show "
                                                  "that untrained head.")
    # -- dpo --
    beta: float = Field(0.1, ge=0, description="dpo and grpo: strength of the pull towards the reference policy (IPO's "
                                               "tau; grpo's KL coefficient).")
    dpo_loss: Literal["sigmoid", "ipo"] = Field("sigmoid", description="dpo: 'sigmoid' (DPO) or 'ipo' (IPO: squared "
                                                "loss on per-token averaged log-ratios).")
    dpo_label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo: assumed rate of flipped preferences "
                                       "(conservative DPO); 0 is plain DPO.")
    reference: Literal["auto", "adapters_disabled", "precomputed"] = Field(
        "auto", description="dpo reference policy: 'adapters_disabled' (the model with its adapters off: no second "
                            "copy), 'precomputed' (log-probs of every pair computed once before training), 'auto' "
                            "(adapters_disabled for a fresh adapter method, else precomputed).")
    # -- grpo --
    reward_function: str | None = Field(None, description="grpo: 'module:function' (importable; a .py file path works "
                                        "too) called as function(prompts, completions) -> list of floats.")
    reward_model: str | None = Field(None, description="grpo: run directory of a tunelab reward model (task.type "
                                     "reward) that scores each completion.")
    group_size: int = Field(4, ge=2, description="grpo: completions sampled per prompt; rewards are standardised "
                                                 "within each group.")
    temperature: float = Field(1.0, gt=0, description="grpo: sampling temperature of the completions.")
    # -- token_classification (NER) --
    label_all_subwords: bool = Field(False, description="token_classification: train on every subword of a word (B-X "
                                                        "becomes I-X after the first) instead of its first subword only; "
                                                        "metrics and predictions always read the first subword.")
    # -- qa (extractive question answering) --
    doc_stride: int = Field(128, ge=0, description="qa: tokens shared by consecutive windows of a context longer than "
                                                   "data.max_length (the tokenizer's stride, HF's doc_stride); capped at "
                                                   "half of a window's context room.")
    max_answer_length: int = Field(30, ge=1, description="qa: longest answer predicted, in tokens.")
    n_best: int = Field(20, ge=1, description="qa: start and end candidates (highest logits) searched per window.")
    null_threshold: float = Field(0.0, description="qa with unanswerable questions: answer nothing when score(no answer) "
                                                   "- score(best span) > this; raise it to answer less often.")
    version_2: bool | None = Field(None, description="qa: allow 'no answer' predictions (SQuAD v2); empty: true when any "
                                                     "training question is unanswerable.")


class FullConfig(_Section):
    name: Literal["full"] = Field(description="Full fine-tuning: every parameter is trained.")


class FreezeConfig(_Section):
    name: Literal["freeze"] = Field(description="Partial fine-tuning: embeddings and the lower blocks frozen.")
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


class _AdapterMethod(_Section):
    """Methods whose trained state is an adapter kept apart from the base."""

    init_from: str | None = Field(
        None, description="Start from the adapter saved in this directory (by tunelab or peft) and keep training it; its own saved hyperparameters apply."
    )


class LoraConfig(_AdapterMethod):
    name: Literal["lora"] = Field(description="LoRA: low-rank adapters on chosen linear layers; the head is trained in full.")
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
        import re

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


class BitFitConfig(_AdapterMethod):
    name: Literal["bitfit"] = Field(description="BitFit: train only the bias terms of the body (and the head).")


class IA3Config(_AdapterMethod):
    name: Literal["ia3"] = Field(description="IA3: learned vectors that rescale keys, values and feed-forward activations.")
    target_modules: list[str] | None = Field(
        None, description="Module names to rescale (e.g. [key, value, output.dense]); empty for the architecture's default."
    )
    feedforward_modules: list[str] | None = Field(
        None, description="Which of target_modules are feed-forward layers (scaled on their input); empty for the default."
    )


class AdapterConfig(_AdapterMethod):
    name: Literal["adapter"] = Field(description="Bottleneck adapters: small down/up projections inserted after sublayers.")
    placement: Literal["houlsby", "pfeiffer"] = Field(
        "pfeiffer", description="'houlsby': after attention and after the feed-forward block; 'pfeiffer': after the feed-forward block only."
    )
    reduction_factor: int = Field(16, ge=1, description="Bottleneck width = hidden size / reduction_factor (unless bottleneck_size is set).")
    bottleneck_size: int | None = Field(None, ge=1, description="Bottleneck width; overrides reduction_factor.")
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = Field("relu", description="Activation between the down and up projections.")


class PromptConfig(_AdapterMethod):
    name: Literal["prompt"] = Field(description="Prompt tuning (Lester et al. 2021): trainable virtual token embeddings prepended to the input; the head is trained in full.")
    num_virtual_tokens: int = Field(20, ge=1, description="Number of virtual tokens prepended to every input.")
    init: Literal["random", "text"] = Field("random", description="'random' (as peft: N(0, 1)) or 'text': the token embeddings of init_text, repeated or cut to length.")
    init_text: str | None = Field(None, description="Text whose token embeddings initialise the prompt when init is 'text'.")


class PTuningConfig(_AdapterMethod):
    name: Literal["ptuning"] = Field(description="P-tuning (Liu et al. 2021): virtual tokens produced by a trainable prompt encoder (MLP or LSTM) and prepended to the input.")
    num_virtual_tokens: int = Field(20, ge=1, description="Number of virtual tokens prepended to every input.")
    encoder: Literal["mlp", "lstm"] = Field("mlp", description="Prompt encoder over the virtual token embeddings: 'mlp' or 'lstm' (bidirectional, then an MLP).")
    encoder_hidden_size: int | None = Field(None, ge=1, description="Hidden width of the prompt encoder; empty for the model's hidden size.")
    encoder_num_layers: int = Field(2, ge=1, description="LSTM layers of the 'lstm' encoder (the 'mlp' encoder always has 3 linear layers).")
    encoder_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout between the LSTM layers.")


class PrefixConfig(_AdapterMethod):
    name: Literal["prefix"] = Field(description="Prefix tuning (Li & Liang 2021): trainable key/value prefixes for every attention layer; the head is trained in full.")
    num_virtual_tokens: int = Field(20, ge=1, description="Length of the key/value prefix of every attention layer.")
    prefix_projection: bool = Field(False, description="Reparameterise the prefixes through a two-layer MLP during training (only the computed prefixes are saved).")
    encoder_hidden_size: int | None = Field(None, ge=1, description="Hidden width of the reparameterisation MLP; empty for the model's hidden size.")


class QLoraConfig(LoraConfig):
    name: Literal["qlora"] = Field(description="QLoRA: LoRA on a frozen base whose linear weights are stored 4-bit NF4 (block size 64).")
    double_quant: bool = Field(True, description="Quantize the per-block NF4 scales too (8-bit, blocks of 256): ~0.4 fewer bits per weight.")
    backend: Literal["auto", "torchao", "bitsandbytes"] = Field(
        "auto", description="NF4 kernels: 'auto' (bitsandbytes on CUDA when installed, else torchao), 'torchao' or 'bitsandbytes'."
    )
    quantize: Literal["all-linear", "targets"] = Field(
        "all-linear", description="Which frozen linear layers go 4-bit: every one of the body outside the head, or only the LoRA targets."
    )


METHOD_CONFIGS = (FullConfig, FreezeConfig, LoraConfig, DoraConfig, BitFitConfig, IA3Config, AdapterConfig, PromptConfig, PTuningConfig, PrefixConfig, QLoraConfig)
PADDING_FREE_TASKS = ("sft", "causal_lm", "classification", "regression", "multilabel")  # the tasks with a pack() for train.padding_free
METHOD_NAMES = tuple(m.model_fields["name"].annotation.__args__[0] for m in METHOD_CONFIGS)
MethodConfig = Annotated[Union[METHOD_CONFIGS], Field(discriminator="name")]


class TrainConfig(_Section):
    epochs: float = Field(3, gt=0, description="Passes over the training data (fractions allowed).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    lr: float = Field(2e-5, gt=0, description="Peak learning rate of the body (or of the adapters).")
    head_lr: float | None = Field(None, gt=0, description="Learning rate of the task head; defaults to lr.")
    batch_size: int = Field(16, ge=1, description="Examples per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (never applied to biases and norms).")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of steps of linear warmup.")
    warmup_steps: int | None = Field(None, ge=0, description="Warmup steps; overrides warmup_ratio.")
    scheduler: Literal["linear", "cosine", "constant", "inverse_sqrt"] = Field(
        "linear", description="After warmup: linear or cosine decay to 0, constant, or inverse_sqrt (lr * sqrt(warmup / step)).")
    layer_lr_decay: float | None = Field(
        None, gt=0, le=1, description="Layer-wise LR decay: block i of L gets lr * decay ** (L - 1 - i) (the top block lr), "
                                      "embeddings lr * decay ** L, parameters after the blocks lr, the head head_lr.")
    plateau_factor: float | None = Field(
        None, gt=0, lt=1, description="Lower the LR when validation stops improving: multiply it by this after "
                                      "plateau_patience evaluations without improvement (on top of warmup and schedule).")
    plateau_patience: int = Field(1, ge=1, description="Evaluations without improvement before the LR is lowered.")
    min_lr: float = Field(0.0, ge=0, description="The plateau rule never takes the LR below this.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Classification: cross-entropy against labels "
                                                               "smoothed by this much (0 = one-hot).")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="Keep an exponential moving average of the trained "
                                    "weights (e.g. 0.999); evaluation, best checkpoint and the saved model use it.")
    unfreeze: Literal["none", "gradual"] = Field(
        "none", description="With method.name=freeze: 'gradual' unfreezes the frozen blocks one at a time from the top "
                            "(ULMFiT), every train.unfreeze_every steps or each epoch.")
    unfreeze_every: int | Literal["epoch"] = Field("epoch", description="Steps between two unfreezing stages, or 'epoch'.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this; empty disables clipping.")
    eval_every: int | Literal["epoch"] = Field("epoch", description="Evaluate every N optimizer steps, or each 'epoch'.")
    log_every: int = Field(10, ge=1, description="Log the training loss every N optimizer steps.")
    metric: str = Field("auto", description="Validation metric for best checkpoint and early stopping ('auto': the task's main one, or 'loss').")
    patience: int | None = Field(None, ge=1, description="Stop after this many evaluations without improvement; empty disables.")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed for initialisation, data order and splits "
                      "(0 to 2**32 - 1 = 4294967295, the range numpy's generator takes).")
    gradient_checkpointing: bool = Field(False, description="Recompute each block's activations in the backward pass "
                                         "instead of keeping them: far less activation memory for ~30 % more compute.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="'bf16': the training forward runs under bfloat16 "
                                               "autocast (matmuls in bf16; weights, gradients and AdamW state stay float32). "
                                               "Evaluation stays float32, so base and tuned are scored alike.")
    log_to: list[Literal["tensorboard"]] = Field([], description="Also log train/eval scalars to these: 'tensorboard' "
                                                 "(event files in <run dir>/tensorboard; needs the tensorboard package).")
    padding_free: bool | Literal["auto"] = Field("auto", description=(
        "sft, causal_lm, classification: each micro-batch's examples are packed end to end into rows no longer "
        "than its longest, each with its own positions and attending only to itself: the same examples and targets "
        "per step as padded rows, without computing padding. 'auto': on wherever it applies (not with data.packing "
        "or virtual-token methods) once a check at the start shows the model keeps packed examples apart; true: on, or an error "
        "saying why not."))
    save_checkpoints: bool = Field(True, description="Write a checkpoint (trainable weights, optimizer, schedule, "
                                   "RNG and data position) at each evaluation and every checkpoint_every steps, so "
                                   "`tunelab train --resume RUN_DIR` can continue the run exactly.")
    checkpoint_every: int | None = Field(None, ge=1, description="Also checkpoint every this many steps (empty: "
                                         "only at evaluations).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept: the last this many, plus the best one.")
    keep_finished_checkpoints: bool = Field(False, description="Keep the checkpoints once the run has finished; by "
                                            "default they go, since they serve only --resume, which a finished run "
                                            "does not take (full fine-tuning's are 3x the model each).")
    max_bad_steps: int = Field(5, ge=1, description="A step whose loss or gradient is not finite is skipped and "
                               "logged; this many in a row stop the run, keeping the last good checkpoint.")
    split_by_length: bool = Field(True, description="Cut each micro-batch into smaller ones of similar length when "
                                                    "that computes less padding than it costs in extra calls: the same "
                                                    "examples, loss and gradient per step, less time and activation memory.")
    group_by_length: bool = Field(False, description="Form micro-batches of similar length (within windows of 50 "
                                                     "batches), so dynamic padding wastes little; the batch order stays random.")

    @field_validator("eval_every")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1, or 'epoch'")
        return v


class EvalConfig(_Section):
    base: bool = Field(True, description="Also evaluate the model before training on the same splits.")
    linear_probe: bool = Field(True, description="Fit a logistic-regression probe on the frozen base model's features as a baseline.")
    batch_size: int = Field(64, ge=1, description="Batch size for evaluation and prediction.")
    samples: int = Field(3, ge=0, description="Validation examples shown before and after training (samples.json): "
                                            "predictions, or generations for sft / causal_lm.")
    max_new_tokens: int = Field(64, ge=1, description="Length limit of the sample generations (sft / causal_lm).")
    forgetting: str | None = Field(
        "auto", description="Catastrophic-forgetting probe, measured before and after training: a text file (.txt, one "
                            "passage per line; or a 'text' column) -> perplexity of a causal LM; a labelled file ('text', "
                            "'label': a second task) -> linear-probe accuracy of the pooled features, any model. 'auto': "
                            "tunelab's general-text probe for sft / causal_lm, none for other tasks; 'none' to skip.")


class TaskSpec(_Section):
    """One task of a multi-task run: its own data, head and loss weight; the body is shared."""

    name: str = Field(description="Task name: used in metrics (<name>/<metric>), the run directory and `--task`.")
    weight: float = Field(1.0, gt=0, description="Loss weight alpha_t: each step's loss is the sum of alpha_t * L_t.")

    @field_validator("name")
    @classmethod
    def _a_plain_name(cls, v: str) -> str:
        # it names files and folders of the run directory (heads/<name>.safetensors): nothing may lead outside it
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", v) or ".." in v:
            raise ValueError("use letters, digits, '_', '-' and '.' only (no '/', no '..'), starting with a letter "
                             "or digit, at most 64 characters")
        return v
    task: TaskConfig = Field(default_factory=TaskConfig)
    data: DataConfig


class MultitaskConfig(_Section):
    sampling: Literal["proportional", "temperature", "uniform", "round_robin"] = Field(
        "proportional", description="Which task each micro-batch comes from: proportional to the tasks' sizes, "
                                    "temperature-scaled (size ** (1/T)), uniform, or round_robin; seeded.")
    temperature: float = Field(2.0, gt=0, description="T of temperature sampling (1 = proportional; larger evens the tasks out).")
    adapters: Literal["shared", "per_task"] = Field(
        "shared", description="With an adapter method: one adapter shared by all tasks, or one adapter per task "
                              "(named after it) on the shared base.")


class Config(_Section):
    model: ModelConfig
    data: DataConfig | None = Field(None, description="The data of a single-task run (required unless `tasks` is given).")
    tasks: list[TaskSpec] | None = Field(None, description="Multi-task: a list of {name, weight, task, data}; replaces data and task.")
    multitask: MultitaskConfig = Field(default_factory=MultitaskConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    method: MethodConfig = Field(default_factory=lambda: FullConfig(name="full"))
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output_dir: str | None = Field(None, description="Run directory; default runs/<recipe>-<time>. Never overwritten without --overwrite.")


# -- loading -----------------------------------------------------------------

def parse_overrides(items: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """`["train.lr=3e-4", ...]` -> {"train.lr": 0.0003}; values parsed as YAML scalars/lists."""
    if not items:
        return {}
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        shown = item if item.isprintable() else repr(item)[1:-1]  # a newline in it would split the message
        if not sep or not key.strip():
            raise TunelabError(
                f"Override '{shown}' is not of the form key=value. Write dotted keys with a value, "
                f"e.g. train.lr=3e-4 or method.target_modules=[query,value]."
            )
        try:
            out[key.strip()], twice = _parse_yaml(value) if value.strip() else (None, [])
        except (yaml.YAMLError, RecursionError) as e:
            raise TunelabError(
                f"Override '{shown}': the value is not valid YAML ({_yaml_problem(e)}). Give a number, a word or a list "
                f"like [query,value], and quote text with special characters, e.g. \"data.train='my [1].jsonl'\"."
            ) from None
        if twice:
            raise TunelabError(f"Override '{shown}': the value gives the key '{twice[0][0]}' twice, and YAML would keep "
                               f"only the last one. Give each key once.")
    return out


def _parse_yaml(text: str) -> tuple[Any, list[tuple[str, int, int]]]:
    """yaml.safe_load, and the keys given twice in one mapping at any depth (which PyYAML resolves silently, the last
    one winning): [(dotted key, first line, second line)], sorted by the second line. Each node is visited once, so
    aliases (an anchor bomb) cost nothing extra."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        twice = []
        stack, visited = [(root, "")] if root is not None else [], set()
        while stack:
            node, path = stack.pop()
            if id(node) in visited:
                continue
            visited.add(id(node))
            if isinstance(node, yaml.SequenceNode):
                stack += [(item, f"{path}{i}.") for i, item in enumerate(node.value)]
            elif isinstance(node, yaml.MappingNode):
                lines: dict[tuple[str, str], int] = {}
                for key, value in node.value:
                    if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                        stack.append((value, path))
                        continue
                    name = key.value if key.value.isprintable() else repr(key.value)[1:-1]
                    line = key.start_mark.line + 1
                    if (key.tag, key.value) in lines:
                        twice.append((f"{path}{name}", lines[key.tag, key.value], line))
                    lines[key.tag, key.value] = line
                    stack.append((value, f"{path}{name}."))
        return (loader.construct_document(root) if root is not None else None), sorted(twice, key=lambda t: t[2])
    finally:
        loader.dispose()


def _yaml_problem(e: Exception) -> str:
    """What PyYAML found wrong, on one line (its own messages run over several)."""
    if isinstance(e, RecursionError):
        return "lists or mappings nested too deeply"
    return str(getattr(e, "problem", None) or e).splitlines()[0]


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def load(path: str | Path | None, overrides: list[str] | dict[str, Any] | None = None, **kw: Any) -> Config:
    """Read a YAML recipe (or start empty), apply dotted overrides, validate."""
    tree: dict = {}
    source = "overrides"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise TunelabError(f"Config file '{path}' does not exist. Pass the path of a YAML recipe, e.g. configs/classification/minilm-lora.yaml.")
        try:
            data = p.read_bytes()
        except OSError as e:
            raise TunelabError(f"Config file '{path}' could not be read ({e.strerror or e}). Check its permissions, or "
                               f"copy the recipe somewhere readable.") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            # UTF-16 is what Windows editors save as "Unicode"; other bad bytes are usually Latin-1.
            utf16 = data[:2] in (b"\xff\xfe", b"\xfe\xff")
            line = data.count(b"\n", 0, e.start) + 1
            found = " (it starts with a UTF-16 byte-order mark)" if utf16 else f": line {line} has the byte 0x{data[e.start]:02x}"
            raise TunelabError(f"Config file '{path}' is not UTF-8 text{found}. Re-save it as UTF-8, e.g. `iconv -f "
                               f"{'UTF-16' if utf16 else 'latin1'} -t UTF-8 {path} > fixed.yaml`.") from None
        try:
            tree, twice = _parse_yaml(text)
            tree = tree or {}
        except (yaml.YAMLError, RecursionError) as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise TunelabError(f"Config file '{path}' is not valid YAML{where}: {_yaml_problem(e)}. Fix the syntax there.") from None
        if twice:
            key, first, second = twice[0]
            more = f" ({len(twice) - 1} more key(s) are given twice too)" if len(twice) > 1 else ""
            raise TunelabError(f"Config file '{path}' gives the key '{key}' twice, at lines {first} and {second}{more}; "
                               f"YAML would silently keep only the last one. Remove one of them.")
        if not isinstance(tree, dict):
            raise TunelabError(f"Config file '{path}' must hold a mapping of sections (model, data, task, method, train), not {type(tree).__name__}.")
    changes = {**parse_overrides(overrides), **kw}
    method = tree.get("method")
    if "method.name" in changes and isinstance(method, dict) and method.get("name") != changes["method.name"]:
        # Switching method on the command line replaces the recipe's method section: its
        # keys (r, alpha, ...) belong to the old method and would be rejected as unknown.
        tree["method"] = {}
    for key, value in changes.items():
        _set_dotted(tree, key, value)
    return validate(tree, source)


def validate(tree: dict, source: str = "config") -> Config:
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as e:
        raise TunelabError(_explain_errors(e, tree, source)) from None
    if cfg.tasks is not None:
        return _check_tasks(cfg, source)
    if cfg.data is None:
        raise TunelabError(f"Invalid config in {source}: 'data' is required (data.train names the training file), "
                           f"or give a `tasks:` list for a multi-task run.")
    return _check_single(cfg, source)


def _check_tasks(cfg: Config, source: str) -> Config:
    if cfg.data is not None:
        raise TunelabError(f"Invalid config in {source}: give either `data` (one task) or `tasks` (several, each with "
                           f"its own data), not both; move the data section into a task of the list.")
    if not cfg.tasks:
        raise TunelabError(f"Invalid config in {source}: `tasks` is empty; list at least one {{name, task, data}}.")
    names = [t.name for t in cfg.tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TunelabError(f"Invalid config in {source}: task names must be unique, {', '.join(map(repr, dupes))} "
                           f"appears more than once in `tasks`; rename one.")
    bad = [n for n in names if not n or "/" in n or n != n.strip()]
    if bad:
        raise TunelabError(f"Invalid config in {source}: task name {bad[0]!r} must be non-empty, without '/' or "
                           f"surrounding spaces.")
    if cfg.method.name in ("prompt", "ptuning", "prefix"):
        raise TunelabError(f"Invalid config in {source}: method.name={cfg.method.name} is not supported for multi-task "
                           f"runs (its virtual tokens hook one task's model); use lora, dora, ia3, adapter or full.")
    if cfg.eval.forgetting not in (None, "auto", "none"):
        raise TunelabError(f"Invalid config in {source}: eval.forgetting is not measured in multi-task runs yet; remove "
                           f"it (each task's own validation metrics show what the shared body keeps).")
    if cfg.multitask.adapters == "per_task" and cfg.method.name not in ("lora", "dora", "ia3", "adapter"):
        raise TunelabError(f"Invalid config in {source}: multitask.adapters=per_task needs an adapter method (lora, "
                           f"dora, ia3, adapter), not method.name={cfg.method.name}.")
    for spec in cfg.tasks:
        if spec.data.streaming:
            raise TunelabError(f"Invalid config in {source}: data.streaming=true is not supported in multi-task runs "
                               f"yet (task {spec.name!r}); set it to false there.")
        _check_single(single(cfg, spec.name), f"{source} (task {spec.name!r})")
    return cfg


def single(cfg: Config, name: str) -> Config:
    """The config of one task of a multi-task run, as a single-task config (its data and task sections)."""
    spec = next(t for t in cfg.tasks if t.name == name)
    return cfg.model_copy(update={"data": spec.data, "task": spec.task, "tasks": None})


def _check_single(cfg: Config, source: str) -> Config:
    if cfg.data.augment_copies and cfg.task.type != "classification":
        raise TunelabError(f"Invalid config in {source}: data.augment_copies applies to task.type classification "
                           f"(word-level edits would break {cfg.task.type} labels); remove it.")
    if cfg.train.label_smoothing and cfg.task.type != "classification":
        raise TunelabError(f"Invalid config in {source}: train.label_smoothing applies to task.type classification, "
                           f"not {cfg.task.type}; remove it.")
    if cfg.train.unfreeze == "gradual" and cfg.method.name != "freeze":
        raise TunelabError(f"Invalid config in {source}: train.unfreeze=gradual unfreezes the blocks that "
                           f"method.name=freeze froze; set method.name=freeze (with method.freeze_layers), or "
                           f"train.unfreeze=none.")
    if cfg.task.type == "dpo" and cfg.task.beta == 0:
        raise TunelabError(f"Invalid config in {source}: task.beta=0 makes the DPO loss constant; use a positive beta "
                           f"(0.1 is usual).")
    if cfg.task.type == "grpo" and (cfg.task.reward_function is None) == (cfg.task.reward_model is None):
        raise TunelabError(f"Invalid config in {source}: task.type=grpo needs exactly one reward: task.reward_function "
                           f"('module:function', called with prompts and completions) or task.reward_model (a reward "
                           f"run directory).")
    if isinstance(cfg.task.threshold, float) and not 0 < cfg.task.threshold < 1:
        raise TunelabError(f"Invalid config in {source}: task.threshold={cfg.task.threshold} must lie between 0 and 1 "
                           f"(a probability), or be 'tuned'.")
    if cfg.data.text_pair_field and cfg.task.type not in ("classification", "regression", "multilabel"):
        raise TunelabError(f"Invalid config in {source}: data.text_pair_field applies to task.type classification, "
                           f"regression and multilabel, not {cfg.task.type}; remove it.")
    if cfg.data.streaming and cfg.data.text_pair_field:
        raise TunelabError(f"Invalid config in {source}: data.streaming=true reads single texts; with "
                           f"data.text_pair_field set data.streaming=false.")
    if cfg.data.streaming and cfg.task.type != "classification":
        raise TunelabError(f"Invalid config in {source}: data.streaming=true is supported for task.type classification, "
                           f"not {cfg.task.type} yet; set data.streaming=false (the data is then read into memory).")
    if cfg.data.streaming and cfg.data.augment_copies:
        raise TunelabError(f"Invalid config in {source}: data.augment_copies keeps the altered copies in memory, which "
                           f"data.streaming=true exists to avoid; remove one of them.")
    if cfg.data.packing and cfg.task.type not in ("sft", "causal_lm"):
        raise TunelabError(f"Invalid config in {source}: data.packing=true applies to task.type sft and causal_lm, not "
                           f"{cfg.task.type}; remove it (classification batches are padded per batch).")
    if cfg.train.padding_free == "auto":  # on where it applies; the loop then checks the model keeps examples apart
        cfg.train.padding_free = "auto" if (cfg.task.type in PADDING_FREE_TASKS and not cfg.data.packing and
                                            cfg.method.name not in ("prompt", "ptuning", "prefix")) else False
    if cfg.train.padding_free is True and cfg.task.type not in PADDING_FREE_TASKS:
        raise TunelabError(f"Invalid config in {source}: train.padding_free=true applies to task.type "
                           f"{', '.join(PADDING_FREE_TASKS)}, "
                           f"not {cfg.task.type}; remove it (train.group_by_length=true cuts padding for any task).")
    if cfg.train.padding_free is True and cfg.data.packing:
        raise TunelabError(f"Invalid config in {source}: train.padding_free=true and data.packing=true both pack "
                           f"examples; keep one (padding_free keeps each step's examples as they are).")
    if cfg.train.padding_free is True and cfg.method.name in ("prompt", "ptuning", "prefix"):
        raise TunelabError(f"Invalid config in {source}: train.padding_free=true cannot be combined with method.name="
                           f"{cfg.method.name}: its virtual tokens are prepended once per row, so the examples after the "
                           f"first would not see them. Set train.padding_free=false.")
    if cfg.data.packing and cfg.method.name in ("prompt", "ptuning", "prefix"):
        raise TunelabError(f"Invalid config in {source}: data.packing=true cannot be combined with method.name="
                           f"{cfg.method.name}: its virtual tokens are prepended once per row, so packed examples after "
                           f"the first would not see them. Set data.packing=false (and train.group_by_length=true).")
    return cfg


def _valid_keys(model: type[BaseModel], tree: dict) -> dict[str, list[str]]:
    """Section path -> the field names allowed there (method fields depend on method.name)."""
    keys = {"": list(model.model_fields)}
    for name, field in model.model_fields.items():
        ann = field.annotation
        if name == "method":
            method_name = (tree.get("method") or {}).get("name") if isinstance(tree.get("method"), dict) else None
            options = list(METHOD_CONFIGS)
            chosen = [m for m in options if method_name in m.model_fields["name"].annotation.__args__] or options
            keys["method"] = sorted({f for m in chosen for f in m.model_fields})
        elif isinstance(_section(ann), type):
            keys[name] = list(_section(ann).model_fields)
    return keys


def _section(ann):
    """The section model of a field annotated `Section` or `Section | None`; None for plain values."""
    for a in (ann, *getattr(ann, "__args__", ())):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


# Names recipes copied from Hugging Face / peft scripts use, which spelling similarity would match to the wrong key
# (learning_rate is closer to padding_free than to lr).
_ALIASES = {"learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs", "per_device_train_batch_size":
            "batch_size", "train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
            "model_name_or_path": "path", "max_seq_length": "max_length", "lora_r": "r", "lora_alpha": "alpha",
            "lora_dropout": "dropout"}
_short_repr = reprlib.Repr()
_short_repr.maxlevel, _short_repr.maxstring, _short_repr.maxother, _short_repr.maxlist, _short_repr.maxdict = 2, 60, 60, 4, 4


def _explain_errors(e: ValidationError, tree: dict, source: str) -> str:
    valid = _valid_keys(Config, tree)
    msgs = []
    for err in e.errors():
        loc = [str(x) for x in err["loc"]]
        # pydantic appends union members (method.lora.r) and type names (e.g. 'int', "literal['all']"); keep field
        # names only. Never the first: a top-level key named `lora:` or `str:` is the user's own mistake to report.
        loc = loc[:1] + [x for x in loc[1:] if not (x in METHOD_NAMES or x in ("int", "str", "float", "list[str]")
                                                     or x.startswith("literal["))]
        loc = [x if x.isprintable() else repr(x)[1:-1] for x in loc]  # a key with a newline would split the message
        key = ".".join(loc)
        if err["type"] == "extra_forbidden":
            section = ".".join(loc[:-1])
            allowed = valid.get(section, [])
            in_task = re.match(r"^tasks\.\d+(?:\.(\w+))?$", section)  # a section of one task of a `tasks:` list
            if in_task:
                allowed = valid.get(in_task[1], []) if in_task[1] else list(TaskSpec.model_fields)
            alias = _ALIASES.get(loc[-1])
            close = [alias] if alias in allowed else difflib.get_close_matches(loc[-1], allowed, n=1, cutoff=0.5)
            hint = f"did you mean '{section + '.' if section else ''}{close[0]}'?" if close else f"valid keys here: {', '.join(allowed)}"
            msgs.append(f"unknown key '{key}' — {hint}")
        elif err["type"] == "missing":
            msgs.append(f"'{key}' is required")
        elif err["type"] == "union_tag_invalid" or err["type"] == "union_tag_not_found":
            msgs.append(f"'{key or 'method'}.name' must be one of {', '.join(METHOD_NAMES)}")
        else:
            value = _short_repr.repr(err.get("input"))  # a value may be a whole (even self-referencing) YAML tree
            msgs.append(f"'{key}' = {value}: {err['msg']}")
    unique = list(dict.fromkeys(msgs))
    return f"Invalid config in {source}: " + "; ".join(unique) + " — fix these keys in the YAML file or override them as key=value (`tunelab config explain` lists every key)."


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def explain() -> str:
    """Every key with its type, default and description."""
    lines = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            key = f"{prefix}{name}"
            if _section(ann) is not None and name != "tasks":
                walk(_section(ann), key + ".")
                continue
            if name == "method":
                continue  # listed per method below
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=False))
            lines.append(f"{key:34} {default:16} {field.description or ''}")

    walk(Config, "")
    for name in ("name", "weight"):
        field = TaskSpec.model_fields[name]
        default = "required" if field.is_required() else repr(field.get_default())
        lines.append(f"{'tasks[].' + name:34} {default:16} {field.description or ''}")
    lines.append(f"{'tasks[].task, tasks[].data':34} {'':16} The task and data sections above, per task.")
    for m in METHOD_CONFIGS:
        method = m.model_fields["name"].annotation.__args__[0]
        for name, field in m.model_fields.items():
            default = "required" if field.is_required() else repr(field.get_default())
            label = f"method.{name}" + (f" ({method})" if name != "name" else f" = {method}")
            lines.append(f"{label:34} {default if name != 'name' else '':16} {field.description or ''}")
    return "\n".join(lines)
