"""tunelab's OpenAI-compatible server against `transformers serve` and llama.cpp's server (llama-cpp-python), on the
same merged SmolLM2 model, under load from 1, 4 and 16 concurrent clients:

    python -m bench.serve [--quick] [--prompts 32] [--concurrency 1,4,16] [--rounds 1] [--servers a,b]

The model is runs/demo-sft (LoRA SFT of SmolLM2-135M-Instruct, `make demo-sft`) exported once into --workdir: merged
(`tunelab export RUN DIR --merge`, served by tunelab and by `transformers serve`) and as GGUF (`--format gguf --quant
f16`, served by llama.cpp). Without runs/demo-sft the bench trains a short stand-in first (`tunelab train
configs/sft/smollm2-lora.yaml train.max_steps=4 eval.generate=0`); only the base model
demo_data/models/smollm2-135m-instruct (`make demo-sft-data`) must be present.

Every server gets the same requests: the first --prompts user questions of demo_data/sft/test.jsonl as single-turn
chats, greedy (temperature 0), max_tokens 64, not streamed, sent by --concurrency clients (asyncio + httpx) that
each take the next question as soon as their previous answer is in. For each round and each concurrency level the
servers take turns (their order rotates by round), so that whatever else runs on the machine meanwhile hits all of
them alike: each is started as a fresh process, polled until ready, warmed up with two requests, measured, and
stopped. Every server runs with the same threads (--threads: OMP_NUM_THREADS and MKL_NUM_THREADS for the torch
servers, which set torch's intra-op threads from them, and n_threads / n_threads_batch for llama.cpp).

Measured per server and level: requests/s and generated tokens/s over the measured wall time, p50/p95 latency of a
request (send to whole answer), the peak resident set of the server's process tree over its whole life (load
included; sampled every 50 ms with psutil), how many replies equal the reference server's (transformers) at the
same level (whitespace around a reply aside: tunelab strips it), and the CPU the rest of the machine used
meanwhile. Generated tokens are counted the same way for all servers: the reply re-tokenized with the model's
tokenizer, plus the end-of-turn token when the reply stopped on it; the servers' own `usage.completion_tokens` are
recorded beside it, because they disagree on that last token. Prints a markdown table and the ratios tunelab /
peer, and writes the results as JSON into --workdir (`--tables FILE` prints the tables of such a file again).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata as md
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/serve.py`: make `bench` importable as a package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench.common import ROOT, SMOLLM2, read_jsonl
from bench.run import cpu_busy_seconds, describe_machine

SERVERS = ("tunelab", "transformers", "llama.cpp")
OPTIONAL_SERVERS = ("transformers-cb",)  # transformers serve --continuous-batching: asked for by name only
REFERENCE = "transformers"  # replies are compared with this server's at the same level
PEERS = ("transformers", "llama.cpp")
HOST = "127.0.0.1"
QUESTIONS = ROOT / "demo_data" / "sft" / "test.jsonl"
RUN = ROOT / "runs" / "demo-sft"
TRAIN_CONFIG = ROOT / "configs" / "sft" / "smollm2-lora.yaml"
WARMUP_REQUESTS = 2


# -- the model every server serves ------------------------------------------------------------------------------

def tunelab_cli() -> list[str]:
    return [sys.executable, "-m", "tunelab"]


def prepare_model(run: Path, workdir: Path, quant: str) -> dict:
    """The merged model directory and the GGUF file of `run`, exported into `workdir` unless an export newer than
    the run is already there; a short stand-in run is trained first when `run` does not exist."""
    workdir.mkdir(parents=True, exist_ok=True)
    if not (run / "summary.json").is_file():
        if not (SMOLLM2 / "config.json").is_file():
            sys.exit(f"{run.relative_to(ROOT) if run.is_relative_to(ROOT) else run} is absent and so is the base "
                     f"model {SMOLLM2.relative_to(ROOT)}: run `make demo-sft` (or `make demo-sft-data` for the base "
                     "model alone, and this bench trains a 4-step stand-in run).")
        run = workdir / "run"
        if not (run / "summary.json").is_file():
            print(f"no tuned run given: training a 4-step stand-in into {run}", flush=True)
            subprocess.run(tunelab_cli() + ["train", str(TRAIN_CONFIG), "train.max_steps=4", "eval.generate=0",
                                            f"output_dir={run}"], cwd=ROOT, check=True)
    made = (run / "summary.json").stat().st_mtime
    merged, gguf_dir = workdir / "merged", workdir / f"gguf-{quant}"
    gguf = gguf_dir / f"{gguf_dir.name}.gguf"
    for out, extra, done in ((merged, ["--merge"], merged / "config.json"),
                             (gguf_dir, ["--format", "gguf", "--quant", quant], gguf)):
        if done.is_file() and done.stat().st_mtime >= made:
            continue
        print(f"exporting {run} -> {out}", flush=True)
        subprocess.run(tunelab_cli() + ["export", str(run), str(out), *extra, "--overwrite"], cwd=ROOT, check=True)
    return {"run": run, "merged": merged, "gguf": gguf}


def questions(n: int) -> list[str]:
    rows = read_jsonl(QUESTIONS)
    asked = [next(m["content"] for m in r["messages"] if m["role"] == "user") for r in rows]
    return [asked[i % len(asked)] for i in range(n)]


def tunelab_serve_available() -> tuple[bool, str]:
    proc = subprocess.run(tunelab_cli() + ["serve", "--help"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode == 0:
        return True, ""
    return False, f"`tunelab serve --help` exits {proc.returncode}: tunelab serve is not available in this checkout"


# -- one server ------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def server_spec(name: str, model: dict, port: int, threads: int, tunelab_serves: str) -> dict:
    """How to start `name` on `port`: argv, environment, the path that answers 200 once it is ready, and the
    `model` field its requests carry (None: the first id GET /v1/models lists)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    if name == "tunelab":
        target = model["run"] if tunelab_serves == "run" else model["merged"]
        return {"argv": tunelab_cli() + ["serve", str(target), "--host", HOST, "--port", str(port)], "env": env,
                "ready": "/health", "model": None}
    if name in ("transformers", "transformers-cb"):
        argv = [str(Path(sys.executable).parent / "transformers"), "serve", str(model["merged"]), "--device", "cpu",
                "--dtype", "float32", "--host", HOST, "--port", str(port), "--log-level", "warning"]
        if name == "transformers-cb":
            argv.append("--continuous-batching")
        return {"argv": argv, "env": env, "ready": "/health", "model": str(model["merged"])}
    if name == "llama.cpp":
        # llama_cpp.server has no /health: /v1/models answers once the model is loaded (it loads before serving).
        return {"argv": [sys.executable, "-m", "llama_cpp.server", "--model", str(model["gguf"]), "--n_threads",
                         str(threads), "--n_threads_batch", str(threads), "--n_ctx", "2048", "--host", HOST, "--port",
                         str(port), "--verbose", "False"], "env": env, "ready": "/v1/models", "model": None}
    raise ValueError(f"unknown server {name!r}; choose from {', '.join(SERVERS + OPTIONAL_SERVERS)}")


def tree_processes(pid: int) -> list:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def tree_rss_mb(pid: int) -> float:
    """Resident memory of `pid` and all its descendants, in MB (2**20 bytes): what the server holds, whichever of
    its processes holds it."""
    import psutil

    total = 0
    for p in tree_processes(pid):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:  # exited between listing and reading
            pass
    return total / 2 ** 20


def tree_cpu_seconds(pid: int) -> float:
    import psutil

    total = 0.0
    for p in tree_processes(pid):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


class PeakRss(threading.Thread):
    """Samples the process tree's resident memory every `interval` seconds until stop(); `peak` is the largest
    sample, in MB."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak = pid, interval, 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, tree_rss_mb(self.pid))
            self._halt.wait(self.interval)

    def stop(self) -> float:
        self._halt.set()
        self.join()
        return self.peak


def wait_ready(proc: subprocess.Popen, url: str, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"not ready after {timeout:.0f} s ({url})")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (it was started in a new session), SIGKILL after 30 s."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue


# -- the clients -----------------------------------------------------------------------------------------------

async def drive(base_url: str, model: str, prompts: list[str], clients: int, max_tokens: int,
                timeout: float) -> tuple[list[dict], float]:
    """Sends every prompt once, `clients` at a time; (one record per prompt in prompt order, wall seconds)."""
    import httpx

    results: list[dict] = [{} for _ in prompts]
    todo = iter(enumerate(prompts))  # shared by the clients: each takes the next prompt when it is free

    async def client(http: httpx.AsyncClient) -> None:
        for i, prompt in todo:
            body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                    "temperature": 0, "stream": False}
            t0 = time.perf_counter()
            try:
                r = await http.post("/v1/chat/completions", json=body)
            except httpx.HTTPError as e:
                results[i] = {"error": f"{type(e).__name__}: {e}", "latency_s": time.perf_counter() - t0}
                continue
            latency = time.perf_counter() - t0
            if r.status_code != 200:
                results[i] = {"error": f"HTTP {r.status_code}: {r.text[:200]}", "latency_s": latency}
                continue
            data = r.json()
            choice = data["choices"][0]
            results[i] = {"latency_s": latency, "text": choice["message"]["content"] or "",
                          "finish_reason": choice.get("finish_reason"),
                          "usage_tokens": (data.get("usage") or {}).get("completion_tokens")}

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return results, wall


def measure(name: str, model: dict, prompts: list[str], clients: int, args, log_path: Path) -> dict:
    """Starts `name`, waits until it is ready, warms it up, sends the prompts from `clients` clients, stops it."""
    import httpx

    port = free_port()
    spec = server_spec(name, model, port, args.threads, args.tunelab_serves)
    base = f"http://{HOST}:{port}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as log:
        proc = subprocess.Popen(spec["argv"], cwd=ROOT, env=spec["env"], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    sampler = PeakRss(proc.pid)
    sampler.start()
    try:
        wait_ready(proc, base + spec["ready"], args.start_timeout)
        ready_s = time.perf_counter() - started
        served = spec["model"] or httpx.get(base + "/v1/models", timeout=10).json()["data"][0]["id"]
        warm, _ = asyncio.run(drive(base, served, prompts[:WARMUP_REQUESTS], 1, args.max_tokens, args.timeout))
        if any("error" in w for w in warm):
            raise RuntimeError("warm-up failed: " + next(w["error"] for w in warm if "error" in w))
        busy0, server0, own0 = cpu_busy_seconds(), tree_cpu_seconds(proc.pid), time.process_time()
        records, wall = asyncio.run(drive(base, served, prompts, clients, args.max_tokens, args.timeout))
        busy, server, own = (cpu_busy_seconds() - busy0, tree_cpu_seconds(proc.pid) - server0,
                             time.process_time() - own0)
        result = {"server": name, "clients": clients, "ok": True, "wall_s": wall, "records": records,
                  "ready_s": ready_s, "server_cpu_cores": server / wall, "client_cpu_cores": own / wall,
                  # CPU the rest of the machine used meanwhile (steal time counts as others')
                  "other_cpu_cores": max(0.0, busy - server - own) / wall, "log": str(log_path)}
    except (RuntimeError, httpx.HTTPError, KeyError, ValueError) as e:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
        result = {"server": name, "clients": clients, "ok": False, "error": str(e), "log": str(log_path),
                  "log_tail": tail}
    finally:
        stop_server(proc)  # on Ctrl-C too
    result["peak_rss_mb"] = sampler.stop()
    return result


# -- summaries (pure) ------------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between the closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(runs: list[dict], count_tokens) -> dict:
    """{clients: {server: figures}} from the measured runs (several rounds of one server and level are pooled:
    requests and wall time add up, latencies are one list). `count_tokens(text, finish_reason)` gives the generated
    tokens of one reply."""
    out: dict = {}
    for clients in sorted({r["clients"] for r in runs}):
        level = out.setdefault(clients, {})
        at_level = [r for r in runs if r["clients"] == clients]
        reference = {}
        for r in at_level:
            if r["server"] == REFERENCE and r.get("ok"):
                reference.setdefault(r.get("round", 0), r["records"])
        for name in dict.fromkeys(r["server"] for r in at_level):
            mine = [r for r in at_level if r["server"] == name]
            ok = [r for r in mine if r.get("ok")]
            if not ok:
                level[name] = {"failed": mine[-1].get("error", "failed")}
                continue
            records = [x for r in ok for x in r["records"]]
            good = [x for x in records if "error" not in x]
            wall = sum(r["wall_s"] for r in ok)
            tokens = sum(count_tokens(x["text"], x["finish_reason"]) for x in good)
            usage = [x["usage_tokens"] for x in good]
            same = total = 0
            for r in ok:
                ref = reference.get(r.get("round", 0))
                if ref is None:
                    continue
                for mine_x, ref_x in zip(r["records"], ref):
                    if "text" in mine_x and "text" in ref_x:
                        total += 1
                        same += mine_x["text"].strip() == ref_x["text"].strip()  # some strip their replies
            latencies = [x["latency_s"] for x in good]
            level[name] = {
                "requests": len(good), "errors": len(records) - len(good), "wall_s": wall,
                "requests_per_s": len(good) / wall, "tokens": tokens, "tokens_per_s": tokens / wall,
                "usage_tokens": sum(usage) if all(u is not None for u in usage) else None,
                "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in ok),
                "same_as_reference": [same, total] if total else None,
                "other_cpu_cores": sum(r["other_cpu_cores"] * r["wall_s"] for r in ok) / wall,
                "server_cpu_cores": sum(r["server_cpu_cores"] * r["wall_s"] for r in ok) / wall,
                "ready_s": max(r["ready_s"] for r in ok),
            }
    return out


def ratios(summary: dict, ours: str = "tunelab") -> dict:
    """{clients: {peer: {measure: ours / peer}}} for every peer measured beside `ours` at that level."""
    out = {}
    for clients, level in summary.items():
        base = level.get(ours)
        if not base or "failed" in base:
            continue
        for peer in PEERS:
            m = level.get(peer)
            if m and "failed" not in m:
                out.setdefault(clients, {})[peer] = {k: base[k] / m[k] for k in
                                                     ("requests_per_s", "tokens_per_s", "p50_s", "p95_s",
                                                      "peak_rss_mb") if m[k]}
    return out


def markdown(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def table(summary: dict) -> str:
    head = ["clients", "server", "req/s", "gen tok/s", "p50 latency", "p95 latency", "peak RSS", "replies = "
            + REFERENCE, "errors", "others' CPU"]
    rows = []
    for clients, level in summary.items():
        for name, m in level.items():
            if "failed" in m:
                rows.append([str(clients), name, "FAILED: " + m["failed"][:80]] + [""] * (len(head) - 3))
                continue
            same = f"{m['same_as_reference'][0]}/{m['same_as_reference'][1]}" if m["same_as_reference"] else "-"
            rows.append([str(clients), name, f"{m['requests_per_s']:.2f}", f"{m['tokens_per_s']:.1f}",
                         f"{m['p50_s']:.2f} s", f"{m['p95_s']:.2f} s", f"{m['peak_rss_mb']:,.0f} MB", same,
                         str(m["errors"]), f"{m['other_cpu_cores']:.2f} cores"])
    return markdown(head, rows)


def ratio_table(summary: dict, pending: str = "") -> str:
    """tunelab / peer at each level; `pending` says why there is no tunelab column, when there is none."""
    r = ratios(summary)
    if not r:
        return f"tunelab / peer: pending ({pending or 'tunelab was not measured'})"
    head = ["clients", "tunelab / peer", "req/s", "gen tok/s", "p50 latency", "p95 latency", "peak RSS"]
    rows = [[str(clients), f"tunelab / {peer}"] + [f"{x[k]:.2f}x" if k in x else "-" for k in
                                                   ("requests_per_s", "tokens_per_s", "p50_s", "p95_s", "peak_rss_mb")]
            for clients, level in r.items() for peer, x in level.items()]
    return markdown(head, rows)


# -- main ------------------------------------------------------------------------------------------------------

def token_counter(model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))

    def count(text: str, finish_reason: str | None) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"]) + (finish_reason == "stop")

    return count


def report(runs: list[dict], count_tokens, pending: str) -> dict:
    summary = summarize(runs, count_tokens)
    print()
    print(table(summary))
    print()
    print(ratio_table(summary, pending))
    print("\ngenerated tokens: each reply re-tokenized with the model's tokenizer, plus its end-of-turn token when it "
          "stopped on one; the servers' own usage.completion_tokens totals:")
    for clients, level in summary.items():
        for name, m in level.items():
            if "failed" not in m:
                print(f"  {clients:2d} clients, {name:>15}: counted {m['tokens']}, usage "
                      f"{m['usage_tokens'] if m['usage_tokens'] is not None else 'not returned'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 8 prompts, 1 and 4 clients")
    p.add_argument("--prompts", type=int, help="requests per server and level (default 32, 8 with --quick)")
    p.add_argument("--concurrency", help="comma-separated client counts (default 1,4,16; 1,4 with --quick)")
    p.add_argument("--rounds", type=int, default=1, help="times every server is measured at every level")
    p.add_argument("--servers", default=",".join(SERVERS),
                   help=f"comma-separated subset of {', '.join(SERVERS + OPTIONAL_SERVERS)}")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="compute threads of every server")
    p.add_argument("--run", type=Path, default=RUN, help="the tuned run to export and serve")
    p.add_argument("--tunelab-serves", choices=("merged", "run"), default="merged",
                   help="what tunelab serve is given: the merged export (the others' weights) or the LoRA run")
    p.add_argument("--quant", choices=("f16", "f32", "q8_0"), default="f16", help="the GGUF llama.cpp serves")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench-serve"),
                   help="exports, server logs and results.json go here")
    p.add_argument("--timeout", type=float, default=600, help="seconds one request may take")
    p.add_argument("--start-timeout", type=float, default=300, help="seconds a server may take to be ready")
    p.add_argument("--tables", type=Path, metavar="FILE", help="print the tables of an earlier results.json again")
    args = p.parse_args(argv)
    if args.tables:
        earlier = json.loads(args.tables.read_text(encoding="utf-8"))
        settings = earlier["settings"]
        merged = Path(settings.get("merged") or args.tables.parent / "merged")
        report(earlier["runs"], token_counter(merged), settings.get("tunelab_pending") or "")
        return 0
    n_prompts = args.prompts or (8 if args.quick else 32)
    levels = [int(x) for x in (args.concurrency or ("1,4" if args.quick else "1,4,16")).split(",")]
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = [s for s in servers if s not in SERVERS + OPTIONAL_SERVERS]
    if unknown or n_prompts < 1 or args.rounds < 1 or min(levels) < 1:
        p.error(f"unknown server(s) {unknown}" if unknown else "--prompts, --rounds and --concurrency must be >= 1")

    pending = ""
    if "tunelab" in servers:
        available, pending = tunelab_serve_available()
        if not available:
            print(f"skipping tunelab: {pending}; its column is pending", flush=True)
            servers.remove("tunelab")
    model = prepare_model(args.run.resolve(), args.workdir, args.quant)
    # tunelab's server is the code in this checkout when each server starts: say which, uncommitted edits included
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    tunelab_commit = git("rev-parse", "--short", "HEAD") + (" + edits in src/tunelab" if git(
        "status", "--porcelain", "--", "src/tunelab") else "")
    prompts = questions(n_prompts)
    count = token_counter(model["merged"])
    print(f"{len(servers)} servers ({', '.join(servers)}), {n_prompts} prompts, clients {levels}, {args.rounds} "
          f"round(s), greedy, max_tokens {args.max_tokens}, {args.threads} threads per server "
          f"(OMP_NUM_THREADS/MKL_NUM_THREADS={args.threads} for the torch servers, n_threads={args.threads} for "
          f"llama.cpp); tunelab at {tunelab_commit}; this machine: {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)

    runs = []
    for rnd in range(args.rounds):
        order = servers[rnd % len(servers):] + servers[:rnd % len(servers)]
        for clients in levels:
            for name in order:
                log = args.workdir / "logs" / f"{name}-c{clients}-r{rnd}.log"
                r = {**measure(name, model, prompts, clients, args, log), "round": rnd}
                runs.append(r)
                if r["ok"]:
                    good = [x for x in r["records"] if "error" not in x]
                    print(f"  round {rnd + 1}, {clients:2d} clients, {name:>15}: {len(good)}/{len(prompts)} ok in "
                          f"{r['wall_s']:.1f} s, ready after {r['ready_s']:.1f} s, peak RSS "
                          f"{r['peak_rss_mb']:,.0f} MB, others' CPU {r['other_cpu_cores']:.2f} cores", flush=True)
                else:
                    print(f"  round {rnd + 1}, {clients:2d} clients, {name:>15}: FAILED: {r['error']} (log {log})\n"
                          f"{r['log_tail']}", flush=True)

    summary = report(runs, count, pending)
    machine = {**describe_machine(), "threads_per_server": args.threads, "tunelab_commit": tunelab_commit}
    for package in ("llama_cpp_python", "httpx", "fastapi", "uvicorn"):
        try:
            machine["versions"][package] = md.version(package.replace("_", "-"))
        except md.PackageNotFoundError:
            machine["versions"][package] = None
    out = args.workdir / "results.json"
    out.write_text(json.dumps({"machine": machine, "settings": {
        "prompts": n_prompts, "concurrency": levels, "rounds": args.rounds, "max_tokens": args.max_tokens,
        "threads": args.threads, "servers": servers, "tunelab_pending": pending or None, "quant": args.quant,
        "tunelab_serves": args.tunelab_serves, "run": str(model["run"]),
        "merged": str(model["merged"]), "gguf": str(model["gguf"])},
        "summary": {str(k): v for k, v in summary.items()}, "runs": runs}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
