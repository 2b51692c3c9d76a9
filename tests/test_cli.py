"""The command line, end to end: train -> predict -> eval round trips, the helper
commands, and the promise that every bad input ends in one `error: ...` paragraph
on stderr with exit code 2, never a traceback.

A few commands run as real subprocesses (`python -m tunelab ...`); the rest call
`tunelab.cli.main` in-process with a patched argv, which is the same code path
minus ~3 s of imports per call.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import PROBS_TOL, Result, make_rows, tol, write_jsonl

import tunelab

FAST = ["train.epochs=1", "eval.linear_probe=false"]



def run_sub(*args, cwd: Path) -> Result:
    """`python -m tunelab ARGS` in a fresh interpreter."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, "-m", "tunelab", *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    return Result(p.returncode, p.stdout, p.stderr)




def assert_user_error(r: Result, *fragments: str) -> str:
    """Exit code 2, a single `error: ...` paragraph on stderr naming every fragment, no traceback."""
    assert r.code == 2, f"exit code {r.code}\nstdout:\n{r.out}\nstderr:\n{r.err}"
    assert "Traceback" not in r.err and "Traceback" not in r.out, r.err
    msg = r.err.strip()
    assert msg.startswith("error: "), r.err
    assert "\n" not in msg, f"error message is not one paragraph:\n{msg}"
    for f in fragments:
        assert f in msg, f"{f!r} not in error message:\n{msg}"
    return msg


def write_recipe(path: Path, model: Path, train: Path, test: Path | None = None, method: dict | None = None) -> Path:
    lines = [
        "model:",
        f"  path: {model}",
        "data:",
        f"  train: {train}",
        *([f"  test: {test}"] if test else []),
        "  max_length: 32",
        "method:",
        *[f"  {k}: {v}" for k, v in (method or {"name": "full"}).items()],
        "train:",
        "  epochs: 1",
        "  lr: 1.0e-3",
        "  batch_size: 16",
        "eval:",
        "  linear_probe: false",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def check_prediction(p: dict, labels=("neg", "pos")) -> None:
    assert set(p) == {"text", "label", "score", "probs"}
    assert set(p["probs"]) == set(labels)
    assert sum(p["probs"].values()) == pytest.approx(1.0, abs=tol(1.0, len(p["probs"]) + 4))  # exp, sum, divide
    assert all(0.0 <= v <= 1.0 for v in p["probs"].values())
    assert p["label"] == max(p["probs"], key=p["probs"].get)
    assert p["score"] == pytest.approx(p["probs"][p["label"]])


def snapshot(d: Path) -> dict[str, tuple[bytes, int]]:
    return {str(f.relative_to(d)): (f.read_bytes(), f.stat().st_mtime_ns) for f in sorted(d.rglob("*")) if f.is_file()}


# -- a workspace shared by the module: data, recipes and two trained runs --------------------------

@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_bert) -> Path:
    d = tmp_path_factory.mktemp("cli")
    train, test = write_jsonl(d / "train.jsonl", make_rows(240, seed=0)), write_jsonl(d / "test.jsonl", make_rows(60, seed=99))
    write_recipe(d / "recipe.yaml", tiny_bert, train, test, method={"name": "lora", "r": 4})
    write_recipe(d / "full.yaml", tiny_bert, train, test)
    return d


@pytest.fixture(scope="module")
def lora_run(ws) -> Path:
    """`tunelab train recipe.yaml train.epochs=1 output_dir=...` as a real process (LoRA, r=4)."""
    out = ws / "runs" / "lora"
    r = run_sub("train", "recipe.yaml", "train.epochs=1", f"output_dir={out}", cwd=ws)
    assert r.code == 0, r.err
    assert "Traceback" not in r.err
    assert f"run directory: {out}" in r.out
    assert "validation" in r.out and "test" in r.out  # the headline table
    return out


@pytest.fixture(scope="module")
def full_run(ws, tiny_bert) -> Path:
    """The same through the Python API with full fine-tuning."""
    out = ws / "runs" / "full"
    run = tunelab.train(ws / "full.yaml", ["train.epochs=1", f"output_dir={out}"])
    assert run.dir == out
    return out


# -- round trip ------------------------------------------------------------------------------------

def test_train_writes_a_complete_run(lora_run, full_run):
    for run, artifact, files in ((lora_run, "adapter", ["adapter_config.json", "adapter_model.safetensors"]),
                                 (full_run, "model", ["config.json", "model.safetensors"])):
        for name in ("config.yaml", "summary.json", "metrics.jsonl", "data_report.json", "labels.json"):
            assert (run / name).is_file(), f"{run}/{name}"
        for name in files:
            assert (run / artifact / name).is_file()
        summary = json.loads((run / "summary.json").read_text())
        assert summary["artifact"] == artifact
        assert summary["method"] == ("lora" if artifact == "adapter" else "full")
        assert json.loads((run / "labels.json").read_text())["labels"] == ["neg", "pos"]
        assert "linear_probe" not in summary  # eval.linear_probe=false was honoured
    cfg = (lora_run / "config.yaml").read_text()
    assert "r: 4" in cfg and "epochs: 1.0" in cfg


def test_predict_file_to_output_as_subprocess(ws, lora_run):
    out = ws / "preds-lora.jsonl"
    r = run_sub("predict", lora_run, "test.jsonl", "--output", out, cwd=ws)
    assert r.code == 0, r.err
    assert "Traceback" not in r.err
    assert "60 predictions" in r.err and r.out == ""  # the note goes to stderr, stdout stays clean
    preds = read_jsonl(out)
    assert [p["text"] for p in preds] == [row["text"] for row in make_rows(60, seed=99)]
    for p in preds:
        check_prediction(p)


@pytest.mark.parametrize("which", ["lora", "full"])
def test_predict_texts_to_stdout(which, lora_run, full_run, cli_run):
    run = lora_run if which == "lora" else full_run
    r = cli_run("predict", run, "--text", "great film", "--text", "awful plot")
    assert r.code == 0, r.err
    preds = [json.loads(line) for line in r.out.splitlines()]
    assert [p["text"] for p in preds] == ["great film", "awful plot"]
    for p in preds:
        check_prediction(p)


def test_predict_file_full_run(ws, full_run, cli_run):
    out = ws / "nested" / "preds-full.jsonl"  # parent folders are created
    r = cli_run("predict", full_run, ws / "test.jsonl", "-o", out)
    assert r.code == 0, r.err
    preds = read_jsonl(out)
    assert len(preds) == 60
    for p in preds:
        check_prediction(p)


@pytest.mark.parametrize("which", ["lora", "full"])
def test_eval_prints_and_saves_metrics(which, ws, lora_run, full_run, cli_run):
    run = lora_run if which == "lora" else full_run
    r = cli_run("eval", run, ws / "test.jsonl")
    assert r.code == 0, r.err
    assert "accuracy" in r.out and "macro_f1" in r.out and "examples 60" in r.out
    out = Path(r.out.split("metrics -> ")[1].strip())
    assert out.parent == run / "eval" and out.name.startswith("test-") and out.suffix == ".json"
    saved = json.loads(out.read_text())
    assert saved["file"] == str(ws / "test.jsonl")
    assert 0.0 <= saved["accuracy"] <= 1.0
    assert f"{saved['accuracy']:.4f}" in r.out
    assert sum(c["support"] for c in saved["per_class"].values()) == 60
    # The run's own test metrics were computed on the same file with the same weights.
    summary = json.loads((run / "summary.json").read_text())
    assert saved["accuracy"] == pytest.approx(summary["test"]["accuracy"])


def test_data_inspect_csv(tmp_path, cli_run):
    path = tmp_path / "train.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "review", "stars"])
        for i, row in enumerate(make_rows(30, seed=3)):
            w.writerow([i, row["text"], 5 if row["label"] == "pos" else 1])
        w.writerow([30, "", 5])  # an empty text, dropped
    r = cli_run("data", "inspect", path, "--text-field", "review", "--label-field", "stars")
    assert r.code == 0, r.err
    stars = [5 if row["label"] == "pos" else 1 for row in make_rows(30, seed=3)]
    assert "rows read: 31" in r.out
    assert "1 empty_text" in r.out
    assert f"1 {stars.count(1)}" in r.out and f"5 {stars.count(5)}" in r.out
    assert "labels (2)" in r.out

    r = cli_run("data", "inspect", path, "--text-field", "review", "--label-field", "stars", "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["rows_read"] == 31 and report["labels"] == {"1": stars.count(1), "5": stars.count(5)}


def test_config_explain(cli_run):
    r = cli_run("config", "explain")
    assert r.code == 0, r.err
    line = next(l for l in r.out.splitlines() if l.startswith("train.lr "))
    assert "2e-05" in line and "learning rate" in line.lower()
    for key in ("model.path", "data.train", "method.r (lora)", "eval.linear_probe", "output_dir"):
        assert key in r.out


def test_config_show(ws, cli_run):
    r = cli_run("config", "show", ws / "recipe.yaml", "train.lr=1e-3", "train.batch_size=8")
    assert r.code == 0, r.err
    shown = yaml.safe_load(r.out)
    assert shown["train"]["lr"] == 1e-3 and shown["train"]["batch_size"] == 8
    assert {k: shown["method"][k] for k in ("name", "r", "alpha", "dropout", "target_modules")} == \
        {"name": "lora", "r": 4, "alpha": 16.0, "dropout": 0.05, "target_modules": None}
    assert shown["method"]["use_rslora"] is False  # defaults are filled in
    assert shown["train"]["scheduler"] == "linear"  # defaults filled in

    # Switching the method on the command line drops the recipe's LoRA keys instead of rejecting them.
    r = cli_run("config", "show", ws / "recipe.yaml", "method.name=full")
    assert r.code == 0, r.err
    assert yaml.safe_load(r.out)["method"] == {"name": "full"}


def test_python_api_matches_cli(ws, tmp_path, monkeypatch, cli_run, lora_run):
    monkeypatch.chdir(ws)  # the recipe's path is relative, as a user would write it
    out = tmp_path / "api-run"
    run = tunelab.train("recipe.yaml", **{"train.lr": 3e-4, "output_dir": str(out)})
    assert run.dir == out and run.summary["method"] == "lora"
    assert "lr: 0.0003" in (out / "config.yaml").read_text()

    api = tunelab.load(run.dir).predict(["great film"])
    r = cli_run("predict", run.dir, "--text", "great film", "--text", "awful plot")
    assert r.code == 0, r.err
    via_cli = json.loads(r.out.splitlines()[0])
    assert len(api) == 1 and api[0]["text"] == "great film"
    assert api[0]["label"] == via_cli["label"]
    assert api[0]["probs"] == pytest.approx(via_cli["probs"], abs=PROBS_TOL)  # alone here, batched with another there

    # The same recipe and seed through the CLI gives the same model, hence the same prediction.
    cli_dir = tmp_path / "cli-run"
    r = cli_run("train", "recipe.yaml", "train.lr=3e-4", f"output_dir={cli_dir}")
    assert r.code == 0, r.err
    again = tunelab.load(cli_dir).predict("great film")
    assert again[0]["probs"] == api[0]["probs"]  # the same steps and prediction: the same kernels in the same order


def test_help_lists_commands(tmp_path):
    r = run_sub("--help", cwd=tmp_path)
    assert r.code == 0, r.err
    for cmd in ("train", "predict", "eval", "data", "config"):
        assert cmd in r.out


# -- bad input: exit 2, one paragraph, no traceback ----------------------------------------------

def test_missing_data_file_as_subprocess(ws, tmp_path):
    out = tmp_path / "run"
    r = run_sub("train", "recipe.yaml", "data.train=nope/train.jsonl", f"output_dir={out}", *FAST, cwd=ws)
    assert_user_error(r, "nope/train.jsonl", "data.train", "does not exist")
    assert not out.exists()


@pytest.fixture
def train_with(ws, tmp_path, cli_run):
    """Train the shared LoRA recipe on a given data file; returns (Result, output_dir)."""

    def go(data: Path, *overrides: str) -> tuple[Result, Path]:
        out = tmp_path / "run"
        r = cli_run("train", ws / "recipe.yaml", f"data.train={data}", "data.test=", f"output_dir={out}", *FAST, *overrides)
        return r, out

    return go


def _csv(rows: list[list]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue().encode()


GOOD = "".join(json.dumps(r) + "\n" for r in make_rows(20, seed=5)).encode()

BAD_DATA = {
    "empty": ("train.jsonl", b"", ["train.jsonl", "data.train", "is empty"]),
    "malformed_json": ("train.jsonl", GOOD[: GOOD.index(b"\n", 200) + 1] + b'{"text": "oops", "label": pos}\n' + GOOD,
                       ["line ", "not valid JSON", "data.train"]),
    "missing_text_column": ("train.jsonl", b'{"review": "great film", "label": "pos"}\n{"review": "dull", "label": "neg"}\n',
                            ["no 'text' column", "'review', 'label'", "data.text_field"]),
    "missing_label_column_csv": ("train.csv", _csv([["text", "sentiment"], ["great film", "pos"], ["dull", "neg"]]),
                                 ["no 'label' column", "'text', 'sentiment'", "data.label_field"]),
    "single_class": ("train.jsonl", b"".join(json.dumps({"text": f"great film {i}", "label": "pos"}).encode() + b"\n" for i in range(20)),
                     ["single label class", "'pos'", "data.label_field"]),
    "not_utf8": ("train.jsonl", GOOD[: GOOD.index(b"\n") + 1] + b'{"text": "caf\xe9 cr\xe8me", "label": "pos"}\n' + GOOD,
                 ["not valid UTF-8", "line 2", "0xe9"]),
    "json_array": ("train.json", b'[{"text": "a", "label": "pos"}]', ["JSON array", "JSON lines"]),
    "unsupported_extension": ("train.txt", b"great film\tpos\n", ["unsupported extension '.txt'"]),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_training_data(case, tmp_path, train_with):
    name, content, fragments = BAD_DATA[case]
    data = tmp_path / name
    data.write_bytes(content)
    r, out = train_with(data)
    msg = assert_user_error(r, *fragments)
    if case == "malformed_json":
        bad_line = GOOD[: GOOD.index(b"\n", 200) + 1].count(b"\n") + 1
        assert f"line {bad_line} " in msg
    assert not out.exists(), "a failed run must not leave an output directory behind"


def test_missing_model_dir(ws, tmp_path, cli_run):
    r = cli_run("train", ws / "recipe.yaml", f"model.path={tmp_path / 'no-such-model'}", f"output_dir={tmp_path / 'run'}", *FAST)
    assert_user_error(r, "no-such-model", "model.path", "does not exist")
    assert not (tmp_path / "run").exists()


def test_model_dir_without_config(ws, tmp_path, cli_run):
    fake = tmp_path / "not-a-model"
    fake.mkdir()
    (fake / "README.md").write_text("hello")
    r = cli_run("train", ws / "recipe.yaml", f"model.path={fake}", f"output_dir={tmp_path / 'run'}", *FAST)
    assert_user_error(r, "not-a-model", "model.path", "config.json")
    assert not (tmp_path / "run").exists()


def test_config_typo(ws, cli_run):
    r = cli_run("train", ws / "recipe.yaml", "train.lrr=1e-3")
    assert_user_error(r, "train.lrr", "did you mean 'train.lr'")
    r = cli_run("config", "show", ws / "recipe.yaml", "trian.lr=1e-3")
    assert_user_error(r, "trian", "did you mean 'train'")


@pytest.mark.parametrize("override, key", [("train.lr=-1", "train.lr"), ("method.r=0", "method.r"),
                                           ("data.val_fraction=1.5", "data.val_fraction")])
def test_out_of_range_value(override, key, ws, cli_run):
    r = cli_run("train", ws / "recipe.yaml", override)
    assert_user_error(r, f"'{key}'")


def test_bad_override_syntax_and_missing_recipe(ws, tmp_path, cli_run):
    assert_user_error(cli_run("train", ws / "recipe.yaml", "train.lr"), "train.lr", "key=value")
    assert_user_error(cli_run("train", tmp_path / "missing.yaml"), "missing.yaml", "does not exist")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: [unclosed\n")
    assert_user_error(cli_run("config", "show", bad), "bad.yaml", "not valid YAML", "line ")


def test_method_error_leaves_no_run_dir(ws, tmp_path, cli_run):
    out = tmp_path / "run"
    r = cli_run("train", ws / "recipe.yaml", "method.target_modules=[nope]", "eval.base=false", f"output_dir={out}", *FAST)
    assert_user_error(r, "method.target_modules", "'nope'", "query, value")
    assert not out.exists()


def test_existing_output_dir_is_left_alone(ws, tmp_path, cli_run):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = snapshot(out)
    r = cli_run("train", ws / "recipe.yaml", f"output_dir={out}", *FAST)
    assert_user_error(r, str(out), "--overwrite", "notes.txt")
    assert snapshot(out) == before

    # --overwrite does not make it delete a directory that is not a run.
    r = cli_run("train", ws / "recipe.yaml", f"output_dir={out}", "--overwrite", *FAST)
    assert_user_error(r, str(out), "is not provably a tunelab run")
    assert snapshot(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "sub"]


def test_output_dir_is_a_file(ws, tmp_path, cli_run):
    f = tmp_path / "run"
    f.write_text("x")
    assert_user_error(cli_run("train", ws / "recipe.yaml", f"output_dir={f}", *FAST), "is a file")
    assert f.read_text() == "x"


def test_overwrite_replaces_an_existing_run(ws, tmp_path, cli_run):
    small = write_jsonl(tmp_path / "small.jsonl", make_rows(60, seed=7))
    out = tmp_path / "run"
    common = ("train", ws / "recipe.yaml", f"data.train={small}", "data.test=", "eval.base=false", "train.max_steps=2",
              f"output_dir={out}", *FAST)
    r = cli_run(*common)
    assert r.code == 0, r.err
    (out / "stale.txt").write_text("from the old run")

    # Without --overwrite: refused.
    assert_user_error(cli_run(*common), "--overwrite")
    assert (out / "stale.txt").exists()

    # --overwrite with bad input fails before touching the old run.
    before = snapshot(out)
    r = cli_run(*common, f"data.train={tmp_path / 'missing.jsonl'}", "--overwrite")
    assert_user_error(r, "missing.jsonl", "data.train")
    assert snapshot(out) == before

    r = cli_run(*common, "--overwrite")
    assert r.code == 0, r.err
    assert not (out / "stale.txt").exists()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert len([l for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]) >= 1


def test_predict_output_exists(ws, tmp_path, lora_run, cli_run):
    out = tmp_path / "preds.jsonl"
    out.write_text("keep me\n")
    r = cli_run("predict", lora_run, "--text", "great film", "--output", out)
    assert_user_error(r, str(out), "--overwrite")
    assert out.read_text() == "keep me\n"

    r = cli_run("predict", lora_run, "--text", "great film", "--output", out, "--overwrite")
    assert r.code == 0, r.err
    (p,) = read_jsonl(out)
    check_prediction(p)


def test_unwritable_output_paths(ws, tmp_path, lora_run, cli_run):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    r = cli_run("predict", lora_run, "--text", "great film", "--output", folder, "--overwrite")
    assert_user_error(r, "Could not write", str(folder), "--output")
    assert folder.is_dir() and not any(folder.iterdir())

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    r = cli_run("eval", lora_run, ws / "test.jsonl", "--output", blocker / "metrics.json")
    assert_user_error(r, "Could not write", str(blocker / "metrics.json"), "--output")
    assert blocker.read_text() == "x"


@pytest.fixture(scope="module")
def emb_run(ws, tiny_bert) -> Path:
    """A one-step embedding run, for `tunelab embed`."""
    rows = [{"anchor": r["text"], "positive": r["text"]} for r in make_rows(24, seed=5)]
    train = write_jsonl(ws / "pairs.jsonl", rows)
    return tunelab.train(None, [f"model.path={tiny_bert}", f"data.train={train}", "task.type=embedding",
                                "method.name=lora", "train.max_steps=1", "eval.forgetting=none",
                                f"output_dir={ws / 'runs' / 'emb'}"]).dir


def test_eval_output_needs_overwrite(ws, tmp_path, lora_run, cli_run):
    out = tmp_path / "metrics.json"
    out.write_text("keep me\n")
    assert_user_error(cli_run("eval", lora_run, ws / "test.jsonl", "-o", out), str(out), "--overwrite")
    assert out.read_text() == "keep me\n"
    r = cli_run("eval", lora_run, ws / "test.jsonl", "-o", out, "--overwrite")
    assert r.code == 0, r.err
    assert json.loads(out.read_text())["examples"] == 60


def test_eval_default_outputs_of_files_with_one_name_keep_apart(tmp_path, lora_run, cli_run):
    saved = {}
    for folder, seed in (("a", 1), ("b", 2)):
        (tmp_path / folder).mkdir()
        f = write_jsonl(tmp_path / folder / "test.jsonl", make_rows(10, seed=seed))
        r = cli_run("eval", lora_run, f)
        assert r.code == 0, r.err
        saved[f] = Path(r.out.split("metrics -> ")[1].strip())
    assert len(set(saved.values())) == 2
    for f, out in saved.items():
        assert out.parent == lora_run / "eval" and out.name.startswith("test-")
        assert json.loads(out.read_text())["file"] == str(f)


def test_no_output_may_be_the_input(tmp_path, lora_run, emb_run, cli_run):
    data = write_jsonl(tmp_path / "texts.jsonl", [{"text": "great film", "label": "pos", "prompt": "hi"}])
    before = data.read_bytes()
    link = tmp_path / "vectors.npy"
    link.symlink_to(data)  # another name for the same file
    for args in (("predict", lora_run, data, "-o", data), ("eval", lora_run, data, "-o", data),
                 ("generate", lora_run, "--input", data, "-o", data), ("embed", emb_run, "--input", data, "-o", link)):
        assert_user_error(cli_run(*args, "--overwrite"), "is the input file", str(data))
    assert data.read_bytes() == before and link.is_symlink()


def test_outputs_replace_a_dangling_link_instead_of_following_it(ws, tmp_path, lora_run, emb_run, cli_run):
    (tmp_path / "elsewhere").mkdir()
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": "great film"}])
    for name, args in (("preds.jsonl", ("predict", lora_run, "--text", "great film")),
                       ("metrics.json", ("eval", lora_run, ws / "test.jsonl")),
                       ("vectors.npy", ("embed", emb_run, "--input", texts))):
        link, target = tmp_path / name, tmp_path / "elsewhere" / name
        link.symlink_to(target)
        assert_user_error(cli_run(*args, "-o", link), str(link), "--overwrite")  # a link is the user's too
        r = cli_run(*args, "-o", link, "--overwrite")
        assert r.code == 0, r.err
        assert link.is_file() and not link.is_symlink() and not target.exists(), name
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_a_failed_write_leaves_the_old_output(tmp_path, lora_run, monkeypatch, cli_run):
    import errno

    from tunelab import atomic

    out = tmp_path / "preds.jsonl"
    out.write_text("keep me\n")

    def full_disk(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "fsync_path", full_disk)
    r = cli_run("predict", lora_run, "--text", "great film", "-o", out, "--overwrite")
    assert_user_error(r, str(out), "No space left", "Nothing was replaced")
    assert out.read_text() == "keep me\n" and [p.name for p in tmp_path.iterdir()] == ["preds.jsonl"]


def test_predict_needs_exactly_one_input(ws, lora_run, cli_run):
    assert_user_error(cli_run("predict", lora_run), "--text")
    assert_user_error(cli_run("predict", lora_run, ws / "test.jsonl", "--text", "x"), "--text", "not both")


@pytest.mark.parametrize("kind", ["plain_dir", "missing_dir", "model_dir"])
def test_predict_on_a_non_run(kind, tmp_path, tiny_bert, cli_run):
    if kind == "plain_dir":
        run = tmp_path / "stuff"
        run.mkdir()
        (run / "a.txt").write_text("x")
    elif kind == "missing_dir":
        run = tmp_path / "nothing-here"
    else:
        run = tiny_bert  # a model directory, not a run
    expected = "does not exist" if kind == "missing_dir" else "not a finished tunelab run directory"
    r = cli_run("predict", run, "--text", "great film")
    assert_user_error(r, str(run), expected)
    r = cli_run("eval", run, tmp_path / "whatever.jsonl")
    assert_user_error(r, str(run), expected)


def test_predict_file_problems(tmp_path, lora_run, cli_run):
    missing = tmp_path / "texts.jsonl"
    assert_user_error(cli_run("predict", lora_run, missing), str(missing), "does not exist")
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"review": "great film"}])
    assert_user_error(cli_run("predict", lora_run, wrong), "no 'text' column", "'review'")
    r = cli_run("predict", lora_run, wrong, "--text-field", "review")
    assert r.code == 0, r.err
    check_prediction(json.loads(r.out))


def test_eval_unseen_labels(tmp_path, lora_run, cli_run):
    f = write_jsonl(tmp_path / "other.jsonl", [{"text": "great film", "label": "pos"}, {"text": "meh", "label": "neutral"}])
    r = cli_run("eval", lora_run, f)
    assert_user_error(r, "other.jsonl", "'neutral'", "never seen in training", "'neg', 'pos'")
    assert not list((lora_run / "eval").glob("other*"))


def test_eval_file_problems(tmp_path, lora_run, cli_run):
    missing = tmp_path / "nope.jsonl"
    assert_user_error(cli_run("eval", lora_run, missing), str(missing), "does not exist")
    nolabel = write_jsonl(tmp_path / "nolabel.jsonl", [{"text": "great film", "stars": 5}])
    assert_user_error(cli_run("eval", lora_run, nolabel), "no 'label' column", "'text', 'stars'")
    empty_labels = write_jsonl(tmp_path / "blank.jsonl", [{"text": "great film", "label": ""}])
    assert_user_error(cli_run("eval", lora_run, empty_labels), "blank.jsonl", "no rows")


def test_usage_errors_are_not_tracebacks(cli_run):
    r = cli_run("train")
    assert r.code == 2 and "Traceback" not in r.err and "Give a recipe" in r.err and "--resume RUN_DIR" in r.err
    r = cli_run("frobnicate")
    assert r.code == 2 and "Traceback" not in r.err and "No such command" in r.err


def test_ctrl_c_exits_130(monkeypatch, ws, cli_run):
    """Ctrl-C during training must not look like success to a shell script (`tunelab train ... && ...`)."""

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tunelab, "train", interrupted)
    r = cli_run("train", ws / "recipe.yaml")
    assert r.code == 130, (r.code, r.err)
    assert r.err.strip() == "interrupted"


# -- compare and report ------------------------------------------------------------------

def test_compare_from_the_command_line(ws, cli_run):
    out = ws / "cmp"
    r = cli_run("compare", ws / "recipe.yaml", "eval.linear_probe=false", "--methods", "lora,bitfit", "--steps", "3",
                "--set", "lora.r=2", "--lr", "bitfit=5e-3", "--output", out)
    assert r.code == 0, r.err
    assert "| lora |" in r.out and "| bitfit |" in r.out and f"compare directory: {out.resolve()}" in r.out
    rows = json.loads((out / "compare.json").read_text())
    recipe_lr = yaml.safe_load((ws / "recipe.yaml").read_text())["train"]["lr"]  # the recipe's method keeps its LR
    assert [(x["method"], x["status"], x["lr"], x["steps"]) for x in rows] == [("lora", "ok", recipe_lr, 3),
                                                                                ("bitfit", "ok", 5e-3, 3)]
    assert yaml.safe_load((out / "recipes" / "lora.yaml").read_text())["method"]["r"] == 2
    again = cli_run("compare", ws / "recipe.yaml", "--methods", "lora", "--output", out)
    assert_user_error(again, "already exists", "--overwrite")
    (out / "report.html").unlink()
    r = cli_run("report", out)
    assert r.code == 0 and (out / "report.html").is_file()


def test_report_of_a_run_and_of_nothing(ws, lora_run, cli_run, tmp_path):
    (lora_run / "report.html").unlink()
    r = cli_run("report", lora_run)
    assert r.code == 0 and "base vs tuned" in (lora_run / "report.html").read_text().lower()
    assert_user_error(cli_run("report", tmp_path), "neither a finished run", "compare.json")


def test_compare_rejects_unknown_methods(ws, cli_run):
    assert_user_error(cli_run("compare", ws / "recipe.yaml", "--methods", "lora,qlorra"), "qlorra", "did you mean qlora")


def test_advise_from_the_command_line(cli_run, tiny_chat_llama):
    r = cli_run("advise", "--model", tiny_chat_llama, "--task", "sft", "--seq-len", "64", "--batch", "2",
                "--memory", "64GB", "--tasks", "3")
    assert r.code == 0, r.err
    assert "Recommendations:" in r.out and all(f"\n{m} " in r.out for m in ("full", "lora", "qlora", "prompt"))
    assert "per task" in r.out.lower()
    assert_user_error(cli_run("advise", "--model", tiny_chat_llama, "--task", "sft", "--seq-len", "64", "--batch", "2",
                              "--memory", "lots"), "lots")
    assert_user_error(cli_run("advise", "--model", "/nonexistent/model", "--task", "sft", "--seq-len", "64",
                              "--batch", "2"), "/nonexistent/model")
