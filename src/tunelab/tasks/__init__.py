"""Tasks. Each is one module behind the interface `Task` below: how rows are read and become tensors, the head,
the loss, metrics, samples, what a run predicts and evaluates, and the task's declared flags. Hooks a task has no
use for come from base.py, so every task has every name; `tests/test_task_interface.py` checks each against `Task`.
Callers (the loop, the pipeline, predict, the CLI) use these names and never test which task they hold."""

from typing import Protocol

import torch

from .. import methods, models
from ..data import format_tokens, stream
from ..errors import TunelabError
from . import causal_lm, classification, dpo, embedding, mlm, multilabel, qa, regression, reward, token_classification


class Task(Protocol):
    """What every module in TASKS provides. Batches are dicts of tensors from `collate`; `info` is the run's
    labels.json (labels, template, settings a loss reads), settled by `label_info` and `build_model`."""

    MAIN_METRIC: str  # train.metric=auto: best checkpoint and early stopping
    METRICS: tuple  # the scalar metrics train.metric may name
    HEADLINE: tuple  # the figures printed base -> tuned
    PROBE: bool | str  # a linear probe on frozen features as a baseline: False, True (logistic), "ridge", "multilabel"
    BASE: bool  # the untouched model's metrics are a meaningful baseline (not for a fresh regression head)
    PACKS: bool  # examples pack end to end into rows: `pack` (data.packing, train.padding_free)
    ROWS_INTERACT: bool  # the loss couples a batch's rows (in-batch negatives): a batch is never split
    FORGETTING: str  # what eval.forgetting measures: "perplexity" (general text) or "linear_probe" (a labelled file)
    GENERATES: bool  # writes text: `generation_prompt` and `generate` (TunedModel.generate; predict says use generate)
    EMBEDS: bool  # turns texts into vectors: `embed_texts` and `search` (TunedModel.embed / search)
    SCORES_REPLIES: bool  # `predict` of {prompt, response} items gives each a `score` (a reward model)
    PIPELINE_TAG: str  # the Hub's pipeline_tag in a model card's front matter (report/card.py)

    def load_splits(self, cfg, seed: int) -> tuple[dict, dict]: ...  # (splits of rows, data report)
    def label_info(self, splits: dict, cfg) -> dict: ...
    def build_model(self, model_cfg, info: dict, path=None) -> tuple: ...  # (model, tokenizer)
    def head_modules(self, model) -> list[str]: ...  # names of the modules the task adds (trained in full)
    def encode(self, rows: list[dict], tokenizer, info: dict, max_length: int) -> tuple[list[dict], dict]: ...
    def pack(self, features: list[dict], max_length: int) -> list[dict]: ...
    def packing_fault(self, model) -> str | None: ...
    def collate(self, features: list[dict], pad_id: int) -> dict[str, torch.Tensor]: ...
    def forward(self, model, batch) -> torch.Tensor: ...  # what metrics read, per row
    def targets(self, batch) -> torch.Tensor: ...
    def loss(self, model, batch, info: dict) -> torch.Tensor: ...  # summed; the loop divides by `count`
    def count(self, batch) -> int: ...
    def metrics(self, outputs: torch.Tensor, labels: torch.Tensor, info: dict,
                features: list[dict] | None = None) -> dict: ...

    # `outputs` below is the caller's (evaluate.runner): `outputs(features)` runs the model over features with this
    # task's collate and forward and gives (outputs, targets) in the features' order; `outputs(features, other)`
    # batches them with another task's. A task interprets what it returns and never runs evaluate itself.
    def samples(self, model, tokenizer, rows: list[dict], info: dict, device, max_length: int, max_new_tokens: int,
                outputs) -> list[dict]:
        """What the model makes of the first validation rows, before and after training (samples.json): its
        prediction beside the gold one, or its generated reply (model and device: generation, mlm's masks)."""

    # Inference on a finished run (predict.TunedModel, the CLI); defaults in base.py where several tasks share one.
    def predict(self, items, pairs, tokenizer, info: dict, cfg, max_length: int, outputs, run_dir) -> list[dict]:
        """One dict per item (a text, a question, a prompt and reply: what the task reads), `pairs` the items' second
        texts or None. A task that labels nothing raises the error saying what to use instead, naming `run_dir`."""

    def read_predict(self, path, text_field: str | None, cfg) -> tuple[list, list | None]:
        """(items, pairs or None) of a file given to `tunelab predict RUN FILE`, in the form `predict` takes."""

    def predict_summary(self, predictions: list[dict]) -> str | None:
        """A line `tunelab predict` prints after the predictions (reward: the mean reward), or None."""

    def eval_features(self, path, cfg, info: dict, text_field: str | None, label_field: str | None, tokenizer,
                      max_length: int) -> tuple[list[dict], dict]:
        """A labelled file to score a finished run on (TunedModel.evaluate, `tunelab eval`), read and encoded:
        (features for `metrics`, what the result holds beside the metrics: rows dropped, inputs truncated)."""

    def generation_prompt(self, item, system: str | None, tokenizer, info: dict) -> str:
        """The text `generate` continues for one prompt: a user message (str) or a conversation ([{"role",
        "content"}]), with `system` first when it has no system turn. GENERATES tasks only."""

    def generate(self, model, tokenizer, prompts: list[str], info: dict, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, streamer=None, device=None) -> list[str]:
        """The model's reply to each `generation_prompt` text (greedy at temperature 0). GENERATES tasks only."""

    def generation_rows(self, rows: list[dict], tokenizer, info: dict) -> list[dict]:
        """{"row", "prompt", "reference"} of held-out rows: the `generate` prompt text and the reference reply it is
        scored against (eval.generate, TunedModel.evaluate_generation). GENERATES tasks only."""

    def read_generation(self, path, cfg, text_field: str | None) -> list[dict]:
        """The rows of a file given to `tunelab eval RUN FILE --generate`, in the form `generation_rows` takes."""

    def generate_replies(self, model, tokenizer, prompts: list[str], info: dict, max_new_tokens: int = 64,
                         temperature: float = 0.0, top_p: float = 1.0, device=None,
                         batch_size: int = 8) -> list[dict]:
        """{"reply", "tokens", "ended"} per prompt text: batched (left padding, KV cache), the generated token count
        without EOS, and whether it stopped at EOS rather than the token limit. GENERATES tasks only."""

    def embed_texts(self, texts: list[str], tokenizer, info: dict, max_length: int, outputs) -> torch.Tensor:
        """(texts, dim) vectors of a non-empty list of texts, as a user gets them (normalised when trained so).
        EMBEDS tasks only."""

    def search(self, queries: torch.Tensor, corpus: torch.Tensor, k: int,
               block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, indices) of the k corpus vectors nearest to each query by cosine similarity, exact. EMBEDS tasks
        only."""

    # hooks (no-op defaults in base.py)
    def prepare(self, model, feats: dict, cfg, pad_id: int, device, batch_size: int, say) -> None: ...
    def finish(self, info: dict, validation_outputs, say) -> tuple[dict, dict]: ...

TASKS = {"classification": classification, "regression": regression, "multilabel": multilabel, "embedding": embedding, "mlm": mlm,
         "sft": causal_lm, "causal_lm": causal_lm, "token_classification": token_classification, "qa": qa, "reward": reward, "dpo": dpo, "grpo": causal_lm}


def get(name: str) -> Task:
    return TASKS[name]


def encode_splits(cfg, task, model, tokenizer, info: dict, splits: dict, report: dict, say=print) -> tuple[dict, int]:
    """Tokenize every split with `task` (counts into the report), pack train when asked; returns (features,
    max_length). `say` prints the counts."""
    max_length = models.max_input_length(model, tokenizer, cfg.data.max_length, methods.reserved_positions(cfg.method))
    if max_length < cfg.data.max_length:
        say(f"note: data.max_length={cfg.data.max_length} exceeds what the model takes; inputs are cut at {max_length} tokens")
    feats = {}
    for name, rows in splits.items():
        if isinstance(rows, stream.Rows):  # data.streaming: tokenised again whenever the loop reads them
            feats[name], report["splits"][name]["tokens"] = stream.encode(rows, task, tokenizer, info, max_length)
        else:
            feats[name], report["splits"][name]["tokens"] = task.encode(rows, tokenizer, info, max_length)
        say(f"{name} tokens: {format_tokens(report['splits'][name]['tokens'])}")
        if not feats[name]:
            raise TunelabError(f"No {name} example is left after tokenisation ({report['splits'][name]['tokens']}); "
                               f"raise data.max_length or set data.truncation=cut.")
    if cfg.data.packing:
        rows_before = len(feats["train"])
        feats["train"] = task.pack(feats["train"], max_length)
        report["splits"]["train"]["packed_rows"] = len(feats["train"])
        say(f"packing: {rows_before} training examples in {len(feats['train'])} rows of up to {max_length} tokens")
    return feats, max_length
