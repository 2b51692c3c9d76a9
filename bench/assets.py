"""The benchmark's inputs, built once into bench/.cache and reused: a byte-level BPE tokenizer trained on the
bench text, a ~58M-parameter Llama-like decoder from a config (random init, fixed seed), the SFT conversations
(variable length, real text) and the classification subset. Everything is seeded, so a rebuild gives the same
files.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from .common import CACHE, ROOT, SEED, chat_length, length_stats, read_jsonl, write_jsonl

DIALOGS = ROOT / "demo_data" / "sft"
PREFERENCE = ROOT / "examples" / "preference"
SENTIMENT = ROOT / "demo_data" / "sentiment"
MODEL_58M = CACHE / "llama-58m"
MAX_LENGTH = 512
SHORTEST = 20  # target lengths are drawn log-uniformly between these, in tokens of the full rendered conversation

# ChatML. The {% generation %} markers change nothing in the rendered text; they let TRL's assistant_only_loss find
# the reply (content and <|im_end|>: the tokens tunelab trains on), so TRL needs no template patching here.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def missing_inputs() -> list[str]:
    needed = [DIALOGS / "train.jsonl", DIALOGS / "validation.jsonl", PREFERENCE / "train.jsonl",
              PREFERENCE / "validation.jsonl", SENTIMENT / "train.jsonl", SENTIMENT / "test.jsonl"]
    return [str(p.relative_to(ROOT)) for p in needed if not p.is_file()]


def corpus() -> list[str]:
    """Every text the SFT data is made of: dialog turns, preference prompts and replies, movie snippets."""
    texts = []
    for split in ("train", "validation"):
        texts += [m["content"] for r in read_jsonl(DIALOGS / f"{split}.jsonl") for m in r["messages"]]
        texts += [r[k] for r in read_jsonl(PREFERENCE / f"{split}.jsonl") for k in ("prompt", "chosen", "rejected")]
    for split in ("train", "test"):
        texts += [r["text"] for r in read_jsonl(SENTIMENT / f"{split}.jsonl")]
    return texts


def build_58m() -> Path:
    """Tokenizer + model directory of the 58M decoder (tunelab and the peers load it the same way)."""
    if (MODEL_58M / "config.json").is_file() and (MODEL_58M / "tokenizer.json").is_file():
        return MODEL_58M
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    print(f"building the 58M model and its tokenizer into {MODEL_58M.relative_to(ROOT)} (once)", flush=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    # 32,000 asked for; this corpus yields fewer merges, and the model keeps its 32,000-row vocabulary regardless.
    trainer = trainers.BpeTrainer(vocab_size=32000, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|pad|>",
                                  unk_token="<|endoftext|>", model_max_length=1024,
                                  model_input_names=["input_ids", "attention_mask"])
    tok.chat_template = CHAT_TEMPLATE

    config = LlamaConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                         intermediate_size=1376, vocab_size=32000, tie_word_embeddings=False,
                         max_position_embeddings=1024, bos_token_id=None, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.save_pretrained(MODEL_58M)
    tok.save_pretrained(MODEL_58M)
    n = sum(p.numel() for p in model.parameters())
    print(f"  {n / 1e6:.1f}M parameters, tokenizer vocabulary {len(tok):,} (model rows 32,000)", flush=True)
    return MODEL_58M


def sft_tokenizers(paths: list[Path]):
    from transformers import AutoTokenizer

    return [AutoTokenizer.from_pretrained(str(p)) for p in paths]


def build_sft(n_train: int, tokenizer_dirs: list[Path]) -> dict:
    """Train and held-out conversations, written once per (train size, tokenizers). Each is a user instruction and
    an assistant reply: the instruction's own answer (dialog reply, or the preferred reply of a preference pair)
    followed by movie snippets, cut at a word so that the whole rendered conversation reaches a target length drawn
    log-uniformly in [20, 512] tokens. Lengths are measured with every tokenizer given (the 58M model's and
    SmolLM2's) and the longest counts, so no runner of any scenario ever truncates. Held-out examples come from the
    other splits of the sources (validation dialogs and pairs, test snippets) with their own seed."""
    tag = "+".join(p.name for p in tokenizer_dirs)
    train_path = CACHE / "data" / f"sft-train-{n_train}-{tag}.jsonl"
    heldout_path = CACHE / "data" / f"sft-heldout-{tag}.jsonl"
    tokenizers = sft_tokenizers(tokenizer_dirs)
    if not train_path.is_file():
        write_jsonl(train_path, _conversations(n_train, "train", "train", SEED, tokenizers))
    if not heldout_path.is_file():
        from .common import HELD_OUT

        write_jsonl(heldout_path, _conversations(HELD_OUT, "validation", "test", SEED + 1, tokenizers))
    lengths = {p.name: length_stats([chat_length(t, r["messages"]) for r in read_jsonl(train_path)])
               for p, t in zip(tokenizer_dirs, tokenizers)}
    return {"train": train_path, "heldout": heldout_path, "lengths": lengths}


def _conversations(n: int, dialog_split: str, snippet_split: str, seed: int, tokenizers) -> list[dict]:
    rng = random.Random(seed)
    pairs = [(r["messages"][i]["content"], r["messages"][i + 1]["content"])
             for r in read_jsonl(DIALOGS / f"{dialog_split}.jsonl") for i in range(len(r["messages"]) - 1)
             if r["messages"][i]["role"] == "user" and r["messages"][i + 1]["role"] == "assistant"]
    pairs += [(r["prompt"], r["chosen"]) for r in read_jsonl(PREFERENCE / f"{dialog_split}.jsonl")]
    snippets = [r["text"] for r in read_jsonl(SENTIMENT / f"{snippet_split}.jsonl")]
    rows = []
    while len(rows) < n:
        target = int(math.exp(rng.uniform(math.log(SHORTEST), math.log(MAX_LENGTH))))
        user, answer = rng.choice(pairs)
        words = answer.split()
        while len(words) < 2 * target:  # a word is at least one token: plenty to cut from
            words += rng.choice(snippets).split()
        lo, hi = 1, len(words)  # the longest reply (in words) whose conversation fits the target
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if _longest(tokenizers, user, words[:mid]) <= target else (lo, mid - 1)
        if _longest(tokenizers, user, words[:lo]) > MAX_LENGTH:  # an instruction too long on its own: draw again
            continue
        rows.append({"messages": [{"role": "user", "content": user},
                                  {"role": "assistant", "content": " ".join(words[:lo])}]})
    return rows


def _longest(tokenizers, user: str, reply_words: list[str]) -> int:
    """Tokens of the rendered conversation in whichever tokenizer makes it longest."""
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": " ".join(reply_words)}]
    return max(chat_length(t, messages) for t in tokenizers)


def build_cls(n_train: int) -> dict:
    """A seeded sample of the sentiment training set (exactly the examples the run's steps consume) and the first
    32 of a seeded shuffle of its test set."""
    from .common import HELD_OUT

    train_path = CACHE / "data" / f"cls-train-{n_train}.jsonl"
    heldout_path = CACHE / "data" / "cls-heldout.jsonl"
    if not train_path.is_file():
        rows = read_jsonl(SENTIMENT / "train.jsonl")
        random.Random(SEED).shuffle(rows)
        write_jsonl(train_path, [{"text": r["text"], "label": r["label"]} for r in rows[:n_train]])
    if not heldout_path.is_file():
        rows = read_jsonl(SENTIMENT / "test.jsonl")
        random.Random(SEED).shuffle(rows)
        write_jsonl(heldout_path, [{"text": r["text"], "label": r["label"]} for r in rows[:HELD_OUT]])
    return {"train": train_path, "heldout": heldout_path}


def cls_lengths(model_dir: str, train_path: Path, max_length: int) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [r["text"] for r in read_jsonl(train_path)]
    return {"minilm": length_stats([len(x) for x in tok(texts, truncation=True, max_length=max_length)["input_ids"]])}
