"""`tunelab ui`'s planning, comparison and playground API (ui/plan.py, ui/playground.py) through HTTP, on tiny runs
trained here: the schema has every key with explain's description and the choices, recipes are listed, validation
names the key at fault with the CLI's message, advise answers per method, two runs compare, the playground's chat
streams what `tunelab generate` writes (tuned, and base both as adapters switched off and as model.path loaded apart)
and predict answers what `tunelab predict` prints."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make_chat_rows, make_rows, tol, write_jsonl
from fastapi.testclient import TestClient

import tunelab
from tunelab import config, methods
from tunelab.config import METHOD_NAMES, TASK_TYPES
from tunelab.config.sections import TrainConfig
from tunelab.errors import TunelabError
from tunelab.predict import TunedModel
from tunelab.ui import app as ui_app
from tunelab.ui import plan, playground

QUICK = ["eval.base=false", "eval.forgetting=none", "eval.samples=0", "eval.linear_probe=false", "data.dedupe=false"]
CHAT = [{"role": "user", "content": "What is the opposite of hot?"}]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_chat_llama, tiny_bert) -> dict:
    """A workspace with its data, a recipe, and six tiny runs: sft, classification and embedding, each with LoRA and
    in full."""
    root = tmp_path_factory.mktemp("workspace")
    chat = write_jsonl(root / "chat.jsonl", make_chat_rows(64, seed=3))
    labelled = write_jsonl(root / "labelled.jsonl", make_rows(64, seed=0))
    pairs = write_jsonl(root / "pairs.jsonl", [{"anchor": r["text"], "positive": r["text"]} for r in make_rows(24)])
    sft = [f"model.path={tiny_chat_llama}", f"data.train={chat}", "task.type=sft", "data.max_length=64",
           "train.batch_size=8", "train.lr=1e-2", "train.max_steps=6", *QUICK]
    clf = [f"model.path={tiny_bert}", f"data.train={labelled}", "train.max_steps=2", *QUICK]
    emb = [f"model.path={tiny_bert}", f"data.train={pairs}", "task.type=embedding", "train.max_steps=2", *QUICK]
    plans = {"sft-lora": [*sft, "method.name=lora", "method.target_modules=all-linear"],
             "sft-full": [*sft, "method.name=full", "train.max_steps=2"],
             "clf-lora": [*clf, "method.name=lora", "train.lr=1e-2"],
             "clf-full": [*clf, "method.name=full"],
             "emb-lora": [*emb, "method.name=lora", "train.lr=5e-2"],
             "emb-full": [*emb, "method.name=full", "train.lr=1e-2"]}
    runs = {name: tunelab.train(None, [*o, f"output_dir={root / 'runs' / name}"]).dir for name, o in plans.items()}
    recipe = {"model": {"path": str(tiny_bert)}, "data": {"train": "labelled.jsonl", "max_length": 32},
              "method": {"name": "lora", "r": 4}, "train": {"batch_size": 8, "max_steps": 1}}
    (root / "my-recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return {"root": root, "runs": runs, "recipe": recipe, "models": [tiny_chat_llama.parent, tiny_bert.parent]}


@pytest.fixture(scope="module")
def client(ws):
    app = ui_app.create_app(ws["root"], roots=ws["models"])
    with TestClient(app) as c:
        c.app_ref = app
        yield c


def rid(ws, name: str) -> str:
    return f"runs/{name}"


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


# -- schema, recipes, validation, advise ----------------------------------------------------------------------------

def test_schema_has_every_key_with_explain_description_and_choices(client):
    sections = client.get("/api/schema").json()["sections"]
    names = [s["name"] for s in sections]
    assert names[:7] == ["model", "data", "task", "method", "train", "eval", "multitask"]
    fields = {f["key"]: f for s in sections for f in s["fields"]}
    lr = fields["train.lr"]
    assert lr["type"] == "float" and lr["default"] == 2e-5 and lr["description"] == \
        TrainConfig.model_fields["lr"].description
    assert fields["train.scheduler"]["choices"] == ["linear", "cosine", "constant", "inverse_sqrt"]
    assert fields["train.max_steps"]["type"] == "int | null" and fields["train.max_steps"]["default"] is None
    assert fields["model.path"]["required"] and fields["model.path"]["default"] is None
    assert fields["method.name"]["choices"] == list(METHOD_NAMES) and fields["method.name"]["default"] == "full"
    assert fields["method.init"]["default"] == "default" and fields["method.init"]["defaults"] == {"prompt": "random"}
    assert fields["task.type"]["choices"] == list(TASK_TYPES)
    assert "Low-rank" in fields["method.name"]["choice_descriptions"]["lora"] or \
        "LoRA" in fields["method.name"]["choice_descriptions"]["lora"]
    assert fields["method.r"]["applies_to"]["key"] == "method.name"
    assert {"lora", "dora", "qlora"} <= set(fields["method.r"]["applies_to"]["values"])
    assert fields["task.beta"]["applies_to"]["values"] == ["dpo", "grpo"]
    assert fields["data.augment_ops"]["choices"] == ["delete", "swap", "insert", "synonym"]
    # every key `tunelab config explain` lists is in the schema, with the description it prints
    for line in config.explain().splitlines():
        key = line.split()[0].removesuffix(",")
        if key not in ("tasks[].task",) and " = " not in line[:34]:
            assert key in fields, key
            f = fields[key]
            member = line.split("(")[1].split(")")[0] if f["applies_to"] else None
            assert f["description"] and f.get("descriptions", {}).get(member, f["description"]) in line, key


def test_recipes_lists_workspace_and_shipped_recipes(client, ws, tmp_path):
    elsewhere = tmp_path / "elsewhere.yaml"
    elsewhere.write_text(yaml.safe_dump(ws["recipe"]), encoding="utf-8")
    (ws["root"] / "linked.yaml").symlink_to(elsewhere)  # a link out of the workspace is not followed
    recipes = {r["name"]: r for r in client.get("/api/recipes").json()["recipes"]}
    assert "linked.yaml" not in recipes and error_of(client.get("/api/recipes/linked.yaml"), 404)
    mine = recipes["my-recipe.yaml"]
    assert (mine["task"], mine["method"], mine["source"]) == ("classification", "lora", "workspace")
    got = client.get("/api/recipes/my-recipe.yaml").json()
    assert yaml.safe_load(got["yaml"]) == ws["recipe"] and got["config"]["method"]["r"] == 4
    if plan.shipped_dir() is not None:  # a source checkout: configs/ beside src/
        shipped = recipes["shipped/classification/minilm-lora.yaml"]
        assert (shipped["task"], shipped["method"], shipped["source"]) == ("classification", "lora", "shipped")
        assert "minilm" in client.get("/api/recipes/shipped/classification/minilm-lora.yaml").json()["yaml"]
    assert error_of(client.get("/api/recipes/nope.yaml"), 404)["field"] == "name"
    # the folders of runs are no recipes: their config.yaml is not offered
    assert not any("runs/" in name for name in recipes)


def cli_message(tmp_path: Path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(TunelabError) as e:
        config.load(path)
    return str(e.value).replace(str(path), "recipe.yaml")


def test_validate_names_the_field_with_the_cli_message(client, ws, tmp_path):
    good = yaml.safe_dump(ws["recipe"])
    r = client.post("/api/validate", json={"yaml": good}).json()
    assert r["ok"] and r["config"]["train"]["max_steps"] == 1 and r["config"]["method"]["alpha"] == 16

    one = yaml.safe_dump({**ws["recipe"], "train": {"lr": -1}})
    r = client.post("/api/validate", json={"yaml": one}).json()
    assert not r["ok"] and r["errors"] == [{"field": "train.lr", "message": cli_message(tmp_path, one)}]

    # two bad keys: one message each, each naming its own key as the CLI's paragraph does
    two = yaml.safe_dump({**ws["recipe"], "train": {"learning_rate": 1e-3}, "method": {"name": "lora", "r": "x"}})
    r = client.post("/api/validate", json={"yaml": two}).json()
    assert [e["field"] for e in r["errors"]] == ["method.r", "train.learning_rate"] or \
        [e["field"] for e in r["errors"]] == ["train.learning_rate", "method.r"]
    cli = cli_message(tmp_path, two)
    for e in r["errors"]:
        core = e["message"].split(": ", 1)[1].split(" — fix these keys")[0]
        assert core in cli and f"'{e['field']}'" in core
    assert "did you mean 'train.lr'" in next(e for e in r["errors"] if e["field"] == "train.learning_rate")["message"]

    # a rule between sections, and a method name that does not exist
    rule = yaml.safe_dump({**ws["recipe"], "data": {"train": "labelled.jsonl", "packing": True}})
    r = client.post("/api/validate", json={"yaml": rule}).json()
    assert r["errors"] == [{"field": "data.packing", "message": cli_message(tmp_path, rule)}]
    bad_method = yaml.safe_dump({**ws["recipe"], "method": {"name": "lorax"}})
    assert client.post("/api/validate", json={"yaml": bad_method}).json()["errors"][0]["field"] == "method.name"
    # the files a recipe reads must be there, inside the workspace or a --root folder
    missing = yaml.safe_dump({**ws["recipe"], "data": {"train": "nope.jsonl"}, "model": {"path": "/usr/lib"},
                              "output_dir": "../elsewhere"})
    r = client.post("/api/validate", json={"yaml": missing}).json()
    assert not r["ok"] and [e["field"] for e in r["errors"]] == ["model.path", "data.train", "output_dir"]
    assert "outside the folders this UI may use" in r["errors"][0]["message"]
    assert "'nope.jsonl' does not exist" in r["errors"][1]["message"] and r["config"]["data"]["train"] == "nope.jsonl"
    # YAML that does not parse: the CLI's message, about no key
    broken = "model: {path: x\ndata: ["
    r = client.post("/api/validate", json={"yaml": broken}).json()
    assert r["errors"] == [{"field": None, "message": cli_message(tmp_path, broken)}]
    assert "recipe.yaml" in r["errors"][0]["message"] and str(ws["root"]) not in r["errors"][0]["message"]
    assert error_of(client.post("/api/validate", json={"text": good}), 400)["field"] == "yaml"
    assert error_of(client.post("/api/validate", json={"yaml": good, "text": ""}), 400)["field"] == "text"
    assert not list((ws["root"] / ".tunelab-ui").glob("check-*"))  # its temporary files are gone


def test_advise_answers_per_method(client, ws):
    r = client.post("/api/advise", json={"yaml": yaml.safe_dump(ws["recipe"])})
    assert r.status_code == 200, r.text
    out = r.json()
    rows = {row["method"]: row for row in out["rows"]}
    assert set(rows) >= {"full", "lora", "bitfit"} and out["machine_memory"] > 0
    assert rows["lora"]["chosen"] and rows["lora"]["applicable"] and rows["lora"]["fits"]
    assert 0 < rows["lora"]["peak_bytes_checkpointing"] <= rows["lora"]["peak_bytes"]
    assert rows["lora"]["trainable_params"] < rows["full"]["trainable_params"] == rows["full"]["total_params"]
    assert out["recommended"] == [r["method"] for r in out["recommendations"]] and out["recommended"][0] in rows
    assert all(r["reason"] for r in out["recommendations"]) and (out["seq_len"], out["batch"]) == (32, 8)
    assert out["text"].startswith("Training memory for")  # what `tunelab advise` prints
    # time: the workspace's LoRA classifier on this model measured a step; scaled to this recipe's tokens a step
    s = json.loads((ws["runs"]["clf-lora"] / "summary.json").read_text())
    step_s = s["train_seconds"] / s["steps"] * (8 * 32) / (16 * 128)  # that run: batch 16 x 128 tokens
    assert rows["lora"]["time"]["step_s"] == pytest.approx(step_s) and rows["lora"]["time"]["seconds"] == \
        pytest.approx(step_s)  # train.max_steps=1
    assert "runs/clf-lora" in rows["lora"]["time"]["basis"] and rows["ia3"]["time"] is None
    # without max_steps: 2 epochs over labelled.jsonl's 64 rows less the 10 % held out, 8 a step
    epochs = {**ws["recipe"], "train": {"batch_size": 8, "epochs": 2}}
    timed = client.post("/api/advise", json={"yaml": yaml.safe_dump(epochs)}).json()
    assert next(r for r in timed["rows"] if r["method"] == "lora")["time"]["steps"] == 2 * 8 and timed["time_note"]
    # the model must lie in the workspace or a root the UI was started with
    outside = yaml.safe_dump({**ws["recipe"], "model": {"path": "/usr/lib"}})
    assert error_of(client.post("/api/advise", json={"yaml": outside}), 403)["field"] == "model.path"
    embedding = yaml.safe_dump({**ws["recipe"], "task": {"type": "embedding"}})
    assert error_of(client.post("/api/advise", json={"yaml": embedding}), 400)["field"] == "task.type"


# -- compare ---------------------------------------------------------------------------------------------------------

def test_compare_two_runs(client, ws):
    ids = [rid(ws, "clf-lora"), rid(ws, "clf-full")]
    out = client.post("/api/compare", json={"ids": ids}).json()
    rows = {r["method"]: r for r in out["rows"]}
    assert [r["id"] for r in out["rows"]] == ids and set(rows) == {"lora", "full"}
    for name, r in rows.items():
        s = json.loads((ws["runs"][f"clf-{name}"] / "summary.json").read_text())
        assert r["status"] == "ok" and r["metric"]["name"] == "accuracy" and r["metric"]["split"] == "validation"
        assert r["metric"]["tuned"] == s["eval"]["accuracy"] and r["metric"]["greater_is_better"]
        assert (r["trainable_pct"], r["peak_memory_mb"], r["time_s"]) == (s["trainable_percent"], s["peak_memory_mb"],
                                                                          s["train_seconds"])
    assert rows["lora"]["trainable_pct"] < rows["full"]["trainable_pct"] == 100
    plots = {p["name"]: p for p in out["plots"]}
    assert set(plots) == {"trainable_pct", "peak_memory_mb", "time_s", "latency_ms", "forgetting_change"}
    assert {(p["method"], p["x"]) for p in plots["trainable_pct"]["points"]} == \
        {(m, r["trainable_pct"]) for m, r in rows.items()}
    assert plots["latency_ms"]["points"] == []  # plain runs measure no latency; a compare folder does
    assert [c["key"] for c in out["columns"]][:2] == ["method", "metric"]
    # an unfinished or unknown folder, and one outside the workspace
    assert error_of(client.post("/api/compare", json={"ids": ["runs/nope"]}), 404)
    assert error_of(client.post("/api/compare", json={"ids": ["../.."]}), 403)
    assert error_of(client.post("/api/compare", json={"ids": []}), 400)["field"] == "ids"


def test_compare_launch_refuses_bad_requests(client, ws):
    text = yaml.safe_dump(ws["recipe"])
    e = error_of(client.post("/api/compare/launch", json={"yaml": text, "methods": ["lora", "lorra"]}), 400)
    assert e["field"] == "methods" and "did you mean lora" in e["message"]
    e = error_of(client.post("/api/compare/launch", json={"yaml": text, "methods": ["lora"],
                                                         "output_dir": "runs/clf-lora"}), 400)
    assert e["field"] == "output_dir" and "already exists" in e["message"]
    e = error_of(client.post("/api/compare/launch", json={"yaml": "train: {lr: -1}", "methods": ["lora"]}), 400)
    assert e["field"] == "model"  # the first of the recipe's errors: model is required


def test_compare_launch_runs_tunelab_compare(client, ws):
    recipe = {**ws["recipe"], "eval": {"linear_probe": False, "samples": 0}}
    r = client.post("/api/compare/launch", json={"yaml": yaml.safe_dump(recipe), "methods": ["lora", "bitfit"],
                                                 "steps": 1, "output_dir": "runs/cmp"})
    assert r.status_code == 201, r.text
    assert r.json() == {"id": "runs/cmp"}
    jobs, out = client.app_ref.state.ui.jobs, ws["root"] / "runs" / "cmp"
    deadline = time.monotonic() + 300
    while jobs.alive(out) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (out / "compare.json").is_file(), jobs.log_tail(out)
    assert yaml.safe_load(Path(jobs.record(out)["recipe"]).read_text()) == recipe  # the recipe, kept in .tunelab-ui/
    # the folder's own table: one row per method, each with its run's id and the latency compare measured
    measured = json.loads((out / "compare.json").read_text())
    rows = client.post("/api/compare", json={"ids": ["runs/cmp"]}).json()["rows"]
    assert [(r["id"], r["method"]) for r in rows] == [("runs/cmp/runs/lora", "lora"), ("runs/cmp/runs/bitfit", "bitfit")]
    for row, m in zip(rows, measured):
        assert (row["metric"]["tuned"], row["metric"]["base"], row["latency_ms"], row["steps"]) == \
            (m["tuned"], m["base"], m["latency_ms"], 1)
    # and a run of it compares like any other run
    single = client.post("/api/compare", json={"ids": ["runs/cmp/runs/lora"]}).json()["rows"][0]
    assert single["metric"]["tuned"] == rows[0]["metric"]["tuned"] and single["trainable_pct"] == rows[0]["trainable_pct"]


# -- playground ------------------------------------------------------------------------------------------------------

def chat(client, run: str, side: str, messages=CHAT) -> tuple[str, list[tuple[str, dict]]]:
    events = []
    with client.stream("POST", f"/api/playground/{run}/chat",
                       json={"messages": messages, "model": side, "max_tokens": NEW_TOKENS}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[len("data: "):])))
    assert events[-1][0] == "end" and events[-1][1]["finish_reason"] in ("stop", "length")
    assert all(kind == "delta" for kind, _ in events[:-1])
    return "".join(data["text"] for _, data in events[:-1]), events


def test_chat_streams_what_generate_writes(client, ws, tiny_chat_llama):
    base_reply = TunedModel.from_model_dir(tiny_chat_llama).generate(CHAT, max_new_tokens=NEW_TOKENS)[0]
    for name in ("sft-lora", "sft-full"):
        tuned_reply = tunelab.load(ws["runs"][name]).generate(CHAT, max_new_tokens=NEW_TOKENS)[0]
        text, events = chat(client, rid(ws, name), "tuned")
        assert text == tuned_reply and len(events) > 2, name  # streamed in pieces
        # the base: LoRA's adapters switched off, the full fine-tune's model.path loaded on its own
        assert chat(client, rid(ws, name), "base")[0] == base_reply, name
        assert tuned_reply != base_reply, name  # training changed the replies: the test tells the two apart
    # both sides at once, as the page asks them: each still its own model's reply
    with ThreadPoolExecutor(4) as pool:
        sides = list(pool.map(lambda side: chat(client, rid(ws, "sft-lora"), side)[0], ["tuned", "base"] * 2))
    assert sides == [tunelab.load(ws["runs"]["sft-lora"]).generate(CHAT, max_new_tokens=NEW_TOKENS)[0], base_reply] * 2
    # a conversation, and mistakes in it
    turns = [*CHAT, {"role": "assistant", "content": "Cold."}, {"role": "user", "content": "And of big?"}]
    assert chat(client, rid(ws, "sft-lora"), "tuned", turns)[0] == \
        tunelab.load(ws["runs"]["sft-lora"]).generate(turns, max_new_tokens=NEW_TOKENS)[0]
    e = error_of(client.post(f"/api/playground/{rid(ws, 'sft-lora')}/chat",
                             json={"messages": [{"role": "assistant", "content": "Hi"}]}), 400)
    assert e["field"] == "messages[0].role"
    e = error_of(client.post(f"/api/playground/{rid(ws, 'sft-lora')}/chat",
                             json={"messages": CHAT, "max_tokens": 10_000}), 400)
    assert e["field"] == "max_tokens" and "maximum context length" in e["message"]
    e = error_of(client.post(f"/api/playground/{rid(ws, 'clf-lora')}/chat", json={"messages": CHAT}), 400)
    assert "/predict" in e["message"]
    assert error_of(client.post("/api/playground//etc/chat", json={"messages": CHAT}), 403)


def test_predict_answers_what_tunelab_predict_prints(client, ws, cli_run):
    texts = ["a great and wonderful film", "dull, boring and bad"]
    printed = cli_run("predict", ws["runs"]["clf-lora"], *[a for t in texts for a in ("--text", t)])
    assert printed.code == 0, printed.err
    out = client.post(f"/api/playground/{rid(ws, 'clf-lora')}/predict", json={"inputs": texts}).json()
    assert out["tuned"] == [json.loads(line) for line in printed.out.splitlines()]
    assert out["base"] is None and "no trained head" in out["base_reason"]
    e = error_of(client.post(f"/api/playground/{rid(ws, 'sft-lora')}/predict", json={"inputs": texts}), 400)
    assert "/chat" in e["message"]
    assert error_of(client.post(f"/api/playground/{rid(ws, 'clf-lora')}/predict",
                                json={"inputs": texts, "pairs": ["x"]}), 400)["field"] == "pairs"


def test_predict_embeds_with_base_and_tuned(client, ws):
    texts = ["a great film", "a bad film", "the weather today"]
    out = client.post(f"/api/playground/{rid(ws, 'emb-lora')}/predict", json={"inputs": texts}).json()
    run = tunelab.load(ws["runs"]["emb-lora"])
    tuned = run.embed(texts)
    with methods.adapters_disabled(run.model):
        base = run.embed(texts)
    for side, want in (("tuned", tuned), ("base", base)):
        got = np.asarray(out[side])
        assert np.abs(got - want).max() <= tol(1.0, 64), side
        unit = want / np.linalg.norm(want, axis=1, keepdims=True)
        assert np.abs(np.asarray(out["similarities"][side]) - unit @ unit.T).max() <= tol(1.0, 64), side
    assert np.abs(tuned - base).max() > 1e-3  # the adapters were trained: base and tuned differ


def test_a_full_fine_tune_embeds_beside_its_base_model(client, ws, tiny_bert):
    """The base of a run that changed the base's weights is model.path loaded on its own: mean-pooled, normalised
    states of the plain encoder, computed here with transformers."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    texts = ["a great film", "the weather today"]
    out = client.post(f"/api/playground/{rid(ws, 'emb-full')}/predict", json={"inputs": texts}).json()
    tok, model = AutoTokenizer.from_pretrained(tiny_bert), AutoModel.from_pretrained(tiny_bert).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = model(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None].float()
    want = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    assert np.abs(np.asarray(out["base"]) - want).max() <= tol(1.0, 256)
    assert np.abs(np.asarray(out["tuned"]) - tunelab.load(ws["runs"]["emb-full"]).embed(texts)).max() <= tol(1.0, 64)
    assert np.abs(np.asarray(out["tuned"]) - want).max() > 1e-3


def test_a_run_folder_cannot_turn_on_its_models_code(client, ws, tiny_bert):
    """The trust rules of `tunelab predict`: the run's own model.trust_remote_code is ignored, the UI's
    --trust-remote-code counts."""
    import shutil

    from test_untrusted_runs import plant_code, turn_on

    run, base, marker = ws["root"] / "runs" / "handed-over", ws["root"] / "base", ws["root"] / "MARKER"
    shutil.copytree(ws["runs"]["clf-lora"], run)
    shutil.copytree(tiny_bert, base)
    turn_on(run, trust_remote_code=True, path=str(base))
    plant_code(base, marker)
    e = error_of(client.post("/api/playground/runs/handed-over/predict", json={"inputs": ["fine"]}), 400)
    assert "--trust-remote-code" in e["message"] and not marker.exists()
    with TestClient(ui_app.create_app(ws["root"], trust_remote_code=True)) as trusting:
        r = trusting.post("/api/playground/runs/handed-over/predict", json={"inputs": ["fine"]})
        assert r.status_code == 200, r.text
    assert marker.exists()


def test_loaded_runs_are_bounded(client, ws):
    # three runs asked for: the least recently used went, the last two are the ones loaded
    for name in ("emb-full", "clf-lora", "emb-lora"):
        assert client.post(f"/api/playground/{rid(ws, name)}/predict", json={"inputs": ["x"]}).status_code == 200
    cache = client.app_ref.state.playground
    assert playground.MAX_LOADED == 2
    assert [p.name for p in cache.loaded] == ["clf-lora", "emb-lora"]
    # a run trained again in its folder (its summary.json rewritten) is loaded again
    first = cache.loaded[ws["runs"]["emb-lora"].resolve()]
    summary = ws["runs"]["emb-lora"] / "summary.json"
    os.utime(summary, (summary.stat().st_atime, summary.stat().st_mtime + 10))
    client.post(f"/api/playground/{rid(ws, 'emb-lora')}/predict", json={"inputs": ["x"]})
    assert cache.loaded[ws["runs"]["emb-lora"].resolve()] is not first and len(cache.loaded) == 2
