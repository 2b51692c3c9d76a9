"""Tasks. Each is one module with: load_splits, label_info, build_model, head_modules, encode (features and
their report), collate, forward, targets, loss (summed), count, metrics, samples, MAIN_METRIC, METRICS,
HEADLINE, PROBE."""

from . import causal_lm, classification, dpo, embedding, mlm, multilabel, qa, regression, reward, token_classification

TASKS = {"classification": classification, "regression": regression, "multilabel": multilabel, "embedding": embedding, "mlm": mlm,
         "sft": causal_lm, "causal_lm": causal_lm, "token_classification": token_classification, "qa": qa, "reward": reward, "dpo": dpo, "grpo": causal_lm}


def get(name: str):
    return TASKS[name]
