"""Take a trained run elsewhere: its adapter as saved (peft layout where peft has one), merged into a plain
Hugging Face model directory that loads with transformers alone, or (embedding runs) a sentence-transformers
model directory."""

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


def sentence_transformers(run, out: Path) -> Path:
    """An embedding run as a sentence-transformers directory: the merged transformer at its top level, then its
    pooling and (task.normalize) normalisation modules, and the input length it was trained with."""
    from . import models

    if run.cfg.task.type != "embedding":
        raise TunelabError(f"--format sentence-transformers needs an embedding run (task.type embedding); "
                           f"'{run.dir}' is a {run.cfg.task.type} run. Use --format peft, or --merge.")
    merged(run, out)
    pooling = run.info["pooling"]
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (out / "1_Pooling").mkdir()
    _write(out / "1_Pooling" / "config.json", {
        "word_embedding_dimension": run.model.config.hidden_size, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": pooling == "last", "include_prompt": True})
    if run.info["normalize"]:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (out / "2_Normalize").mkdir()
    _write(out / "modules.json", modules)
    _write(out / "sentence_bert_config.json", {
        "max_seq_length": models.max_input_length(run.model, run.tokenizer, run.cfg.data.max_length),
        "do_lower_case": False})
    _write(out / "config_sentence_transformers.json", {"prompts": {}, "default_prompt_name": None,
                                                       "similarity_fn_name": "cosine"})
    return out


def _write(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


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
    if fmt == "sentence-transformers":
        out, merge = sentence_transformers(trained, out), True
    else:
        out = merged(trained, out) if merge else artifact(trained, out, fmt)
        fmt = "transformers" if merge or methods.get(trained.cfg.method.name).ARTIFACT == "model" else fmt
    _write(out / "tunelab_export.json", {"run": str(Path(run_dir).resolve()), "method": trained.cfg.method.name,
                                         "merged": merge, "format": fmt, "labels": trained.info.get("labels")})
    return out
