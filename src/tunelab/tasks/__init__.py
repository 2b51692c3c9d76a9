"""Tasks. Each is one module with: label_info, build_model, encode, collate, forward,
loss (summed), count, metrics, predictions, MAIN_METRIC, METRICS."""

from . import classification

TASKS = {"classification": classification}


def get(name: str):
    return TASKS[name]
