"""`tunelab advise`: the memory estimate against the measured peak of real tunelab runs, and the advice.

The measured side: each run is `tunelab.train` in a fresh Python (so its peak RSS is that run's alone), on a
model dir built here from a seeded config, for 2 optimizer steps (the second has AdamW's state) and one
evaluation. Models are sized so that activations are a large share of the peak: an estimate without them
misses by more than the 30 % allowed (test_the_check_would_catch_missing_activations).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import in_use, write_jsonl

from tunelab import advise
from tunelab.errors import TunelabError
from tunelab.training import heap

TOLERANCE = 0.30
SEQ, BATCH = 320, 8  # the measured runs' micro-batch
WORDS = [f"w{i}" for i in range(100)]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]


# -- model dirs and data ----------------------------------------------------------------------

def _word_tokenizer():
    """One token per word, so a text of n words is exactly n tokens (the runs' batches are full length)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIALS + WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<unk>")


def _save_decoder(path: Path) -> Path:
    """A Llama-like decoder: 8 blocks of hidden 256 (GQA 4/2 heads, MLP 768, a multiple of NF4's 16384-weight
    blocks so QLoRA quantizes every linear), vocabulary 2000, untied LM head."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _word_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=2000, hidden_size=256, num_hidden_layers=8, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=768, max_position_embeddings=1024,
                                 eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                                 pad_token_id=tok.pad_token_id, tie_word_embeddings=False)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _save_encoder(path: Path) -> Path:
    """A BERT-like encoder body: 4 blocks of hidden 256, MLP 1024, 4 heads, vocabulary 4000 (dropout on, as shipped)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)})
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=4000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=1024, max_position_embeddings=1024)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _texts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("advise")
    out = {"decoder": _save_decoder(root / "decoder"), "encoder": _save_encoder(root / "encoder")}
    # causal_lm appends EOS: SEQ - 1 words make windows of exactly SEQ tokens. Classification texts are longer
    # than SEQ and cut to it. 16 training rows = 2 steps of 8; 8 validation rows = one eval batch.
    for name, words, labelled in (("lm", SEQ - 1, False), ("cls", SEQ + 50, True)):
        texts = _texts(24, words, seed=len(name))
        rows = [{"text": t, **({"label": "pos" if i % 2 else "neg"} if labelled else {})} for i, t in enumerate(texts)]
        out[f"{name}_train"] = write_jsonl(root / f"{name}_train.jsonl", rows[:16])
        out[f"{name}_val"] = write_jsonl(root / f"{name}_val.jsonl", rows[16:])
    return out


# -- measured peaks ------------------------------------------------------------------------------

# (name, model, task, method, gradient checkpointing)
CASES = [
    ("decoder full", "decoder", "causal_lm", "full", False),
    ("decoder lora", "decoder", "causal_lm", "lora", False),
    ("decoder qlora", "decoder", "causal_lm", "qlora", False),
    ("decoder lora+ckpt", "decoder", "causal_lm", "lora", True),
    ("encoder full", "encoder", "classification", "full", False),
]
# VmHWM rather than ru_maxrss: a child's ru_maxrss starts at the parent's RSS (this pytest process holds
# torch and the models built here), which would hide a peak smaller than that.
RUN = """
import sys, tunelab
from tunelab.runs import peak_rss
tunelab.train(None, sys.argv[1:])
print("PEAK", peak_rss())
"""


def _measure(case: tuple, dirs: dict, out: Path) -> int:
    """Peak RSS in bytes of a real 2-step tunelab run in a fresh interpreter (so the peak is that run's alone)."""
    _, model, task, method, ckpt = case
    data = "lm" if task == "causal_lm" else "cls"
    overrides = [f"model.path={dirs[model]}", "model.device=cpu", f"task.type={task}", f"method.name={method}",
                 f"data.train={dirs[data + '_train']}", f"data.validation={dirs[data + '_val']}",
                 f"data.max_length={SEQ}", f"train.batch_size={BATCH}", f"eval.batch_size={BATCH}",
                 "train.max_steps=2", f"train.gradient_checkpointing={str(ckpt).lower()}", f"output_dir={out}",
                 "eval.base=false", "eval.linear_probe=false", "eval.forgetting=none",
                 # classification with eval.samples=0 crashes (evaluate.outputs on no rows), so one sample
                 f"eval.samples={0 if task == 'causal_lm' else 1}"]
    if method in ("lora", "qlora"):
        overrides.append("method.r=16")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    p = subprocess.run([sys.executable, "-c", RUN, *overrides], capture_output=True, text=True, env=env, timeout=300,
                       check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    return int(p.stdout.split("PEAK")[-1])


@pytest.fixture(scope="module")
def table(dirs, tmp_path_factory) -> dict[str, tuple[dict, int]]:
    """{case: (estimate, measured peak bytes)} for every case; two processes at a time (this machine has 2 cores)."""
    root = tmp_path_factory.mktemp("runs")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        overhead = pool.submit(advise.runtime_overhead)  # the estimate's runtime part, measured once, first
        runs = {c[0]: pool.submit(_measure, c, dirs, root / c[0].replace(" ", "_")) for c in CASES}
        overhead.result()
        measured = {name: f.result() for name, f in runs.items()}
    result = {}
    for name, model, task, method, ckpt in CASES:
        est = advise.estimate(dirs[model], task, SEQ, BATCH, method, gradient_checkpointing=ckpt,
                              lora_r=16, eval_batch_size=BATCH, device="cpu")
        result[name] = (est, measured[name])
    mib = lambda b: f"{b / 2**20:7.0f}"
    print(f"\nestimate vs measured peak RSS (MiB), {len(CASES)} runs in {time.perf_counter() - t0:.0f} s:")
    print(f"{'case':18} {'estimate':>8} {'measured':>8} {'error':>7}   weights activ. logits runtime")
    for name, (est, peak) in result.items():
        b = est["bytes"]
        print(f"{name:18} {mib(est['total']):>8} {mib(peak):>8} {est['total'] / peak - 1:+7.1%}   "
              f"{mib(b['weights'])} {mib(b['activations'])} {mib(b['logits'])} {mib(b['runtime'])}")
    return result


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_estimate_is_within_30_percent_of_the_measured_peak(table, case):
    est, peak = table[case]
    assert abs(est["total"] / peak - 1) <= TOLERANCE, (case, est["total"], peak, est["bytes"])


def test_the_check_would_catch_missing_activations(table):
    """Without activations (and the allocator slack on them) the no-checkpointing estimates miss by > 30 %:
    the comparison above tests the activation model, not just the runtime overhead."""
    for name, (est, peak) in table.items():
        if est["gradient_checkpointing"]:
            continue
        b = est["bytes"]
        without = est["total"] - b["activations"] * (1 + advise.ALLOCATOR_SLACK["cpu"])
        assert without / peak - 1 < -TOLERANCE, (name, without, peak)


def test_checkpointing_estimate_is_lower_and_still_matches(table):
    plain, ckpt = table["decoder lora"], table["decoder lora+ckpt"]
    assert ckpt[0]["bytes"]["activations"] < plain[0]["bytes"]["activations"] / 2
    assert ckpt[1] < plain[1]  # the real run used less too
    # what checkpointing saves, estimated against measured, within a factor of 2 (2026-12-07: 239 MiB estimated,
    # 161-233 measured: the difference of two peak RSS readings, each a few tens of MiB noisy). The forward keeps
    # less since ops/ recompute the norms' outputs and the MLP's product, so checkpointing saves less than it did,
    # and which estimate lies nearer the checkpointed run is no longer a test.
    estimated, measured = plain[0]["total"] - ckpt[0]["total"], plain[1] - ckpt[1]
    assert 0.5 < estimated / measured < 2.0, (estimated, measured)


# -- exact parts of the estimate -------------------------------------------------------------------

@pytest.mark.parametrize("method", advise.METHOD_ORDER)
def test_parameters_are_counted_exactly_as_tunelab_applies_the_method(tiny_bert, method):
    """The meta-device count against the method applied to the real model, head and all."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from tunelab import methods, models

    hf_logging.set_verbosity_error()  # the new head's "MISSING" load report is expected (models.load does the same)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    model = methods.prepare(model, advise._method_config(method, 4, 5), models.head_modules(model))
    trainable, total = models.count_params(model)
    est = advise.estimate(tiny_bert, "classification", 32, 2, method, lora_r=4, num_virtual_tokens=5,
                          eval_batch_size=2, device="cpu")
    assert (est["trainable_params"], est["total_params"]) == (trainable, total)
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert est["bytes"]["gradients"] == grads and est["bytes"]["optimizer"] == 2 * grads
    if method != "qlora":  # (qlora stores tiny_bert's body linears in 4 bits: fewer bytes)
        assert est["bytes"]["weights"] >= weights
    bf16 = advise.estimate(tiny_bert, "classification", 32, 2, method, dtype="bfloat16", lora_r=4,
                           num_virtual_tokens=5, eval_batch_size=2, device="cpu")
    # a bf16 base halves what is not 4-bit already
    assert bf16["bytes"]["weights"] < (0.8 if method == "qlora" else 0.6) * est["bytes"]["weights"]


def test_without_a_method_every_method_is_estimated(tiny_bert):
    every = advise.estimate(tiny_bert, "classification", 32, 2, eval_batch_size=2, device="cpu")
    assert tuple(every) == advise.METHOD_ORDER and all(e["applicable"] for e in every.values())
    assert every["full"]["total"] > every["lora"]["total"]


def test_qlora_weight_bytes_match_the_quantized_model(dirs):
    """The NF4 formula against tunelab's own memory report of a really quantized model."""
    from transformers import AutoModelForCausalLM

    from tunelab import config, methods
    from tunelab.methods import qlora

    model = AutoModelForCausalLM.from_pretrained(dirs["decoder"])
    model = methods.prepare(model, config.QLoraConfig(name="qlora", r=16), [])
    report = qlora.memory_report(model)
    assert not report["unquantized_layers"]
    nf4 = {id(m.weight) for m in model.modules() if isinstance(m, qlora.NF4Linear)}
    plain = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in nf4)
    real = report["quantized_bytes"] + plain + sum(b.numel() * b.element_size() for b in model.buffers())
    est = advise.count(dirs["decoder"], "causal_lm", "qlora", lora_r=16)
    assert est["weight_bytes"] == pytest.approx(real, rel=0.01)
    # quantized as it loads: the weights as stored, one linear in float32 and torchao's temporaries for it; after,
    # the largest weight dequantized for the matmuls (and its codes), kept for reuse
    largest = max(m.in_features * m.out_features for m in model.modules() if isinstance(m, qlora.NF4Linear))
    assert largest == 768 * 256
    assert est["load_bytes"] == est["weight_bytes"] + 2 * 4 * largest + largest + largest * 2 * 16 * 4
    assert est["dequant_bytes"] == 4 * largest + 4 * largest // 2


# -- parse_memory and errors ----------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("24GB", 24 * 10**9), ("24GiB", 24 * 2**30), ("512MB", 512 * 10**6), ("8G", 8 * 2**30), ("8g", 8 * 2**30),
    ("1073741824", 2**30), (" 1.5 GiB ", int(1.5 * 2**30)), ("100kb", 100_000), ("2TiB", 2 * 2**40), (4096, 4096),
])
def test_parse_memory(text, expected):
    assert advise.parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "24 GBs", "-1GB", "0", "GB", "1.2.3GB", "24XB"])
def test_parse_memory_rejects_bad_sizes_with_a_clear_message(text):
    with pytest.raises(TunelabError, match=r"Memory size .* is not understood\. Write a positive number .*24GB"):
        advise.parse_memory(text)


def test_missing_or_broken_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(TunelabError, match="does not exist"):
        advise.estimate(tmp_path / "nope", "classification", 128, 8, "lora")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TunelabError, match="not valid JSON"):
        advise.advise(broken, "classification", 128, 8, memory_bytes="1GB")


def test_unknown_task_and_method_are_clear_errors(tiny_bert):
    with pytest.raises(TunelabError, match="Unknown task 'ner'.*classification"):
        advise.estimate(tiny_bert, "ner", 128, 8, "lora")
    with pytest.raises(TunelabError, match="Unknown method 'loar'.*lora"):
        advise.estimate(tiny_bert, "classification", 128, 8, "loar")


# -- the advice ------------------------------------------------------------------------------------

def test_tight_memory_recommends_lora_and_marks_full_as_not_fitting(tiny_bert):
    kw = {"eval_batch_size": 8, "device": "cpu"}
    # Above LoRA with checkpointing, below full fine-tuning with it: only the light methods fit.
    lora_ckpt = advise.estimate(tiny_bert, "classification", 64, 8, "lora", gradient_checkpointing=True, **kw)
    full_ckpt = advise.estimate(tiny_bert, "classification", 64, 8, "full", gradient_checkpointing=True, **kw)
    budget = (lora_ckpt["train_peak"] + full_ckpt["train_peak"]) // 2
    result = advise.advise(tiny_bert, "classification", 64, 8, memory_bytes=budget, **kw)
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["full"]["fits"] is None
    assert rows["lora"]["fits"] is not None
    recommended = [r["method"] for r in result["recommendations"]]
    assert recommended[0] in ("lora", "qlora") and "full" not in recommended
    assert all(r["reason"] for r in result["recommendations"])
    table = {line.split()[0]: line for line in advise.format_advice(result).splitlines() if line[:1].isalpha()}
    assert table["full"].endswith(" no") and not table["lora"].endswith(" no")


def test_qlora_when_even_lora_does_not_fit(dirs):
    """On the decoder (every linear quantizable) QLoRA's 4-bit base saves what LoRA lacks."""
    kw = {"eval_batch_size": 8, "device": "cpu", "gradient_checkpointing": True}
    lora, qlora = (advise.estimate(dirs["decoder"], "causal_lm", SEQ, BATCH, m, **kw) for m in ("lora", "qlora"))
    budget = (lora["train_peak"] + qlora["train_peak"]) // 2
    result = advise.advise(dirs["decoder"], "causal_lm", SEQ, BATCH, memory_bytes=budget, eval_batch_size=8,
                           device="cpu")
    first = result["recommendations"][0]
    assert first["method"] == "qlora" and first["gradient_checkpointing"] and "even LoRA does not fit" in first["reason"]


def test_qlora_loading_in_full_precision_is_noted(dirs, monkeypatch):
    """With bitsandbytes (CUDA) tunelab quantizes after loading the float32 model: a budget below that is not enough,
    and the advice says why. (torchao quantizes as it loads: test_qlora_weight_bytes_match_the_quantized_model.)"""
    from tunelab.methods import qlora as qlora_method

    kw = {"eval_batch_size": 1, "device": "cpu"}
    monkeypatch.setattr(qlora_method, "auto_backend", lambda device_type: "bitsandbytes")
    advise.count.cache_clear()
    try:
        qlora = advise.estimate(dirs["decoder"], "causal_lm", 8, 1, "qlora", **kw)
        assert qlora["phases"]["load"] > qlora["phases"]["train"]
        budget = (qlora["phases"]["load"] + qlora["phases"]["train"]) // 2
        result = advise.advise(dirs["decoder"], "causal_lm", 8, 1, memory_bytes=budget, **kw)
    finally:
        advise.count.cache_clear()  # counted with bitsandbytes: not for the other tests
    assert next(r for r in result["rows"] if r["method"] == "qlora")["fits"] is None
    assert any("loads the base in float32 before quantizing" in n for n in result["notes"])


def test_plenty_of_memory_and_one_task_offers_full_fine_tuning(tiny_bert):
    result = advise.advise(tiny_bert, "classification", 64, 8, memory_bytes="64GiB", eval_batch_size=8, device="cpu")
    assert "full" in [r["method"] for r in result["recommendations"]]


def test_many_tasks_recommend_an_adapter_per_task(tiny_bert):
    result = advise.advise(tiny_bert, "classification", 64, 8, memory_bytes="64GiB", tasks=3, eval_batch_size=8,
                           device="cpu")
    first = result["recommendations"][0]
    assert first["method"] in ("lora", "adapter") and "per task" in first["reason"] and "3 tasks" in first["reason"]
    assert "full" not in [r["method"] for r in result["recommendations"]]
    assert "adapter per task" in advise.format_advice(result)


def test_latency_critical_recommends_only_mergeable_methods(tiny_bert):
    for tasks in (1, 3):
        result = advise.advise(tiny_bert, "classification", 64, 8, memory_bytes="64GiB", tasks=tasks,
                               latency_critical=True, eval_batch_size=8, device="cpu")
        recommended = {r["method"] for r in result["recommendations"]}
        assert recommended and not recommended & {"adapter", "prefix", "prompt", "ptuning"}
        assert recommended <= advise.MERGEABLE


def test_a_method_that_fits_only_with_checkpointing_says_so(tiny_bert):
    kw = {"eval_batch_size": 8, "device": "cpu"}
    plain = advise.estimate(tiny_bert, "classification", 64, 8, "lora", **kw)
    ckpt = advise.estimate(tiny_bert, "classification", 64, 8, "lora", gradient_checkpointing=True, **kw)
    full_ckpt = advise.estimate(tiny_bert, "classification", 64, 8, "full", gradient_checkpointing=True, **kw)
    budget = min(plain["train_peak"], full_ckpt["train_peak"]) - 1
    assert ckpt["train_peak"] <= budget
    result = advise.advise(tiny_bert, "classification", 64, 8, memory_bytes=budget, **kw)
    lora = next(r for r in result["recommendations"] if r["method"] == "lora")
    assert lora["gradient_checkpointing"] and "gradient_checkpointing=true" in lora["reason"]


def test_methods_that_do_not_apply_are_marked_with_the_reason(tiny_chat_llama):
    result = advise.advise(tiny_chat_llama, "sft", 32, 2, memory_bytes="64GiB", eval_batch_size=2, device="cpu")
    bitfit = next(r for r in result["rows"] if r["method"] == "bitfit")
    assert not bitfit["applicable"] and "bias" in bitfit["reason"]
    assert "bitfit    n/a" in advise.format_advice(result)


def test_nothing_fits_says_what_to_change(tiny_chat_llama):
    result = advise.advise(tiny_chat_llama, "sft", 32, 2, memory_bytes="1MB", eval_batch_size=2, device="cpu")
    assert not result["recommendations"]
    assert any("Nothing fits" in n and "grad_accum" in n for n in result["notes"])
    assert "No method fits." in advise.format_advice(result)


# -- the activation formula against what autograd saves ---------------------------------------------

def _saved_bytes(model_dir, task_type: str, method: str, seq: int, batch: int, lora_r: int,
                 dtype: str = "float32") -> int:
    """Bytes the graph of one training forward of tunelab's task loss holds, as pipeline.load prepares the model
    (the Llama-family MLPs and norms fused, ops/): glibc's in-use count drops by them when the loss is let go.
    (Saved-tensor hooks would not do: ops.recompute steps aside under anyone else's.)"""
    import torch

    from tunelab import config, methods, tasks
    from tunelab.config import ModelConfig
    from tunelab.ops import gated, rmsnorm

    task = tasks.get(task_type)
    info = ({"task": task_type, "template": "alpaca", "train_on_prompt": True, "truncation": "cut"}
            if task_type in ("sft", "causal_lm") else {"labels": ["neg", "pos"]})
    torch.manual_seed(0)
    model, _ = task.build_model(ModelConfig(path=str(model_dir), dtype=dtype), info)
    gated.fuse_gated_mlps(model)
    rmsnorm.fuse_rms_norms(model)
    cfg = config.LoraConfig(name="lora", r=lora_r) if method == "lora" else config.FullConfig(name="full")
    model = methods.prepare(model, cfg, task.head_modules(model)).train()
    ids = torch.randint(5, 60, (batch, seq), generator=torch.Generator().manual_seed(0))
    batch_ = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "labels": ids.clone() if task_type == "causal_lm" else torch.tensor([0, 1] * (batch // 2))}
    task.loss(model, batch_, info)  # once first: lazily made caches are not the graph's
    held = []
    for _ in range(3):
        loss = task.loss(model, batch_, info)
        before = in_use()
        del loss
        held.append(before - in_use())
    return sorted(held)[1]


@pytest.fixture(scope="module")
def wide_models(tiny_gpt2, tiny_bert, tmp_path_factory):
    """2-block models 256 wide (the width FAMILIES' bf16 factors were measured at: on the 32-wide fixtures, per-token
    float32 pieces such as norm statistics weigh several times more), with the fixtures' tokenizers."""
    import torch
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    root = tmp_path_factory.mktemp("wide")
    gpt_tok, bert_tok = AutoTokenizer.from_pretrained(tiny_gpt2), AutoTokenizer.from_pretrained(tiny_bert)
    torch.manual_seed(0)
    models = {
        "llama": (LlamaForCausalLM(LlamaConfig(vocab_size=len(gpt_tok), hidden_size=256, intermediate_size=688,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=128)), gpt_tok, "causal_lm"),
        "gpt2": (GPT2LMHeadModel(GPT2Config(vocab_size=len(gpt_tok), n_positions=128, n_embd=256, n_layer=2, n_head=4,
                                            bos_token_id=gpt_tok.eos_token_id, eos_token_id=gpt_tok.eos_token_id)),
                 gpt_tok, "causal_lm"),
        "bert": (BertForSequenceClassification(BertConfig(vocab_size=len(bert_tok), hidden_size=256, num_labels=2,
                                                          intermediate_size=1024, num_hidden_layers=2,
                                                          num_attention_heads=4, max_position_embeddings=128)),
                 bert_tok, "classification")}
    for name, (model, tok, _) in models.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return {name: (root / name, task) for name, (_, _, task) in models.items()}


@pytest.mark.skipif(heap._glibc() is None, reason="counts glibc's malloc")
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_the_bf16_factor_matches_what_autograd_saves_over_a_bf16_model(wide_models, family, method):
    """Each family's `bfloat16` factor (the bytes autograd saves per token over a bf16 model, relative to float32)
    against a real forward's graph at both dtypes, per token as above, the loss's own share taken out. One factor
    per family stands for every method: 10 % is the spread between full fine-tuning and LoRA (BERT: 0.65 and 0.73,
    its attention dropout's bool masks weighing more in bf16)."""
    model_dir, task_type = wide_models[family]
    dims = advise._dims(advise._model_config(model_dir)[1])
    loss = advise.loss_saved_bytes(dims, task_type, 60, 4, 2, False) - advise.loss_saved_bytes(dims, task_type, 30, 4,
                                                                                               2, False)
    per_token = {d: _saved_bytes(model_dir, task_type, method, 60, 4, 2, d)
                 - _saved_bytes(model_dir, task_type, method, 30, 4, 2, d) - loss for d in ("float32", "bfloat16")}
    assert per_token["bfloat16"] / per_token["float32"] == pytest.approx(advise.FAMILIES[family]["bfloat16"], rel=0.1)


def test_the_runtime_overhead_is_measured_not_the_fallback():
    """runtime_overhead falls back to a constant when its child process fails; a moved import once made it fail
    silently on every machine, and every estimate lost ~80 MB."""
    assert advise.runtime_overhead() != advise.RUNTIME_FALLBACK


# -- a bf16 frozen base ------------------------------------------------------------------------------

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse2 avx2 avx512f {extra}
bugs\t\t: spectre_v1
"""


@pytest.mark.parametrize("extra,fast", [("amx_bf16 amx_tile", True), ("avx512_bf16", True), ("avx512_vnni", False),
                                        ("", False)])
def test_fast_bf16_matmul_is_read_from_the_cpu_flags(extra, fast):
    flags = advise.cpu_flags(CPUINFO.format(extra=extra))
    assert "avx2" in flags and "spectre_v1" not in flags  # the flags line only
    answer = advise.bf16_matmul("cpu", flags)
    assert answer["fast"] is fast
    assert ("amx_bf16" in answer["why"] or "avx512_bf16" in answer["why"])


@pytest.mark.parametrize("capability,fast", [((8, 0), True), ((9, 0), True), ((7, 5), False)])
def test_fast_bf16_matmul_on_a_gpu_is_compute_capability_8(capability, fast):
    answer = advise.bf16_matmul("cuda", capability=capability)
    assert answer["fast"] is fast and ".".join(map(str, capability)) in answer["why"]


def test_bf16_base_memory_counts_the_base_at_2_bytes_and_the_adapters_in_float32(tiny_bert):
    """LoRA over a bf16 base: the weights' bytes are the base's at 2 and the adapters and head at 4; gradients, AdamW
    state and the best copy are float32 bytes of the same trainable parameters; activations shrink by bf16's share."""
    from tunelab import models

    kw = {"lora_r": 4, "eval_batch_size": 2, "device": "cpu"}
    fp32, bf16 = (advise.estimate(tiny_bert, "classification", 32, 2, "lora", dtype=d, **kw)
                  for d in ("float32", "bfloat16"))
    trainable = fp32["trainable_params"]
    assert bf16["trainable_params"] == trainable
    assert bf16["bytes"]["gradients"] == fp32["bytes"]["gradients"] == 4 * trainable
    assert bf16["bytes"]["optimizer"] == 2 * 4 * trainable
    # Only the frozen parameters and the copy of the base's head that methods.named keeps shrink to 2 bytes.
    frozen = fp32["total_params"] - trainable
    model = _bert_classifier(tiny_bert)
    head = sum(p.numel() for name in models.head_modules(model) for p in model.get_submodule(name).parameters())
    assert fp32["bytes"]["weights"] - bf16["bytes"]["weights"] == 2 * frozen + 2 * head
    assert bf16["bytes"]["activations"] < fp32["bytes"]["activations"]


def _bert_classifier(path):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the new head's "MISSING" load report is expected

    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def _advice(tiny_bert, **kw):
    return advise.advise(tiny_bert, "classification", 64, 8, memory_bytes="64GiB", tasks=3, eval_batch_size=8,
                         device="cpu", **kw)


def test_bf16_base_is_recommended_where_the_cpu_has_fast_bf16_matmul(tiny_bert):
    result = _advice(tiny_bert, cpu_flags={"avx2", "amx_bf16"})
    assert result["recommendations"][0]["method"] in ("lora", "adapter")  # a float32-trained method over the base
    assert result["bf16_base"]["recommended"] and result["bf16_base"]["peak"] > 0
    note = next(n for n in result["notes"] if "model.dtype=bfloat16" in n)
    assert "amx_bf16" in note and "float32" in note
    assert note in advise.format_advice(result)


def test_no_bf16_advice_on_a_cpu_without_fast_bf16_matmul(tiny_bert):
    result = _advice(tiny_bert, cpu_flags={"avx2", "avx512f"})
    assert not result["bf16_base"]["recommended"]
    assert not any("bfloat16" in n or "bf16" in n for n in result["notes"])


def test_a_bf16_base_on_a_cpu_without_fast_bf16_matmul_is_said_to_be_slow(tiny_bert):
    result = _advice(tiny_bert, dtype="bfloat16", cpu_flags={"avx2"})
    note = next(n for n in result["notes"] if "slow" in n)
    assert "avx512_bf16" in note and "model.dtype=float32" in note
    assert not any("slow" in n for n in _advice(tiny_bert, dtype="bfloat16", cpu_flags={"avx512_bf16"})["notes"])


def test_full_fine_tuning_gets_autocast_not_a_bf16_base(tiny_bert):
    """Full fine-tuning trains the base itself: over a bf16 base its weights would train in bf16."""
    result = advise.advise(tiny_bert, "classification", 64, 8, memory_bytes="64GiB", eval_batch_size=8, device="cpu",
                           cpu_flags={"avx512_bf16"})
    assert result["recommendations"][0]["method"] == "full"
    assert not result["bf16_base"]["recommended"] and "train.precision=bf16" in result["bf16_base"]["why"]
