"""The web UI's planning routes: what the new-run form is built from and checked with, and the comparison page.

- GET /api/schema: every config key (`tunelab config explain`'s entries: dotted key, type, default, choices,
  description, and for a key of one task type or method, which);
- GET /api/recipes, /api/recipes/{name}: the recipes shipped in tunelab's configs/ (in a source checkout) and the
  workspace's own (*.yaml at its top, and under configs/ and recipes/);
- POST /api/validate: a recipe's YAML checked as `tunelab train` checks it, each error with the dotted key it is
  about, and the files it reads (there, and inside the folders the UI may read: `check`, `checked`);
- POST /api/advise: `tunelab advise` for the recipe's model, task, length and batch on this machine, and the time
  per method where a finished run of the model and task in the workspace measured a step;
- POST /api/compare: finished runs (or a `tunelab compare` folder) side by side, from their summary.json, with the
  points of the plots metric vs trainable %, peak memory, time, latency and forgetting;
- POST /api/compare/launch: `tunelab compare` on a recipe, as a subprocess of the UI's jobs.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import time
import typing
from pathlib import Path

import yaml
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import to_jsonable_python

from .. import advise as advise_mod
from .. import compare as compare_mod
from .. import config as config_mod
from .. import hub, runs
from ..config.explainer import keys as config_keys
from ..config.validation import error_messages, paragraph
from ..errors import TunelabError
from ..training.loop import LOWER_IS_BETTER
from . import workspace as ws
from .workspace import ApiError, field_of

router = APIRouter()

# A source checkout keeps the shipped recipes beside the package: <repo>/configs next to <repo>/src/tunelab.
PACKAGE = Path(__file__).resolve().parents[1]
SHIPPED = PACKAGE.parents[1] / "configs"
SHIPPED_PREFIX = "shipped/"  # a shipped recipe's name: shipped/<path under configs/>
WORKSPACE_RECIPE_DIRS = ("configs", "recipes")  # searched recursively; the workspace's top only for *.yaml
RECIPE_FILE = "recipe.yaml"  # what messages call the recipe being checked
SECTION_ORDER = ("model", "data", "task", "method", "train", "eval", "multitask", "tasks", "output_dir")


class Body(BaseModel):
    """A request body: an unknown field is an error (the app answers it with the field's name)."""

    model_config = ConfigDict(strict=True, extra="forbid")


class RecipeBody(Body):
    yaml: str


class CompareBody(Body):
    ids: list[str]


class CompareLaunch(Body):
    yaml: str
    methods: list[str]
    steps: int | None = None
    output_dir: str | None = None


def ui_of(request: Request):
    return request.app.state.ui


# -- the schema ------------------------------------------------------------------------------------------------------

def type_name(ann) -> str:
    """A field's annotation as a form reads it: 'int', 'float | null', "'epoch' | int", 'list', ..."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if ann is type(None):
        return "null"
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (list, tuple, set):
        return "list"
    if origin is dict:
        return "dict"
    if args:  # a union (X | Y, Optional[X], Annotated[...] holds its type first)
        parts = [type_name(a) for a in args if not isinstance(a, str)]
        return " | ".join(dict.fromkeys(p for p in parts if p))
    return getattr(ann, "__name__", str(ann))


def choices(ann) -> list | None:
    """The values a field takes when it is a choice among words (a Literal, maybe optional, or a list of them)."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Literal:
        return list(args)
    if origin in (list, tuple, set) and args:
        return choices(args[0])
    rest = [a for a in args if a is not type(None)]
    if origin is not None and len(rest) == 1 and len(rest) < len(args):
        return choices(rest[0])
    return None


def schema() -> dict:
    """{"sections": [{"name", "fields": [...]}]}: every key of a recipe, a key that several task types or methods
    share listed once with the values of task.type / method.name it applies to (`applies_to`)."""
    fields: dict[str, dict] = {}
    described: dict[str, dict[str, str]] = {}  # task.type / method.name: each value's own description
    for k in config_keys():
        if k.choice:
            described.setdefault(k.key, {})[k.when[1]] = k.description
            continue
        default = None if k.field is None or k.field.is_required() else \
            to_jsonable_python(k.field.get_default(call_default_factory=True), fallback=str)
        if k.key in fields:
            f = fields[k.key]
            if k.when:
                f["applies_to"]["values"].append(k.when[1])
                # a key some members describe or default otherwise (method.target_modules for IA3, method.init for
                # prompt tuning): their own, by member
                if k.description != f["description"]:
                    f.setdefault("descriptions", {})[k.when[1]] = k.description
                if default != f["default"]:
                    f.setdefault("defaults", {})[k.when[1]] = default
            continue
        f = k.field
        fields[k.key] = {"key": k.key, "type": type_name(f.annotation) if f else "list",
                         "default": default, "required": bool(f and f.is_required()),
                         "choices": choices(f.annotation) if f else None, "description": k.description,
                         "applies_to": {"key": k.when[0], "values": [k.when[1]]} if k.when else None}
    method = config_mod.Config.model_fields["method"].get_default(call_default_factory=True).name
    for key, values in described.items():  # the choosing keys: every value, each with what it means
        f = fields.setdefault(key, {"key": key, "type": "str", "default": method, "required": False, "choices": None,
                                    "description": "Which fine-tuning method trains the model.", "applies_to": None})
        f["choices"] = list(values)
        f["choice_descriptions"] = values
    sections: dict[str, list[dict]] = {}
    for key, f in fields.items():
        sections.setdefault(key.split(".")[0].removesuffix("[]"), []).append(f)
    order = sorted(sections, key=lambda s: SECTION_ORDER.index(s) if s in SECTION_ORDER else len(SECTION_ORDER))
    return {"sections": [{"name": s, "fields": sections[s]} for s in order]}


@router.get("/api/schema")
def get_schema():
    return schema()


# -- recipes ---------------------------------------------------------------------------------------------------------

def shipped_dir() -> Path | None:
    """tunelab's configs/ folder in a source checkout (an installed wheel has none)."""
    return SHIPPED if SHIPPED.is_dir() and (SHIPPED.parent / "src" / "tunelab") == PACKAGE else None


def recipe_files(workspace: Path) -> dict[str, Path]:
    """name -> file of every recipe the UI offers: the workspace's (its path there) and the shipped ones
    ('shipped/<path under configs/>'), the workspace's first."""
    found: dict[str, Path] = {}
    candidates = sorted(workspace.glob("*.yaml"))
    for sub in WORKSPACE_RECIPE_DIRS:
        if (workspace / sub).is_dir():
            candidates += sorted((workspace / sub).rglob("*.yaml"))
    for path in candidates:
        # a link out of the workspace is not followed: the UI reads only the workspace and the --root folders
        if path.is_file() and path.resolve().is_relative_to(workspace):
            found[path.relative_to(workspace).as_posix()] = path
    shipped = shipped_dir()
    if shipped is not None:
        for path in sorted(shipped.rglob("*.yaml")):
            found.setdefault(SHIPPED_PREFIX + path.relative_to(shipped).as_posix(), path)
    return found


def summary_of(name: str, path: Path, workspace: Path) -> dict | None:
    """A recipe's entry in the list (its task, method and model as written), or None for a YAML file that is no
    recipe (no model section)."""
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(tree, dict) or not isinstance(tree.get("model"), dict):
        return None
    task, method = tree.get("task"), tree.get("method")
    if isinstance(tree.get("tasks"), list):
        task = {"type": "multitask"}
    shown = path.relative_to(workspace).as_posix() if path.is_relative_to(workspace) else str(path)
    return {"name": name, "path": shown, "source": "shipped" if name.startswith(SHIPPED_PREFIX) else "workspace",
            "task": task.get("type", "classification") if isinstance(task, dict) else "classification",
            "method": method.get("name", "full") if isinstance(method, dict) else "full",
            "model": tree["model"].get("path")}


@router.get("/api/recipes")
def list_recipes(request: Request):
    workspace = ui_of(request).workspace
    entries = (summary_of(n, p, workspace) for n, p in recipe_files(workspace).items())
    return {"recipes": [e for e in entries if e is not None]}


@router.get("/api/recipes/{name:path}")
def get_recipe(name: str, request: Request):
    ui = ui_of(request)
    path = recipe_files(ui.workspace).get(name)
    if path is None:
        raise ApiError(404, f"No recipe '{name}': GET /api/recipes lists the recipes (the workspace's *.yaml and those "
                            f"under its configs/ and recipes/ folders, and tunelab's shipped ones).", "name")
    text = path.read_text(encoding="utf-8")
    cfg, errors = check(ui, text)
    return {"name": name, "yaml": text, "config": cfg.model_dump(mode="json") if cfg else None, "errors": errors}


# -- validation ------------------------------------------------------------------------------------------------------

def check(ui, text: str):
    """(config, []) for a recipe that `tunelab train` would accept in the UI's workspace, else (None, [{"field",
    "message"}]): the CLI's message per key at fault (the file called recipe.yaml), or a file it names that is
    missing or outside the folders the UI may read (`path_problems`)."""
    cfg, errors = parse(ui.workspace, text)
    if cfg is None:
        return None, errors
    problems = path_problems(ui, cfg)
    return (None if problems else cfg), [{"field": p.field, "message": p.message} for p in problems]


def parse(workspace: Path, text: str):
    """`check` of the recipe's keys alone. The text is read from a file in the workspace's .tunelab-ui/ folder, as
    `config.load` reads a recipe."""
    folder = workspace / ".tunelab-ui"
    folder.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix="check-") as tmp:
        path = Path(tmp) / RECIPE_FILE
        path.write_text(text, encoding="utf-8")
        try:
            return config_mod.load(path), []
        except TunelabError as e:
            message = str(e).replace(str(path), RECIPE_FILE)
    return None, field_errors(text, message)


def field_errors(text: str, message: str) -> list[dict]:
    """Each key's own message where the schema refused the recipe (the key from the error's location); else the one
    message, with the first key it names (a rule between sections, a YAML syntax error)."""
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError:
        tree = None
    if isinstance(tree, dict):
        try:
            config_mod.Config.model_validate(tree)
        except ValidationError as e:
            found = dict.fromkeys(error_messages(e, tree))
            return [{"field": key, "message": paragraph([msg], RECIPE_FILE)} for key, msg in found]
        except RecursionError:
            pass
    return [{"field": key_named(message), "message": message}]


def key_named(message: str) -> str | None:
    """The first config key a message names, quoted or not ('data.packing=true applies to ...')."""
    known = {k.key for k in config_keys()}
    for word in re.findall(r"[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)+", message):
        if word in known:
            return word
    return field_of(message)


def checked(ui, text: str):
    """The recipe's config, or its first error as the API's error: 400, 403 for a path outside the folders the UI
    may read (the others are for POST /api/validate)."""
    cfg, errors = parse(ui.workspace, text)
    if cfg is None:
        raise ApiError(400, errors[0]["message"], errors[0]["field"])
    problems = path_problems(ui, cfg)
    if problems:
        raise problems[0]
    return cfg


def read_paths(cfg) -> list[tuple[str, str]]:
    """(dotted key, path) of every local file or folder the recipe reads: the model (unless a Hub id), an adapter to
    start from, the data files (not hf:// datasets), a reward model or judge run, a forgetting probe file, and the
    .py file of a reward or judge function; and the output_dir it writes."""
    out = [("model.path", cfg.model.path)]
    if getattr(cfg.method, "init_from", None):
        out.append(("method.init_from", cfg.method.init_from))
    parts = [("", cfg.data, cfg.task)] if cfg.tasks is None else \
        [(f"tasks.{i}.", t.data, t.task) for i, t in enumerate(cfg.tasks)]
    for prefix, data, task in parts:
        out += [(f"{prefix}data.{name}", getattr(data, name)) for name in ("train", "validation", "test")
                if getattr(data, name) and "://" not in getattr(data, name)]
        if getattr(task, "reward_model", None):
            out.append((f"{prefix}task.reward_model", task.reward_model))
        if getattr(task, "reward_function", None) and task.reward_function.rpartition(":")[0].endswith(".py"):
            out.append((f"{prefix}task.reward_function", task.reward_function.rpartition(":")[0]))
    if cfg.eval.forgetting not in (None, "auto", "none"):
        out.append(("eval.forgetting", cfg.eval.forgetting))
    judge = cfg.eval.judge or ""
    if judge.rpartition(":")[0].endswith(".py"):
        out.append(("eval.judge", judge.rpartition(":")[0]))
    elif judge and ":" not in judge:
        out.append(("eval.judge", judge))
    if cfg.output_dir:  # written, not read: confined, and new folders are welcome
        out.append(("output_dir", cfg.output_dir))
    return out


def path_problems(ui, cfg) -> list[ApiError]:
    """A 403 for each path the recipe names outside the workspace and the --root folders, a 400 for each it reads that
    does not exist (training would stop there); a model.path that names no local folder is a Hub id."""
    problems = []
    for key, value in read_paths(cfg):
        if key.endswith("model.path") and not (ui.workspace / Path(value).expanduser()).exists() and \
                hub.is_hub_id(value):
            continue
        try:
            found = ui.confine(value, key)
        except ApiError as e:
            problems.append(e)
            continue
        if not found.exists() and key != "output_dir":
            problems.append(ApiError(400, f"{key} '{value}' does not exist (looked for '{found}'); give a "
                                          f"{'folder' if key.endswith(('path', 'init_from', 'reward_model')) else 'file'} "
                                          f"in the workspace or a --root folder, relative to the workspace or "
                                          f"absolute.", key))
    return problems


@router.post("/api/validate")
def validate(req: RecipeBody, request: Request):
    ui = ui_of(request)
    cfg, errors = parse(ui.workspace, req.yaml)
    problems = path_problems(ui, cfg) if cfg is not None else []
    if cfg is None or problems:  # the config too where only its paths are wrong, for the form to show
        return {"ok": False, "errors": errors or [{"field": p.field, "message": p.message} for p in problems],
                "config": cfg.model_dump(mode="json") if cfg is not None else None}
    return {"ok": True, "config": cfg.model_dump(mode="json")}


# -- advise ----------------------------------------------------------------------------------------------------------

def model_dir(ui, cfg) -> str:
    """model.path as advise reads it: a Hub id as it is, a folder resolved against the workspace and confined."""
    if not (ui.workspace / Path(cfg.model.path).expanduser()).exists() and hub.is_hub_id(cfg.model.path):
        return cfg.model.path  # a local folder of that name would win
    return str(ui.confine(cfg.model.path, "model.path"))


def step_times(workspace: Path, model: str, task: str) -> dict[str, dict]:
    """method -> the latest finished run in the workspace of this model and task: its id, seconds per optimizer
    step, and the tokens a step's batches held at most (batch_size x grad_accum x data.max_length)."""
    found: dict[str, tuple[float, dict]] = {}
    for folder, kind in ws.find(workspace):
        summary, (cfg, _) = ws.read_json(folder / "summary.json"), ws.read_config(folder)
        if kind != "run" or not isinstance(summary, dict) or not cfg or summary.get("model") != model or \
                summary.get("task") != task or not summary.get("steps") or not summary.get("train_seconds"):
            continue
        train, data = cfg.get("train") or {}, cfg.get("data") or {}
        tokens = train.get("batch_size", 16) * train.get("grad_accum", 1) * data.get("max_length", 128)
        when = (folder / "summary.json").stat().st_mtime
        if summary["method"] not in found or found[summary["method"]][0] < when:
            found[summary["method"]] = (when, {"id": ws.run_id(folder, workspace), "tokens": tokens,
                                               "step_s": summary["train_seconds"] / summary["steps"]})
    return {method: entry for method, (_, entry) in found.items()}


def count_rows(path: Path) -> int | None:
    """Rows of a local .jsonl / .csv / .tsv / .parquet file, counted without parsing them; None for anything else."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq  # a dependency of datasets, which tunelab reads parquet with

            return pq.ParquetFile(path).metadata.num_rows
        if path.suffix not in (".jsonl", ".csv", ".tsv") or not path.is_file():
            return None
        with path.open("rb") as f:
            lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        return lines - (path.suffix != ".jsonl")  # a header line
    except (OSError, ValueError):
        return None


def planned_steps(ui, cfg, data) -> int | None:
    """About how many optimizer steps the recipe trains: train.max_steps, or its epochs over the training rows (a
    local file's, less the validation share held out of them)."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    if "://" in data.train:  # a Hub dataset (hf://org/name)
        return None
    rows = count_rows(ui.confine(data.train, "data.train"))
    if not rows:
        return None
    if data.validation is None:
        rows -= int(rows * data.val_fraction)
    return max(1, math.ceil(cfg.train.epochs * math.ceil(rows / cfg.train.batch_size) / cfg.train.grad_accum))


def timing(ui, cfg, data, model: str, task: str) -> tuple[dict[str, dict], str]:
    """method -> {"step_s", "seconds", "basis"}: a finished run's measured time per step on this model and task,
    scaled to this recipe's tokens per step (and times its steps, where they are known); and what the estimate
    rests on, in a sentence."""
    steps = planned_steps(ui, cfg, data)
    tokens = cfg.train.batch_size * cfg.train.grad_accum * data.max_length
    out = {}
    for method, m in step_times(ui.workspace, model, task).items():
        step_s = m["step_s"] * tokens / m["tokens"]
        out[method] = {"step_s": step_s, "seconds": step_s * steps if steps else None, "steps": steps,
                       "basis": f"{m['step_s']:.3g} s a step measured in {m['id']} at {m['tokens']:,} tokens a step, "
                                f"scaled to this recipe's {tokens:,}"}
    if not out:
        return out, ("No finished run of this model and task in the workspace to time a step by: train one briefly "
                     "(e.g. train.max_steps=20) and the estimate scales its measured time per step to this recipe.")
    return out, ("Times scale a finished run's measured seconds per step (same model and task) by the tokens a step "
                 "holds (batch_size x grad_accum x data.max_length); " +
                 (f"about {steps:,} steps." if steps else "the number of steps is unknown (no train.max_steps, and "
                                                           "data.train is not a local file to count)."))


@router.post("/api/advise")
def advise(req: RecipeBody, request: Request):
    ui = ui_of(request)
    cfg = checked(ui, req.yaml)
    task = cfg.tasks[0].task.type if cfg.tasks else cfg.task.type
    if task not in advise_mod.TASKS:
        raise ApiError(400, f"advise estimates the memory of {', '.join(advise_mod.TASKS)} runs; a {task} run is not "
                            f"estimated yet. Its closest estimate is a classification run of the same model "
                            f"(task.type classification), or measure it with `tunelab compare` on a little data.",
                       "task.type")
    data = cfg.tasks[0].data if cfg.tasks else cfg.data
    device = None if cfg.model.device == "auto" else cfg.model.device.split(":")[0]
    result = advise_mod.advise(model_dir(ui, cfg), task, data.max_length, cfg.train.batch_size, tasks=len(cfg.tasks or [1]),
                               dtype=cfg.model.dtype, eval_batch_size=cfg.eval.batch_size, device=device)
    times, time_note = timing(ui, cfg, data, result["model"], task)
    rows = []
    for r in result["rows"]:
        plain, ckpt = r["plain"], r["checkpointing"]
        rows.append({"method": r["method"], "applicable": r["applicable"], "reason": r["reason"],
                     "mergeable": r["mergeable"], "fits": r["fits"] is not None,
                     "needs_checkpointing": r["fits"] == "checkpointing",
                     "peak_bytes": plain.get("train_peak"), "peak_bytes_checkpointing": ckpt.get("train_peak"),
                     "trainable_params": plain.get("trainable_params"), "total_params": plain.get("total_params"),
                     "trainable_pct": (100 * plain["trainable_params"] / plain["total_params"]
                                       if r["applicable"] else None),
                     "chosen": r["method"] == cfg.method.name, "time": times.get(r["method"])})
    return {"machine_memory": result["memory_bytes"], "memory_source": result["memory_source"],
            "device": result["device"], "model": result["model"], "task": task, "seq_len": result["seq_len"],
            "batch": result["batch"], "dtype": result["dtype"], "method": cfg.method.name, "rows": rows,
            "recommended": [r["method"] for r in result["recommendations"]],
            "recommendations": result["recommendations"], "notes": result["notes"], "time_note": time_note,
            "text": advise_mod.format_advice(result)}


# -- compare ---------------------------------------------------------------------------------------------------------

COLUMNS = [{"key": "method", "label": "method"}, {"key": "metric", "label": "metric (base → tuned)"},
           {"key": "trainable_pct", "label": "trainable %"}, {"key": "peak_memory_mb", "label": "peak memory MB"},
           {"key": "time_s", "label": "train s"}, {"key": "latency_ms", "label": "ms / example"},
           {"key": "forgetting", "label": "forgetting (base → tuned)"}, {"key": "storage_mb", "label": "storage MB"}]
PLOTS = (("trainable_pct", "trainable parameters (%)"), ("peak_memory_mb", "peak memory (MB)"),
         ("time_s", "training time (s)"), ("latency_ms", "latency (ms / example)"),
         ("forgetting_change", "forgetting: change of the probe's metric"))


def table_row(rid: str | None, method: str, task: str | None, r: dict) -> dict:
    """One row of the page's table from a row of `tunelab compare`'s table (compare.summary_row's figures)."""
    ok = r.get("status") == "ok"
    metric = None
    if ok:
        name = r["metric"]
        metric = {"name": name, "split": r["split"], "base": r.get("base"), "tuned": r.get("tuned"),
                  "linear_probe": r.get("linear_probe"),
                  "greater_is_better": name.rsplit("/", 1)[-1] not in LOWER_IS_BETTER}
    return {"id": rid, "method": method, "task": task, "status": r.get("status"), "reason": r.get("reason"),
            "metric": metric, "trainable_pct": r.get("trainable_percent"), "trainable_params": r.get("trainable_params"),
            "storage_mb": r.get("storage_mb"), "peak_memory_mb": r.get("peak_memory_mb"),
            "memory_kind": r.get("memory_kind"), "time_s": r.get("train_seconds"),
            "tokens_per_second": r.get("tokens_per_second"), "latency_ms": r.get("latency_ms"),
            "latency_merged_ms": r.get("latency_merged_ms"), "forgetting": r.get("forgetting"), "lr": r.get("lr"),
            "steps": r.get("steps")}


def run_row(folder: Path, rid: str) -> dict:
    """A run folder's row: its summary.json's figures, or why it has none."""
    try:
        cfg = config_mod.load(folder / "config.yaml")
    except TunelabError as e:
        return table_row(rid, "?", None, {"status": "failed", "reason": str(e)})
    method, task = cfg.method.name, ("multitask" if cfg.tasks else cfg.task.type)
    summary = folder / "summary.json"
    if cfg.tasks is not None:
        reason = "a multi-task run: its figures are per task (open the run); compare compares one task's runs"
        return table_row(rid, method, task, {"status": "skipped", "reason": reason})
    if not summary.is_file():
        return table_row(rid, method, task, {"status": "unfinished", "reason": "no summary.json: the run has not "
                                                                               "finished"})
    s = json.loads(summary.read_text(encoding="utf-8"))
    return table_row(rid, method, task, {**compare_mod.summary_row(s, cfg), "lr": cfg.train.lr,
                                         "latency_ms": s.get("latency_ms")})


def compare_rows(folder: Path, rid: str) -> list[dict]:
    """The rows of a `tunelab compare` folder (compare.json), each with the id of its run folder."""
    config = folder / "config.yaml"
    task = yaml.safe_load(config.read_text(encoding="utf-8")).get("task", {}).get("type") if config.is_file() else None
    out = []
    for r in json.loads((folder / "compare.json").read_text(encoding="utf-8")):
        run = folder / "runs" / r["method"]
        sub = f"{rid}/runs/{r['method']}" if (run / "summary.json").is_file() else None
        out.append(table_row(sub, r["method"], task, r))
    return out


def plots(rows: list[dict]) -> list[dict]:
    """metric (tuned) against each cost, over the finished rows that measure the first row's metric."""
    ok = [r for r in rows if r["metric"] and r["metric"]["tuned"] is not None]
    if not ok:
        return []
    first = ok[0]["metric"]
    same = [r for r in ok if (r["metric"]["name"], r["metric"]["split"]) == (first["name"], first["split"])]
    out = []
    for x, label in PLOTS:
        points = []
        for r in same:
            value = (r["forgetting"] or {}).get("change") if x == "forgetting_change" else r[x]
            if value is not None:
                points.append({"id": r["id"], "method": r["method"], "x": value, "y": r["metric"]["tuned"]})
        out.append({"name": x, "x_label": label, "y_label": f"{first['split']} {first['name']}",
                    "greater_is_better": first["greater_is_better"], "points": points})
    return out


@router.post("/api/compare")
def compare(req: CompareBody, request: Request):
    ui = ui_of(request)
    if not req.ids:
        raise ApiError(400, "'ids' is empty: pick at least one finished run (or a `tunelab compare` folder) to "
                            "compare.", "ids")
    rows = []
    for rid in req.ids:
        folder = ui.run_dir(rid)
        kind = runs.whose(folder)
        if kind in ("cv", "sweep"):
            rows.append(table_row(rid, "?", None, {"status": "skipped", "reason": f"a {kind} folder: open it for its "
                                                   f"own table, or compare the runs inside it"}))
        else:
            rows += compare_rows(folder, rid) if (folder / "compare.json").is_file() else [run_row(folder, rid)]
    return {"columns": COLUMNS, "rows": rows, "plots": plots(rows)}


@router.post("/api/compare/launch", status_code=201)
def launch_compare(req: CompareLaunch, request: Request):
    ui = ui_of(request)
    try:
        names = compare_mod.parse_methods(",".join(req.methods))
    except TunelabError as e:
        raise ApiError(400, str(e), "methods") from None
    cfg = checked(ui, req.yaml)
    if cfg.tasks is not None:
        raise ApiError(400, "`tunelab compare` compares methods on one task; this recipe is multi-task. Compare on "
                            "one of its tasks' recipes.", "tasks")
    if req.steps is not None and req.steps < 1:
        raise ApiError(400, f"steps={req.steps}: give the optimizer steps per method (at least 1), or leave it out for "
                            f"the recipe's own budget.", "steps")
    out = ui.confine(req.output_dir or f"runs/compare-{cfg.task.type}-{time.strftime('%Y%m%d-%H%M%S')}", "output_dir")
    try:
        runs.claim(out, False, "compare", cfg)  # refuses an existing folder as the CLI would, before anything starts
    except TunelabError as e:
        raise ApiError(400, str(e), "output_dir") from None
    recipe = ui.jobs.write_recipe(req.yaml, out.name)
    args = ["compare", str(recipe), "--methods", ",".join(names), "--output", str(out)]
    ui.jobs.launch(args + (["--steps", str(req.steps)] if req.steps else []), out, "compare", recipe=str(recipe))
    return {"id": out.relative_to(ui.workspace).as_posix()}
