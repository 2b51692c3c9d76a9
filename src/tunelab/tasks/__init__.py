"""Tasks. Each is one module with: load_splits, label_info, build_model, head_modules, encode (features and
their report), collate, forward, targets, loss (summed), count, metrics, samples, MAIN_METRIC, METRICS,
HEADLINE, PROBE."""

from .. import models
from ..data import format_tokens, stream
from ..errors import TunelabError
from . import causal_lm, classification, dpo, embedding, mlm, multilabel, qa, regression, reward, token_classification

TASKS = {"classification": classification, "regression": regression, "multilabel": multilabel, "embedding": embedding, "mlm": mlm,
         "sft": causal_lm, "causal_lm": causal_lm, "token_classification": token_classification, "qa": qa, "reward": reward, "dpo": dpo, "grpo": causal_lm}


def get(name: str):
    return TASKS[name]


def encode_splits(cfg, task, model, tokenizer, info: dict, splits: dict, report: dict, say=print) -> tuple[dict, int]:
    """Tokenize every split with `task` (counts into the report), pack train when asked; returns (features,
    max_length). `say` prints the counts."""
    max_length = models.max_input_length(model, tokenizer, cfg.data.max_length, getattr(cfg.method, "num_virtual_tokens", 0))
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
