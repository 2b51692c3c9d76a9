"""QLoRA: a 4-bit NF4 base (torchao on CPU) under LoRA. Quantization error against the fp32 base,
init == quantized base, what a step touches, save -> load, peft loading the adapter onto a
full-precision base, the memory report, merge, and the error paths.

These tests build their own tiny models with hidden size 128. Every linear weight whose count is a
multiple of 64 is quantized, its scales in blocks of up to 256 (the tiny Llama's k_proj and v_proj,
128 x 64 = 128 blocks of 64: blocks of 128 scales); only a layer of another size stays in full
precision (test_small_layers). Loading the base quantized: test_qlora_load.py.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import forward_ops, make_rows, tol, write_jsonl
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from tunelab import config, methods, models
from tunelab.errors import TunelabError
from tunelab.methods import lora, qlora, targets
from tunelab.tasks import classification as task
from tunelab.training import optim

pytest.importorskip("torchao")

INFO = {"labels": ["neg", "pos"]}
HIDDEN, LAYERS = 128, 2

# Measured on these seeded random models: max |logits_nf4 - logits_fp32| / max |logits_fp32| was 2.1e-3 (BERT,
# post-LN), 0.158 (GPT-2) and 0.100 (Llama); the last hidden state moved by 0.9% / 12.6% / 11.9% (relative
# norm). Random pre-LN stacks pass each layer's ~9% weight error on undamped. The exact check is against an fp32
# model carrying the dequantized weights (equal to 0 here; asserted to float32 rounding), the bounds below are loose.
BASE_RELATIVE_BOUND = 0.25  # max |logits_nf4 - logits_fp32| / max |logits_fp32|
WEIGHT_RELATIVE_BOUND = 0.12  # ||W_nf4 - W|| / ||W|| per layer (NF4 of a Gaussian: ~0.09)
# Outputs computed two ways in float32 (dequantized weights, merged weights, peft) differ by rounding alone: the
# n·eps bound over a forward pass of these models (FFN up to GPT-2's 4 x 128, heads of 32), times the outputs' size
FORWARD_OPS_128 = forward_ops(HIDDEN, 4 * HIDDEN, LAYERS, head_dim=32)


def _copy_tokenizer(src, dst):
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)


@pytest.fixture(scope="module")
def models_128(tiny_bert, tiny_gpt2, tmp_path_factory):
    """Hidden-128 BERT, GPT-2 and Llama directories, tokenizers borrowed from the conftest models."""
    root = tmp_path_factory.mktemp("q128")
    torch.manual_seed(0)
    vocab_bert = len(AutoTokenizer.from_pretrained(tiny_bert))
    BertModel(BertConfig(vocab_size=vocab_bert, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                         intermediate_size=2 * HIDDEN, max_position_embeddings=64, pad_token_id=0)).save_pretrained(root / "bert")
    _copy_tokenizer(tiny_bert, root / "bert")
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=HIDDEN, n_layer=LAYERS, n_head=4,
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(root / "gpt2")
    _copy_tokenizer(tiny_gpt2, root / "gpt2")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=2 * HIDDEN, max_position_embeddings=64,
                                 eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)).save_pretrained(root / "llama")
    _copy_tokenizer(tiny_gpt2, root / "llama")
    return {k: root / k for k in ("bert", "gpt2", "llama")}


@pytest.fixture(params=["bert", "gpt2", "llama"])
def arch(request, models_128):
    return request.param, models_128[request.param]


def _cfg(path, **method):
    return config.validate({"model": {"path": str(path)}, "data": {"train": "x.jsonl"},
                            "method": {"name": "qlora", "r": 4, **method}, "train": {"lr": 1e-3}})


def _plain(path):
    cfg = _cfg(path)
    torch.manual_seed(0)  # the head is freshly initialised on every load
    model, tok = task.build_model(cfg.model, INFO)
    return cfg, model.eval(), tok


def _batch(tok, n=8, seed=0):
    return task.collate(task.encode(make_rows(n, seed=seed), tok, INFO, 32)[0], tok.pad_token_id)


def _logits(model, batch):
    with torch.no_grad():
        return task.forward(model, batch)


def _applied(path, **method):
    cfg, model, tok = _plain(path)
    cfg = _cfg(path, **method)
    head = models.head_modules(model)
    return cfg, qlora.apply(model, cfg.method, head).eval(), tok, head


def _perturb(model, head, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and not any(n.startswith(h + ".") for h in head):
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _nf4_layers(model):
    return {p: m for p, m in model.named_modules() if isinstance(m, qlora.NF4Linear)}


# -- the quantized base ----------------------------------------------------------------

def test_quantized_base_is_close_to_fp32(arch, capsys):
    kind, path = arch
    _, base, tok = _plain(path)
    batch = _batch(tok)
    expected = _logits(base, batch)
    fp32 = {p: m.weight.detach().clone() for p, m in base.named_modules() if targets.is_linear(m)}
    _, model, _, _ = _applied(path)
    layers = _nf4_layers(model)
    assert layers, "nothing was quantized"
    for p, m in layers.items():
        w = fp32[p.removesuffix(".base_layer")]
        w = w.T if m.fan_in_fan_out else w
        rel = (m.dequantized_weight() - w).norm() / w.norm()
        assert 0 < rel < WEIGHT_RELATIVE_BOUND, f"{p}: relative weight error {rel:.4f}"
    with methods.adapters_disabled(model):
        got = _logits(model, batch)
    err = (got - expected).abs().max() / expected.abs().max()
    print(f"{kind}: quantized-base logits error {err:.2e} of max |logit|")
    assert 0 < err < BASE_RELATIVE_BOUND
    # The error is the quantization's alone: the fp32 model with the dequantized weights computes the same.
    with torch.no_grad():
        for p, m in layers.items():
            w = m.dequantized_weight()
            base.get_submodule(p.removesuffix(".base_layer")).weight.copy_(w.T if m.fan_in_fan_out else w)
    torch.testing.assert_close(got, _logits(base, batch), atol=tol(got, FORWARD_OPS_128), rtol=0)


def test_init_equals_the_quantized_base_exactly(arch):
    kind, path = arch
    cfg, reference, tok = _plain(path)
    head = models.head_modules(reference)
    qlora.quantize(reference.requires_grad_(False), {}, head)  # the same layers, no LoRA
    batch = _batch(tok)
    _, model, _, _ = _applied(path)
    assert set(_nf4_layers(reference)) == {p.removesuffix(".base_layer") for p in _nf4_layers(model)}
    expected = _logits(reference, batch)
    assert torch.equal(_logits(model, batch), expected)  # B = 0
    _perturb(model, head)
    assert not torch.allclose(_logits(model, batch), expected)
    with methods.adapters_disabled(model):
        assert torch.equal(_logits(model, batch), expected)  # disabling gives the quantized base


def test_which_layers_are_quantized(models_128, capsys):
    _, model, _, head = _applied(models_128["llama"])
    line = capsys.readouterr().out
    body = [p for p, m in model.named_modules() if (targets.is_linear(m) or isinstance(m, qlora.NF4Linear))
            and ".lora_" not in p and not targets.inside(p, head)]
    quantized = set(_nf4_layers(model))
    # every body linear, k_proj / v_proj (128 x 64 = 8192 weights, 128 blocks) with their scales in blocks of 128
    assert len(quantized) == LAYERS * 7 and set(body) == quantized
    assert {m.weight.scaler_block_size for p, m in _nf4_layers(model).items()
            if ".k_proj" in p or ".v_proj" in p} == {128}
    assert {m.weight.scaler_block_size for p, m in _nf4_layers(model).items() if ".q_proj" in p} == {256}
    assert "quantized 14 linear layers" in line and "full precision" not in line
    assert not any(isinstance(m, qlora.NF4Linear) for m in model.score.modules())

    _, model, _, _ = _applied(models_128["llama"], quantize="targets")  # default targets: q_proj, v_proj
    assert set(_nf4_layers(model)) == {f"model.layers.{i}.self_attn.{n}.base_layer" for i in range(LAYERS)
                                       for n in ("q_proj", "v_proj")}
    assert qlora.memory_report(model)["unquantized_layers"] == []


def test_memory_report(models_128, capsys):
    _, model, _, _ = _applied(models_128["bert"])
    line = capsys.readouterr().out.strip()
    report = qlora.memory_report(model)
    n = LAYERS * (4 * HIDDEN * HIDDEN + 2 * 2 * HIDDEN * HIDDEN)  # q, k, v, attn-out + up, down
    assert report["quantized_layers"] == LAYERS * 6 and report["original_bytes"] == 4 * n
    # 4 bits per weight + one int8 scale per 64 weights + one float32 factor per 256 scales (+ a mean and the LUT)
    assert report["quantized_bytes"] == n // 2 + n // 64 + 4 * (n // 64 // 256) + LAYERS * 6 * (4 + 16 * 4)
    assert report["ratio"] > 7  # float32 -> ~4.13 bits; > 3x is the bar, and a bf16 base gives ~3.9x
    assert line == (f"qlora: quantized 12 linear layers to NF4 (torchao, block 64, double-quant), "
                    f"{report['original_bytes'] / 1e6:.2f} MB -> {report['quantized_bytes'] / 1e6:.2f} MB "
                    f"({report['ratio']:.1f}x smaller)")


def test_bf16_base(models_128):
    cfg, model, tok = _plain(models_128["bert"])
    batch = _batch(tok)
    model = qlora.apply(model.to(torch.bfloat16), cfg.method, models.head_modules(model))
    report = qlora.memory_report(model)
    assert report["ratio"] > 3.5
    layer = model.bert.encoder.layer[0].attention.self.query
    assert layer.lora_A.weight.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    assert _logits(model, batch).dtype == torch.bfloat16


# -- training, saving, loading --------------------------------------------------------

def test_only_lora_and_head_get_gradients_and_change(arch):
    _, path = arch
    cfg, model, tok, head = _applied(path)
    nf4 = {p: m.weight.quantized_data.clone() for p, m in _nf4_layers(model).items()}
    nf4_weights = {f"{p}.weight" for p in nf4}  # compared through their packed data above
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n not in nf4_weights}
    opt, _, _ = optim.build(model, head, cfg.train, 10)
    model.train()
    (task.loss(model, _batch(tok), {}) / 8).backward()
    opt.step()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n or targets.inside(n, head) for n in trainable)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{n} got no gradient"
        else:
            assert p.grad is None
            if n in before:
                assert torch.equal(before[n], p.detach()), f"frozen {n} changed"
    assert all(torch.equal(nf4[p], m.weight.quantized_data) for p, m in _nf4_layers(model).items())
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad
               and ".lora_B." in n)


def test_save_then_load_reproduces_outputs(arch, tmp_path):
    _, path = arch
    cfg, model, tok, head = _applied(path)
    _perturb(model, head)
    batch = _batch(tok)
    expected = _logits(model, batch)
    qlora.save(model, tmp_path, str(path), head)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert json.loads((tmp_path / qlora.SETTINGS_NAME).read_text())["quantize"] == "all-linear"
    _, fresh, _ = _plain(path)
    fresh = qlora.load(fresh, tmp_path).eval()
    assert set(_nf4_layers(fresh)) == set(_nf4_layers(model))
    torch.testing.assert_close(_logits(fresh, batch), expected, atol=tol(expected, FORWARD_OPS_128), rtol=0)


def test_saved_settings_are_used_at_load(models_128, tmp_path):
    path = models_128["bert"]
    _, model, _, head = _applied(path, quantize="targets", target_modules=["query"])
    qlora.save(model, tmp_path, str(path), head)
    _, fresh, _ = _plain(path)
    assert set(_nf4_layers(qlora.load(fresh, tmp_path))) == set(_nf4_layers(model)) == {
        f"bert.encoder.layer.{i}.attention.self.query.base_layer" for i in range(LAYERS)}


def test_peft_loads_the_adapter_onto_a_full_precision_base(arch, tmp_path):
    peft = pytest.importorskip("peft")
    kind, path = arch
    cfg, model, tok, head = _applied(path)
    _perturb(model, head)
    batch = _batch(tok)
    ours = _logits(model, batch)
    qlora.save(model, tmp_path, str(path), head)
    _, base, _ = _plain(path)
    theirs = _logits(peft.PeftModel.from_pretrained(base, tmp_path).eval(), batch)
    _, base, _ = _plain(path)
    full_precision = _logits(lora.load(base, tmp_path).eval(), batch)  # the same adapter, unquantized base
    torch.testing.assert_close(theirs, full_precision, atol=tol(full_precision, FORWARD_OPS_128), rtol=0)
    err = (theirs - ours).abs().max() / theirs.abs().max()
    print(f"{kind}: peft on the fp32 base vs qlora: {err:.2e} of max |logit|")
    assert 0 < err < BASE_RELATIVE_BOUND  # the quantization error, nothing more


def test_merge_is_close_to_unmerged_and_plain(arch):
    kind, path = arch
    cfg, model, tok, head = _applied(path)
    _perturb(model, head)
    batch = _batch(tok)
    expected = _logits(model, batch)
    merged = qlora.merge(model)
    assert not any(isinstance(m, (qlora.NF4Linear, lora.LoRALinear)) for m in merged.modules())
    assert all(type(p.data) is torch.Tensor and p.dtype == torch.float32 for p in merged.parameters())
    got = _logits(merged, batch)
    print(f"{kind}: merged vs unmerged max |diff| {(got - expected).abs().max():.2e}")
    torch.testing.assert_close(got, expected, atol=tol(expected, FORWARD_OPS_128), rtol=0)


# -- small models and errors ----------------------------------------------------------

def test_small_layers(tiny_bert, tmp_path, capsys):
    """Hidden 32 (1024 and 2048-weight layers, 16 and 32 blocks of 64): quantized, scales in blocks of 16 and 32.
    Hidden 36 (1296 weights,
    not a multiple of 64): left in full precision, and the report says why."""
    cfg, model, tok = _plain(tiny_bert)
    model = qlora.apply(model, cfg.method, models.head_modules(model))
    assert "quantized 12 linear layers" in capsys.readouterr().out
    assert {m.weight.scaler_block_size for m in _nf4_layers(model).values()} == {16, 32}
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=36, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=72, max_position_embeddings=64)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg, model, tok = _plain(tmp_path)
    batch = _batch(tok)
    expected = _logits(model, batch)
    model = qlora.apply(model, cfg.method, models.head_modules(model))
    assert "quantized 0 linear layers" in (line := capsys.readouterr().out)
    assert "6 left in full precision (torchao needs a multiple of 64 weights)" in line
    assert not _nf4_layers(model) and len(qlora.memory_report(model)["unquantized_layers"]) == 6
    assert torch.equal(_logits(model, batch), expected)


def test_missing_torchao_is_a_clear_error(models_128, monkeypatch):
    for name in [n for n in sys.modules if n == "torchao" or n.startswith("torchao.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    cfg, model, _ = _plain(models_128["bert"])
    with pytest.raises(TunelabError, match=r"pip install torchao"):
        qlora.apply(model, cfg.method, models.head_modules(model))
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())  # nothing was changed


def test_bitsandbytes_errors(models_128, monkeypatch):
    cfg, model, _ = _plain(models_128["bert"])
    head = models.head_modules(model)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(TunelabError, match=r"pip install bitsandbytes"):
        qlora.apply(model, _cfg(models_128["bert"], backend="bitsandbytes").method, head)
    with pytest.raises(TunelabError, match=r"double_quant=false.*torchao"):
        qlora.apply(model, _cfg(models_128["bert"], double_quant=False).method, head)


def test_config():
    with pytest.raises(TunelabError, match=r"method.backend"):
        _cfg("m", backend="cuda")
    with pytest.raises(TunelabError, match=r"did you mean 'method.double_quant'"):
        _cfg("m", double_quantize=True)
    m = _cfg("m").method
    assert (m.double_quant, m.backend, m.quantize, m.r) == (True, "auto", "all-linear", 4)


def test_pipeline_train_then_predict(models_128, tmp_path, capsys):
    import tunelab

    train = write_jsonl(tmp_path / "train.jsonl", make_rows(48, seed=0))
    run = tunelab.train(None, [f"model.path={models_128['bert']}", f"data.train={train}", "method.name=qlora",
                               "train.max_steps=3", "train.batch_size=8", "eval.linear_probe=false",
                               f"output_dir={tmp_path / 'run'}"])
    assert "qlora: quantized 12 linear layers" in capsys.readouterr().out
    assert (run.dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run.dir / "adapter" / qlora.SETTINGS_NAME).is_file()
    tuned = tunelab.load(run.dir)
    assert _nf4_layers(tuned.model)
    preds = tuned.predict(["a great and fun film", "awful boring plot"])
    assert len(preds) == 2 and all(p["label"] in ("neg", "pos") for p in preds)


def test_lora_options_pass_through(models_128):
    """QLoraConfig is a LoraConfig: LoRA's options reach lora.apply; PiSSA is refused (it rewrites the base)."""
    if "init" not in config.QLoraConfig.model_fields:
        pytest.skip("this LoraConfig has no init option")
    cfg, model, _ = _plain(models_128["bert"])
    with pytest.raises(TunelabError, match="pissa cannot be combined with qlora"):
        qlora.apply(model, _cfg(models_128["bert"], init="pissa").method, models.head_modules(model))
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())


def test_trained_biases_stay_on_quantized_layers(models_128, tmp_path):
    """LoRA's bias=all: the 4-bit layers keep their bias Parameter, which trains, saves and loads."""
    if "bias" not in config.QLoraConfig.model_fields:
        pytest.skip("this LoraConfig has no bias option")
    path = models_128["bert"]
    _, model, tok, head = _applied(path, bias="all")
    layer = model.bert.encoder.layer[0].output.dense
    assert isinstance(layer, qlora.NF4Linear) and layer.bias.requires_grad and len(_nf4_layers(model)) == 12
    batch = _batch(tok)
    task.loss(model, batch, {}).backward()
    assert layer.bias.grad is not None and layer.weight.grad is None
    _perturb(model, head)
    expected = _logits(model, batch)
    qlora.save(model, tmp_path, str(path), head)
    _, fresh, _ = _plain(path)
    torch.testing.assert_close(_logits(qlora.load(fresh, tmp_path).eval(), batch), expected,
                               atol=tol(expected, FORWARD_OPS_128), rtol=0)
