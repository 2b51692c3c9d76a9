"""Build the demo's forgetting probe: a second labelled task unlike movie sentiment.

Every turn of chatterbot-corpus 1.3.3's English dialogs (the wheel the SFT demo uses), labelled with its file's
category (ai, botprofile, computers, emotion, food, history, ...): topic classification of short questions and
answers. `tunelab compare` and `tunelab train` read it through `eval.forgetting`: the linear-probe accuracy of
the pooled features, before and after fine-tuning on sentiment, shows how much general topic information the
body keeps. Categories with fewer than 20 distinct texts are left out; a text under two categories is dropped.
Writes probe/topics.jsonl under --out.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

from prepare_sft_demo import read_conversations


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--wheel", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    conversations, _ = read_conversations(args.wheel)
    labels = defaultdict(set)
    for category, conv in conversations:
        for turn in conv if isinstance(conv, list) else []:
            if isinstance(turn, str) and len(turn.split()) >= 2:
                labels[" ".join(turn.split())].add(category)
    rows = [{"text": t, "label": next(iter(c))} for t, c in sorted(labels.items()) if len(c) == 1]
    counts = Counter(r["label"] for r in rows)
    rows = [r for r in rows if counts[r["label"]] >= 20]
    out = args.out / "probe" / "topics.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    kept = Counter(r["label"] for r in rows)
    print(f"wrote {out}: {len(rows)} texts, {len(kept)} topics ({', '.join(f'{k} {v}' for k, v in sorted(kept.items()))})")


if __name__ == "__main__":
    main()
