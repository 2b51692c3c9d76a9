"""The methods by name: the one literal list of them.

It sits in its own module, below methods/__init__.py, so that named.py (which __init__.py imports) can look a
method up by the name an adapter was recorded under without importing its own package. Everyone else asks
`methods.get(name)` or reads `methods.METHODS`.
"""

from __future__ import annotations

from . import adapter, bitfit, dora, freeze, full, ia3, lora, prefix, prompt, ptuning, qlora

METHODS = {"full": full, "freeze": freeze, "lora": lora, "dora": dora, "ia3": ia3, "bitfit": bitfit, "adapter": adapter,
           "prompt": prompt, "ptuning": ptuning, "prefix": prefix, "qlora": qlora}


def get(name: str):
    return METHODS[name]
