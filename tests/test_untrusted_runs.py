"""A run folder from someone else cannot run code or load pickles.

model.trust_remote_code and model.allow_pickle in a run's own config.yaml are ignored wherever a run is loaded
(predict, eval, export, generate, embed, search, tunelab.load, a run as model.path, a GRPO reward model): only the
flags of the command (--trust-remote-code / --allow-pickle), the keywords of tunelab.load, or the new recipe's own
model.* keys turn them on. The bait: a model folder whose config.json `auto_map` names a configuration_*.py that
writes a marker file when it is imported, and weights stored only as a pickle (pytorch_model.bin).
"""

from __future__ import annotations

import json
import secrets
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import make_rows, write_jsonl
from safetensors.torch import load_file

import tunelab
from tunelab import rl

QUIET = ["eval.base=false", "eval.linear_probe=false", "eval.samples=0", "eval.forgetting=none", "train.max_steps=1"]
EVIL_CODE = '''from pathlib import Path

from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

Path({marker!r}).write_text("ran")  # {salt}: a fresh module name each time, so transformers imports it anew


class EvilConfig(BertConfig):
    pass


class EvilBert(BertForSequenceClassification):  # so that the model still loads once the code is trusted
    config_class = EvilConfig


AutoModelForSequenceClassification.register(EvilConfig, EvilBert)
'''


def plant_code(model_dir: Path, marker: Path) -> None:
    """Give a model folder a configuration_evil.py that writes `marker` when imported, named by config.json."""
    (model_dir / "configuration_evil.py").write_text(EVIL_CODE.format(marker=str(marker), salt=secrets.token_hex(4)))
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (model_dir / "config.json").write_text(json.dumps(cfg))


def pickle_weights(model_dir: Path) -> None:
    """Weights only as pytorch_model.bin (a pickle), as older hubs ship them."""
    torch.save(load_file(model_dir / "model.safetensors"), model_dir / "pytorch_model.bin")
    (model_dir / "model.safetensors").unlink()


def turn_on(run: Path, **model) -> None:
    """Edit the run's config.yaml, as someone handing it over could."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"].update(model)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))


@pytest.fixture(scope="module")
def runs(tiny_bert, tmp_path_factory) -> dict[str, Path]:
    """A full fine-tune (its weights in model/) and a LoRA run (its base named by model.path), both clean."""
    d = tmp_path_factory.mktemp("trained")
    train = write_jsonl(d / "train.jsonl", make_rows(40, seed=1))
    out = {}
    for method in ("full", "lora"):
        out[method] = tunelab.train(None, [f"model.path={tiny_bert}", f"data.train={train}", f"method.name={method}",
                                           *QUIET, f"output_dir={d / method}"]).dir
    return out


@pytest.fixture(params=["full", "lora"])
def evil(request, runs, tiny_bert, tmp_path) -> SimpleNamespace:
    """A copy of a run with both switches on in its config.yaml and code planted in the model folder it loads:
    its own model/ (full) or its base (lora: model.path now points at a copy of the base with the code)."""
    run = tmp_path / f"evil-{request.param}"
    shutil.copytree(runs[request.param], run)
    marker = tmp_path / "MARKER"
    if request.param == "full":
        model = run / "model"
        turn_on(run, trust_remote_code=True, allow_pickle=True)
    else:
        model = tmp_path / "base"
        shutil.copytree(tiny_bert, model)
        turn_on(run, trust_remote_code=True, allow_pickle=True, path=str(model))
    plant_code(model, marker)
    return SimpleNamespace(run=run, model=model, marker=marker, kind=request.param)


def test_the_api_ignores_the_runs_switches(evil):
    with pytest.raises(tunelab.TunelabError, match="--trust-remote-code") as e:
        tunelab.load(evil.run)
    assert "\n" not in str(e.value) and str(evil.run) in str(e.value)
    assert not evil.marker.exists()
    # the caller's flag, and only it, runs the code (the bait imports BertConfig, so the model then loads)
    tunelab.load(evil.run, trust_remote_code=True).predict(["great film"])
    assert evil.marker.exists()


def test_setting_the_switch_off_loads_without_the_code(evil):
    turn_on(evil.run, trust_remote_code=False)
    assert tunelab.load(evil.run).predict(["great film"])[0]["label"] in ("neg", "pos")
    assert not evil.marker.exists()


COMMANDS = {
    "predict": lambda run, d: ["predict", run, "--text", "great film"],
    "eval": lambda run, d: ["eval", run, write_jsonl(d / "test.jsonl", make_rows(6, seed=3))],
    "export": lambda run, d: ["export", run, d / "exported", "--merge"],
    "generate": lambda run, d: ["generate", run, "--prompt", "hello"],
    "embed": lambda run, d: ["embed", run, "--input", write_jsonl(d / "t.jsonl", make_rows(3)), "-o", d / "v.npy"],
    "search": lambda run, d: ["search", run, "--corpus", write_jsonl(d / "c.jsonl", make_rows(3)), "--query", "fun"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_commands_need_the_flag(command, evil, tmp_path, cli_run):
    args = COMMANDS[command](evil.run, tmp_path)
    r = cli_run(*args)
    assert r.code == 2 and "Traceback" not in r.err, r.err
    assert r.err.startswith("error: ") and "--trust-remote-code" in r.err and r.err.strip().count("\n") == 0
    assert not evil.marker.exists()
    assert not (tmp_path / "exported").exists() and not (tmp_path / "v.npy").exists()
    r = cli_run(*args, "--trust-remote-code")  # opted in: the code may run (some commands then refuse the task)
    assert r.code in (0, 2) and "Traceback" not in r.err, r.err
    if command in ("predict", "eval", "export"):
        assert r.code == 0, r.err
        assert evil.marker.exists()


def test_pickles_need_the_flag(evil, tmp_path, cli_run):
    turn_on(evil.run, trust_remote_code=False)  # the code stays out; the run still says allow_pickle: true
    pickle_weights(evil.model)
    with pytest.raises(tunelab.TunelabError, match="pytorch_model.bin.*--allow-pickle"):
        tunelab.load(evil.run)
    r = cli_run("predict", evil.run, "--text", "great film")
    assert r.code == 2 and "--allow-pickle" in r.err and "pytorch_model.bin" in r.err, r.err
    r = cli_run("export", evil.run, tmp_path / "out", "--merge")
    assert r.code == 2 and "--allow-pickle" in r.err and not (tmp_path / "out").exists(), r.err
    r = cli_run("predict", evil.run, "--text", "great film", "--allow-pickle")
    assert r.code == 0, r.err
    assert tunelab.load(evil.run, allow_pickle=True).predict(["great film"])
    assert not evil.marker.exists()


def test_a_run_as_model_path_follows_the_new_recipe(evil, tmp_path):
    """The new recipe's model.trust_remote_code / allow_pickle count, never the older run's."""
    train = write_jsonl(tmp_path / "train2.jsonl", make_rows(40, seed=2))

    def train_on(*extra, name):
        return tunelab.train(None, [f"model.path={evil.run}", f"data.train={train}", "method.name=lora", *QUIET,
                                    *extra, f"output_dir={tmp_path / name}"])

    if evil.kind == "lora":  # the run is rebuilt (base + adapter merged): its base's code must not run
        with pytest.raises(tunelab.TunelabError, match="model.trust_remote_code: true in your recipe"):
            train_on(name="a")
        assert not evil.marker.exists()
        train_on("model.trust_remote_code=true", name="b")
        assert evil.marker.exists()
    else:  # the run's own model/ is loaded as the recipe says: without its code
        train_on(name="a")
        assert not evil.marker.exists()
    evil.marker.unlink(missing_ok=True)
    turn_on(evil.run, trust_remote_code=False)
    pickle_weights(evil.model)
    with pytest.raises(tunelab.TunelabError, match="--allow-pickle"):
        train_on(name="c")
    train_on("model.allow_pickle=true", name="d")
    assert not evil.marker.exists()


def test_a_reward_model_run_cannot_run_code(evil):
    with pytest.raises(tunelab.TunelabError, match="--trust-remote-code"):
        rl.load_reward(SimpleNamespace(reward_model=str(evil.run), reward_function=None))
    assert not evil.marker.exists()


def test_the_readme_says_what_runs_code():
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### What runs code"):]
    section = " ".join(section[:section.index("\n#")].split())
    for words in ("task.reward_function", "eval.judge", "model.trust_remote_code", "--trust-remote-code", "--allow-pickle",
                  "model.allow_pickle", "never turn"):
        assert words in section, words


# -- --resume: the run's config.yaml is the only recipe, so its switches must not count either ----------------------

def stopped_run(tmp_path: Path, base: Path, *switches: str) -> Path:
    """A LoRA run on `base`, trained with `switches` on, as it is when it dies after its second checkpoint."""
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(40, seed=1))
    run = tunelab.train(None, [f"model.path={base}", f"data.train={train}", "method.name=lora", *QUIET[:-1],
                               "train.max_steps=4", "train.checkpoint_every=1", "train.keep_finished_checkpoints=true",
                               *switches, f"output_dir={tmp_path / 'whole'}"]).dir
    stopped = tmp_path / "stopped"
    shutil.copytree(run, stopped)
    for step in sorted((stopped / "checkpoints").glob("step-*"))[2:]:
        shutil.rmtree(step)
    (stopped / "summary.json").unlink()
    return stopped


def tree(folder: Path) -> dict:
    """Every file and folder under `folder` with its bytes and modification time: what a refusal must not change."""
    return {str(p.relative_to(folder)): (p.is_file() and p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def forget_code() -> None:
    """Drop the planted module from this process, as a new process would start: transformers runs a module it
    has imported once again only when its file changed."""
    for name in [n for n in sys.modules if n.startswith("transformers_modules.") and n.endswith(".configuration_evil")]:
        del sys.modules[name]


def test_resume_needs_the_flag_for_code(tiny_bert, tmp_path, cli_run):
    """A run trained with its base's code (model.trust_remote_code: true, as someone handing it over had it): --resume
    without --trust-remote-code refuses before reading, loading or writing anything; with it, the run finishes."""
    base, marker = tmp_path / "base", tmp_path / "MARKER"
    shutil.copytree(tiny_bert, base)
    plant_code(base, marker)
    run = stopped_run(tmp_path, base, "model.trust_remote_code=true")
    marker.unlink()
    forget_code()
    before = tree(run)
    r = cli_run("train", "--resume", run)
    assert r.code == 2 and "Traceback" not in r.err, r.err
    assert r.err.startswith("error: ") and r.err.strip().count("\n") == 0, r.err
    assert "--trust-remote-code" in r.err and "configuration_evil.EvilConfig" in r.err and str(run) in r.err
    with pytest.raises(tunelab.TunelabError, match="trust_remote_code=True for tunelab.resume"):
        tunelab.resume(run)
    assert not marker.exists() and tree(run) == before
    r = cli_run("train", "--resume", run, "--trust-remote-code")
    assert r.code == 0, r.err
    assert marker.exists() and (run / "summary.json").is_file()  # the switches replaced in memory: no "changed since"


def test_resume_needs_the_flag_for_pickles(tiny_bert, tmp_path, cli_run):
    base = tmp_path / "base"
    shutil.copytree(tiny_bert, base)
    pickle_weights(base)
    run = stopped_run(tmp_path, base, "model.allow_pickle=true")
    before = tree(run)
    r = cli_run("train", "--resume", run)
    assert r.code == 2 and "Traceback" not in r.err and r.err.strip().count("\n") == 0, r.err
    assert "--allow-pickle" in r.err and "pytorch_model.bin" in r.err and str(run) in r.err
    assert tree(run) == before
    assert tunelab.resume(run, allow_pickle=True).summary["steps"] == 4


def test_train_trust_remote_code_is_the_recipe_key(tiny_bert, tmp_path, cli_run):
    """On a new run, --trust-remote-code is model.trust_remote_code=true, as --allow-pickle is model.allow_pickle=true."""
    base, marker = tmp_path / "base", tmp_path / "MARKER"
    shutil.copytree(tiny_bert, base)
    plant_code(base, marker)
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(40, seed=1))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"path": str(base)}, "data": {"train": str(train)}}))
    r = cli_run("train", recipe, *QUIET, f"output_dir={tmp_path / 'a'}")  # config.json's model_type: plain BERT
    assert r.code == 0 and not marker.exists(), r.err
    r = cli_run("train", recipe, *QUIET, f"output_dir={tmp_path / 'b'}", "--trust-remote-code")
    assert r.code == 0 and marker.exists(), r.err
    assert yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())["model"]["trust_remote_code"] is True
