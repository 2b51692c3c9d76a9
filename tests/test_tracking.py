"""Experiment tracking (train.log_to: mlflow, wandb), read back as a user would see it: MLflow through its own
client (MlflowClient on a SQLite store in a temp dir), W&B from the offline run's files (its .wandb log, read
with W&B's own protobuf records). Every metric of metrics.jsonl at its step, the config, tags and files; a resumed
run continues the same tracker run with each step once; a store that fails mid-run costs nothing; only the first
of two processes logs; a tracker that is not installed is a one-paragraph error naming the extra."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import yaml
from conftest import make_rows, write_jsonl
from mlflow.tracking import MlflowClient

import tunelab
from tunelab import config, pipeline
from tunelab.training import tracking

FAST = ["model.device=cpu", "eval.linear_probe=false", "eval.samples=0", "eval.forgetting=none",
        "train.batch_size=16", "train.log_every=1"]
TRACKER_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_ALLOW_FILE_STORE",
               "WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL")


@pytest.fixture(scope="module")
def mlflow_home(tmp_path_factory) -> Path:
    """A folder holding one SQLite store, made once (MLflow's migrations take seconds): tests that run in it
    without MLFLOW_TRACKING_URI use it as tunelab's default, sqlite:///<cwd>/mlflow.db."""
    home = tmp_path_factory.mktemp("mlflow-home")
    with contextlib.chdir(home):  # the store's default artifact root is ./mlruns where it is first opened
        os.environ["MLFLOW_SQLALCHEMYSTORE_POOLCLASS"] = "NullPool"
        try:
            MlflowClient(f"sqlite:///{home / 'mlflow.db'}").search_experiments()
        finally:
            del os.environ["MLFLOW_SQLALCHEMYSTORE_POOLCLASS"]
    return home


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No tracker settings from the machine; W&B's files, cache and credentials in tmp_path; SQLite opened per
    operation (MLflow's NullPool), so a store made unreachable fails as a server that went down does."""
    for key in TRACKER_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    for key, sub in (("WANDB_DIR", "."), ("WANDB_CACHE_DIR", "wandb-cache"), ("WANDB_CONFIG_DIR", "wandb-config"),
                     ("WANDB_DATA_DIR", "wandb-data")):
        monkeypatch.setenv(key, str(tmp_path / sub))
    monkeypatch.chdir(tmp_path)
    yield
    if sys.modules.get("wandb") is not None:  # W&B reads its settings (WANDB_DIR...) once per process, at its first run
        sys.modules["wandb"].teardown()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    rows = make_rows(240, seed=7)
    return {"train": write_jsonl(root / "train.jsonl", rows[:160]),
            "validation": write_jsonl(root / "validation.jsonl", rows[160:200]),
            "test": write_jsonl(root / "test.jsonl", rows[200:])}


def _overrides(model: Path, data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [f"model.path={model}", f"output_dir={out}", *FAST, *(f"data.{k}={v}" for k, v in data.items()), *extra]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _expected(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every number of every record that has a step, named as TensorBoard names it: `train/<name>`,
    `<split>/<name>` (`<split>/<task>/<name>` in multi-task records), each group's LR `lr/<group>`."""
    found = defaultdict(list)
    for r in _records(run_dir):
        if r.get("step") is None:
            continue
        prefix = "train" if r["type"] == "train" else r.get("split", r["type"])
        prefix += f"/{r['task']}" if r.get("task") else ""
        for key, value in r.items():
            if key != "step" and type(value) in (int, float):
                found[f"{prefix}/{key}"].append((r["step"], value))
        for group, lr in (r.get("lrs") or {}).items():
            found[f"lr/{group}"].append((r["step"], lr))
    return {k: sorted(v) for k, v in found.items()}


def _flat(tree: dict, prefix: str = ""):
    """config.yaml as dotted keys; a value the string itself or its JSON."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _flat(value, f"{prefix}{key}.")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                yield from _flat(item, f"{prefix}{key}.{i}.")
        else:
            yield f"{prefix}{key}", value if isinstance(value, str) else json.dumps(value)


def _mlflow_run(run_dir: Path):
    state = json.loads((run_dir / tracking.STATE).read_text())["mlflow"]
    client = MlflowClient(state["tracking_uri"])
    return client, client.get_run(state["run_id"])


def _history(client, run) -> dict[str, list[tuple[int, float]]]:
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k))
            for k in run.data.metrics}


def _assert_mlflow_holds_the_run(run_dir: Path) -> tuple:
    """The MLflow run holds every metric of metrics.jsonl at its step and nothing else, each step once, and the
    resolved config as its params."""
    client, run = _mlflow_run(run_dir)
    expected = _expected(run_dir)
    assert _history(client, run) == expected
    assert run.data.params == dict(_flat(yaml.safe_load((run_dir / "config.yaml").read_text())))
    assert run.info.run_name == run_dir.name and run.info.status == "FINISHED"
    return client, run


# -- MLflow ---------------------------------------------------------------------------------------------------------


def test_mlflow_holds_every_metric_the_config_tags_and_files(tiny_bert, data, mlflow_home, monkeypatch):
    monkeypatch.chdir(mlflow_home)  # no MLFLOW_TRACKING_URI: the default store, mlflow.db here
    run = tunelab.train(None, _overrides(tiny_bert, data, mlflow_home / "sentiment", "train.max_steps=6",
                                         "train.eval_every=3", "train.log_to=[mlflow]", "train.log_artifacts=true"))
    client, got = _assert_mlflow_holds_the_run(run.dir)
    state = json.loads((run.dir / tracking.STATE).read_text())["mlflow"]
    assert state["tracking_uri"] == f"sqlite:///{mlflow_home / 'mlflow.db'}"
    assert client.get_experiment(got.info.experiment_id).name == "tunelab"
    metrics = _history(client, got)
    assert {"train/loss", "train/grad_norm", "lr/head", "lr/body", "validation/accuracy", "test/accuracy"} <= set(metrics)
    assert [s for s, _ in metrics["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert got.data.params["train.lr"] == json.dumps(run.summary["optimizer_groups"][0]["lr"])
    assert got.data.params["train.log_to"] == '["mlflow"]' and got.data.params["data.train"] == str(data["train"])
    assert {k: got.data.tags[k] for k in ("task", "method", "model")} == {
        "task": "classification", "method": "full", "model": str(tiny_bert)}
    assert "model.commit" not in got.data.tags  # a local model has no Hub commit
    listed = {a.path: a for a in client.list_artifacts(got.info.run_id)}
    assert set(listed) == {"summary.json", "config.yaml", "report.html", "metrics.jsonl", "model"}
    root = Path(got.info.artifact_uri.removeprefix("file://"))
    for name in ("summary.json", "config.yaml", "metrics.jsonl"):
        assert (root / name).read_bytes() == (run.dir / name).read_bytes()
    weights = sorted(p.name for p in (run.dir / "model").iterdir())
    assert sorted(a.path.split("/", 1)[1] for a in client.list_artifacts(got.info.run_id, "model")) == weights


def test_a_hub_commit_is_a_tag_and_long_params_keep_to_mlflows_limit(mlflow_home, tmp_path, monkeypatch):
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    monkeypatch.chdir(mlflow_home)
    commit = "0123456789abcdef0123456789abcdef01234567"
    cfg = config.validate({"model": {"path": "org/tiny", "revision": commit}, "data": {"train": "t.jsonl",
                           "text_field": "x" * (MAX_PARAM_VAL_LENGTH + 100)}, "output_dir": str(tmp_path / "hub-run")})
    mlflow = tracking.MLflow.start(tmp_path, cfg, None)
    got = mlflow.client.get_run(mlflow.run_id)
    assert got.data.tags["model"] == "org/tiny" and got.data.tags["model.commit"] == commit
    assert got.data.params["model.revision"] == commit
    cut = got.data.params["data.text_field"]
    assert len(cut) == MAX_PARAM_VAL_LENGTH and cut.startswith("xxx") and cut.endswith("config.yaml has it whole)")


def test_a_resumed_run_continues_its_mlflow_and_wandb_runs_with_each_step_once(tiny_bert, data, mlflow_home,
                                                                                tmp_path, monkeypatch, capsys):
    """Stopped (Ctrl-C) at the evaluation of step 10, after MLflow got that step; the last checkpoint is step 9,
    so the resumed loop trains step 10 again and logs it again: MLflow keeps it once."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{mlflow_home / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "resumed")
    out = tmp_path / "stopped"
    cfg = config.load(None, _overrides(tiny_bert, {"train": data["train"]}, out, "train.max_steps=14",
                                       "train.eval_every=5", "train.checkpoint_every=1", "train.log_to=[mlflow,wandb]",
                                       "model.hidden_dropout=0", "model.attention_dropout=0"))

    def stop(record):
        if record["step"] == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipeline.train(cfg, on_eval=stop)
    client, before = _mlflow_run(out)
    assert before.info.status == "KILLED" and before.data.metrics["validation/accuracy"] is not None
    assert max(s for s, _ in _history(client, before)["train/loss"]) == 10
    assert not (out / "checkpoints" / "step-0000010").exists()  # step 10 is trained and logged again

    capsys.readouterr()
    resumed = tunelab.resume(out)
    assert "resumed from step-0000009" in capsys.readouterr().out
    client, after = _assert_mlflow_holds_the_run(resumed.dir)
    assert after.info.run_id == before.info.run_id
    assert [s for s, _ in _history(client, after)["train/loss"]] == list(range(1, 15))
    assert client.get_experiment(after.info.experiment_id).name == "resumed"
    assert not (tmp_path / "mlflow.db").exists()  # MLFLOW_TRACKING_URI, not the default, was used

    # W&B: the same run id, resumed; the second part starts after the checkpoint
    runs = sorted(tmp_path.glob("wandb/offline-run-*"))
    wandb_id = json.loads((out / tracking.STATE).read_text())["wandb"]["id"]
    assert len(runs) == 2 and all(r.name.endswith(wandb_id) or r.name.endswith(f"{wandb_id}-1") for r in runs)
    first, second = (_wandb(r) for r in runs)
    assert first["run"].run_id == second["run"].run_id == wandb_id
    assert [h["_step"] for h in first["history"]][-1] >= 9
    assert [h["_step"] for h in second["history"]] == list(range(10, 15))
    assert second["exit"].exit_code == 0 and first["exit"].exit_code != 0


def test_a_store_that_fails_mid_run_costs_the_run_nothing(tiny_bert, data, mlflow_home, tmp_path, monkeypatch,
                                                          capsys):
    """The store becomes unreachable after the evaluation of step 3 and comes back at step 6: one warning,
    training goes on, metrics.jsonl is complete, and the MLflow run catches up from it when the run finishes."""
    db = tmp_path / "mlflow.db"
    shutil.copy(mlflow_home / "mlflow.db", db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setattr(tracking, "FLUSH_SECONDS", 0)  # every record sent as it comes, so the failure is met
    out = tmp_path / "run"
    cfg = config.load(None, _overrides(tiny_bert, data, out, "train.max_steps=9", "train.eval_every=3",
                                       "train.log_to=[mlflow]"))

    def store(record):
        if record["step"] == 3:
            db.rename(tmp_path / "away.db")
            db.mkdir()  # SQLite cannot open a folder: every operation fails
        elif record["step"] == 6:
            got = MlflowClient(f"sqlite:///{tmp_path / 'away.db'}").get_run(
                json.loads((out / tracking.STATE).read_text())["mlflow"]["run_id"])
            assert max(m.step for m in MlflowClient(f"sqlite:///{tmp_path / 'away.db'}").get_metric_history(
                got.info.run_id, "train/loss")) == 3  # nothing after the failure reached it
            db.rmdir()
            (tmp_path / "away.db").rename(db)

    run = pipeline.train(cfg, on_eval=store)
    printed = capsys.readouterr().out
    assert printed.count("warning: MLflow stopped working") == 1, printed
    assert [r["step"] for r in _records(run.dir) if r["type"] == "train"] == list(range(1, 10))
    _assert_mlflow_holds_the_run(run.dir)


def test_a_multitask_run_logs_each_tasks_metrics(tiny_bert, mlflow_home, tmp_path, monkeypatch):
    monkeypatch.chdir(mlflow_home)
    rows = make_rows(160, seed=3)
    topic = [{"text": r["text"], "label": "film" if "film" in r["text"] else "other"} for r in rows]
    cfg = config.validate({
        "model": {"path": str(tiny_bert), "device": "cpu"}, "method": {"name": "lora"},
        "tasks": [{"name": "sentiment", "data": {"train": str(write_jsonl(tmp_path / "s.jsonl", rows))}},
                  {"name": "topic", "data": {"train": str(write_jsonl(tmp_path / "t.jsonl", topic))}}],
        "train": {"max_steps": 4, "batch_size": 8, "eval_every": 2, "log_every": 1, "log_to": ["mlflow"]},
        "eval": {"linear_probe": False, "samples": 0}, "output_dir": str(tmp_path / "multi")})
    run = pipeline.train(cfg)
    client, got = _assert_mlflow_holds_the_run(run.dir)
    assert {"validation/sentiment/accuracy", "validation/topic/accuracy"} <= set(got.data.metrics)
    assert got.data.tags["task"] == "multitask" and got.data.tags["tasks"] == "sentiment:classification, " \
                                                                              "topic:classification"
    assert "adapter" not in {a.path for a in client.list_artifacts(got.info.run_id)}  # log_artifacts is off


def test_a_grpo_run_logs_its_rewards(tiny_chat_llama, mlflow_home, tmp_path, monkeypatch):
    monkeypatch.chdir(mlflow_home)
    (tmp_path / "rewards.py").write_text("def share_of_o(prompts, completions):\n"
                                         "    return [c.count('o') / max(len(c), 1) for c in completions]\n")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say word {i}"} for i in range(8)])
    run = tunelab.train(None, [f"model.path={tiny_chat_llama}", f"data.train={prompts}", "task.type=grpo",
                               f"task.reward_function={tmp_path / 'rewards.py'}:share_of_o", "task.group_size=4",
                               "method.name=lora", "train.batch_size=2", "train.max_steps=2",
                               "eval.max_new_tokens=4", "data.val_fraction=0.25", "train.log_to=[mlflow]",
                               f"output_dir={tmp_path / 'rl'}"])
    _, got = _assert_mlflow_holds_the_run(run.dir)
    assert {"train/reward", "validation/reward"} <= set(got.data.metrics) and got.data.tags["task"] == "grpo"


def test_only_the_first_of_two_processes_logs(tiny_bert, data, mlflow_home, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{mlflow_home / 'mlflow.db'}", "MLFLOW_EXPERIMENT_NAME": "two-processes"}
    done = subprocess.run([sys.executable, "-m", "tunelab", "train", str(recipe), "--nproc", "2",
                           *_overrides(tiny_bert, {"train": data["train"]}, tmp_path / "two", "method.name=lora",
                                       "train.max_steps=4", "train.eval_every=2", "train.log_to=[mlflow]")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{mlflow_home / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("two-processes").experiment_id])
    assert len(runs) == 1
    _assert_mlflow_holds_the_run(tmp_path / "two")


# -- Weights & Biases -------------------------------------------------------------------------------------------------


def _wandb(run_folder: Path) -> dict:
    """An offline W&B run's log (run-<id>.wandb), read as W&B writes it: a header, then LevelDB-style log records
    in 32 KiB blocks (crc32, length, type: full, first, middle, last), each holding one wandb_internal Record.
    Read once W&B's service has shut down, as at the end of a process: until then it may still be writing."""
    import wandb
    from wandb.proto import wandb_internal_pb2

    wandb.teardown()
    data = next(run_folder.glob("run-*.wandb")).read_bytes()
    assert data[:7] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
    found = {"history": [], "files": [], "artifacts": []}
    pos, block, part = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            part = b""
            which = record.WhichOneof("record_type")
            if which == "history":
                found["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                         for i in record.history.item})
            elif which == "files":
                found["files"] += [f.path for f in record.files.files]
            elif which == "artifact":
                found["artifacts"].append(record.artifact)
            elif which in ("run", "exit"):
                found[which] = getattr(record, which)
    return found


def test_wandb_logs_offline_without_an_api_key(tiny_bert, data, tmp_path, capsys):
    run = tunelab.train(None, _overrides(tiny_bert, data, tmp_path / "sentiment", "train.max_steps=6",
                                         "train.eval_every=3", "train.log_to=[wandb]", "train.log_artifacts=true"))
    assert "W&B: no API key" in capsys.readouterr().out
    (folder,) = tmp_path.glob("wandb/offline-run-*")
    got = _wandb(folder)
    state = json.loads((run.dir / tracking.STATE).read_text())["wandb"]
    assert got["run"].run_id == state["id"] and got["run"].display_name == "sentiment"
    assert got["run"].project == "tunelab" and list(got["run"].tags) == ["classification", "full"]
    assert {i.key: json.loads(i.value_json) for i in got["run"].config.update if not i.key.startswith("_")} \
        == yaml.safe_load((run.dir / "config.yaml").read_text())
    # one history row per step, holding every number metrics.jsonl has at that step
    rows = {h["_step"]: {k: v for k, v in h.items() if not k.startswith("_")} for h in got["history"]}
    by_step = defaultdict(dict)
    for name, points in _expected(run.dir).items():
        for step, value in points:
            by_step[step][name] = value
    assert rows == dict(by_step)
    assert {f"tunelab/{n}" for n in ("summary.json", "config.yaml", "report.html", "metrics.jsonl")} <= set(got["files"])
    for name in ("summary.json", "metrics.jsonl"):
        assert (folder / "files" / "tunelab" / name).read_bytes() == (run.dir / name).read_bytes()
    (artifact,) = got["artifacts"]
    assert artifact.type == "model" and artifact.name == "sentiment-model"
    assert {e.path for e in artifact.manifest.contents} == {p.name for p in (run.dir / "model").iterdir()}
    assert got["exit"].exit_code == 0


def test_wandb_mode_is_the_users_or_offline_without_a_key(tmp_path, monkeypatch):
    assert tracking.wandb_mode() == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert tracking.wandb_mode() is None  # `wandb login` wrote a key: online, W&B's own default
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert tracking.wandb_mode() is None
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.wandb_mode() is None  # wandb.init reads WANDB_MODE itself


def test_wandb_mode_disabled_keeps_nothing(tmp_path, monkeypatch, capsys):
    from tunelab.training import logs

    monkeypatch.setenv("WANDB_MODE", "disabled")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text("{}")
    cfg = config.validate({"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "output_dir": str(run_dir),
                           "train": {"log_to": ["wandb"], "log_artifacts": True}})
    with logs.open_log(run_dir, cfg) as log:
        log({"type": "train", "step": 1, "loss": 0.5})
    logs.finish(run_dir, cfg)
    assert "warning" not in capsys.readouterr().out
    assert not (tmp_path / "wandb").exists()
    assert [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [
        {"type": "train", "step": 1, "loss": 0.5}]


# -- errors -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_a_tracker_that_is_not_installed_is_named_with_its_extra(tracker, tiny_bert, data, tmp_path, monkeypatch,
                                                                 cli_run):
    monkeypatch.setitem(sys.modules, tracker, None)  # what a machine without the package sees
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({}))
    res = cli_run("train", tmp_path / "recipe.yaml", *_overrides(tiny_bert, data, tmp_path / "run",
                                                                  f"train.log_to=[{tracker}]"))
    assert res.code == 2, res.err
    msg = res.err.strip()
    assert msg.startswith(f"error: train.log_to: '{tracker}' needs the {tracker} package") and "\n" not in msg
    assert f"pip install 'tunelab[{tracker}]'" in msg
    assert not (tmp_path / "run").exists()


def test_a_file_store_mlflow_refuses_is_refused_before_any_work(tiny_bert, data, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "./mlruns")
    with pytest.raises(tunelab.TunelabError, match=r"MLFLOW_TRACKING_URI='./mlruns' is a folder.*"
                                                   r"MLFLOW_ALLOW_FILE_STORE=true"):
        tunelab.train(None, _overrides(tiny_bert, data, tmp_path / "run", "train.log_to=[mlflow]"))
    assert not (tmp_path / "run").exists()
