"""Experiment trackers beside metrics.jsonl: MLflow and Weights & Biases (`train.log_to: [mlflow, wandb]`).

What each gets, on the first process only: the resolved config (MLflow: flattened to dotted params; W&B: its
config), every number of every metrics.jsonl record at its step under the names TensorBoard uses (`scalars`),
tags naming the task, method and model, and when the run has finished summary.json, config.yaml, report.html and
metrics.jsonl as files (with `train.log_artifacts`, the trained weights too).

The life of a tracked run, and where each part happens:
- `start` (logs.open_log, when training starts): a new run, or the one named in <run dir>/tracking.json when
  the run is resumed. A resumed MLflow run first catches up from metrics.jsonl (what the process that stopped had
  not sent yet) and then skips a step it holds already with the same value, so its history has each step once.
- `Trackers.log` for every record; `Trackers.stop` when the loop ends: a run that raised is marked failed
  (MLflow FAILED or KILLED; W&B exit code 1); one that trained on waits, still open, for `finish`.
- `finish` (runs.finish, after report.html): the files, then the run marked finished.
A tracker that fails (a server down, a full disk) is warned about once and left out for the rest of the run;
training goes on and metrics.jsonl stays complete. An MLflow run that fell behind catches up from metrics.jsonl
at `finish`, or at the next resume, when its store answers again.

mlflow and wandb are optional (extras `tunelab[mlflow]`, `tunelab[wandb]`) and imported only here, when asked.
"""

from __future__ import annotations

import importlib
import json
import math
import netrc
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

from .. import atomic
from ..errors import TunelabError

STATE = "tracking.json"  # in the run dir: which tracker runs this run logs to, so --resume continues them
EXPERIMENT = "tunelab"  # MLflow experiment and W&B project unless MLFLOW_EXPERIMENT_NAME / WANDB_PROJECT say
FILES = ("summary.json", "config.yaml", "report.html", "metrics.jsonl")
WEIGHTS = ("adapter", "adapters", "model", "heads", "tasks")  # what a run's trained weights live in
FLUSH_SECONDS = 2.0  # MLflow gets its metrics in batches at most this old: a round trip per record costs ~20 ms
EXTRAS = {"mlflow": "MLflow", "wandb": "Weights & Biases"}


def check(log_to: list[str]) -> None:
    """Fail before any work when a tracker is asked for but not installed, or MLflow's store is one it refuses."""
    for name, what in EXTRAS.items():
        if name not in log_to:
            continue
        try:
            importlib.import_module(name)
        except ImportError:
            raise TunelabError(f"train.log_to: '{name}' needs the {name} package ({what}), which is not installed. "
                               f"Install it with pip install 'tunelab[{name}]' (or pip install {name}), or remove "
                               f"{name} from train.log_to.") from None
    if "mlflow" in log_to:
        uri = mlflow_uri()
        if urlsplit(uri).scheme in ("", "file") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in (
                "true", "1"):
            raise TunelabError(f"MLFLOW_TRACKING_URI={uri!r} is a folder (a file store), which MLflow 3 refuses "
                               f"unless MLFLOW_ALLOW_FILE_STORE=true. Use a database store, e.g. "
                               f"MLFLOW_TRACKING_URI=sqlite:///mlflow.db (or leave it unset: tunelab then logs to "
                               f"mlflow.db in the current directory), a tracking server (http://HOST:PORT), or set "
                               f"MLFLOW_ALLOW_FILE_STORE=true to keep the folder.")


def scalars(record: dict) -> list[tuple[str, float]]:
    """The numbers of a record that has a step, each named `<train|split>/<name>` (`<split>/<task>/<name>` for a
    record of one task) and each parameter group's LR `lr/<group>`: what TensorBoard, MLflow and W&B get.
    Structured fields (per-class tables, confusion matrices) stay in metrics.jsonl, which is logged as a file."""
    if record.get("step") is None:
        return []
    kind = record.get("type")
    prefix = "train" if kind == "train" else record.get("split", kind)
    if record.get("task"):
        prefix = f"{prefix}/{record['task']}"
    named = [(f"{prefix}/{key}", value) for key, value in record.items()
             if key != "step" and not isinstance(value, bool) and isinstance(value, (int, float))]
    return named + [(f"lr/{group}", lr) for group, lr in (record.get("lrs") or {}).items()]


def mlflow_uri() -> str:
    """MLFLOW_TRACKING_URI, else a SQLite store mlflow.db in the current directory (MLflow's own default, which
    `mlflow ui` started there shows); a relative SQLite path made absolute, so a resume from elsewhere finds it."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri[len("sqlite:///"):].startswith("/"):
        uri = f"sqlite:///{Path.cwd() / uri[len('sqlite:///'):]}"
    return uri


def flat_config(cfg) -> dict[str, str]:
    """The resolved config (as config.yaml holds it) as dotted keys: `train.lr`, `tasks.0.data.train`; a value
    is the string itself or its JSON (true, null, 0.0003, ["mlflow"])."""
    def walk(tree, prefix: str):
        for key, value in tree.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict) and value:
                yield from walk(value, name + ".")
            elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                for i, item in enumerate(value):
                    yield from walk(item, f"{name}.{i}.")
            else:
                yield name, value if isinstance(value, str) else json.dumps(value)

    return dict(walk(cfg.model_dump(mode="json"), ""))


def run_tags(cfg) -> dict[str, str]:
    """task, method, model (and the model's Hub revision, as model.commit when it is a commit hash)."""
    task = "multitask" if cfg.tasks is not None else cfg.task.type
    tags = {"task": task, "method": cfg.method.name, "model": cfg.model.path, "tunelab.run_dir": str(cfg.output_dir)}
    if cfg.tasks is not None:
        tags["tasks"] = ", ".join(f"{t.name}:{t.task.type}" for t in cfg.tasks)
    if cfg.model.revision:
        tags["model.revision"] = cfg.model.revision
        if re.fullmatch(r"[0-9a-f]{40}", cfg.model.revision):
            tags["model.commit"] = cfg.model.revision
    return tags


def run_name(cfg) -> str:
    return Path(cfg.output_dir).name


def say(message: str) -> None:
    print(message, flush=True)


def read_state(run_dir: Path) -> dict:
    try:
        found = json.loads((Path(run_dir) / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def write_state(run_dir: Path, state: dict) -> None:
    atomic.write_json(Path(run_dir) / STATE, state, f"the run's {STATE}")


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl as it is (the loop has cut it back to a checkpoint when resuming)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    found = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:  # a line cut short by a crash: the loop cuts the file back before this matters
            continue
    return found


# -- MLflow -------------------------------------------------------------------------------------------------------


class MLflow:
    """One MLflow run, through MlflowClient (no global active run, so a user's own mlflow.start_run is untouched)."""

    name = "MLflow"

    def __init__(self, state: dict):
        from mlflow.tracking import MlflowClient

        self.state = state
        self.client = MlflowClient(tracking_uri=state["tracking_uri"])
        self.run_id = state["run_id"]
        self.held: dict[tuple[str, int], list[float]] = {}  # (metric, step) -> values the run holds (a resume's)
        self.pending: list = []
        self.flushed = time.monotonic()
        self.differs = False

    @classmethod
    def start(cls, run_dir: Path, cfg, state: dict | None) -> MLflow:
        if state:  # a resumed run: the same MLflow run, where it was logged
            if os.environ.get("MLFLOW_TRACKING_URI") and mlflow_uri() != state["tracking_uri"]:
                say(f"note: MLflow: this run continues its MLflow run {state['run_id']} in {state['tracking_uri']}, "
                    f"where it started (MLFLOW_TRACKING_URI now says {mlflow_uri()}).")
            self = cls(state)
            self.client.update_run(self.run_id, status="RUNNING")
            self.catch_up(run_dir)
            self.log_params(cfg)
            return self
        from mlflow.tracking import MlflowClient

        uri = mlflow_uri()
        client = MlflowClient(tracking_uri=uri)
        run = client.create_run(experiment_id(client), run_name=run_name(cfg), tags=run_tags(cfg))
        self = cls({"tracking_uri": uri, "experiment_id": run.info.experiment_id, "run_id": run.info.run_id})
        self.log_params(cfg)
        return self

    def log_params(self, cfg) -> None:
        """The flattened config as params; MLflow keeps a param's first value, so a resumed run whose config
        changed (--resume-anyway) says which ones its params no longer match (config.yaml has the new ones)."""
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        logged = self.client.get_run(self.run_id).data.params
        params, changed = [], []
        for key, value in flat_config(cfg).items():
            if len(value) > MAX_PARAM_VAL_LENGTH:  # MLflow's limit; config.yaml, logged at the end, has it whole
                cut = "... (cut: config.yaml has it whole)"
                value = value[: MAX_PARAM_VAL_LENGTH - len(cut)] + cut
            if key not in logged:
                params.append(Param(key, value))
            elif logged[key] != value:
                changed.append(key)
        if params:
            self.client.log_batch(self.run_id, params=params)
        if changed:
            say(f"note: MLflow keeps a param's first value, so run {self.run_id}'s params {', '.join(changed[:5])} "
                f"are those from before the resume; the run's config.yaml (logged at the end) has the new ones.")

    def catch_up(self, run_dir: Path) -> None:
        """Log what metrics.jsonl has and the run lacks; remember every (metric, step) it holds, so the steps a
        resumed loop trains again are not logged twice."""
        self.held = {}
        for key in self.client.get_run(self.run_id).data.metrics:
            for m in self.client.get_metric_history(self.run_id, key):
                self.held.setdefault((key, m.step), []).append(m.value)
        for record in records(run_dir):
            self.log(scalars(record), record.get("step"))
        self.flush()

    def log(self, named: list[tuple[str, float]], step) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in named:
            key = re.sub(r"[^/\w.\- :]", "_", key)  # MLflow refuses a batch with any other character
            before = self.held.get((key, step))
            if before is not None:
                if any(same(value, v) for v in before):
                    continue
                if not self.differs:
                    self.differs = True
                    say(f"note: MLflow: step {step} of {key} was logged before the resume with another value "
                        f"({before[0]} vs {value}); MLflow keeps both values at that step, metrics.jsonl the new one.")
            self.pending.append(Metric(key, float(value), now, int(step)))
        if time.monotonic() - self.flushed >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        self.flushed = time.monotonic()
        if pending:
            self.client.log_batch(self.run_id, metrics=pending)

    def stop(self, error: BaseException | None) -> None:
        self.flush()
        if error is not None:
            self.client.set_terminated(self.run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")

    def finish(self, run_dir: Path, cfg) -> None:
        if self.state.get("behind"):
            self.catch_up(run_dir)
        for name in FILES:
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        if cfg.train.log_artifacts:
            for name in WEIGHTS:
                if (run_dir / name).is_dir():
                    self.client.log_artifacts(self.run_id, str(run_dir / name), artifact_path=name)
        self.client.set_terminated(self.run_id, "FINISHED")


def experiment_id(client) -> str:
    """MLFLOW_EXPERIMENT_ID, or the experiment MLFLOW_EXPERIMENT_NAME (default 'tunelab') names, made if new."""
    from mlflow.exceptions import MlflowException

    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name)
        except MlflowException:  # another run made it meanwhile
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage != "active":
        raise TunelabError(f"the MLflow experiment '{name}' is deleted; restore it (mlflow experiments restore "
                           f"--experiment-id {found.experiment_id}) or set MLFLOW_EXPERIMENT_NAME to another name")
    return found.experiment_id


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


# -- Weights & Biases ---------------------------------------------------------------------------------------------

# W&B runs whose training has ended, kept open until their run's `finish` logs the files (one run, one sync).
AWAITING: dict[str, object] = {}


def wandb_mode() -> str | None:
    """WANDB_MODE when set (wandb reads it); else offline when no API key is set (WANDB_API_KEY, an identity token
    file, or a `wandb login` entry in ~/.netrc), so a run never waits on a login prompt; else None (online)."""
    if os.environ.get("WANDB_MODE"):
        return None
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return None
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host):
            return None
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


class WandB:
    name = "W&B"

    def __init__(self, state: dict, run=None):
        self.state, self.run = state, run

    @classmethod
    def start(cls, run_dir: Path, cfg, state: dict | None) -> WandB:
        import wandb

        state = dict(state or {"id": secrets.token_hex(4), "project": os.environ.get("WANDB_PROJECT") or EXPERIMENT})
        mode = wandb_mode()
        if mode == "offline":
            say("W&B: no API key (WANDB_API_KEY, or `wandb login`), so this run is logged offline; `wandb sync` "
                "uploads it later (WANDB_MODE=online or disabled to choose).")
        task = "multitask" if cfg.tasks is not None else cfg.task.type
        # create_new: a W&B run the user has open in this process is neither finished nor reused
        run = wandb.init(project=state["project"], id=state["id"], resume="allow", name=run_name(cfg), mode=mode,
                         config=cfg.model_dump(mode="json"), tags=[task, cfg.method.name], reinit="create_new")
        return cls(state, run)

    def log(self, named: list[tuple[str, float]], step) -> None:
        if named:
            self.run.log(dict(named), step=int(step))

    def stop(self, error: BaseException | None) -> None:
        if error is not None:
            self.run.finish(exit_code=1)
        else:
            AWAITING[self.state["id"]] = self.run

    def finish(self, run_dir: Path, cfg) -> None:
        import wandb

        run = AWAITING.pop(self.state["id"], None) or wandb.init(
            project=self.state["project"], id=self.state["id"], resume="allow", mode=wandb_mode(),
            reinit="create_new")
        if run.disabled:  # WANDB_MODE=disabled: a run that keeps nothing
            run.finish()
            return
        # copied into the W&B run's own folder, under tunelab/ (W&B keeps a config.yaml of its own there): the run
        # dir may move or go before an offline run is synced
        files = Path(run.dir) / "tunelab"
        files.mkdir(exist_ok=True)
        for name in FILES:
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, files / name)
                run.save(str(files / name), base_path=run.dir, policy="now")
        if cfg.train.log_artifacts:
            for name in WEIGHTS:
                if (run_dir / name).is_dir():
                    artifact = wandb.Artifact(re.sub(r"[^\w.-]", "_", f"{run.name}-{name}"), type="model")
                    artifact.add_dir(str(run_dir / name))
                    run.log_artifact(artifact)
        run.finish()


BACKENDS = {"mlflow": MLflow, "wandb": WandB}


# -- the trackers of one run ----------------------------------------------------------------------------------------


class Trackers:
    """The trackers a run logs to; one that fails is warned about once and dropped, and training goes on."""

    def __init__(self, run_dir: Path, state: dict, backends: dict):
        self.run_dir, self.state, self.backends = run_dir, state, backends

    def log(self, named: list[tuple[str, float]], step) -> None:
        """`named`: scalars(record), of a record at `step`."""
        if named:
            for key, backend in list(self.backends.items()):
                self.call(key, backend.log, named, step)

    def stop(self, error: BaseException | None) -> None:
        for key, backend in list(self.backends.items()):
            self.call(key, backend.stop, error)

    def call(self, key: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001  (a tracker must not cost the run)
            backend = self.backends.pop(key)
            say(f"warning: {backend.name} stopped working ({type(e).__name__}: {str(e)[:300]}); training goes on "
                f"without it, and {self.run_dir / 'metrics.jsonl'} keeps every record."
                + (" The MLflow run catches up from it when the run finishes or is resumed, if the store answers "
                   "by then." if key == "mlflow" else ""))
            if key in self.state:
                self.state[key]["behind"] = True
                try:
                    write_state(self.run_dir, self.state)
                except TunelabError as write_failed:
                    say(f"warning: {write_failed}")


def start(run_dir: Path, cfg) -> Trackers:
    """The trackers `train.log_to` asks for, new or (a resumed run's, named in tracking.json) continued."""
    state = read_state(run_dir)
    backends = {}
    for key, backend in BACKENDS.items():
        if key not in cfg.train.log_to:
            continue
        try:
            backends[key] = backend.start(run_dir, cfg, state.get(key))
        except Exception as e:  # noqa: BLE001  (a tracker that cannot start must not cost the run)
            say(f"warning: {backend.name} could not be started ({type(e).__name__}: {str(e)[:300]}); training goes "
                f"on without it, and {run_dir / 'metrics.jsonl'} keeps every record.")
            continue
        state[key] = {**backends[key].state, "behind": False}
    if backends:
        write_state(run_dir, state)
    return Trackers(run_dir, state, backends)


def finish(run_dir: Path, cfg) -> None:
    """The finished run's files to each tracker it logged to, and its run marked finished there."""
    state = read_state(run_dir)
    for key, backend in BACKENDS.items():
        if key not in cfg.train.log_to or not state.get(key):
            continue
        try:
            backend(state[key]).finish(run_dir, cfg)
        except Exception as e:  # noqa: BLE001  (the run is finished and saved; say what is missing)
            say(f"warning: {backend.name} did not get the finished run's files ({type(e).__name__}: "
                f"{str(e)[:300]}); they are in {run_dir}.")
