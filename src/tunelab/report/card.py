"""Model cards: a README.md beside every trained artifact (a run's adapter/ or model/, every export), as the Hugging
Face Hub reads it: YAML front matter (base_model, library_name, pipeline_tag, tags, datasets, model-index with the
test figures, or validation's where there is no test split) and then what was trained, on what data, how it did
against the base model and the linear probe, forgetting, the key settings, and how to load it.

Everything on a card comes from the run: its config, summary.json, data_report.json and versions.json. A figure the
run did not measure is left out, never guessed. The front matter is written by huggingface_hub's own ModelCardData
and EvalResult, so it is the format the Hub (and `huggingface_hub.ModelCard.load`) parses.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCardData, metadata_load

from .. import atomic, hub, tasks
from .. import config as config_mod

CARD = "README.md"
# Which transformers class loads each task's model: the load snippets name it
AUTO_CLASS = {"classification": "AutoModelForSequenceClassification", "regression": "AutoModelForSequenceClassification",
              "multilabel": "AutoModelForSequenceClassification", "reward": "AutoModelForSequenceClassification",
              "token_classification": "AutoModelForTokenClassification", "qa": "AutoModelForQuestionAnswering",
              "sft": "AutoModelForCausalLM", "causal_lm": "AutoModelForCausalLM", "dpo": "AutoModelForCausalLM",
              "grpo": "AutoModelForCausalLM", "mlm": "AutoModelForMaskedLM", "embedding": "AutoModel"}
SPLITS = ("validation", "test")


# -- the facts, from the run's files ---------------------------------------------------------------------------------

def base_model(cfg, versions: dict) -> tuple[str | None, str | None]:
    """(Hub id, commit) of the model the run started from: the id it was given (versions.json hub_model, pinned at
    a commit), or for a local folder the `_name_or_path` its config.json records where that is a Hub id."""
    if versions.get("hub_model"):
        return versions["hub_model"].get("id"), versions["hub_model"].get("commit")
    if hub.is_hub_id(cfg.model.path):
        return cfg.model.path, cfg.model.revision
    try:
        name = json.loads((Path(cfg.model.path).expanduser() / "config.json").read_text(encoding="utf-8")).get(
            "_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None, None
    # a local save records its own folder there, which is no Hub id (is_hub_id says so when the folder exists)
    return (name, None) if isinstance(name, str) and name and hub.is_hub_id(name) else (None, None)


def licence(cfg) -> str | None:
    """The base model's licence as its own model card (README.md front matter) states it, where that card is here
    (a local folder, or the Hugging Face cache): nothing is downloaded to find out."""
    folder = hub.cached(cfg.model.path, cfg.model.revision) if hub.is_hub_id(cfg.model.path) else Path(
        cfg.model.path).expanduser()
    try:
        found = (metadata_load(Path(folder) / "README.md") or {}).get("license") if folder else None
    except (OSError, ValueError, yaml.YAMLError):  # no card, or front matter that is not YAML
        return None
    return found if isinstance(found, str) else None


def parts(cfg) -> dict[str | None, object]:
    """{task name (None for a single-task run): its single-task config}."""
    if cfg.tasks:
        return {spec.name: config_mod.single(cfg, spec.name) for spec in cfg.tasks}
    return {None: cfg}


def reports(cfg, data_report: dict | None) -> dict[str | None, dict]:
    """The data report of each part (a multi-task run's data_report.json is one per task)."""
    data_report = data_report or {}
    if cfg.tasks:
        return {n: data_report.get(n) or {} for n in parts(cfg)}
    return {None: data_report}


def hub_datasets(data_report: dict | None, versions: dict) -> list[str]:
    found = [o.get("repo") for o in (versions.get("hub_datasets") or {}).values()]
    for report in _all_reports(data_report):
        found += [(s.get("dataset") or {}).get("repo") for s in (report.get("splits") or {}).values()
                  if (s.get("dataset") or {}).get("kind") == "hub"]
    return sorted({r for r in found if r})


def _all_reports(data_report: dict | None) -> list[dict]:
    if not isinstance(data_report, dict):
        return []
    if "splits" in data_report:
        return [data_report]
    return [r for r in data_report.values() if isinstance(r, dict) and "splits" in r]


def scalars(metrics) -> dict[str, float]:
    """The plain figures of one evaluation (no counts, tables or per-class breakdowns)."""
    if isinstance(metrics, (int, float)) and not isinstance(metrics, bool):
        return {"value": float(metrics)}
    if not isinstance(metrics, dict):
        return {}
    return {k: float(v) for k, v in metrics.items() if k != "examples" and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


def tuned(summary: dict, split: str, name: str | None) -> dict[str, float]:
    """The tuned model's figures on a split: summary["test"], and summary["eval"] for validation."""
    found = summary.get("eval" if split == "validation" else "test") or {}
    return scalars(found.get(name) if name is not None else found)


def baseline(summary: dict, which: str, split: str, name: str | None) -> dict[str, float]:
    found = summary.get(which) or {}
    if name is not None:
        found = found.get(name) or {}
    return scalars(found.get(split))


def source(report: dict, split: str) -> dict:
    """{"name", "type", "config", "revision"} of the data a split was read from: a Hub dataset by its repo id, a
    file by its name; a validation split held out of train is train's data."""
    entry = (report.get("splits") or {}).get(split) or {}
    if entry.get("from"):
        return source(report, entry["from"])
    origin = entry.get("dataset") or {}
    if origin.get("kind") == "hub" and origin.get("repo"):
        return {"name": origin["repo"], "type": origin["repo"], "config": origin.get("config"),
                "revision": origin.get("commit")}
    file = (report.get("files") or {}).get(split)
    name = Path(str(file)).name if file else split
    return {"name": name, "type": name, "config": None, "revision": None}


def results(cfg, summary: dict, data_report: dict | None) -> list[EvalResult]:
    """model-index entries: the test figures of each task, or validation's where the run had no test split."""
    out = []
    for name, sub in parts(cfg).items():
        split = next((s for s in ("test", "validation") if tuned(summary, s, name)), None)
        if split is None:
            continue
        data = source(reports(cfg, data_report)[name], split)
        for metric, value in tuned(summary, split, name).items():
            out.append(EvalResult(
                task_type=tasks.get(sub.task.type).PIPELINE_TAG, task_name=name or sub.task.type,
                dataset_type=data["type"], dataset_name=data["name"], dataset_config=data["config"],
                dataset_split=split, dataset_revision=data["revision"], metric_type=metric, metric_value=value,
                metric_name=f"{split} {metric}" if name is None else f"{name} {split} {metric}"))
    return out


def metadata(cfg, summary: dict, data_report: dict | None, versions: dict, library: str | None,
             name: str) -> ModelCardData:
    base, _ = base_model(cfg, versions)
    types = [sub.task.type for sub in parts(cfg).values()]
    pipeline = {tasks.get(t).PIPELINE_TAG for t in types}
    eval_results = results(cfg, summary, data_report)
    # the Hub names no library for a GGUF file (llama.cpp, Ollama, LM Studio... read it); its tag marks it
    return ModelCardData(
        base_model=base, library_name=None if library == "gguf" else library, license=licence(cfg),
        pipeline_tag=pipeline.pop() if len(pipeline) == 1 else None,
        tags=list(dict.fromkeys(["tunelab", cfg.method.name, *types] + (["multitask"] if cfg.tasks else [])
                                + (["gguf"] if library == "gguf" else []))),
        datasets=hub_datasets(data_report, versions) or None,
        model_name=name if eval_results else None, eval_results=eval_results or None)


# -- the body --------------------------------------------------------------------------------------------------------

def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if v is None else _fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def trained_section(cfg, summary: dict, versions: dict) -> str:
    base, commit = base_model(cfg, versions)
    what = ", ".join(f"{n} ({sub.task.type})" if n else sub.task.type for n, sub in parts(cfg).items())
    lines = [f"- Task: {what}", f"- Method: {cfg.method.name}"]
    lines.append(f"- Base model: {base or cfg.model.path}" + (f" at commit {commit}" if commit else ""))
    if summary.get("trainable_params") and summary.get("total_params"):
        lines.append(f"- Trainable parameters: {summary['trainable_params']:,} of {summary['total_params']:,} "
                     f"({100 * summary['trainable_params'] / summary['total_params']:.3g}%)")
    if summary.get("steps") is not None:
        lines.append(f"- Steps: {summary['steps']}" + (" (stopped early)" if summary.get("stopped_early") else ""))
    return "## What was trained\n\n" + "\n".join(lines)


def data_section(cfg, data_report: dict | None) -> str:
    out = []
    for name, report in reports(cfg, data_report).items():
        rows = []
        for split, entry in (report.get("splits") or {}).items():
            dropped = {k: v for k, v in (entry.get("dropped") or {}).items() if v}
            where = source(report, split)["name"]
            rows.append([split, where, entry.get("rows_read"), entry.get("rows"),
                         ", ".join(f"{k} {v}" for k, v in dropped.items()) or "none"])
        if rows:
            out.append((f"Task {name}:\n\n" if name else "") + _table(
                ["split", "from", "rows read", "rows used", "dropped"], rows))
    if not out:
        return ""
    return "## Data\n\n" + "\n\n".join(out) + "\n\nThe full data report is the run's data_report.json."


def results_section(cfg, summary: dict) -> str:
    out = []
    for name in parts(cfg):
        for split in SPLITS:
            mine = tuned(summary, split, name)
            if not mine:
                continue
            base = baseline(summary, "base", split, name)
            probe = baseline(summary, "linear_probe", split, name)
            header = ["metric"] + (["base"] if base else []) + (["linear probe"] if probe else []) + ["tuned"]
            rows = [[m] + ([base.get(m)] if base else []) + ([probe.get(m)] if probe else []) + [v]
                    for m, v in mine.items()]
            title = f"{name}, {split}" if name else split.capitalize()
            out.append(f"{title}:\n\n" + _table(header, rows))
    generation = summary.get("generation") or {}  # eval.generate: {"base"/"tuned": {split: reply scores}}
    for split in SPLITS:
        sides = {side: scalars((generation.get(side) or {}).get(split)) for side in ("base", "tuned")}
        sides = {side: found for side, found in sides.items() if found}
        if "tuned" in sides:
            out.append(f"Generated replies against the references ({split}):\n\n" + _table(
                ["metric", *sides], [[m, *(found.get(m) for found in sides.values())] for m in sides["tuned"]]))
    forgetting = summary.get("forgetting")
    if isinstance(forgetting, dict) and {"metric", "before", "after"} <= set(forgetting):
        out.append(f"Forgetting ({forgetting.get('kind')} probe on {Path(str(forgetting.get('file'))).name}): "
                   f"{forgetting['metric']} {_fmt(forgetting['before'])} before training, "
                   f"{_fmt(forgetting['after'])} after.")
    return "## Results\n\n" + "\n\n".join(out) if out else ""


def config_section(cfg) -> str:
    keys = {"method": cfg.method.model_dump(), "train": {
        k: v for k, v in cfg.train.model_dump().items()
        if k in ("lr", "epochs", "max_steps", "batch_size", "grad_accum", "weight_decay", "warmup_ratio", "scheduler",
                 "seed", "precision", "metric") and v is not None}}
    rows = [[f"{section}.{k}", v] for section, found in keys.items() for k, v in found.items()
            if v is not None and not isinstance(v, (dict, list))]
    if not cfg.tasks and cfg.data.max_length:
        rows.append(["data.max_length", cfg.data.max_length])
    return ("## Training config\n\n" + _table(["setting", "value"], rows)
            + "\n\nThe full resolved config is the run's config.yaml.")


def render(cfg, summary: dict, data_report: dict | None, versions: dict, *, library: str | None, name: str,
           load: str) -> str:
    """The card's text: front matter, then the body; `load` is the "How to load it" section's markdown."""
    data = metadata(cfg, summary, data_report, versions, library, name)
    sections = [f"# {name}", f"Fine-tuned with tunelab ({cfg.method.name}).",
                trained_section(cfg, summary, versions), data_section(cfg, data_report),
                results_section(cfg, summary), config_section(cfg), "## How to load it\n\n" + load]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(s for s in sections if s) + "\n"


# -- how to load it --------------------------------------------------------------------------------------------------

def _code(text: str) -> str:
    return f"```python\n{text}\n```"


def load_tunelab(run_dir: Path) -> str:
    return _code(f"import tunelab\n\nmodel = tunelab.load({str(run_dir)!r})")


def load_transformers(task_type: str, folder: Path) -> str:
    auto = AUTO_CLASS.get(task_type, "AutoModel")
    return _code(f"from transformers import {auto}, AutoTokenizer\n\n"
                 f"model = {auto}.from_pretrained({str(folder)!r})\n"
                 f"tokenizer = AutoTokenizer.from_pretrained({str(folder)!r})")


def load_peft(task_type: str, folder: Path, base: str | None, revision: str | None, labels: int | None) -> str:
    auto = AUTO_CLASS.get(task_type, "AutoModel")
    args = [repr(base)] + ([f"revision={revision!r}"] if revision else []) + (
        [f"num_labels={labels}"] if labels and auto in ("AutoModelForSequenceClassification",
                                                         "AutoModelForTokenClassification") else [])
    return _code(f"from peft import PeftModel\nfrom transformers import {auto}, AutoTokenizer\n\n"
                 f"base = {auto}.from_pretrained({', '.join(args)})\n"
                 f"model = PeftModel.from_pretrained(base, {str(folder)!r})\n"
                 f"tokenizer = AutoTokenizer.from_pretrained({str(folder)!r})")


def load_sentence_transformers(folder: Path) -> str:
    return _code(f"from sentence_transformers import SentenceTransformer\n\n"
                 f"model = SentenceTransformer({str(folder)!r})\nvectors = model.encode([\"a sentence\"])")


def load_gguf(folder: Path, gguf_file: str) -> str:
    name = folder.name.lower()
    return (f"With Ollama (the Modelfile beside the file holds the chat template, system prompt and stop tokens):\n\n"
            f"```sh\ncd {str(folder)!r}\nollama create {name} -f Modelfile\nollama run {name}\n```\n\n"
            f"With llama.cpp, which reads the chat template from the file:\n\n"
            f"```sh\nllama-cli -m {str(folder / gguf_file)!r} -cnv\n```\n\n"
            f"With llama-cpp-python:\n\n" + _code(
                f"from llama_cpp import Llama\n\nllm = Llama(model_path={str(folder / gguf_file)!r})\n"
                f"reply = llm.create_chat_completion(messages=[{{\"role\": \"user\", \"content\": \"Hello!\"}}])"))


def _labels(run_dir: Path) -> int | None:
    try:
        info = json.loads((run_dir / "labels.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return len(info["labels"]) if isinstance(info, dict) and isinstance(info.get("labels"), list) else None


def _read(path: Path) -> dict:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def artifact_library(folder: Path) -> str | None:
    """peft for an adapter in peft's layout, transformers for a complete model dir; None for tunelab's own adapter
    layout, which only tunelab loads."""
    if (folder / "adapter_config.json").is_file():
        return "peft"
    if (folder / "config.json").is_file():
        return "transformers"
    return None


def load_section(cfg, run_dir: Path, folder: Path, library: str | None, versions: dict, task_type: str,
                 gguf_file: str | None = None) -> str:
    """Snippets for the folder as it is: tunelab.load for the run, plus what loads the folder without tunelab."""
    out = []
    if library == "gguf" and gguf_file:
        out.append(load_gguf(folder, gguf_file))
    if library == "sentence-transformers":
        out.append("With sentence-transformers:\n\n" + load_sentence_transformers(folder))
    if library in ("transformers", "sentence-transformers"):
        out.append("With transformers alone:\n\n" + load_transformers(task_type, folder))
    elif library == "peft":
        base, revision = base_model(cfg, versions)
        base = base or str(Path(cfg.model.path).expanduser().resolve())
        out.append("With peft, on the base model:\n\n" + load_peft(task_type, folder, base, revision,
                                                                      _labels(run_dir)))
    out.append("With tunelab, from the run folder (predict, evaluate, generate or embed as the task allows):\n\n"
               + load_tunelab(run_dir))
    return "\n\n".join(out)


# -- writing ---------------------------------------------------------------------------------------------------------

def artifacts(run_dir: Path) -> list[tuple[str | None, Path]]:
    """(task name or None, folder) of every trained artifact a finished run holds."""
    found = [(None, run_dir / d) for d in ("adapter", "model") if (run_dir / d).is_dir()]
    if (run_dir / "adapters").is_dir():
        found += [(p.name, p) for p in sorted((run_dir / "adapters").iterdir()) if p.is_dir()]
    if (run_dir / "tasks").is_dir():
        found += [(p.parent.name, p) for p in sorted((run_dir / "tasks").glob("*/model")) if p.is_dir()]
    return found


def inputs(run_dir: Path) -> tuple[dict, dict | None, dict]:
    return _read(run_dir / "summary.json"), _read(run_dir / "data_report.json") or None, _read(
        run_dir / "versions.json")


def task_type(cfg, name: str | None) -> str:
    if not cfg.tasks:
        return cfg.task.type
    return config_mod.single(cfg, name or cfg.tasks[0].name).task.type


def write_run(run_dir: Path, cfg, final: Path | None = None) -> list[Path]:
    """README.md into each of the run's artifact folders; `final` is where the run folder will be (a replacement
    is written beside its target and swapped in), which the load snippets name. Returns the cards written."""
    run_dir = Path(run_dir).resolve()
    final = Path(final or run_dir).resolve()
    summary, data_report, versions = inputs(run_dir)
    written = []
    for name, folder in artifacts(run_dir):
        library = artifact_library(folder)
        load = load_section(cfg, final, final / folder.relative_to(run_dir), library, versions, task_type(cfg, name))
        text = render(cfg, summary, data_report, versions, library=library, name=final.name, load=load)
        written.append(atomic.write_text(folder / CARD, text, "the model card"))
    return written


def write_export(folder: Path, final: Path, run_dir: Path, cfg, library: str | None,
                 gguf_file: str | None = None) -> Path:
    """README.md of an export being built in `folder`, whose load snippets name where it will be (`final`)."""
    run_dir = Path(run_dir).resolve()
    summary, data_report, versions = inputs(run_dir)
    load = load_section(cfg, run_dir, Path(final), library, versions, task_type(cfg, None), gguf_file)
    text = render(cfg, summary, data_report, versions, library=library, name=Path(final).name, load=load)
    return atomic.write_text(Path(folder) / CARD, text, "the model card")
