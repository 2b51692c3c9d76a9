"""Take a trained run elsewhere: its adapter as saved (peft layout where peft has one), merged into a plain
Hugging Face model directory that loads with transformers alone, (embedding runs) a sentence-transformers model
directory, or (causal-LM runs) one GGUF file with an Ollama Modelfile beside it.

The export is built in a hidden folder beside OUT and put in place only once it is complete (atomic.swap): a
failure leaves what was at OUT byte for byte. Every export holds the marker `.tunelab-export`, and --overwrite
replaces only a folder that has it (or tunelab_export.json, which exports made before the marker have). OUT may not
be, hold or lie inside the run, its artifact or its base model.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from . import atomic, gguf_export, hub, methods, models, ollama, predict, versions
from .data import chat
from .errors import TunelabError
from .methods.layout import CONFIG_NAME as TUNELAB_LAYOUT
from .methods.layout import PEFT_CONFIG
from .report import card

MARKER = ".tunelab-export"
INFO = "tunelab_export.json"  # in every export; the only sign of one made before the marker existed


def resolved(path: Path) -> Path:
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError):  # a loop of links
        return Path(path).expanduser().absolute()


def protected(run_dir: Path, cfg) -> list[tuple[str, Path]]:
    """What an export must never replace, hold or be written into: the run, its artifacts, its base model."""
    found = [("the run folder", run_dir)]
    found += [(f"the run's {name}/", run_dir / name) for name in ("model", "adapter", "adapters", "tasks")
              if (run_dir / name).exists()]  # listed apart: one may be a link to a folder elsewhere
    if hub.is_hub_id(cfg.model.path):  # it lives in the Hugging Face cache, which an export does not touch
        return found
    return found + [("the run's base model (model.path in its config.yaml)", Path(cfg.model.path))]


def check_out_dir(out: Path, overwrite: bool, keep: list[tuple[str, Path]] = ()) -> None:
    """Refuse an OUT that would replace or sit in what the run needs, or replace anything but an earlier export."""
    target = resolved(out)
    clashes = []
    for what, path in keep:
        p = resolved(path)
        if target == p or p in target.parents or target in p.parents:
            clashes.append(("is" if target == p else "is inside" if p in target.parents else "holds", what, path))
    if clashes:
        where, what, path = min(clashes, key=lambda c: c[0] != "is")  # the folder itself, where OUT is one
        raise TunelabError(f"Export target '{out}' {where} {what} ('{path}'): writing the export there could "
                           f"replace what the run is made of. Choose a folder outside the run and its base model.")
    if not (out.exists() or out.is_symlink()) or (out.is_dir() and not out.is_symlink() and not any(out.iterdir())):
        return
    if not overwrite:
        raise TunelabError(f"Export target '{out}' already exists and is not empty. Choose a new directory, or pass "
                           f"--overwrite to replace an earlier export there.")
    if not out.is_dir() or not ((out / MARKER).is_file() or (out / INFO).is_file()):
        raise TunelabError(f"--overwrite refused: '{out}' was not made by `tunelab export` (it has no {MARKER} or "
                           f"{INFO}), so replacing it could lose your files. Choose another directory, or move "
                           f"that one away first.")


def merged(run, out: Path) -> Path:
    """The run with its method folded into the base weights, as a plain model dir (config, safetensors, tokenizer)."""
    return predict.save_merged(run, out)


def sentence_transformers(run, out: Path) -> Path:
    """An embedding run as a sentence-transformers directory: the merged transformer at its top level, then its
    pooling and (task.normalize) normalisation modules, and the input length it was trained with."""
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


def training_system(run) -> str | None:
    """The system message every training conversation starts with, where the run's train file is here to read: a
    model tuned with one should be prompted with it, so it becomes the Modelfile's SYSTEM."""
    source = run.cfg.data.train
    if not isinstance(source, str) or not Path(source).expanduser().is_file():
        return None  # a Hub dataset, a save_to_disk folder, a file since moved: the template's default stands
    try:
        rows = run.task.read_generation(Path(source).expanduser(), run.cfg, None)
    except TunelabError:
        return None
    firsts = {r["messages"][0]["content"] if r.get("messages") and r["messages"][0]["role"] == "system" else None
              for r in rows}
    return firsts.pop() if len(firsts) == 1 else None


def gguf(run, out: Path, quant: str, final: Path) -> dict:
    """The run merged and written as OUT/<name>-<quant>.gguf, with a Modelfile for Ollama; returns what was written."""
    if not run.task.GENERATES:
        raise TunelabError(f"--format gguf is for language models that write text (sft, causal_lm, dpo, grpo runs); "
                           f"'{run.dir}' is a {run.cfg.task.type} run. Use --format peft, or --merge.")
    start = time.perf_counter()
    model = methods.get(run.cfg.method.name).merge(run.model)
    tokenizer, template = run.tokenizer, run.info.get("template")
    chat_template = None if run.cfg.task.type == "causal_lm" else (
        chat.ALPACA_JINJA if template == "alpaca" else tokenizer.chat_template)
    stem = final.name if final.name.lower().endswith(quant) else f"{final.name}-{quant}"
    name = f"{stem}.gguf"
    base, _ = card.base_model(run.cfg, card.inputs(run.dir)[2])
    written = gguf_export.write(model, tokenizer, out / name, quant, name=final.name, chat_template=chat_template,
                                base_model=base, licence=card.licence(run.cfg))
    eos = tokenizer.eos_token or ""
    recognised = ollama.recognise(lambda messages: chat.render(messages, template, tokenizer, True)[0], eos) \
        if chat_template else ollama.Recognised(None, None)
    trained_with = training_system(run)
    if trained_with is not None:
        recognised = ollama.Recognised(recognised.format, trained_with)
    stops = recognised.format.stops(eos) if recognised.format else [s for s in (eos,) if s]
    text, warning = ollama.modelfile(name, recognised, stops, eos, chat_template,
                                     chat=chat_template is not None)
    (out / "Modelfile").write_text(text, encoding="utf-8")
    return {**written, "file": name, "modelfile": {"format": recognised.format.name if recognised.format else None,
                                                   "system": recognised.system, "stops": stops, "warning": warning,
                                                   "system_from": "training data" if trained_with is not None else
                                                   "chat template" if recognised.system else None},
            "seconds": round(time.perf_counter() - start, 1)}


def _write(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def copy_tree(src: Path, out: Path) -> None:
    """Copy the folder `src` into the existing folder `out`. A link is copied as a link, never what it points to,
    and only where it points inside `src` (written relative, so it points into the copy); any other is refused."""
    root = resolved(src)
    for dirpath, dirnames, filenames in os.walk(src):  # links to folders are listed in dirnames, not entered
        rel = Path(dirpath).relative_to(src)
        (out / rel).mkdir(exist_ok=True)
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                target = resolved(path)
                if not target.exists() or (target != root and root not in target.parents):
                    raise TunelabError(
                        f"'{path}' is a symbolic link to '{os.readlink(path)}', which is outside {src} or missing. An "
                        f"export copies links as links and never copies what they point to, so that file would not "
                        f"be in it. Put the file itself in place of the link (or remove the link), then export again.")
                os.symlink(os.path.relpath(target, root / rel), out / rel / name)
            elif name in filenames:
                shutil.copy2(path, out / rel / name)


def artifact(run, out: Path, fmt: str) -> Path:
    """Copy what the run saved: a peft-layout adapter, tunelab's own layout, or a full model dir."""
    method = methods.get(run.cfg.method.name)
    src = run.dir / method.ARTIFACT
    if fmt == "peft" and method.ARTIFACT == "adapter" and not (src / PEFT_CONFIG).is_file():
        raise TunelabError(
            f"method '{run.cfg.method.name}' has no Hugging Face peft format; its adapter is in tunelab's own layout "
            f"({TUNELAB_LAYOUT} + adapter_model.safetensors). Export with --format tunelab, or --merge for a plain model where the method can merge."
        )
    copy_tree(src, out)
    return out


def build(trained, out: Path, fmt: str, merge: bool, final: Path | None = None, quant: str = "f16") -> dict:
    """Write the export into the empty folder `out`, with its model card (README.md, whose load snippets name
    `final`, where the export is put in place), description and marker; returns the description."""
    extra = {}
    if fmt == "gguf":
        extra["gguf"] = gguf(trained, out, quant, resolved(final or out))
        merge = True
    elif fmt == "sentence-transformers":
        sentence_transformers(trained, out)
        merge = True
    elif merge:
        merged(trained, out)
    else:
        artifact(trained, out, fmt)
    if fmt not in ("sentence-transformers", "gguf"):
        fmt = "transformers" if merge or methods.get(trained.cfg.method.name).ARTIFACT == "model" else fmt
    # the run's own card (copied with its artifact) describes the run's folder; this one the export's format
    library = fmt if fmt in ("sentence-transformers", "gguf") else card.artifact_library(out)
    card.write_export(out, resolved(final or out), trained.dir, trained.cfg, library,
                      gguf_file=extra["gguf"]["file"] if "gguf" in extra else None)
    run_dir = str(resolved(trained.dir))
    info = {"run": run_dir, "method": trained.cfg.method.name, "merged": merge, "format": fmt,
            "labels": trained.info.get("labels"), **extra}
    _write(out / INFO, info)
    _write(out / MARKER, {"kind": "export", "tunelab": versions.current().get("tunelab"), "run": run_dir,
                          "format": fmt, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return info


def remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)


FORMATS = ("peft", "tunelab", "sentence-transformers", "gguf")


def run(run_dir: str | Path, out: str | Path, fmt: str = "peft", merge: bool = False, overwrite: bool = False, *,
        quant: str = "f16", trust_remote_code: bool = False, allow_pickle: bool = False) -> Path:
    """Export the run at `run_dir` to `out` (described in OUT/tunelab_export.json); the run's own config.yaml turns
    on neither code nor pickles (see predict.load): `trust_remote_code` / `allow_pickle` do."""
    run_dir, out = Path(run_dir), Path(out)
    if fmt not in FORMATS:
        raise TunelabError(f"--format must be one of {', '.join(FORMATS)}, not '{fmt}'.")
    if quant not in gguf_export.QUANTS or (quant != "f16" and fmt != "gguf"):
        raise TunelabError(f"--quant is {', '.join(gguf_export.QUANTS)} with --format gguf only (got --quant "
                           f"{quant} with --format {fmt}).")
    cfg, _ = predict.read_run(run_dir)
    check_out_dir(out, overwrite, protected(run_dir, cfg))
    trained = predict.load(run_dir, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    # the earlier export (or empty folder) that OUT held is deleted last, once the new one is in place
    with atomic.staged_dir(out, "the export", remove_old=remove) as staging:
        build(trained, staging, fmt, merge, final=out, quant=quant)
    return out
