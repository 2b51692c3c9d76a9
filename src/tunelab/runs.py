"""Run folders: which folders are tunelab's, who may write one, and how a new one replaces an old one.

- A folder is tunelab's only if it holds the marker `.tunelab-run` that tunelab wrote (its kind, an id, the
  version). Folders made before the marker existed pass a stricter check: the files a finished run (or a compare,
  cv or sweep folder) always has, and nothing that tunelab does not write. `--overwrite` deletes nothing else.
- A run holds an exclusive lock (flock) on its folder for its whole life: a second train, --overwrite or --resume
  on it is refused, naming the process that holds it. The kernel drops the lock when that process dies, so a killed
  run never blocks the next one.
- `train --overwrite` builds the new run in a hidden folder beside the old one and swaps it in only when it has
  finished; the old run is deleted after that, as the last step. Until then the old run is byte for byte as it was.
  A new run that stops with checkpoints keeps its folder, and `--resume` on it finishes the swap.
- The output folder may not be, or hold, anything the run reads (the model, data files, a reward model...).

Below that, what every spine (single task, multi-task, RL) does with its run folder: begin (check, lock, seed),
write its first files, save the artifact, finish (summary.json, checkpoints dropped, the swap, report.html), and
resume.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import resource
import secrets
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import atomic, hub, models, report, versions
from . import config as config_mod
from .config import Config
from .data import hub as data_hub
from .errors import TunelabError
from .evaluate import usercode
from .report import card
from .training import checkpoint, distributed, logs

MARKER = ".tunelab-run"
# What tunelab writes in each kind of folder: a folder made before the marker existed may hold nothing else.
KNOWN = {
    "run": {"config.yaml", "summary.json", "metrics.jsonl", "data_report.json", "labels.json", "samples.json",
            "versions.json", "report.html", "adapter", "model", "adapters", "heads", "tasks", "checkpoints",
            "tensorboard", "eval", MARKER},
    "compare": {"config.yaml", "compare.json", "compare.csv", "compare.md", "report.html", "recipes", "logs", "runs",
                MARKER},
    "cv": {"config.yaml", "cv_summary.json", "cv_summary.md", "report.html", "folds", MARKER},
    "sweep": {"config.yaml", "sweep_summary.json", "best.yaml", MARKER},
}
# ... and what it always has when it is finished.
REQUIRED = {"run": ("config.yaml", "summary.json", "metrics.jsonl"), "compare": ("config.yaml", "compare.json"),
            "cv": ("config.yaml", "cv_summary.json"), "sweep": ("config.yaml", "sweep_summary.json")}
NUMBERED = {"cv": "fold_", "sweep": "trial_"}  # the runs inside a cv or sweep folder


def expand(path: str | Path) -> Path:
    return Path(os.path.expanduser(str(path)))


def marker(path: Path) -> dict | None:
    """The marker tunelab wrote in `path`, or None."""
    try:
        found = json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and found.get("kind") in KNOWN else None


def write_marker(path: Path, kind: str, **extra) -> dict:
    mark = {"kind": kind, "id": secrets.token_hex(8), "tunelab": versions.current().get("tunelab"),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
    atomic.write_json(Path(path) / MARKER, mark, "the run marker")
    return mark


def legacy_kind(path: Path) -> str | None:
    """The kind of a folder made by a tunelab from before the marker: its required files present, nothing else."""
    names = {p.name for p in Path(path).iterdir()}
    for kind, required in REQUIRED.items():
        allowed = KNOWN[kind]
        extra = {n for n in names - allowed if not (kind in NUMBERED and n.startswith(NUMBERED[kind]))}
        if all(r in names for r in required) and not extra:
            return kind
    return None


def whose(path: Path) -> str | None:
    """'run', 'compare', 'cv' or 'sweep' when `path` is provably a tunelab folder, else None."""
    found = marker(path)
    return found["kind"] if found else legacy_kind(path)


def check_replaceable(path: Path, kind: str, what: str) -> None:
    """Only a folder that is provably tunelab's, of the same kind, may be replaced by --overwrite."""
    found = whose(path)
    if found is None:
        listing = ", ".join(sorted(p.name for p in path.iterdir())[:6])
        raise TunelabError(
            f"--overwrite refused: '{path}' is not provably a tunelab {what} (it has no {MARKER} marker, and its "
            f"files ({listing}) are not those of a finished run made by an earlier tunelab), so deleting it could lose "
            f"your files. Choose another output folder, or if it is yours to delete, remove it by hand "
            f"(rm -r '{path}') and run again.")
    if found != kind:
        raise TunelabError(f"--overwrite refused: '{path}' is a tunelab {found} folder, not a {what}; replacing it with "
                           f"a {what} would lose it. Choose another output folder.")


# -- locks -------------------------------------------------------------------------------------------------------------

def lock(path: Path, doing: str) -> int:
    """An exclusive lock on the folder `path`, held by the returned descriptor until it is closed (or the process
    ends). Refused, naming the holder, when another process (or another run in this one) has it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise TunelabError(f"Cannot {doing} '{path}': it is in use by {holder(path)}, which holds its lock. Wait for "
                           f"that run to finish (or stop it), or choose another output_dir=... .") from None
    return fd


def unlock(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)  # closing the descriptor releases the flock
        except OSError:
            pass


def lock_holder(path: Path) -> int | None:
    """The pid of the process holding the flock on `path`, read from /proc/locks (Linux), without taking the lock;
    None when nobody holds it (or elsewhere than Linux)."""
    try:
        st = os.stat(path)
        wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks", encoding="ascii") as f:
            for line in f:
                fields = line.split()
                if "FLOCK" in fields and fields[5] == wanted:
                    return int(fields[4])
    except (OSError, ValueError, IndexError):
        pass
    return None


def holder(path: Path) -> str:
    """The process holding the flock on `path`, in words; 'another process' where /proc/locks does not say."""
    pid = lock_holder(path)
    if pid is None:
        return "another process"
    if pid == os.getpid():
        return f"another run in this process (pid {pid})"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = ""
    return f"process {pid} ({cmd[:200]})" if cmd else f"process {pid}"


# -- what a run reads must not be where it writes ----------------------------------------------------------------------

def inputs(cfg) -> list[tuple[str, str]]:
    """(config key, path) of every file or folder the run reads (a Hub model is read from the Hugging Face cache)."""
    found = [] if hub.is_hub_id(cfg.model.path) else [("model.path", cfg.model.path)]
    for i, data in enumerate([cfg.data] if cfg.data is not None else [t.data for t in cfg.tasks]):
        prefix = "data" if cfg.data is not None else f"tasks[{i}].data"
        found += [(f"{prefix}.{k}", getattr(data, k)) for k in ("train", "validation", "test") if getattr(data, k)]
    if getattr(cfg.method, "init_from", None):
        found.append(("method.init_from", cfg.method.init_from))
    if cfg.eval.forgetting not in (None, "auto", "none"):
        found.append(("eval.forgetting", cfg.eval.forgetting))
    task = cfg.task
    if task is not None and getattr(task, "reward_model", None):
        found.append(("task.reward_model", task.reward_model))
    if task is not None and getattr(task, "reward_function", None) and usercode.source_file(task.reward_function):
        found.append(("task.reward_function", usercode.source_file(task.reward_function)))
    judge = cfg.eval.judge  # a reward run's directory, or the .py file of 'file.py:function'
    if judge and (usercode.is_run(judge) or usercode.source_file(judge)):
        found.append(("eval.judge", judge if usercode.is_run(judge) else usercode.source_file(judge)))
    return found


def check_not_an_input(out: Path, cfg) -> None:
    """Refuse an output folder that is, or holds, a file or folder the run reads: replacing it would delete it."""
    target = out.resolve()
    for key, value in inputs(cfg):
        p = expand(value).resolve()
        if p == target or target in p.parents:
            where = "is" if p == target else "holds"
            raise TunelabError(f"output_dir '{out}' {where} {key} ('{value}'): the run reads it, and writing the run "
                               f"there would overwrite or delete it. Choose an output_dir=... outside it.")


# -- claiming a folder, building in it, swapping it in -----------------------------------------------------------------

class Claim:
    """The right to write one run (or compare, cv, sweep) folder, from the checks before any work to the end.

    `make()` gives the folder to write in: the output folder itself when it is new, a hidden folder beside it when
    an old one is being replaced, the run's own folder when resuming. `finish()` puts a replacement in place and
    deletes the old one last. Leaving the `with` block without `finish()` (an error, Ctrl-C) removes what this claim
    made unless it holds checkpoints to resume from, and leaves the old folder as it was."""

    def __init__(self, out: Path, kind: str, replace: bool, resume: bool = False):
        self.out, self.kind, self.replace, self.resume = out, kind, replace, resume
        # compare, cv and sweep folders hold runs whose configs name their final paths, so they are not built
        # under another name: the old folder is moved aside instead, deleted at the end, moved back on a failure
        self.aside: Path | None = None
        self.dir: Path | None = None
        self.fds: list[int] = []
        self.finished = False

    def __enter__(self) -> Claim:
        return self

    @contextmanager
    def released_on_error(self):
        """For the checks between claiming and the run's `with claim:` block: a failure there lets go of the lock."""
        try:
            yield
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if not self.finished and self.dir is not None and not self.resume:
                self._abandon()
        finally:
            for fd in self.fds:
                unlock(fd)
            self.fds = []

    def make(self) -> Path:
        """The folder to write the run in, created, locked and marked as tunelab's."""
        if self.resume:
            self.dir = self.out
            return self.dir
        if self.replace and self.kind == "run":
            self.dir = atomic.temp_name(self.out, "tunelab-new")
            self.dir.mkdir()
            self.fds.append(lock(self.dir, "write a run in"))
        elif self.replace:
            self.aside = atomic.temp_name(self.out, "tunelab-old")
            os.rename(self.out, self.aside)
            self.out.mkdir()
            self.fds.append(lock(self.out, "write in"))
            self.dir = self.out
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            self.fds.append(lock(self.out, "write a run in"))
            if any(self.out.iterdir()):  # another run filled it since the first check
                raise TunelabError(f"Output directory '{self.out}' was filled by another process while this run was "
                                   f"starting. Choose a new output_dir=... .")
            self.dir = self.out
        write_marker(self.dir, self.kind, **({"replaces": str(self.out.resolve())} if self.dir != self.out else {}))
        return self.dir

    def finish(self) -> Path:
        """Put the finished folder at the output path; an old folder it replaces is deleted last."""
        target = self.out
        if self.resume:  # a replacement that stopped and was resumed: finish its swap now
            replaces = (marker(self.dir) or {}).get("replaces")
            if not replaces:
                self.finished = True
                return self.dir
            target = Path(replaces)
            if target.exists():
                check_replaceable(target, self.kind, "run")
                self.fds.append(lock(target, "replace"))
        elif self.aside is not None:
            self.finished = True
            shutil.rmtree(self.aside, ignore_errors=True)
            return self.dir
        elif not self.replace:
            self.finished = True
            return self.dir
        mark = marker(self.dir) or {"kind": self.kind}
        mark.pop("replaces", None)
        atomic.write_json(self.dir / MARKER, mark, "the run marker")
        try:
            atomic.fsync_tree(self.dir)
            old = atomic.swap(self.dir, target)
        except atomic.WRITE_ERRORS as e:
            raise atomic.write_error(e, target, "the finished run") from None
        self.finished = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.dir = target
        return target

    def _abandon(self) -> None:
        """A replacement failed: remove the new folder, unless it holds checkpoints worth resuming. (A failed new
        run keeps its folder, as before: its log says what went wrong, and its marker lets --overwrite replace it.)"""
        if self.aside is not None:  # put the old folder back
            shutil.rmtree(self.out, ignore_errors=True)
            os.rename(self.aside, self.out)
            return
        if not self.replace:
            return
        checkpoints = self.dir / "checkpoints"
        if checkpoints.is_dir() and any(checkpoints.glob("step-*")):
            print(f"note: the unfinished run that was to replace '{self.out}' has checkpoints and is kept in "
                  f"'{self.dir}'; `tunelab train --resume {self.dir}` continues it and then replaces '{self.out}'. "
                  f"'{self.out}' is as it was.", flush=True)
            return
        shutil.rmtree(self.dir, ignore_errors=True)


def claim(path: str | Path, overwrite: bool, kind: str = "run", cfg=None) -> Claim:
    """Check that a new run may be written at `path` (before any work is done) and lock the old folder there, if any,
    for the claim's life. Creates nothing."""
    out = expand(path)
    what = "run directory" if kind == "run" else f"{kind} folder"
    if out.is_symlink():
        raise TunelabError(f"output_dir '{path}' is a symbolic link (to '{os.readlink(out)}'); tunelab does not write "
                           f"or replace runs through a link, which could delete files elsewhere. Give the real folder.")
    if out.exists() and not out.is_dir():
        raise TunelabError(f"output_dir '{path}' exists and is a file, not a directory. Choose another output_dir=... .")
    if cfg is not None:
        check_not_an_input(out, cfg)
    replace = out.is_dir() and any(out.iterdir())
    if replace and not overwrite:
        listing = ", ".join(sorted(x.name for x in out.iterdir())[:6])
        raise TunelabError(f"Output directory '{path}' already exists and is not empty ({listing}). Choose a new "
                           f"output_dir=..., or pass --overwrite to replace that {what}.")
    if replace:
        check_replaceable(out, kind, what)
    c = Claim(out, kind, replace)
    if replace:
        c.fds.append(lock(out, "replace"))
    return c


def claim_resume(path: str | Path) -> Claim:
    """The lock on an unfinished run that is resumed."""
    out = expand(path)
    c = Claim(out, "run", replace=False, resume=True)
    c.fds.append(lock(out, "resume"))
    return c


# -- what every spine (single task, multi-task, RL) does with its run ------------------------------------------------

@dataclass
class Run:
    dir: Path
    summary: dict


def write_start(run_dir: Path, cfg: Config, data_report: dict | None = None) -> None:
    """The first files of a new run: its resolved config and the library versions it is made with (and, for a model
    by Hub id, the id and commit: model.revision in config.yaml already holds the commit, see resolve_paths; for data
    from Hub datasets, each split's repo, config, split and commit)."""
    atomic.write_text(run_dir / "config.yaml", config_mod.to_yaml(cfg), "the run's config")
    found = versions.current()
    if hub.is_hub_id(cfg.model.path):
        found["hub_model"] = {"id": cfg.model.path, "commit": cfg.model.revision}
    if data_report and data_hub.record(data_report):
        found["hub_datasets"] = data_hub.record(data_report)
    write_json(run_dir / "versions.json", found)


@contextmanager
def saving_artifact(out: Path):
    """`with saving_artifact(folder): save(...)`: the trained weights are on disk (fsynced) before summary.json says
    the run finished, and a failed write (a full disk) is one paragraph, not a traceback."""
    try:
        yield
        atomic.fsync_tree(out)
    except atomic.WRITE_ERRORS as e:
        raise atomic.write_error(e, out, "the trained weights") from None


def finish(claim: Claim, run_dir: Path, summary: dict, cfg: Config) -> Path:
    """summary.json marks the run finished (its artifact is on disk already), and the model card (README.md in each
    artifact folder) is written from it; only then are checkpoints dropped and, when the run replaces an old one,
    the new folder swapped in and the old one deleted, last. report.html is derived from the finished run, in its
    final place; then the trackers in train.log_to (MLflow, W&B) get the finished run's files and mark it
    finished."""
    write_json(run_dir / "summary.json", summary)
    write_card(run_dir, cfg, claim)
    drop_checkpoints(run_dir, cfg)
    run_dir = claim.finish()
    write_report(run_dir)
    logs.finish(run_dir, cfg)
    return run_dir


def drop_checkpoints(run_dir: Path, cfg: Config) -> None:
    """A finished run's checkpoints serve nothing (--resume takes only unfinished runs) unless asked to stay."""
    if not cfg.train.keep_finished_checkpoints:
        shutil.rmtree(run_dir / checkpoint.DIR, ignore_errors=True)


def resumable(run_dir: Path, anyway: bool | None = None):
    """The last good checkpoint of an unfinished run, or a clear error saying why it cannot be resumed. `anyway`:
    see check_resumable (None: tunelab.resume has compared the run with its checkpoint already). Checkpoints left
    half-written by the run that stopped are removed."""
    run_dir = Path(run_dir)
    check_resumable(run_dir, anyway)
    checkpoints = checkpoint.Checkpoints(run_dir, 1, record=False)
    checkpoints.clean()
    found = checkpoints.latest(say)
    if found is None:
        raise TunelabError(f"--resume {run_dir}: the run has no usable checkpoint in {run_dir / checkpoint.DIR} (it "
                           f"stopped before its first evaluation, or train.save_checkpoints was off). Start it again; "
                           f"train.checkpoint_every=N checkpoints every N steps.")
    return found


def check_resumable(run_dir: Path, anyway: bool | None = False) -> None:
    """Refuse a folder that is not an unfinished run, and a run whose config.yaml, data files or model changed since
    its newest checkpoint was written (fingerprint.py says what counts), unless `anyway` (--resume-anyway): then say
    what changed and go on. anyway=None: only the first check."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise TunelabError(f"--resume {run_dir}: not a tunelab run directory (no config.yaml). Give the output_dir "
                           f"of the run that stopped.")
    if finished(run_dir):
        raise TunelabError(f"--resume {run_dir}: that run finished (summary.json is there), so there is nothing to "
                           f"resume. To train further, start a new run with model.path={run_dir}.")
    if (run_dir / "summary.json").exists():
        say(f"note: {run_dir / 'summary.json'} is not a complete summary (cut short by a crash or a full disk while "
            f"it was written by a tunelab from before summaries were written atomically); the run is resumed from its "
            f"checkpoints and writes it again.")
    found = None if anyway is None else checkpoint.Checkpoints(run_dir, 1, record=False).changes()
    if found is None:  # not asked, or no checkpoint: resumable says so
        return
    path, changed = found
    if changed is None:
        say(f"note: checkpoint {path.name} was written before tunelab recorded what a run is made of, so changes to "
            f"config.yaml, the data files or the model since then cannot be detected; resuming as it is.")
    elif changed and not anyway:
        raise TunelabError(f"--resume {run_dir}: the run changed since its checkpoint {path.name} was written: "
                           f"{'; '.join(changed)}. Going on would continue steps trained one way with another, so "
                           f"it is not resumed. Put {run_dir / 'config.yaml'} (and the files) back as they were, "
                           f"start a new run with the new settings, or pass --resume-anyway to go on with them.")
    elif changed:
        say(f"--resume-anyway: going on from {path.name} although the run changed since: {'; '.join(changed)}")


def finished(run_dir: Path) -> bool:
    """summary.json, written last and atomically, says a run finished; one cut short says nothing."""
    try:
        return isinstance(json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


def begin(cfg: Config, overwrite: bool, recipe_name: str, resume: Path | None = None, kind: str = "run"):
    """(start time, output dir, device, the checkpoint to resume from or None, the claim on the output folder) of a
    run; fails before any work when the output dir or a logger is wrong, but creates nothing until the inputs are
    known good. Seeds everything. The claim holds the folder's lock: use it as `with claim:` around the run."""
    t_start = time.perf_counter()
    main = distributed.is_main()
    if resume is not None:
        out_path = str(expand(resume))
        held = claim_resume(out_path) if main else Claim(Path(out_path), kind, replace=False)
    else:
        out_path = distributed.broadcast(str(expand(cfg.output_dir or default_output_dir(recipe_name))))
        held = claim(out_path, overwrite, kind, cfg) if main else Claim(Path(out_path), kind, replace=False)
    with held.released_on_error():
        saved = resumable(Path(out_path)) if resume is not None else None
        if resume is not None:
            versions.check(Path(out_path), "resuming", say)
        logs.check(cfg.train.log_to)
        seed_everything(cfg.train.seed)
        return t_start, out_path, models.device_of(cfg.model), saved, held


def default_output_dir(recipe_name: str) -> str:
    return f"runs/{recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def resolve_paths(cfg: Config, run_dir: Path, source=None, data_report: dict | None = None) -> Config:
    """Make file paths absolute so the saved config works from any directory. `source`: the model section as
    predict.model_source resolved it; a Hub id keeps its id and gets the commit it resolved to as model.revision,
    so that --resume and tunelab.load use the same weights when the branch has moved on. `data_report`: the data
    report of a single-task run; Hub datasets read from one repo get the commit they were read at as
    data.dataset_revision, for the same reason."""
    cfg = cfg.model_copy(deep=True)
    cfg.output_dir = str(run_dir.resolve())
    if source is not None and hub.is_hub_id(cfg.model.path):
        cfg.model.revision = source.revision
    if data_report is not None and cfg.data is not None and data_hub.pinned(data_report):
        cfg.data.dataset_revision = data_hub.pinned(data_report)
    cfg.model.path = absolute(cfg.model.path)
    if getattr(cfg.method, "init_from", None):
        cfg.method.init_from = absolute(cfg.method.init_from)
    for data_cfg in [cfg.data] if cfg.data is not None else [t.data for t in cfg.tasks]:
        for key in ("train", "validation", "test"):
            if getattr(data_cfg, key):
                setattr(data_cfg, key, absolute(getattr(data_cfg, key)))
    if cfg.eval.forgetting not in (None, "auto", "none"):
        cfg.eval.forgetting = absolute(cfg.eval.forgetting)
    task = cfg.task
    if task is not None and getattr(task, "reward_model", None):
        task.reward_model = absolute(task.reward_model)
    if task is not None and getattr(task, "reward_function", None):
        task.reward_function = absolute_code(task.reward_function)
    if cfg.eval.judge:  # a reward run's directory, or a function
        cfg.eval.judge = absolute(cfg.eval.judge) if usercode.is_run(cfg.eval.judge) else absolute_code(cfg.eval.judge)
    return cfg


def absolute(path: str) -> str:
    """`path` made absolute ('~' expanded) when it names something that exists; anything else (a Hub id, a name of
    an in-memory dataset) as it is."""
    found = expand(path)
    return str(found.resolve()) if found.exists() else path


def absolute_code(spec: str) -> str:
    """'file.py:function' with the file's path absolute when it exists; 'module:function' (found by import) as it
    is."""
    file = usercode.source_file(spec)
    return f"{absolute(file)}:{spec.rpartition(':')[2]}" if file else spec


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss() / 2**20


def peak_rss() -> int:
    """This process's peak resident set in bytes. VmHWM, not ru_maxrss: a child's ru_maxrss starts at its
    parent's RSS at fork (Linux keeps it across exec), so a run started by a large parent (`tunelab compare`)
    would report the parent's peak."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):  # not Linux
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def write_card(run_dir: Path, cfg: Config, claim: Claim) -> None:
    """The model cards, part of the run like its weights: written before the swap, so a full disk fails the run and
    leaves an old one it replaces as it was. The snippets name the folder the run will be in (a resumed
    replacement: the one its marker says it replaces). A card that cannot be rendered is a warning, not a lost run."""
    final = Path((marker(run_dir) or {}).get("replaces") or run_dir) if claim.resume else \
        (claim.out if claim.replace and claim.aside is None else run_dir)
    try:
        card.write_run(run_dir, cfg, final)
    except TunelabError:
        raise
    except Exception as e:  # noqa: BLE001  (the run is saved; say what went wrong and go on)
        say(f"warning: the model card (README.md) could not be written ({type(e).__name__}: {e}).")


def write_report(run_dir: Path) -> None:
    """report.html is derived from the run's files; a failure there must not cost the finished run."""
    try:
        report.write_run(run_dir)
    except Exception as e:  # noqa: BLE001  (the run is saved; say what went wrong and go on)
        say(f"warning: report.html could not be written ({type(e).__name__}: {e}); "
            f"`tunelab report {run_dir}` tries again.")


def dir_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def write_json(path: Path, obj) -> None:
    atomic.write_json(path, obj, f"the run's {path.name}")


def say(msg: str) -> None:
    if distributed.is_main():
        print(msg, file=sys.stdout, flush=True)
