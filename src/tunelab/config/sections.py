"""The sections every run has, one model each: model, data, train, eval, multitask.

The task section (tasks.py) and the method section (methods.py) are unions of one model per task or method; the
whole recipe, which puts them together, is schema.py's `Config`. Every field carries a one-line description
(shown by `tunelab config explain`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Section(BaseModel):
    """A config section: an unknown key is an error (with a did-you-mean), and assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    path: str = Field(description="Local Hugging Face model directory (config.json + weights + tokenizer), a Hugging Face "
                                  "Hub id ('org/name', downloaded once into the HF cache; a local directory of that name "
                                  "wins), or a finished tunelab run directory: its trained model, adapters merged in "
                                  "(sft -> dpo).")
    revision: str | None = Field(None, description="Hub ids: the branch, tag or commit to use ('main' when unset); a run "
                                                   "records the commit it used, so resume and load get the same weights.")
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


class DataConfig(Section):
    train: str = Field(description="Training data: a .jsonl, .csv or .parquet file, a Hugging Face Hub dataset "
                                   "('hf://org/name'), or a directory written by datasets' save_to_disk.")
    validation: str | None = Field(None, description="Validation data (a file or a dataset, as data.train); when absent "
                                                     "a stratified split of train is held out.")
    test: str | None = Field(None, description="Optional test data (a file or a dataset, as data.train), evaluated once "
                                               "with the best model.")
    dataset_config: str | None = Field(None, description="Hub datasets: the configuration (subset) to read, for "
                                                         "datasets that have several.")
    dataset_revision: str | None = Field(None, description="Hub datasets: the branch, tag or commit ('main' when unset).")
    train_split: str = Field("train", description="Hub datasets and save_to_disk DatasetDicts: the split data.train reads.")
    validation_split: str = Field("validation", description="The split data.validation reads (when it names a dataset).")
    test_split: str = Field("test", description="The split data.test reads (when it names a dataset).")
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
    tags_field: str = Field("tags", description="token_classification: the column holding each row's list of BIO tags "
                                                "beside 'tokens' (Hugging Face NER datasets call it 'ner_tags'; ClassLabel "
                                                "ids are read as their names).")
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
                                               "about 40 bytes a row. .jsonl, .csv and .tsv files, and Hugging Face "
                                               "datasets (read by index from their memory-mapped Arrow files; a Hub "
                                               "dataset is downloaded to the HF cache first).")
    packing: bool = Field(False, description="sft / causal_lm: concatenate training examples into rows of data.max_length "
                                             "tokens; each example attends only to itself and keeps its own positions.")


class TrainConfig(Section):
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
    log_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field([], description="Also log every metrics.jsonl "
        "number at its step to these (metrics.jsonl is always written): 'tensorboard' (event files in <run "
        "dir>/tensorboard; pip install tensorboard), 'mlflow' (a run named after the output dir: the resolved config "
        "as params, task/method/model tags, summary.json, config.yaml, report.html and metrics.jsonl as artifacts at "
        "the end; MLFLOW_TRACKING_URI, default a SQLite store mlflow.db in the current directory; "
        "MLFLOW_EXPERIMENT_NAME, default 'tunelab'; pip install 'tunelab[mlflow]'), 'wandb' (the same; WANDB_MODE, "
        "offline when no API key is set; WANDB_PROJECT, default 'tunelab'; pip install 'tunelab[wandb]'). Only the "
        "first process logs; --resume continues the same MLflow and W&B runs; a tracker that fails mid-run is warned "
        "about and training goes on.")
    log_artifacts: bool = Field(False, description="With mlflow / wandb: also upload the trained weights (adapter/ or "
                                "model/) when the run has finished.")
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


class EvalConfig(Section):
    base: bool = Field(True, description="Also evaluate the model before training on the same splits.")
    linear_probe: bool = Field(True, description="Fit a logistic-regression probe on the frozen base model's features as a baseline.")
    batch_size: int = Field(64, ge=1, description="Batch size for evaluation and prediction.")
    samples: int = Field(3, ge=0, description="Validation examples shown before and after training (samples.json): "
                                            "predictions, or generations for sft / causal_lm.")
    max_new_tokens: int = Field(64, ge=1, description="Length limit of the sample generations and of eval.generate's "
                                                      "replies (sft / causal_lm / dpo).")
    generate: int = Field(0, ge=0, description="sft, causal_lm and dpo: generate replies to the first N validation and "
                                               "test rows with the base and the tuned model and score them against the "
                                               "reference replies (exact match, token F1, ROUGE-L, BLEU, length, share "
                                               "ended with EOS): summary.json 'generation', generations.json. 0: off.")
    do_sample: bool = Field(False, description="eval.generate: sample replies (seeded by train.seed) instead of greedy.")
    temperature: float = Field(0.7, gt=0, description="eval.generate with do_sample: the sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="eval.generate with do_sample: nucleus sampling's probability mass.")
    judge: str | None = Field(None, description="eval.generate: what scores every base and tuned reply (mean score "
                                                "and the tuned reply's win rate over the base one, ties half): the run "
                                                "directory of a tunelab reward model (task.type reward), or a Python "
                                                "function 'module:function' / 'file.py:function' called as "
                                                "function(prompts, replies, references) -> one number per reply. A "
                                                "function runs your code: name only one you trust.")
    forgetting: str | None = Field(
        "auto", description="Catastrophic-forgetting probe, measured before and after training: a text file (.txt, one "
                            "passage per line; or a 'text' column) -> perplexity of a causal LM; a labelled file ('text', "
                            "'label': a second task) -> linear-probe accuracy of the pooled features, any model. 'auto': "
                            "tunelab's general-text probe for sft / causal_lm, none for other tasks; 'none' to skip.")


class MultitaskConfig(Section):
    sampling: Literal["proportional", "temperature", "uniform", "round_robin"] = Field(
        "proportional", description="Which task each micro-batch comes from: proportional to the tasks' sizes, "
                                    "temperature-scaled (size ** (1/T)), uniform, or round_robin; seeded.")
    temperature: float = Field(2.0, gt=0, description="T of temperature sampling (1 = proportional; larger evens the tasks out).")
    adapters: Literal["shared", "per_task"] = Field(
        "shared", description="With an adapter method: one adapter shared by all tasks, or one adapter per task "
                              "(named after it) on the shared base.")
