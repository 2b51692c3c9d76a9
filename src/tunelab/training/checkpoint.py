"""Checkpoints a run can resume from: written atomically, verified when read, the last K and the best kept.

A checkpoint is a directory `checkpoints/step-NNNNNNN/` holding safetensors files (trainable weights, optimizer
moments, the EMA, the best weights when they differ from the trainable ones, torch RNG states) and `state.json`
(step, counters, scheduler, python/numpy RNG, best metric). It is written under a temporary name, every file
fsynced, `manifest.json` (each file's size and sha256) written last, then renamed into place: a crash at any
point leaves either the whole checkpoint or none, and a checkpoint whose files do not match its manifest is
skipped for the one before it, with a message.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import TunelabError

DIR = "checkpoints"
MANIFEST = "manifest.json"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors wants contiguous tensors that share no memory
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def rng_state() -> tuple[dict, dict]:
    """(tensors, json) of every random generator a training step draws from."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return tensors, {"numpy": [kind, keys.tolist(), pos, has_gauss, cached], "python": [version, list(internal), gauss]}


def set_rng_state(tensors: dict, saved: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict, list]:
    """The optimizer's state as flat tensors ("<param index>/<key>") and its param groups (JSON)."""
    sd = opt.state_dict()
    tensors = {f"{i}/{k}": v if torch.is_tensor(v) else torch.tensor(v)
               for i, state in sd["state"].items() for k, v in state.items()}
    return tensors, sd["param_groups"]


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict, groups: list, like=lambda t, ref: t) -> None:
    """`like(tensor, param)`: a moment saved whole, sharded as its parameter is (several processes, FSDP2)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split("/", 1)
        param = params[int(index)]
        state.setdefault(int(index), {})[name] = like(value, param) if value.shape == param.shape else value
    opt.load_state_dict({"state": state, "param_groups": groups})


class Checkpoints:
    """The checkpoints of one run directory."""

    def __init__(self, run_dir: Path, keep: int):
        self.root = Path(run_dir) / DIR
        self.keep = keep

    def save(self, step: int, files: dict[str, dict[str, torch.Tensor]], state: dict, best_step: int | None) -> Path:
        """Write `files` (name -> tensors, saved as name.safetensors) and `state` as the checkpoint of `step`,
        atomically, then drop all but the last `keep` and the one of `best_step`. Only the first process writes."""
        from . import distributed

        if not distributed.is_main():
            return self.root / f"step-{step:07d}"
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step-{step:07d}"
        tmp = self.root / f".tmp-step-{step:07d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            for name, tensors in files.items():
                save_file(_tensors(tensors), str(tmp / f"{name}.safetensors"))
            (tmp / "state.json").write_text(json.dumps(state), encoding="utf-8")
            manifest = {"step": step, "files": {}}
            for path in sorted(tmp.iterdir()):
                _fsync(path)
                manifest["files"][path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
            _fsync(tmp / MANIFEST)
            _fsync(tmp)
            if final.exists():  # the same step saved again (an eval right after a periodic save): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(self.root)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoints are untouched
            raise TunelabError(
                f"Could not write the checkpoint of step {step} in '{self.root}': {e.strerror or e}. The previous "
                f"checkpoints are intact; free disk space (or choose another output_dir) and resume with "
                f"`tunelab train --resume {self.root.parent}`.") from None
        self._prune(best_step)
        return final

    def _prune(self, best_step: int | None) -> None:
        done = self.list()
        keep = set(done[-self.keep:]) if self.keep > 0 else set()
        keep |= {p for p in done if best_step is not None and p.name == f"step-{best_step:07d}"}
        for path in done:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def log_bytes(self) -> int:
        """The size of the run's metrics.jsonl now: a resumed run cuts the log back to it."""
        log = self.root.parent / "metrics.jsonl"
        return log.stat().st_size if log.exists() else 0

    def read(self, step: int) -> dict[str, dict]:
        """name -> tensors of the checkpoint of `step` (the best one, which pruning keeps)."""
        path = self.root / f"step-{step:07d}"
        problem = self.problem(path) if path.is_dir() else "it is missing"
        if problem:
            raise TunelabError(f"The checkpoint of the best step ({path}) cannot be used: {problem}. Resume cannot "
                               f"restore the best weights; start the run again.")
        return {p.name[: -len(".safetensors")]: load_file(str(p)) for p in path.glob("*.safetensors")}

    def list(self) -> list[Path]:
        """Finished checkpoint directories (a manifest present), oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step-*") if (p / MANIFEST).is_file())

    def problem(self, path: Path) -> str | None:
        """None when every file of the checkpoint matches its manifest, else what does not."""
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
            for name, expected in manifest["files"].items():
                f = path / name
                if not f.is_file():
                    return f"{name} is missing"
                if f.stat().st_size != expected["bytes"] or _sha256(f) != expected["sha256"]:
                    return f"{name} does not match its manifest (changed or cut short)"
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"its manifest is unreadable ({type(e).__name__}: {e})"
        return None

    def latest(self, say=print) -> tuple[Path, dict, dict[str, dict]] | None:
        """The newest checkpoint whose files match its manifest, as (path, state, name -> tensors); each newer one
        that does not is reported and skipped."""
        for path in reversed(self.list()):
            problem = self.problem(path)
            if problem:
                say(f"checkpoint {path.name} is damaged ({problem}); using the one before it")
                continue
            state = json.loads((path / "state.json").read_text(encoding="utf-8"))
            return path, state, self.read(state["step"])
        return None
