"""QLoRA's base quantized as it loads (methods.loading -> models.building -> qlora.load_plan): every body linear
quantized, attention projections whose weights do not fill 16384-weight blocks included; the same NF4 data and
outputs as loading in full precision and quantizing after; sharded checkpoints; never all full-precision weights
alive at once; merge; a saved run loaded again; older qlora_config.json files; bad model directories.

The models: a Llama of hidden 192 with 2 of 6 heads for keys and values (k/v 64 x 192 = 12288 weights, 192 blocks
of 64: scales in blocks of 64) and tied embeddings, saved whole and in shards; a GPT-2 of hidden 96 (Conv1D, c_attn
96 x 288: 432 blocks, scale blocks of 16); the conftest BERT (hidden 32) for sequence classification, whose head is
not in the checkpoint.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import threading

import pytest
import torch
from conftest import forward_ops, make_rows, tol, write_jsonl
from torch import nn
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from tunelab import config, methods, models
from tunelab.errors import TunelabError
from tunelab.methods import lora, qlora, targets
from tunelab.tasks import causal_lm
from tunelab.tasks import classification as classification_task

pytest.importorskip("torchao")

LM_INFO = {"task": "sft", "template": "auto", "train_on_prompt": False, "truncation": "right"}
CLS_INFO = {"labels": ["neg", "pos"]}
FORWARD_OPS = forward_ops(192, 384, 2, head_dim=32)


@pytest.fixture(scope="module")
def lms(tiny_gpt2, tmp_path_factory):
    root = tmp_path_factory.mktemp("qload")
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=192, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        intermediate_size=384, max_position_embeddings=64, tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id))
    llama.save_pretrained(root / "llama")
    llama.save_pretrained(root / "llama-sharded", max_shard_size="200KB")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=96, n_layer=2, n_head=4,
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(root / "gpt2")
    for name in ("llama", "llama-sharded", "gpt2"):
        tok.save_pretrained(root / name)
    assert (root / "llama-sharded" / "model.safetensors.index.json").is_file()
    assert len(set(json.loads((root / "llama-sharded" / "model.safetensors.index.json").read_text())
                   ["weight_map"].values())) > 2
    return {k: root / k for k in ("llama", "llama-sharded", "gpt2")}


def _cfg(path, task="sft", **method):
    return config.validate({"model": {"path": str(path)}, "data": {"train": "x.jsonl"}, "task": {"type": task},
                            "method": {"name": "qlora", "r": 4, "target_modules": "all-linear", **method},
                            "train": {"lr": 1e-3}})


def _build(path, on_load: bool, task=causal_lm, info=LM_INFO, **method):
    """The model as the pipeline prepares it: quantized as it loads (on_load) or loaded whole, then quantized."""
    cfg = _cfg(path, "sft" if task is causal_lm else "classification", **method)
    torch.manual_seed(0)
    if on_load:
        with methods.loading(cfg.method, torch.device("cpu")):
            model, tok = task.build_model(cfg.model, dict(info))
    else:
        model, tok = task.build_model(cfg.model, dict(info))
    head = task.head_modules(model)
    return qlora.apply(model, cfg.method, head).eval(), tok, head


def _nf4(model):
    return {p: m for p, m in model.named_modules() if isinstance(m, qlora.NF4Linear)}


def _body(model, head):
    return {p.removesuffix(".base_layer") for p, m in model.named_modules()
            if (targets.is_linear(m) or isinstance(m, qlora.NF4Linear)) and ".lora_" not in p
            and not targets.inside(p, head) and m is not model.get_output_embeddings()}


def _ids(n=3, length=12, seed=0):
    return torch.randint(0, 200, (n, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _same_model(a, b):
    """The same NF4 data in the same layers, and every other tensor equal."""
    qa, qb = _nf4(a), _nf4(b)
    assert set(qa) == set(qb)
    for p in qa:
        wa, wb = qa[p].weight, qb[p].weight
        assert wa.scaler_block_size == wb.scaler_block_size, p
        for name in ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean"):
            assert torch.equal(getattr(wa, name), getattr(wb, name)), f"{p}.{name}"
    sa = {k: v for k, v in a.state_dict().items() if not any(k.startswith(p + ".weight") for p in qa)}
    sb = {k: v for k, v in b.state_dict().items() if not any(k.startswith(p + ".weight") for p in qb)}
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    bufs = dict(b.named_buffers())
    for k, v in a.named_buffers():  # the non-persistent ones too (rotary inv_freq)
        assert torch.equal(v, bufs[k]), k


@pytest.mark.parametrize("name", ["llama", "llama-sharded", "gpt2"])
def test_quantized_on_load_equals_load_then_quantize(lms, name, capsys):
    old, _, head = _build(lms[name], on_load=False)
    new, _, _ = _build(lms[name], on_load=True)
    line = capsys.readouterr().out
    _same_model(old, new)
    assert {p.removesuffix(".base_layer") for p in _nf4(new)} == _body(new, head)  # every body linear
    assert "full precision" not in line
    ids = _ids()
    assert torch.equal(_logits(old, ids), _logits(new, ids))
    assert new.dtype == torch.float32 and new.lm_head.weight is new.get_input_embeddings().weight \
        if name != "gpt2" else new.lm_head.weight is new.transformer.wte.weight


def test_every_linear_quantized_with_its_own_scale_blocks(lms):
    model, _, head = _build(lms["llama"], on_load=True)
    sizes = {p.split(".")[-2] if p.endswith("base_layer") else p.split(".")[-1]: m.weight.scaler_block_size
             for p, m in _nf4(model).items()}
    # k/v: 12288 weights = 192 blocks -> 64; q/o 36864 = 576 -> 64; gate/up/down 73728 = 1152 -> 128
    assert sizes == {"q_proj": 64, "k_proj": 64, "v_proj": 64, "o_proj": 64, "gate_proj": 128, "up_proj": 128,
                     "down_proj": 128}
    assert all(isinstance(m.base_layer, qlora.NF4Linear) for m in lora.lora_layers(model).values())
    assert len(lora.lora_layers(model)) == 14


def test_scaler_block_size_rule():
    assert qlora.scaler_block_size(64 * 256 * 3) == 256
    assert qlora.scaler_block_size(64 * 96) == 32
    assert qlora.scaler_block_size(64 * 25) == 1  # an odd number of blocks: scales one by one
    assert qlora.scaler_block_size(100) is None  # not a multiple of 64: stays in full precision
    assert qlora.scaler_block_size(64 * 128, 256) is None and qlora.scaler_block_size(64 * 512, 256) == 256
    to_nf4 = qlora._torchao()[0]
    w = torch.randn(25, 64, generator=torch.Generator().manual_seed(0))
    rel = (to_nf4(w, 64, 1).get_original_weight() - w).norm() / w.norm()
    assert 0 < rel < 0.12  # torchao takes the odd case


def _full_precision_alive(shapes: set) -> set[int]:
    """The storages of the full-precision tensors of these shapes that hold memory now (of every tensor Python
    tracks)."""
    return {o.untyped_storage().data_ptr() for o in gc.get_objects()
            if type(o) in (torch.Tensor, torch.nn.Parameter) and o.device.type != "meta" and tuple(o.shape) in shapes
            and o.untyped_storage().nbytes() >= o.numel() * o.element_size()}


def test_never_all_full_precision_weights_at_once(lms, monkeypatch):
    """At every quantization, count the full-precision tensors shaped as a body linear's weight that are alive:
    quantized as it loads, only the one being quantized (and the tied embedding has another shape); loaded whole and
    quantized after, all 14 are. Deterministic: tensor objects are counted, not memory measured."""
    shapes = {(192, 192), (64, 192), (384, 192), (192, 384)}
    peak = []

    def counting(layer, settings, device=None):
        peak.append(len(_full_precision_alive(shapes) - before))
        return nf4(layer, settings, device)

    nf4 = qlora._nf4
    monkeypatch.setattr(qlora, "_nf4", counting)
    for on_load, most in ((True, 1), (False, 14)):
        peak.clear()
        gc.collect()
        before = _full_precision_alive(shapes)  # other tests' tensors still alive in this process
        _build(lms["llama-sharded"], on_load=on_load)
        assert len(peak) == 14 and max(peak) == most, (on_load, peak)


def test_head_missing_from_the_checkpoint_is_initialised_as_from_pretrained(tiny_bert):
    old, tok, head = _build(tiny_bert, on_load=False, task=classification_task, info=CLS_INFO)
    new, _, _ = _build(tiny_bert, on_load=True, task=classification_task, info=CLS_INFO)
    assert head and _nf4(new)  # hidden 32: 1024-weight layers, 16 blocks -> scale blocks of 16
    _same_model(old, new)  # the fresh classifier too: the same draws, in the same order
    batch = classification_task.collate(classification_task.encode(make_rows(4), tok, CLS_INFO, 32)[0],
                                        tok.pad_token_id)
    with torch.no_grad():
        assert torch.equal(classification_task.forward(old, batch), classification_task.forward(new, batch))


def test_merge_matches_unmerged(lms):
    model, _, head = _build(lms["llama"], on_load=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    ids = _ids()
    expected = _logits(model, ids)
    merged = qlora.merge(model)
    assert not any(isinstance(m, (qlora.NF4Linear, lora.LoRALinear)) for m in merged.modules())
    torch.testing.assert_close(_logits(merged, ids), expected, atol=tol(expected, FORWARD_OPS), rtol=0)


def _counting_streamed(monkeypatch) -> list:
    """The paths models.building reads tensor by tensor (quantizing as it goes), one entry per model so loaded."""
    streamed = []
    real = models._streamed
    monkeypatch.setattr(models, "_streamed", lambda *a: streamed.append(a[2]) or real(*a))
    return streamed


def test_saved_run_loads_quantized_on_load_and_reproduces(lms, tmp_path, monkeypatch):
    import tunelab

    rows = [{"instruction": r["text"], "output": r["label"]} for r in make_rows(24)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    streamed = _counting_streamed(monkeypatch)
    run = tunelab.train(None, [f"model.path={lms['llama']}", f"data.train={train}", "task.type=sft",
                               "method.name=qlora", "method.target_modules=all-linear", "train.max_steps=2",
                               "train.batch_size=4", "eval.base=false", f"output_dir={tmp_path / 'run'}"])
    assert len(streamed) == 1
    saved = json.loads((run.dir / "adapter" / qlora.SETTINGS_NAME).read_text())
    assert saved["scaler_block_size"] == "auto" and saved["block_size"] == 64
    tuned = tunelab.load(run.dir)
    assert len(streamed) == 2 and len(_nf4(tuned.model)) == 14
    # the same as the full-precision base loaded whole, the adapter attached, then quantized
    cfg = _cfg(lms["llama"])
    plain, _ = causal_lm.build_model(cfg.model, dict(LM_INFO))
    reference = qlora.load(plain, run.dir / "adapter").eval()
    _same_model(reference, tuned.model)
    ids = _ids()
    assert torch.equal(_logits(tuned.model, ids), _logits(reference, ids))
    assert tuned.generate(["great fun"], max_new_tokens=4) == tunelab.load(run.dir).generate(["great fun"],
                                                                                             max_new_tokens=4)


def test_a_grpo_run_quantizes_its_base_as_it_loads(tiny_chat_llama, tmp_path, monkeypatch):
    """GRPO builds its model outside pipeline.load: it too reads a QLoRA base tensor by tensor, every body linear
    quantized (2 layers x 7), and its saved run loads the same way."""
    import tunelab

    streamed = _counting_streamed(monkeypatch)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say word {i}"} for i in range(8)])
    (tmp_path / "rewards.py").write_text("def length(prompts, completions):\n"
                                         "    return [len(c) / 10 for c in completions]\n")
    run = tunelab.train(None, [f"model.path={tiny_chat_llama}", f"data.train={prompts}", "task.type=grpo",
                               f"task.reward_function={tmp_path / 'rewards.py'}:length", "task.group_size=2",
                               "method.name=qlora", "method.target_modules=all-linear", "train.max_steps=1",
                               "train.batch_size=2", "eval.max_new_tokens=3", f"output_dir={tmp_path / 'rl'}"])
    assert streamed == [tiny_chat_llama] and run.summary["steps"] == 1
    tuned = tunelab.load(run.dir)
    assert len(streamed) == 2 and len(_nf4(tuned.model)) == 14


def test_a_multitask_run_quantizes_each_task_model_as_it_loads(tiny_bert, tmp_path, monkeypatch):
    """Each task's model of a multi-task run is read tensor by tensor, every body linear quantized; a task loaded
    back from the run is too, its head (saved apart from the adapter, so frozen as the adapter loads) left in full
    precision as trained, and scores exactly what the run scored. (QLoRA's base is not switchable: shared adapters
    only.)"""
    import tunelab
    from tunelab import pipeline

    streamed = _counting_streamed(monkeypatch)
    files = {n: write_jsonl(tmp_path / f"{n}.jsonl", make_rows(40, seed=i))
             for i, n in enumerate(("a", "a_test", "b", "b_test"))}
    cfg = config.validate({
        "model": {"path": str(tiny_bert)}, "method": {"name": "qlora", "r": 4, "target_modules": "all-linear"},
        "tasks": [{"name": n, "data": {"train": str(files[n]), "test": str(files[f"{n}_test"])}} for n in ("a", "b")],
        "train": {"max_steps": 2, "lr": 1e-3, "batch_size": 8}, "eval": {"linear_probe": False, "samples": 1},
        "output_dir": str(tmp_path / "run")})
    run = pipeline.train(cfg)
    assert streamed == [tiny_bert, tiny_bert]
    for name, reads in (("a", 1), ("b", 2)):  # task b: the first task's model (which owns the body), then its own
        before = len(streamed)
        tuned = tunelab.load(run.dir, task=name)
        assert len(streamed) - before == reads
        quantized = {p.removesuffix(".base_layer") for p in _nf4(tuned.model)}
        assert len(quantized) == 12 and quantized == _body(tuned.model, tuned.task.head_modules(tuned.model)), name
        got = tuned.evaluate(files[f"{name}_test"])
        assert got["loss"] == run.summary["test"][name]["loss"], name


def test_older_settings_file_keeps_its_layers_in_full_precision(lms, tmp_path):
    """A qlora_config.json from before the per-layer rule (scaler_block_size 256) re-quantizes as it was trained:
    layers whose weight counts are not multiples of 16384 (k/v here) stay full precision."""
    model, _, head = _build(lms["llama"], on_load=True)
    qlora.save(model, tmp_path, str(lms["llama"]), head)
    settings = json.loads((tmp_path / qlora.SETTINGS_NAME).read_text())
    settings["scaler_block_size"] = 256
    settings.pop("max_scaler_block_size")
    (tmp_path / qlora.SETTINGS_NAME).write_text(json.dumps(settings))
    cfg = _cfg(lms["llama"])
    with methods.loading(cfg.method, torch.device("cpu"), tmp_path):
        base, _ = causal_lm.build_model(cfg.model, dict(LM_INFO))
    loaded = qlora.load(base, tmp_path)
    report = qlora.memory_report(loaded)
    # hidden 192: no weight count here is a multiple of 16384, so that rule left every layer in full precision
    assert report["quantized_layers"] == 0 and len(report["unquantized_layers"]) == 14
    assert "14 left in full precision (torchao needs a multiple of 16384 weights)" in qlora.describe(report)
    settings["scaler_block_size"] = 100
    (tmp_path / qlora.SETTINGS_NAME).write_text(json.dumps(settings))
    with pytest.raises(TunelabError, match=r"scaler_block_size 100.*power of two"):
        qlora.load(causal_lm.build_model(cfg.model, dict(LM_INFO))[0], tmp_path)
    settings.update(scaler_block_size="auto", head="lm_head")
    (tmp_path / qlora.SETTINGS_NAME).write_text(json.dumps(settings))
    with pytest.raises(TunelabError, match=r"has head 'lm_head'; it must be a list of module names"):
        qlora.load(causal_lm.build_model(cfg.model, dict(LM_INFO))[0], tmp_path)


def test_bad_model_directories_keep_their_messages(lms, tmp_path):
    import shutil

    cfg = _cfg(lms["llama"])
    broken = tmp_path / "broken"
    shutil.copytree(lms["llama"], broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with methods.loading(cfg.method, torch.device("cpu")), pytest.raises(TunelabError, match="damaged or incomplete"):
        causal_lm.build_model(cfg.model, dict(LM_INFO), path=broken)
    data = (lms["llama"] / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:-1000])  # cut inside the last tensor
    with methods.loading(cfg.method, torch.device("cpu")), pytest.raises(TunelabError, match="damaged or incomplete"):
        causal_lm.build_model(cfg.model, dict(LM_INFO), path=broken)
    other = tmp_path / "other"
    shutil.copytree(lms["llama"], other)
    conf = json.loads((other / "config.json").read_text())
    conf["intermediate_size"] = 256
    (other / "config.json").write_text(json.dumps(conf))
    with methods.loading(cfg.method, torch.device("cpu")), pytest.raises(TunelabError, match="do not have the shapes"):
        causal_lm.build_model(cfg.model, dict(LM_INFO), path=other)


def test_clone_copies_the_packed_tensors():
    """torchao's own NF4Tensor.clone re-quantizes with scale blocks of 256, failing for smaller ones; qlora makes
    it copy (a frozen weight cloned by a check or a deepcopy)."""
    to_nf4 = qlora._torchao()[0]
    w = to_nf4(torch.randn(64, 192, generator=torch.Generator().manual_seed(0)), 64, 64)
    c = torch.nn.Parameter(w, requires_grad=False).detach().clone()
    assert type(c) is type(w) and c.scaler_block_size == 64 and c.quantized_data.data_ptr() != w.quantized_data.data_ptr()
    assert torch.equal(c.quantized_data, w.quantized_data) and torch.equal(c.get_original_weight(), w.get_original_weight())
    assert torch.equal(c, w) and not torch.equal(c, to_nf4(torch.randn(64, 192), 64, 64))
    assert torch.equal(w, w.get_original_weight())


@pytest.mark.parametrize("shape, scaler_block", [((192, 128), 64), ((256, 512), 256), ((96, 64), 32)])
def test_the_fast_dequantization_is_torchaos_bit_for_bit_and_the_layer_its_linear(shape, scaler_block):
    """qlora.dequantize replaces torchao's get_original_weight (3.5x slower) in every forward and backward: the
    same weight exactly, and NF4Linear's output and input gradient those of torchao's own linear_nf4."""
    to_nf4, linear_nf4, _ = qlora._torchao()
    torch.manual_seed(0)
    weight = to_nf4(torch.randn(shape) * 0.05, qlora.BLOCK_SIZE, scaler_block)
    assert torch.equal(qlora.dequantize(weight), weight.get_original_weight())
    into = torch.full((weight.numel(),), float("nan"))  # written in place, its codes 1000 bytes at a time
    out = qlora.dequantize(weight, into, torch.empty(1000, dtype=torch.int32))
    assert out.data_ptr() == into.data_ptr() and torch.equal(out, weight.get_original_weight())
    layer = qlora.NF4Linear(nn.Linear(shape[1], shape[0], bias=False), scaler_block)
    x = torch.randn(5, shape[1], requires_grad=True)
    ours = layer(x)
    ours.pow(2).sum().backward()
    grad, x.grad = x.grad, None
    theirs = linear_nf4(x, layer.weight)
    theirs.pow(2).sum().backward()
    assert torch.equal(ours, theirs) and torch.equal(grad, x.grad)


def test_every_dequantization_of_a_step_reuses_one_buffer(lms):
    """NF4Matmul dequantizes every weight, forward and backward, into the thread's scratch memory: a fresh tensor
    each time (up to 14 layers x 2 a step here) left the heap fragmented between the activations (1B bench model: peak
    RSS 6.1 GB, ~1 GB of it free heap). Counted: the storages every dequantized weight of a step lives in, all
    kept alive so that a freed one cannot be handed out again at the same address. Another thread gets its own."""
    model, _, _ = _build(lms["llama"], on_load=True)
    model.train()
    seen, dequantize = [], qlora.dequantize

    def kept(weight, *args):
        seen.append(dequantize(weight, *args))
        return seen[-1]

    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()  # the first step grows the buffer to the largest weight
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qlora, "dequantize", kept)
        model(input_ids=ids, labels=ids).loss.backward()
        assert len(seen) == 14 + 11  # forward and backward; the first q/k/v get no input gradient to pass on
        assert len({t.untyped_storage().data_ptr() for t in seen}) == 1
        other = []
        weight = next(iter(_nf4(model).values())).weight
        thread = threading.Thread(target=lambda: other.append(qlora._scratch(weight)))
        thread.start()
        thread.join()
        assert other[0].untyped_storage().data_ptr() != seen[0].untyped_storage().data_ptr()
    # and what the step computed is what fresh dequantized weights give
    for p, m in _nf4(model).items():
        assert torch.equal(qlora._scratch(m.weight), m.weight.get_original_weight()), p


def test_a_step_after_an_inference_mode_pass_trains(lms):
    """A base evaluation under torch.inference_mode makes the thread's scratch memory an inference tensor, which
    a training step may not write: training gets memory of its own, and both passes compute the same weight."""
    model, _, _ = _build(lms["llama"], on_load=True)
    ids = torch.randint(0, 100, (2, 6))
    result = {}

    def run():  # a fresh thread: fresh scratch memory, whatever ran before in this process
        with torch.inference_mode():
            model(input_ids=ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        weight = next(iter(_nf4(model).values())).weight
        result["same"] = torch.equal(qlora._scratch(weight), weight.get_original_weight())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert result == {"same": True}


def _mapping_of(address: int) -> str | None:
    """The file /proc/self/maps names for the mapping holding `address` (None: anonymous memory, the heap)."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            low, high = (int(v, 16) for v in fields[0].split("-"))
            if low <= address < high:
                return fields[5].strip() if len(fields) > 5 else None
    return None


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_the_input_embedding_is_mapped_from_the_file_and_a_write_never_reaches_it(lms):
    """Read row by row, it costs resident memory only for the rows the data uses (as with from_pretrained's mapped
    load); every other tensor is read into memory of its own."""
    path = lms["llama"]
    file = path / "model.safetensors"
    before = hashlib.sha256(file.read_bytes()).hexdigest()
    model, _, _ = _build(path, on_load=True)
    embedding = model.get_input_embeddings().weight
    assert _mapping_of(embedding.data_ptr()) == str(file.resolve())
    norm = model.model.norm.weight
    assert _mapping_of(norm.data_ptr()) != str(file.resolve())
    reference = LlamaForCausalLM.from_pretrained(path).get_input_embeddings().weight
    assert torch.equal(embedding, reference)
    with torch.no_grad():
        embedding.add_(1.0)  # as a method that trains it would: the process's own copy of each page written
    assert torch.equal(embedding, reference + 1.0)
    assert hashlib.sha256(file.read_bytes()).hexdigest() == before
