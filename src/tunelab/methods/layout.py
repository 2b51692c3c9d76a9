"""tunelab's own adapter layout, for methods PEFT has no format for (BitFit, bottleneck adapters):

    out_dir/adapter_model.safetensors   the method's trainable tensors + every tensor of the head modules,
                                        under their model state-dict names (e.g. `bert.encoder.layer.0.output.dense.bias`,
                                        `classifier.weight`); nothing else of the base
    out_dir/tunelab_adapter.json        {"method": "bitfit", "config": {...method config fields...},
                                         "base_model_name_or_path": ..., "head": [module paths], "format_version": 1}

`load` rebuilds the method on a fresh base with the same head and copies the tensors in.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import TunelabError
from .targets import inside, matches

CONFIG_NAME = "tunelab_adapter.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
FORMAT_VERSION = 1


# -- Hugging Face peft's layout (lora, dora, qlora, ia3, prompt, ptuning, prefix) -------------

def write_peft(out_dir: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    (out_dir / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def read_peft(out_dir: Path, peft_type: str, method: str) -> tuple[dict, Path]:
    """(adapter_config.json as a dict, weights path) of a peft-layout adapter of `peft_type`, or a clear error."""
    out_dir = Path(out_dir)
    config_file, weights_file = out_dir / PEFT_CONFIG, out_dir / WEIGHTS_NAME
    if not config_file.is_file() or not weights_file.is_file():
        raise TunelabError(f"'{out_dir}' is not {_a(method)} adapter directory: it needs {PEFT_CONFIG} and {WEIGHTS_NAME}. "
                           f"Pass the directory {_a(method)} adapter was saved to (by tunelab or peft's save_pretrained).")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TunelabError(f"'{config_file}' is not valid JSON ({e}); re-save the adapter.") from None
    if not isinstance(config, dict) or config.get("peft_type") != peft_type:
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise TunelabError(f"'{config_file}' is not {_a(method)} adapter config (peft_type {kind!r}, not {peft_type}). "
                           f"Pass the directory of {_a(method)} adapter, or load it with the method it was saved by.")
    return config, weights_file


PEFT_METHODS = {"IA3": "ia3", "PROMPT_TUNING": "prompt", "P_TUNING": "ptuning", "PREFIX_TUNING": "prefix"}


# peft's task_type for adapter_config.json; save() is not told the task, the model class name says it.
PEFT_TASK_TYPES = {"ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS",
                   "ForQuestionAnswering": "QUESTION_ANS", "ForCausalLM": "CAUSAL_LM"}


def peft_task_type(model: nn.Module) -> str | None:
    """peft's task_type of a model, from its class name (None for a bare body)."""
    return next((t for s, t in PEFT_TASK_TYPES.items() if type(model).__name__.endswith(s)), None)


def method_of(out_dir: Path) -> str:
    """The tunelab method that saved (or can load) the adapter in `out_dir`: tunelab's layout or peft's."""
    out_dir = Path(out_dir)
    for name in (CONFIG_NAME, PEFT_CONFIG):
        file = out_dir / name
        if file.is_file():
            try:
                config = json.loads(file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TunelabError(f"'{file}' is not valid JSON ({e}); re-save the adapter.") from None
            if not isinstance(config, dict):
                break
            if name == CONFIG_NAME:
                return str(config.get("method"))
            kind = config.get("peft_type")
            if kind == "LORA":
                return "dora" if config.get("use_dora") else "qlora" if (out_dir / "qlora_config.json").is_file() else "lora"
            if kind in PEFT_METHODS:
                return PEFT_METHODS[kind]
            raise TunelabError(f"'{file}' holds a peft {kind} adapter, which tunelab cannot load (it loads "
                               f"LORA, {', '.join(PEFT_METHODS)}).")
    raise TunelabError(f"'{out_dir}' is not an adapter directory: it has neither {PEFT_CONFIG} (peft's layout) nor "
                       f"{CONFIG_NAME} (tunelab's). Pass the adapter/ folder of a tunelab run or a peft save_pretrained "
                       f"directory.")


def _a(method: str) -> str:
    return f"{'an' if method[0] in 'AEIOU' else 'a'} {method}"


def peft_head(model: nn.Module, config: dict) -> list[str]:
    """The head modules of a peft adapter: its modules_to_save matched on module names, outermost only.

    peft adds the usual head names (classifier, score) for SEQ_CLS whether or not the model has them."""
    modules = [p for p, _ in model.named_modules() if p]
    head = [p for p in modules if any(matches(p, n) for n in config.get("modules_to_save") or [])]
    return [p for p in head if not inside(p, [h for h in head if h != p])]


def check_head(model: nn.Module, head: list[str]) -> None:
    for name in head:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise TunelabError(f"Head module '{name}' is not in the model ({type(model).__name__}); its top-level "
                               f"modules are: {', '.join(n for n, _ in model.named_children())}.") from None


def _with_head(model: nn.Module, own: dict[str, torch.Tensor], head: list[str], keep_vars: bool = False) -> dict:
    tensors = dict(own)
    for name in head:
        for key, t in model.get_submodule(name).state_dict(keep_vars=keep_vars).items():
            tensors[f"{name}.{key}"] = t
    return tensors


def save_artifact(model: nn.Module, out_dir: Path, config: dict, own: dict[str, torch.Tensor], head: list[str],
                  base_model_path: str) -> None:
    """Write the method's own tensors and the head's under their state-dict names, plus the JSON description."""
    # clone: safetensors refuses tensors that share storage (e.g. tied weights).
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in _with_head(model, own, head).items()}
    config = {k: v for k, v in config.items() if k != "init_from"}  # how a run started, not what the adapter is
    info = {"method": config["name"], "config": config, "base_model_name_or_path": str(base_model_path),
            "head": list(head), "format_version": FORMAT_VERSION}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    (out_dir / CONFIG_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def read_artifact(out_dir: Path, config_cls) -> tuple:
    """(validated method config, head module names) from a saved adapter dir, or a TunelabError saying what is wrong."""
    method = config_cls.model_fields["name"].annotation.__args__[0]
    out_dir = Path(out_dir)
    config_file = out_dir / CONFIG_NAME
    if not config_file.is_file() or not (out_dir / WEIGHTS_NAME).is_file():
        raise TunelabError(
            f"'{out_dir}' is not a tunelab {method} adapter directory: it needs {CONFIG_NAME} and {WEIGHTS_NAME}. "
            f"Pass the directory the adapter was saved to (the adapter/ folder of a run trained with method.name={method})."
        )
    try:
        info = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TunelabError(f"'{config_file}' is not valid JSON ({e}); re-save the adapter.") from None
    got = info.get("method") if isinstance(info, dict) else None
    if got != method:
        raise TunelabError(f"'{out_dir}' holds a {got!r} adapter, not a {method} one. Load it with method.name={got}, "
                           f"or pass the directory of a {method} adapter.")
    if info.get("format_version") != FORMAT_VERSION:
        raise TunelabError(f"'{config_file}' has format_version {info.get('format_version')!r}; this tunelab reads "
                           f"version {FORMAT_VERSION}. Load it with the tunelab version that saved it.")
    try:
        cfg = config_cls.model_validate(info.get("config") or {"name": method})
    except ValidationError as e:
        raise TunelabError(f"'{config_file}' has an invalid {method} config ({e.errors()[0]['msg']}); re-save the adapter.") from None
    return cfg, list(info.get("head") or [])


def restore(model: nn.Module, out_dir: Path, own: dict[str, torch.Tensor], head: list[str]) -> None:
    """Copy the saved tensors into `own` + the head; the file must hold exactly those, with the same shapes."""
    out_dir = Path(out_dir)
    base = json.loads((out_dir / CONFIG_NAME).read_text(encoding="utf-8")).get("base_model_name_or_path")
    copy_checked(_with_head(model, own, head, keep_vars=True), load_file(str(out_dir / WEIGHTS_NAME)), out_dir, base)


def copy_checked(expected: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], out_dir: Path, base_model) -> None:
    """Copy `saved` into the live tensors of `expected` (same keys, same shapes), or say why the adapter does not fit."""
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise TunelabError(f"The adapter in '{out_dir}' does not fit this model: missing {missing[:5] or 'none'}, "
                           f"unexpected {unexpected[:5] or 'none'}. Load it onto the base model it was trained from ({base_model}).")
    with torch.no_grad():
        for key, target in expected.items():
            if saved[key].shape != target.shape:
                raise TunelabError(
                    f"The adapter in '{out_dir}' stores {key} with shape {tuple(saved[key].shape)}, but this model has "
                    f"{tuple(target.shape)}; load it onto a base with the same head (same number of labels).")
            target.copy_(saved[key])
