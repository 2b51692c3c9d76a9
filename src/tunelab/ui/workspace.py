"""What the UI knows of runs, read from their folders each time (it keeps no database of its own): which folders
under the workspace are tunelab's (runs.whose: the marker, or a finished folder of an older tunelab), their
status, headline metric, progress and size; a run's full detail; the live tail of its metrics.jsonl; and the
confinement of every path the API is given to the workspace and the roots the user listed.

Status: `running` while a process holds the run's lock (runs.lock: every train, compare, cv and sweep holds it
for its whole life) or a process the UI started for it is alive; `finished` when its summary is there;
`interrupted` when it stopped with a checkpoint to resume from (or was stopped on purpose); `failed` otherwise.
"""

from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime
from pathlib import Path

import yaml

from .. import methods, runs, tasks
from ..training import checkpoint
from ..training.loop import LOWER_IS_BETTER

SKIP = {"node_modules", "__pycache__", "site-packages"}
MAX_DEPTH = 6  # how deep under the workspace run folders are looked for
SECTIONS = ("model", "data", "task", "method", "train", "eval", "output_dir", "tasks", "multitask")


class ApiError(Exception):
    """An error the API answers with: an HTTP status, one paragraph, and the request field it is about."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def field_of(message: str) -> str | None:
    """The first dotted config key a tunelab message quotes ('train.lr', 'data.train'), for the form to show the
    message beside; None when it names none."""
    for key in re.findall(r"'([A-Za-z_][\w.\[\]]*)'", message):
        if key.split(".")[0].split("[")[0] in SECTIONS:
            return key
    return None


# -- paths ---------------------------------------------------------------------------------------------------------

def confine(path: str | Path, workspace: Path, roots: list[Path] = (), what: str = "path") -> Path:
    """`path` (relative to the workspace, or absolute) resolved, symlinks and '..' included, when it lies inside
    the workspace or one of the roots; an ApiError 403 otherwise."""
    given = str(path)
    if "\0" in given:
        raise ApiError(400, f"{what} holds a NUL character; give a plain path.", what)
    found = (workspace / os.path.expanduser(given)).resolve()
    for allowed in [workspace, *roots]:
        if found == allowed or allowed in found.parents:
            return found
    listed = ", ".join(f"'{r}'" for r in [workspace, *roots])
    raise ApiError(403, f"{what} '{given}' is outside the folders this UI may use ({listed}); it resolves to "
                        f"'{found}'. Give a path inside the workspace, or start `tunelab ui` with --root FOLDER to let "
                        f"it read models and data from another folder.", what)


def run_id(path: Path, workspace: Path) -> str:
    """A folder's id: its path relative to the workspace, '/'-separated."""
    rel = Path(path).resolve().relative_to(workspace)
    return rel.as_posix() if rel.parts else "."


def run_dir(rid: str, workspace: Path, jobs) -> Path:
    """The folder of a run id: inside the workspace (403 outside), a tunelab folder or one the UI is starting (404
    otherwise)."""
    found = confine(rid, workspace, what="run id")
    if (found.is_dir() and runs.whose(found)) or jobs.record(found) is not None:
        return found
    raise ApiError(404, f"No run '{rid}' in the workspace '{workspace}': no tunelab run folder is there. GET /api/runs "
                        f"lists the runs.")


# -- finding and reading run folders -------------------------------------------------------------------------------

def find(workspace: Path) -> list[tuple[Path, str]]:
    """(folder, kind) of every tunelab folder under the workspace; the runs inside a compare, cv or sweep folder
    too. Hidden folders (a .venv, an --overwrite being built) are not looked into."""
    found = []

    def visit(folder: Path, depth: int) -> None:
        kind = runs.whose(folder) if ((folder / runs.MARKER).is_file() or (folder / "config.yaml").is_file()) else None
        if kind:
            found.append((folder, kind))
            if kind == "run":
                return
        if depth == MAX_DEPTH:
            return
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        for e in entries:
            if not e.name.startswith(".") and e.name not in SKIP and e.is_dir(follow_symlinks=False):
                visit(Path(e.path), depth + 1)

    visit(workspace, 0)
    return found


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_config(folder: Path) -> tuple[dict | None, str]:
    """(config.yaml as a dict, its text); (None, "") when it is not there (yet)."""
    try:
        text = (folder / "config.yaml").read_text(encoding="utf-8")
        found = yaml.safe_load(text)
    except (OSError, yaml.YAMLError):
        return None, ""
    return (found if isinstance(found, dict) else None), text


def lock_held(folder: Path) -> bool:
    return folder.is_dir() and runs.lock_holder(folder) is not None


def has_checkpoint(folder: Path) -> bool:
    found = folder / checkpoint.DIR
    return found.is_dir() and any(checkpoint.step_of(p) is not None and (p / checkpoint.MANIFEST).is_file()
                                  for p in found.iterdir())


def is_finished(folder: Path, kind: str) -> bool:
    if kind == "run":
        return runs.finished(folder)
    return all((folder / name).is_file() for name in runs.REQUIRED[kind])


def status(folder: Path, kind: str, jobs) -> str:
    if lock_held(folder) or jobs.alive(folder):
        return "running"
    if folder.is_dir() and is_finished(folder, kind):
        return "finished"
    if kind == "run" and (has_checkpoint(folder) or jobs.stopped(folder)):
        return "interrupted"
    return "failed"


def started(folder: Path, jobs) -> float | None:
    """When the run began (epoch seconds): its marker's time, else the UI's launch, else config.yaml's mtime."""
    mark = runs.marker(folder) or {}
    try:
        return datetime.strptime(mark["created"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except (KeyError, ValueError, TypeError):
        pass
    record = jobs.record(folder)
    if record:
        return record["started"]
    try:
        return (folder / "config.yaml").stat().st_mtime
    except OSError:
        return None


def headline(summary: dict | None) -> dict | None:
    """The run's selection metric, base -> tuned, on the test split when it has one, else validation."""
    if not isinstance(summary, dict) or not isinstance(summary.get("metric"), dict) or not summary["metric"]:
        return None
    name = next(iter(summary["metric"]))
    tuned = summary.get("test") if isinstance(summary.get("test"), dict) else summary.get("eval")
    split = "test" if tuned is summary.get("test") else "validation"
    base = (summary.get("base") or {}).get(split) or {}
    value = lambda m: m.get(name) if isinstance(m, dict) and isinstance(m.get(name), (int, float)) else None
    return {"name": name, "split": split, "base": value(base), "tuned": value(tuned),
            "greater_is_better": name not in LOWER_IS_BETTER}


def task_method_model(cfg: dict | None) -> tuple[str | None, str | None, str | None]:
    if not cfg:
        return None, None, None
    task = cfg.get("task") or {}
    kinds = [t.get("task", {}).get("type") for t in cfg.get("tasks") or [] if isinstance(t, dict)]
    name = task.get("type") if isinstance(task, dict) and task else ("+".join(k for k in kinds if k) or None)
    return name, (cfg.get("method") or {}).get("name"), (cfg.get("model") or {}).get("path")


def size_mb(folder: Path) -> float:
    total = 0
    for root, _, names in os.walk(folder):
        for n in names:
            try:
                total += os.lstat(os.path.join(root, n)).st_size
            except OSError:
                pass
    return round(total / 2**20, 3)


def row(folder: Path, kind: str, workspace: Path, jobs) -> dict:
    """The list fields of one folder."""
    cfg, _ = read_config(folder)
    task, method, model = task_method_model(cfg)
    summary = read_json(folder / "summary.json") if kind == "run" else None
    state = status(folder, kind, jobs)
    begun = started(folder, jobs)
    if summary and isinstance(summary.get("wall_seconds"), (int, float)):
        duration = round(summary["wall_seconds"], 1)
    elif state == "running" and begun is not None:
        duration = round(time.time() - begun, 1)
    else:
        duration = None
    progress = read_progress(folder, cfg, state == "running") if kind == "run" else {}
    return {"id": run_id(folder, workspace), "name": folder.name, "status": state, "kind": kind, "task": task,
            "method": method, "model": model, "metric": headline(summary),
            "started": datetime.fromtimestamp(begun).astimezone().isoformat(timespec="seconds") if begun else None,
            "duration_s": duration, "size_mb": size_mb(folder) if folder.is_dir() else 0.0,
            "step": progress.get("step"), "total_steps": progress.get("total")}


def list_runs(workspace: Path, jobs) -> list[dict]:
    """Every tunelab folder under the workspace, newest first, with the runs the UI has launched whose folder is
    not made yet (their process is still loading, or failed before it made one)."""
    found = find(workspace)
    seen = {f for f, _ in found}
    pending = [(p, "run") for p in jobs.launched() if p not in seen and not p.exists()]
    rows = [row(f, kind, workspace, jobs) for f, kind in found + pending]
    return sorted(rows, key=lambda r: r["started"] or "", reverse=True)


# -- progress and the live tail --------------------------------------------------------------------------------------

class Tail:
    """The new complete lines of a growing metrics.jsonl, read from a byte offset: each read takes only the bytes
    written since the last one. Remembers the last training record and the last `steps` record (the run's step
    count, and the step and time the loop started from), for progress.

    A log is not only appended to: a resumed run cuts it back to its checkpoint's size and writes on from there, and
    --overwrite starts a new one. Either may have grown past the offset again by the next read, so the size alone
    cannot tell; the last line read must still stand just before the offset. When it does not, the reader starts
    again from the top and `rewound` is set, for the caller to drop what it drew from the old lines."""

    def __init__(self, path: Path, offset: int = 0):
        self.path, self.offset = path, offset
        self.last_train: dict | None = None
        self.steps: dict | None = None
        self.last_line = b""  # the last complete line read, newline included (checked on the next read)
        self.rewound = False

    def read(self) -> list[tuple[int, str]]:
        """(byte offset after the line, the line) for each line completed since the last read."""
        try:
            with open(self.path, "rb") as f:
                if self.moved(f):
                    self.offset, self.last_line, self.rewound = 0, b"", True
                    self.last_train = self.steps = None
                if self.steps is None and self.offset > 0:  # started mid-file: the loop's start is further up
                    self.steps = last_steps(f, self.offset)
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        out = []
        start = 0
        while (end := data.find(b"\n", start)) != -1:
            line = data[start:end].decode("utf-8", errors="replace").strip()
            if line:
                out.append((self.offset + end + 1, line))
                self.see(line)
                self.last_line = data[start:end + 1]
            start = end + 1
        self.offset += start
        return out

    def moved(self, f) -> bool:
        """Whether the file under the offset is no longer the one read so far (cut back, or new)."""
        size = os.fstat(f.fileno()).st_size
        if size < self.offset:
            return True
        if not self.last_line:
            return False
        f.seek(self.offset - len(self.last_line))
        return f.read(len(self.last_line)) != self.last_line

    def see(self, line: str) -> None:
        if '"train"' not in line and '"steps"' not in line:
            return
        try:
            record = json.loads(line)
        except ValueError:
            return
        if record.get("type") == "train":
            self.last_train = record
        elif record.get("type") == "steps":
            self.steps = record


def last_steps(f, end: int, block: int = 65536) -> dict | None:
    """The last `steps` record before byte `end` of the open metrics.jsonl `f`, read backwards a block at a time
    (one a (re)start of the loop: near the start of a run's log, or where it was resumed)."""
    mark = b'{"type": "steps"'
    pos = end
    while pos > 0:
        start = max(0, pos - block)
        f.seek(start)
        data = f.read(end - start)  # to `end`: a record that begins in this block ends after it
        found = data.rfind(mark, 0, pos - start)
        while found != -1:
            line = data[found:data.find(b"\n", found)] if b"\n" in data[found:] else b""
            try:
                return json.loads(line)
            except ValueError:
                found = data.rfind(mark, 0, found)
        pos = start
    return None


def estimate(last: dict | None, steps: dict | None, cfg: dict | None, running: bool) -> dict:
    """{step, total, elapsed_s, eta_s}: the step of the last training record out of the run's step count (the
    loop logs it; for a run of an older tunelab, train.max_steps or the epochs done so far), and while it runs,
    the time since the loop (re)started and the rest at that pace (evaluations included)."""
    steps = steps or {}
    total = steps.get("total") if isinstance(steps.get("total"), int) else None
    if not last:
        return {"step": None, "total": total, "elapsed_s": None, "eta_s": None}
    step = int(last.get("step") or 0)
    train = (cfg or {}).get("train") or {}
    total = total or train.get("max_steps")
    if not total and last.get("epoch") and train.get("epochs"):
        total = max(step, round(step / last["epoch"] * train["epochs"]))
    elapsed = eta = None
    if running and isinstance(steps.get("time"), (int, float)):
        elapsed = max(0.0, time.time() - steps["time"])
        done = step - int(steps.get("from_step") or 0)
        eta = elapsed / done * (total - step) if done > 0 and total else None
    elif total and step >= total:
        eta = 0.0
    return {"step": step, "total": total, "elapsed_s": round(elapsed, 1) if elapsed is not None else None,
            "eta_s": round(eta, 1) if eta is not None else None}


def read_progress(folder: Path, cfg: dict | None, running: bool) -> dict:
    """Progress of a run from its metrics.jsonl: the last train record from its end (the last 64 KiB), the last
    `steps` record searched backwards from there; never the whole file read as records."""
    path = folder / "metrics.jsonl"
    try:
        size = path.stat().st_size
    except OSError:
        return estimate(None, None, cfg, running)
    tail = Tail(path, max(0, size - 65536))
    tail.read()
    return estimate(tail.last_train, tail.steps, cfg, running)


def live_status(folder: Path, jobs, tail: Tail) -> dict:
    """What the event stream says of a run: its status and progress, from what the tail has read."""
    cfg, _ = read_config(folder)
    state = status(folder, (runs.whose(folder) if folder.is_dir() else None) or "run", jobs)
    found = estimate(tail.last_train, tail.steps, cfg, state == "running")
    return {"status": state, "step": found["step"], "total": found["total"], "eta_s": found["eta_s"]}


# -- one run in full -------------------------------------------------------------------------------------------------

def exports(cfg: dict | None, finished: bool, folder: Path) -> list[str]:
    """The formats `tunelab export` takes for this run ('merged': --format peft --merge, a plain transformers
    model)."""
    task, method, _ = task_method_model(cfg)
    if not finished or not method or (cfg or {}).get("tasks"):
        return []
    try:
        m = methods.get(method)
        t = tasks.get(task)
    except Exception:  # noqa: BLE001 - a run of a method or task this tunelab does not know: nothing to offer
        return []
    found = []
    if m.ARTIFACT == "adapter":
        found += (["peft"] if (folder / "adapter" / "adapter_config.json").is_file() else []) + ["tunelab"]
    if m.MERGEABLE:
        found.append("merged")
    if t.EMBEDS:
        found.append("sentence-transformers")
    if t.GENERATES:
        found.append("gguf")
    return found


def playground(cfg: dict | None, finished: bool) -> str | None:
    task, _, _ = task_method_model(cfg)
    if not finished or not task or (cfg or {}).get("tasks"):
        return None
    try:
        t = tasks.get(task)
    except Exception:  # noqa: BLE001 - see exports
        return None
    return "chat" if t.GENERATES else "embed" if t.EMBEDS else "predict"


def detail(folder: Path, workspace: Path, jobs) -> dict:
    kind = runs.whose(folder) if folder.is_dir() else "run"
    kind = kind or "run"
    cfg, text = read_config(folder)
    found = row(folder, kind, workspace, jobs)
    progress = read_progress(folder, cfg, found["status"] == "running") if kind == "run" else \
        estimate(None, None, cfg, False)
    summary = read_json(folder / "summary.json") if kind == "run" else \
        read_json(folder / f"{'compare' if kind == 'compare' else kind + '_summary'}.json")
    s = summary if isinstance(summary, dict) and kind == "run" else {}
    finished = found["status"] == "finished"
    tuned = {"validation": s["eval"]} if isinstance(s.get("eval"), dict) else {}
    if isinstance(s.get("test"), dict):
        tuned["test"] = s["test"]
    return {**found, "config": cfg, "recipe_yaml": text, "summary": summary,
            "data_report": read_json(folder / "data_report.json"),
            "results": {"base": s.get("base"), "probe": s.get("linear_probe"), "tuned": tuned or None},
            "forgetting": s.get("forgetting"), "samples": read_json(folder / "samples.json"), "progress": progress,
            "has_report": (folder / "report.html").is_file(),
            "resumable": kind == "run" and found["status"] == "interrupted" and has_checkpoint(folder),
            "exports": exports(cfg, finished and kind == "run", folder),
            "playground": playground(cfg, finished) if kind == "run" else None,
            "log_tail": jobs.log_tail(folder)}


# -- the file picker ---------------------------------------------------------------------------------------------------

def listing(folder: Path, workspace: Path) -> dict:
    if not folder.is_dir():
        raise ApiError(404, f"dir '{folder}' is not a folder; give a folder inside the workspace.", "dir")
    entries = []
    for e in sorted(os.scandir(folder), key=lambda e: (not e.is_dir(), e.name)):
        if e.name.startswith("."):
            continue
        try:
            is_dir = e.is_dir()
            size = None if is_dir else e.stat().st_size
        except OSError:  # a broken link
            continue
        entries.append({"name": e.name, "path": display(Path(e.path), workspace), "is_dir": is_dir, "size": size})
    return {"dir": display(folder, workspace), "entries": entries}


def display(path: Path, workspace: Path) -> str:
    """A path as the API gives it back: relative to the workspace inside it, absolute elsewhere (a root)."""
    try:
        return path.relative_to(workspace).as_posix() or "."
    except ValueError:
        return str(path)
