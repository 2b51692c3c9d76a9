"""Load a local Hugging Face model + tokenizer, and find its parts.

The part-finding helpers (head, transformer blocks, embeddings) are shared by
every method that needs to know the anatomy of a model (freeze, LoRA, and
later layer-wise learning rates), so no method hard-codes an architecture.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from torch import nn

from .config import ModelConfig
from .errors import TunelabError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# A plan for the model being loaded (see `building`): given its skeleton, {module path: convert}.
Plan = Callable[[nn.Module], "dict[str, Callable[[nn.Module], nn.Module]]"]
_PLAN: ContextVar[Plan | None] = ContextVar("tunelab_load_plan", default=None)


def is_run_dir(path: str | Path) -> bool:
    """A finished tunelab run (config.yaml + labels.json) rather than a Hugging Face model directory."""
    p = Path(path).expanduser()
    return (p / "config.yaml").is_file() and (p / "labels.json").is_file() and not (p / "config.json").is_file()


def check_model_dir(path: str | Path, key: str = "model.path") -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise TunelabError(
            f"Model directory '{path}' ({key}) does not exist (looked at {p.resolve()}). Point {key} at a local "
            f"Hugging Face model directory holding config.json, the weights and the tokenizer files, or at a Hugging "
            f"Face Hub id (org/name)."
        )
    if not p.is_dir() or not (p / "config.json").is_file():
        raise TunelabError(
            f"'{path}' ({key}) is not a Hugging Face model directory: it has no config.json. Point {key} at the folder "
            f"that holds config.json, model.safetensors (or pytorch_model.bin) and the tokenizer files."
        )
    try:
        model_config = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise TunelabError(f"'{p / 'config.json'}' ({key}) is not valid JSON ({e}); the model directory looks damaged — re-export or re-copy it.") from None
    if not isinstance(model_config, dict):
        # transformers would fail on it later with a TypeError about keyword arguments, blamed on the tokenizer
        raise TunelabError(f"'{p / 'config.json'}' ({key}) holds a JSON {type(model_config).__name__}, not the JSON "
                           f"object of a model config; the model directory looks damaged — re-export or re-copy it.")
    if not any((p / f).is_file() for f in WEIGHT_FILES):
        raise TunelabError(
            f"Model directory '{path}' ({key}) has a config.json but no weights ({', '.join(WEIGHT_FILES)}). "
            f"Copy the weight files next to config.json, or point {key} at the complete model directory."
        )
    return p


def device_of(cfg: ModelConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(cfg.device)
    except RuntimeError:
        raise TunelabError(f"model.device='{cfg.device}' is not a device name. Use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TunelabError(f"model.device='{cfg.device}' but this machine has no CUDA GPU visible to PyTorch. Use model.device=cpu (or auto).")
    return device


def max_input_length(model, tokenizer, requested: int, reserved: int = 0) -> int:
    """The longest input the model can take: positions beyond its embedding table would crash mid-run.

    `reserved` positions are taken by a method's virtual tokens (prompt, P-tuning, prefix)."""
    limits = [getattr(model.config, "max_position_embeddings", None)]
    if tokenizer.model_max_length < 1_000_000:  # tokenizers without a limit report ~1e30
        limits.append(tokenizer.model_max_length)
    room = min(x for x in limits if x) - reserved
    if room < 1:
        raise TunelabError(
            f"method.num_virtual_tokens={reserved} leaves no room for the text: the model takes {room + reserved} positions. "
            f"Use fewer virtual tokens."
        )
    return min(requested, room)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        code = [] if trust_remote_code else custom_code(path)
        if code:
            raise TunelabError(
                f"Could not load the tokenizer of '{path}' without running the Python code it names "
                f"({', '.join(code[:3])}), and tunelab runs no code from a model folder unless you say so. For code you "
                f"trust, set model.trust_remote_code=true in the recipe (pass --trust-remote-code to load a finished "
                f"run).") from None
        raise TunelabError(
            f"Could not load a tokenizer from '{path}' ({type(e).__name__}: {str(e).splitlines()[0]}). The model directory needs "
            f"its tokenizer files (tokenizer.json, or vocab.txt / vocab.json + merges.txt, and tokenizer_config.json)."
        ) from None
    if not set(tok.get_vocab()) - set(tok.all_special_tokens):
        # transformers builds a tokenizer of special tokens alone when the vocabulary files are missing: every word
        # would become the unknown token, and training would run on nothing.
        raise TunelabError(
            f"The tokenizer in '{path}' has no vocabulary besides its special tokens: the vocabulary files are missing "
            f"(tokenizer.json, or vocab.txt / vocab.json + merges.txt / tokenizer.model). Copy the tokenizer files "
            f"from the model you downloaded into that directory."
        )
    if tok.pad_token is None:
        # Decoder-only models ship without a pad token; padding positions are masked, so reusing EOS is safe.
        if tok.eos_token is None:
            raise TunelabError(f"The tokenizer in '{path}' has neither a pad nor an EOS token, so batches cannot be padded. Add a pad token to its tokenizer_config.json.")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


# model.*_dropout -> the config attributes that mean it, across architectures (BERT, GPT-2, Llama, DistilBERT, ...)
DROPOUT_NAMES = {
    "hidden_dropout": ("hidden_dropout_prob", "resid_pdrop", "embd_pdrop", "hidden_dropout", "dropout"),
    "attention_dropout": ("attention_probs_dropout_prob", "attn_pdrop", "attention_dropout"),
    "classifier_dropout": ("classifier_dropout", "summary_first_dropout", "seq_classif_dropout"),
}


def dropout_overrides(cfg: ModelConfig, path: str | Path) -> dict:
    """from_pretrained keyword arguments for the model.*_dropout keys, named as this model's config names them."""
    wanted = {k: getattr(cfg, k) for k in DROPOUT_NAMES if getattr(cfg, k, None) is not None}
    if not wanted:
        return {}
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code)
    out = {}
    for key, value in wanted.items():
        names = [n for n in DROPOUT_NAMES[key] if hasattr(config, n)]
        if not names and key != "classifier_dropout":  # BERT's classifier_dropout may be absent: None means hidden
            raise TunelabError(f"model.{key}={value}: the config of '{path}' ({type(config).__name__}) has none of "
                               f"{', '.join(DROPOUT_NAMES[key])}; remove model.{key} for this model.")
        out.update(dict.fromkeys(names or ["classifier_dropout"], value))
    return out


def load(cfg: ModelConfig, auto_class, path: str | Path | None = None, **model_kwargs):
    """Load model + tokenizer with `auto_class` (e.g. AutoModelForSequenceClassification) from a Hugging Face model
    directory. (A finished run as model.path is turned into one by the run layer first: predict.model_source.)"""
    return _load(cfg, auto_class, check_model_dir(path or cfg.path), **model_kwargs)


def custom_code(path: str | Path) -> list[str]:
    """The code a model folder asks transformers to import (`auto_map` in config.json or tokenizer_config.json),
    e.g. ['configuration_x.XConfig']; transformers runs it only with trust_remote_code."""
    found: set[str] = set()
    for name in ("config.json", "tokenizer_config.json"):
        try:
            data = json.loads((Path(path) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            continue
        auto = data.get("auto_map") if isinstance(data, dict) else None
        for ref in (auto.values() if isinstance(auto, dict) else []):
            found.update(r for r in (ref if isinstance(ref, list) else [ref]) if isinstance(r, str))
    return sorted(found)


def refuse_pickle(path: Path, allowed: bool) -> None:
    """Weights only as safetensors: a pickle file (.bin, .pt, .pth) runs whatever code it holds when loaded."""
    if allowed or any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt") and p.is_file())
    if pickles:
        raise TunelabError(
            f"'{path}' (model.path) has its weights only as pickle files ({', '.join(pickles[:3])}), which can run "
            f"arbitrary code when loaded, so tunelab does not load them. Convert them to safetensors once (load the "
            f"model with transformers and save_pretrained it, which writes model.safetensors), or, for a file you "
            f"trust, pass --allow-pickle (model.allow_pickle=true in a recipe; allow_pickle=True for tunelab.load).")


def _load(cfg: ModelConfig, auto_class, path: Path, **model_kwargs):
    refuse_pickle(path, cfg.allow_pickle)
    model_kwargs = {**dropout_overrides(cfg, path), **model_kwargs}
    tok = load_tokenizer(path, cfg.trust_remote_code)
    # Head weights absent from a base checkpoint are expected; keep transformers' load report quiet.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    plan = _PLAN.get()
    try:
        model = _streamed(cfg, auto_class, path, plan, model_kwargs) if plan is not None else None
        if model is None:
            model = auto_class.from_pretrained(
                str(path), dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code,
                use_safetensors=None if cfg.allow_pickle else True, **model_kwargs
            )
    except ValueError as e:
        raise TunelabError(
            f"'{path}' ({'model.path'}) cannot be loaded as {auto_class.__name__}: {str(e).splitlines()[0]} "
            f"Use a model whose architecture transformers supports for this task, or, for custom code you trust, set "
            f"model.trust_remote_code=true in the recipe (pass --trust-remote-code to load a finished run)."
        ) from None
    except (SafetensorError, pickle.UnpicklingError, EOFError, OSError, RuntimeError) as e:
        mismatch = "mismatched_sizes" in str(e) or "size mismatch" in str(e)
        # Other RuntimeErrors (out of memory, a bug) are not the model directory's fault: let them surface as they are.
        if isinstance(e, RuntimeError) and not (mismatch or "PytorchStreamReader" in str(e)):
            raise
        if mismatch:
            why = ("its weights do not have the shapes config.json describes (hidden_size, vocab_size, ...): the two "
                   "come from different models. Put the config.json that came with these weights back")
        else:
            weights = next((f for f in WEIGHT_FILES if (path / f).is_file()), "its weights file")
            detail = (str(e).splitlines() or [""])[0].split(". ")[0][:200]  # torch goes on about weights_only
            why = (f"{weights} is damaged or incomplete ({type(e).__name__}: {detail}). "
                   f"Copy or download the model again")
        raise TunelabError(f"'{path}' (model.path) could not be loaded: {why}, or point model.path at a complete model "
                           f"directory.") from None
    check_vocabulary(model, tok, path)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


# -- loading tensor by tensor ---------------------------------------------------

@contextmanager
def building(plan: Plan | None):
    """Models loaded inside (`load`, so every task's build_model) are read tensor by tensor when `plan` is given:
    `plan(skeleton)` sees the model with its parameters on the meta device and names the modules to convert; each
    is handed to its convert function (e.g. a 4-bit quantizer) as soon as its own parameters are read, and replaced
    by what it returns, so the full-precision weights of those modules are never all in memory at once. A model
    this reader cannot take as from_pretrained would (pickle weights, custom code, renamed keys, weights missing
    outside the head) is loaded by from_pretrained, unconverted. None: from_pretrained, as outside."""
    token = _PLAN.set(plan)
    try:
        yield
    finally:
        _PLAN.reset(token)


@contextmanager
def _parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory) and their buffers for real, so
    buffers computed at construction (rotary inv_freq, position ids) hold their values (accelerate's
    init_empty_weights(include_buffers=False))."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            kind = type(module._parameters[name])
            module._parameters[name] = kind(param.to("meta"), **({"requires_grad": param.requires_grad}
                                                                 if kind is nn.Parameter else {}))
    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _shards(path: Path) -> list[Path] | None:
    """The safetensors files of a model directory, or None when its weights are not (all) safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return [path / f for f in sorted(set(weight_map.values()))]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None  # from_pretrained says what is wrong with it
    return [path / "model.safetensors"] if (path / "model.safetensors").is_file() else None


# safetensors' dtype names (its format spec) -> torch's
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _tensors(file: Path, keys: set[str], mapped: frozenset[str] = frozenset()):
    """(key, tensor) for `keys` of a safetensors file, in file order, each read into memory of its own with plain
    reads: safetensors' own reader maps the file, and every page of it read stays in the process's resident memory
    until the file is closed, so reading a whole checkpoint through it holds the whole checkpoint resident.
    The keys in `mapped` (input embeddings) are mapped instead, copy-on-write (see `_mapped`)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as reader:  # checks the file (SafetensorError on a damaged one)
        wanted = keys & set(reader.keys())
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        for key, info in sorted(((k, v) for k, v in header.items() if k in wanted),
                                key=lambda kv: kv[1]["data_offsets"][0]):
            if info["dtype"] not in _ST_DTYPES:
                raise SafetensorError(f"tensor {key} has dtype {info['dtype']}, which tunelab cannot read")
            begin, end = info["data_offsets"]
            t = _mapped(file, 8 + size + begin, end - begin, _ST_DTYPES[info["dtype"]], info["shape"]) \
                if key in mapped else None
            if t is not None:
                yield key, t
                continue
            t = torch.empty(info["shape"], dtype=_ST_DTYPES[info["dtype"]])
            f.seek(8 + size + begin)
            if t.numel() and f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != end - begin:
                raise OSError(f"{file.name} ends inside tensor {key}")
            yield key, t


def _mapped(file: Path, offset: int, nbytes: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor | None:
    """A tensor over the file's own bytes, mapped privately (copy-on-write: a write changes the process's copy of
    that page, never the file): an embedding is read a row at a time, so only the rows the data uses become
    resident, as with from_pretrained's mapped load. None where it cannot be mapped (then it is read)."""
    element = torch.empty((), dtype=dtype).element_size()
    if nbytes == 0 or offset % element or nbytes != element * int(np.prod(shape)):
        return None
    try:
        raw = np.memmap(file, dtype=np.uint8, mode="c", offset=offset, shape=(nbytes,))
    except (OSError, ValueError):
        return None
    return torch.from_numpy(raw).view(dtype).view(shape)  # the array, and with it the mapping, lives as long as this


def _checkpoint_names(model: nn.Module, keys: list[str], owned: set[str]) -> dict[str, str]:
    """Checkpoint key -> the model's name for it, adding or dropping the body's prefix as from_pretrained does
    (a base model's checkpoint read into a model with a head, and the other way round); unknown keys are left out."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = {}
    for key in keys:
        names = [key] + ([f"{prefix}.{key}", key.removeprefix(prefix + ".")] if prefix else [])
        found = next((n for n in names if n in owned), None)
        if found is not None:
            out[key] = found
    return out


def _streamed(cfg: ModelConfig, auto_class, path: Path, plan: Plan, model_kwargs: dict):
    """The model read tensor by tensor into a skeleton, the modules `plan` names converted as soon as they are
    complete (see `building`); None where from_pretrained must load it. Errors are from_pretrained's kinds
    (SafetensorError, a "size mismatch" RuntimeError, ValueError), so _load words them the same way."""
    from safetensors import safe_open
    from transformers import AutoConfig, GenerationConfig

    files = _shards(path)
    if files is None or cfg.trust_remote_code or custom_code(path) or not all(f.is_file() for f in files):
        return None
    config, unused = AutoConfig.from_pretrained(str(path), return_unused_kwargs=True, **model_kwargs)
    if unused:
        return None
    with _parameters_on_meta():
        model = auto_class.from_config(config, dtype=DTYPES[cfg.dtype])
    state = model.state_dict(keep_vars=True)  # parameters (tied ones under every name) and persistent buffers
    keys = {}
    for f in files:
        with safe_open(str(f), framework="pt") as reader:
            keys.update(dict.fromkeys(reader.keys(), f))
    names = _checkpoint_names(model, list(keys), set(state))
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = set(state) - set(names.values()) - tied
    head = head_modules(model)
    if any(not _inside(m, head) for m in missing):  # weights under other names (legacy checkpoints): from_pretrained
        return None
    # holders of each tensor, by identity: tied parameters are one tensor under several names
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for module_path, module in model.named_modules(remove_duplicate=False):
        for name, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is not None:
                holders.setdefault(id(t), []).append((module, name))
    converts = plan(model)
    # input embeddings that stay as they are: mapped, not read (see `_mapped`)
    mapped = frozenset(key for key, name in names.items()
                       if isinstance(model.get_submodule(name.rpartition(".")[0]), nn.Embedding)
                       and name.rpartition(".")[0] not in converts)
    pending = {p: {n for n, t in model.get_submodule(p)._parameters.items() if t is not None} for p in converts}
    by_name = {f"{p}.{n}": p for p, left in pending.items() for n in left}
    for f in files:
        for key, value in _tensors(f, set(names), mapped):
            name = names[key]
            old = state[name]
            if value.shape != old.shape:
                raise RuntimeError(f"size mismatch for {name}: the checkpoint has {tuple(value.shape)}, the model "
                                   f"{tuple(old.shape)}")
            if value.is_floating_point():
                value = value.to(old.dtype)
            new = nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else value
            for module, attr in holders.get(id(old), []):
                (module._parameters if isinstance(old, nn.Parameter) else module._buffers)[attr] = new
            owner = by_name.get(name)
            if owner is not None:
                pending[owner].discard(name.rsplit(".", 1)[1])
                if not pending[owner]:
                    _replace(model, owner, converts[owner])
    _finish_loading(model, missing, converts, pending)
    model.eval()
    if model.can_generate() and (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    return model


def _inside(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _replace(model: nn.Module, path: str, convert) -> None:
    """`path` becomes what `convert` makes of it; the module it was lets go of its tensors at once (the reader still
    knows it, by the tensors it held), so its full-precision weight is freed before the next one is read."""
    parent, _, child = path.rpartition(".")
    module = model.get_submodule(path)
    setattr(model.get_submodule(parent), child, convert(module))
    module._parameters.clear()


def _finish_loading(model: nn.Module, missing: set[str], converts: dict, pending: dict) -> None:
    """Tie the tied weights, initialise what the checkpoint lacks (a new head) as from_pretrained does, and convert
    the planned modules whose weights were among it."""
    for name in missing:
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        t = getattr(module, attr)
        value = torch.empty_like(t, device="cpu")
        if isinstance(t, nn.Parameter):
            module._parameters[attr] = nn.Parameter(value, requires_grad=t.requires_grad)
        else:
            module._buffers[attr] = value
    loaded = set(model.state_dict(keep_vars=True)) - missing
    for name, t in model.state_dict(keep_vars=True).items():
        if name in loaded:
            t._is_hf_initialized = True  # transformers' mark: initialize_weights leaves these alone
    for module_path, module in model.named_modules():
        own = [f"{module_path}.{n}" if module_path else n for n, t in module._parameters.items() if t is not None]
        if own:  # from_config marked every module initialised (on meta); those owning a missing tensor are not
            module._is_hf_initialized = not missing.intersection(own)
    if missing:
        model.initialize_weights()
    model.tie_weights()
    for owner, left in pending.items():
        if left:  # its weights were missing and are initialised now
            _replace(model, owner, converts[owner])


def check_vocabulary(model, tok, path) -> None:
    """A tokenizer whose token ids run past the model's embedding table makes the first forward pass fail with an
    IndexError, in the middle of a run."""
    try:
        rows = model.get_input_embeddings().num_embeddings
    except (AttributeError, NotImplementedError):
        return
    # vocab_size counts the base vocabulary; tokens added on top are checked only where tunelab itself uses them
    highest = max([tok.vocab_size - 1] + [i for i in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) if i is not None])
    if highest >= rows:
        raise TunelabError(
            f"The tokenizer in '{path}' (model.path) does not belong to its model: it gives token ids up to {highest}, "
            f"but the model's embedding table has {rows} rows (vocab_size in config.json). Put the tokenizer files that "
            f"came with the model back in that directory."
        )


# -- anatomy ------------------------------------------------------------------

def body_of(model: nn.Module) -> tuple[str, nn.Module]:
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and hasattr(model, prefix):
        return prefix, getattr(model, prefix)
    return "", model


def head_modules(model: nn.Module) -> list[str]:
    """Names of the task-head modules: everything with parameters outside the body, plus the body's pooler.

    The pooler (BERT) feeds only the classification head, so it is trained with the head.
    """
    prefix, body = body_of(model)
    names = [n for n, m in model.named_children() if n != prefix and any(True for _ in m.parameters())]
    if prefix and isinstance(getattr(body, "pooler", None), nn.Module):
        names.insert(0, f"{prefix}.pooler")
    return names


def blocks(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """The stack of transformer blocks: the longest ModuleList in the body (encoder.layer, h, layers, ...)."""
    prefix, body = body_of(model)
    best_name, best = "", None
    for name, mod in body.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > (len(best) if best is not None else 0):
            best_name, best = name, mod
    if best is None:
        raise TunelabError(
            f"Could not find the transformer blocks of {type(model).__name__} (no ModuleList in its body), so "
            f"method.freeze_layers cannot be applied. Use method.name=full or lora for this model."
        )
    full = f"{prefix}.{best_name}" if prefix else best_name
    return full, list(best)


def parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """Split parameter names into embeddings (before the blocks), block_<i>, top (after the blocks) and head."""
    head = head_modules(model)
    block_prefix, stack = blocks(model)
    groups: dict[str, list[str]] = {"embeddings": [], "top": [], "head": []}
    groups.update({f"block_{i}": [] for i in range(len(stack))})
    seen_blocks = False
    for name, _ in model.named_parameters():
        if any(name == h or name.startswith(h + ".") for h in head):
            groups["head"].append(name)
        elif name.startswith(block_prefix + "."):
            seen_blocks = True
            groups[f"block_{int(name[len(block_prefix) + 1:].split('.')[0])}"].append(name)
        else:
            # Registration order puts embeddings before the blocks and final norms after them.
            groups["top" if seen_blocks else "embeddings"].append(name)
    return groups


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute block activations in backward. Non-reentrant checkpointing needs no input that requires grad,
    so it works with a frozen embedding (every adapter method) without peft's enable_input_require_grads hook."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise TunelabError(f"train.gradient_checkpointing: {type(model).__name__} does not support gradient "
                           f"checkpointing in transformers. Set train.gradient_checkpointing=false.")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 renamed it; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared weights are counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    trainable, total = count_params(model)
    return f"trainable: {trainable:,} / total: {total:,} ({100 * trainable / max(total, 1):.4f}%)"
