"""Shared machinery of the virtual-token methods (prompt tuning, P-tuning, prefix tuning).

The methods add no layer to the model's computation graph: they hook the *body* of the model
(`model.bert`, `model.transformer`, `model.model`: `base_model_prefix`) so that the task's plain
`model(input_ids=..., attention_mask=...)` call, and so the training loop, never branch on them.

- Prompt / P-tuning: a forward pre-hook on the body turns `input_ids` into `inputs_embeds` with
  the virtual tokens in front and extends `attention_mask` (and `token_type_ids`) with them, as
  peft's PeftModel.forward does. A forward hook then drops the virtual positions from the body's
  `last_hidden_state` (and `hidden_states`), so the head sees exactly the real tokens: decoders'
  classification heads find the last non-pad token from the *original* `input_ids` (the top-level
  model still receives them) and index the right position, with or without padding. BERT's pooler
  runs inside the body, before that hook, so it reads position 0 = the first virtual token, as in peft.
- Prefix tuning: the pre-hook passes a `DynamicCache` (generate's own empty one, else a fresh one)
  holding every layer's key/value prefix as `past_key_values` and extends `attention_mask`; positions
  then start after the prefix (HF's own rule for a cache; given ones are shifted by n), as in peft.

Generation with the KV cache (transformers' `generate`): the virtual tokens enter once, at the first
call (prefill), and stay in the cache, which the hooks mark as holding them (`MARK`); later calls carry
only the new token. generate counts its attention mask and position ids without the virtual tokens (it
never sees them; after prefill it drops an all-ones mask), so on a call whose cache holds them (marked,
or a 2D mask n short of cache + new tokens) the hooks put n ones in front of the mask, if there is one,
and add n to the position ids. At prefill, given position ids (generate derives them from a left-padded
mask) are shifted by n and, for prompt / P-tuning, preceded by 0..n-1 for the virtual tokens. The row is
then [virtual tokens][pads][real tokens] with the pads masked and every real token at the position
training gave it (n + its index), so a left-padded batch generates what one prompt at a time does.

The trained state lives in one module attached as `model.prompt_encoder`. The hooks look it up at
every call (they are registered once per model and kind), so named adapters (`methods.named`) switch
virtual tokens by swapping that one attribute. With no encoder there, one of the other kind, or its
boolean `adapter_disabled` set (`methods.adapters_disabled`), the hooks pass inputs through untouched.

Saved layout (peft's, for its prompt-learning methods; checked against peft 0.21.2):
adapter_model.safetensors holds `prompt_embeddings` (the encoder's *output* for the virtual tokens:
(n, token_dim) for prompt / P-tuning, (n, num_layers * 2 * token_dim) for prefix tuning) and the head
modules under `base_model.<module path>.<param>` (prompt-learning PeftModels wrap the transformers
model directly, hence no `.model`). adapter_config.json has peft_type, task_type, num_virtual_tokens,
token_dim, num_layers, num_attention_heads, num_transformer_submodules (1) and modules_to_save, with
inference_mode true: peft then uses `prompt_embeddings` as they are, without any encoder.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .. import models
from ..errors import TunelabError
from .layout import check_head, copy_checked, peft_head, peft_task_type, read_peft, write_peft  # noqa: F401  (check_head: used as vt.check_head)

PREFIX = "base_model."  # peft's key prefix for a prompt-learning model's own modules (the head)
TABLE_KEY = "prompt_embeddings"
ATTR = "prompt_encoder"  # where the method's module lives on the model (peft's name too)
MARK = "tunelab_virtual_tokens"  # set on a generation cache whose first positions the hooks filled


class StaticTable(nn.Module):
    """Stored virtual tokens (what a saved adapter holds): `forward()` returns the table itself."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        # float32 even when the saved table is not: it may train on (method.init_from) over a bf16 base.
        self.embedding = nn.Embedding(*table.shape, device=table.device,
                                      dtype=torch.promote_types(table.dtype, torch.float32))
        with torch.no_grad():
            self.embedding.weight.copy_(table)
        self.adapter_disabled = False

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


# -- anatomy ----------------------------------------------------------------------

def body(model: nn.Module) -> nn.Module:
    return models.body_of(model)[1]


def text_config(model: nn.Module):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _get(cfg, *names):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return None


def shape(model: nn.Module) -> dict:
    """token_dim, num_layers, num_attention_heads as peft derives them from the model config."""
    cfg = text_config(model)
    token_dim = _get(cfg, "hidden_size", "n_embd", "d_model")
    num_layers = _get(cfg, "num_hidden_layers", "num_layers", "n_layer")
    heads = _get(cfg, "num_attention_heads", "n_head", "num_heads")
    if token_dim is None or num_layers is None or heads is None:
        raise TunelabError(f"Cannot read the hidden size, layer count and head count of {type(model).__name__} from its "
                           f"config, which virtual-token methods need. Use lora or another method for this model.")
    return {"token_dim": token_dim, "num_layers": num_layers, "num_attention_heads": heads}



def _as_kwargs(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The call's positional arguments by name (HF models are called as body(input_ids, attention_mask=...))."""
    if not args:
        return dict(kwargs)
    names = [n for n, p in inspect.signature(module.forward).parameters.items()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return {**dict(zip(names, args)), **kwargs}


def _cached(kwargs: dict) -> int:
    """How many positions the call's cache holds already (0 without one: training, or generation's prefill).
    A cache the hooks filled that comes back to a call that wants none is dropped: generate with use_cache=False
    hands each full forward the previous one's cache, which would put every token in front of itself again."""
    past = kwargs.get("past_key_values")
    if past is not None and kwargs.get("use_cache") is False and hasattr(past, MARK):
        kwargs["past_key_values"] = past = None
    return past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else 0


def _batch_size(kwargs: dict) -> int:
    x = kwargs.get("input_ids")
    return (x if x is not None else kwargs["inputs_embeds"]).shape[0]


def _new_tokens(kwargs: dict) -> int:
    x = kwargs.get("input_ids")
    return (x if x is not None else kwargs["inputs_embeds"]).shape[1]


def count(encoder: nn.Module) -> int:
    """The number of virtual tokens, without running the encoder (P-tuning's is an MLP or an LSTM)."""
    return encoder.embedding.weight.shape[0]


def _extend_mask(kwargs: dict, n: int, batch: int) -> None:
    mask = kwargs.get("attention_mask")
    if mask is not None:
        ones = torch.ones(batch, n, dtype=mask.dtype, device=mask.device)
        kwargs["attention_mask"] = torch.cat((ones, mask), dim=1)


def _mark(kwargs: dict, n: int) -> None:
    """Note on the call's cache that its first n positions are virtual tokens that the caller did not send."""
    cache = kwargs.get("past_key_values")
    if cache is not None:
        setattr(cache, MARK, n)


def _continue(kwargs: dict, n: int, cached: int):
    """A call over a cache that holds the virtual tokens (generation after prefill). The caller counted its mask and
    positions without them when the hooks put them in its cache (generate drops an all-ones mask but still sends
    positions) or when its mask is n short of cache + new tokens: the mask then gets n ones in front and the
    positions move up by n. Any other call is left alone."""
    mask = kwargs.get("attention_mask")
    short = mask is not None and mask.ndim == 2 and mask.shape[1] + n == cached + _new_tokens(kwargs)
    if not short and getattr(kwargs["past_key_values"], MARK, None) != n:
        return None
    if short:
        _extend_mask(kwargs, n, mask.shape[0])
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + n
    return (), kwargs


# -- attaching --------------------------------------------------------------------

def _put(model: nn.Module, encoder: nn.Module, kind: str) -> None:
    if hasattr(model, ATTR):
        raise TunelabError("This model already has virtual tokens (a prompt, P-tuning or prefix method was applied); "
                           "apply one virtual-token method to a fresh base model, or add it as a named adapter "
                           "(methods.add_adapter), which parks the active one.")
    encoder.vt_kind = kind
    setattr(model, ATTR, encoder)


def _live(model: nn.Module, kind: str) -> nn.Module | None:
    """The encoder the hooks of `kind` should use now, or None to pass inputs through."""
    enc = getattr(model, ATTR, None)
    if enc is None or enc.adapter_disabled or getattr(enc, "vt_kind", None) != kind:
        return None
    return enc


def _hooked(model: nn.Module, kind: str) -> bool:
    """Whether the hooks of `kind` are on the model's body already; marks them as there."""
    key = f"_tunelab_{kind}_hooked"
    if model.__dict__.get(key):
        return True
    model.__dict__[key] = True
    return False


def attach_prompt(model: nn.Module, encoder: nn.Module) -> nn.Module:
    """Prepend `encoder()` ((n, hidden) virtual token embeddings) to every input of the model's body."""
    _put(model, encoder, "prompt")
    if _hooked(model, "prompt"):
        return model
    trunk = body(model)
    state = {"n": 0}

    def pre(module, args, kwargs):
        state["n"] = 0
        encoder = _live(model, "prompt")
        if encoder is None:
            return None
        kwargs = _as_kwargs(module, args, kwargs)
        cached = _cached(kwargs)
        if cached:
            return _continue(kwargs, count(encoder), cached)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = module.get_input_embeddings()(kwargs["input_ids"])
        batch = embeds.shape[0]
        prompts = encoder().to(embeds.dtype)
        n = prompts.shape[0]
        kwargs["inputs_embeds"] = torch.cat((prompts.unsqueeze(0).expand(batch, -1, -1), embeds), dim=1)
        kwargs["input_ids"] = None
        _extend_mask(kwargs, n, batch)
        _mark(kwargs, n)
        if kwargs.get("token_type_ids") is not None:
            tt = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = torch.cat((torch.zeros(batch, n, dtype=tt.dtype, device=tt.device), tt), dim=1)
        positions = kwargs.get("position_ids")
        if positions is not None:  # the virtual tokens take 0..n-1, the real ones follow (training's positions)
            first = torch.arange(n, dtype=positions.dtype, device=positions.device).expand(*positions.shape[:-1], n)
            kwargs["position_ids"] = torch.cat((first, positions + n), dim=-1)
        state["n"] = n
        return (), kwargs

    def post(module, args, kwargs, output):
        n, state["n"] = state["n"], 0
        if not n:
            return None
        if isinstance(output, tuple):
            return (output[0][:, n:], *output[1:])
        output["last_hidden_state"] = output["last_hidden_state"][:, n:]
        if output.get("hidden_states") is not None:
            output["hidden_states"] = tuple(h[:, n:] for h in output["hidden_states"])
        return output

    trunk.register_forward_pre_hook(pre, with_kwargs=True)
    trunk.register_forward_hook(post, with_kwargs=True)
    return model


def attach_prefix(model: nn.Module, encoder: nn.Module, num_layers: int, num_heads: int, head_dim: int) -> nn.Module:
    """Give every attention layer the key/value prefix `encoder()` ((n, num_layers * 2 * heads * head_dim))."""
    from transformers import DynamicCache

    trunk = body(model)
    accepts = "past_key_values" in inspect.signature(trunk.forward).parameters
    if not accepts:
        raise TunelabError(f"{type(trunk).__name__} takes no past_key_values, which prefix tuning needs to pass the "
                           f"key/value prefixes. Use method.name=prompt or lora for this model.")
    _put(model, encoder, "prefix")
    if _hooked(model, "prefix"):
        return model
    dtype = next(trunk.parameters()).dtype

    def pre(module, args, kwargs):
        encoder = _live(model, "prefix")
        if encoder is None:
            return None
        kwargs = _as_kwargs(module, args, kwargs)
        cached = _cached(kwargs)
        if cached:
            return _continue(kwargs, count(encoder), cached)
        batch = _batch_size(kwargs)
        table = encoder().to(dtype)
        n = table.shape[0]
        # peft's layout: (n, 2 * layers, heads, head_dim) -> (2 * layers, batch, heads, n, head_dim); keys at even
        # indices, values at odd ones.
        kv = table.view(n, 2 * num_layers, num_heads, head_dim).permute(1, 2, 0, 3)
        kv = kv.unsqueeze(1).expand(-1, batch, -1, -1, -1)
        # generate's own (empty) cache is filled in place, so the one it holds is the one the layers extend.
        cache = kwargs.get("past_key_values")
        if not isinstance(cache, DynamicCache):
            cache = DynamicCache(config=text_config(model))
        for i in range(num_layers):
            cache.update(kv[2 * i], kv[2 * i + 1], i)
        kwargs["past_key_values"] = cache
        _mark(kwargs, n)
        _extend_mask(kwargs, n, batch)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + n  # peft's rule: positions continue after the prefix
        return (), kwargs

    trunk.register_forward_pre_hook(pre, with_kwargs=True)
    return model


def freeze_all_but(model: nn.Module, head: list[str]) -> None:
    """Freeze the base, train the method's module and the head modules in full."""
    model.requires_grad_(False)
    getattr(model, ATTR).requires_grad_(True)
    for name in head:
        model.get_submodule(name).requires_grad_(True)


def cannot_merge(method: str) -> TunelabError:
    return TunelabError(f"A {method} adapter cannot be merged into the base weights: its virtual tokens are extra "
                        f"inputs, not a change of any weight. Export the adapter (peft layout) and load it with "
                        f"tunelab or peft.PeftModel.from_pretrained instead.")


# -- saving and loading (peft's prompt-learning layout) ----------------------------

def encoder_of(model: nn.Module, method: str) -> nn.Module:
    enc = getattr(model, ATTR, None)
    if enc is None:
        raise TunelabError(f"This model has no {method} virtual tokens to save; apply method.name={method} first, or save "
                           f"it as a full model instead.")
    return enc


def save(model: nn.Module, out_dir: Path, base_model_path: str, head: list[str], peft_type: str,
         table: torch.Tensor, fields: dict) -> None:
    tensors = {TABLE_KEY: table}
    for name in head:
        for key, t in model.get_submodule(name).state_dict().items():
            tensors[f"{PREFIX}{name}.{key}"] = t
    # clone: safetensors refuses tensors that share storage (e.g. tied weights).
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()}
    config = {
        "peft_type": peft_type,
        "task_type": peft_task_type(model),
        "base_model_name_or_path": str(base_model_path),
        "num_virtual_tokens": int(table.shape[0]),
        **shape(model),
        "num_transformer_submodules": 1,
        "modules_to_save": list(head),
        "inference_mode": True,
        **fields,
    }
    write_peft(out_dir, tensors, config)


def read(out_dir: Path, peft_type: str, method: str) -> tuple[dict, dict[str, torch.Tensor]]:
    out_dir = Path(out_dir)
    config, weights_file = read_peft(out_dir, peft_type, method)
    if config.get("num_transformer_submodules", 1) != 1:
        raise TunelabError(f"The adapter in '{out_dir}' is for an encoder-decoder model (num_transformer_submodules "
                           f"{config['num_transformer_submodules']}), which tunelab's {method} does not support.")
    saved = load_file(str(weights_file))
    if TABLE_KEY not in saved:
        raise TunelabError(f"The adapter in '{out_dir}' has no '{TABLE_KEY}' tensor; it was saved in training mode "
                           f"or is damaged. Re-save it (peft's save_pretrained stores it).")
    return config, saved


def load_head(model: nn.Module, config: dict, saved: dict[str, torch.Tensor], out_dir: Path) -> list[str]:
    """Copy the saved head modules in; the head is matched by peft's rule on module names."""
    head = peft_head(model, config)
    expected = {}
    for name in head:
        for key, t in model.get_submodule(name).state_dict(keep_vars=True).items():
            expected[f"{PREFIX}{name}.{key}"] = t
    copy_checked(expected, {k: v for k, v in saved.items() if k != TABLE_KEY}, out_dir, config.get('base_model_name_or_path'))
    return head


def check_table(table: torch.Tensor, width: int, out_dir: Path, what: str) -> None:
    if table.ndim != 2 or table.shape[1] != width:
        raise TunelabError(f"The adapter in '{out_dir}' stores {TABLE_KEY} with shape {tuple(table.shape)}, but this model "
                           f"needs {what} of width {width}; load it onto the base model it was trained from.")
