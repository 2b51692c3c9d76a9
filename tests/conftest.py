"""Shared fixtures: tiny models built from configs and generated sentiment data.

Everything here is offline and seeded. The tiny models are saved as real HF
model directories (config + safetensors + tokenizer) so tests exercise the
same loading path as a user's model.
"""

from __future__ import annotations

import json
import os
import random
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the thread
# pool's spinning makes each step ~10x slower. Subprocesses (CLI tests) inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

POSITIVE = ["great", "wonderful", "superb", "moving", "brilliant", "delightful", "fun", "charming"]
NEGATIVE = ["awful", "boring", "dull", "terrible", "tedious", "clumsy", "bland", "weak"]
FILLER = ["the", "film", "movie", "story", "plot", "acting", "was", "is", "a", "really", "quite", "and", "cast", "ending", "script"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """Sentences whose label is decided by which sentiment words they contain."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = rng.sample(FILLER, rng.randint(3, 7))
        cue = POSITIVE if label == "pos" else NEGATIVE
        for _ in range(rng.randint(1, 2)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(cue))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _save_bert(path: Path) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = SPECIALS + sorted(set(POSITIVE + NEGATIVE + FILLER)) + list("abcdefghijklmnopqrstuvwxyz")
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, type_vocab_size=2, pad_token_id=0,
    )
    # Save a base (no head) checkpoint, as pretrained encoders ship.
    BertForSequenceClassification(cfg).bert.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _save_gpt2(path: Path) -> Path:
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    corpus = [r["text"] for r in make_rows(300, seed=1)]
    bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    bpe.save_model(str(path))
    tok = GPT2TokenizerFast(vocab=str(path / "vocab.json"), merges=str(path / "merges.txt"))
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT encoder directory (hidden 32) with a word-level vocab."""
    return _save_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 directory (hidden 32) with a byte-level BPE and no pad token."""
    return _save_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2")


TEXTS = ["the film was great and fun", "awful boring plot", "a really moving story", "dull"]


def base_classifier(path, seed: int = 0):
    """A 2-label classifier on a tiny model dir, in eval mode; the head is seeded because it is new on every load."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model.eval()


def text_batch(path, texts=TEXTS) -> dict:
    """Padded input tensors for `texts` with the model dir's own tokenizer (pad = EOS for decoders)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return dict(tok(texts, padding=True, return_tensors="pt"))


@pytest.fixture(params=["bert", "gpt2"])
def arch(request, tiny_bert, tiny_gpt2):
    """(model type, model dir, inputs) for each tiny model; test files with other needs define their own."""
    path = tiny_bert if request.param == "bert" else tiny_gpt2
    return request.param, path, text_batch(path)


# -- float tolerances --------------------------------------------------------------------

def size(*values) -> float:
    """The largest |x| in numbers, tensors, arrays and lists of them."""
    import numpy as np
    import torch

    out = 0.0
    for v in values:
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, (list, tuple)):
            out = max(out, size(*v))
            continue
        if isinstance(v, torch.Tensor):
            v = v.detach().double().cpu().numpy()
        a = np.abs(np.asarray(v, dtype=np.float64))
        out = max(out, float(a.max()) if a.size else 0.0)
    return out


def tol(scale, ops: float = 1, dtype=None) -> float:
    """An absolute tolerance for values computed two ways that are equal in exact arithmetic but round differently
    (another library, another batch layout, merged weights, another kernel): the dtype's machine epsilon, times
    `ops`, how many roundings can pile up on the way (n for a sum of n terms: the standard n·eps bound), times
    `scale`, the size of the values rounded (a number, or the largest |x| of a tensor / array / list). Where the
    values compared are near 0 because terms cancelled, `scale` is the size of those terms. `dtype`: that of the
    arithmetic, by default a tensor scale's own, else float32. Use it as atol with rtol=0, or approx(abs=...)."""
    import torch

    if dtype is None:
        floating = isinstance(scale, torch.Tensor) and scale.is_floating_point()
        dtype = scale.dtype if floating else torch.float32
    return ops * torch.finfo(dtype).eps * size(scale)


def forward_ops(hidden: int, ffn: int, layers: int, head_dim: int = 8, tokens: int = 32) -> int:
    """Roundings along one forward pass of a transformer, an n-term sum counting n (the n·eps bound): each layer
    chains the query projection (hidden terms), the attention scores (head_dim), the softmax and the weighted sum of
    values (tokens each), the output projection (hidden), the FFN (hidden + ffn) and two norms (mean and variance:
    2 x 2 x hidden); then the embeddings' norm and a head (2 x hidden each)."""
    return layers * (3 * hidden + head_dim + 2 * tokens + ffn + 4 * hidden) + 4 * hidden


# The tiny models above: hidden 32, FFN up to 128 (GPT-2's 4 x 32), 2 layers, heads of 8, inputs under 32 tokens
FORWARD_OPS = forward_ops(32, 128, 2)  # 976

# A tiny classifier's 2-label probabilities computed two ways (batched / alone, merged, reloaded): a 2-label softmax
# moves by at most half as much as its logits (sigmoid' <= 1/4, on their difference), and these logits stay within
# +-2, so a forward pass's rounding of values of size 1.
PROBS_TOL = tol(1.0, FORWARD_OPS)


@pytest.fixture
def sentiment_files(tmp_path) -> dict[str, Path]:
    """train (240 rows), test (60 rows) JSONL files of generated sentiment data."""
    return {
        "train": write_jsonl(tmp_path / "train.jsonl", make_rows(240, seed=0)),
        "test": write_jsonl(tmp_path / "test.jsonl", make_rows(60, seed=99)),
    }


# -- causal LM fixtures -----------------------------------------------------------

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("good", "bad"), ("fast", "slow"), ("light", "dark"),
             ("happy", "sad"), ("open", "closed"), ("early", "late"), ("full", "empty"), ("old", "new"), ("high", "low")]


def make_chat_rows(n: int, seed: int = 0, fmt: str = "messages") -> list[dict]:
    """Seeded instruction rows: "What is the opposite of hot?" -> "The opposite of hot is cold." (learnable)."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.choice(OPPOSITES)
        if rng.random() < 0.5:
            a, b = b, a
        q, ans = f"What is the opposite of {a}?", f"The opposite of {a} is {b}."
        if fmt == "alpaca":
            rows.append({"instruction": q, "input": "" if i % 3 else f"word {i}", "output": ans})
        else:
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]})
    return rows


def _save_chat_llama(path: Path) -> Path:
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    corpus = [m["content"] for r in make_chat_rows(200, seed=1) for m in r["messages"]]
    corpus += ["Below is an instruction that describes a task. Write a response that appropriately completes the "
               "request. ### Instruction: ### Input: ### Response: user assistant system"] * 5
    bpe.train_from_iterator(corpus, vocab_size=400, min_frequency=1,
                            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                                 eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                                 pad_token_id=tok.pad_token_id, tie_word_embeddings=True)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_chat_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 32, tied embeddings) with a byte-level BPE, ChatML template and EOS <|im_end|>."""
    return _save_chat_llama(tmp_path_factory.mktemp("models") / "tiny-chat-llama")


# -- the CLI, in-process ---------------------------------------------------------------

@dataclass
class Result:
    code: int | None
    out: str
    err: str


@pytest.fixture
def cli_run(monkeypatch, capsys):
    """Call the console entry point in-process. An exception escaping main() is what a user
    would see as a traceback: it is returned as code None with the traceback as stderr."""

    from tunelab import cli

    def call(*args) -> Result:
        capsys.readouterr()  # drop anything printed before
        monkeypatch.setattr(sys, "argv", ["tunelab", *map(str, args)])
        monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # typer installs its own; restore it afterwards
        code: int | None = 0
        tb = ""
        try:
            cli.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - exactly what must never reach a user
            code, tb = None, traceback.format_exc()
        out, err = capsys.readouterr()
        return Result(code, out, err + tb)

    return call


# -- a loopback Hugging Face Hub (tests/hub_server.py) ---------------------------------------------------------------

@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A Hub on 127.0.0.1 that the real huggingface_hub downloads from, with HF_HOME / HF_HUB_CACHE in tmp_path
    (for this process and its subprocesses; see hub_server.point_client_at). Add repos with hub.commit(...)."""
    from hub_server import HubServer, point_client_at

    with HubServer() as server:
        point_client_at(server.url, tmp_path / "hf-home", monkeypatch)
        yield server


def in_use() -> int:
    """Bytes glibc's malloc has handed out and not had back (where torch's CPU tensors live); glibc only."""
    import ctypes

    class Info(ctypes.Structure):  # glibc's struct mallinfo2
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Info
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd
