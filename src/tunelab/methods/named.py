"""Several named adapters on one base model, one active at a time.

An adapter is what its method changed in the module tree: the layers it wrapped (LoRA, DoRA,
IA3, bottleneck adapters: `path -> (base layer, wrapper)`), the virtual-token encoder it attached
(`prompt_encoder -> (None, encoder)`), and its own copy of the head modules (as peft's
`modules_to_save` keeps one per adapter). `add` finds these by comparing the tree before and
after the method ran; `use` puts one adapter's modules into the tree and the base layers back
where the others were. The frozen base weights are shared, never copied, and switching moves
module references only, so it costs microseconds and no memory.

Parked adapters are not submodules of the model: `model.named_parameters()` and the methods'
`save` see the active adapter only; `parameters(model)` yields every adapter's trainable tensors
(for one optimizer over several adapters). `methods.adapters_disabled` still turns the active one
off, so "base" is always `with adapters_disabled(model):`.

Methods that change base weights in place (full, freeze, bitfit) or the base itself (qlora quantizes it)
declare SWITCHABLE = False and cannot share a base with another adapter, nor can an adapter that trains base
parameters (LoRA with bias all/lora_only); both are refused with a message.
"""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from ..errors import TunelabError
from .catalog import METHODS, get

REGISTRY = "_tunelab_adapters"  # in the model's __dict__, so parked modules are not submodules
SWITCHABLE = tuple(name for name, m in METHODS.items() if m.SWITCHABLE)  # for messages; each method declares it


def _registry(model: nn.Module) -> dict:
    return model.__dict__.setdefault(REGISTRY, {"active": None, "adapters": {}})


def adapters(model: nn.Module) -> dict[str, dict]:
    """Each adapter's entry by name: {"method", "modules": {path: (base layer, its module)}, "head", "shared"}."""
    return _registry(model)["adapters"]


def names(model: nn.Module) -> list[str]:
    return list(_registry(model)["adapters"])


def active(model: nn.Module) -> str | None:
    return _registry(model)["active"]


def _set(model: nn.Module, path: str, module: nn.Module | None) -> None:
    parent, _, child = path.rpartition(".")
    owner = model.get_submodule(parent)
    if module is None:
        if hasattr(owner, child):
            delattr(owner, child)
    else:
        setattr(owner, child, module)


def _outermost_changes(before: dict, after: dict) -> dict[str, tuple]:
    changed = [p for p, m in after.items() if before.get(p) is not m]
    changed = [p for p in changed if not any(p.startswith(q + ".") for q in changed if q != p)]
    return {p: (before.get(p), after[p]) for p in changed}


def _shared(model: nn.Module, modules: list[str], head: list[str]) -> list[str]:
    """Trainable parameters that belong to the base, not to the adapter's own modules or head (e.g. the
    biases LoRA's bias=all trains, also those of the layers it wraps: `<path>.base_layer.bias`)."""
    def own(n: str) -> bool:
        return any(n.startswith(h + ".") for h in head) or any(
            n.startswith(m + ".") and not n.startswith(m + ".base_layer.") for m in modules)
    return [n for n, p in model.named_parameters() if p.requires_grad and not own(n)]


def record(model: nn.Module, name: str, method: str, head: list[str], attach) -> nn.Module:
    """Run `attach(model) -> model` (a method's apply or load) and register what it added as `name`."""
    reg = _registry(model)
    if "base_head" not in reg:  # what a new adapter's head starts from: the base model's own
        reg["base_head"] = {h: copy.deepcopy(model.get_submodule(h)) for h in head}
    before = dict(model.named_modules())
    model = attach(model)
    # Only switchable methods keep what they replaced: qlora's float base layers must be freed, not held.
    modules = _outermost_changes(before, dict(model.named_modules())) if get(method).SWITCHABLE else {}
    entry = {"method": method, "modules": modules, "head": {h: model.get_submodule(h) for h in head},
             "shared": _shared(model, list(modules), head)}
    reg["adapters"][name] = entry
    reg["active"] = name
    return model


def _refuse(entry_name: str, entry: dict) -> None:
    if not get(entry["method"]).SWITCHABLE:
        raise TunelabError(
            f"Adapter '{entry_name}' is a {entry['method']} run, which changes the base model itself, so no other "
            f"adapter can share that base. Named adapters work with {', '.join(SWITCHABLE)}.")
    if entry["shared"]:
        more = f" and {len(entry['shared']) - 1} more" if len(entry["shared"]) > 1 else ""
        raise TunelabError(
            f"Adapter '{entry_name}' trains base parameters in place ({entry['shared'][0]}{more}), which every "
            f"adapter on the base would share. Use method.bias=none for adapters that share a base.")


def add(model: nn.Module, name: str, method: str, head: list[str], attach) -> nn.Module:
    """Add adapter `name` (made by `attach(model) -> model`, a method's apply or load) and make it active.

    The adapter active before is parked with its head; the new one gets a fresh copy of the head.
    """
    reg = _registry(model)
    if name in reg["adapters"]:
        raise TunelabError(f"The model already has an adapter named '{name}' (it has: {', '.join(reg['adapters'])}); "
                           f"pick another name.")
    if not get(method).SWITCHABLE:
        raise TunelabError(f"method '{method}' cannot be added as a named adapter: it changes the base model itself. "
                           f"Named adapters work with {', '.join(SWITCHABLE)}.")
    if not reg["adapters"] and any(hasattr(m, "adapter_disabled") for m in model.modules()):
        raise TunelabError("This model carries an adapter that was not added by name (a method's apply or load was "
                           "called directly). Start from the base model and add every adapter with "
                           "methods.add_adapter, or load runs with tunelab.load(...).add_adapter.")
    for other, entry in reg["adapters"].items():
        _refuse(other, entry)
    previous = reg["active"]
    _park(model)
    for h, module in reg.get("base_head", {}).items():  # the new adapter's own head, from the base's
        _set(model, h, copy.deepcopy(module))
    try:
        model = record(model, name, method, head, attach)
        if len(reg["adapters"]) > 1:
            _refuse(name, reg["adapters"][name])
    except Exception:
        entry = reg["adapters"].pop(name, None)
        if entry:
            for p in [p for n, p in model.named_parameters() if n in entry["shared"]]:
                p.requires_grad_(False)
            for path, (base, _) in entry["modules"].items():
                _set(model, path, base)
        reg["active"] = None
        if previous is not None:
            use(model, previous)
        raise
    return model


def _park(model: nn.Module) -> None:
    reg = _registry(model)
    if reg["active"] is not None:
        for path, (base, _) in reg["adapters"][reg["active"]]["modules"].items():
            _set(model, path, base)
    reg["active"] = None


def use(model: nn.Module, name: str) -> nn.Module:
    """Make adapter `name` the active one (its layers, virtual tokens and head)."""
    reg = _registry(model)
    if name not in reg["adapters"]:
        have = ", ".join(reg["adapters"]) or "none (add one with methods.add_adapter)"
        raise TunelabError(f"No adapter named '{name}' on this model; it has: {have}.")
    if reg["active"] == name:
        return model
    _park(model)
    entry = reg["adapters"][name]
    for path, (_, module) in entry["modules"].items():
        _set(model, path, module)
    for path, module in entry["head"].items():
        _set(model, path, module)
    reg["active"] = name
    return model


def parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every adapter's trainable parameters (active and parked) and heads, each once."""
    seen, out = set(), []
    for entry in _registry(model)["adapters"].values():
        for module in [m for _, m in entry["modules"].values()] + list(entry["head"].values()):
            for p in module.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def save(model: nn.Module, name: str, out_dir: Path, base_model_path: str) -> None:
    """Save adapter `name` with its method's own `save` (peft or tunelab layout), whichever is active."""
    previous = active(model)
    use(model, name)
    entry = _registry(model)["adapters"][name]
    try:
        get(entry["method"]).save(model, Path(out_dir), base_model_path, list(entry["head"]))
    finally:
        if previous is not None:
            use(model, previous)
