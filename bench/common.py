"""What every runner of the benchmark shares, so that the figures of tunelab and its peers are taken the same way:
paths, the chat rendering with prompt-masked labels, the step clock, peak RSS, the held-out loss and the FLOPs
model. Nothing here imports tunelab, transformers or peft at module level: the parent process stays light.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".cache"
# BENCH_SMOLLM2: another directory for the lora-smollm2 scenario's model (bench/gpu_check.py points it at a
# random-init model of SmolLM2's architecture where the imported weights are not carried).
SMOLLM2 = Path(os.environ.get("BENCH_SMOLLM2") or ROOT / "demo_data" / "models" / "smollm2-135m-instruct")
# Packages only the peers use, kept out of tunelab's venv (whose tests check tunelab with and without them):
# bitsandbytes for the Trainer's QLoRA base. The child puts this folder on sys.path for those runs only.
PEER_SITE = Path(os.environ.get("BENCH_PEER_SITE") or CACHE / "peer-site")
PEER_INSTALL = ".venv/bin/pip install --no-deps --target bench/.cache/peer-site bitsandbytes"
RESULT_PREFIX = "BENCH_RESULT "  # the child's last stdout line starts with this, then one JSON object
SEED = 42
HELD_OUT = 32  # fixed held-out examples every runner is scored on after training (a scenario may take fewer)

# Base precision variants (`--precision`), the same for every runner: the dtype the model is loaded in and whether
# the training forward runs under bf16 autocast. "bf16-base" is a frozen base in bf16 under adapters that stay
# float32 (tunelab's model.dtype=bfloat16; peft keeps LoRA weights float32 over a bf16 model too); for full
# fine-tuning it means training the bf16 weights themselves.
PRECISIONS = {
    "fp32": {"base_dtype": "float32", "bf16": False},
    "autocast": {"base_dtype": "float32", "bf16": True},
    "bf16-base": {"base_dtype": "bfloat16", "bf16": False},
}
LOSS_AGREEMENT = 0.01  # a variant's losses count as fp32's when within 1 % of them at every step and held out


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# -- chat data -------------------------------------------------------------------------------------------

def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a single-turn conversation rendered with the tokenizer's chat template; labels are
    -100 outside the assistant reply. The reply is its content plus the end-of-turn marker, without the newline the
    template puts after it: the same tokens tunelab's sft task trains on (a token is trained when its first
    character lies in the reply), written out here independently so that the peers get identical targets."""
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently once the reply is added")
    start, end = len(prompt), len(full.rstrip())
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [t if start <= a < end and b > a else -100 for t, (a, b) in zip(ids, enc["offset_mapping"])]
    return ids, labels


def chat_length(tokenizer, messages: list[dict]) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def length_stats(lengths: list[int]) -> dict:
    return {"examples": len(lengths), "min": min(lengths), "median": statistics.median(lengths), "max": max(lengths),
            "mean": sum(lengths) / len(lengths),
            # what one token attends to on average, weighting every sequence by its tokens (the FLOPs model's T)
            "token_weighted_mean": sum(n * n for n in lengths) / sum(lengths)}


# -- measuring a run --------------------------------------------------------------------------------------

def peak_rss_mb() -> float:
    """The process's resident-set high-water mark (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_cuda_mb() -> float | None:
    """torch's peak CUDA allocation of the process (max_memory_allocated), in MB; None without CUDA in use."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2 ** 20


class StepClock:
    """End-of-step timestamps, tokens and losses of one run, recorded the same way for every runner.

    Throughput is taken from the end of step 1 to the end of the last step, so it covers whole steps 2..N (data,
    forward, backward, optimizer) and leaves out what only the first step pays (model load, tokenisation, warm-up);
    that is reported apart as the time from process start to the end of step 1.
    """

    def __init__(self, spawned_at: float):
        self.spawned_at = spawned_at  # the parent's time.time() just before it started this process
        self.ends: list[float] = []
        self.tokens: list[int] = []
        self.examples: list[int] = []
        self.losses: dict[int, float] = {}
        self.first_step_at: float | None = None

    def reset(self) -> None:
        self.__init__(self.spawned_at)

    def step_end(self, tokens: int, examples: int) -> None:
        self.ends.append(time.perf_counter())
        if self.first_step_at is None:
            self.first_step_at = time.time()
        self.tokens.append(int(tokens))
        self.examples.append(int(examples))

    def loss(self, step: int, value: float) -> None:
        self.losses[int(step)] = float(value)

    def summary(self) -> dict:
        n = len(self.ends)
        span = self.ends[-1] - self.ends[0] if n > 1 else float("nan")
        losses = [self.losses[k] for k in sorted(self.losses)]
        return {
            "steps": n,
            "tokens_per_s": sum(self.tokens[1:]) / span if n > 1 else float("nan"),
            "examples_per_s": sum(self.examples[1:]) / span if n > 1 else float("nan"),
            "steps_after_first_s": span,
            "time_to_first_step_s": self.first_step_at - self.spawned_at if self.first_step_at else float("nan"),
            "train_tokens": sum(self.tokens),
            "tokens_per_step": self.tokens,
            "losses": losses,
            "last_loss": losses[-1] if losses else float("nan"),
            "last5_loss": sum(losses[-5:]) / len(losses[-5:]) if losses else float("nan"),
        }


class CountingCollator:
    """Wraps a peer's data collator and keeps, in order, each batch's non-padding tokens, target tokens and
    examples. Batches are consumed in the order they are collated, so the k-th entry belongs to step k even when
    the data loader fetches a batch ahead (accelerate does)."""

    def __init__(self, collate):
        self.collate = collate
        self.batches: list[dict] = []

    def __call__(self, features):
        batch = self.collate(features)
        mask = batch.get("attention_mask")
        # padding-free batches (TRL) are one flat row with no padding and no attention mask
        tokens = int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        labels = batch["labels"]
        targets = int((labels[:, 1:] != -100).sum()) if labels.dim() == 2 else int(labels.numel())
        self.batches.append({"tokens": tokens, "targets": targets, "examples": len(features)})
        return batch


def hf_clock_callback(clock: StepClock, counter: CountingCollator):
    """A transformers TrainerCallback feeding `clock`: step ends (after the optimizer and scheduler step) and the
    loss the Trainer logs every step (logging_steps=1)."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            batch = counter.batches[state.global_step - 1]
            clock.step_end(batch["tokens"], batch["examples"])

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                clock.loss(state.global_step, logs["loss"])

    return Clock()


# -- the held-out score, one function for every runner ----------------------------------------------------

def heldout_sft(model, tokenizer, rows: list[dict]) -> dict:
    """Mean NLL per assistant token over the held-out conversations, model in eval mode, float32, one example at a
    time (no padding, so no runner's padding or attention-mask handling enters the figure)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            ids, labels = encode_chat(tokenizer, r["messages"])
            device = next(model.parameters()).device
            logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, :-1].float()
            target = torch.tensor(labels[1:], device=device)
            keep = target != -100
            nll += float(F.cross_entropy(logits[keep], target[keep], reduction="sum"))
            count += int(keep.sum())
    return {"heldout_loss": nll / max(count, 1), "heldout_tokens": count}


def heldout_cls(model, tokenizer, rows: list[dict], max_length: int) -> dict:
    """Mean cross-entropy and accuracy over the held-out texts, model in eval mode, one example at a time. Labels
    map through the model's own label2id, so both runners' label orders work."""
    import torch
    import torch.nn.functional as F

    model.eval()
    label2id = {str(k): v for k, v in model.config.label2id.items()}
    loss, correct = 0.0, 0
    with torch.no_grad():
        for r in rows:
            enc = tokenizer(r["text"], truncation=True, max_length=max_length, return_tensors="pt")
            logits = model(**enc).logits[0].float()
            y = label2id[str(r["label"])]
            loss += float(F.cross_entropy(logits[None], torch.tensor([y])))
            correct += int(logits.argmax()) == y
    return {"heldout_loss": loss / len(rows), "heldout_accuracy": correct / len(rows)}


# -- FLOPs -----------------------------------------------------------------------------------------------

LOW_RANK = ("lora", "qlora")  # methods that train low-rank adapters over frozen weights (the FLOPs model's 4N + 6A)


def train_flops_per_token(config: dict, method: str, lora_r: int, context: float) -> dict:
    """Model FLOPs of training on one token (bench/README.md has the derivation).

    A weight matrix costs 2 FLOPs per weight per token forward, 2 more for the gradient of its input and 2 for its
    own gradient. Full fine-tuning pays all three (6N); LoRA keeps the input gradients of the frozen weights (they
    carry the signal down to the adapters below) but not their weight gradients (4N), and 6 per adapter weight.
    Attention scores and their weighted sum add 4*d*T forward per layer and token (T: the token-weighted mean
    sequence length, full T as in the PaLM paper's count), twice that backward: 12*L*d*T. The input embedding is a
    lookup (no FLOPs); the LM head is a matmul over the whole vocabulary for every token. The same figure is used
    for every runner of a scenario, whatever work a runner actually skips (tunelab computes LM-head logits only at
    target positions), so MFU ratios equal throughput ratios.

    QLoRA counts as LoRA: the same matmuls, with the frozen weights 4-bit. Dequantizing them (a table lookup and a
    scale per weight, each time a layer runs forward or passes its input gradient back) is the implementation's
    cost of the smaller base, not model work, so it is not counted: at equal tok/s QLoRA's MFU equals LoRA's, and
    what dequantization costs shows as a lower MFU.
    """
    d, layers = config["hidden_size"], config["num_hidden_layers"]
    ff = config["intermediate_size"]
    if config.get("model_type") == "bert":  # encoder: Q, K, V, O and a two-matrix MLP; the head is per sequence
        shapes = [(d, d)] * 4 + [(d, ff), (ff, d)]
        head = 0
    else:  # Llama-like decoder: grouped K/V, gated MLP, untied or tied LM head (a matmul either way)
        heads = config["num_attention_heads"]
        kv = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or d // heads
        shapes = [(d, heads * head_dim), (d, kv * head_dim), (d, kv * head_dim), (heads * head_dim, d),
                  (d, ff), (d, ff), (ff, d)]
        head = d * config["vocab_size"]
    matmul = layers * sum(a * b for a, b in shapes) + head
    low_rank = method in LOW_RANK
    adapters = layers * sum(lora_r * (a + b) for a, b in shapes) if low_rank else 0
    attention = 12 * layers * d * context
    dense = (4 * matmul + 6 * adapters) if low_rank else 6 * matmul
    return {"flops_per_token": dense + attention, "matmul_params": matmul, "adapter_params": adapters,
            "context": context}


def decoder_params(config: dict) -> int:
    """Parameters of a Llama-style decoder from its config alone (nothing built): embedding, per block q/k/v/o
    (grouped K/V), the gated MLP's three matrices and two RMSNorm weights, the final norm, and an LM head unless
    it is tied to the embedding. Biases where `attention_bias` / `mlp_bias` say so."""
    d, layers, ff, vocab = (config[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"))
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or d // heads
    q, kv = heads * head_dim, (config.get("num_key_value_heads") or heads) * head_dim
    attention = d * q + 2 * d * kv + q * d + (q + 2 * kv + d if config.get("attention_bias") else 0)
    mlp = 3 * d * ff + (2 * ff + d if config.get("mlp_bias") else 0)
    head = 0 if config.get("tie_word_embeddings", False) else vocab * d  # LlamaConfig's default: untied
    return vocab * d + layers * (attention + mlp + 2 * d) + d + head


def median(values: list[float]) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(values) if values else float("nan")
