"""Fine-tuning methods. Each is one module of plain functions and the facts other modules ask of it
(`methods.get(name).FACT`; the literal list of methods is catalog.py's `METHODS`):

    apply(model, cfg, head) -> model       set requires_grad / inject modules
    save(model, out_dir, base_model_path, head)
    load(model, out_dir) -> model          (adapter methods) restore onto a fresh base
    merge(model) -> model                  fold into plain weights, or a TunelabError saying it cannot
    unfreeze_stages(model)                 (freeze only: config's UNFREEZES) what train.unfreeze=gradual thaws
    ARTIFACT                               "model" (complete HF dir) or "adapter"
    CHANGES_BASE                           trains weights of the base itself (so "adapters off" is not the base)
    MERGEABLE                              merge() folds it into plain weights
    SWITCHABLE                             one named adapter among others on a shared base (named.py)
    VIRTUAL_TOKENS                         None, or where its virtual tokens go: "inputs" (prepended to the
                                           input) or "keys" (to every attention layer's keys and values)
    TRAINABLE_DTYPE                        "float32": what it trains (its own tensors and the head) stays float32
                                           over a bf16 base (precision.py); "base": it trains the base's own
                                           tensors, in the base's dtype
    QUANTIZES_BASE                         stores the frozen base quantized; `dry_apply` then says what it would
                                           quantize on a meta-device model, where apply cannot, and
                                           `load_plan(cfg, device, saved)` how to quantize it as it loads (`loading`)
    DEFAULT_LR                             a usual peak learning rate for it (`tunelab compare`)
    ACTIVATION_SHARE                       {architecture family: share of full fine-tuning's saved block
                                           activations}, measured (advise's memory model)

The facts config's rules need (VIRTUAL_TOKENS, SWITCHABLE, unfreezing) are declared again on the method's config
model, which sits below this package; tests/test_method_facts.py checks that the two agree.

Injected modules (LoRA, DoRA, IA3, bottleneck adapters) carry a boolean
`adapter_disabled`; when it is set they compute exactly what the base layer
would, which is what `adapters_disabled` relies on. Several adapters can share
one base under names (`add_adapter`, `set_adapter`; see named.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from .. import models
from . import named, precision
from .catalog import METHODS, get
from .layout import method_of


def reserved_positions(cfg) -> int:
    """Positions of the model's input length that the method's virtual tokens take (method.num_virtual_tokens)."""
    return cfg.num_virtual_tokens if get(cfg.name).VIRTUAL_TOKENS else 0


def prepare(model, cfg, head: list[str]):
    """Apply the method, or, with `method.init_from`, resume from a saved adapter (tunelab's or peft's).

    The result is the model's adapter "default", so more can be added beside it later.
    """
    init_from = getattr(cfg, "init_from", None)
    if init_from:
        attach = in_own_dtype(cfg.name, head, lambda m: get(cfg.name).load(m, init_from))
    else:
        attach = in_own_dtype(cfg.name, head, lambda m: get(cfg.name).apply(m, cfg, head))
    return named.record(model, "default", cfg.name, head, attach)


def loading(cfg, device, saved: Path | None = None):
    """A context in which task.build_model loads the base as the method `cfg` names stores it: for a method that
    QUANTIZES_BASE, its linears quantized as their weights are read (models.building), so the full-precision base
    is never in memory whole; `saved`: the adapter directory to be loaded onto it (its settings rule)."""
    method = get(cfg.name)
    return models.building(method.load_plan(cfg, device, saved) if method.QUANTIZES_BASE else None)


def in_own_dtype(name: str, head: list[str], attach):
    """For a method that trains in float32 over a bf16 base, `attach` on a head upcast first (precision.py), so a
    saved float32 head loads without rounding; else `attach` itself."""
    if get(name).TRAINABLE_DTYPE != "float32":
        return attach
    return lambda model: attach(precision.float32_head(model, head))


def add_adapter(model, name: str, source, head: list[str], method: str | None = None):
    """Add adapter `name` beside the model's others and make it active.

    `source` is a method config (a fresh adapter to train, e.g. `config.LoraConfig(r=8)`) or the
    directory of a saved adapter (tunelab's layout or peft's; `method` is read from it unless given).
    """
    if isinstance(source, (str, Path)):
        name_of = method or method_of(source)
        attach = in_own_dtype(name_of, head, lambda m: get(name_of).load(m, source))
        return named.add(model, name, name_of, head, attach)
    attach = in_own_dtype(source.name, head, lambda m: get(source.name).apply(m, source, head))
    return named.add(model, name, source.name, head, attach)


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
