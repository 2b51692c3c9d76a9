"""Models by Hugging Face Hub id, end to end and offline: the real huggingface_hub downloads from the loopback Hub
of tests/hub_server.py into a cache under tmp_path, and tunelab trains, resumes and loads from that cache."""

from __future__ import annotations

import importlib
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_jsonl
from hub_server import point_client_at, set_offline
from safetensors.torch import load_file, save_file
from test_resume import _crashed_copy

import tunelab
from tunelab import hub as hub_mod
from tunelab import predict
from tunelab.config import ModelConfig

REPO = "org/tiny-bert"
QUIET = ["eval.base=false", "eval.linear_probe=false", "eval.samples=0", "eval.forgetting=none"]
# What a model repo holds besides what tunelab needs: none of it may be downloaded.
EXTRAS = {"README.md": b"# tiny\n", "pytorch_model.bin": b"not loaded", "onnx/model.onnx": b"onnx",
          "original/model.safetensors": b"another copy", "consolidated.safetensors": b"mistral's other format"}
NEEDED = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "vocab.txt"}


def repo_folder(tiny_bert: Path, dest: Path, extras: dict | None = EXTRAS, shift: float = 0.0) -> Path:
    """The tiny BERT as a Hub repo would hold it (with the vocab.txt and special_tokens_map.json that BERT repos
    have beside tokenizer.json); `shift` moves every weight (another commit's weights)."""
    shutil.copytree(tiny_bert, dest)
    vocab = json.loads((dest / "tokenizer.json").read_text())["model"]["vocab"]
    (dest / "vocab.txt").write_text("".join(f"{w}\n" for w in sorted(vocab, key=vocab.get)))
    specials = json.loads((dest / "tokenizer_config.json").read_text())
    (dest / "special_tokens_map.json").write_text(json.dumps({k: v for k, v in specials.items() if k.endswith("_token")}))
    for name, data in (extras or {}).items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(data)
    if shift:
        weights = load_file(str(dest / "model.safetensors"))
        save_file({k: v + shift for k, v in weights.items()}, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


@pytest.fixture
def repo(hub, tiny_bert, tmp_path) -> str:
    """REPO on the loopback Hub; returns its first commit (main)."""
    return hub.commit(REPO, repo_folder(tiny_bert, tmp_path / "repo-v1"))


def lora_overrides(train: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.path={REPO}", f"data.train={train}", "data.max_length=32", "method.name=lora", "method.r=4",
            "train.max_steps=6", "train.batch_size=8", "train.eval_every=3", "train.checkpoint_every=1",
            "train.keep_finished_checkpoints=true", f"output_dir={out}", *QUIET, *extra]


def cache_snapshots(tmp_path: Path) -> Path:
    return tmp_path / "hf-home" / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots"


def test_train_by_hub_id_fetches_only_what_a_model_needs_and_records_the_commit(hub, repo, sentiment_files, tmp_path):
    run = tunelab.train(None, lora_overrides(sentiment_files["train"], tmp_path / "run"))
    assert sorted(hub.fetched(REPO)) == sorted(NEEDED)  # not README, .bin, onnx/, original/, consolidated
    assert sorted(p.name for p in (cache_snapshots(tmp_path) / repo).iterdir()) == sorted(NEEDED)
    saved = yaml.safe_load((run.dir / "config.yaml").read_text())
    assert saved["model"] == {**saved["model"], "path": REPO, "revision": repo}
    assert json.loads((run.dir / "versions.json").read_text())["hub_model"] == {"id": REPO, "commit": repo}
    adapter = json.loads((run.dir / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == REPO  # as peft users expect it


def test_resume_and_load_use_the_recorded_commit_after_main_moves(hub, repo, tiny_bert, sentiment_files, tmp_path):
    """A LoRA run keeps only its adapter, so both its resume and tunelab.load rebuild the base: from the commit it
    trained on, not from main, which has moved to other weights in between."""
    run = tunelab.train(None, lora_overrides(sentiment_files["train"], tmp_path / "run"))
    texts = ["the film was great", "a dull and boring plot"]
    before = tunelab.load(run.dir).predict(texts)
    crashed = _crashed_copy(run.dir, tmp_path / "crashed", last_step=3)

    moved = hub.commit(REPO, repo_folder(tiny_bert, tmp_path / "repo-v2", shift=0.05))
    assert moved != repo
    on_main = tunelab.train(None, lora_overrides(sentiment_files["train"], tmp_path / "on-main"))
    assert yaml.safe_load((on_main.dir / "config.yaml").read_text())["model"]["revision"] == moved
    assert on_main.summary["eval"] != run.summary["eval"]  # the moved weights train to other figures

    requests = len(hub.requests)
    assert tunelab.load(run.dir).predict(texts) == before
    resumed = tunelab.resume(crashed)
    assert hub.requests[requests:] == []  # the recorded commit is in the cache: the Hub is not even asked
    weights = lambda d: load_file(str(d / "adapter" / "adapter_model.safetensors"))
    a, b = weights(run.dir), weights(resumed.dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_local_directory_of_the_same_name_wins(hub, repo, tiny_bert, sentiment_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_bert, tmp_path / REPO)
    assert not hub_mod.is_hub_id(REPO)
    with predict.model_source(ModelConfig(path=REPO)) as resolved:
        assert resolved.path == REPO and resolved.revision is None
    run = tunelab.train(None, lora_overrides(sentiment_files["train"], tmp_path / "run"))
    assert hub.requests == []
    saved = yaml.safe_load((run.dir / "config.yaml").read_text())["model"]
    assert saved["path"] == str(tmp_path / REPO) and saved["revision"] is None
    assert "hub_model" not in json.loads((run.dir / "versions.json").read_text())


def test_offline_with_the_cache_trains_without_the_hub(hub, repo, sentiment_files, tmp_path, monkeypatch, cli_run):
    r = cli_run("models", "fetch", REPO)
    assert r.code == 0, r.err
    assert f"commit {repo}, 6 files" in r.out and str(cache_snapshots(tmp_path) / repo) in r.out
    hub.close()  # no Hub at all from here on
    set_offline(monkeypatch, True)
    run = tunelab.train(None, lora_overrides(sentiment_files["train"], tmp_path / "run"))
    assert yaml.safe_load((run.dir / "config.yaml").read_text())["model"]["revision"] == repo
    set_offline(monkeypatch, False)  # online again, but the Hub is gone: a pinned commit needs only the cache
    tunelab.load(run.dir).predict(["great"])


def test_models_fetch_then_ls_in_a_fresh_interpreter(hub, repo, tiny_bert, tmp_path, cli_run):
    """The subprocess reads HF_ENDPOINT / HF_HOME from the environment at import, as a user's shell sets them."""
    hub.tag(REPO, "v1", repo)
    hub.commit(REPO, repo_folder(tiny_bert, tmp_path / "repo-v2", shift=0.05))
    p = subprocess.run([sys.executable, "-m", "tunelab", "models", "fetch", REPO, "--revision", "v1"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert f"{REPO} at v1: commit {repo}" in p.stdout
    r = cli_run("models", "ls")
    assert r.code == 0, r.err
    row = next(line for line in r.out.splitlines() if line.startswith(REPO)).split()
    size = sum(f.stat().st_size for f in (cache_snapshots(tmp_path) / repo).iterdir())
    assert row[1:5] == ["v1", repo[:12], "6", f"{size / 2**20:.1f}"]
    listed = json.loads(cli_run("models", "ls", "--json").out)
    assert listed == [{"id": REPO, "size": size, "revisions": [
        {"commit": repo, "refs": ["v1"], "size": size, "files": 6, "dir": str(cache_snapshots(tmp_path) / repo)}]}]


def test_pickles_only_with_allow_pickle_and_code_only_with_trust_remote_code(hub, tiny_bert, tmp_path, cli_run):
    folder = repo_folder(tiny_bert, tmp_path / "pickled", extras={"modeling_tiny.py": b"raise SystemExit\n"})
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    commit = hub.commit("org/pickled", folder)
    r = cli_run("models", "fetch", "org/pickled")
    assert r.code == 2 and "Traceback" not in r.err
    assert "weights only as pickle files (pytorch_model.bin)" in r.err and "--allow-pickle" in r.err
    assert "pytorch_model.bin" not in hub.fetched("org/pickled")
    r = cli_run("models", "fetch", "org/pickled", "--allow-pickle")
    assert r.code == 0, r.err
    assert "pytorch_model.bin" in hub.fetched("org/pickled") and "modeling_tiny.py" not in hub.fetched("org/pickled")
    r = cli_run("models", "fetch", "org/pickled", "--allow-pickle", "--trust-remote-code")
    assert r.code == 0 and "modeling_tiny.py" in hub.fetched("org/pickled")
    assert (tmp_path / "hf-home" / "hub" / "models--org--pickled" / "snapshots" / commit / "modeling_tiny.py").is_file()


def test_shards_named_outside_the_usual_scheme_are_fetched_from_the_index(hub, tiny_bert, tmp_path):
    folder = repo_folder(tiny_bert, tmp_path / "sharded", extras={})
    weights = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {"part-a.safetensors": names[: len(names) // 2], "part-b.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(folder / shard), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    hub.commit("org/sharded", folder)
    got = hub_mod.download("org/sharded")
    assert {"part-a.safetensors", "part-b.safetensors", "model.safetensors.index.json"} <= set(hub.fetched("org/sharded"))
    from transformers import AutoModel

    loaded = AutoModel.from_pretrained(got.dir).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in weights.items() if k in loaded)


def test_a_download_shows_a_progress_bar_though_model_loading_turned_them_off(hub, repo, tiny_bert, monkeypatch,
                                                                               capsys):
    """tunelab's own model loading turns huggingface_hub's bars off (transformers' disable_progress_bar); a download
    after it still shows one, and leaves them off again. HF_HUB_DISABLE_PROGRESS_BARS=1 is the user's: no bar."""
    from huggingface_hub import constants
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers import AutoModel

    from tunelab import models

    models.load(ModelConfig(path=str(tiny_bert)), AutoModel)
    assert are_progress_bars_disabled()
    capsys.readouterr()
    hub_mod.download(REPO)
    assert "Fetching 6 files: 100%" in capsys.readouterr().err and are_progress_bars_disabled()
    for module in (constants, importlib.import_module("huggingface_hub.utils.tqdm")):  # both read it at import
        monkeypatch.setattr(module, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    hub.tag(REPO, "v1", repo)
    hub_mod.download(REPO, "v1")
    assert "Fetching" not in capsys.readouterr().err


# -- errors: one paragraph, exit 2 ------------------------------------------------------------------------------------

def one_paragraph(r, *fragments: str) -> str:
    """Exit 2 and one `error: ...` paragraph, last on stderr; before it only huggingface_hub's progress bars."""
    assert r.code == 2, f"exit {r.code}\n{r.out}\n{r.err}"
    assert "Traceback" not in r.err and "error: " in r.err, r.err
    before, _, msg = r.err.partition("error: ")
    assert all(line.strip().startswith("Fetching ") for line in before.replace("\r", "\n").split("\n") if line.strip()), before
    msg = msg.strip()
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg}"
    return msg


@pytest.fixture
def recipe(tmp_path) -> Path:
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"text {i}", "label": "ab"[i % 2]} for i in range(40)])
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": REPO}, "data": {"train": str(train)},
                                    "method": {"name": "lora"}, "task": {"type": "classification"}}))
    return path


def test_an_id_that_does_not_exist(hub, recipe, tmp_path, cli_run):
    msg = one_paragraph(cli_run("train", recipe, f"output_dir={tmp_path / 'run'}"),
                        f"'{REPO}' (model.path) is neither a local directory", hub.url, "hf auth login")
    assert str(Path(REPO).absolute()) in msg
    assert not (tmp_path / "run").exists()  # refused before a run folder was made


def test_a_gated_model_says_how_to_log_in(hub, repo, recipe, tmp_path, cli_run, monkeypatch):
    hub.gate(REPO, "hf_granted")
    one_paragraph(cli_run("train", recipe, f"output_dir={tmp_path / 'run'}"),
                  "gated model", "no access token was sent", "hf auth login", "HF_TOKEN", f"{hub.url}/{REPO}")
    monkeypatch.setenv("HF_TOKEN", "hf_someone_else")
    one_paragraph(cli_run("train", recipe, f"output_dir={tmp_path / 'run'}"), "has not been granted access")
    monkeypatch.setenv("HF_TOKEN", "hf_granted")
    assert cli_run("models", "fetch", REPO).code == 0


def test_a_revision_that_does_not_exist(hub, repo, recipe, tmp_path, cli_run):
    one_paragraph(cli_run("train", recipe, "model.revision=v9", f"output_dir={tmp_path / 'run'}"),
                  "Revision 'v9' (model.revision) does not exist", "branches, tags or commits")
    one_paragraph(cli_run("models", "fetch", REPO, "--revision", "v9"), "(--revision)")


def test_offline_with_nothing_cached_names_the_variable_and_models_fetch(hub, repo, recipe, tmp_path, cli_run,
                                                                         monkeypatch):
    set_offline(monkeypatch, True)
    one_paragraph(cli_run("train", recipe, f"output_dir={tmp_path / 'run'}"),
                  "HF_HUB_OFFLINE=1 is set", f"`tunelab models fetch {REPO}`", str(tmp_path / "hf-home" / "hub"))
    assert hub.requests == []


def test_an_unreachable_hub_is_the_offline_message_not_a_traceback(recipe, tmp_path, cli_run, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    point_client_at(url, tmp_path / "hf-home", monkeypatch)
    one_paragraph(cli_run("train", recipe, f"output_dir={tmp_path / 'run'}"),
                  f"the Hub ({url}) cannot be reached (ConnectError)", f"`tunelab models fetch {REPO}`",
                  "HF_HUB_OFFLINE=1")


def test_a_repo_without_safetensors_or_pickles(hub, tiny_bert, tmp_path, cli_run):
    folder = repo_folder(tiny_bert, tmp_path / "gguf-only", extras={"model.gguf": b"GGUF"})
    (folder / "model.safetensors").unlink()
    hub.commit("org/gguf-only", folder)
    one_paragraph(cli_run("models", "fetch", "org/gguf-only"), "has no safetensors weights", "--allow-pickle")
    one_paragraph(cli_run("models", "fetch", "org/gguf-only", "--allow-pickle"), "has no weights that transformers loads")


def test_models_fetch_refuses_a_local_path(tiny_bert, cli_run):
    one_paragraph(cli_run("models", "fetch", str(tiny_bert)), "is not a Hugging Face Hub id")


def test_advise_takes_a_hub_id(hub, repo, tiny_bert):
    from tunelab import advise

    def figures(result):  # all but where the model was read from
        if isinstance(result, dict):
            return {k: figures(v) for k, v in result.items() if k != "model"}
        return [figures(v) for v in result] if isinstance(result, list) else result

    by_id = advise.advise(REPO, "classification", 64, 8, memory_bytes="1GB", device="cpu")
    by_dir = advise.advise(tiny_bert, "classification", 64, 8, memory_bytes="1GB", device="cpu")
    assert figures(by_id) == figures(by_dir) and by_id["rows"][0]["plain"]["total_params"] > 0
    assert "model.safetensors" in hub.fetched(REPO)


def test_a_cache_that_cannot_be_written(hub, repo, tmp_path, cli_run, monkeypatch):
    from huggingface_hub import constants

    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "a-file" / "hub"))
    one_paragraph(cli_run("models", "fetch", REPO), "could not be written into the Hugging Face cache",
                  str(tmp_path / "a-file" / "hub"), "HF_HUB_CACHE")


def test_generate_takes_a_hub_id_of_a_chat_model(hub, tiny_chat_llama, tmp_path):
    """`tunelab generate org/name` (TunedModel.from_model_dir) fetches the model and answers as its local folder
    does; an unknown id is one paragraph through the CLI."""
    hub.commit("org/tiny-chat", tiny_chat_llama)
    by_id = predict.TunedModel.from_model_dir("org/tiny-chat").generate(["hello there"], max_new_tokens=6)
    local = predict.TunedModel.from_model_dir(tiny_chat_llama).generate(["hello there"], max_new_tokens=6)
    assert by_id == local and hub.fetched("org/tiny-chat")
    p = subprocess.run([sys.executable, "-m", "tunelab", "generate", "org/no-such-chat", "--prompt", "hi"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "org/no-such-chat" in p.stderr and "Traceback" not in p.stderr


def test_cv_and_sweep_train_every_fold_and_trial_on_one_commit(hub, repo, tiny_bert, sentiment_files, tmp_path,
                                                               monkeypatch):
    """main moves after the first fold / trial: the later ones still train the commit the command started on."""
    pytest.importorskip("optuna")
    from tunelab import cv, pipeline, sweep

    real, calls = pipeline.train, {"n": 0}

    def train_then_move(cfg, *a, **kw):
        run = real(cfg, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 1:
            hub.commit(REPO, repo_folder(tiny_bert, tmp_path / f"moved-{id(cfg)}", shift=0.05))
        return run

    monkeypatch.setattr(pipeline, "train", train_then_move)
    common = [f"model.path={REPO}", f"data.train={sentiment_files['train']}", "data.max_length=32",
              "train.max_steps=2", "train.batch_size=8", *QUIET]
    cv.run(None, [*common, f"output_dir={tmp_path / 'cv'}"], folds=2, echo=lambda *_: None)
    folds = [yaml.safe_load((tmp_path / "cv" / f"fold_{i}" / "config.yaml").read_text()) for i in (1, 2)]
    assert [f["model"]["revision"] for f in folds] == [repo, repo]

    calls["n"] = 0
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {low: 1.0e-4, high: 1.0e-3, log: true}\n")
    sweep.run(None, [*common, f"output_dir={tmp_path / 'sweep'}"], space, trials=2, echo=lambda *_: None)
    trials = sorted((tmp_path / "sweep").glob("trial_*/config.yaml"))
    assert len(trials) == 2 and {yaml.safe_load(t.read_text())["model"]["revision"] for t in trials} == {
        yaml.safe_load((tmp_path / "sweep" / "config.yaml").read_text())["model"]["revision"]}
