"""Instruction and chat data (task.type sft) and plain text (causal_lm): rows -> conversations -> rendered text
with the character spans the loss is taken on.

Every sft row becomes {"messages": [{"role", "content"[, "input"]}...], "row": n}:
- alpaca: `instruction` (+ optional `input`, `system`) and `output` -> user (with `input` kept apart, for the
  Alpaca template's "### Input:" section) and assistant;
- messages: a list of {"role": system|user|assistant, "content": str};
- sharegpt: `conversations`, a list of {"from": human|gpt|system, "value": str}.
Order is checked: an optional system turn first, then user and assistant alternating from user, ending with a
non-empty assistant turn. causal_lm rows are {"text": str, "row": n}.

Rendering (`render`) returns the text and the (start, end) character spans of every assistant turn: with the
tokenizer's chat template, each span is what rendering messages[:i+1] adds to rendering messages[:i] with the
generation prompt (the turn's content and its end-of-turn marker, trailing whitespace excluded), which needs a
template that only appends (ChatML, Llama 3, ... do; a template that rewrites earlier turns is refused). The
built-in Alpaca template is Stanford Alpaca's prompt:

    Below is an instruction that describes a task[, paired with an input that provides further context]. Write a
    response that appropriately completes the request.\\n\\n### Instruction:\\n{instruction}\\n\\n[### Input:\\n{input}\\n\\n]
    ### Response:\\n{output}{eos}

(a system turn replaces the first paragraph; further turns repeat the Instruction / Response sections). The EOS
token closes the last assistant turn when the template has not put it there already, and is trained on.
"""

from __future__ import annotations

from ..errors import TunelabError
from .clean import cut_long_texts, cut_report, is_empty_text, kept_chars
from .sources import describe, field_names, read_records
from .split import random_split

ALPACA = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.")
# The alpaca template as Jinja, for programs that render a chat template themselves (a GGUF export's
# tokenizer.chat_template, read by llama.cpp): the same text as _alpaca below for messages without an "input" field,
# the trailing blank line left off after the last message unless a reply is to follow, as _alpaca's rstrip does.
ALPACA_JINJA = (
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% else %}" + ALPACA
    + "{% endif %}{{ '\\n\\n' }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '### Instruction:\\n' + m['content'] }}{% elif m['role'] == 'assistant' %}"
    "{{ '### Response:\\n' + m['content'] + eos_token }}{% endif %}"
    "{% if m['role'] != 'system' and (not loop.last or add_generation_prompt) %}{{ '\\n\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "model": "assistant", "system": "system"}
ROW_EXAMPLE = {
    "alpaca": '{"instruction": "Name a colour.", "input": "", "output": "Blue."}',
    "messages": '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}',
    "sharegpt": '{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}',
    "text": '{"text": "A paragraph of domain text."}',
}


# -- reading --------------------------------------------------------------------

def detect_format(record: dict, text_field: str, what: str) -> str:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    if text_field in record:
        return "text"
    raise TunelabError(
        f"{what}: cannot tell the data format from the first row's fields ({field_names(record)}). sft data "
        f"needs 'instruction'/'output' (alpaca), 'messages' or 'conversations' (sharegpt); causal_lm needs a text column "
        f"(data.text_field='{text_field}'). Rename the columns, or set data.format and data.text_field.")


def read(path: str, key: str, data_cfg, task_type: str) -> tuple[list[dict], dict]:
    """(examples, report entry) of one file or dataset; any malformed row is an error naming it."""
    origin: dict = {}
    records = read_records(path, key, data_cfg, origin)
    what = describe(path, key, data_cfg)
    if not records:
        raise TunelabError(f"{what} has no rows.")
    fmt = data_cfg.format
    if fmt == "auto":
        fmt = "text" if task_type in ("causal_lm", "mlm") else detect_format(records[0]["record"], data_cfg.text_field, what)
    if task_type in ("causal_lm", "mlm") and fmt != "text":
        hint = f"Use task.type=sft for {fmt} rows, or point" if task_type == "causal_lm" else "Point"
        raise TunelabError(f"{what}: task.type={task_type} trains on plain text, but data.format={fmt}. {hint} "
                           f"data.text_field at a text column with data.format=text.")
    if task_type == "sft" and fmt == "text":
        raise TunelabError(f"{what}: task.type=sft needs prompts and responses (alpaca, messages or sharegpt rows), "
                           f"not plain text. Use task.type=causal_lm for continued pretraining on text.")
    examples, problems = [], []
    for r in records:
        try:
            examples.append({**_example(r["record"], fmt, data_cfg.text_field), "row": r["row"]})
        except ValueError as e:
            problems.append((r["row"], str(e)))
    if problems:
        row, msg = problems[0]
        more = f" ({len(problems)} rows have problems: {', '.join(str(p[0]) for p in problems[:10])}" \
               f"{', ...' if len(problems) > 10 else ''})" if len(problems) > 1 else ""
        raise TunelabError(f"{what} row {row}: {msg}{more}. A valid {fmt} row looks like {ROW_EXAMPLE[fmt]}; fix or "
                           f"remove the row.")
    # plain text (causal_lm, mlm) is cut into windows, every character used: only conversations are cut
    keep = kept_chars(data_cfg.max_length)
    rows_cut = sum(bool(cut_long_texts(ex["messages"], ("content", "input"), keep)) for ex in examples
                   if "messages" in ex)
    kept, duplicates = _dedupe(examples) if data_cfg.dedupe else (examples, 0)
    turns = sum(sum(m["role"] == "assistant" for m in ex["messages"]) for ex in kept) if fmt != "text" else None
    entry = {"format": fmt, "rows_read": len(records), "dropped": {"duplicate": duplicates}, "rows": len(kept),
             **cut_report(rows_cut, keep)}
    if turns is not None:
        entry["assistant_turns"] = turns
    if origin:
        entry["dataset"] = origin
    return kept, entry


def _text(value, field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"'{field}' is {type(value).__name__}, not a string")
    return value


def _example(record: dict, fmt: str, text_field: str) -> dict:
    if fmt == "text":
        if text_field not in record:
            raise ValueError(f"no '{text_field}' field (set data.text_field to the text column)")
        text = _text(record[text_field], text_field)
        if is_empty_text(text):
            raise ValueError(f"'{text_field}' is empty")
        return {"text": text}
    if fmt == "alpaca":
        for field in ("instruction", "output"):
            if field not in record or record[field] is None:
                raise ValueError(f"no '{field}' field")
        instruction, output = _text(record["instruction"], "instruction"), _text(record["output"], "output")
        extra = record.get("input") or ""
        if is_empty_text(instruction):
            raise ValueError("'instruction' is empty")
        if is_empty_text(output):
            raise ValueError("'output' is empty: there is no response to learn")
        messages = [{"role": "system", "content": _text(record["system"], "system")}] if record.get("system") else []
        messages.append({"role": "user", "content": instruction, "input": _text(extra, "input")})
        messages.append({"role": "assistant", "content": output})
        return {"messages": messages}
    field = "messages" if fmt == "messages" else "conversations"
    turns = record.get(field)
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"'{field}' is missing or not a non-empty list")
    messages = []
    for i, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i} of '{field}' is a {type(turn).__name__}, not an object")
        if fmt == "messages":
            role, content = turn.get("role"), turn.get("content")
        else:
            role, content = SHAREGPT_ROLES.get(str(turn.get("from")).lower()), turn.get("value")
            if role is None:
                raise ValueError(f"turn {i} has 'from' {turn.get('from')!r}; use human, gpt or system")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"turn {i} has role {role!r}; use system, user or assistant")
        messages.append({"role": role, "content": _text(content, f"turn {i} content")})
    check_order(messages)
    return {"messages": messages}


def check_order(messages: list[dict]) -> None:
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if not body:
        raise ValueError("has a system turn only; add a user turn and the assistant's reply")
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            n = i + 1 + (len(messages) - len(body))
            raise ValueError(f"roles are out of order: turn {n} is {m['role']}, expected {expected} (an optional system "
                             f"turn first, then user and assistant alternating, starting with user)")
    if body[-1]["role"] != "assistant":
        raise ValueError("ends with a user turn that has no assistant reply; add the reply or remove that turn")
    for i, m in enumerate(messages, start=1):
        if m["role"] == "assistant" and is_empty_text(m["content"]):
            raise ValueError(f"turn {i} is an empty assistant turn: there is nothing to learn there")


def _dedupe(examples: list[dict]) -> tuple[list[dict], int]:
    seen, kept = set(), []
    for ex in examples:
        key = ex["text"] if "text" in ex else tuple((m["role"], m["content"], m.get("input", "")) for m in ex["messages"])
        if key not in seen:
            seen.add(key)
            kept.append(ex)
    return kept, len(examples) - len(kept)


def load_splits(cfg, seed: int, read_file=None) -> tuple[dict[str, list[dict]], dict]:
    """Read train (and validation / test) with `read_file` (default: sft / causal_lm rows); without a validation
    file hold out a seeded random val_fraction."""
    read_file = read_file or read
    files = {"train": cfg.data.train, "validation": cfg.data.validation, "test": cfg.data.test}
    splits, entries = {}, {}
    for name, path in files.items():
        if path is not None:
            splits[name], entries[name] = read_file(path, f"data.{name}", cfg.data, cfg.task.type)
    if cfg.data.validation is None:
        train, splits["validation"] = random_split(splits["train"], cfg.data.val_fraction, seed, cfg.data.train)
        splits["train"], n_val = train, len(splits["validation"])
        entries["train"].update(rows=len(train), held_out=n_val)
        entries["validation"] = {"from": "train", "rows": n_val}
        split = {"method": "random", "val_fraction": cfg.data.val_fraction, "seed": seed}
    else:
        split = {"method": "file", "val_fraction": None, "seed": seed}
    report = {"files": {k: v for k, v in files.items()}, "split": split,
              "splits": {k: entries[k] for k in ("train", "validation", "test") if k in entries}}
    return {k: splits[k] for k in ("train", "validation", "test") if k in splits}, report


# -- templates -------------------------------------------------------------------

def resolve_template(name: str, tokenizer, where: str) -> str:
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if name == "chat" and not has_chat:
        raise TunelabError(f"task.template=chat, but the tokenizer of {where} has no chat template. Set "
                           f"task.template=alpaca (the built-in template), or use an instruct model's tokenizer.")
    return name if name != "auto" else ("chat" if has_chat else "alpaca")


def _user_text(m: dict) -> str:
    return m["content"] + (f"\n\n{m['input']}" if m.get("input") else "")


def render(messages: list[dict], template: str, tokenizer, add_generation_prompt: bool = False) -> tuple[str, list]:
    """(text, assistant spans). With add_generation_prompt the text ends where the model's reply starts."""
    if template == "alpaca":
        text, spans = _alpaca(messages, tokenizer.eos_token or "", add_generation_prompt)
    else:
        text, spans = _chat(messages, tokenizer, add_generation_prompt)
    eos = tokenizer.eos_token
    if spans and eos and not text[: spans[-1][1]].endswith(eos):
        end = spans[-1][1]
        text = text[:end] + eos + text[end:]
        spans[-1] = (spans[-1][0], end + len(eos))
    return text, spans


def _alpaca(messages: list[dict], eos: str, add_generation_prompt: bool) -> tuple[str, list]:
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    turns = [m for m in messages if m["role"] != "system"]
    first_user = next((m for m in turns if m["role"] == "user"), {})
    text = (system if system is not None else ALPACA_INPUT if first_user.get("input") else ALPACA) + "\n\n"
    spans = []
    for m in turns:
        if m["role"] == "user":
            text += f"### Instruction:\n{m['content']}\n\n"
            if m.get("input"):
                text += f"### Input:\n{m['input']}\n\n"
        else:
            text += "### Response:\n"
            start = len(text)
            text += m["content"] + eos
            spans.append((start, len(text)))
            text += "\n\n"
    if add_generation_prompt:
        return text + "### Response:\n", []
    return text.rstrip("\n"), spans


def _chat(messages: list[dict], tokenizer, add_generation_prompt: bool) -> tuple[str, list]:
    msgs = [{"role": m["role"], "content": _user_text(m) if m["role"] == "user" else m["content"]} for m in messages]

    def apply(ms, gen):
        return tokenizer.apply_chat_template(ms, tokenize=False, add_generation_prompt=gen)

    if add_generation_prompt:
        return apply(msgs, True), []
    full, spans = apply(msgs, False), []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before, upto = apply(msgs[:i], True), apply(msgs[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise TunelabError(
                "The tokenizer's chat template rewrites earlier turns when a turn is added (e.g. it removes reasoning "
                "from past replies), so the assistant tokens cannot be located. Set task.template=alpaca, or "
                "task.train_on_prompt=true to train on every token.")
        end = len(upto.rstrip())
        spans.append((len(before), end))
    return full, spans


def prompt_messages(example: dict) -> list[dict]:
    """The conversation up to (not including) its last assistant turn: what generation is asked to continue."""
    messages = example["messages"]
    return messages[: max(i for i, m in enumerate(messages) if m["role"] == "assistant")]
