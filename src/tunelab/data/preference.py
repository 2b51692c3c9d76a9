"""Preference pairs for the RLHF stage (reward model, DPO): a prompt and two replies, `chosen` better than `rejected`.

A row is {"prompt": ..., "chosen": ..., "rejected": ...}:
- `prompt`: a string (one user turn) or a conversation, a list of {"role", "content"} (an optional system turn,
  then user and assistant alternating) that ends on a user turn;
- `chosen` / `rejected`: a string (the assistant's reply) or TRL's conversational form, a list holding one
  {"role": "assistant", "content": ...}.
Each side becomes the conversation prompt + reply, rendered with the same template as sft (data/chat.py), and only
the final reply's tokens are scored: earlier assistant turns in the prompt are context, as in TRL.

Length: a pair whose prompt alone leaves no room for a reply token within data.max_length is an error naming its
row (with data.truncation=drop it is dropped and counted); a reply that does not fit is cut from the right.
"""

from __future__ import annotations

import torch

from ..errors import TunelabError
from . import chat
from .clean import cut_long_texts, cut_report, is_empty_text, kept_chars
from .sources import describe, field_names, read_records

ROW_EXAMPLE = '{"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "I will not."}'


def read(path: str, key: str, data_cfg, task_type: str = "dpo") -> tuple[list[dict], dict]:
    """(pairs, report entry) of one file or dataset; every malformed row is an error naming it."""
    origin: dict = {}
    records = read_records(path, key, data_cfg, origin)
    what = describe(path, key, data_cfg)
    if not records:
        raise TunelabError(f"{what} has no rows.")
    pairs, problems = [], []
    for r in records:
        try:
            pairs.append({**_pair(r["record"]), "row": r["row"]})
        except ValueError as e:
            problems.append((r["row"], str(e)))
    if problems:
        row, msg = problems[0]
        more = (f" ({len(problems)} rows have problems: {', '.join(str(p[0]) for p in problems[:10])}"
                f"{', ...' if len(problems) > 10 else ''})") if len(problems) > 1 else ""
        raise TunelabError(f"{what} row {row}: {msg}{more}. A preference row looks like {ROW_EXAMPLE} (prompt may "
                           f"also be a list of chat messages); fix or remove the row.")
    keep = kept_chars(data_cfg.max_length)
    rows_cut = sum(bool(cut_long_texts(p["prompt"], ("content",), keep) + cut_long_texts([p], ("chosen", "rejected"), keep))
                   for p in pairs)
    kept, seen = [], set()
    for p in pairs:
        key_ = (str(p["prompt"]), p["chosen"], p["rejected"])
        if not data_cfg.dedupe or key_ not in seen:
            seen.add(key_)
            kept.append(p)
    entry = {"format": "preference", "rows_read": len(records), "dropped": {"duplicate": len(pairs) - len(kept)},
             "rows": len(kept), **cut_report(rows_cut, keep), **({"dataset": origin} if origin else {})}
    return kept, entry


def _reply(value, field: str) -> str:
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise ValueError(f"'{field}' as a list must hold exactly one {{\"role\": \"assistant\", \"content\": ...}} "
                             f"(the reply; the conversation before it goes in 'prompt')")
        value = value[0].get("content")
    if not isinstance(value, str):
        raise ValueError(f"'{field}' is {type(value).__name__}, not a string")
    if is_empty_text(value):
        raise ValueError(f"'{field}' is empty")
    return value


def _pair(record: dict) -> dict:
    for field in ("prompt", "chosen", "rejected"):
        if record.get(field) is None:
            raise ValueError(f"no '{field}' field (found: {field_names(record)})")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        if is_empty_text(prompt):
            raise ValueError("'prompt' is empty")
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt:
        messages = []
        for i, turn in enumerate(prompt, start=1):
            if not isinstance(turn, dict) or turn.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(turn.get("content"), str):
                raise ValueError(f"turn {i} of 'prompt' is not a {{\"role\": system|user|assistant, \"content\": str}}")
            messages.append({"role": turn["role"], "content": turn["content"]})
    else:
        raise ValueError("'prompt' is neither a string nor a non-empty list of chat messages")
    chosen, rejected = _reply(record["chosen"], "chosen"), _reply(record["rejected"], "rejected")
    if chosen.strip() == rejected.strip():
        raise ValueError("'chosen' and 'rejected' are the same reply, so the pair prefers nothing; give two "
                         "different replies")
    try:  # the same order rules as sft: the reply must follow a user turn
        chat.check_order(messages + [{"role": "assistant", "content": chosen}])
    except ValueError as e:
        raise ValueError(f"'prompt' {e}") from None
    return {"prompt": messages, "chosen": chosen, "rejected": rejected}


def load_splits(cfg, seed: int) -> tuple[dict[str, list[dict]], dict]:
    return chat.load_splits(cfg, seed, read_file=read)


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> one padded batch of 2B rows: the chosen sides, then the rejected ones (labels -100 on padding)."""
    seqs = [(f["chosen_ids"], f["chosen_labels"]) for f in features] + \
           [(f["rejected_ids"], f["rejected_labels"]) for f in features]
    longest = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), longest), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, (ids, lab) in enumerate(seqs):
        input_ids[i, : len(ids)], labels[i, : len(ids)], mask[i, : len(ids)] = torch.tensor(ids), torch.tensor(lab), 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def encode(pairs: list[dict], tokenizer, template: str, max_length: int, truncation: str = "cut",
           where: str = "data") -> tuple[list[dict], dict]:
    """Token ids and labels (-100 outside the final reply) of both sides of every pair, and counts."""
    feats, counts, too_long = [], {"cut_reply": 0, "dropped_too_long": 0}, []
    for p in pairs:
        sides = {}
        for side in ("chosen", "rejected"):
            text, spans = chat.render(p["prompt"] + [{"role": "assistant", "content": p[side]}], template, tokenizer)
            enc = tokenizer(text, add_special_tokens=template == "alpaca", return_offsets_mapping=True)
            start, end = spans[-1]
            ids = enc["input_ids"]
            labels = [t if start <= a < end and b > a else -100 for t, (a, b) in zip(ids, enc["offset_mapping"])]
            first = next((i for i, x in enumerate(labels) if x != -100), len(ids))
            sides[side] = (ids, labels, first)
        prompt_len = max(s[2] for s in sides.values())
        if prompt_len >= max_length:
            if truncation == "drop":
                counts["dropped_too_long"] += 1
                continue
            too_long.append((p["row"], prompt_len))
            continue
        feat = {"row": p["row"]}
        for side, (ids, labels, _) in sides.items():
            if len(ids) > max_length:
                counts["cut_reply"] += 1
                ids, labels = ids[:max_length], labels[:max_length]
            feat[f"{side}_ids"], feat[f"{side}_labels"] = ids, labels
        feats.append(feat)
    if too_long:
        row, n = too_long[0]
        raise TunelabError(
            f"{where}: {len(too_long)} preference pair(s) have a prompt of data.max_length={max_length} tokens or more, "
            f"leaving no room for the reply (first: row {row}, {n} prompt tokens). Raise data.max_length, shorten those "
            f"prompts, or set data.truncation=drop to skip such pairs (they are counted in the data report).")
    lengths = [len(f[f"{s}_ids"]) for f in feats for s in ("chosen", "rejected")]
    # "examples" are pairs; "target_tokens" the reply tokens of both sides (the keys every task's report uses)
    stats = {"examples": len(feats), **counts, "tokens": sum(lengths),
             "target_tokens": sum(sum(x != -100 for x in f[f"{s}_labels"]) for f in feats for s in ("chosen", "rejected"))}
    return feats, stats
