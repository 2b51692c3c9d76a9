"""The `tunelab` processes the UI starts: train (from a recipe the form wrote), resume, compare, and export.

Each one is `python -m tunelab ...` run in the workspace in a session of its own (start_new_session), so it
outlives the UI: stopping or restarting `tunelab ui` leaves its runs training. What the UI must remember of them
is on disk, in the workspace's `.tunelab-ui/` folder: `jobs/<key>.json` (per output folder: the command, pid and
its start time, the log file, when a stop was asked), `logs/` (each process's stdout and stderr) and `recipes/`
(the recipe YAML each launched run was started from: the recipe stays the source of truth, and config.yaml in the
run is that recipe resolved). Stop is SIGTERM to the process group: the training loop finishes its step, saves a
checkpoint and exits as interrupted (training/stop.py); resume is `tunelab train --resume RUN`.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from .. import atomic, config, runs
from ..errors import TunelabError
from . import workspace as ws
from .workspace import ApiError

FOLDER = ".tunelab-ui"
LOG_TAIL = 60  # lines of a process's log shown with its run


def proc_start(pid: int) -> str | None:
    """The kernel's start time of process `pid` (field 22 of /proc/PID/stat), to tell it from a later process
    that got the same pid; None where /proc does not say, or when it is a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name in parentheses may hold spaces
    return None if fields[0] == "Z" else fields[19]


def pid_alive(pid: int, start: str | None) -> bool:
    if Path("/proc").is_dir():
        return start is not None and proc_start(pid) == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def last_error(text: str) -> str:
    """The one-paragraph error a tunelab command printed ('error: ...'), or the end of its output."""
    lines = [x for x in text.strip().splitlines() if x.strip()]
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: "):]
    return " ".join(lines[-3:])[-1000:] or "it printed nothing"


class Jobs:
    """The processes the UI started in `workspace`, remembered on disk."""

    def __init__(self, workspace: Path, trust_remote_code: bool = False, allow_pickle: bool = False):
        self.workspace = Path(workspace).resolve()
        self.root = self.workspace / FOLDER
        self.switches = [flag for flag, on in (("--trust-remote-code", trust_remote_code),
                                               ("--allow-pickle", allow_pickle)) if on]
        self.children: dict[int, subprocess.Popen] = {}  # started by this UI: polled, so they are reaped

    # -- records ---------------------------------------------------------------------------------------------------

    def record_path(self, out: Path) -> Path:
        key = hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:16]
        return self.root / "jobs" / f"{key}.json"

    def record(self, out: Path) -> dict | None:
        found = ws.read_json(self.record_path(out))
        return found if isinstance(found, dict) and "pid" in found else None

    def write_record(self, out: Path, record: dict) -> None:
        self.record_path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(self.record_path(out), record, "the UI's record of a process it started")

    def launched(self) -> list[Path]:
        """The output folders of every process the UI has started here."""
        folder = self.root / "jobs"
        found = [ws.read_json(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
        return [Path(r["out"]) for r in found if isinstance(r, dict) and "out" in r]

    def alive(self, out: Path) -> bool:
        r = self.record(out)
        if r is None:
            return False
        child = self.children.get(r["pid"])
        if child is not None:
            if child.poll() is None:
                return True
            del self.children[r["pid"]]
            self.write_record(out, {**r, "returncode": child.returncode, "ended": time.time()})
            return False
        return pid_alive(r["pid"], r.get("pid_start"))

    def stopped(self, out: Path) -> bool:
        """A stop was asked of its last process, or it exited as interrupted (Ctrl-C, SIGTERM)."""
        r = self.record(out) or {}
        return bool(r.get("stop_asked")) or r.get("returncode") == 130

    def log_tail(self, out: Path) -> str | None:
        r = self.record(out)
        if r is None:
            return None
        try:
            with open(r["log"], "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 32768))
                text = f.read().decode("utf-8", errors="replace")
        except OSError:
            return None
        text = re.sub(r"[^\n]*\r", "", text)  # a progress bar redrawn in place: its last state only
        return "\n".join(text.splitlines()[-LOG_TAIL:])

    # -- starting, stopping -----------------------------------------------------------------------------------------

    def start(self, args: list[str], out: Path, what: str, **extra) -> dict:
        """Start `python -m tunelab ARGS` in the workspace, detached, its output to a log; remembered for `out`."""
        if self.alive(out):
            raise ApiError(409, f"'{ws.run_id(out, self.workspace)}' has a process running already (pid "
                                f"{self.record(out)['pid']}); stop it first, or wait for it to end.")
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{out.name}-{what}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        command = [sys.executable, "-m", "tunelab", *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log, "ab") as f:
            f.write(f"$ tunelab {' '.join(args)}\n".encode())
            f.flush()
            child = subprocess.Popen(command, cwd=self.workspace, stdin=subprocess.DEVNULL, stdout=f,
                                     stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self.children[child.pid] = child
        record = {"out": str(out), "what": what, "args": args, "pid": child.pid, "pid_start": proc_start(child.pid),
                  "log": str(log), "started": time.time(), **extra}
        self.write_record(out, record)
        return record

    def launch(self, args: list[str], out: Path, what: str, **extra) -> Path:
        """Start a `tunelab` command that writes the folder `out` (in the workspace); for other modules' launches
        (e.g. `compare`), with the trust switches added where the command takes them."""
        out = ws.confine(out, self.workspace, what="output_dir")
        self.start([*args, *self.switches] if args[0] in ("train", "export") else args, out, what, **extra)
        return out

    def launch_train(self, text: str, output_dir: str | None) -> Path:
        """Check the recipe as `tunelab train` would, write it under .tunelab-ui/recipes/, and start the run; its
        output folder (in the workspace) is returned."""
        if output_dir:  # a path outside is refused whatever the recipe says
            ws.confine(output_dir, self.workspace, what="output_dir")
        recipe = self.write_recipe(text, "new-run")
        try:
            cfg = config.load(recipe)
            out = output_dir or cfg.output_dir or (
                f"runs/{cfg.task.type if cfg.task else 'multitask'}-{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}")
            out_dir = ws.confine(out, self.workspace, what="output_dir")
            try:
                runs.claim(out_dir, False, "run", cfg)  # refuses as the CLI would; holds nothing when the folder is new
            except TunelabError as e:
                raise ApiError(400, str(e), "output_dir") from None
            if self.alive(out_dir):
                raise ApiError(409, f"output_dir '{out}' is being written by a run the UI started (pid "
                                    f"{self.record(out_dir)['pid']}); choose another output_dir.", "output_dir")
        except TunelabError as e:
            recipe.unlink(missing_ok=True)
            message = str(e).replace(f"'{recipe}'", "the recipe").replace(str(recipe), "the recipe")
            raise ApiError(400, message, ws.field_of(message)) from None
        except BaseException:
            recipe.unlink(missing_ok=True)
            raise
        named = self.write_recipe(text, out_dir.name)
        recipe.unlink(missing_ok=True)
        return self.launch(["train", str(named), f"output_dir={out_dir}"], out_dir, "train", recipe=str(named))

    def write_recipe(self, text: str, name: str) -> Path:
        folder = self.root / "recipes"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.yaml"
        if path.exists():  # another run's recipe: kept, this one gets the time in its name
            path = folder / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid() % 1000}.yaml"
        atomic.write_text(path, text, "the run's recipe")
        return path

    def stop(self, out: Path) -> None:
        """SIGTERM to the run's process group (the UI started it) or to the process holding its lock (started from
        a shell); the loop then saves a checkpoint and the run ends interrupted."""
        rid = ws.run_id(out, self.workspace)
        r = self.record(out)
        try:
            if r is not None and self.alive(out):
                self.write_record(out, {**r, "stop_asked": time.time()})
                os.killpg(r["pid"], signal.SIGTERM)
                return
            pid = runs.lock_holder(out) if out.is_dir() else None
            if pid is not None:
                os.kill(pid, signal.SIGTERM)
                return
        except ProcessLookupError:
            pass  # it ended meanwhile
        except PermissionError:
            raise ApiError(403, f"Run '{rid}' runs as another user, whose process this UI may not stop; stop it "
                                f"where it was started.") from None
        else:
            raise ApiError(409, f"Run '{rid}' is not running, so there is nothing to stop.")

    def resume(self, out: Path) -> None:
        rid = ws.run_id(out, self.workspace)
        if ws.lock_held(out) or self.alive(out):
            raise ApiError(409, f"Run '{rid}' is running; stop it before resuming.")
        if runs.finished(out):
            raise ApiError(409, f"Run '{rid}' finished, so there is nothing to resume; start a new run with "
                                f"model.path={rid} to train it further.")
        if not ws.has_checkpoint(out):
            raise ApiError(409, f"Run '{rid}' has no checkpoint to resume from (it stopped before its first step, or "
                                f"train.save_checkpoints was off); start it again.")
        self.launch(["train", "--resume", str(out)], out, "resume")

    def export(self, out: Path, fmt: str, quant: str | None) -> Path:
        """`tunelab export` into workspace/exports/<run>-<format>, waited for; a tunelab error is a 400."""
        rid = ws.run_id(out, self.workspace)
        if not runs.finished(out):
            raise ApiError(409, f"Run '{rid}' has not finished; only a finished run can be exported.")
        cfg, _ = ws.read_config(out)
        offered = ws.exports(cfg, True, out)
        if fmt not in offered:
            raise ApiError(400, f"format '{fmt}' is not one this run exports to; choose one of: "
                                f"{', '.join(offered) or 'none'}.", "format")
        if quant is not None and fmt != "gguf":
            raise ApiError(400, f"quant goes with format 'gguf' only (got format '{fmt}'); leave it out.", "quant")
        dest = self.workspace / "exports" / f"{out.name}-{fmt}{'-' + quant if quant else ''}"
        args = ["export", str(out), str(dest), "--overwrite",
                *(["--format", "peft", "--merge"] if fmt == "merged" else ["--format", fmt]),
                *(["--quant", quant] if quant else []), *self.switches]
        dest.parent.mkdir(exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "tunelab", *args], cwd=self.workspace, capture_output=True,
                              text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise ApiError(400, f"`tunelab export` failed: {last_error(done.stderr or done.stdout)}", "format")
        return dest
