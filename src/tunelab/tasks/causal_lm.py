"""Causal language modelling: instruction / chat tuning (task.type sft) and continued pretraining on plain
text (causal_lm). Same functions as every task, so the loop and every method run it unchanged.

- sft: each conversation is rendered with its template (data/chat.py); labels are the token ids on assistant
  turns and -100 elsewhere (every token with task.train_on_prompt). A token is trained when its first character
  lies in an assistant span. Over-long examples are cut or dropped (data.truncation), and counted.
- causal_lm: each text + EOS is cut into windows of data.max_length tokens; every token is trained.
- The loss is summed over target tokens (the loop divides by their count over the accumulated batch). Only
  the hidden states at target positions go through the LM head: with 49k-word vocabularies the full
  (batch, length, vocab) logits would dominate memory for nothing.
- Packing (`pack`, data.packing) concatenates examples into rows with per-example position ids and no
  attention mask; transformers then restricts attention to each example (its packed-sequence detection,
  transformers >= 4.56 for sdpa/eager). The first token of each example gets label -100 so that no example
  is asked to predict the start of the next.
"""

from __future__ import annotations

import math
import statistics

import torch

from .. import models
from ..data import chat
from ..errors import TunelabError
from ..ops import lm_loss, packed_attention, packing
from .base import (  # noqa: F401  (the interface's defaults)
    embed_texts,
    finish,
    predict_summary,
    prepare,
    read_predict,
    search,
)

MAIN_METRIC = "loss"
METRICS = ("loss", "perplexity")
HEADLINE = ("loss", "perplexity")
PROBE = False  # a linear probe needs labels
BASE = True  # the untrained model's metrics are a baseline
PACKS = True  # examples pack end to end into rows (data.packing, train.padding_free)
ROWS_INTERACT = False  # each row's loss is its own: a batch may be split by length
FORGETTING = "perplexity"  # eval.forgetting=auto: perplexity on general text
GENERATES = True  # writes text: generation_prompt, generate (TunedModel.generate, `tunelab generate` / chat)
EMBEDS = False  # no vectors for users: embed and search need an embedding run
SCORES_REPLIES = False  # scores no replies: not a judge or GRPO reward
PIPELINE_TAG = "text-generation"  # the Hub's pipeline_tag for the model card (report/card.py)


def load_splits(cfg, seed: int):
    return chat.load_splits(cfg, seed)


def label_info(splits: dict, cfg) -> dict:
    """What encoding needs besides the tokenizer; saved as the run's labels.json."""
    return {"task": cfg.task.type, "template": cfg.task.template, "train_on_prompt": cfg.task.train_on_prompt,
            "truncation": cfg.data.truncation}


def build_model(model_cfg, info: dict, path=None):
    from transformers import AutoModelForCausalLM

    model, tok = models.load(model_cfg, AutoModelForCausalLM, path=path)
    if not getattr(tok, "is_fast", False):
        raise TunelabError(f"The tokenizer of '{path or model_cfg.path}' is a slow (Python) tokenizer; sft needs a fast one "
                           f"for character offsets. Save the model with its tokenizer.json (a fast tokenizer).")
    if info["task"] == "sft":
        # "auto" is settled here, where the tokenizer is known, and recorded in the run's labels.json.
        info["template"] = chat.resolve_template(info["template"], tok, f"'{path or model_cfg.path}'")
    return model, tok


def head_modules(model) -> list[str]:
    return []  # the LM head is the (usually tied) output embedding: part of the base, never a new head


def length_stats(values: list[int]) -> dict | None:
    """min, median and max of token lengths (None for none)."""
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def encode(rows: list[dict], tokenizer, info: dict, max_length: int) -> tuple[list[dict], dict]:
    if info["task"] == "causal_lm":
        return _encode_text(rows, tokenizer, max_length)
    feats, counts = [], {"cut_prompt": 0, "cut_response": 0, "dropped_too_long": 0, "no_target": 0}
    for r in rows:
        text, spans = chat.render(r["messages"], info["template"], tokenizer)
        enc = tokenizer(text, add_special_tokens=info["template"] == "alpaca", return_offsets_mapping=True)
        ids = enc["input_ids"]
        if info["train_on_prompt"]:
            labels = list(ids)
        else:
            labels = [t if any(s <= a < e for s, e in spans) and b > a else -100
                      for t, (a, b) in zip(ids, enc["offset_mapping"])]
        if len(ids) > max_length:
            if info["truncation"] == "drop":
                counts["dropped_too_long"] += 1
                continue
            ids, labels = _cut(ids, labels, max_length, counts)
        if all(x == -100 for x in labels[1:]):
            counts["no_target"] += 1
            continue
        feats.append({"input_ids": ids, "labels": labels, "row": r["row"]})
    lengths = [len(f["input_ids"]) for f in feats]
    stats = {"examples": len(feats), **counts, "tokens": sum(lengths),
             "target_tokens": sum(sum(x != -100 for x in f["labels"][1:]) for f in feats), "length": length_stats(lengths)}
    return feats, stats


def _cut(ids: list[int], labels: list[int], max_length: int, counts: dict) -> tuple[list[int], list[int]]:
    """Cut prompt tokens from the left; when the response alone is too long, keep the prompt's last half-window
    and cut the response from the right."""
    first = next((i for i, x in enumerate(labels) if x != -100), len(labels))
    excess = len(ids) - max_length
    if excess <= first:
        counts["cut_prompt"] += 1
        return ids[excess:], labels[excess:]
    counts["cut_response"] += 1
    start = first - min(first, max_length // 2)
    return ids[start : start + max_length], labels[start : start + max_length]


def _encode_text(rows: list[dict], tokenizer, max_length: int) -> tuple[list[dict], dict]:
    feats, windows_cut = [], 0
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for r in rows:
        ids = tokenizer(r["text"])["input_ids"] + eos
        chunks = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
        windows_cut += len(chunks) - 1
        feats += [{"input_ids": c, "labels": list(c), "row": r["row"]} for c in chunks if len(c) >= 2]
    lengths = [len(f["input_ids"]) for f in feats]
    return feats, {"examples": len(feats), "texts": len(rows), "split_into_windows": windows_cut, "tokens": sum(lengths),
                   "target_tokens": sum(n - 1 for n in lengths), "length": length_stats(lengths)}


def pack(features: list[dict], max_length: int) -> list[dict]:
    """First-fit-decreasing into rows of at most max_length tokens; each row keeps every example's own
    positions (0, 1, ...) and the first label of every example is -100."""
    rows = []
    for members in packing.first_fit([len(f["input_ids"]) for f in features], max_length):
        row = {"input_ids": [], "labels": [], "position_ids": [], "examples": len(members)}
        for f in (features[i] for i in members):
            row["input_ids"] += f["input_ids"]
            row["labels"] += [-100] + f["labels"][1:]
            row["position_ids"] += list(range(len(f["input_ids"])))
        rows.append(row)
    return rows


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest row; padding gets label -100. Packed rows carry position_ids (pads restart at 0,
    forming their own segment) and no attention mask reaches the model."""
    longest = max(len(f["input_ids"]) for f in features)
    batch = len(features)
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    labels = torch.full((batch, longest), -100, dtype=torch.long)
    mask = torch.zeros((batch, longest), dtype=torch.long)
    packed = "position_ids" in features[0]
    positions = torch.zeros((batch, longest), dtype=torch.long) if packed else None
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        mask[i, :n] = 1
        if packed:
            positions[i, :n] = torch.tensor(f["position_ids"])
            positions[i, n:] = torch.arange(longest - n)
    out = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    if packed:
        out["position_ids"] = positions
    return out


def _hidden(model, batch) -> torch.Tensor:
    """The body's last hidden states (final norm applied), through the body so virtual-token hooks apply."""
    _, body = models.body_of(model)
    if "position_ids" in batch:
        packed_attention.mark(batch["position_ids"])  # attention one example at a time (ops/packed_attention.py)
        out = body(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    else:
        out = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return out[0]


def packing_fault(model) -> str | None:
    """None when the model's attention keeps packed examples apart (train.padding_free gives the same states as
    separate rows), else why not. Packed rows carry only position_ids; transformers builds the block-diagonal
    mask from them for most decoders, but an architecture that ignores them would let examples see each other."""
    vocab = model.get_input_embeddings().num_embeddings
    lengths = (5, 3)
    ids = [torch.arange(7 * k + 3, 7 * k + 3 + n) % vocab for k, n in enumerate(lengths)]
    device = next(model.parameters()).device
    packed = {"input_ids": torch.cat(ids)[None].to(device),
              "position_ids": torch.cat([torch.arange(n) for n in lengths])[None].to(device)}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            together = _hidden(model, packed)[0]
            alone = torch.cat([_hidden(model, {"input_ids": x[None].to(device),
                                               "attention_mask": torch.ones(1, len(x), dtype=torch.long, device=device)})[0]
                               for x in ids])
    except (TypeError, ValueError, RuntimeError) as e:  # e.g. a forward without position_ids
        return f"its forward failed on a packed row ({type(e).__name__}: {str(e)[:200]})"
    finally:
        model.train(was_training)
    gap = float((together.float() - alone.float()).abs().max())
    scale = float(alone.float().abs().max()) or 1.0
    # A leak changes states by their own size (a 2-block OPT: 56 %). Packed and alone round differently: about
    # eps·sqrt(n) of the scale, n ~16 roundings a block; a bf16 base reaches 1.2 % on the bench's 8-block 58M model
    # and 4.9 % on SmolLM2's 30 blocks (bound there: 17 %).
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    rounding = torch.finfo(together.dtype).eps * math.sqrt(16 * (getattr(text, "num_hidden_layers", None) or 1))
    if gap > max(1e-2, rounding) * scale:
        return (f"its attention does not keep packed examples apart (a packed row's hidden states differ from the "
                f"examples' own by {gap:.3g})")
    return None


def _targets(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden states that predict a target, those targets, the row each belongs to)."""
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    hidden = _hidden(model, batch)[:, :-1][keep]
    rows = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)[keep]
    return hidden, targets[keep], rows


def token_nll(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(negative log-likelihood of every target token, the row it belongs to); logits a chunk at a time."""
    hidden, targets, rows = _targets(model, batch)
    nll = lm_loss.token_nll(model.get_output_embeddings(), hidden, targets, _softcap(model))
    return nll, rows


def _softcap(model):
    return getattr(model.config, "final_logit_softcapping", None)  # Gemma 2/3 apply it in ForCausalLM.forward


def forward(model, batch) -> torch.Tensor:
    """Per example: (summed NLL of its target tokens, their count), for the eval metrics."""
    nll, rows = token_nll(model, batch)
    sums = torch.zeros(batch["labels"].shape[0], device=nll.device).index_add_(0, rows, nll)
    return torch.stack([sums, targets(batch).to(sums.dtype)], dim=1)


def targets(batch) -> torch.Tensor:
    return (batch["labels"][:, 1:] != -100).sum(dim=1)


def loss(model, batch, info: dict) -> torch.Tensor:
    hidden, targets, _ = _targets(model, batch)
    return lm_loss.summed_nll(model.get_output_embeddings(), hidden, targets, _softcap(model))


def count(batch) -> int:
    return int(targets(batch).sum())


def metrics(outputs: torch.Tensor, labels: torch.Tensor, info: dict, features: list[dict] | None = None) -> dict:
    tokens = float(outputs[:, 1].sum())
    loss_value = float(outputs[:, 0].sum()) / max(tokens, 1.0)
    return {"loss": loss_value, "perplexity": math.exp(min(loss_value, 50.0)), "target_tokens": int(tokens)}


# -- generation ----------------------------------------------------------------------

def prompt_text(messages: list[dict], tokenizer, info: dict) -> str:
    return chat.render(messages, info.get("template", "alpaca"), tokenizer, add_generation_prompt=True)[0]


def generation_limit(model, tokenizer) -> int:
    """How many tokens prompt and reply may hold together: the model's positions less its virtual tokens."""
    virtual = getattr(model, "prompt_encoder", None)  # prompt / P-tuning / prefix positions come first
    reserved = 0 if virtual is None else int(virtual().shape[0])
    return models.max_input_length(model, tokenizer, 1 << 30, reserved)


def prompt_ids(text: str, tokenizer, info: dict) -> list[int]:
    """The token ids of a rendered prompt, uncut: special tokens added where the template does not write them
    itself (Alpaca and plain text get the tokenizer's BOS; a chat template writes its own)."""
    add_special = info.get("template") == "alpaca" or info.get("task") == "causal_lm"
    return tokenizer(text, add_special_tokens=add_special)["input_ids"]


def _prompt_ids(text: str, tokenizer, info: dict, limit: int, max_new_tokens: int) -> list[int]:
    # Prompt + reply must fit the model's positions: keep the prompt's end, leave room for the reply.
    return prompt_ids(text, tokenizer, info)[-max(1, limit - min(max_new_tokens, limit // 2)):]


def _decoding(tokenizer, temperature: float, top_p: float) -> dict:
    kwargs = {"do_sample": temperature > 0, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], info: dict, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, streamer=None, device=None) -> list[str]:
    """Replies to rendered prompts (greedy when temperature is 0). One prompt at a time, so a streamer can follow
    it; `generate_replies` batches."""
    was_training = model.training
    model.eval()
    out = []
    limit = generation_limit(model, tokenizer)
    for text in prompts:
        ids = torch.tensor([_prompt_ids(text, tokenizer, info, limit, max_new_tokens)], device=device or "cpu")
        seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                             max_new_tokens=min(max_new_tokens, limit - ids.shape[1]),
                             **_decoding(tokenizer, temperature, top_p))[0, ids.shape[1]:]
        out.append(tokenizer.decode(seq, skip_special_tokens=True).strip())
    model.train(was_training)
    return out


@torch.inference_mode()
def generate_replies(model, tokenizer, prompts: list[str], info: dict, max_new_tokens: int = 64,
                     temperature: float = 0.0, top_p: float = 1.0, device=None, batch_size: int = 8) -> list[dict]:
    """{"reply", "tokens", "ended"} per prompt: the reply text, its generated tokens (EOS not counted) and whether
    it stopped at EOS rather than at the token limit. Prompts of similar length are batched with left padding and
    the KV cache, virtual-token models too: their hooks add the virtual tokens at the first step, in front of the
    pads, and give the real tokens the positions they had in training (methods/virtual_tokens.py)."""
    was_training = model.training
    model.eval()
    limit = generation_limit(model, tokenizer)
    encoded = [_prompt_ids(text, tokenizer, info, limit, max_new_tokens) for text in prompts]
    size = max(1, batch_size)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out: list[dict] = [{}] * len(encoded)
    for start in range(0, len(order), size):
        chunk = order[start:start + size]
        width = max(len(encoded[i]) for i in chunk)
        ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in chunk], device=device or "cpu")
        mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in chunk], device=ids.device)
        seqs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=min(max_new_tokens, limit - width),
                              **_decoding(tokenizer, temperature, top_p))[:, width:].tolist()
        for i, seq in zip(chunk, seqs):
            # A row that finished early is padded to the batch's length: everything from its first EOS is not reply.
            ended = eos in seq
            reply = seq[: seq.index(eos)] if ended else seq
            out[i] = {"reply": tokenizer.decode(reply, skip_special_tokens=True).strip(), "tokens": len(reply),
                      "ended": ended}
    model.train(was_training)
    return out


def generation_prompt(item, system: str | None, tokenizer, info: dict) -> str:
    """sft (and dpo, grpo): a user message or a conversation rendered with the run's template, up to the reply;
    causal_lm: the text itself (a conversation's turns joined by newlines), continued as it is."""
    if info.get("task") == "causal_lm":
        return item if isinstance(item, str) else "\n".join(m["content"] for m in item)
    messages = [{"role": "user", "content": item}] if isinstance(item, str) else list(item)
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    return prompt_text(messages, tokenizer, info)


def generation_rows(rows: list[dict], tokenizer, info: dict) -> list[dict]:
    """{"row", "prompt", "reference", "messages"} of held-out rows: a conversation up to its last reply (rendered;
    `messages` unrendered, what a reward model reads) and that reply; causal_lm: the first words of a text (at least
    4, a third) and the rest of it (`messages` the same words)."""
    out = []
    for r in rows:
        if "messages" in r:
            messages = chat.prompt_messages(r)
            prompt = prompt_text(messages, tokenizer, info)
            reference = r["messages"][-1]["content"]
        else:
            words = r["text"].split()
            prompt, reference = " ".join(words[: max(4, len(words) // 3)]), " ".join(words[max(4, len(words) // 3):])
            messages = prompt
        out.append({"row": r.get("row"), "prompt": prompt, "reference": reference, "messages": messages})
    return out


def read_generation(path, cfg, text_field: str | None) -> list[dict]:
    """The rows of a file of the run's format (conversations for sft, text for causal_lm), for generation_rows."""
    data_cfg = cfg.data.model_copy(update={"text_field": text_field or cfg.data.text_field})
    return chat.read(str(path), "eval file", data_cfg, cfg.task.type)[0]


def samples(model, tokenizer, rows: list[dict], info: dict, device, max_length: int, max_new_tokens: int,
            outputs) -> list[dict]:
    """Generations for the first rows of a split: the prompt, the reference reply and the model's."""
    out = []
    for r in generation_rows(rows, tokenizer, info):
        reply = generate(model, tokenizer, [r["prompt"]], info, max_new_tokens=max_new_tokens, device=device)[0]
        out.append({"row": r["row"], "prompt": r["prompt"], "reference": r["reference"], "generated": reply})
    return out


# -- a finished run: predict, evaluate ----------------------------------------------------------------------------

def predict(items, pairs, tokenizer, info: dict, cfg, max_length: int, outputs, run_dir) -> list[dict]:
    """A language model writes text: generate is its inference."""
    raise TunelabError(f"'{run_dir}' is a {cfg.task.type} run, which writes text: use generate "
                       f"(`tunelab generate {run_dir} --prompt ...`), not predict.")


def eval_features(path, cfg, info: dict, text_field: str | None, label_field: str | None, tokenizer,
                  max_length: int) -> tuple[list[dict], dict]:
    """A file of the run's row format (conversations for sft, text for causal_lm), for loss and perplexity."""
    return text_features(encode, path, cfg, info, text_field, tokenizer, max_length)


def text_features(encode_rows, path, cfg, info: dict, text_field: str | None, tokenizer,
                  max_length: int) -> tuple[list[dict], dict]:
    """`eval_features` of the tasks that read data/chat.py's rows (causal_lm, sft, mlm), encoded by `encode_rows`:
    the rows dropped on reading and on encoding (too long, no target) are counted together."""
    data_cfg = cfg.data.model_copy(update={"text_field": text_field or cfg.data.text_field})
    rows, entry = chat.read(str(path), "eval file", data_cfg, cfg.task.type)
    feats, stats = encode_rows(rows, tokenizer, info, max_length)
    return feats, {"dropped": {**entry["dropped"], **{k: v for k, v in stats.items()
                                                     if k in ("dropped_too_long", "no_target")}}}
