"""The interface's defaults: what a task that has nothing to do at a point gets. A task module imports the ones it
does not write itself, so every task has every name of `tasks.Task` and its callers never probe for one."""

from __future__ import annotations

import torch

from ..data.sources import read_examples
from ..errors import TunelabError


def pack(features: list[dict], max_length: int) -> list[dict]:
    """Only tasks with PACKS = True pack; config's rules stop data.packing and train.padding_free elsewhere."""
    raise TunelabError("This task does not pack examples into rows: set data.packing=false and train.padding_free=false.")


def packing_fault(model) -> str | None:
    """Why packed rows would be wrong for this model (None: they are fine, or the task does not pack)."""
    return None


def prepare(model, feats: dict, cfg, pad_id: int, device, batch_size: int, say) -> None:
    """Before the first step, once the method is applied (DPO: the reference log-probs). Nothing by default."""


def finish(info: dict, validation_outputs, say) -> tuple[dict, dict]:
    """After training, on the best weights: (info, figures for the summary). `validation_outputs()` runs the model
    over validation and gives (outputs, labels) (multilabel: thresholds tuned there). Nothing by default."""
    return info, {}


# -- inference: what a finished run does with new inputs (predict.TunedModel, the CLI) --------------------------------

def texts_to_predict(items) -> list[str]:
    """The texts of a predict call (one str, or a list of them), checked: each must be a string."""
    texts = [items] if isinstance(items, str) else list(items)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TunelabError(
            f"Text #{bad[0] + 1} to predict is {texts[bad[0]]!r}, not a string ({len(bad)} such in all). "
            f"Give strings only; in a file, fill or remove rows whose text is empty or not text."
        )
    return texts


def read_predict(path, text_field: str | None, cfg) -> tuple[list, list | None]:
    """(items to predict, their second texts or None) of a file given to `tunelab predict RUN FILE`: the text column
    (text_field, else the run's data.text_field), and data.text_pair_field's column for a run trained on pairs."""
    rows = read_examples(path, text_field or cfg.data.text_field, None, key="predict file",
                         pair_field=cfg.data.text_pair_field if cfg.data is not None else None)
    return [r["text"] for r in rows], ([r["pair"] for r in rows] if rows and "pair" in rows[0] else None)


def predict_summary(predictions: list[dict]) -> str | None:
    """A line summing the predictions up for the terminal after `tunelab predict` (None: nothing to add)."""
    return None


def eval_features(path, cfg, info: dict, text_field: str | None, label_field: str | None, tokenizer,
                  max_length: int) -> tuple[list[dict], dict]:
    """Tasks without a file format to score a finished run on (reward, dpo) say so."""
    raise TunelabError(f"A {cfg.task.type} run is not scored on a file with `tunelab eval` (TunedModel.evaluate); its "
                       f"validation and test figures are in the run's summary.json.")


def generation_prompt(item, system: str | None, tokenizer, info: dict) -> str:
    """Only tasks with GENERATES = True write text; predict.TunedModel.generate checks the flag first."""
    raise TunelabError("This task does not write text: use predict, not generate.")


def generate(model, tokenizer, prompts: list[str], info: dict, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, streamer=None, device=None) -> list[str]:
    """Only tasks with GENERATES = True write text; predict.TunedModel.generate checks the flag first."""
    raise TunelabError("This task does not write text: use predict, not generate.")


def generation_rows(rows: list[dict], tokenizer, info: dict) -> list[dict]:
    """Only tasks whose rows hold reference replies are scored by generation; config's rules stop eval.generate
    elsewhere and predict.TunedModel.evaluate_generation checks GENERATES first."""
    raise TunelabError("This task does not write text: generative evaluation needs an sft, causal_lm or dpo run.")


def read_generation(path, cfg, text_field: str | None) -> list[dict]:
    """Only tasks whose rows hold reference replies are scored by generation (`tunelab eval --generate`)."""
    raise TunelabError(f"A {cfg.task.type} run writes no replies, so it is not scored by generation: use `tunelab "
                       f"eval RUN FILE` without --generate.")


def generate_replies(model, tokenizer, prompts: list[str], info: dict, max_new_tokens: int = 64,
                     temperature: float = 0.0, top_p: float = 1.0, device=None, batch_size: int = 8) -> list[dict]:
    """Only tasks with GENERATES = True write text."""
    raise TunelabError("This task does not write text: generative evaluation needs an sft, causal_lm or dpo run.")


def embed_texts(texts: list[str], tokenizer, info: dict, max_length: int, outputs) -> torch.Tensor:
    """Only tasks with EMBEDS = True turn texts into vectors; predict.TunedModel.embed checks the flag first."""
    raise TunelabError("This task does not turn texts into vectors: embed and search need an embedding run.")


def search(queries: torch.Tensor, corpus: torch.Tensor, k: int, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Only tasks with EMBEDS = True search; predict.TunedModel.search embeds (and so checks the flag) first."""
    raise TunelabError("This task does not turn texts into vectors: embed and search need an embedding run.")
