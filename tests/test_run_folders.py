"""Run folders are as careful with the user's files as git: a run replaces an old one only once it has finished,
deletes only folders that are provably tunelab's, holds a lock for its whole life, and never writes where it reads."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_chat_rows, make_rows, write_jsonl

import tunelab
from tunelab import TunelabError, config, runs
from tunelab.tasks import classification

QUICK = ["train.max_steps=2", "train.batch_size=4", "eval.base=false", "eval.linear_probe=false", "eval.samples=0",
         "eval.forgetting=none"]


def _args(model: Path, train: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.path={model}", f"data.train={train}", "method.name=lora", *QUICK, f"output_dir={out}", *extra]


def _cli(tmp: Path, model: Path, train: Path, out: Path, *extra: str) -> list[str]:
    """`tunelab train RECIPE overrides...` arguments for the same run as `_args`."""
    recipe = tmp / "recipe.yaml"
    recipe.write_text(f"model: {{path: {model}}}\ndata: {{train: {train}}}\n", encoding="utf-8")
    return ["train", str(recipe), *_args(model, train, out, *extra)[2:]]


def _snapshot(d: Path) -> dict:
    return {str(f.relative_to(d)): (f.read_bytes(), f.stat().st_mtime_ns) for f in sorted(d.rglob("*")) if f.is_file()}


def _ctrl_c_at_loss_call(n: int, monkeypatch) -> None:
    """Ctrl-C during the n-th loss computation (`monkeypatch.undo()` ends it)."""
    real, calls = classification.loss, {"n": 0}

    def interrupted(*a, **kw):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(classification, "loss", interrupted)


def _litter(d: Path) -> list[str]:
    """Hidden staging or temporary names left beside or inside a folder."""
    temporary = re.compile(r"\.(tmp|tunelab-new|tunelab-old)-\d+-[0-9a-f]{6}$|^\.tmp-step-")
    return sorted(p.name for p in [*d.parent.iterdir(), *d.rglob("*")] if temporary.search(p.name))


@pytest.fixture
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", make_rows(40, seed=1))


@pytest.fixture
def old_run(tiny_bert, data, tmp_path) -> tuple[Path, dict]:
    """A finished run, and a snapshot of its bytes."""
    out = tmp_path / "runs" / "sentiment"
    tunelab.train(None, _args(tiny_bert, data, out))
    assert runs.marker(out)["kind"] == "run"
    return out, _snapshot(out)


def _unchanged(old_run) -> None:
    out, before = old_run
    assert _snapshot(out) == before, "the old run was changed"
    assert not _litter(out), f"left behind: {_litter(out)}"


# -- --overwrite replaces a run only once the new one has finished ---------------------------------------------------

def test_overwrite_swaps_the_new_run_in_and_deletes_the_old_one_last(tiny_bert, data, old_run):
    out, before = old_run
    run = tunelab.train(None, _args(tiny_bert, data, out, "train.max_steps=3"), overwrite=True)
    assert run.dir == out.resolve() and run.summary["steps"] == 3
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert runs.marker(out)["id"] != json.loads(before[runs.MARKER][0])["id"] and "replaces" not in runs.marker(out)
    assert not _litter(out)
    assert tunelab.load(out).predict(["a great film"])[0]["label"] in ("pos", "neg")


def test_a_run_stopped_by_non_finite_losses_leaves_the_old_run(tiny_bert, data, old_run, monkeypatch):
    real = classification.loss
    monkeypatch.setattr(classification, "loss", lambda *a, **kw: real(*a, **kw) * float("nan"))
    with pytest.raises(TunelabError, match="not finite"):
        tunelab.train(None, _args(tiny_bert, data, old_run[0], "train.max_bad_steps=2", "train.max_steps=4"),
                      overwrite=True)
    _unchanged(old_run)


def test_a_late_config_error_leaves_the_old_run(tiny_gpt2, data, old_run):
    """padding_free on GPT-2 is refused only once the loop starts, after the new folder exists."""
    with pytest.raises(TunelabError, match="packed rows"):
        tunelab.train(None, _args(tiny_gpt2, data, old_run[0], "train.padding_free=true"), overwrite=True)
    _unchanged(old_run)


def test_ctrl_c_leaves_the_old_run(tiny_bert, data, old_run, monkeypatch):
    _ctrl_c_at_loss_call(2, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        tunelab.train(None, _args(tiny_bert, data, old_run[0]), overwrite=True)
    _unchanged(old_run)


def test_an_interrupted_replacement_with_checkpoints_resumes_and_then_replaces(tiny_bert, data, old_run, monkeypatch,
                                                                              capsys):
    out, before = old_run
    _ctrl_c_at_loss_call(4, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        tunelab.train(None, _args(tiny_bert, data, out, "train.max_steps=6", "train.checkpoint_every=1"), overwrite=True)
    assert _snapshot(out) == before
    kept = [p for p in out.parent.iterdir() if ".tunelab-new" in p.name]
    assert len(kept) == 1 and f"--resume {kept[0]}" in capsys.readouterr().out
    monkeypatch.undo()
    run = tunelab.resume(kept[0])
    assert run.dir == out.resolve() and run.summary["steps"] == 6 and not kept[0].exists()
    assert json.loads((out / "summary.json").read_text())["steps"] == 6 and not _litter(out)


def test_a_grpo_reward_that_fails_mid_run_leaves_the_old_run(tiny_chat_llama, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say word {i}"} for i in range(8)])
    (tmp_path / "reward.py").write_text(
        "calls = []\n"
        "def flaky(prompts, completions):\n"
        "    calls.append(1)\n"
        "    if len(calls) > 3:\n"
        "        raise RuntimeError('the scoring service is down')\n"
        "    return [float(len(c)) for c in completions]\n")
    (tmp_path / "good.py").write_text("def ok(prompts, completions):\n    return [1.0 for c in completions]\n")
    out = tmp_path / "rl"
    grpo = lambda reward: [f"model.path={tiny_chat_llama}", f"data.train={prompts}", "task.type=grpo",
                           f"task.reward_function={tmp_path / reward}", "task.group_size=2", "method.name=lora",
                           "train.max_steps=3", "train.batch_size=2", "eval.max_new_tokens=3", f"output_dir={out}"]
    tunelab.train(None, grpo("good.py:ok"))
    before = _snapshot(out)
    with pytest.raises(Exception, match="scoring service is down"):
        tunelab.train(None, grpo("reward.py:flaky"), overwrite=True)
    assert _snapshot(out) == before and not _litter(out)


def test_a_full_disk_at_any_write_leaves_the_old_run(tiny_bert, data, old_run, monkeypatch, cli_run):
    """ENOSPC injected at the n-th fsync of a file (where a full disk shows up at the latest), for every n a run
    reaches: each write site (checkpoints, run files, weights, summary) fails with one paragraph, removes its
    temporary files and leaves the old run as it was."""
    out = old_run[0]
    real_fsync, seen = os.fsync, {"n": 0, "fail_at": 0}

    def fsync(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):  # a folder's fsync only makes a rename durable
            seen["n"] += 1
            if seen["n"] == seen["fail_at"]:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    args = [*_cli(out.parent.parent, tiny_bert, data, out, "train.checkpoint_every=1"), "--overwrite"]
    n = 1
    while True:
        seen.update(n=0, fail_at=n)
        r = cli_run(*args)
        if seen["n"] < n:  # this run made fewer fsyncs than n: it went through, and replaced the old run
            assert r.code == 0, r.err
            break
        if r.code == 0:  # report.html is written last, from the finished run, and only a warning when it fails
            assert "warning: report.html could not be written" in r.out and "No space left" in r.out
            n += 1
            continue
        assert r.code == 2 and r.err.startswith("error: Could not write") and "No space left" in r.err, (n, r.err[-3000:])
        assert r.err.strip().count("\n") == 0 and "Traceback" not in r.err
        assert _snapshot(out) == old_run[1], f"write {n} changed the old run"
        kept = [p for p in out.parent.iterdir() if ".tunelab-new-" in p.name]
        if kept:  # a new run with checkpoints is kept to resume from, and the user told so; nothing else is left
            assert len(kept) == 1 and any(kept[0].glob("checkpoints/step-*")) and f"--resume {kept[0]}" in r.out
            shutil.rmtree(kept[0])
        assert not _litter(out), f"write {n} left {_litter(out)}"
        n += 1
    assert n > 10, f"only {n - 1} writes were tried"
    assert not _litter(out) and json.loads((out / "summary.json").read_text())["steps"] == 2


# -- what --overwrite may delete -------------------------------------------------------------------------------------

def test_overwrite_refuses_a_folder_tunelab_did_not_make(tiny_bert, data, tmp_path, cli_run):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("years of work\n")
    (mine / "config.yaml").write_text("latex: true\n")
    before = _snapshot(mine)
    r = cli_run(*_cli(tmp_path, tiny_bert, data, mine), "--overwrite")
    assert r.code == 2 and "is not provably a tunelab run" in r.err and "rm -r" in r.err
    assert _snapshot(mine) == before


def test_a_run_made_before_the_marker_is_recognised_by_its_files(tiny_bert, data, old_run, tmp_path, cli_run):
    out = old_run[0]
    (out / runs.MARKER).unlink()
    assert runs.whose(out) == "run"
    (out / "notes.txt").write_text("mine\n")  # a file tunelab never writes: no longer provably a run
    r = cli_run(*_cli(tmp_path, tiny_bert, data, out), "--overwrite")
    assert r.code == 2 and "not provably a tunelab run" in r.err and (out / "notes.txt").is_file()
    (out / "notes.txt").unlink()
    r = cli_run(*_cli(tmp_path, tiny_bert, data, out), "--overwrite")
    assert r.code == 0, r.err
    assert runs.marker(out)["kind"] == "run" and not _litter(out)


def test_compare_overwrite_replaces_its_own_earlier_output(tiny_bert, data, tmp_path):
    from tunelab import compare

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{path: {tiny_bert}}}\ndata: {{train: {data}}}\nmethod: {{name: lora}}\n"
                      f"eval: {{samples: 0, forgetting: none, linear_probe: false}}\n")
    out = tmp_path / "cmp"
    compare.run(str(recipe), [], ["bitfit"], str(out), steps=1, echo=lambda m: None)
    assert runs.marker(out)["kind"] == "compare"
    rows = compare.run(str(recipe), [], ["lora"], str(out), steps=1, overwrite=True, echo=lambda m: None)
    assert [r["method"] for r in rows] == ["lora"] and rows[0]["status"] == "ok"
    assert not (out / "runs" / "bitfit").exists() and not _litter(out)
    with pytest.raises(TunelabError, match="is a tunelab compare folder, not a run"):
        tunelab.train(None, _args(tiny_bert, data, out), overwrite=True)


# -- never write where the run reads -----------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["model", "model_parent", "data_parent", "forgetting"])
def test_output_dir_may_not_be_or_hold_an_input(tiny_bert, tmp_path, cli_run, where):
    model = tmp_path / "models" / "bert"
    shutil.copytree(tiny_bert, model)
    (tmp_path / "data").mkdir()
    data = write_jsonl(tmp_path / "data" / "train.jsonl", make_rows(30, seed=2))
    (tmp_path / "probes").mkdir()
    probe = tmp_path / "probes" / "general.txt"
    probe.write_text("Some general text.\n\nMore of it here.\n")
    out, key = {"model": (model, "model.path"), "model_parent": (model.parent, "model.path"),
                "data_parent": (data.parent, "data.train"), "forgetting": (probe.parent, "eval.forgetting")}[where]
    extra = [f"eval.forgetting={probe}"] if where == "forgetting" else []
    (tmp_path / "recipes").mkdir()
    args = _cli(tmp_path / "recipes", model, data, out, *extra)
    before = _snapshot(tmp_path)
    r = cli_run(*args, "--overwrite")
    assert r.code == 2 and key in r.err and "outside it" in r.err, r.err
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["judge_run", "judge_run_parent", "judge_file_parent", "reward_file_parent"])
def test_output_dir_may_not_be_or_hold_the_judge_or_the_reward(tiny_chat_llama, tmp_path, where):
    """eval.judge's reward run or .py file, and task.reward_function's .py file, are inputs like the data."""
    data = write_jsonl(tmp_path / "train.jsonl", make_chat_rows(20))
    judges = tmp_path / "judges"
    (judges / "rm").mkdir(parents=True)
    (judges / "rm" / "weights.bin").write_bytes(b"yours")  # a folder given as the judge is read as a reward run
    (judges / "score.py").write_text("def length(prompts, replies, references):\n    return [len(r) for r in replies]\n")
    sft = [f"model.path={tiny_chat_llama}", f"data.train={data}", "task.type=sft", "eval.generate=2", *QUICK]
    grpo = [f"model.path={tiny_chat_llama}", f"data.train={data}", "task.type=grpo", "train.max_steps=1"]
    out, args, key = {
        "judge_run": (judges / "rm", [*sft, f"eval.judge={judges / 'rm'}"], "eval.judge"),
        "judge_run_parent": (judges, [*sft, f"eval.judge={judges / 'rm'}"], "eval.judge"),
        "judge_file_parent": (judges, [*sft, f"eval.judge={judges / 'score.py'}:length"], "eval.judge"),
        "reward_file_parent": (judges, [*grpo, f"task.reward_function={judges / 'score.py'}:length"],
                               "task.reward_function"),
    }[where]
    before = _snapshot(tmp_path)
    with pytest.raises(TunelabError, match=rf"output_dir '.*' (is|holds) {re.escape(key)} .*outside it") as e:
        tunelab.train(None, [*args, f"output_dir={out}"], overwrite=True)
    assert "\n" not in str(e.value)
    assert _snapshot(tmp_path) == before


def test_the_saved_config_names_judges_rewards_and_probes_by_absolute_paths(tmp_path, monkeypatch):
    """Relative paths in a recipe are resolved against the folder it was run from, so the run's config.yaml means
    the same from anywhere (--resume, tunelab.load); a 'module:function' is found by import and stays as written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rm").mkdir()
    (tmp_path / "judges.py").write_text("")
    (tmp_path / "probe.txt").write_text("Some general text.\n")

    def saved(task: dict, **eval_cfg):
        cfg = config.validate({"model": {"path": "m"}, "data": {"train": "x.jsonl"}, "task": task, "eval": eval_cfg})
        return runs.resolve_paths(cfg, tmp_path / "out")

    sft = {"type": "sft"}
    assert saved(sft, generate=2, judge="rm").eval.judge == str(tmp_path / "rm")
    assert saved(sft, generate=2, judge="./rm/").eval.judge == str(tmp_path / "rm")
    assert saved(sft, generate=2, judge="judges.py:length").eval.judge == f"{tmp_path / 'judges.py'}:length"
    assert saved(sft, generate=2, judge="mypkg.judges:score").eval.judge == "mypkg.judges:score"
    assert saved(sft, generate=2, judge="elsewhere.py:score").eval.judge == "elsewhere.py:score"  # not here: as given
    assert saved(sft, forgetting="probe.txt").eval.forgetting == str(tmp_path / "probe.txt")
    assert saved(sft).eval.forgetting == "auto"
    grpo = {"type": "grpo"}
    assert saved({**grpo, "reward_function": "judges.py:length"}).task.reward_function == \
        f"{tmp_path / 'judges.py'}:length"
    assert saved({**grpo, "reward_function": "mypkg.rewards:score"}).task.reward_function == "mypkg.rewards:score"
    assert saved({**grpo, "reward_model": "rm"}).task.reward_model == str(tmp_path / "rm")


def test_output_dir_as_a_symlink_is_refused(tiny_bert, data, old_run, tmp_path, cli_run):
    link = tmp_path / "latest"
    link.symlink_to(old_run[0])
    r = cli_run(*_cli(tmp_path, tiny_bert, data, link), "--overwrite")
    assert r.code == 2 and "symbolic link" in r.err
    _unchanged(old_run)


def test_output_dir_expands_the_home_folder(tiny_bert, data, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    run = tunelab.train(None, _args(tiny_bert, data, "~/runs/x"))
    assert run.dir == (tmp_path / "home" / "runs" / "x").resolve() and (run.dir / "summary.json").is_file()
    assert not Path("~").exists()


# -- one run per folder at a time ------------------------------------------------------------------------------------

def _hold_lock(path: Path) -> subprocess.Popen:
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
            "print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_locked_run_folder_is_refused_naming_the_holder_until_it_dies(tiny_bert, data, old_run, tmp_path, cli_run):
    out = old_run[0]
    holder = _hold_lock(out)
    try:
        r = cli_run(*_cli(tmp_path, tiny_bert, data, out), "--overwrite")
        assert r.code == 2 and f"in use by process {holder.pid}" in r.err and "fcntl" in r.err, r.err
        _unchanged(old_run)
    finally:
        holder.kill()
        holder.wait()
    r = cli_run(*_cli(tmp_path, tiny_bert, data, out), "--overwrite")  # the kernel dropped the dead one's lock
    assert r.code == 0, r.err


def test_resume_of_a_run_in_use_is_refused(tiny_bert, data, tmp_path, monkeypatch):
    _ctrl_c_at_loss_call(3, monkeypatch)
    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        tunelab.train(None, _args(tiny_bert, data, out, "train.max_steps=4", "train.checkpoint_every=1"))
    monkeypatch.undo()
    fd = runs.lock(out, "test")
    try:
        with pytest.raises(TunelabError, match="Cannot resume .* in use by another run in this process"):
            tunelab.resume(out)
    finally:
        runs.unlock(fd)
    assert tunelab.resume(out).summary["steps"] == 4


def test_a_second_run_into_a_folder_another_is_writing_is_refused(tiny_bert, data, tmp_path):
    out = tmp_path / "new"
    with runs.claim(out, overwrite=False) as claim:
        claim.make()
        with pytest.raises(TunelabError, match="already exists and is not empty"):
            tunelab.train(None, _args(tiny_bert, data, out))
        with pytest.raises(TunelabError, match="in use by another run in this process"):
            tunelab.train(None, _args(tiny_bert, data, out), overwrite=True)


# -- a real full disk --------------------------------------------------------------------------------------------------

FULL_DISK = r'''
import json, os, shutil, subprocess, sys
from pathlib import Path
disk, old, args, sizes = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
snap = lambda d: {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}
results = []
for kb in sizes:
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kb}k", "tmpfs", str(disk)], check=True)
    out = disk / "run"
    shutil.copytree(old, out)
    before = snap(out)
    p = subprocess.run([sys.executable, "-m", "tunelab", *args, f"output_dir={out}", "--overwrite"],
                       capture_output=True, text=True)
    left = sorted(x.name for x in disk.iterdir())
    results.append({"kb": kb, "code": p.returncode, "err": p.stderr[-2000:], "left": left,
                    "same": snap(out) == before, "steps": json.loads((out / "summary.json").read_text()).get("steps")})
    subprocess.run(["umount", str(disk)], check=True)
print(json.dumps(results))
'''


def _namespace_with_mounts() -> list[str] | None:
    """A command prefix under which this test may mount a tmpfs: root as is, or an unprivileged user namespace."""
    probe = "mkdir -p /tmp/.tunelab-probe && mount -t tmpfs -o size=4k tmpfs /tmp/.tunelab-probe && umount /tmp/.tunelab-probe"
    for prefix in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
        if shutil.which(prefix[0]) and subprocess.run([*prefix, "sh", "-c", probe], capture_output=True).returncode == 0:
            return prefix
    return None


def test_a_real_full_disk_gives_one_paragraph_and_leaves_the_old_run(tiny_bert, data, old_run, tmp_path):
    """A small tmpfs holds the old run and room for part of the new one: whichever write runs out of space, the
    command ends in one paragraph and the old run is as it was; with room enough, it is replaced."""
    prefix = _namespace_with_mounts()
    if prefix is None:
        pytest.skip("this machine lets neither root nor a user namespace mount a tmpfs; the injected ENOSPC test "
                    "above covers every write site")
    out, _ = old_run
    old_kb = sum(4 * -(-f.stat().st_size // 4096) for f in out.rglob("*") if f.is_file())  # tmpfs counts 4 KiB pages
    sizes = [old_kb + extra for extra in (8, 40, 120, 4 * old_kb + 400)]
    disk = tmp_path / "disk"
    disk.mkdir()
    args = _cli(tmp_path, tiny_bert, data, out, "train.max_steps=3", "train.checkpoint_every=1")
    args = [a for a in args if not a.startswith("output_dir=")]  # the script writes into the tmpfs
    p = subprocess.run([*prefix, sys.executable, "-c", FULL_DISK, str(disk), str(out), json.dumps(args),
                        json.dumps(sizes)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads(p.stdout.strip().splitlines()[-1])
    for r in results:
        staged = [x for x in r["left"] if x != "run"]  # kept only when it holds checkpoints to resume from
        assert not staged or (len(staged) == 1 and f"--resume {disk / staged[0]}" in r["err"]), r
        if r["code"] == 0:
            assert r["steps"] == 3, r
            continue
        assert r["code"] == 2 and r["same"] and r["steps"] == 2, r
        msg = r["err"].strip().splitlines()[-1]
        assert msg.startswith("error: ") and "No space left on device" in msg and "Traceback" not in r["err"], r
    assert results[0]["code"] == 2 and results[-1]["code"] == 0, [(r["kb"], r["code"]) for r in results]


def test_a_summary_cut_short_does_not_make_a_run_unresumable(tiny_bert, data, tmp_path, monkeypatch):
    """A crash while a summary was written (by a tunelab that did not write it atomically) leaves a partial file:
    the run's checkpoints still resume it, and the finished run gets a whole summary."""
    _ctrl_c_at_loss_call(3, monkeypatch)
    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        tunelab.train(None, _args(tiny_bert, data, out, "train.max_steps=4", "train.checkpoint_every=1"))
    monkeypatch.undo()
    (out / "summary.json").write_text('{"method": "lora", "task": "classif')
    run = tunelab.resume(out)
    assert run.summary["steps"] == 4 and json.loads((out / "summary.json").read_text())["steps"] == 4
    with pytest.raises(TunelabError, match="that run finished"):
        tunelab.resume(out)
