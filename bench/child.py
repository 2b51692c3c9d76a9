"""One benchmark run in its own process, so that its peak RSS is its own:

    python -m bench.child --runner tunelab|trainer|trl --spec run.json
    python -m bench.child --probe bitsandbytes

The spec (written by bench/run.py) names the scenario's model, data files, method and hyperparameters. The runner
trains and returns how to get the trained model; the same held-out function then scores it for every runner, and
the last stdout line is `BENCH_RESULT {json}`. `--probe bitsandbytes` says whether the peers' QLoRA can run here
(`BENCH_PROBE {"reason": null | "why not"}`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from . import common
from .common import StepClock, read_jsonl


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runner", choices=sorted(RUNNERS))
    parser.add_argument("--spec")
    parser.add_argument("--probe", choices=["bitsandbytes"])
    args = parser.parse_args(argv)
    if args.probe:
        print(PROBE_PREFIX + json.dumps({"reason": probe_bitsandbytes()}), flush=True)
        return
    if not (args.runner and args.spec):
        parser.error("--runner and --spec are required (or --probe)")
    spec = json.loads(Path(args.spec).read_text())
    if args.runner == "tunelab":
        # first, as `tunelab train` and a script that starts with `import tunelab` do: tunelab sets its allocator
        # switch (THP_MEM_ALLOC_ENABLE) before torch allocates anything
        import tunelab  # noqa: F401
    import torch

    # Every runner gets the same threads: all cores, nothing pinned.
    torch.set_num_threads(os.cpu_count())
    clock = StepClock(spec["spawned_at"])
    try:
        trained, info = RUNNERS[args.runner](spec, clock)
        # Peak RSS of training itself: read before the held-out pass, which for tunelab loads the run afresh.
        rss_train = common.peak_rss_mb()
        gpu_train = common.peak_cuda_mb()
        model, tokenizer = trained()
        if spec["task"] == "sft":
            scores = common.heldout_sft(model, tokenizer, read_jsonl(spec["heldout"]))
        else:
            scores = common.heldout_cls(model, tokenizer, read_jsonl(spec["heldout"]), spec["max_length"])
        result = {"ok": True, **clock.summary(), **info, **scores, "peak_rss_mb": rss_train,
                  "peak_rss_end_mb": common.peak_rss_mb()}
        if gpu_train is not None:  # --device cuda: what the training held on the GPU (torch's allocator)
            result["peak_cuda_mb"] = gpu_train
    except Exception as e:  # the parent records the failure and goes on with the other runs
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
    print(common.RESULT_PREFIX + json.dumps(result), flush=True)


# -- tunelab -----------------------------------------------------------------------------------------------

def run_tunelab(spec: dict, clock: StepClock):
    import tunelab
    from tunelab.training import logs

    steps, run_dir = spec["steps"], Path(spec["run_dir"])
    overrides = [
        f"model.path={spec['model']}", f"model.device={spec.get('device', 'cpu')}",
        f"data.train={spec['train']}", f"data.validation={spec['heldout']}",
        f"data.max_length={spec['max_length']}", "data.dedupe=false",
        f"train.max_steps={steps}", f"train.batch_size={spec['batch_size']}", f"train.lr={spec['lr']}",
        "train.scheduler=linear", "train.warmup_ratio=0", "train.weight_decay=0", f"train.seed={spec['seed']}",
        # one train record per step (the step clock below); no evaluation inside the timed steps, only the final one
        "train.log_every=1", f"train.eval_every={steps + 1}",
        "eval.base=false", "eval.linear_probe=false", "eval.samples=0", "eval.forgetting=none",
        f"eval.batch_size={spec['batch_size']}", f"output_dir={run_dir}",
        # --bf16: tunelab's own switch, bf16 autocast of the training forward with float32 weights (what the peers'
        # bf16=True does too). An autocast context around tunelab.train would not do: its loop sets autocast itself.
        f"train.precision={'bf16' if spec['bf16'] else 'fp32'}",
        # --precision bf16-base: the frozen base loaded in bf16, what tunelab trains kept float32 over it
        f"model.dtype={base_dtype(spec)}",
    ]
    if spec["task"] == "sft":  # padding-free: each step's 8 examples packed, as TRL's padding_free
        overrides += ["task.type=sft", "task.template=chat", "train.padding_free=true"]
    else:
        overrides += ["task.type=classification", "data.text_field=text", "data.label_field=label"]
    if spec["method"] in common.LOW_RANK:  # qlora: LoRA's keys over its 4-bit base (quantize: all-linear, the default)
        lora = spec["lora"]
        overrides += [f"method.name={spec['method']}", f"method.r={lora['r']}", f"method.alpha={lora['alpha']}",
                      f"method.dropout={lora['dropout']}", "method.target_modules=all-linear"]
    else:
        overrides += ["method.name=full"]

    # tunelab keeps no per-step clock of its own (it sums step times into train_seconds). With log_every=1 it
    # writes one train record at the end of every optimizer step; a listener on its log stamps each as it comes.
    open_log = logs.open_log
    marks = []

    def open_log_with_clock(run_dir_, log_to, listener=None):
        def listen(record):
            if record.get("type") == "train":
                previous = marks[-1]["tokens"] if marks else 0
                clock.step_end(record["tokens"] - previous, spec["batch_size"])
                clock.loss(record["step"], record["loss"])
                marks.append(record)
            if listener is not None:
                listener(record)

        return open_log(run_dir_, log_to, listen)

    logs.open_log = open_log_with_clock
    run = tunelab.train(None, overrides, overwrite=True)
    logs.open_log = open_log

    report = json.loads((run.dir / "data_report.json").read_text())
    train_tokens = report["splits"]["train"]["tokens"]
    records = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
    packed = any(r["type"] == "padding_free" and r["on"] for r in records)
    info = {"settings": f"{spec['method']}, {'padding-free rows' if packed else 'length-split micro-batches'}, "
                        f"fused AdamW{precision_note(spec)}",
            "trainable_params": run.summary["trainable_params"],
            "target_tokens": train_tokens.get("target_tokens", train_tokens.get("examples")),
            "own_train_seconds": run.summary["train_seconds"],
            "own_tokens_per_second": run.summary["tokens_per_second"]}

    def trained():
        loaded = tunelab.load(run.dir, device=spec.get("device", "cpu"))
        return loaded.model, loaded.tokenizer

    return trained, info


# -- transformers Trainer (+ peft) ---------------------------------------------------------------------------

def training_arguments(spec: dict, cls=None, **extra):
    """The peers' shared settings; TRL's SFTConfig takes the same keyword arguments."""
    from transformers import TrainingArguments

    cls = cls or TrainingArguments
    return cls(output_dir=spec["run_dir"], per_device_train_batch_size=spec["batch_size"],
               gradient_accumulation_steps=1, max_steps=spec["steps"], learning_rate=spec["lr"],
               lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
               logging_steps=1, report_to=[], save_strategy="no", eval_strategy="no",
               dataloader_num_workers=0, use_cpu=spec.get("device", "cpu") == "cpu", seed=spec["seed"], bf16=spec["bf16"], disable_tqdm=True,
               **extra)


def lora_config(spec: dict, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    lora = spec["lora"]
    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules="all-linear", task_type=task_type)


def base_dtype(spec: dict) -> str:
    """The dtype every runner loads the model in: float32, or bfloat16 for --precision bf16-base."""
    return spec.get("base_dtype", "float32")


def precision_note(spec: dict) -> str:
    return {"float32": "", "bfloat16": ", bf16 base"}[base_dtype(spec)] + (", bf16 autocast" if spec["bf16"] else "")


def optimizer_name(args) -> str:
    return getattr(args.optim, "value", str(args.optim))  # an enum member: "adamw_torch_fused"


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- the peers' QLoRA: bitsandbytes -------------------------------------------------------------------------

PROBE_PREFIX = "BENCH_PROBE "
BNB_CPU_SINCE = (0, 46)  # the first bitsandbytes whose main package quantizes and multiplies 4-bit on the CPU


def add_peer_site() -> None:
    """Make the packages kept for the peers (common.PEER_SITE) importable, ahead of the venv's."""
    site = str(common.PEER_SITE)
    if common.PEER_SITE.is_dir() and site not in sys.path:
        sys.path.insert(0, site)


def version_tuple(text: str) -> tuple[int, ...]:
    """'0.50.2' -> (0, 50, 2); '0.47.0.dev0' -> (0, 47, 0): the leading numbers only."""
    parts = []
    for piece in text.split("."):
        digits = "".join(c for c in piece[:4] if c.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def probe_bitsandbytes() -> str | None:
    """None when bitsandbytes (the venv's, or common.PEER_SITE's) quantizes a layer to 4-bit NF4 with double
    quantization on this CPU and runs it forward and backward; else the reason, which the bench records as the
    runner's skip."""
    add_peer_site()
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        return (f"bitsandbytes is not installed ({e}); `{common.PEER_INSTALL}` installs it for the peers' runs "
                f"only (>= {'.'.join(map(str, BNB_CPU_SINCE))} has a CPU 4-bit backend)")
    version = getattr(bnb, "__version__", "0")
    if version_tuple(version) < BNB_CPU_SINCE:
        return (f"bitsandbytes {version} has no CPU backend for 4-bit weights (it came in "
                f"{'.'.join(map(str, BNB_CPU_SINCE))}); `{common.PEER_INSTALL} --upgrade` gets one")
    try:
        import torch

        layer = bnb.nn.Linear4bit(128, 128, bias=False, compute_dtype=torch.float32, compress_statistics=True,
                                  quant_type="nf4", device="cpu")
        layer.weight = bnb.nn.Params4bit(torch.randn(128, 128), requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", blocksize=64)
        layer = layer.to("cpu")  # quantizes
        x = torch.randn(4, 128, requires_grad=True)
        layer(x).sum().backward()
        if not bool(torch.isfinite(x.grad).all()):
            return f"bitsandbytes {version}: the 4-bit layer's input gradient is not finite on this CPU"
    except Exception as e:  # whatever this build cannot do on a CPU
        return f"bitsandbytes {version} cannot run a 4-bit NF4 layer on this CPU: {type(e).__name__}: {e}"[:500]
    return None


def load_causal_lm(spec: dict):
    """The scenario's model for the peers: as saved (float32, or bf16 with --precision bf16-base), or for QLoRA
    with every linear layer of the blocks quantized to NF4 on load by bitsandbytes (blocks of 64, double
    quantization: tunelab's format; the LM head stays full, as tunelab's) and prepared as peft's QLoRA recipe does
    (`prepare_model_for_kbit_training`, without the gradient checkpointing it would turn on: no runner checkpoints)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, base_dtype(spec))
    if spec["method"] != "qlora":
        return AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype)
    add_peer_site()  # before transformers looks for bitsandbytes
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype, quantization_config=quant,
                                                 device_map=spec.get("device", "cpu"))
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def run_trainer(spec: dict, clock: StepClock):
    import torch
    import transformers
    from datasets import Dataset
    from transformers import AutoTokenizer, Trainer

    transformers.set_seed(spec["seed"])  # before the model: a new head or LoRA weights draw from it
    tok = AutoTokenizer.from_pretrained(spec["model"])
    if spec["task"] == "sft":
        from transformers import DataCollatorForSeq2Seq

        model = load_causal_lm(spec)
        rows = []
        for r in read_jsonl(spec["train"]):
            ids, labels = common.encode_chat(tok, r["messages"])
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
        collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
        settings = "DataCollatorForSeq2Seq (dynamic padding)"
    else:
        from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

        train = read_jsonl(spec["train"])
        labels = sorted({str(r["label"]) for r in train})  # sorted names, as tunelab orders them
        model = AutoModelForSequenceClassification.from_pretrained(
            spec["model"], dtype=getattr(torch, base_dtype(spec)), num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={l: i for i, l in enumerate(labels)})
        enc = tok([r["text"] for r in train], truncation=True, max_length=spec["max_length"])
        rows = [{**{k: enc[k][i] for k in enc}, "labels": labels.index(str(r["label"]))} for i, r in enumerate(train)]
        collate = DataCollatorWithPadding(tok)
        settings = "DataCollatorWithPadding"
    if spec["method"] in common.LOW_RANK:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(spec))
        settings = ("peft, bitsandbytes NF4 base, " if spec["method"] == "qlora" else "peft, ") + settings
    counter = common.CountingCollator(collate)
    args = training_arguments(spec)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=counter,
                      callbacks=[common.hf_clock_callback(clock, counter)])
    trainer.train()
    info = {"settings": f"{settings}, {optimizer_name(args)}{precision_note(spec)}", "trainable_params": trainable(model),
            "target_tokens": sum(b["targets"] for b in counter.batches[: spec["steps"]])}
    return lambda: (model, tok), info


# -- TRL SFTTrainer ------------------------------------------------------------------------------------------

# Tried in order; the first that trains is used and recorded. Padding-free (the batch's examples flattened into one
# row with per-example position ids, no padding computed) is TRL's CPU-friendly option that keeps 8 examples per
# step; packing would fill rows of 512 tokens and change what one step is, so it is not used. assistant_only_loss
# needs {% generation %} markers, which the 58M tokenizer's template has; for a template TRL cannot patch (SmolLM2's)
# the fallback is prompt/completion data with completion_only_loss, whose target also covers the newline after
# <|im_end|> (one token per example more than the others).
TRL_ATTEMPTS = [
    {"padding_free": True, "loss": "assistant_only_loss"},
    {"padding_free": True, "loss": "completion_only_loss"},
    {"padding_free": False, "loss": "assistant_only_loss"},
    {"padding_free": False, "loss": "completion_only_loss"},
]


def run_trl(spec: dict, clock: StepClock):
    if spec["task"] != "sft" or spec["method"] != "lora":
        raise ValueError("the trl runner is for LoRA SFT scenarios")
    failures = []
    for attempt in TRL_ATTEMPTS:
        clock.reset()
        try:
            trained, info = _trl_once(spec, clock, attempt)
        except Exception as e:
            failures.append(f"{_trl_label(attempt)}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            print(f"trl: {failures[-1]} -- trying the next settings", file=sys.stderr, flush=True)
            continue
        info["fallbacks"] = failures
        if failures:
            info["settings"] += f" (after {len(failures)} failed: see fallbacks)"
        return trained, info
    raise RuntimeError("every TRL setting failed: " + " | ".join(failures))


def _trl_label(attempt: dict) -> str:
    return ("padding_free, " if attempt["padding_free"] else "dynamic padding, ") + attempt["loss"]


def _trl_once(spec: dict, clock: StepClock, attempt: dict):
    import torch
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    transformers.set_seed(spec["seed"])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=getattr(torch, base_dtype(spec)))
    conversations = read_jsonl(spec["train"])
    if attempt["loss"] == "assistant_only_loss":
        rows = [{"messages": r["messages"]} for r in conversations]
    else:
        rows = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in conversations]
    args = training_arguments(
        spec, SFTConfig,
        gradient_checkpointing=False,  # SFTConfig turns it on by default; no other runner checkpoints
        packing=False, padding_free=attempt["padding_free"],
        # padding-free refuses a max_length it cannot enforce; the data fit max_length by construction (bench/assets.py)
        max_length=None if attempt["padding_free"] else spec["max_length"],
        assistant_only_loss=attempt["loss"] == "assistant_only_loss",
        completion_only_loss=attempt["loss"] == "completion_only_loss",
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=lora_config(spec))
    # Set after construction: SFTTrainer refuses a custom collator with padding-free, and builds its own.
    counter = common.CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    trainer.add_callback(common.hf_clock_callback(clock, counter))
    trainer.train()
    info = {"settings": f"{_trl_label(attempt)}, {optimizer_name(args)}{precision_note(spec)}",
            "trainable_params": trainable(trainer.model),
            "target_tokens": sum(b["targets"] for b in counter.batches[: spec["steps"]])}
    return lambda: (trainer.model, tok), info


RUNNERS = {"tunelab": run_tunelab, "trainer": run_trainer, "trl": run_trl}

if __name__ == "__main__":
    main()
