"""The task section: one model per task type, a union discriminated on `task.type`.

Each task's model holds only the keys that task reads, so a key of another task is an error (with a did-you-mean
and the task it belongs to, see validation.py), as an unknown key is. `task.type` may be left out: classification.
A task's model may also say what is wrong with a combination of its own keys (`problems`), which validation
reports with the other cross-section rules, and declares which data and train keys apply to its task (class variables
that those rules read, rules.py).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BeforeValidator, Discriminator, Field, Tag

from .sections import Section

DEFAULT_TYPE = "classification"


class TaskConfig(Section):
    """What every task section has: its type. Each task's model below adds that task's keys."""

    type: str = Field(
        DEFAULT_TYPE, description="What is learned: 'classification' (single-label), 'regression' (a score per "
                                  "text; MSE on standardised targets), 'multilabel' (any number of labels per text; BCE), "
                                  "'embedding' (a bi-encoder for search: (anchor, positive) rows, in-batch "
                                  "negatives), 'mlm' (masked-LM domain adaptation of an encoder on plain text), "
                                  "'sft' (instruction / chat "
                                  "tuning of a causal LM), 'causal_lm' (continued pretraining on plain text), "
                                  "'token_classification' (NER: BIO tags per word), 'qa' (extractive question "
                                  "answering), 'reward' (a scalar reward model on prompt/chosen/rejected pairs), 'dpo' "
                                  "(direct preference optimisation of a causal LM on such pairs), 'grpo' (online RL: sampled replies to "
                                  "prompts scored by task.reward_function or task.reward_model).")

    # Which data and train keys apply to the task; each task's model sets those that hold for it.
    PADDING_FREE: ClassVar[bool] = False  # train.padding_free: the task packs a step's examples into rows (pack())
    PACKING: ClassVar[bool] = False  # data.packing: examples concatenated into rows of data.max_length
    TEXT_PAIRS: ClassVar[bool] = False  # data.text_pair_field: a second text per row
    STREAMING: ClassVar[bool] = False  # data.streaming: rows read from disk as training needs them
    AUGMENT: ClassVar[bool] = False  # data.augment_copies: word-level edits keep the label
    LABEL_SMOOTHING: ClassVar[bool] = False  # train.label_smoothing: a cross-entropy over one label
    ONLINE_RL: ClassVar[bool] = False  # trained by sampling and scoring its own replies (rl.py), not the loop
    GENERATIVE_EVAL: ClassVar[bool] = False  # eval.generate: replies to held-out prompts scored against references

    def problems(self) -> list[str]:
        """What is wrong with this section's keys taken together (each a sentence naming the keys); none here."""
        return []


# Keys more than one task reads, declared once.
class _Templated(TaskConfig):
    template: Literal["auto", "chat", "alpaca"] = Field(
        "auto", description="sft, reward, dpo and grpo prompt format: 'chat' (the tokenizer's chat template), 'alpaca' (built-in), 'auto' "
                            "(chat when the tokenizer has a template, else alpaca).")


def _beta() -> Any:
    return Field(0.1, ge=0, description="dpo and grpo: strength of the pull towards the reference policy (IPO's "
                                        "tau; grpo's KL coefficient).")


class ClassificationConfig(TaskConfig):
    type: Literal["classification"] = Field("classification", description="Single-label classification of a text "
                                            "(or a text pair).")
    PADDING_FREE = TEXT_PAIRS = STREAMING = AUGMENT = LABEL_SMOOTHING = True


class RegressionConfig(TaskConfig):
    type: Literal["regression"] = Field("regression", description="A score per text; MSE on standardised targets.")
    PADDING_FREE = TEXT_PAIRS = True
    regression_loss: Literal["mse", "huber"] = Field("mse", description="regression: 'mse', or 'huber' (less pulled "
                                                     "by outliers), on targets standardised with train's mean and std.")
    huber_delta: float = Field(1.0, gt=0, description="regression with huber: where the loss turns from squared to "
                                                      "linear, in standard deviations of the training targets.")


class MultilabelConfig(TaskConfig):
    type: Literal["multilabel"] = Field("multilabel", description="Any number of labels per text; BCE.")
    PADDING_FREE = TEXT_PAIRS = True
    threshold: float | Literal["tuned"] = Field(0.5, description="multilabel: a label is predicted when its probability "
                                                "reaches this; 'tuned': per label, the threshold with the best F1 on "
                                                "validation, chosen after training and stored with the run.")

    def problems(self) -> list[str]:
        if isinstance(self.threshold, float) and not 0 < self.threshold < 1:
            return [f"task.threshold={self.threshold} must lie between 0 and 1 (a probability), or be 'tuned'."]
        return []


class EmbeddingConfig(TaskConfig):
    type: Literal["embedding"] = Field("embedding", description="A bi-encoder for search: (anchor, positive) rows, "
                                                                "in-batch negatives.")
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


class MlmConfig(TaskConfig):
    type: Literal["mlm"] = Field("mlm", description="Masked-LM domain adaptation of an encoder on plain text.")
    mask_probability: float = Field(0.15, gt=0, lt=1, description="mlm: fraction of tokens (words with "
                                    "task.whole_word_mask) chosen for prediction; of those 80 % become the mask token, "
                                    "10 % a random token and 10 % stay as they are.")
    whole_word_mask: bool = Field(False, description="mlm: choose whole words, masking every subword of a chosen word.")
    new_mlm_head: bool = Field(False, description="mlm: train a masked-LM head from scratch when the model has none (a "
                                                  "sentence-transformers encoder); the base model's figures then show "
                                                  "that untrained head.")


class SftConfig(_Templated):
    type: Literal["sft"] = Field("sft", description="Instruction / chat tuning of a causal LM.")
    PADDING_FREE = PACKING = True
    GENERATIVE_EVAL = True
    train_on_prompt: bool = Field(False, description="sft: also train on prompt / user / system tokens (default: loss on "
                                                     "assistant tokens only, every assistant turn).")


class CausalLMConfig(TaskConfig):
    type: Literal["causal_lm"] = Field("causal_lm", description="Continued pretraining of a causal LM on plain text.")
    PADDING_FREE = PACKING = True
    GENERATIVE_EVAL = True

    # Plain text has no prompt: every token is trained, and there is no template to choose. tasks/causal_lm.py,
    # which serves sft and causal_lm alike, still records both in the run's labels.json, so they read as sft's
    # defaults here (they were keys of every task before the task section was split).
    @property
    def template(self) -> str:
        return "auto"

    @property
    def train_on_prompt(self) -> bool:
        return False


class TokenClassificationConfig(TaskConfig):
    type: Literal["token_classification"] = Field("token_classification", description="NER: BIO tags per word.")
    label_all_subwords: bool = Field(False, description="token_classification: train on every subword of a word (B-X "
                                                        "becomes I-X after the first) instead of its first subword only; "
                                                        "metrics and predictions always read the first subword.")


class QAConfig(TaskConfig):
    type: Literal["qa"] = Field("qa", description="Extractive question answering.")
    doc_stride: int = Field(128, ge=0, description="qa: tokens shared by consecutive windows of a context longer than "
                                                   "data.max_length (the tokenizer's stride, HF's doc_stride); capped at "
                                                   "half of a window's context room.")
    max_answer_length: int = Field(30, ge=1, description="qa: longest answer predicted, in tokens.")
    n_best: int = Field(20, ge=1, description="qa: start and end candidates (highest logits) searched per window.")
    null_threshold: float = Field(0.0, description="qa with unanswerable questions: answer nothing when score(no answer) "
                                                   "- score(best span) > this; raise it to answer less often.")
    version_2: bool | None = Field(None, description="qa: allow 'no answer' predictions (SQuAD v2); empty: true when any "
                                                     "training question is unanswerable.")


class RewardConfig(_Templated):
    type: Literal["reward"] = Field("reward", description="A scalar reward model on prompt/chosen/rejected pairs.")


class DpoConfig(_Templated):
    type: Literal["dpo"] = Field("dpo", description="Direct preference optimisation of a causal LM on "
                                                    "prompt/chosen/rejected pairs.")
    GENERATIVE_EVAL: ClassVar[bool] = True
    beta: float = _beta()
    dpo_loss: Literal["sigmoid", "ipo"] = Field("sigmoid", description="dpo: 'sigmoid' (DPO) or 'ipo' (IPO: squared "
                                                "loss on per-token averaged log-ratios).")
    dpo_label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo: assumed rate of flipped preferences "
                                       "(conservative DPO); 0 is plain DPO.")
    reference: Literal["auto", "adapters_disabled", "precomputed"] = Field(
        "auto", description="dpo reference policy: 'adapters_disabled' (the model with its adapters off: no second "
                            "copy), 'precomputed' (log-probs of every pair computed once before training), 'auto' "
                            "(adapters_disabled for a fresh adapter method, else precomputed).")

    def problems(self) -> list[str]:
        if self.beta == 0:
            return ["task.beta=0 makes the DPO loss constant; use a positive beta (0.1 is usual)."]
        return []


class GrpoConfig(_Templated):
    type: Literal["grpo"] = Field("grpo", description="Online RL: sampled replies to prompts scored by "
                                                      "task.reward_function or task.reward_model.")
    ONLINE_RL: ClassVar[bool] = True
    beta: float = _beta()
    reward_function: str | None = Field(None, description="grpo: 'module:function' (importable; a .py file path works "
                                        "too) called as function(prompts, completions) -> list of floats.")
    reward_model: str | None = Field(None, description="grpo: run directory of a tunelab reward model (task.type "
                                     "reward) that scores each completion.")
    group_size: int = Field(4, ge=2, description="grpo: completions sampled per prompt; rewards are standardised "
                                                 "within each group.")
    temperature: float = Field(1.0, gt=0, description="grpo: sampling temperature of the completions.")

    def problems(self) -> list[str]:
        if (self.reward_function is None) == (self.reward_model is None):
            return ["task.type=grpo needs exactly one reward: task.reward_function ('module:function', called with "
                    "prompts and completions) or task.reward_model (a reward run directory)."]
        return []


TASK_CONFIGS = (ClassificationConfig, RegressionConfig, MultilabelConfig, EmbeddingConfig, MlmConfig, SftConfig,
                CausalLMConfig, TokenClassificationConfig, QAConfig, RewardConfig, DpoConfig, GrpoConfig)
TASK_TYPES = tuple(t.model_fields["type"].default for t in TASK_CONFIGS)
BY_TYPE = dict(zip(TASK_TYPES, TASK_CONFIGS))

# The keys of the task section before it was split per task: it held them all, and tunelab wrote them all into every
# run's config.yaml. A section with every one of them was written so; the keys its task does not read are dropped
# from it, so that runs made before the split still load (predict, resume, sft -> dpo).
FLAT_KEYS = frozenset({
    "type", "template", "train_on_prompt", "regression_loss", "huber_delta", "threshold", "pooling", "normalize",
    "scale", "symmetric", "gradient_cache", "mask_probability", "whole_word_mask", "new_mlm_head", "beta", "dpo_loss",
    "dpo_label_smoothing", "reference", "reward_function", "reward_model", "group_size", "temperature",
    "label_all_subwords", "doc_stride", "max_answer_length", "n_best", "null_threshold", "version_2"})


def type_of(section: Any) -> str | None:
    """The task type a section asks for (classification when it names none); None when it is not a mapping."""
    if isinstance(section, TaskConfig):
        return section.type
    if isinstance(section, dict):
        value = section.get("type", DEFAULT_TYPE)
        return value if isinstance(value, str) else None
    return None


def _drop_flat_keys(section: Any) -> Any:
    if isinstance(section, dict) and FLAT_KEYS <= section.keys() and type_of(section) in BY_TYPE:
        own = BY_TYPE[type_of(section)].model_fields
        return {k: v for k, v in section.items() if k in own or k not in FLAT_KEYS}
    return section


TaskSection = Annotated[
    Annotated[Union[tuple(Annotated[t, Tag(name)] for name, t in BY_TYPE.items())], Discriminator(type_of)],  # noqa: UP007
    BeforeValidator(_drop_flat_keys)]
