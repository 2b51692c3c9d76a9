"""`tunelab ui`'s API through a real HTTP client against the app on a loopback port: run folders as the UI reads
them (a tiny trained run, hand-made failed and interrupted folders), the live event stream, path confinement,
the token, and runs launched, stopped, resumed and exported through it as `tunelab` subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import make_rows, write_jsonl
from test_serve import free_port

import tunelab
from tunelab import runs
from tunelab import ui as ui_pkg
from tunelab.errors import TunelabError
from tunelab.ui import app as ui_app


class Running:
    """The UI in a background thread of this process, on a free loopback port."""

    def __init__(self, workspace: Path, token: str | None = None, roots=()):
        self.url = f"http://127.0.0.1:{(port := free_port())}"
        self.server = ui_app.build(workspace, roots, port=port, token=token, log_config=None)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the UI never started"
            time.sleep(0.05)
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)


def marked(folder: Path, config: dict | None = None) -> Path:
    """A run folder as tunelab starts one: its marker and config.yaml."""
    folder.mkdir(parents=True)
    runs.write_marker(folder, "run")
    (folder / "config.yaml").write_text(yaml.safe_dump(config or {"task": {"type": "classification"},
                                                                  "method": {"name": "lora"}}))
    return folder


def recipe(model: Path, **train) -> dict:
    return {"model": {"path": str(model)}, "data": {"train": "data/train.jsonl"}, "method": {"name": "lora", "r": 4},
            "train": {"batch_size": 8, "log_every": 1, **train},
            "eval": {"base": False, "linear_probe": False, "samples": 0, "forgetting": "none"}}


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_bert) -> Path:
    """A workspace: data, a finished tiny run, a run that failed and one that stopped with a checkpoint, and a
    symlink that leads out of it."""
    root = tmp_path_factory.mktemp("ui")
    w = root / "workspace"
    (w / "data").mkdir(parents=True)
    write_jsonl(w / "data" / "train.jsonl", make_rows(120, seed=0))
    write_jsonl(w / "data" / "val.jsonl", make_rows(32, seed=1))
    tunelab.train(None, [f"model.path={tiny_bert}", f"data.train={w / 'data/train.jsonl'}",
                         f"data.validation={w / 'data/val.jsonl'}", "method.name=lora", "method.r=4",
                         "train.max_steps=4", "train.batch_size=8", "train.log_every=1", "eval.linear_probe=false",
                         "eval.samples=2", "eval.forgetting=none", f"output_dir={w / 'runs/done'}"])
    broken = marked(w / "runs" / "broken")
    (broken / "metrics.jsonl").write_text("")
    paused = marked(w / "runs" / "paused")
    (paused / "checkpoints" / "step-0000003").mkdir(parents=True)
    (paused / "checkpoints" / "step-0000003" / "manifest.json").write_text("{}")
    outside = marked(root / "outside" / "run")
    (w / "escape").symlink_to(outside, target_is_directory=True)
    (w / "escape-dir").symlink_to(root / "outside", target_is_directory=True)
    return w


@pytest.fixture
def shell_run(ws, tiny_bert):
    """A run started from a shell, not by the UI."""
    recipe_file = ws / "shell.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe(tiny_bert, max_steps=400)))
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(recipe_file), "output_dir=runs/shell"],
                            cwd=ws, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def ui(ws, tiny_bert):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ws)  # as `tunelab ui` runs: relative paths in recipes are the workspace's
        running = Running(ws, roots=[tiny_bert])  # the model's folder, as `tunelab ui --root` lets it read
        yield running
        running.stop()


def by_id(ui) -> dict[str, dict]:
    r = ui.client.get("/api/runs")
    assert r.status_code == 200
    return {x["id"]: x for x in r.json()["runs"]}


def test_lists_every_run_folder_with_its_status_and_metric(ui, ws):
    found = by_id(ui)
    assert ui.client.get("/api/runs").json()["workspace"] == str(ws.resolve())
    assert {k: v["status"] for k, v in found.items()} == {"runs/done": "finished", "runs/broken": "failed", "runs/paused": "interrupted"}
    done = found["runs/done"]
    assert (done["kind"], done["task"], done["method"], done["name"]) == ("run", "classification", "lora", "done")
    summary = json.loads((ws / "runs/done/summary.json").read_text())
    assert done["metric"] == {"name": "accuracy", "split": "validation", "base": summary["base"]["validation"]["accuracy"],
                              "tuned": summary["eval"]["accuracy"], "greater_is_better": True}
    assert (done["step"], done["total_steps"]) == (4, 4) and done["size_mb"] > 0 and done["started"]
    assert done["duration_s"] == round(summary["wall_seconds"], 1)


def test_a_run_in_full(ui, ws):
    d = ui.client.get("/api/runs/runs/done").json()
    summary = json.loads((ws / "runs/done/summary.json").read_text())
    assert d["summary"] == summary and d["config"]["method"]["name"] == "lora"
    assert d["recipe_yaml"] == (ws / "runs/done/config.yaml").read_text()
    assert d["results"] == {"base": summary["base"], "probe": None, "tuned": {"validation": summary["eval"]}}
    assert d["data_report"]["files"]["train"].endswith("train.jsonl") and len(d["samples"]["before"]) == 2
    assert d["progress"]["step"] == 4 and d["progress"]["total"] == 4 and d["progress"]["eta_s"] == 0
    assert d["exports"] == ["peft", "tunelab", "merged"] and d["playground"] == "predict"
    assert d["has_report"] and not d["resumable"] and d["log_tail"] is None
    assert ui.client.get("/api/runs/runs/paused").json()["resumable"] is True

    report = ui.client.get("/api/runs/runs/done/report")
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
    recipe = ui.client.get("/api/runs/runs/done/recipe.yaml")
    assert recipe.status_code == 200 and "attachment" in recipe.headers["content-disposition"]
    assert yaml.safe_load(recipe.text)["output_dir"] == str((ws / "runs/done").resolve())

    missing = ui.client.get("/api/runs/runs/broken/report")
    assert missing.status_code == 404 and "no report.html" in missing.json()["error"]["message"]
    unknown = ui.client.get("/api/runs/runs/nothing-here")
    assert unknown.status_code == 404 and unknown.json()["error"]["message"].startswith("No run 'runs/nothing-here'")


@pytest.mark.parametrize("path", ["../", "/etc", "escape-dir", "data/../../"])
def test_paths_outside_the_workspace_are_refused(ui, path):
    r = ui.client.get("/api/files", params={"dir": path})
    assert r.status_code == 403, r.text
    error = r.json()["error"]
    assert error["field"] == "dir" and "outside the folders this UI may use" in error["message"] and "--root" in \
        error["message"]


def test_the_file_picker_and_run_ids_stay_inside(ui, ws):
    listing = ui.client.get("/api/files", params={"dir": "data"}).json()
    assert listing["dir"] == "data"
    assert [(e["name"], e["path"], e["is_dir"]) for e in listing["entries"]] == [
        ("train.jsonl", "data/train.jsonl", False), ("val.jsonl", "data/val.jsonl", False)]
    assert listing["entries"][0]["size"] == (ws / "data/train.jsonl").stat().st_size
    assert ui.client.get("/api/runs/escape").status_code == 403  # a run folder reached through a link out
    launch = ui.client.post("/api/runs", json={"yaml": "{}", "output_dir": "../elsewhere"})
    assert launch.status_code == 403 and launch.json()["error"]["field"] == "output_dir"


def test_roots_let_the_picker_read_another_folder(ws):
    outside = ws.parent / "outside"
    running = Running(ws, roots=[outside])
    try:
        listing = running.client.get("/api/files", params={"dir": str(outside)}).json()
        assert [e["name"] for e in listing["entries"]] == ["run"]
        assert running.client.get("/api/files", params={"dir": "/etc"}).status_code == 403
    finally:
        running.stop()


def events(lines, until) -> list[tuple[str, str | None, str]]:
    """(event, id, data) of each event of an SSE response (`lines`: its iter_lines()) until `until(events so far)`
    says stop."""
    got, event, eid, data = [], None, None, []
    for line in lines:
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("id: "):
            eid = line[4:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line == "" and event:
            got.append((event, eid, "\n".join(data)))
            event, eid, data = None, None, []
            if until(got):
                break
    return got


def test_events_tail_the_metrics_and_resume_from_last_event_id(ui, ws):
    live = marked(ws / "runs" / "live")
    log = live / "metrics.jsonl"
    # the loop started 1000 s ago and has done 1 step of 10 since: 9 more take about 9000 s
    lines = [json.dumps({"type": "steps", "total": 10, "from_step": 0, "time": time.time() - 1000}),
             json.dumps({"type": "train", "step": 1, "loss": 0.9})]
    log.write_text("".join(x + "\n" for x in lines))
    fd = runs.lock(live, "train")  # as a training process holds it: the run is running
    try:
        with ui.client.stream("GET", "/api/runs/runs/live/events") as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            stream = r.iter_lines()
            got = events(stream, lambda g: any(e == "status" for e, _, _ in g))
            metrics = [(eid, data) for e, eid, data in got if e == "metric"]
            assert metrics == [(str(len(lines[0]) + 1), lines[0]), (str(log.stat().st_size), lines[1])]
            status = json.loads(next(data for e, _, data in got if e == "status"))
            assert {k: status[k] for k in ("status", "step", "total")} == {"status": "running", "step": 1, "total": 10}
            assert 9000 <= status["eta_s"] <= 9 * 1100  # the pace since the loop's start; this test's own time aside
            third = json.dumps({"type": "train", "step": 2, "loss": 0.8})
            with open(log, "a") as f:
                f.write(third + "\n")
            more = events(stream, lambda g: any(e == "metric" for e, _, _ in g) and any(e == "status" for e, _, _ in g))
            assert ("metric", str(log.stat().st_size), third) in more
            assert json.loads(next(d for e, _, d in more if e == "status"))["step"] == 2

        second = metrics[1][0]
        with ui.client.stream("GET", "/api/runs/runs/live/events", headers={"Last-Event-ID": second}) as r:
            got = events(r.iter_lines(), lambda g: any(e == "status" for e, _, _ in g))
            assert [(e, d) for e, _, d in got if e == "metric"] == [("metric", third)]  # only what came after
            assert json.loads(next(d for e, _, d in got if e == "status"))["total"] == 10  # found further up
    finally:
        runs.unlock(fd)
    with ui.client.stream("GET", "/api/runs/runs/live/events", headers={"Last-Event-ID": str(log.stat().st_size)}) as r:
        got = events(r.iter_lines(), lambda g: any(e == "end" for e, _, _ in g))
    assert [e for e, _, _ in got] == ["status", "end"] and json.loads(got[0][2])["status"] == "failed"
    bad = ui.client.get("/api/runs/runs/live/events", headers={"Last-Event-ID": "abc"})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "Last-Event-ID"


def test_a_log_cut_back_by_a_resume_is_read_again_from_its_top(ui, ws):
    """A resumed run cuts metrics.jsonl back to its checkpoint's size and writes on; by the next read the file may be
    longer than the offset again. The stream says `reset` and sends the log's lines again, none cut in two."""
    live = marked(ws / "runs" / "rewound")
    log = live / "metrics.jsonl"
    first = [json.dumps({"type": "train", "step": s, "loss": 1.0 - s / 10}) for s in (1, 2, 3)]
    log.write_text("".join(x + "\n" for x in first))
    fd = runs.lock(live, "train")
    try:
        with ui.client.stream("GET", "/api/runs/runs/rewound/events") as r:
            stream = r.iter_lines()
            got = events(stream, lambda g: sum(e == "metric" for e, _, _ in g) == 3)
            assert [d for e, _, d in got if e == "metric"] == first
            # resumed from step 1's checkpoint: cut after the first line, then steps 2-4 trained again (longer lines)
            again = [json.dumps({"type": "train", "step": s, "loss": 0.5 - s / 100, "grad_norm": 0.25}) for s in (2, 3, 4)]
            with open(log, "r+") as f:
                f.truncate(len(first[0]) + 1)
                f.seek(0, 2)
                f.write("".join(x + "\n" for x in again))
            more = events(stream, lambda g: sum(e == "metric" for e, _, _ in g) == 4)
    finally:
        runs.unlock(fd)
    assert [e for e, _, _ in more if e != "status"][0] == "reset"
    assert [d for e, _, d in more if e == "metric"] == [first[0], *again]
    assert int([i for e, i, _ in more if e == "metric"][-1]) == log.stat().st_size


def test_the_token_is_needed_on_every_request(ws):
    running = Running(ws, token="s3cret")
    try:
        c = running.client
        r = c.get("/api/runs")
        assert r.status_code == 401 and "token" in r.json()["error"]["message"]
        assert c.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/?token=wrong").status_code == 401
        link = c.get("/?token=s3cret")
        assert link.status_code == 303 and link.headers["location"] == "/"
        cookie = link.headers["set-cookie"].lower()
        assert "tunelab_ui_token=s3cret" in cookie and "httponly" in cookie and "samesite=strict" in cookie
        c.cookies.set("tunelab_ui_token", "s3cret")
        assert c.get("/api/runs").status_code == 200
    finally:
        running.stop()


def test_a_non_loopback_host_needs_a_token(cli_run, monkeypatch, ws):
    monkeypatch.delenv("TUNELAB_UI_TOKEN", raising=False)
    r = cli_run("ui", "--workspace", ws, "--host", "0.0.0.0")
    assert r.code == 2, r.err
    assert r.err.startswith("error: --host 0.0.0.0 would let other machines reach the UI") and "--token" in r.err
    assert "Traceback" not in r.err and r.err.count("\n") == 1


def test_bad_recipes_are_refused_naming_the_field(ui, ws, tiny_bert):
    r = ui.client.post("/api/runs", json={"yaml": yaml.safe_dump(recipe(tiny_bert, lrr=0.1))})
    assert r.status_code == 400 and r.json()["error"]["field"] == "train.lrr"
    assert "did you mean 'train.lr'" in r.json()["error"]["message"]
    r = ui.client.post("/api/runs", json={"yaml": "train: [1\n"})
    assert r.status_code == 400 and "not valid YAML" in r.json()["error"]["message"]
    r = ui.client.post("/api/runs", json={"yaml": yaml.safe_dump(recipe(tiny_bert)), "output_dir": "runs/done"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "output_dir"
    assert "already exists and is not empty" in r.json()["error"]["message"]
    outside = recipe(tiny_bert)
    outside["data"]["train"] = str(ws.parent / "elsewhere.jsonl")
    r = ui.client.post("/api/runs", json={"yaml": yaml.safe_dump(outside), "output_dir": "runs/outside"})
    assert r.status_code == 403 and r.json()["error"]["field"] == "data.train"
    assert "--root" in r.json()["error"]["message"] and not (ws / "runs/outside").exists()
    r = ui.client.post("/api/runs", json={"yml": "{}"})
    assert r.status_code == 400 and r.json()["error"]["field"] in ("yaml", "yml")


def test_finished_runs_export_and_refuse_stop_and_resume(ui, ws):
    r = ui.client.post("/api/runs/runs/done/export", json={"format": "peft"})
    assert r.status_code == 201, r.text
    assert r.json() == {"path": "exports/done-peft"}
    assert (ws / "exports/done-peft/adapter_config.json").is_file()
    r = ui.client.post("/api/runs/runs/done/export", json={"format": "gguf"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "format"
    assert ui.client.post("/api/runs/runs/done/stop").status_code == 409
    assert ui.client.post("/api/runs/runs/done/resume").status_code == 409
    assert ui.client.post("/api/runs/runs/broken/resume").status_code == 409


def wait_for(ui, rid: str, check, what: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = ui.client.get(f"/api/runs/{rid}")  # 404 until its folder exists, for a run started from a shell
        d = r.json()
        if r.status_code == 200 and check(d):
            return d
        assert time.monotonic() < deadline, f"{rid} never {what}: {d.get('status')}, log:\n{d.get('log_tail')}"
        time.sleep(0.1)


def test_launch_watch_stop_resume(ui, ws, tiny_bert, shell_run):
    """A run launched through the UI is watched, stopped, resumed to the end. Beside it (their processes load at
    the same time): a run started from a shell is stopped through its lock, and a launch that fails before its
    folder exists (its data file is missing) shows as failed, with its log."""
    bad = recipe(tiny_bert, max_steps=2)
    bad["data"]["train"] = "data/missing.jsonl"
    assert ui.client.post("/api/runs", json={"yaml": yaml.safe_dump(bad), "output_dir": "runs/no-data"}).status_code == 201

    text = yaml.safe_dump(recipe(tiny_bert, max_steps=150))
    r = ui.client.post("/api/runs", json={"yaml": text, "output_dir": "runs/launched"})
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    assert rid == "runs/launched"
    # the recipe stays: written in the workspace, named by the run
    assert (ws / ".tunelab-ui/recipes/launched.yaml").read_text() == text
    d = wait_for(ui, rid, lambda d: d["status"] == "running" and (d["progress"]["step"] or 0) >= 2, "trained")
    assert d["progress"]["total"] == 150 and d["log_tail"].startswith("$ tunelab train")
    assert by_id(ui)[rid]["status"] == "running"

    # A UI started afresh on the workspace (as after a restart) knows the run from disk: its log, and how to stop it.
    fresh = Running(ws, roots=[tiny_bert])
    try:
        d = wait_for(fresh, rid, lambda d: d["status"] == "running", "seen by a fresh UI")
        # its log's last lines: the command line, or, once the log outgrows the tail, the steps logged since
        assert d["log_tail"] and ("$ tunelab train" in d["log_tail"] or "step " in d["log_tail"]), d["log_tail"]
        assert fresh.client.post(f"/api/runs/{rid}/stop").json() == {"status": "stopping"}
    finally:
        fresh.stop()
    d = wait_for(ui, rid, lambda d: d["status"] != "running", "stopped")
    assert d["status"] == "interrupted" and d["resumable"], d["log_tail"]
    assert f"tunelab train --resume {ws / rid}" in d["log_tail"]

    d = wait_for(ui, "runs/shell", lambda d: d["status"] == "running" and (d["progress"]["step"] or 0) >= 2, "trained")
    assert d["log_tail"] is None and d["progress"]["total"] == 400  # not the UI's: no log of its own
    assert ui.client.post("/api/runs/runs/shell/stop").status_code == 202
    assert shell_run.wait(timeout=120) == 130, shell_run.stderr.read().decode()[-2000:]
    d = wait_for(ui, "runs/shell", lambda d: d["status"] != "running", "stopped")
    assert d["status"] == "interrupted" and d["resumable"]
    assert ui.client.post("/api/runs/runs/shell/stop").status_code == 409  # nothing left to stop

    r = ui.client.post(f"/api/runs/{rid}/resume")
    assert r.status_code == 202 and r.json() == {"id": rid}
    d = wait_for(ui, rid, lambda d: d["status"] not in ("running", "interrupted"), "finished")
    assert d["status"] == "finished", d["log_tail"]
    assert d["summary"]["steps"] == 150 and d["exports"] and not d["resumable"]
    assert os.path.exists(ws / rid / "summary.json")

    d = wait_for(ui, "runs/no-data", lambda d: d["status"] != "running", "ended")
    assert d["status"] == "failed" and "missing.jsonl" in d["log_tail"] and not (ws / "runs/no-data").exists()
    assert by_id(ui)["runs/no-data"]["status"] == "failed"


def test_the_page_is_served_and_a_missing_one_is_said_plainly(ui, ws, monkeypatch, tmp_path):
    page = ui.client.get("/")
    if (ui_app.STATIC / "index.html").is_file():
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    monkeypatch.setattr(ui_app, "STATIC", tmp_path / "no-static")
    missing = ui.client.get("/")
    assert missing.status_code == 500 and "reinstall tunelab" in missing.text


def test_a_report_linked_out_of_the_workspace_is_refused(ui, ws):
    linked = marked(ws / "runs" / "linked")
    (ws.parent / "secret.html").write_text("<p>not for the UI</p>")
    (linked / "report.html").symlink_to(ws.parent / "secret.html")
    r = ui.client.get("/api/runs/runs/linked/report")
    assert r.status_code == 403 and "not for the UI" not in r.text


def test_without_uvicorn_the_ui_names_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed: importing it fails
    with pytest.raises(TunelabError, match=r"`tunelab ui` needs FastAPI and uvicorn, and uvicorn is not installed.*"
                                           r"pip install 'tunelab\[ui\]'"):
        ui_pkg.check_installed()
