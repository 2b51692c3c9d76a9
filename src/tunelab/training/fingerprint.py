"""What a run is made of, recorded in every checkpoint, so that `--resume` can tell when it changed since the stop.

A fingerprint holds three things:

- the resolved config as dotted keys (`train.batch_size: 8`), less IGNORED (keys that cannot change what is
  trained) and less the keys that name files, which are compared by what they hold instead of by their path: a
  data file moved elsewhere and named anew in config.yaml is the same run;
- each data file (data.train / validation / test, those of every task of a multi-task run): its size and the
  sha256 of all its bytes, read in blocks;
- the model folder (model.path; method.init_from too): its small files (config.json, the weights index,
  tokenizer files, ...) by sha256 of all their bytes; weight files (and any file over SMALL bytes) by their size
  and the sha256 of SAMPLES blocks of SAMPLE_BYTES spread evenly over them. Hashing whole weights would cost
  seconds to minutes at every start and resume; the samples cost ~1 MiB of reading per file and still tell apart
  two checkpoints of one architecture (same sizes, other numbers everywhere). Modification times are not used:
  a copied folder keeps its contents and loses its times. A finished tunelab run used as model.path is
  fingerprinted by its own files (its config.yaml names its base; the base's files are not followed).

`of(cfg)` computes one, `differences(saved, now)` says in words what changed, one line per dotted key or file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from pydantic import BaseModel

from .. import config as config_mod
from .. import models
from ..config import Config

VERSION = 1

# Config keys that cannot change what a run trains (its weights at each step, its data order, the validation scores
# that pick the best step): a change to one of them between a stop and `--resume` is not a change of the run.
IGNORED = frozenset({
    "output_dir",  # where the run lives: a run folder moved (or built under a temporary name) is the same run
    "train.log_to", "train.log_every",  # where and how often records are logged, not what they hold
    "train.save_checkpoints", "train.checkpoint_every", "train.keep_checkpoints", "train.keep_finished_checkpoints",
    # ^ when checkpoints are written and how many stay: saving one reads the state and draws no random number
    "train.max_bad_steps",  # only decides when the NaN guard gives up; the steps it skips are skipped either way
    "eval.base", "eval.linear_probe", "eval.samples", "eval.max_new_tokens", "eval.forgetting",
    # ^ measured on the model before and after training, outside the loop; a resumed run restores the trained
    #   weights and every random generator from the checkpoint, so what ran before the loop leaves no trace in it
    "model.allow_pickle",  # permission to read pickled weights: the same weights are read, or none
})
# Kept on purpose: eval.batch_size (validation scores, which choose the best step and drive early stopping and the
# plateau rule, and dpo's precomputed reference log-probs are computed in batches of it: another size pads
# differently and can move them in the last bits), and model.device, gradient_checkpointing, split_by_length,
# padding_free (the same maths, other rounding).

_DATA_KEY = re.compile(r"(tasks\[\d+\]\.)?data\.(train|validation|test)")
_FOLDER_KEYS = ("model.path", "method.init_from")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
SMALL = 64 << 20  # files up to this size are hashed whole
SAMPLES, SAMPLE_BYTES = 16, 64 << 10
_SKIP = {"checkpoints", "tensorboard"}  # a run folder used as model.path: what it writes while training


def of(cfg: Config) -> dict:
    """The fingerprint of the run `cfg` describes, as it is on disk now (JSON-ready)."""
    flat = flatten(cfg)
    files = {k: (folder(v) if k in _FOLDER_KEYS else data_file(v)) for k, v in flat.items()
             if v is not None and (k in _FOLDER_KEYS or _DATA_KEY.fullmatch(k))}
    settings = {k: v for k, v in flat.items()
                if k not in IGNORED and k not in _FOLDER_KEYS and not _DATA_KEY.fullmatch(k)}
    return {"version": VERSION, "config": settings, "files": files}


def of_run(run_dir: Path) -> dict:
    """The fingerprint of the run folder `run_dir` from its config.yaml."""
    return of(config_mod.load(Path(run_dir) / "config.yaml", []))


def flatten(node, prefix: str = "") -> dict:
    """A config as {dotted key: JSON value}: `train.lr`, `tasks[0].data.train`. Sections (and lists of them) are
    walked; any other value is one entry, a dict-valued key (method.rank_pattern) included."""
    if isinstance(node, BaseModel):
        out = {}
        for name in type(node).model_fields:
            out.update(flatten(getattr(node, name), f"{prefix}.{name}" if prefix else name))
        return out
    if isinstance(node, list) and node and all(isinstance(v, BaseModel) for v in node):
        out = {}
        for i, v in enumerate(node):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: json.loads(json.dumps(node))}


def sha256(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def sampled_sha256(path: Path, size: int) -> str:
    """sha256 of SAMPLES blocks spread evenly over the file, first and last included (the whole of a small one)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= SAMPLES * SAMPLE_BYTES:
            h.update(f.read())
        else:
            for i in range(SAMPLES):
                f.seek((size - SAMPLE_BYTES) * i // (SAMPLES - 1))
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def _entry(path: Path, weights: bool) -> dict:
    size = path.stat().st_size
    if weights or size > SMALL:
        return {"bytes": size, "sampled_sha256": sampled_sha256(path, size)}
    return {"bytes": size, "sha256": sha256(path)}


def data_file(value: str) -> dict:
    """A data file by its size and the sha256 of all its bytes (a folder: every file in it)."""
    p = Path(value).expanduser()
    if p.is_file():
        st = p.stat().st_size
        return {"path": str(value), "kind": "file", "bytes": st, "sha256": sha256(p)}
    if p.is_dir():
        return {"path": str(value), "kind": "folder",
                "files": {str(f.relative_to(p)): {"bytes": f.stat().st_size, "sha256": sha256(f)}
                          for f in sorted(p.rglob("*")) if f.is_file()}}
    return {"path": str(value), "kind": "missing"}


def folder(value: str) -> dict:
    """A model (or adapter) folder: small files hashed whole, weight files by size and sampled hash."""
    p = Path(value).expanduser()
    if not p.exists():
        return {"path": str(value), "kind": "missing"}
    if p.is_file():
        return {"path": str(value), "kind": "file", **_entry(p, p.suffix in WEIGHT_SUFFIXES)}
    skip = _SKIP if models.is_run_dir(p) else set()
    files = {}
    for dirpath, dirnames, filenames in os.walk(p):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not (Path(dirpath) == p and d in skip))
        for name in sorted(filenames):
            f = Path(dirpath) / name
            if not name.startswith(".") and f.is_file():
                files[str(f.relative_to(p))] = _entry(f, f.suffix in WEIGHT_SUFFIXES)
    return {"path": str(value), "kind": "folder", "files": files}


# -- comparing -----------------------------------------------------------------------------------------------------

def differences(saved: dict, now: dict) -> list[str]:
    """What differs between two fingerprints, one line each: `train.batch_size: 4 -> 8`, or a file named with what
    changed in it. Empty when they match. A key only one side has (a tunelab version that added or dropped a key,
    the keys of another method) is left out: what made it appear (method.name, say) is named itself."""
    out = []
    old_cfg, new_cfg = saved.get("config", {}), now.get("config", {})
    for key in old_cfg:
        if key in new_cfg and old_cfg[key] != new_cfg[key]:
            out.append(f"{key}: {_show(old_cfg[key])} -> {_show(new_cfg[key])}")
    old_files, new_files = saved.get("files", {}), now.get("files", {})
    for key in sorted(set(old_files) | set(new_files)):
        change = _file_change(key, old_files.get(key), new_files.get(key))
        if change:
            out.append(change)
    return out


def _show(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _contents(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k != "path"}


def _file_change(key: str, old: dict | None, new: dict | None) -> str | None:
    if old is None or new is None:
        return f"{key}: {_show(old['path']) if old else 'not set'} -> {_show(new['path']) if new else 'not set'}"
    if _contents(old) == _contents(new):
        return None  # the same bytes, wherever they are now
    if new["kind"] == "missing":
        return f"{key}: '{new['path']}' no longer exists"
    moved = old["path"] != new["path"]
    head = f"{key}: {_show(old['path'])} -> {_show(new['path'])}, which holds other contents" if moved else \
        f"{key}: '{new['path']}' changed"
    if old["kind"] == "missing":
        return f"{head} (it did not exist when the checkpoint was written)"
    if old["kind"] != new["kind"]:
        return f"{head} (it was a {old['kind']}, it is a {new['kind']} now)"
    if new["kind"] == "file":
        return f"{head} ({_describe(old)} -> {_describe(new)})"
    changed = _folder_changes(old["files"], new["files"])
    return f"{head}: " + ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")


def _describe(entry: dict) -> str:
    digest = entry.get("sha256") or entry.get("sampled_sha256", "")
    return f"{entry['bytes']:,} bytes, sha256 {digest[:12]}"


def _folder_changes(old: dict, new: dict) -> list[str]:
    out = []
    for name in sorted(set(old) | set(new)):
        if name not in new:
            out.append(f"{name} removed")
        elif name not in old:
            out.append(f"{name} added")
        elif old[name] != new[name]:
            out.append(f"{name} changed ({_describe(old[name])} -> {_describe(new[name])})")
    return out
