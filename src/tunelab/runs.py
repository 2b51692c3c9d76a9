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
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from . import atomic, versions
from .errors import TunelabError

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


def holder(path: Path) -> str:
    """The process holding the flock on `path`, read from /proc/locks (Linux); 'another process' elsewhere."""
    try:
        st = os.stat(path)
        wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks", encoding="ascii") as f:
            for line in f:
                fields = line.split()
                if "FLOCK" in fields and fields[5] == wanted:
                    pid = int(fields[4])
                    if pid == os.getpid():
                        return f"another run in this process (pid {pid})"
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                    return f"process {pid} ({cmd[:200]})" if cmd else f"process {pid}"
    except (OSError, ValueError, IndexError):
        pass
    return "another process"


# -- what a run reads must not be where it writes ----------------------------------------------------------------------

def inputs(cfg) -> list[tuple[str, str]]:
    """(config key, path) of every file or folder the run reads."""
    found = [("model.path", cfg.model.path)]
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
    if task is not None and getattr(task, "reward_function", None) and ".py:" in task.reward_function:
        found.append(("task.reward_function", task.reward_function.rsplit(":", 1)[0]))
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

    def __enter__(self) -> "Claim":
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
