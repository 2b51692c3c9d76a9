"""`tunelab data inspect RECIPE`: what training will see, before it runs.

The recipe's rows go through the task's own `load_splits`, `label_info`, `encode` and `collate` (the functions
training calls, not a copy of them), so what is shown is what is trained:

- the first N examples of a split as the model sees them, the tokens that carry loss marked: for sft, causal_lm and
  dpo the tokens whose label survives collate (a token at position t is predicted from position t-1, so position 0
  never carries loss); for reward the reply, and its last token, where the score is read; for NER the subwords that
  carry a tag, for mlm the masked ones, for QA the answer span;
- token lengths (p50 / p90 / p99 / max, before any cut) against data.max_length, and what cutting and dropping did;
- per split, the label / entity / answer mix (classification, NER, QA, embedding, regression);
- a template lint for the chat-templated tasks (sft, dpo, reward): EOS after replies, a doubled BOS, system turns the
  template drops, a generation prompt that is not what training saw, replies cut at max_length, prompts that leave
  no room for a reply. Each warning says how to fix it;
- the data report, with its warning when cleaning drops a fifth or more of a split.

Only the tokenizer and the model's config.json are read where the task's build_model does nothing else that
encoding depends on (it settles "auto" templates, which is done here with the same function); token classification
and mlm check or change the tokenizer with the model, so for them the model is built as training builds it.
Data is read whole (not streamed: the percentiles need every row), and data.augment_copies is not applied (it
needs the model).
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

from . import atomic, methods, models, predict, tasks
from .config import Config
from .data import canonical_label, chat, drop_warning, format_report, format_tokens
from .errors import TunelabError
from .report import markup

SPLITS = ("train", "validation", "test")
UNBOUNDED = 1 << 30  # max_length of the second encoding, which measures what each example would be uncut
LINT_ROWS = 200  # examples the generation-prompt check renders (each is one more template rendering)
BATCH = 32  # features collated at a time

# What each task's examples are, and how a token's part in the loss is read from its collated batch. A literal table
# rather than a task flag: it is about how to show rows, which no training code needs.
#   lm: one sequence, loss on the tokens whose label is kept, shifted (causal LM)
#   pairs_lm / pairs_score: chosen and rejected sequences (dpo: shifted reply loss; reward: the reply is scored at
#       its last token)
#   text / number: a text (or pair) and its label / target; tags: a label per subword (NER, mlm); span: QA windows; sides: embedding rows
VIEWS = {"sft": "lm", "causal_lm": "lm", "dpo": "pairs_lm", "reward": "pairs_score", "classification": "text",
         "regression": "number", "multilabel": "text", "token_classification": "tags", "mlm": "tags", "qa": "span",
         "embedding": "sides"}
# Tasks whose build_model reads nothing from the model that encoding needs: their tokenizer alone encodes as training
# does (tests/test_inspect.py pins that against build_model).
TOKENIZER_ONLY = {"sft", "causal_lm", "dpo", "reward", "classification", "regression", "multilabel", "qa", "embedding"}
TEMPLATED = {"sft", "dpo", "reward"}  # rows rendered with a chat template: the lint applies


def run(cfg: Config, n: int = 3, split: str = "train") -> dict:
    """Inspect a recipe's data as its task encodes it. Returns a JSON-able dict for `format_text` / `write_html`."""
    started = time.perf_counter()
    kind = cfg.task.type
    if kind not in VIEWS:
        raise TunelabError(f"`tunelab data inspect` shows rows as a task encodes them, and task.type={kind} has no rows "
                           f"of its own to show (grpo samples its replies during the run; a multitask recipe has "
                           f"one per task: inspect each task's recipe). Inspect an sft recipe on the same prompts, or "
                           f"the data file itself: `tunelab data inspect FILE`.")
    task = tasks.get(kind)
    view = VIEWS[kind]
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"streaming": False})})
    splits, report = task.load_splits(cfg, cfg.train.seed)
    if split not in splits:
        raise TunelabError(f"--split {split}: the recipe has no {split} split (it has {', '.join(splits)}). Give "
                           f"data.{split} in the recipe, or inspect another split.")
    info = task.label_info(splits, cfg)
    with _quiet_transformers(), predict.model_source(cfg.model) as model_cfg:
        tok, holder, weights = _tokenizer(task, kind, model_cfg, info)
        max_length = models.max_input_length(holder, tok, cfg.data.max_length, methods.reserved_positions(cfg.method))
        result = {"task": kind, "model": cfg.model.path, "template": info.get("template"),
                  "weights_loaded": weights, "max_length": cfg.data.max_length, "max_length_used": max_length,
                  "split": split, "warnings": [], "notes": [], "lengths": {}, "mix": {}, "tokens": {}}
        encoded = {}
        for name, rows in splits.items():
            feats, stats, natural = _encode(task, rows, tok, info, max_length, result["warnings"], name)
            report["splits"][name]["tokens"] = stats
            result["tokens"][name] = stats
            result["lengths"][name] = _lengths(view, natural, max_length)
            result["mix"][name] = _mix(view, rows)
            encoded[name] = (feats, natural)
        feats, natural = encoded[split]
        rows = list(splits[split])
        result["examples"] = [_example(view, tok, info, split, f, seq, _row_of(f, i, rows))
                              for i, (f, seq) in enumerate(zip(feats[:n], _collated(task, view, feats[:n],
                                                                                    tok.pad_token_id)))]
        if kind in TEMPLATED or kind == "causal_lm":
            _lint(task, kind, view, tok, info, splits[split], feats, natural, max_length, split, result)
    result["data"] = report
    result["report_text"] = format_report(report)
    result["warnings"] = [{"code": "dropped_share", "text": f"{name}: {text}", "fix": fix}
                          for name, entry in report["splits"].items() if (found := drop_warning(entry))
                          for text, fix in [found]] + result["warnings"]
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


# -- the tokenizer, as training would have it ---------------------------------------------------------------------

def _tokenizer(task, kind: str, model_cfg, info: dict):
    """(tokenizer, an object whose .config max_input_length reads, whether the weights were loaded). `info` is
    settled as build_model settles it."""
    if kind in TOKENIZER_ONLY:
        path = models.check_model_dir(model_cfg.path)
        tok = models.load_tokenizer(path, model_cfg.trust_remote_code)
        if getattr(tok, "is_fast", False):  # a slow one: build_model's own checks say what is wrong
            from transformers import AutoConfig

            if kind in TEMPLATED:  # as their build_model does (causal_lm's text has no template)
                info["template"] = chat.resolve_template(info["template"], tok, f"'{model_cfg.path}'")
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=model_cfg.trust_remote_code)
            return tok, SimpleNamespace(config=config), False
    model, tok = task.build_model(model_cfg, info)
    return tok, model, True


@contextmanager
def _quiet_transformers():
    """The unbounded encoding makes tokenizers warn that sequences exceed the model's length: that is the point."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def _encode(task, rows, tok, info: dict, max_length: int, warnings: list, name: str):
    """(features as trained, the encode report, features as they would be uncut). A split that training would stop
    on (a preference prompt with no room for its reply) is a warning here, and encoded as data.truncation=drop
    would encode it, so the rest can still be seen."""
    try:
        feats, stats = task.encode(rows, tok, info, max_length)
    except TunelabError as e:
        if info.get("truncation") != "cut":
            raise
        warnings.append({"code": "no_room", "text": f"{name}: training stops here: {e}",
                         "fix": "raise data.max_length, shorten those prompts, or set data.truncation=drop"})
        feats, stats = task.encode(rows, tok, {**info, "truncation": "drop"}, max_length)
    natural, _ = task.encode(rows, tok, {**info, "truncation": "cut"}, UNBOUNDED)
    return feats, stats, natural


def _row_of(feat: dict, i: int, rows: list[dict]) -> dict | None:
    """The row a feature was encoded from: by its row number, its question (QA windows), or its place (the tasks that
    encode one feature per row and do not carry the number)."""
    if feat.get("row") is not None:
        return next((r for r in rows if r.get("row") == feat["row"]), None)
    if "example" in feat:
        return rows[feat["example"]]
    return rows[i] if i < len(rows) else None


def _collated(task, view: str, feats: list[dict], pad_id: int):
    """Each feature's sequences as collate batches them: [(name, ids, labels or None)], padding removed."""
    out = []
    for i in range(0, len(feats), BATCH):
        chunk = feats[i : i + BATCH]
        batch = task.collate(chunk, pad_id)
        rows = [_unpad(batch, j) for j in range(batch["input_ids"].shape[0])]
        if view in ("pairs_lm", "pairs_score"):  # collate puts the chosen sides first, then the rejected ones
            b = len(chunk)
            out += [[("chosen", *rows[j]), ("rejected", *rows[b + j])] for j in range(b)]
        elif view == "sides":  # side-major: every anchor, then every positive, ...
            b = len(chunk)
            names = ("anchor", "positive", "negative")[: len(rows) // b]
            out += [[(s, *rows[k * b + j]) for k, s in enumerate(names)] for j in range(b)]
        else:
            out += [[(None, *rows[j])] for j in range(len(chunk))]
    return out


def _unpad(batch: dict, j: int) -> tuple[list[int], list[int] | None]:
    n = int(batch["attention_mask"][j].sum()) if batch["attention_mask"].dim() == 2 else batch["input_ids"].shape[1]
    ids = batch["input_ids"][j, :n].tolist()
    labels = batch["labels"][j, :n].tolist() if "labels" in batch and batch["labels"].dim() == 2 else None
    return ids, labels


# -- lengths and mixes ---------------------------------------------------------------------------------------------

def percentiles(values: list[int]) -> dict | None:
    """p50 / p90 / p99 / max by the nearest-rank rule (each is a length that occurs)."""
    if not values:
        return None
    s = sorted(values)
    rank = lambda q: s[max(0, -(-q * len(s) // 100) - 1)]  # ceil(q% of n), 1-based
    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": s[-1]}


def _sequence_lengths(view: str, feat: dict) -> list[int]:
    if view in ("pairs_lm", "pairs_score"):
        return [len(feat["chosen_ids"]), len(feat["rejected_ids"])]
    if view == "sides":
        return [len(s) for s in feat["sides"]]
    return [len(feat["input_ids"])]


def _lengths(view: str, natural: list[dict], max_length: int) -> dict:
    lengths = [x for f in natural for x in _sequence_lengths(view, f)]
    over = sum(x > max_length for x in lengths)
    return {"sequences": len(lengths), "percentiles": percentiles(lengths), "over_max_length": over,
            "share_cut": round(over / len(lengths), 4) if lengths else 0.0}


def _mix(view: str, rows) -> dict | None:
    """What a split holds besides its texts: labels, entities, answers, targets, hard negatives."""
    rows = list(rows)
    if view == "number":
        values = sorted(float(r["label"]) for r in rows)
        q = lambda p: values[min(len(values) - 1, int(p * len(values)))]
        return {"targets": {"min": values[0], "p10": q(0.1), "p50": q(0.5), "p90": q(0.9), "max": values[-1],
                            "mean": round(statistics.fmean(values), 4)}} if values else None
    if view == "text":  # a label, or a set of them (multilabel)
        names = Counter(n for r in rows for n in (r["label"] if isinstance(r["label"], tuple) else
                                                  [canonical_label(r["label"])]))
        return {"labels": dict(names.most_common())}
    if view == "tags" and rows and "tags" in rows[0]:
        entities = Counter(t[2:] for r in rows for t in r["tags"] if t.startswith("B-"))
        return {"entities": dict(entities.most_common()),
                "sentences_without_entities": sum(not any(t != "O" for t in r["tags"]) for r in rows)}
    if view == "span":
        answerable = sum(bool(r.get("answers")) for r in rows)
        return {"answers": {"answerable": answerable, "unanswerable": len(rows) - answerable}}
    if view == "sides":
        return {"pairs": {"rows": len(rows), "distinct_anchors": len({r["anchor"] for r in rows}),
                          "with_hard_negative": sum("negative" in r for r in rows)}}
    return None


# -- examples --------------------------------------------------------------------------------------------------------

def _marks(view: str, ids: list[int], labels, info: dict, tok) -> list:
    """Per position: None, "loss" (carries loss), "reply" (reward: the reply scored at its last token), or a tag."""
    n = len(ids)
    if view in ("lm", "pairs_lm"):
        return ["loss" if t > 0 and labels[t] != -100 else None for t in range(n)]
    if view == "pairs_score":
        marks = ["reply" if labels[t] != -100 else None for t in range(n)]
        marks[-1] = "loss"
        return marks
    if view == "tags" and labels is not None:
        tags = info.get("labels")
        if tags:  # NER: the tag each labelled subword is trained to; O is left unmarked
            return [tags[x] if x != -100 and tags[x] != "O" else None for x in labels]
        return [f"→{tok.convert_ids_to_tokens(x)}" if x != -100 else None for x in labels]  # mlm: the hidden token
    return [None] * n


def segments(tok, ids: list[int], marks: list) -> list[list]:
    """[[text, mark]] runs of equal marks, each the text its tokens add to the decoded sequence (decoding run by run
    would drop the spaces a tokenizer puts between words)."""
    bounds = [0] + [t for t in range(1, len(ids)) if marks[t] != marks[t - 1]] + [len(ids)]
    decode = lambda k: tok.decode(ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    out, before = [], ""
    for a, b in zip(bounds, bounds[1:]):
        upto = decode(b)
        piece = upto[len(before):] if upto.startswith(before) else \
            tok.decode(ids[a:b], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        out.append([piece, marks[a]])
        before = upto
    return out


def _example(view: str, tok, info: dict, split: str, feat: dict, seqs: list, row: dict | None) -> dict:
    parts = []
    for name, ids, labels in seqs:
        marks = _marks(view, ids, labels, info, tok)
        part = {"name": name, "ids": ids, "marked": [t for t, m in enumerate(marks) if m is not None],
                "segments": segments(tok, ids, marks), "facts": _facts(view, tok, ids, marks)}
        if view == "span" and feat.get("start"):
            a, b = feat["start"], feat["end"] + 1
            part["marked"] = list(range(a, b))
            part["segments"] = segments(tok, ids, [None] * a + ["answer"] * (b - a) + [None] * (len(ids) - b))
        parts.append(part)
    number = feat.get("row") if feat.get("row") is not None else (row or {}).get("row")
    return {"split": split, "row": number, "parts": parts, "target": _target(view, feat, row)}


def _facts(view: str, tok, ids: list[int], marks: list) -> list[str]:
    out = [f"{len(ids)} tokens"]
    if view in ("lm", "pairs_lm", "pairs_score"):
        out.append(f"{sum(m == 'loss' for m in marks)} carry loss")
        bos = [t for t, x in enumerate(ids) if x == tok.bos_token_id and tok.bos_token_id != tok.eos_token_id]
        out.append(f"BOS {tok.bos_token} at {', '.join(map(str, bos))}" if bos else "no BOS")
        eos = [t for t, x in enumerate(ids) if x == tok.eos_token_id]
        out.append(f"EOS {tok.eos_token} " + (", ".join(f"at {t} ({'trained' if marks[t] == 'loss' else 'no loss'})" for t in eos)
                             if eos else "nowhere"))
    return out


def _target(view: str, feat: dict, row: dict | None):
    if row is None:
        return None
    if view in ("text", "number"):
        label = row["label"]
        return ", ".join(label) if isinstance(label, tuple) else str(label)
    if view == "span":
        return "; ".join(feat.get("answers") or []) or "(unanswerable)"
    return None


# -- the template lint -------------------------------------------------------------------------------------------------

def _lint(task, kind: str, view: str, tok, info: dict, rows, feats, natural, max_length: int, split: str,
          result: dict) -> None:
    """Warnings (each with its fix) about what the template and max_length do to the split's examples."""
    warn = lambda code, text, fix: result["warnings"].append({"code": code, "text": text, "fix": fix})
    groups = _collated(task, view, feats, tok.pad_token_id)
    seqs = [(f, *s) for f, group in zip(feats, groups) for s in group]
    eos, bos, pad = tok.eos_token_id, tok.bos_token_id, tok.pad_token_id
    cut = {f.get("row") for f in natural if max(_sequence_lengths(view, f)) > max_length}

    doubled = sum(len(ids) > 1 and bos is not None and ids[0] == ids[1] == bos for _, _, ids, _ in seqs)
    if doubled:
        warn("double_bos", f"{doubled} of {len(seqs)} {split} sequences start with BOS twice ({tok.bos_token!r}): the "
             f"text already begins with it and the tokenizer adds another",
             "remove the BOS string from the start of the texts (or the system prompt); the tokenizer adds it")
    if kind not in TEMPLATED:
        if eos is None:
            warn("no_eos", "the tokenizer has no EOS token: texts end without one",
                 "set eos_token in the model's tokenizer_config.json")
        return

    ended, masked, missing, enders = 0, 0, 0, Counter()
    for f, name, ids, labels in seqs:
        marks = _marks("lm", ids, labels, info, tok)
        runs = replies_of(marks)
        if f.get("row") in cut and runs:  # the last reply was cut at max_length: its end is gone, not missing
            runs = runs[:-1]
        for k, (a, b) in enumerate(runs):
            upto = runs[k + 1][0] if k + 1 < len(runs) else len(ids)
            if eos is not None and ids[b - 1] == eos:
                ended += 1
            elif eos is not None and eos in ids[b:upto]:
                masked += 1
            else:
                missing += 1
                enders[ids[b - 1]] += 1
    replies = ended + masked + missing
    if eos is None:
        warn("no_eos", "the tokenizer has no EOS token, so replies end without one and the model never learns to stop",
             "set eos_token in the model's tokenizer_config.json (and eos_token_id in generation_config.json)")
    elif masked and pad == eos:
        warn("pad_is_eos", f"the pad token is the EOS token ({tok.eos_token!r}), and the EOS after {masked} of "
             f"{replies} replies carries no loss (the template puts it outside the assistant turn; a collator that "
             f"masks padding by id would mask every EOS): the model does not learn to stop",
             "give the tokenizer a pad token of its own (pad_token in tokenizer_config.json), and use a template that "
             "closes each assistant turn with EOS")
    elif masked:
        warn("eos_masked", f"the EOS after {masked} of {replies} replies carries no loss: the template puts it outside "
             f"the assistant turn", "use a template that closes each assistant turn with EOS")
    if missing and eos is not None:
        end, _ = enders.most_common(1)[0]
        marker = end in tok.all_special_ids or end in getattr(tok, "added_tokens_decoder", {})  # not a word
        ender = f" (they end with {tok.convert_ids_to_tokens(end)!r})" if marker else ""
        warn("no_eos", f"{missing} of {replies} replies (not cut) end without EOS ({tok.eos_token!r}){ender}: the "
             f"model does not learn to emit EOS there, and `tunelab generate` stops only at EOS",
             "use a template that ends each assistant turn with the tokenizer's EOS, or set eos_token in "
             "tokenizer_config.json to the token the template ends turns with")
    if pad is not None and pad == eos and not masked and replies:
        result["notes"].append(f"the pad token is EOS ({tok.eos_token!r}): harmless here, collate masks padding by "
                               f"position, and EOS carries loss at the end of {ended} of {replies} replies")

    _lint_system(tok, info, rows, warn)
    if task.GENERATES:
        _lint_generation_prompt(task, tok, info, rows, natural, warn)
    _lint_lengths(view, result["tokens"][split], natural, max_length, split, warn)


def replies_of(marks: list) -> list[tuple[int, int]]:
    """(start, end) of every run of positions that carry loss: the replies of a conversation."""
    runs = []
    for t, m in enumerate(marks):
        if m == "loss" and (not runs or runs[-1][1] != t):
            runs.append((t, t + 1))
        elif m == "loss":
            runs[-1] = (runs[-1][0], t + 1)
    return runs


def _messages(row: dict) -> list[dict]:
    """The conversation a row is rendered from (a preference row: its prompt and the chosen reply)."""
    if "messages" in row:
        return row["messages"]
    return row["prompt"] + [{"role": "assistant", "content": row["chosen"]}]


def _prompt(row: dict) -> list[dict]:
    return chat.prompt_messages(row) if "messages" in row else row["prompt"]


def _lint_system(tok, info: dict, rows, warn) -> None:
    with_system = [r for r in rows if _messages(r)[0]["role"] == "system"]
    dropped = [r for r in with_system
               if _messages(r)[0]["content"].strip()
               not in chat.render(_messages(r), info["template"], tok)[0]]
    if dropped:
        warn("system_dropped", f"the template drops the system turn of {len(dropped)} of {len(with_system)} rows "
             f"(first: row {dropped[0]['row']}): the model never sees those instructions",
             "use a template that renders system turns (task.template=alpaca puts it first), or move the instructions "
             "into the first user turn")


def _lint_generation_prompt(task, tok, info: dict, rows, natural, warn) -> None:
    """The tokens `tunelab generate` feeds for a row's prompt must be those the model was trained to continue."""
    by_row = {r["row"]: r for r in rows}
    differ, first = 0, None
    checked = [f for f in natural if f.get("row") in by_row][:LINT_ROWS]
    for f in checked:
        ids, labels = (f["input_ids"], f["labels"]) if "input_ids" in f else (f["chosen_ids"], f["chosen_labels"])
        start = next((t for t in range(len(labels) - 1, 0, -1) if labels[t] != -100 and labels[t - 1] == -100), None)
        if start is None:
            continue
        text = task.generation_prompt(_prompt(by_row[f["row"]]), None, tok, info)
        gen = tok(text, add_special_tokens=info["template"] == "alpaca")["input_ids"]
        if gen != ids[:start]:
            differ += 1
            if first is None:
                at = next((t for t, (a, b) in enumerate(zip(gen, ids[:start])) if a != b), min(len(gen), start))
                show = lambda xs: repr(tok.decode(xs[max(0, at - 3) : at + 3], skip_special_tokens=False))
                first = (f["row"], at, show(ids[:start] + ids[start : start + 3]), show(gen))
    if differ:
        row, at, trained, generated = first
        warn("generation_prompt", f"the prompt `tunelab generate` feeds differs from the tokens training continues in "
             f"{differ} of {len(checked)} rows (first: row {row}, token {at}: training has {trained}, generate feeds "
             f"{generated}); replies are generated after tokens the model never saw before a reply",
             "make the template's generation prompt end where replies begin (no trailing space; replies without "
             "leading whitespace), so both tokenize the same way")


def _lint_lengths(view: str, stats: dict, natural, max_length: int, split: str, warn) -> None:
    cut_replies = stats.get("cut_response", 0) + stats.get("cut_reply", 0)
    if cut_replies:
        p = percentiles([max(_sequence_lengths(view, f)) for f in natural])
        warn("reply_cut", f"{cut_replies} {split} replies are longer than data.max_length={max_length} allows and are "
             f"cut: they lose their end, and their EOS", f"raise data.max_length (the longest example has {p['max']} "
             f"tokens, p99 {p['p99']}), or set data.truncation=drop to leave such examples out")
    if stats.get("dropped_too_long"):
        warn("dropped_too_long", f"{stats['dropped_too_long']} {split} examples are longer than "
             f"data.max_length={max_length} and dropped (data.truncation=drop)", "raise data.max_length to keep them")
    if view != "lm":  # a preference prompt with no room stops training: _encode has said so
        return
    full = 0
    for f in natural:
        labels = f["labels"]
        first = next((t for t, x in enumerate(labels) if x != -100), len(labels))
        full += first >= max_length
    if full:
        warn("no_room", f"{full} {split} prompts are data.max_length={max_length} tokens or longer, leaving no room "
             f"for the reply: training keeps their last half-window and cuts the reply to fit",
             "raise data.max_length, or shorten those prompts")


# -- text ------------------------------------------------------------------------------------------------------------

BRACKETS = {"loss": ("«", "»"), "reply": ("‹", "›"), "answer": ("«", "»")}
STYLES = {"loss": "black on green", "reply": "underline", "answer": "black on green"}


def _marked(text: str, mark, rich: bool) -> str:
    if rich:
        from rich.markup import escape

        if mark is None:
            return escape(text)
        if mark in STYLES:
            return f"[{STYLES[mark]}]{escape(text)}[/]"
        return f"[black on cyan]{escape(text)}[/][cyan]{escape('[' + mark + ']')}[/]"
    if mark is None:
        return text
    if mark in BRACKETS:
        a, b = BRACKETS[mark]
        return f"{a}{text}{b}"
    return f"«{text}»[{mark}]"


def legend(result: dict, rich: bool) -> str:
    """What the marks of the examples shown mean."""
    marks = {m for ex in result["examples"] for part in ex["parts"] for _, m in part["segments"] if m}
    meaning = [("loss", "text", "carries loss"), ("reply", "text", "the reply, scored at its last token («marked»)"),
               ("answer", "text", "the answer span")]
    out = [f"{_marked(text, mark, rich)} = {what}" for mark, text, what in meaning if mark in marks]
    if any(m.startswith("→") for m in marks):
        out.append(f"{_marked('[MASK]', '→word', rich)} = a masked position and the token it hides")
    elif marks - {"loss", "reply", "answer"}:
        out.append(f"{_marked('word', 'B-X', rich)} = a subword trained to an entity tag")
    return "marked: " + "; ".join(out) if out else ""


def format_text(result: dict, rich: bool = False) -> str:
    """The inspection as text; `rich`: rich console markup (colour) instead of brackets."""
    if rich:
        from rich.markup import escape as plain
    else:
        plain = str
    lines = [plain(line) for line in result["report_text"].splitlines()] + [""]
    say = lambda line: lines.append(plain(line))
    how = "the whole model loaded" if result["weights_loaded"] else "tokenizer and config.json only; weights not loaded"
    say(f"task {result['task']}, model {result['model']}"
        + (f", template {result['template']}" if result.get("template") else "") + f" ({how})")
    if result["max_length_used"] < result["max_length"]:
        say(f"data.max_length={result['max_length']}, but the model takes {result['max_length_used']}: inputs are cut "
            f"there")
    for name, stats in result["tokens"].items():
        say(f"{name} tokens: {format_tokens(stats)}")
    for name, ls in result["lengths"].items():
        p = ls["percentiles"]
        if p:
            say(f"{name} token lengths (before any cut): p50 {p['p50']}, p90 {p['p90']}, p99 {p['p99']}, max {p['max']}; "
                f"{ls['over_max_length']} of {ls['sequences']} ({ls['share_cut']:.0%}) longer than "
                f"{result['max_length_used']}")
    for name, mix in result["mix"].items():
        for what, counts in (mix or {}).items():
            say(f"{name} {what.replace('_', ' ')}: " + (", ".join(f"{a} {b}" for a, b in counts.items())
                                                         if isinstance(counts, dict) else str(counts)))
    if result["examples"]:
        lines += ["", legend(result, rich)]
    for ex in result["examples"]:
        lines.append("")
        say(f"── {ex['split']} row {ex['row']}" + (f" → {ex['target']}" if ex["target"] is not None else ""))
        for part in ex["parts"]:
            say((f"[{part['name']}] " if part["name"] else "") + f"({'; '.join(part['facts'])})")
            lines.append("".join(_marked(text, mark, rich) for text, mark in part["segments"]))
    for note in result["notes"]:
        lines.append("")
        say(f"note: {note}")
    lint = [w for w in result["warnings"] if w["code"] != "dropped_share"]  # the report above has those
    if lint:
        lines.append("")
    for w in lint:
        say(f"warning: {w['text']}. Fix: {w['fix']}.")
    lines.append("")
    say(f"inspected in {result['seconds']:.2f} s (imports aside)")
    return "\n".join(lines)


# -- HTML ------------------------------------------------------------------------------------------------------------

HTML_MARKS = {"loss": "background:#b7ebc0", "answer": "background:#b7ebc0", "reply": "text-decoration:underline"}


def _html_segments(segs: list) -> str:
    out = []
    for text, mark in segs:
        if mark is None:
            out.append(markup.esc(text))
        elif mark in HTML_MARKS:
            out.append(f"<mark style='{HTML_MARKS[mark]}'>{markup.esc(text)}</mark>")
        else:
            out.append(f"<mark style='background:#bfe3f5'>{markup.esc(text)}</mark><sub>{markup.esc(mark)}</sub>")
    return ("<pre style='white-space:pre-wrap;word-break:break-word'>" + "".join(out) + "</pre>")


def html_page(result: dict, title: str) -> str:
    """The same inspection as one page (report.markup's primitives)."""
    body = [f"<h1>{markup.esc(title)}</h1>"]
    if "task" not in result:  # a data file's report (data.inspect)
        found = drop_warning(result)
        result = {**result, "report_text": format_report(result),
                  "warnings": [{"code": "dropped_share", "text": found[0], "fix": found[1]}] if found else []}
    else:
        body.append(markup.kv_table([("task", result["task"]), ("model", result["model"]),
                                     ("template", result.get("template") or "–"),
                                     ("data.max_length", result["max_length"]),
                                     ("max length used", result["max_length_used"]),
                                     ("weights loaded", result["weights_loaded"]),
                                     ("seconds", result["seconds"])]))
    lint = result.get("warnings", [])
    body.append(markup.part("Warnings", lambda: markup.table(
        ["warning", "fix"], [[w["text"], w["fix"]] for w in lint]) if lint else None))
    body.append(markup.part("Data report", lambda: markup.pre(result["report_text"])))
    if result.get("lengths"):
        rows = [[name, ls["sequences"], *(ls["percentiles"] or {}).values(), ls["over_max_length"],
                 f"{ls['share_cut']:.1%}"] for name, ls in result["lengths"].items() if ls["percentiles"]]
        body.append(markup.part("Token lengths", lambda: markup.table(
            ["split", "sequences", "p50", "p90", "p99", "max", "over max_length", "share cut"], rows,
            caption=f"before any cut, against data.max_length={result['max_length_used']}")))
        mixes = [[name, k, ", ".join(f"{a}: {b}" for a, b in v.items()) if isinstance(v, dict) else v]
                 for name, mix in result["mix"].items() if mix for k, v in mix.items()]
        body.append(markup.part("What each split holds", lambda: markup.table(["split", "what", "counts"], mixes)
                                if mixes else None))
    if result.get("examples"):
        shown = []
        for ex in result["examples"]:
            shown.append(f"<h3>{markup.esc(ex['split'])} row {markup.esc(ex['row'])}"
                         + (f" → {markup.esc(ex['target'])}" if ex["target"] is not None else "") + "</h3>")
            for part in ex["parts"]:
                shown.append(markup.note(("[" + part["name"] + "] " if part["name"] else "") + "; ".join(part["facts"])))
                shown.append(_html_segments(part["segments"]))
        body.append(markup.part("Examples as the model sees them",
                                lambda: markup.note(legend(result, False)) + "\n".join(shown)))
    for note in result.get("notes", []):
        body.append(markup.note(note))
    return markup.page(title, "\n".join(b for b in body if b))


def write_html(result: dict, path: Path, title: str) -> Path:
    atomic.write_text(Path(path), html_page(result, title), "the --html page")
    return Path(path)
