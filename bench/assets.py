"""The benchmark's inputs, built once into bench/.cache and reused: a byte-level BPE tokenizer trained on the
bench text, a ~58M-parameter Llama-like decoder from a config (random init, fixed seed), a 1.10B-parameter one of
Llama-3.2-1B's block shape over the same tokenizer (`python -m bench.assets llama-1b` builds it alone), the SFT
conversations (variable length, or rows of one length, real text) and the classification subset. Everything is
seeded, so a rebuild gives the same files.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

from .common import CACHE, ROOT, SEED, chat_length, length_stats, read_jsonl, write_jsonl

DIALOGS = ROOT / "demo_data" / "sft"
PREFERENCE = ROOT / "examples" / "preference"
SENTIMENT = ROOT / "demo_data" / "sentiment"
MODEL_58M = CACHE / "llama-58m"
MODEL_1B = CACHE / "llama-1b"
# Llama-3.2-1B's blocks (16 layers, hidden 2048, 32 heads over 8 K/V heads, gated MLP 8192 wide) over the 58M
# model's 32,000-token vocabulary, LM head untied as in the 58M model: 1,104,218,112 parameters
# (common.decoder_params), 4.42 GB in float32.
CONFIG_1B = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
             "intermediate_size": 8192, "vocab_size": 32000, "tie_word_embeddings": False,
             "max_position_embeddings": 1024}
SHARD_1B = "1GB"  # safetensors shards of at most this (5 files), as hub checkpoints of this size come
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


def build_1b() -> Path:
    """Model directory of the 1B decoder with the 58M model's tokenizer. Built in a process of its own (`python -m
    bench.assets llama-1b`) so that the caller never holds the 4.4 GB of weights; written under a temporary name and
    renamed when complete, so an interrupted build is never taken for a model."""
    if (MODEL_1B / "config.json").is_file() and (MODEL_1B / "tokenizer.json").is_file():
        return MODEL_1B
    build_58m()  # its tokenizer first, in this process (small)
    subprocess.run([sys.executable, "-m", "bench.assets", "llama-1b"], cwd=ROOT, check=True)
    return MODEL_1B


def _build_1b_here() -> None:
    """One float32 copy of the weights, initialised in place (seeded) and written shard by shard straight from
    the tensors (safetensors writes from the tensors' memory, no second copy). float32 because every runner loads
    this file as it is and the other scenarios train float32 bases; `--precision bf16-base` casts at load."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from .common import decoder_params

    tok = AutoTokenizer.from_pretrained(str(build_58m()))  # `python -m bench.assets llama-1b` on a fresh checkout too
    partial = MODEL_1B.with_name(MODEL_1B.name + ".partial")
    if partial.exists():  # an interrupted build of ours
        shutil.rmtree(partial)
    print(f"building the 1B model into {MODEL_1B.relative_to(ROOT)} (once; ~4.4 GB float32)", flush=True)
    config = LlamaConfig(**CONFIG_1B, bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    if n != decoder_params(CONFIG_1B):  # the count the bench documents, from the config alone
        raise RuntimeError(f"the 1B model has {n:,} parameters, the config says {decoder_params(CONFIG_1B):,}")
    model.save_pretrained(partial, max_shard_size=SHARD_1B)
    tok.save_pretrained(partial)
    os.replace(partial, MODEL_1B)
    print(f"  {n / 1e9:.3f}B parameters, float32", flush=True)


def sft_tokenizers(paths: list[Path]):
    from transformers import AutoTokenizer

    return [AutoTokenizer.from_pretrained(str(p)) for p in paths]


def build_sft(n_train: int, tokenizer_dirs: list[Path], rows: int | None = None, held_out: int | None = None) -> dict:
    """Train and held-out conversations, written once per (train size, tokenizers, row length, held-out count).
    Each is a user instruction and an assistant reply: the instruction's own answer (dialog reply, or the preferred
    reply of a preference pair) followed by movie snippets, cut at a word so that the whole rendered conversation
    reaches a target length drawn log-uniformly in [20, 512] tokens, or, with `rows`, exactly that target (the
    reply cut at the last word that fits, so each is a few tokens short of it at most). Lengths are measured with
    every tokenizer given (the 58M model's and SmolLM2's) and the longest counts, so no runner of any scenario ever
    truncates. Held-out examples come from the other splits of the sources (validation dialogs and pairs, test
    snippets) with their own seed, always of the variable lengths; `held_out` fewer than 32 are the first of the 32."""
    from .common import HELD_OUT

    held_out = held_out or HELD_OUT
    tag = "+".join(p.name for p in tokenizer_dirs)
    train_path = CACHE / "data" / f"sft-train-{n_train}-{tag}{f'-rows{rows}' if rows else ''}.jsonl"
    heldout_path = CACHE / "data" / f"sft-heldout-{tag}{'' if held_out == HELD_OUT else f'-{held_out}'}.jsonl"
    tokenizers = sft_tokenizers(tokenizer_dirs)
    if not train_path.is_file():
        write_jsonl(train_path, _conversations(n_train, "train", "train", SEED, tokenizers, rows))
    if not heldout_path.is_file():
        write_jsonl(heldout_path, _conversations(held_out, "validation", "test", SEED + 1, tokenizers))
    lengths = {p.name: length_stats([chat_length(t, r["messages"]) for r in read_jsonl(train_path)])
               for p, t in zip(tokenizer_dirs, tokenizers)}
    return {"train": train_path, "heldout": heldout_path, "lengths": lengths}


def target_length(rng: random.Random, rows: int | None = None) -> int:
    """Tokens the next conversation is cut to: `rows` when every row has one length, else drawn log-uniformly in
    [SHORTEST, MAX_LENGTH] (the draw is taken either way, so the rest of the sequence does not depend on it)."""
    drawn = int(math.exp(rng.uniform(math.log(SHORTEST), math.log(MAX_LENGTH))))
    if rows is not None and not SHORTEST <= rows <= MAX_LENGTH:
        raise ValueError(f"rows={rows}: a row length between {SHORTEST} and {MAX_LENGTH} tokens")
    return rows or drawn


def _conversations(n: int, dialog_split: str, snippet_split: str, seed: int, tokenizers,
                   row_tokens: int | None = None) -> list[dict]:
    rng = random.Random(seed)
    pairs = [(r["messages"][i]["content"], r["messages"][i + 1]["content"])
             for r in read_jsonl(DIALOGS / f"{dialog_split}.jsonl") for i in range(len(r["messages"]) - 1)
             if r["messages"][i]["role"] == "user" and r["messages"][i + 1]["role"] == "assistant"]
    pairs += [(r["prompt"], r["chosen"]) for r in read_jsonl(PREFERENCE / f"{dialog_split}.jsonl")]
    snippets = [r["text"] for r in read_jsonl(SENTIMENT / f"{snippet_split}.jsonl")]
    rows = []
    while len(rows) < n:
        target = target_length(rng, row_tokens)
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


if __name__ == "__main__":
    if sys.argv[1:] != ["llama-1b"]:
        sys.exit("usage: python -m bench.assets llama-1b   (builds bench/.cache/llama-1b; the bench builds the rest)")
    if not (MODEL_1B / "config.json").is_file():
        if missing_inputs() and not (MODEL_58M / "tokenizer.json").is_file():  # the 58M tokenizer is trained on them
            sys.exit(f"missing data: {', '.join(missing_inputs())}; `make demo-data demo_data/sft/train.jsonl` "
                     "builds it.")
        _build_1b_here()
