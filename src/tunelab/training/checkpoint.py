"""Checkpoints a run can resume from: written atomically, verified when read, the last K and the best kept.

A checkpoint is a directory `checkpoints/step-NNNNNNN/` holding safetensors files (trainable weights, optimizer
moments, the EMA, the best weights when they differ from the trainable ones, torch RNG states) and `state.json`
(step, counters, scheduler, python/numpy RNG, best metric, the run's fingerprint: fingerprint.py). It is written
under a temporary name, every file fsynced, `manifest.json` (each file's size and sha256) written last, then
renamed into place: a crash at any point leaves either the whole checkpoint or none, and a checkpoint whose files do
not match its manifest is skipped for the one before it, with a message. Pruning keeps the last K, the best one, and
every best step a kept checkpoint names, so the one before a damaged checkpoint still has its best weights.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import atomic
from ..errors import TunelabError
from . import distributed, fingerprint

DIR = "checkpoints"
MANIFEST = "manifest.json"
TMP = ".tmp-step-"  # a checkpoint being written; one left behind by a killed run is removed before the next save
_fsync = atomic.fsync_path
_sha256 = fingerprint.sha256


def step_of(path: Path) -> int | None:
    """The step number of a checkpoint folder `step-NNNNNNN` (any number of digits), None for another name."""
    name = path.name
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else None


def _write_failure(e: BaseException) -> str:
    """Why a write failed, in words: safetensors' own error type wraps the OS error in its text."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return "No space left on device" if "No space left" in str(e) or "os error 28" in str(e) else str(e)


def check_fits(path: Path, saved: dict[str, torch.Tensor], shapes: dict[str, tuple]) -> None:
    """The checkpoint's trainable tensors are those of the model now, name for name and shape for shape."""
    missing, extra = sorted(set(shapes) - set(saved)), sorted(set(saved) - set(shapes))
    resized = [n for n in shapes if n in saved and tuple(saved[n].shape) != tuple(shapes[n])]
    if not (missing or extra or resized):
        return
    found = (f"{len(missing)} trainable tensor(s) of the model are not in it (e.g. {missing[0]})" if missing else
             f"it holds {len(extra)} tensor(s) the model does not train (e.g. {extra[0]})" if extra else
             f"{resized[0]} is {list(saved[resized[0]].shape)} in it and {list(shapes[resized[0]])} in the model")
    raise TunelabError(f"The checkpoint {path} does not fit the model as config.yaml now builds it: {found}. The "
                       f"method, its size or the model changed since it was written, so the run cannot go on from it, "
                       f"even with --resume-anyway. Put config.yaml back as it was to resume, or start a new run.")


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
    try:
        for key, value in tensors.items():
            index, name = key.split("/", 1)
            param = params[int(index)]
            state.setdefault(int(index), {})[name] = like(value, param) if value.shape == param.shape else value
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (IndexError, ValueError, KeyError) as e:  # a config edited and resumed with --resume-anyway
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise TunelabError(f"The checkpoint's optimizer state does not fit the optimizer as config.yaml now sets it "
                           f"up ({why}): its parameter groups (train.head_lr, train.layer_lr_decay, the method) "
                           f"changed since it was written, so the run cannot go on from it, even with "
                           f"--resume-anyway. Put config.yaml back as it was to resume, or start a new run.") from None


class Checkpoints:
    """The checkpoints of one run directory. `record`: compute the run's fingerprint now (from its config.yaml, its
    data files and model) for the checkpoints this object writes; a reader passes False."""

    def __init__(self, run_dir: Path, keep: int, record: bool = True):
        self.root = Path(run_dir) / DIR
        self.keep = keep
        config = Path(run_dir) / "config.yaml"
        # taken as the loop starts, before a config.yaml edited during the run could be read
        self.fingerprint = fingerprint.of_run(Path(run_dir)) \
            if record and distributed.is_main() and config.is_file() else None

    def save(self, step: int, files: dict[str, dict[str, torch.Tensor]], state: dict, best_step: int | None) -> Path:
        """Write `files` (name -> tensors, saved as name.safetensors) and `state` as the checkpoint of `step`,
        atomically, then drop all but the last `keep` and the best ones (see _prune). Only the first process writes."""
        if not distributed.is_main():
            return self.root / f"step-{step:07d}"
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean()
        final = self.root / f"step-{step:07d}"
        tmp = self.root / f"{TMP}{step:07d}"
        try:
            tmp.mkdir()
            for name, tensors in files.items():
                save_file(_tensors(tensors), str(tmp / f"{name}.safetensors"))
            state = {**state, "fingerprint": self.fingerprint} if self.fingerprint is not None else state
            # NaN stays NaN here (Python reads it back): the skipped steps' NaN losses are part of the exact state
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
        except (OSError, SafetensorError) as e:  # a full disk: OSError, or safetensors' own error type
            shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoints are untouched
            raise TunelabError(
                f"Could not write the checkpoint of step {step} in '{self.root}': {_write_failure(e)}. The previous "
                f"checkpoints are intact; free disk space (or choose another output_dir) and resume with "
                f"`tunelab train --resume {self.root.parent}`.") from None
        self._prune(best_step)
        return final

    def clean(self) -> None:
        """Remove checkpoints left half-written by a run that was killed while saving."""
        if self.root.is_dir():
            for tmp in self.root.glob(f"{TMP}*"):
                shutil.rmtree(tmp, ignore_errors=True)

    def _prune(self, best_step: int | None) -> None:
        """Keep the last `keep`, the best step so far, and the best step each kept checkpoint's state names: were
        the newest found damaged, the one before it is resumed, with the best weights its own state points at."""
        done = self.list()
        keep = set(done[-self.keep:]) if self.keep > 0 else set()
        best = {best_step} | {self._best_step(p) for p in keep}
        keep |= {p for p in done if step_of(p) in best}
        for path in done:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def _best_step(path: Path) -> int | None:
        try:
            best = json.loads((path / "state.json").read_text(encoding="utf-8"))["best"]
            return int(best["step"]) if best.get("value") is not None else None
        except (OSError, ValueError, KeyError, TypeError):  # damaged: it will not be resumed from either
            return None

    def log_bytes(self) -> int:
        """The size of the run's metrics.jsonl now, on disk: a resumed run cuts the log back to it. The log writes
        each record through to the file (logs.open_log flushes); fsynced here, the log is never shorter than a
        checkpoint that survived a crash says."""
        log = self.root.parent / "metrics.jsonl"
        if not log.exists():
            return 0
        try:
            _fsync(log)
        except OSError as e:  # a full disk shows up here at the latest
            raise TunelabError(
                f"Could not write the run's log '{log}' to disk: {_write_failure(e)}. The previous checkpoints are "
                f"intact; free disk space (or choose another output_dir) and resume with "
                f"`tunelab train --resume {self.root.parent}`.") from None
        return log.stat().st_size

    def read(self, step: int) -> dict[str, dict]:
        """name -> tensors of the checkpoint of `step` (the best one, which pruning keeps)."""
        path = self.root / f"step-{step:07d}"
        problem = self.problem(path) if path.is_dir() else "it is missing"
        if problem:
            raise TunelabError(f"The checkpoint of the best step ({path}) cannot be used: {problem}. Resume cannot "
                               f"restore the best weights; start the run again.")
        return {p.name[: -len(".safetensors")]: load_file(str(p)) for p in path.glob("*.safetensors")}

    def list(self) -> list[Path]:
        """Finished checkpoint directories (a manifest present), oldest first by step number."""
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.glob("step-*") if step_of(p) is not None and (p / MANIFEST).is_file()),
                      key=step_of)

    def problem(self, path: Path, only: str | None = None) -> str | None:
        """None when every file of the checkpoint (or the file `only`) matches its manifest, else what does not."""
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
            for name, expected in manifest["files"].items():
                if only is not None and name != only:
                    continue
                f = path / name
                if not f.is_file():
                    return f"{name} is missing"
                if f.stat().st_size != expected["bytes"] or _sha256(f) != expected["sha256"]:
                    return f"{name} does not match its manifest (changed or cut short)"
            if only is not None and only not in manifest["files"]:
                return f"{only} is not in its manifest"
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"its manifest is unreadable ({type(e).__name__}: {e})"
        return None

    def newest_state(self) -> tuple[Path, dict] | None:
        """(path, state) of the newest checkpoint whose state.json matches its manifest, its weights unread: what
        a resume checks the run against before it verifies the weights (the fingerprint changes only at a resume)."""
        for path in reversed(self.list()):
            if self.problem(path, only="state.json") is None:
                try:
                    return path, json.loads((path / "state.json").read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
        return None

    def changes(self) -> tuple[Path, list[str] | None] | None:
        """(the newest checkpoint, what changed in the run since it was written: config.yaml, data files, model),
        the list empty when nothing did and None when the checkpoint records no fingerprint (written by an older
        tunelab); None when there is no checkpoint."""
        newest = self.newest_state()
        if newest is None:
            return None
        path, state = newest
        saved = state.get("fingerprint")
        if saved is None:
            return path, None
        return path, fingerprint.differences(saved, fingerprint.of_run(self.root.parent))

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
