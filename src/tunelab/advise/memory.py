"""The memory model of `tunelab advise`: what each fine-tuning method needs, part by part.

The model is a sum of parts, each in bytes, for one training micro-batch of `batch` x `seq_len` tokens:

- weights       every parameter and buffer in `dtype`, counted exactly on a `meta`-device copy of the
                architecture (config.json only, no weights read). QLoRA: each quantized linear weight as
                tunelab's torchao NF4 tensor holds it (4 bits per weight + an int8 scale per 64 weights +
                one scale per 256 of those + a 16-entry table); the rest stays in `dtype`. Plus the memory
                each weight is dequantized into for its matmuls, held once at the size of the largest
                (qlora._scratch: the weight in `dtype`, and 1 MB of int32 codes).
- gradients     one per trainable parameter, in the parameter's dtype. Over a bf16 base (`dtype` bfloat16) the
                base weights take 2 bytes each, while a method whose TRAINABLE_DTYPE is "float32" (LoRA & co.)
                keeps its own tensors and the head float32, so their gradients and AdamW state are float32
                too (counted as `methods.prepare` makes them, on the meta model); activations are bf16.
- optimizer     AdamW's exp_avg and exp_avg_sq: two tensors like each trainable parameter (torch keeps the
                state in the parameter's dtype).
- best copy     the training loop keeps a clone of every trainable parameter for restoring the best
                validation checkpoint (training/loop.py), from the first evaluation on.
- activations   what autograd saves in the forward pass, per token and per block, from a per-family
                formula measured with `torch.autograd.graph.saved_tensors_hooks` (see FAMILIES). With
                gradient checkpointing: every block's input plus one block recomputed at a time.
- logits        causal LM: the fused linear + cross-entropy (ops/lm_loss.py) holds one chunk of float32
                logits (64 MiB) at a time and keeps the hidden states' gradient (and the head weight's, when
                it trains) for backward. Classification heads: negligible.
- allocator     memory the allocator holds beyond the live tensors: on CPU glibc keeps freed activation memory
                in its heap and the peak RSS creeps up over the first steps; measured on LoRA and full runs
                at 0.2-0.9 x the transient (activations + logits) bytes after 2 steps and after 30, 0.5 used.
- runtime       the process itself: a Python with torch + transformers + tunelab imported (measured once
                in a subprocess), or on CUDA the CUDA context (a documented constant).

The peak is the largest of three phases: loading (the whole model in `dtype`; QLoRA with torchao quantizes each
linear as it is read, so it holds the quantized weights, one linear in `dtype` and torchao's temporaries for
quantizing it: `quantize_on_load_bytes`), training (above), and evaluation (eval.batch_size rows without
gradients on top of what the allocator kept; a causal LM's logits one chunk at a time). `advise` judges fit on loading + training and suggests an eval.batch_size when evaluation would not
fit. Against real 2-step tunelab runs on CPU (tests/test_advise.py) the totals agree within about +-15 %; sft
is estimated as if every token were a target (the upper bound). CUDA estimates use the same formulas with
constants (context, allocator slack) that have not been calibrated on a GPU.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import torch

from .. import methods, models
from ..config.methods import BY_NAME
from ..errors import TunelabError
from ..methods import qlora
from ..ops import lm_loss

# The rows of advise's table, in the order it prints them (every method of methods.METHODS; a test checks that).
METHOD_ORDER = ("full", "freeze", "lora", "dora", "qlora", "adapter", "prefix", "prompt", "ptuning", "bitfit", "ia3")
# Merging folds the update into the base weights: inference costs what the base model costs.
MERGEABLE = {name for name, m in methods.METHODS.items() if m.MERGEABLE}  # each method declares it
TASKS = ("classification", "token_classification", "qa", "sft", "causal_lm")
EVAL_BATCH_DEFAULT = 64  # config.EvalConfig.batch_size

# Saved activations per token and per transformer block, in float32 bytes = 4 * (a_h*hidden + a_kv*kv_width
# + a_i*intermediate), for full fine-tuning. Measured on tunelab's own forward (the memory a training forward's
# graph holds, from glibc's in-use count; blocks of 2 vs 4 layers) with transformers 5 / torch 2.13 on CPU:
#   llama (h 256, kv 128, I 688): 12,799 B ~ 6h + 2kv + 2I (RMSNorm inputs, q/k/v after RoPE, attention out,
#         o_proj in, gate and up: the norms' outputs and the MLP's SiLU and product are recomputed in the backward,
#         ops/rmsnorm.py and ops/gated.py; without those, 20,367 B = 8h + 2kv + 4I);
#   gpt2  (h 256, I 1024): 30,736 B = 14h + 4I (LayerNorms, c_attn out, dropout masks, gelu_new's pieces);
#   bert  (h 256, I 1024): 18,448 B = 10h + 2I.
# `attention` is stored probabilities per token and block, in units of heads x key length: only when sdpa
# falls back to its math kernel (attention dropout > 0 on CPU) or the model runs eager attention; then
# softmax output, dropout mask and dropped probabilities = 3 (48 B = 3 x 4 heads x 4 B per unit of s measured).
# Each method declares the fraction of full fine-tuning's block activations it saves per family (its
# ACTIVATION_SHARE), measured the same way with tunelab's default config per method (frozen layers keep only what
# the backward to the trainable parameters needs). `bfloat16`: measured saved bytes in bf16 relative to float32
# (norm statistics and dropout masks do not shrink), one factor for every method: on 256-wide models, full
# fine-tuning / LoRA llama 0.57 / 0.58, gpt2 0.60 / 0.62, bert 0.65 / 0.73 (tests/test_advise.py).
# `unfused`: what a block saves without ops/'s recomputation relative to with it (llama 20,367 / 12,799 B): under
# gradient checkpointing the checkpoint's own hooks hold the block being recomputed, and ops.recompute steps aside.
# `eval`: the peak working set of a forward without gradients per token, relative to one block's full
# activations (measured: llama 0.77-0.93, gpt2 ~1.0, bert 0.64 at 32-64 rows x 512 tokens).
FAMILIES = {
    "llama": {"a_h": 6, "a_kv": 2, "a_i": 2, "attention": 3, "bfloat16": 0.56, "eval": 0.85, "unfused": 1.59},
    "gpt2": {"a_h": 14, "a_kv": 0, "a_i": 4, "attention": 3, "bfloat16": 0.61, "eval": 1.0, "unfused": 1.0},
    "bert": {"a_h": 10, "a_kv": 0, "a_i": 2, "attention": 3, "bfloat16": 0.69, "eval": 0.65, "unfused": 1.0},
}
FAMILY_OF = {
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "camembert", "distilbert", "deberta", "deberta-v2",
                     "albert", "mpnet", "ernie", "layoutlm", "modernbert"], "bert"),
    **dict.fromkeys(["gpt2", "gpt_bigcode", "gpt_neo", "gptj", "gpt_neox", "bloom", "falcon", "opt", "phi", "codegen",
                     "biogpt"], "gpt2"),
    **dict.fromkeys(["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo",
                     "olmo2", "smollm3", "stablelm", "granite", "cohere"], "llama"),
}
HEAD_WIDTHS = 3  # per token, in hidden widths: the embedding LayerNorm/dropout (encoders) or final norm + LM-head input
LOGIT_COPIES = 3  # classification-style heads: float32 logit tensors alive at the start of backward (log-softmax + 2 grads)
ALLOCATOR_SLACK = {"cpu": 0.5, "cuda": 0.10}  # of the transient bytes; cpu measured (glibc), cuda assumed
CUDA_CONTEXT = 500 * 2**20  # CUDA context + kernels, outside torch's allocator (typical; not measured here)
RUNTIME_FALLBACK = 360 * 2**20  # RSS of python + torch + transformers + tunelab, if it cannot be measured
AUTO_CLASSES = {"classification": "AutoModelForSequenceClassification",
                "token_classification": "AutoModelForTokenClassification",
                "qa": "AutoModelForQuestionAnswering", "sft": "AutoModelForCausalLM", "causal_lm": "AutoModelForCausalLM"}


@functools.cache
def runtime_overhead() -> int:
    """Peak RSS of a fresh Python that imports what a tunelab run imports (measured once per process, ~4 s)."""
    code = ("import tunelab.pipeline, transformers\n"
            f"[getattr(transformers, name) for name in {sorted(set(AUTO_CLASSES.values()))!r}]\n"
            "from tunelab.runs import peak_rss\n"
            "print(peak_rss())")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
        return int(out.stdout.split()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return RUNTIME_FALLBACK


# -- the model, counted on the meta device -----------------------------------------------------------

def model_config(model_dir: str | Path):
    from transformers import AutoConfig

    path = models.check_model_dir(model_dir, key="model_dir")
    try:
        cfg = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise TunelabError(f"'{path}' has a config.json that transformers cannot read ({type(e).__name__}: "
                           f"{str(e).splitlines()[0]}); the model directory looks damaged or needs custom code.") from None
    return path, cfg


def model_dims(cfg) -> dict:
    """hidden, layers, heads, kv width, intermediate and vocabulary sizes, whatever the config calls them."""
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    get = lambda *names, default=None: next((getattr(text, n) for n in names if getattr(text, n, None) is not None), default)
    hidden = get("hidden_size", "n_embd", "d_model", "dim")
    layers = get("num_hidden_layers", "n_layer", "num_layers", "n_layers")
    heads = get("num_attention_heads", "n_head", "num_heads", "n_heads")
    if not (hidden and layers and heads):
        raise TunelabError(f"Cannot read the hidden size, layer count and head count from the config of model type "
                           f"'{text.model_type}', so its memory cannot be estimated.")
    head_dim = get("head_dim", default=hidden // heads)
    return {"hidden": hidden, "layers": layers, "heads": heads,
            "kv": get("num_key_value_heads", default=heads) * head_dim,
            "intermediate": get("intermediate_size", "n_inner", "ffn_dim", "hidden_dim", default=4 * hidden),
            "vocab": get("vocab_size", default=0),
            "attention_dropout": float(get("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob",
                                           default=0.0) or 0.0)}


def model_family(cfg, task: str) -> tuple[str, bool]:
    """(family, guessed?): the calibrated family whose block layout is nearest."""
    model_type = getattr(cfg, "model_type", "")
    if model_type in FAMILY_OF:
        return FAMILY_OF[model_type], False
    if getattr(cfg, "num_key_value_heads", None) is not None or "silu" in str(getattr(cfg, "hidden_act", "")):
        return "llama", True  # gated MLP + RMSNorm decoders
    return ("gpt2" if task in ("sft", "causal_lm") else "bert"), True


def method_config(method: str, lora_r: int, num_virtual_tokens: int):
    """The method's default config, with `lora_r` and `num_virtual_tokens` where it has those keys."""
    if method not in BY_NAME:
        raise TunelabError(f"Unknown method '{method}'; choose one of {', '.join(METHOD_ORDER)}.")
    cls = BY_NAME[method]
    kw = {k: v for k, v in (("r", lora_r), ("num_virtual_tokens", num_virtual_tokens)) if k in cls.model_fields}
    return cls(name=method, **kw)


def nf4_bytes(numel: int, dtype: torch.dtype) -> int:
    """Bytes of a torchao NF4Tensor (qlora.BLOCK_SIZE 64, its scales in blocks of qlora.scaler_block_size(numel),
    up to 256): packed 4-bit codes, int8 block scales, one `dtype` factor per block of scales, the scales' mean and
    the 16-value code table."""
    size = torch.empty((), dtype=dtype).element_size()
    return numel // 2 + numel // 64 + (numel // 64 // qlora.scaler_block_size(numel) + 1 + 16) * size


# torchao's to_nf4 compares CHUNK elements at a time with the 16 NF4 values (its CHUNK_SIZE, 0.10 - 0.18)
TORCHAO_CHUNK = 1024**2


def quantize_on_load_bytes(numel: int, dtype: torch.dtype) -> int:
    """What loading holds beyond the weights already stored when it quantizes a linear of `numel` weights as it
    reads it (methods.loading): the weight read in `dtype`, torchao's scaled copy of it, its 1-byte codes before
    packing, and one chunk of distances to the 16 NF4 values (the difference and its absolute value, alive
    together). On the 1B bench model (2048 x 8192 float32 linears) loading peaked ~250 MB above the loaded model;
    this is 272 MiB. A small model's linears fit in one chunk: 34x their own bytes."""
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * numel * size + numel + min(numel, TORCHAO_CHUNK) * 2 * 16 * size


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@functools.lru_cache(maxsize=64)  # advise asks twice per method (with and without checkpointing)
def count(model_dir: str | Path, task: str, method: str, dtype: str = "float32", lora_r: int = 16,
          num_virtual_tokens: int = 20, num_labels: int = 2, device: str = "cpu") -> dict:
    """Parameters and weight bytes with `method` applied as tunelab applies it, on a meta-device model.

    Returns {"applicable", "reason", "total_params", "trainable_params", "weight_bytes", "dequant_bytes",
    "load_bytes", "trainable_bytes", "largest_trainable_bytes", "attention_impl"}."""
    import transformers


    path, cfg = model_config(model_dir)
    if task in ("classification", "token_classification"):
        cfg.num_labels = num_labels
    auto = getattr(transformers, AUTO_CLASSES[task])
    try:
        with torch.device("meta"):
            model = auto.from_config(cfg, dtype=models.DTYPES[dtype])
    except (ValueError, KeyError, TypeError) as e:
        raise TunelabError(f"'{path}' cannot be built as {auto.__name__} for task {task}: {str(e).splitlines()[0]}") from None
    head = [] if task in ("sft", "causal_lm") else models.head_modules(model)
    # Loading materialises every weight in dtype before any method runs (QLoRA with torchao: see below).
    load_bytes = sum(_nbytes(p) for p in model.parameters()) + sum(_nbytes(b) for b in model.buffers())
    head_copy = sum(_nbytes(p) for h in head for p in model.get_submodule(h).parameters())  # methods.named keeps one
    cfg_method, module = method_config(method, lora_r, num_virtual_tokens), methods.get(method)
    try:
        if module.QUANTIZES_BASE:  # 4-bit tensors cannot be built on meta: what apply would quantize, counted below
            model, quantized_paths = module.dry_apply(model, cfg_method, head, device)
        else:
            model, quantized_paths = methods.prepare(model, cfg_method, head), []
    except TunelabError as e:  # e.g. BitFit on a bias-free Llama: the method does not apply to this model
        return {"applicable": False, "reason": str(e).split(". ")[0] + "."}
    quantized = {id(model.get_submodule(p).weight) for p in quantized_paths}
    largest_quantized = max((model.get_submodule(p).weight.numel() for p in quantized_paths), default=0)
    seen, weight_bytes, trainable, total, trainable_bytes, largest = set(), head_copy, 0, 0, 0, 0
    for p in model.parameters():
        if id(p) in seen:  # tied embeddings are one tensor
            continue
        seen.add(id(p))
        total += p.numel()
        weight_bytes += nf4_bytes(p.numel(), p.dtype) if id(p) in quantized else _nbytes(p)
        if p.requires_grad:
            trainable += p.numel()
            trainable_bytes += _nbytes(p)
            largest = max(largest, _nbytes(p))
    weight_bytes += sum(_nbytes(b) for b in model.buffers())
    if trainable == 0:
        return {"applicable": False, "reason": f"{method} leaves nothing to train for task {task} on this model "
                                               f"(no separate task head)."}
    # torchao quantizes as the model is read (methods.loading, qlora.load_plan): the full-precision base is never
    # whole in memory. bitsandbytes (CUDA) loads it whole and quantizes as it moves to the GPU.
    dequant_bytes = 0
    if largest_quantized and (qlora.auto_backend(device) if cfg_method.backend == "auto" else cfg_method.backend) \
            == "torchao":
        load_bytes = weight_bytes + quantize_on_load_bytes(largest_quantized, models.DTYPES[dtype])
        # the largest weight dequantized in dtype, and int32 codes (qlora._scratch), held from the first forward
        dequant_bytes = (largest_quantized * torch.empty((), dtype=models.DTYPES[dtype]).element_size()
                         + 4 * min(largest_quantized // 2, qlora.SCRATCH_CODES))
    return {"applicable": True, "reason": None, "total_params": total, "trainable_params": trainable,
            "weight_bytes": weight_bytes, "load_bytes": max(load_bytes, weight_bytes),
            "dequant_bytes": dequant_bytes,
            "trainable_bytes": trainable_bytes, "largest_trainable_bytes": largest,
            "attention_impl": getattr(model.config, "_attn_implementation", None) or "sdpa"}


# -- activations -------------------------------------------------------------------------------------

def activation_bytes(dims: dict, family: str, method: str, task: str, seq_len: int, batch: int, dtype: str,
                     device: str, attention_impl: str, num_virtual_tokens: int, gradient_checkpointing: bool) -> int:
    """Bytes autograd saves for one micro-batch (see FAMILIES); logits are counted apart (logit_bytes)."""
    fam, module = FAMILIES[family], methods.get(method)
    share = module.ACTIVATION_SHARE[family]
    scale = 1.0 if dtype == "float32" else fam["bfloat16"]
    virtual = num_virtual_tokens if module.VIRTUAL_TOKENS else 0
    # Prompt tuning / P-tuning put the virtual tokens into the sequence; prefix tuning only into the keys.
    tokens = batch * (seq_len + (virtual if module.VIRTUAL_TOKENS == "inputs" else 0))
    keys = seq_len + virtual
    block = 4 * (fam["a_h"] * dims["hidden"] + fam["a_kv"] * dims["kv"] + fam["a_i"] * dims["intermediate"])
    block *= share
    math_attention = attention_impl == "eager" or (device == "cpu" and dims["attention_dropout"] > 0)
    if math_attention and share > 0:
        block += 4 * fam["attention"] * dims["heads"] * keys
    block *= scale
    head = 4 * HEAD_WIDTHS * dims["hidden"] * scale
    if gradient_checkpointing and share > 0:  # (frozen blocks keep nothing to checkpoint)
        # Each block keeps only its input; backward recomputes one block at a time.
        element = torch.empty((), dtype=models.DTYPES[dtype]).element_size()
        return int(tokens * (dims["layers"] * dims["hidden"] * element + head) + tokens * block * fam["unfused"])
    return int(tokens * (dims["layers"] * block + head))


def loss_saved_bytes(dims: dict, task: str, seq_len: int, batch: int, num_labels: int, head_trains: bool) -> int:
    """What the loss keeps for backward. A causal LM's fused linear + cross-entropy (ops/lm_loss.py) keeps the
    gradient of every target's hidden state (float32, sft: all tokens assumed targets) and, when the head trains,
    of the head weight; a classification-style head keeps its float32 log-softmax output."""
    if task in ("sft", "causal_lm"):
        tokens = batch * (seq_len - 1)
        return 4 * tokens * dims["hidden"] + (4 * dims["vocab"] * dims["hidden"] if head_trains else 0)
    width = {"classification": num_labels, "token_classification": num_labels, "qa": 2}[task]
    return 4 * width * (batch if task == "classification" else batch * seq_len)


def logit_bytes(dims: dict, task: str, seq_len: int, batch: int, dtype: str, num_labels: int,
                head_trains: bool = False) -> int:
    """The loss's buffers at their largest. A causal LM's logits exist one chunk of positions at a time (lm_loss:
    float32 logits turned into their gradient in place, plus the chunk's bf16 logits when the model is bf16)."""
    if task in ("sft", "causal_lm"):
        rows = min(batch * (seq_len - 1), lm_loss.chunk_rows(dims["vocab"]))
        chunk = 4 * rows * dims["vocab"] + (2 * rows * dims["vocab"] if dtype != "float32" else 0)
        return loss_saved_bytes(dims, task, seq_len, batch, num_labels, head_trains) + chunk
    return LOGIT_COPIES * loss_saved_bytes(dims, task, seq_len, batch, num_labels, head_trains)


def eval_bytes(dims: dict, family: str, task: str, seq_len: int, eval_batch: int, dtype: str, num_labels: int) -> int:
    """Evaluation without gradients: one block's working set, plus a causal LM's logits and log-softmax for
    every token of the eval batch (evaluate.run calls the task's forward on whole batches)."""
    fam = FAMILIES[family]
    block = 4 * (fam["a_h"] * dims["hidden"] + fam["a_kv"] * dims["kv"] + fam["a_i"] * dims["intermediate"])
    working = eval_batch * seq_len * block * fam["eval"] * (1.0 if dtype == "float32" else fam["bfloat16"])
    if task in ("sft", "causal_lm"):  # one chunk of logits and its log-softmax (lm_loss.token_nll)
        rows = min(eval_batch * (seq_len - 1), lm_loss.chunk_rows(dims["vocab"]))
        logits = 2 * 4 * dims["vocab"] * rows + (2 * dims["vocab"] * rows if dtype != "float32" else 0)
    else:
        logits = logit_bytes(dims, task, seq_len, eval_batch, dtype, num_labels)
    return int(working + logits)


# -- the estimate --------------------------------------------------------------------------------------

def estimate(model_dir, task: str, seq_len: int, batch: int, method: str | None = None, dtype: str = "float32",
             gradient_checkpointing: bool = False, lora_r: int = 16, num_virtual_tokens: int = 20, num_labels: int = 2,
             eval_batch_size: int | None = None, device: str | None = None) -> dict:
    """Training memory of `method` (None: every method, as {method: estimate}) in bytes, part by part.

    `eval_batch_size` defaults to tunelab's eval.batch_size (64); `device` to cuda when available, else cpu."""
    if task not in TASKS:
        raise TunelabError(f"Unknown task '{task}'; choose one of {', '.join(TASKS)}.")
    if dtype not in models.DTYPES:
        raise TunelabError(f"dtype '{dtype}' is not one tunelab trains in; use {' or '.join(models.DTYPES)}.")
    if seq_len < 2 or batch < 1:
        raise TunelabError(f"seq_len must be >= 2 and batch >= 1 (got seq_len={seq_len}, batch={batch}).")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if method is None:
        return {m: estimate(model_dir, task, seq_len, batch, m, dtype, gradient_checkpointing, lora_r,
                            num_virtual_tokens, num_labels, eval_batch_size, device) for m in METHOD_ORDER}
    path, cfg = model_config(model_dir)
    dims = model_dims(cfg)
    family, guessed = model_family(cfg, task)
    out = {"model": str(path), "task": task, "method": method, "dtype": dtype, "device": device, "seq_len": seq_len,
           "batch": batch, "gradient_checkpointing": gradient_checkpointing, "family": family,
           "family_guessed": guessed, "mergeable": method in MERGEABLE}
    counted = count(path, task, method, dtype, lora_r, num_virtual_tokens, num_labels, device)
    if not counted["applicable"]:
        return {**out, "applicable": False, "reason": counted["reason"], "total": None}

    trainable = counted["trainable_bytes"]
    act = {gc: activation_bytes(dims, family, method, task, seq_len, batch, dtype, device, counted["attention_impl"],
                                num_virtual_tokens, gc) for gc in (False, True)}
    parts = {
        "weights": counted["weight_bytes"] + counted["dequant_bytes"],  # QLoRA: + what its matmuls dequantize into
        "gradients": trainable,
        "optimizer": 2 * trainable,
        "best_copy": trainable,
        "activations": act[gradient_checkpointing],
        # A method that saves the whole model trains the model's own head (an LM's output layer) too; the others
        # train only the head modules they are given, none for an LM.
        "logits": logit_bytes(dims, task, seq_len, batch, dtype, num_labels,
                              head_trains=methods.get(method).ARTIFACT == "model"),
    }
    # AdamW's step runs after backward has freed the activations; its temporaries are one parameter's worth at a
    # time on CPU, all parameters at once with the foreach kernels torch uses on CUDA.
    step_temp = 2 * (trainable if device == "cuda" else counted["largest_trainable_bytes"])
    transient = max(parts["activations"] + parts["logits"], step_temp)
    parts["allocator"] = int(ALLOCATOR_SLACK[device] * transient)
    parts["runtime"] = CUDA_CONTEXT if device == "cuda" else runtime_overhead()
    eval_batch = eval_batch_size or EVAL_BATCH_DEFAULT
    steady = parts["weights"] + parts["optimizer"] + parts["best_copy"]
    phases = {
        "load": counted["load_bytes"] + parts["runtime"],
        "train": steady + parts["gradients"] + transient + parts["allocator"] + parts["runtime"],
        # After training the allocator still holds its slack (glibc does not hand the fragmented heap back), and
        # evaluation's tensors come on top of it.
        "eval": steady + parts["allocator"] + eval_bytes(dims, family, task, seq_len, eval_batch, dtype, num_labels)
                + parts["runtime"],
    }
    return {**out, "applicable": True, "reason": None,
            "total_params": counted["total_params"], "trainable_params": counted["trainable_params"],
            "bytes": parts, "activations_without_checkpointing": act[False], "activations_with_checkpointing": act[True],
            "eval_batch_size": eval_batch, "phases": phases, "peak_phase": max(phases, key=phases.get),
            # What the training itself needs (loading + the steps); the evaluation is tuned apart (eval.batch_size).
            "train_peak": max(phases["load"], phases["train"]),
            "total": max(phases.values())}


def eval_batch_that_fits(est: dict, memory: int) -> int:
    """The largest eval.batch_size whose evaluation phase fits `memory` (0: none does)."""
    b = est["bytes"]
    base = b["weights"] + b["optimizer"] + b["best_copy"] + b["allocator"] + b["runtime"]
    per_row = (est["phases"]["eval"] - base) / est["eval_batch_size"]
    return max(0, int((memory - base) // per_row)) if per_row > 0 else est["eval_batch_size"]
