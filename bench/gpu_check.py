"""A GPU check ready to run on a lent CUDA machine in one call of under 10 minutes, writing one results file:

    python bench/gpu_check.py --fetch-wheels     # here, where pip reaches a registry: fills bench/gpu_wheels/
    bash bench/gpu_check.sh [--results PATH]     # there (a plain `python3` with torch); here it is a dry run

Steps, each in its own process group under its own time budget (a step that overruns is killed and recorded as
"timeout"; the others still run), in order:

    install              the packages the GPU image lacks, from the wheels in bench/gpu_wheels/ (no network there)
    cuda_tests           the CUDA-only tests (tests/test_gpu_check.py and every other test with `cuda` in its name)
    lora_smollm2         bench's lora-smollm2 scenario on CUDA, bf16 autocast: tunelab, peft + Trainer, TRL
    full_58m             bench's full-58m scenario on CUDA, bf16 autocast: tunelab, Trainer
    qlora_bitsandbytes   tunelab QLoRA (bitsandbytes NF4) and LoRA on the SmolLM2-shaped model: tok/s, peak memory
    padding_free_sdpa    padding-free rows against padded batches through SDPA: the same first-step loss
    advise_vs_measured   `tunelab advise`'s LoRA estimate against torch.cuda.max_memory_allocated of the same run

Without CUDA every step is skipped with the reason and the results file is still written (tests/test_gpu_check.py
runs that dry run). The file is rewritten after every step (temp name, then rename), so a call cut short still
leaves what was measured. SmolLM2's imported weights (540 MB) do not fit what a call may carry (64 MiB), so on the
GPU its scenarios run on a random-init model of SmolLM2's architecture and tokenizer (same shapes, so the same
speed and memory; the losses say nothing of the real model). docs/benchmarks.md says how to run it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = Path(os.environ.get("GPU_CHECK_WHEELS") or ROOT / "bench" / "gpu_wheels")  # (the variable: for tests)
SMOLLM2_FILES = WHEELS / "smollm2"  # config.json and tokenizer files of SmolLM2-135M-Instruct, copied by --fetch-wheels
CACHE = ROOT / "bench" / ".cache"
RESULTS = CACHE / "gpu_check.json"
SITE = Path("/tmp/gpu_check_site")  # where the carried wheels are installed (the image's site-packages is not ours)

# (step, seconds it may take). The sum (570 s) leaves a 10-minute call some room for the process start.
STEPS = [("install", 60), ("cuda_tests", 90), ("lora_smollm2", 150), ("full_58m", 80), ("qlora_bitsandbytes", 80),
         ("padding_free_sdpa", 40), ("advise_vs_measured", 70)]
# Import name -> distribution, for what tunelab, the bench's peers and QLoRA need beyond the GPU image (torch,
# transformers, peft, accelerate, safetensors, tokenizers, typer, rich, pyyaml, numpy, pyarrow, pytest are there).
NEEDED = {"pydantic": "pydantic", "pydantic_core": "pydantic-core", "annotated_types": "annotated-types",
          "typing_inspection": "typing-inspection", "datasets": "datasets", "dill": "dill",
          "multiprocess": "multiprocess", "trl": "trl", "bitsandbytes": "bitsandbytes", "torchao": "torchao"}
GPU_PYTHON = "3.12"  # the image's python3 (device/KINDS.md)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
SCENARIO_STEPS = 10  # optimizer steps per bench run on the GPU: 1 warm-up step + 9 timed
DEVICE = "cuda"  # where the steps train (a rehearsal of a step's code on CPU sets it to "cpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(RESULTS), help=f"the results file (default {RESULTS.relative_to(ROOT)})")
    parser.add_argument("--fetch-wheels", action="store_true", help="download the wheels the GPU image lacks into "
                                                                    "bench/gpu_wheels/ (here, with a registry)")
    parser.add_argument("--only", action="append", choices=[s for s, _ in STEPS], help="run only this step (repeat)")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # one step, inside its own process
    parser.add_argument("--step-result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fetch_wheels:
        return fetch_wheels()
    if args.step:
        result = STEP_FUNCTIONS[args.step]()
        Path(args.step_result).write_text(json.dumps(result, default=str), encoding="utf-8")
        return 0
    return run_all(Path(args.results), args.only)


# -- the parent: every step under its budget ---------------------------------------------------------------

def cuda_reason() -> str | None:
    """Why the check cannot run here (None: it can)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False): dry run"
    return None


def machine() -> dict:
    out = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
           "cpu_count": os.cpu_count(), "commit": _git("rev-parse", "HEAD"), "dirty": bool(_git("status", "--short"))}
    try:
        import torch

        out["torch"] = torch.__version__
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            out.update(gpu=props.name, gpu_memory_gb=props.total_memory / 2 ** 30,
                       compute_capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                       cuda=torch.version.cuda)
    except ImportError:
        out["torch"] = None
    smi = shutil.which("nvidia-smi")
    if smi:
        out["nvidia_smi"] = subprocess.run([smi, "-L"], capture_output=True, text=True, check=False).stdout.strip()
    return out


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def write(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def run_all(path: Path, only: list[str] | None) -> int:
    reason = cuda_reason()
    results = {"machine": machine(), "dry_run": reason is not None, "budget_s": sum(b for _, b in STEPS),
               "steps": {}}
    chosen = [(name, budget) for name, budget in STEPS if not only or name in only]
    for name, budget in chosen:  # every step is listed from the start: a cut-short call shows what never ran
        results["steps"][name] = {"status": "pending", "budget_s": budget}
    write(path, results)
    env = step_env()
    for name, budget in chosen:
        if reason:
            results["steps"][name] = {"status": "skipped", "budget_s": budget, "reason": reason}
            continue
        print(f"[gpu_check] {name} (at most {budget} s)", flush=True)
        results["steps"][name] = run_step(name, budget, env)
        step = results["steps"][name]
        print(f"[gpu_check] {name}: {step['status']} in {step.get('seconds', 0):.0f} s"
              + (f" ({step['reason']})" if step.get("reason") else ""), flush=True)
        write(path, results)
    write(path, results)
    counts = {}
    for step in results["steps"].values():
        counts[step["status"]] = counts.get(step["status"], 0) + 1
    print(f"[gpu_check] {', '.join(f'{n} {s}' for s, n in counts.items())}; written {path}", flush=True)
    return 0 if not any(s["status"] in ("failed", "timeout") for s in results["steps"].values()) else 1


def step_env() -> dict:
    """The steps import tunelab from src/ and the carried packages from SITE (nothing is installed into the image)."""
    paths = [str(SITE), str(ROOT / "src"), str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(":") if p]
    return {**os.environ, "PYTHONPATH": ":".join(paths), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_step(name: str, budget: float, env: dict) -> dict:
    """Run one step in its own process group; kill the whole group when it overruns its budget."""
    out = CACHE / "gpu_check" / f"{name}.json"
    log = CACHE / "gpu_check" / f"{name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with log.open("w", encoding="utf-8") as f:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--step", name, "--step-result",
                                 str(out)], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = "timeout"
    seconds = time.perf_counter() - t0
    tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
    base = {"budget_s": budget, "seconds": seconds, "log": os.path.relpath(log, ROOT)}
    if code == "timeout":
        return {**base, "status": "timeout", "reason": f"killed after its {budget} s budget", "log_tail": tail}
    if code != 0 or not out.is_file():
        return {**base, "status": "failed", "reason": f"exit {code}", "log_tail": tail}
    result = json.loads(out.read_text(encoding="utf-8"))
    return {**base, "status": result.pop("status", "ok"), **result}


# -- preparing the wheels (here) --------------------------------------------------------------------------

def fetch_wheels() -> int:
    """pip download, for the GPU image's Python and platform, of every NEEDED distribution at the version installed
    here (the newest where it is not installed here), and SmolLM2's config and tokenizer files."""
    import importlib.metadata as md

    WHEELS.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    failed = []
    for dist in NEEDED.values():
        try:
            spec = f"{dist}=={md.version(dist)}"
        except md.PackageNotFoundError:
            spec = dist
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", GPU_PYTHON, "--implementation", "cp", *platforms, "-d", str(WHEELS), spec]
        print("fetching", spec, flush=True)
        if subprocess.run(cmd, check=False).returncode:
            failed.append(spec)
    smollm2 = Path(os.environ.get("BENCH_SMOLLM2") or ROOT / "demo_data" / "models" / "smollm2-135m-instruct")
    if (smollm2 / "config.json").is_file():
        SMOLLM2_FILES.mkdir(parents=True, exist_ok=True)
        for f in smollm2.iterdir():
            if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".gguf")):
                shutil.copy2(f, SMOLLM2_FILES / f.name)
    else:
        failed.append(f"SmolLM2's config ({smollm2} has no config.json; `make demo-sft-data` imports it)")
    size = sum(f.stat().st_size for f in WHEELS.rglob("*") if f.is_file()) / 2 ** 20
    print(f"bench/gpu_wheels: {size:.1f} MiB (a call carries at most 64 MiB with the working tree)"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


# -- the steps (each in its own process, on the GPU) ------------------------------------------------------

def step_install() -> dict:
    missing = sorted(dist for module, dist in NEEDED.items() if importlib.util.find_spec(module) is None)
    if not missing:
        return {"status": "ok", "installed": [], "note": "everything needed is importable already"}
    wheels = sorted(str(w) for w in WHEELS.glob("*.whl"))
    if not wheels:
        return {"status": "failed", "missing": missing,
                "reason": "bench/gpu_wheels/ holds no wheels: run `python bench/gpu_check.py --fetch-wheels` here "
                          "first and carry bench/gpu_wheels"}
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(SITE), *wheels]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    sys.path.insert(0, str(SITE))
    importlib.invalidate_caches()
    still = sorted(dist for module, dist in NEEDED.items() if importlib.util.find_spec(module) is None)
    return {"status": "ok" if proc.returncode == 0 and not still else "failed", "missing_before": missing,
            "still_missing": still, "wheels": [Path(w).name for w in wheels],
            **({"reason": (proc.stderr.strip().splitlines() or ["pip failed"])[-1]} if proc.returncode else {})}


def step_cuda_tests() -> dict:
    tests = ["tests/test_gpu_check.py", "tests/test_train.py", "tests/test_qlora.py"]
    junit = CACHE / "gpu_check" / "cuda_tests.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
                           f"--junitxml={junit}", *tests], cwd=ROOT, capture_output=True, text=True, check=False)
    counts = _junit_counts(junit)
    return {"status": "ok" if proc.returncode == 0 else "failed", "tests": counts,
            "output_tail": proc.stdout.strip().splitlines()[-10:],
            **({"reason": f"pytest exit {proc.returncode}"} if proc.returncode else {})}


def _junit_counts(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    if not path.is_file():
        return {}
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def _smollm2_dir() -> tuple[Path, bool]:
    """(SmolLM2 model dir, random-init?): the imported model where it is here, else one built from its carried
    config and tokenizer with random weights (bench/.cache/smollm2-random)."""
    real = ROOT / "demo_data" / "models" / "smollm2-135m-instruct"
    if (real / "model.safetensors").is_file():
        return real, False
    out = CACHE / "smollm2-random"
    if not (out / "model.safetensors").is_file():
        if not (SMOLLM2_FILES / "config.json").is_file():
            raise FileNotFoundError("bench/gpu_wheels/smollm2/config.json is absent: run --fetch-wheels where "
                                    "demo_data/models/smollm2-135m-instruct exists")
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(42)
        config = AutoConfig.from_pretrained(SMOLLM2_FILES)
        AutoModelForCausalLM.from_config(config).save_pretrained(out)
        AutoTokenizer.from_pretrained(SMOLLM2_FILES).save_pretrained(out)
    return out, True


def _bench(scenario: str) -> dict:
    """One bench scenario on CUDA in bf16 autocast, every runner once, read back from its results file."""
    env = dict(os.environ)
    random_init = None
    if scenario == "lora-smollm2":
        model, random_init = _smollm2_dir()
        env["BENCH_SMOLLM2"] = str(model)
    out = CACHE / "gpu_check" / f"bench-{scenario}.json"
    cmd = [sys.executable, "-m", "bench", "--scenario", scenario, "--device", DEVICE, "--precision", "autocast",
           "--steps", str(SCENARIO_STEPS), "--repeats", "1", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode or not out.is_file():
        return {"status": "failed", "reason": f"bench exit {proc.returncode}",
                "output_tail": (proc.stdout + proc.stderr).strip().splitlines()[-10:]}
    sc = json.loads(out.read_text(encoding="utf-8"))["scenarios"][scenario]
    if "skipped" in sc:
        return {"status": "failed", "reason": sc["skipped"]}
    keep = ("tokens_per_s", "peak_cuda_mb", "peak_rss_mb", "mfu", "heldout_loss", "last5_loss", "settings")
    medians = {r: {k: m.get(k) for k in keep} for r, m in sc["median"].items()}
    failed = sorted(set(sc["runners"]) - set(medians))
    return {"status": "ok" if not failed else "failed", "random_init_weights": random_init, "runners": medians,
            "ratios_tunelab_over_peer": sc["ratios_tunelab_over_peer"], "steps": SCENARIO_STEPS,
            **({"reason": f"failed runners: {', '.join(failed)} (logs in bench/.cache/logs)"} if failed else {})}


def step_lora_smollm2() -> dict:
    return _bench("lora-smollm2")


def step_full_58m() -> dict:
    return _bench("full-58m")


def _chat_file(path: Path, rows: int, words: int, seed: int = 0, vary: bool = False) -> Path:
    """Chat rows of `words` words a reply (long enough that data.max_length cuts every one: each micro-batch is then
    batch x max_length tokens), or with `vary` of 1/8 to all of that, so that a batch needs padding."""
    import random

    rng = random.Random(seed)
    vocab = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(rows):
            text = lambda n: " ".join(rng.choice(vocab) for _ in range(n))  # noqa: E731
            n = rng.randint(max(1, words // 8), words) if vary else words
            f.write(json.dumps({"messages": [{"role": "user", "content": text(max(1, n // 4))},
                                             {"role": "assistant", "content": text(n)}]}) + "\n")
    return path


def _train(model: Path, data: Path, out: Path, *overrides: str) -> dict:
    """A tunelab SFT run on CUDA; its summary and torch's peak allocation over it."""
    import torch

    import tunelab

    torch.cuda.reset_peak_memory_stats()
    run = tunelab.train(None, [f"model.path={model}", f"model.device={DEVICE}", f"data.train={data}", "task.type=sft",
                               "task.template=chat", "data.dedupe=false", "train.log_every=1", "train.eval_every=1000",
                               "eval.base=false", "eval.samples=0", "eval.forgetting=none", "eval.linear_probe=false",
                               f"output_dir={out}", *overrides], overwrite=True)
    return {"tokens_per_s": run.summary.get("tokens_per_second"), "train_seconds": run.summary.get("train_seconds"),
            "max_memory_allocated_mb": torch.cuda.max_memory_allocated() / 2 ** 20,
            "max_memory_reserved_mb": torch.cuda.max_memory_reserved() / 2 ** 20, "run_dir": str(run.dir),
            "trainable_params": run.summary.get("trainable_params"),
            **{k: v for k, v in run.summary.items() if "quant" in k}}


def step_qlora_bitsandbytes() -> dict:
    model, random_init = _smollm2_dir()
    data = _chat_file(CACHE / "gpu_check" / "long.jsonl", 64, 600)
    common = ["data.max_length=512", "train.batch_size=8", "train.max_steps=6", "model.dtype=bfloat16",
              "method.target_modules=all-linear", "method.r=16"]
    runs = {"lora": _train(model, data, CACHE / "gpu_check" / "run-lora", "method.name=lora", *common),
            "qlora": _train(model, data, CACHE / "gpu_check" / "run-qlora", "method.name=qlora",
                            "method.backend=bitsandbytes", *common)}
    return {"status": "ok", "random_init_weights": random_init, "runs": runs,
            "qlora_over_lora": {k: runs["qlora"][k] / runs["lora"][k] for k in ("tokens_per_s", "max_memory_allocated_mb")
                                if runs["lora"].get(k)}}


def step_padding_free_sdpa() -> dict:
    """The same 8 rows a step, as padded micro-batches and as padding-free rows, through SDPA: the first step's loss
    (before any update) is the same sum over the same targets, so only float32 rounding may separate them."""
    import torch
    from transformers import AutoConfig

    model = CACHE / "llama-58m"
    if not (model / "config.json").is_file():
        sys.path.insert(0, str(ROOT))
        from bench import assets

        model = assets.build_58m()
    data = _chat_file(CACHE / "gpu_check" / "mixed.jsonl", 32, 60, seed=1, vary=True)
    losses = {}
    for packed in (False, True):
        run = _train(model, data, CACHE / "gpu_check" / f"run-pf-{packed}", "method.name=lora", "data.max_length=256",
                     "train.batch_size=8", "train.max_steps=2", f"train.padding_free={str(packed).lower()}")
        records = [json.loads(x) for x in (Path(run["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        losses[packed] = {"first_loss": next(r["loss"] for r in records if r["type"] == "train"),
                          "padding_free_on": any(r["type"] == "padding_free" and r["on"] for r in records),
                          "tokens_per_s": run["tokens_per_s"], "max_memory_allocated_mb": run["max_memory_allocated_mb"]}
    gap = abs(losses[True]["first_loss"] - losses[False]["first_loss"]) / abs(losses[False]["first_loss"])
    # float32 SDPA and matmuls (TF32 off): roundings of ~1e3 chained operations at eps 1.2e-7 stay well below 1e-4
    agree = gap <= 1e-4 and losses[True]["padding_free_on"] and not losses[False]["padding_free_on"]
    attn = getattr(AutoConfig.from_pretrained(model), "_attn_implementation", None) or "sdpa (transformers' default)"
    return {"status": "ok" if agree else "failed", "padded": losses[False], "padding_free": losses[True],
            "first_loss_relative_gap": gap, "attention": attn, "tf32": torch.backends.cuda.matmul.allow_tf32,
            **({} if agree else {"reason": f"first-step losses differ by {gap:.2e} (or padding-free was not on)"})}


def step_advise_vs_measured() -> dict:
    """advise's estimate of a LoRA run (bf16 base, 8 x 512 tokens) against torch's measured peak allocation. advise
    adds the CUDA context and the allocator's slack, which max_memory_allocated does not see: both are set apart."""
    from tunelab import advise

    model, random_init = _smollm2_dir()
    data = _chat_file(CACHE / "gpu_check" / "long.jsonl", 64, 600)
    measured = _train(model, data, CACHE / "gpu_check" / "run-advise", "method.name=lora", "data.max_length=512",
                      "train.batch_size=8", "train.max_steps=4", "model.dtype=bfloat16", "method.r=16")
    est = advise.estimate(model, "sft", 512, 8, "lora", dtype="bfloat16", lora_r=16, device="cuda",
                          eval_batch_size=8)
    b = est["bytes"]
    allocated = (est["phases"]["train"] - b["runtime"] - b["allocator"]) / 2 ** 20
    ratio = allocated / measured["max_memory_allocated_mb"]
    return {"status": "ok", "random_init_weights": random_init, "measured": measured,
            "estimate_allocated_mb": allocated, "estimate_parts_mb": {k: v / 2 ** 20 for k, v in b.items()},
            "estimate_over_measured": ratio, "within_20_percent": abs(ratio - 1) <= 0.2}


STEP_FUNCTIONS = {"install": step_install, "cuda_tests": step_cuda_tests, "lora_smollm2": step_lora_smollm2,
                  "full_58m": step_full_58m, "qlora_bitsandbytes": step_qlora_bitsandbytes,
                  "padding_free_sdpa": step_padding_free_sdpa, "advise_vs_measured": step_advise_vs_measured}

if __name__ == "__main__":
    sys.exit(main())
