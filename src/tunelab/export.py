"""Take a trained run elsewhere: its adapter as saved (peft layout where peft has one), or merged
into a plain Hugging Face model directory that loads with transformers alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from . import methods
from .errors import TunelabError
from .methods.layout import CONFIG_NAME as TUNELAB_LAYOUT
from .methods.layout import PEFT_CONFIG


def check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise TunelabError(f"Export target '{out}' already exists and is not empty. Choose a new directory, or pass --overwrite to replace it.")
        if not out.is_dir() or not ((out / "config.json").is_file() or (out / PEFT_CONFIG).is_file() or (out / TUNELAB_LAYOUT).is_file()):
            raise TunelabError(f"--overwrite refused: '{out}' does not look like an exported model or adapter, so deleting it could lose your files. Choose another directory.")
        shutil.rmtree(out)


def merged(run, out: Path) -> Path:
    """Fold the method into the base weights and save a plain model dir (config, safetensors, tokenizer)."""
    model = methods.get(run.cfg.method.name).merge(run.model)
    model.save_pretrained(out)
    run.tokenizer.save_pretrained(out)
    return out


def artifact(run, out: Path, fmt: str) -> Path:
    """Copy what the run saved: a peft-layout adapter, tunelab's own layout, or a full model dir."""
    method = methods.get(run.cfg.method.name)
    src = run.dir / method.ARTIFACT
    if fmt == "peft" and method.ARTIFACT == "adapter" and not (src / PEFT_CONFIG).is_file():
        raise TunelabError(
            f"method '{run.cfg.method.name}' has no Hugging Face peft format; its adapter is in tunelab's own layout "
            f"({TUNELAB_LAYOUT} + adapter_model.safetensors). Export with --format tunelab, or --merge for a plain model where the method can merge."
        )
    shutil.copytree(src, out)
    return out


def run(run_dir: str | Path, out: str | Path, fmt: str = "peft", merge: bool = False, overwrite: bool = False) -> Path:
    from .predict import load

    out = Path(out)
    check_out_dir(out, overwrite)
    trained = load(run_dir)
    out = merged(trained, out) if merge else artifact(trained, out, fmt)
    (out / "tunelab_export.json").write_text(json.dumps(
        {"run": str(Path(run_dir).resolve()), "method": trained.cfg.method.name, "merged": merge,
         "format": "transformers" if merge or methods.get(trained.cfg.method.name).ARTIFACT == "model" else fmt,
         "labels": trained.info.get("labels")}, indent=2) + "\n", encoding="utf-8")
    return out
