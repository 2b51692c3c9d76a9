"""Build the SFT demo's chat data from a package that installs offline.

Data: the English dialogs of chatterbot-corpus 1.3.3 (`chatterbot_corpus/data/english/*.yml` inside its
wheel): short question -> answer exchanges and a few longer small-talk dialogs, one file per category (ai,
coding, emotion, humor, trivia, ...). `tech_support.yml` is left out: its 1,050 entries are 10 pairs repeated.

Each YAML conversation is a list of turns, user first, then assistant, alternating. It becomes one
`messages` row; the category (file name) is kept as an extra `category` field. A conversation that is not a
list of at least two non-empty strings is malformed and dropped; one that ends on a user turn loses that
turn (so it ends with a reply). Exact duplicate conversations are dropped. The split is seeded and grouped
by the first user message, so no question of validation or test is also asked in train (the corpus often
gives one question several answers); a question with more than --max-group (4) conversations stays in train
(so "Tell me a joke", with 30, cannot fill a held-out split). Writes sft/{train,validation,test}.jsonl under --out.
"""

from __future__ import annotations

import argparse
import json
import random
import zipfile
from pathlib import Path

import yaml

PREFIX = "chatterbot_corpus/data/english/"
LEFT_OUT = {"tech_support.yml"}


def read_conversations(wheel: Path) -> tuple[list[tuple[str, list]], list[str]]:
    """(category, raw conversation) of every English file but the left-out ones; and the files read."""
    out, files = [], []
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            if not (name.startswith(PREFIX) and name.endswith(".yml")) or Path(name).name in LEFT_OUT:
                continue
            # BaseLoader keeps every scalar a string: "Yes" or 1984 stay text, not a bool or an int.
            doc = yaml.load(z.read(name).decode("utf-8"), Loader=yaml.BaseLoader)
            files.append(Path(name).name)
            out += [(Path(name).stem, conv) for conv in doc.get("conversations", [])]
    return out, files


def to_row(category: str, conv) -> tuple[dict | None, bool]:
    """(messages row or None if malformed, whether a trailing user turn was removed)."""
    if not isinstance(conv, list) or len(conv) < 2:
        return None, False
    if not all(isinstance(t, str) and t.strip() for t in conv):
        return None, False
    turns = [t.strip() for t in conv]
    roles = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    trimmed = roles[-1] == "user"  # an odd number of turns ends on a question with no reply
    if trimmed:
        turns, roles = turns[:-1], roles[:-1]
    messages = [{"role": r, "content": t} for r, t in zip(roles, turns)]
    return {"messages": messages, "category": category}, trimmed


def split_grouped(rows: list[dict], fractions: dict[str, float], seed: int, max_group: int) -> dict[str, list[dict]]:
    """Seeded split grouped by first question (case-insensitive): in shuffled order, a question's rows go to the
    first held-out split they fit into (its share of all rows not yet reached), else to train. Questions with
    more than max_group conversations stay in train, so that no one question fills a held-out split."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["messages"][0]["content"].lower(), []).append(r)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    targets = {name: round(frac * len(rows)) for name, frac in fractions.items()}
    out: dict[str, list[dict]] = {name: [] for name in [*fractions, "train"]}
    for k in keys:
        fits = [n for n, t in targets.items() if len(out[n]) + len(groups[k]) <= t and len(groups[k]) <= max_group]
        name = fits[0] if fits else "train"
        out[name] += groups[k]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheel", type=Path, required=True, help="chatterbot_corpus-1.3.3-py2.py3-none-any.whl")
    ap.add_argument("--out", type=Path, default=Path("demo_data"))
    ap.add_argument("--validation-fraction", type=float, default=0.1, help="share of the conversations")
    ap.add_argument("--test-fraction", type=float, default=0.1, help="share of the conversations")
    ap.add_argument("--max-group", type=int, default=4, help="questions with more conversations stay in train")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    raw, files = read_conversations(args.wheel)
    rows, seen, malformed, trimmed, duplicates = [], set(), 0, 0, 0
    for category, conv in raw:
        row, cut = to_row(category, conv)
        if row is None:
            malformed += 1
            continue
        key = tuple(m["content"] for m in row["messages"])
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        trimmed += cut
        rows.append(row)
    splits = split_grouped(rows, {"validation": args.validation_fraction, "test": args.test_fraction}, args.seed, args.max_group)
    out = args.out / "sft"
    out.mkdir(parents=True, exist_ok=True)
    for name in ("train", "validation", "test"):
        with (out / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for r in splits[name]:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    pairs = sum(len(r["messages"]) // 2 for r in rows)
    print(f"{len(raw)} conversations in {len(files)} files ({', '.join(sorted(LEFT_OUT))} left out): {malformed} malformed "
          f"dropped, {duplicates} duplicates dropped, {trimmed} trailing user turns removed; {len(rows)} conversations, "
          f"{pairs} question/answer turns, {len({r['messages'][0]['content'].lower() for r in rows})} distinct first questions")
    print(f"split by first question (seed {args.seed}): train {len(splits['train'])}, validation "
          f"{len(splits['validation'])}, test {len(splits['test'])} -> {out}/")


if __name__ == "__main__":
    main()
