"""Build the embedding demo's question -> answer data from the SFT demo's chatterbot-corpus split.

Input: demo_data/sft/{train,validation,test}.jsonl (scripts/prepare_sft_demo.py: chatterbot-corpus 1.3.3's English
dialogs, split by first question so that no held-out question is also asked in train). Each user turn and the
assistant reply after it becomes one {"anchor": question, "positive": answer, "category": ...} row; a later turn of
a longer dialog is kept only when it reads on its own (it is not a reply to the previous answer: at least three
words). Exact duplicate pairs are dropped, and a held-out pair whose question is also asked in train is dropped
(later turns were not covered by the first-question split). Writes retrieval/{train,validation,test}.jsonl.

Also writes retrieval/pairs_{train,validation,test}.jsonl for sentence-pair classification (does this answer
reply to this question?): each pair as {"question", "answer", "label": "match"}, and the same question with an
answer drawn (seeded) from another pair of the same split, "other".
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def pairs(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        m = r["messages"]
        for i in range(0, len(m) - 1, 2):
            q, a = m[i]["content"].strip(), m[i + 1]["content"].strip()
            if i == 0 or len(q.split()) >= 3:
                out.append({"anchor": q, "positive": a, "category": r.get("category")})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", type=Path, default=Path("demo_data/sft"))
    ap.add_argument("--out", type=Path, default=Path("demo_data"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    seen: set = set()
    train_questions: set = set()
    (args.out / "retrieval").mkdir(parents=True, exist_ok=True)
    for name in ("train", "validation", "test"):
        rows = [json.loads(line) for line in (args.sft / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
        kept, leaked = [], 0
        for p in pairs(rows):
            key = (p["anchor"], p["positive"])
            if key in seen:
                continue
            seen.add(key)
            if name != "train" and p["anchor"].lower() in train_questions:
                leaked += 1
                continue
            kept.append(p)
        if name == "train":
            train_questions = {p["anchor"].lower() for p in kept}
        with (args.out / "retrieval" / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in kept)
        rng = random.Random(f"{args.seed}-{name}")
        with (args.out / "retrieval" / f"pairs_{name}.jsonl").open("w", encoding="utf-8") as f:
            for i, p in enumerate(kept):
                other = kept[(i + rng.randrange(1, len(kept))) % len(kept)]["positive"]
                f.write(json.dumps({"question": p["anchor"], "answer": p["positive"], "label": "match"},
                                   ensure_ascii=False) + "\n")
                if other != p["positive"]:
                    f.write(json.dumps({"question": p["anchor"], "answer": other, "label": "other"},
                                       ensure_ascii=False) + "\n")
        print(f"{name}: {len(kept)} question/answer pairs, {len({p['positive'] for p in kept})} distinct answers"
              f"{f', {leaked} dropped (question asked in train)' if leaked else ''}")


if __name__ == "__main__":
    main()
