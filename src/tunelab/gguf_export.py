"""Write a causal language model (the run's method already merged) as one GGUF file that llama.cpp and Ollama run.

What llama.cpp reads, and so what is written (names and layout as llama.cpp's own convert_hf_to_gguf.py writes them):

- tensors under llama.cpp's names (`token_embd`, `blk.N.attn_q`, ...). For the `llama` architecture the query and
  key rows are reordered: Hugging Face rotates the two halves of each head, llama.cpp rotates interleaved pairs.
  Norms and biases stay float32; the matrices are f32, f16 or q8_0 (a matrix whose rows do not split into q8_0's
  32-value blocks falls back to f16, and the report says how many did);
- the model's shape (`<arch>.context_length`, `.embedding_length`, heads, rope base, norm epsilon, ...);
- the tokenizer: every token with its type (normal, control, user-defined, unused padding), the BPE merges, the
  special ids (BOS, EOS, PAD, UNK), whether BOS / EOS are added, and the pre-tokenizer's name
  (gguf_pretokenizers);
- the chat template the run was trained with (`tokenizer.chat_template`): the tokenizer's own for task.template
  chat, tunelab's alpaca template as Jinja for alpaca;
- `general.*`: name, base model (Hub id and address where known), licence where the base model's card gives one,
  file type.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from . import gguf_pretokenizers
from .errors import TunelabError

# Hugging Face class -> llama.cpp architecture. Mistral's layout is Llama's (llama.cpp converts it as `llama`).
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
FAMILIES = "Llama (Llama 2/3, SmolLM, TinyLlama ...), Mistral-style and Qwen2"
QUANTS = ("f32", "f16", "q8_0")

TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
       "lm_head.weight": "output.weight"}
LAYER = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
         "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
         "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
         "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
         "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.bias": "attn_output.bias",
         "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
         "mlp.down_proj.weight": "ffn_down.weight"}
LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")


def architecture(model) -> str:
    names = list(getattr(model.config, "architectures", None) or []) or [type(model).__name__]
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise TunelabError(
        f"--format gguf writes the {FAMILIES} families; this run's model is {', '.join(names)} "
        f"(model_type '{getattr(model.config, 'model_type', '?')}'). Export it with --merge instead: the merged "
        f"folder is a plain transformers model that llama.cpp's own convert_hf_to_gguf.py converts where llama.cpp "
        f"supports the architecture.")


def check_config(cfg, arch: str) -> None:
    """Refuse what llama.cpp's `llama` / `qwen2` code would silently compute differently."""
    rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear"):
        raise TunelabError(
            f"--format gguf: the model uses rope scaling '{kind}', which tunelab's GGUF writer does not write yet (it "
            f"writes plain and linear rope). Export with --merge and convert the folder with llama.cpp's "
            f"convert_hf_to_gguf.py.")
    if getattr(cfg, "mlp_bias", False):
        raise TunelabError("--format gguf: this model has biases in its MLP layers, which llama.cpp's llama "
                           "architecture does not read. Export with --merge instead.")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise TunelabError(f"--format gguf: llama.cpp's {arch} architecture computes SiLU in the MLP, and this model "
                           f"uses '{cfg.hidden_act}'. Export with --merge instead.")


def rope_theta(cfg) -> float:
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    return float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def write_shape(writer, cfg, arch: str) -> None:
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    writer.add_rope_freq_base(rope_theta(cfg))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    dim = head_dim(cfg)
    writer.add_rope_dimension_count(dim)
    if dim != cfg.hidden_size // cfg.num_attention_heads:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type")) == "linear":
        from gguf import RopeScalingType

        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def interleave(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's rotary halves -> llama.cpp's interleaved pairs, per head (rows of q or k, weight or bias)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model, arch: str):
    """(llama.cpp name, float32 tensor) of every weight the file holds, in the model's order."""
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue  # llama.cpp uses token_embd where output is absent
        if name in TOP:
            target = TOP[name]
        elif (m := LAYER_NAME.fullmatch(name)) and m.group(2) in LAYER:
            target = f"blk.{m.group(1)}.{LAYER[m.group(2)]}"
        elif name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from the rope base
        else:
            raise TunelabError(f"--format gguf: the merged model has a weight '{name}' that llama.cpp's {arch} "
                               f"architecture has no place for. Export with --merge instead.")
        tensor = tensor.detach().to(torch.float32).cpu()
        if arch == "llama" and target.startswith("blk.") and ".attn_q." in target:
            tensor = interleave(tensor, heads)
        elif arch == "llama" and target.startswith("blk.") and ".attn_k." in target:
            tensor = interleave(tensor, kv_heads)
        yield target, tensor


def encode(tensor: torch.Tensor, quant: str):
    """(array, raw dtype or None) to hand GGUFWriter.add_tensor; 1-D tensors (norms, biases) stay float32."""
    from gguf import GGMLQuantizationType, quants

    data = tensor.numpy()
    if data.ndim < 2 or quant == "f32":
        return data.astype(np.float32), None
    if quant == "q8_0" and data.shape[-1] % 32 == 0:
        return quants.quantize(data, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None


# -- the tokenizer ---------------------------------------------------------------------------------------------------

def pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: its converter's hash table first, then a plain GPT-2
    byte-level split recognised from tokenizer.json (what a tokenizer trained with tokenizers' ByteLevelBPE has)."""
    digest = hashlib.sha256(str(tokenizer.encode(gguf_pretokenizers.CHECK_TEXT)).encode()).hexdigest()
    if digest in gguf_pretokenizers.BY_HASH:
        return gguf_pretokenizers.BY_HASH[digest]
    state = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    if state.get("type") == "ByteLevel" and state.get("use_regex", True) and not state.get("add_prefix_space"):
        return "gpt-2"
    raise TunelabError(
        f"--format gguf: llama.cpp does not know this tokenizer's pre-tokenizer (the text split before BPE; its check "
        f"hash {digest[:12]}... is none of the {len(gguf_pretokenizers.BY_HASH)} llama.cpp recognises, and it is "
        f"not GPT-2's plain byte-level split), so llama.cpp would split prompts differently from training. Export "
        f"with --merge and convert with a llama.cpp release that knows this tokenizer.")


def vocab(tokenizer, size: int) -> tuple[list[str], list[int]]:
    """Every id below the model's vocab size: its token and llama.cpp token type (ids past the tokenizer are padding)."""
    from gguf import TokenType

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if (backend.get("model") or {}).get("type") != "BPE" or (backend.get("decoder") or {}).get("type") != "ByteLevel":
        raise TunelabError(
            "--format gguf writes byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama 3, Qwen2); this model's "
            f"tokenizer is a {(backend.get('model') or {}).get('type', '?')} model with a "
            f"{(backend.get('decoder') or {}).get('type', 'no')} decoder (SentencePiece-style, as Llama 2 and "
            f"Mistral 7B v0.1 have). Export with --merge and convert the folder with llama.cpp's convert_hf_to_gguf.py.")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    if max(by_id) >= size:
        raise TunelabError(f"--format gguf: the tokenizer has token ids up to {max(by_id)}, beyond the model's "
                           f"vocab_size {size}. The run's tokenizer and model do not match; this is a tunelab bug.")
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    return tokens, types


def write_tokenizer(writer, tokenizer, size: int, chat_template: str | None) -> dict:
    """The tokenizer's keys; returns what was written about it (for the export's description)."""
    from gguf import SpecialVocab

    pre = pre_tokenizer(tokenizer)
    tokens, types = vocab(tokenizer, size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory(prefix="tunelab-gguf-tokenizer-") as folder:
        # SpecialVocab reads the merges, special ids and add_bos/add_eos from saved tokenizer files, as llama.cpp's
        # converter does
        tokenizer.save_pretrained(folder)
        special = SpecialVocab(folder, load_merges=True, n_vocab=size)
    special.chat_template = chat_template
    # What the Hugging Face tokenizer does, not what its config files say (often nothing): llama.cpp's default for a
    # missing key depends on its pre-tokenizer, and a BOS that training never saw changes every reply.
    ids = tokenizer("a")["input_ids"]
    special.add_special_token["bos"] = tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]
    special.add_special_token["eos"] = tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id]
    special.add_to_gguf(writer, quiet=True)
    if not special.merges:
        raise TunelabError("--format gguf: the tokenizer's BPE merges could not be read from its tokenizer.json, and "
                           "llama.cpp cannot tokenize without them. This is a tunelab bug; please report it.")
    return {"pre_tokenizer": pre, "tokens": size, "merges": len(special.merges),
            "special_ids": {k: v for k, v in special.special_token_ids.items()},
            "add_bos": special.add_special_token["bos"], "chat_template": chat_template is not None}


# -- the file --------------------------------------------------------------------------------------------------------

def write(model, tokenizer, path: Path, quant: str, *, name: str, chat_template: str | None,
          base_model: str | None = None, licence: str | None = None) -> dict:
    """Write `model` (a plain, merged causal LM) and its tokenizer to the GGUF file `path`; returns a description
    (architecture, tensor counts by type, tokenizer facts, bytes)."""
    from gguf import GGML_QUANT_VERSION, GGUFWriter, LlamaFileType

    if quant not in QUANTS:
        raise TunelabError(f"--quant must be one of {', '.join(QUANTS)}, not '{quant}'.")
    arch = architecture(model)
    check_config(model.config, arch)
    writer = GGUFWriter(str(path), arch)
    writer.add_type("model")
    writer.add_name(name)
    if base_model:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base_model)
        writer.add_base_model_repo_url(0, f"https://huggingface.co/{base_model}")
    if licence:
        writer.add_license(licence)
    writer.add_file_type({"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                          "q8_0": LlamaFileType.MOSTLY_Q8_0}[quant])
    if quant == "q8_0":
        writer.add_quantization_version(GGML_QUANT_VERSION)
    write_shape(writer, model.config, arch)
    described = {"architecture": arch, "quant": quant,
                 "tokenizer": write_tokenizer(writer, tokenizer, model.config.vocab_size, chat_template)}
    kinds: dict[str, int] = {}
    for target, tensor in gguf_tensors(model, arch):
        data, raw = encode(tensor, quant)
        writer.add_tensor(target, data, raw_dtype=raw)
        kind = raw.name if raw is not None else str(data.dtype)
        kinds[kind] = kinds.get(kind, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {**described, "tensors": kinds, "bytes": path.stat().st_size}
