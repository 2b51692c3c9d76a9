"""Fine-tuning methods. Each is one module of plain functions:

    apply(model, cfg, head) -> model       set requires_grad / inject modules
    save(model, out_dir, base_model_path, head)
    merge(model) -> model                  fold adapters into plain weights
    ARTIFACT                               "model" (complete HF dir) or "adapter"

and, for methods whose artifact is an adapter, load(model, out_dir) -> model.
"""

from . import freeze, full, lora

METHODS = {"full": full, "freeze": freeze, "lora": lora}


def get(name: str):
    return METHODS[name]
