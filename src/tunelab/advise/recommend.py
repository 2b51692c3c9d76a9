"""`tunelab advise`'s answer: the memory budget, which methods fit it, the recommendations, and the printed table.

The rules (`_recommend`): limited memory -> LoRA / QLoRA; several tasks -> one small adapter per task;
latency-critical -> mergeable methods only; memory to spare and one task -> full fine-tuning is an option;
gradient checkpointing where a method fits only with it; a bf16 frozen base where the hardware multiplies bf16
fast (hardware.py), and a warning where it is asked for on hardware that does not. The estimates come from memory.py.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .. import hub, methods
from ..config.rules import words
from ..errors import TunelabError
from .hardware import bf16_matmul
from .memory import MERGEABLE, METHOD_ORDER, estimate, eval_batch_that_fits

# -- the budget ------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str | int) -> int:
    """'24GB' -> 24e9 bytes. KB/MB/GB/TB are decimal, KiB/MiB/GiB/TiB and bare K/M/G/T binary (as `free -g` and
    docker's `8g`), a plain number is bytes."""
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m and m.group(2).lower()
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise TunelabError(
            f"Memory size {text!r} is not understood. Write a positive number with an optional unit, e.g. 24GB, "
            f"24GiB, 512MB, 8G or 1073741824 (bytes): KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB and "
            f"K/M/G/T powers of 1024.")
    return int(float(m.group(1)) * _UNITS[unit])


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def machine_memory() -> tuple[int, str]:
    """(bytes, what they are): the first CUDA GPU's memory when CUDA is available, else this machine's RAM
    (capped by a cgroup limit, as in a container)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, f"GPU memory of {torch.cuda.get_device_name(0)}"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            total = min(total, int(Path(limit_file).read_text().strip()))
        except (OSError, ValueError):  # absent, or "max"
            pass
    return total, "RAM of this machine"


# -- the advice ----------------------------------------------------------------------------------------

def advise(model_dir, task: str, seq_len: int, batch: int, memory_bytes: int | str | None = None, tasks: int = 1,
           latency_critical: bool = False, dtype: str = "float32", eval_batch_size: int | None = None,
           device: str | None = None, cpu_flags=None, gpu_capability: tuple[int, int] | None = None) -> dict:
    """Every method with and without gradient checkpointing, which fit `memory_bytes` (default: the GPU's memory
    under CUDA, else this machine's RAM), and recommendations, each with a one-line reason.

    Whether the device multiplies bf16 fast is read from `cpu_flags` (default: /proc/cpuinfo's) or
    `gpu_capability` (default: GPU 0's compute capability)."""
    if tasks < 1:
        raise TunelabError(f"tasks must be >= 1 (the number of tasks to fine-tune for), got {tasks}.")
    if hub.is_hub_id(str(model_dir)):  # fetched once (into the HF cache, where training will look) for every method
        model_dir = hub.download(str(model_dir), key="--model", revision_key="--revision").dir
    if memory_bytes is None:
        memory, memory_source = machine_memory()
    else:
        memory, memory_source = parse_memory(memory_bytes), "given"
    rows = []
    for method in METHOD_ORDER:
        plain, ckpt = (estimate(model_dir, task, seq_len, batch, method, dtype, gc, eval_batch_size=eval_batch_size,
                                device=device) for gc in (False, True))
        row = {"method": method, "applicable": plain["applicable"], "reason": plain["reason"],
               "mergeable": method in MERGEABLE, "plain": plain, "checkpointing": ckpt, "fits": None}
        if plain["applicable"]:
            row["fits"] = ("plain" if plain["train_peak"] <= memory else
                           "checkpointing" if ckpt["train_peak"] <= memory else None)
        rows.append(row)
    head = rows[0]["plain"]
    result = {"model": head["model"], "task": task, "seq_len": seq_len, "batch": batch, "dtype": dtype,
              "device": head["device"], "memory_bytes": memory, "memory_source": memory_source, "tasks": tasks,
              "latency_critical": latency_critical, "rows": rows}
    result["recommendations"], result["notes"] = _recommend(rows, memory, tasks, latency_critical)
    result["bf16_matmul"] = bf16_matmul(result["device"], cpu_flags, gpu_capability)
    first = result["recommendations"][0]["method"] if result["recommendations"] else None
    bf16 = None
    if first and dtype == "float32" and result["bf16_matmul"]["fast"]:
        gc = result["recommendations"][0]["gradient_checkpointing"]
        bf16 = estimate(model_dir, task, seq_len, batch, first, "bfloat16", gc, eval_batch_size=eval_batch_size,
                        device=result["device"])
    result["bf16_base"], note = _bf16_advice(_row(rows, first), dtype, result["bf16_matmul"], bf16)
    if note:
        result["notes"].append(note)
    return result


def _row(rows: list[dict], method: str | None) -> dict | None:
    return next((r for r in rows if r["method"] == method), None)


def _bf16_advice(row: dict | None, dtype: str, matmul: dict, bf16: dict | None) -> tuple[dict, str | None]:
    """({"recommended", "why", "peak"}, a note or None): a bf16 frozen base for the first recommendation where
    the hardware multiplies bf16 fast and the method keeps what it trains float32 over it (TRAINABLE_DTYPE);
    a warning where a bf16 base is asked for on hardware without fast bf16 matmul."""
    if dtype == "bfloat16" and not matmul["fast"]:
        why = (f"A bf16 base will be slow here: {matmul['why']}, so every bf16 matmul is converted to float32 and "
               f"back. model.dtype=float32 trains faster on this machine; the bf16 base only saves memory.")
        return {"recommended": False, "why": why, "peak": None}, why
    if dtype != "float32" or row is None or bf16 is None:
        return {"recommended": False, "why": matmul["why"], "peak": None}, None
    method, plain = row["method"], row["checkpointing" if bf16["gradient_checkpointing"] else "plain"]
    if methods.get(method).TRAINABLE_DTYPE != "float32":
        why = (f"{matmul['why']}: train.precision=bf16 (autocast) runs {method}'s matmuls in bf16 with float32 "
               f"weights; a bf16 base (model.dtype=bfloat16) would train {method}'s weights themselves in bf16.")
        return {"recommended": False, "why": why, "peak": None}, why
    why = (f"{matmul['why']}: a bf16 frozen base (model.dtype=bfloat16) suits {method}: the base weights take 2 bytes "
           f"each and its activations are bf16, while what it trains, the gradients and AdamW state stay float32; "
           f"peak {fmt_bytes(bf16['train_peak'])} instead of {fmt_bytes(plain['train_peak'])}.")
    return {"recommended": True, "why": why, "peak": bf16["train_peak"]}, why


def _recommend(rows: list[dict], memory: int, tasks: int, latency_critical: bool) -> tuple[list[dict], list[str]]:
    """The design notes' rules: limited memory -> LoRA / QLoRA; several tasks -> one small adapter per task;
    latency-critical -> mergeable methods only; memory to spare and one task -> full fine-tuning is an option;
    gradient checkpointing where a method fits only with it.

    The methods named here are advice (which to suggest first, and in what order), not facts about the methods;
    what a method is (mergeable, ...) comes from its own module."""
    by = {r["method"]: r for r in rows}
    fits = lambda m: m in by and by[m]["fits"] is not None
    allowed = lambda m: not latency_critical or m in MERGEABLE
    peak = lambda m: by[m]["checkpointing" if by[m]["fits"] == "checkpointing" else "plain"]["train_peak"]
    recs: list[dict] = []

    def add(method: str, reason: str) -> None:
        if any(r["method"] == method for r in recs):
            return
        gc = by[method]["fits"] == "checkpointing"
        if gc:
            reason += (f"; only with train.gradient_checkpointing=true ({fmt_bytes(by[method]['plain']['train_peak'])} "
                       f"without, {fmt_bytes(by[method]['checkpointing']['train_peak'])} with)")
        recs.append({"method": method, "gradient_checkpointing": gc, "reason": reason})

    full_size = by["full"]["plain"]["bytes"]["weights"] if by["full"]["applicable"] else None
    if tasks > 1:
        for m in ("lora", "adapter"):
            if fits(m) and allowed(m):
                per_task = 4 * by[m]["plain"]["trainable_params"]  # float32 adapter tensors on disk
                add(m, f"{tasks} tasks: one {fmt_bytes(per_task)} adapter per task on one shared base, instead of "
                       f"{tasks} copies of the {fmt_bytes(full_size)} model" + (
                           "; merge it for serving a single task" if m in MERGEABLE else ""))
    if fits("full") and tasks == 1:
        add("full", f"memory allows it ({fmt_bytes(peak('full'))} of {fmt_bytes(memory)}): full fine-tuning usually "
                    f"reaches the best task metric, at the cost of a whole model copy per run")
    if fits("lora"):
        why = ("full fine-tuning needs " + fmt_bytes(by["full"]["checkpointing"]["train_peak"]) + " even with checkpointing"
               if by["full"]["applicable"] and not fits("full") else "the light default")
        add("lora", f"{why}; LoRA trains {by['lora']['plain']['trainable_params']:,} parameters and peaks at "
                    f"{fmt_bytes(peak('lora'))}, close to full fine-tuning's quality, and merges for serving")
    elif fits("qlora"):
        add("qlora", f"even LoRA does not fit ({fmt_bytes(by['lora']['checkpointing']['train_peak'])} with checkpointing): "
                     f"QLoRA keeps the frozen base in 4-bit NF4 and peaks at {fmt_bytes(peak('qlora'))}")
    if latency_critical:
        for m in ("lora", "ia3", "bitfit", "full", "freeze"):
            if fits(m) and len(recs) < 2:
                add(m, "merges into the base weights, so serving costs what the base model costs")
    if not recs:  # only the less usual methods fit
        for m in sorted((m for m in METHOD_ORDER if fits(m) and allowed(m)), key=peak)[:1]:
            add(m, f"the only kind of method that fits: peaks at {fmt_bytes(peak(m))} of {fmt_bytes(memory)}")

    notes = []
    if not any(fits(m) for m in by):
        smallest = min((r for r in rows if r["applicable"]), key=lambda r: r["checkpointing"]["train_peak"])
        notes.append(f"Nothing fits in {fmt_bytes(memory)}: the smallest is {smallest['method']} with checkpointing at "
                     f"{fmt_bytes(smallest['checkpointing']['train_peak'])}. Lower the batch (and raise train.grad_accum to "
                     f"keep the effective batch), shorten data.max_length, train in bfloat16, or use more memory.")
    if latency_critical:
        unmerged = tuple(m for m in METHOD_ORDER if m not in MERGEABLE)
        notes.append(f"Latency-critical: {words(unmerged)} add work to every inference call, so they are not "
                     f"recommended.")
    lora, qlora = by["lora"], by["qlora"]
    if qlora["applicable"] and not fits("qlora") and qlora["checkpointing"]["phases"]["train"] <= memory:
        notes.append(f"QLoRA's training would fit ({fmt_bytes(qlora['checkpointing']['phases']['train'])}), but tunelab "
                     f"loads the base in {lora['plain']['dtype']} before quantizing it "
                     f"({fmt_bytes(qlora['plain']['phases']['load'])}).")
    for rec in recs[:1]:  # the evaluation of the first recommendation, at eval.batch_size
        est = by[rec["method"]]["checkpointing" if rec["gradient_checkpointing"] else "plain"]
        if est["phases"]["eval"] > memory:
            fitting = eval_batch_that_fits(est, memory)
            notes.append(f"Evaluation at eval.batch_size={est['eval_batch_size']} needs {fmt_bytes(est['phases']['eval'])}"
                         + (f": set eval.batch_size={fitting} or lower." if fitting else
                            ": even eval.batch_size=1 does not fit; shorten data.max_length."))
    if rows[0]["plain"].get("family_guessed"):
        notes.append(f"Model type not calibrated; its activations are estimated as a {rows[0]['plain']['family']}-like "
                     f"model's.")
    return recs, notes


def format_advice(result: dict) -> str:
    """What `tunelab advise` prints: a table of the methods, then the recommendations and notes."""
    mb = lambda n: f"{n / 2**20:,.0f}" if n is not None else "-"
    title = (f"Training memory for {result['model']} ({result['task']}, {result['batch']} x {result['seq_len']} "
             f"tokens, {result['dtype']}, {result['device']}); budget {fmt_bytes(result['memory_bytes'])} "
             f"({result['memory_source']}). MiB:")
    header = (f"{'method':9} {'trainable':>13} {'weights':>8} {'grad+opt':>9} {'activ.':>7} {'logits':>7} "
              f"{'peak':>7} {'ckpt act.':>9} {'peak ckpt':>9}  fits")
    lines = [title, header]
    for r in result["rows"]:
        if not r["applicable"]:
            lines.append(f"{r['method']:9} n/a: {r['reason']}")
            continue
        p, c = r["plain"], r["checkpointing"]
        b = p["bytes"]
        share = 100 * p["trainable_params"] / p["total_params"]
        trainable = f"{p['trainable_params']:,}" if p["trainable_params"] < 10**6 else f"{p['trainable_params'] / 1e6:.1f}M"
        fits = {"plain": "yes", "checkpointing": "with ckpt", None: "no"}[r["fits"]]
        lines.append(f"{r['method']:9} {trainable:>7} {share:4.1f}% {mb(b['weights']):>8} "
                     f"{mb(b['gradients'] + b['optimizer'] + b['best_copy']):>9} {mb(b['activations']):>7} "
                     f"{mb(b['logits']):>7} {mb(p['train_peak']):>7} {mb(c['bytes']['activations']):>9} "
                     f"{mb(c['train_peak']):>9}  {fits}")
    first = next(r["plain"] for r in result["rows"] if r["applicable"])
    lines.append(f"(peak: loading or a training step, whichever is larger, including "
                 f"{fmt_bytes(first['bytes']['runtime'])} for the "
                 f"{'CUDA context' if result['device'] == 'cuda' else 'Python process'}; grad+opt = gradients, AdamW "
                 f"state and the best-checkpoint copy; evaluation at eval.batch_size={first['eval_batch_size']}: "
                 f"{fmt_bytes(first['phases']['eval'])} for {first['method']})")
    lines.append("")
    lines.append("Recommendations:" if result["recommendations"] else "No method fits.")
    for rec in result["recommendations"]:
        ckpt = " + gradient checkpointing" if rec["gradient_checkpointing"] else ""
        lines.append(f"  {rec['method']}{ckpt}: {rec['reason']}.")
    for note in result["notes"]:
        lines.append(f"Note: {note}")
    return "\n".join(lines)
