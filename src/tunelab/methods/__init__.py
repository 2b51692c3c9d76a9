"""Fine-tuning methods. Each is one module of plain functions:

    apply(model, cfg, head) -> model       set requires_grad / inject modules
    save(model, out_dir, base_model_path, head)
    load(model, out_dir) -> model          (adapter methods) restore onto a fresh base
    merge(model) -> model                  fold into plain weights, or a TunelabError saying it cannot
    ARTIFACT                               "model" (complete HF dir) or "adapter"

Injected modules (LoRA, DoRA, IA3, bottleneck adapters) carry a boolean
`adapter_disabled`; when it is set they compute exactly what the base layer
would, which is what `adapters_disabled` relies on. Several adapters can share
one base under names (`add_adapter`, `set_adapter`; see named.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from . import adapter, bitfit, dora, freeze, full, ia3, lora, named, prefix, prompt, ptuning, qlora
from .layout import method_of

METHODS = {"full": full, "freeze": freeze, "lora": lora, "dora": dora, "ia3": ia3, "bitfit": bitfit, "adapter": adapter,
           "prompt": prompt, "ptuning": ptuning, "prefix": prefix, "qlora": qlora}


def get(name: str):
    return METHODS[name]


def prepare(model, cfg, head: list[str]):
    """Apply the method, or, with `method.init_from`, resume from a saved adapter (tunelab's or peft's).

    The result is the model's adapter "default", so more can be added beside it later.
    """
    init_from = getattr(cfg, "init_from", None)
    if init_from:
        return named.record(model, "default", cfg.name, head, lambda m: get(cfg.name).load(m, init_from))
    return named.record(model, "default", cfg.name, head, lambda m: get(cfg.name).apply(m, cfg, head))


def add_adapter(model, name: str, source, head: list[str], method: str | None = None):
    """Add adapter `name` beside the model's others and make it active.

    `source` is a method config (a fresh adapter to train, e.g. `config.LoraConfig(r=8)`) or the
    directory of a saved adapter (tunelab's layout or peft's; `method` is read from it unless given).
    """
    if isinstance(source, (str, Path)):
        name_of = method or method_of(source)
        return named.add(model, name, name_of, head, lambda m: get(name_of).load(m, source))
    return named.add(model, name, source.name, head, lambda m: get(source.name).apply(m, source, head))


set_adapter = named.use


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
