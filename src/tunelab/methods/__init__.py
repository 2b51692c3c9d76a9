"""Fine-tuning methods. Each is one module of plain functions:

    apply(model, cfg, head) -> model       set requires_grad / inject modules
    save(model, out_dir, base_model_path, head)
    load(model, out_dir) -> model          (adapter methods) restore onto a fresh base
    merge(model) -> model                  fold into plain weights, or a TunelabError saying it cannot
    ARTIFACT                               "model" (complete HF dir) or "adapter"

Injected modules (LoRA, DoRA, IA3, bottleneck adapters) carry a boolean
`adapter_disabled`; when it is set they compute exactly what the base layer
would, which is what `adapters_disabled` relies on.
"""

from __future__ import annotations

from contextlib import contextmanager

from . import adapter, bitfit, dora, freeze, full, ia3, lora, prefix, prompt, ptuning, qlora

METHODS = {"full": full, "freeze": freeze, "lora": lora, "dora": dora, "ia3": ia3, "bitfit": bitfit, "adapter": adapter,
           "prompt": prompt, "ptuning": ptuning, "prefix": prefix, "qlora": qlora}


def get(name: str):
    return METHODS[name]


def prepare(model, cfg, head: list[str]):
    """Apply the method, or, with `method.init_from`, resume from a saved adapter (tunelab's or peft's)."""
    init_from = getattr(cfg, "init_from", None)
    if init_from:
        return get(cfg.name).load(model, init_from)
    return get(cfg.name).apply(model, cfg, head)


@contextmanager
def adapters_disabled(model):
    """Run the base model: every injected adapter module computes its base layer only."""
    layers = [m for m in model.modules() if hasattr(m, "adapter_disabled")]
    before = [m.adapter_disabled for m in layers]
    for m in layers:
        m.adapter_disabled = True
    try:
        yield model
    finally:
        for m, b in zip(layers, before):
            m.adapter_disabled = b
