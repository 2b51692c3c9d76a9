"""Autograd keeps a recipe instead of a tensor that is cheap to make again from tensors it keeps anyway.

A layer's input is often saved twice over: the op that made it saves what it was made from, and every linear layer
that reads it saves the input itself (for its weight's or its adapter's gradient). Inside `recomputed(t, fn,
*args)`, wherever autograd saves `t` (or a view of its memory), it keeps a recipe instead and calls `fn(*args)` when
the backward reads it: the memory of `t` is freed as soon as the forward is done with it, for one elementwise pass
in the backward. `fn(*args)` must give `t` bit for bit, from tensors autograd keeps anyway.

Every reader of `t` shares one recipe: the first unpack in a backward makes the tensor, the readers after it take
the same one, and the last lets go of it (q/k/v read one norm output, three unpacks, one recomputation).

Under anyone else's saved-tensor hooks (non-reentrant checkpointing, activation offloading) nothing changes: a
recipe would keep alive what they mean to free. Recipes nest (the innermost is asked first).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


class _Shared:
    """One recipe for every place autograd saved the same tensor: made once per backward, held until the last of them
    has read it. A saved tensor that is never read (a branch the backward skips) keeps it only as long as the graph."""

    __slots__ = ("fn", "args", "saved", "left", "made")

    def __init__(self, fn: Callable, args: tuple):
        self.fn, self.args = fn, args
        self.saved = 0  # how many places autograd saved it
        self.left = 0  # of those, how many have yet to read this backward's copy
        self.made: torch.Tensor | None = None

    def tensor(self) -> torch.Tensor:
        made = self.made
        if made is None:  # the first reader of this backward (or of a retained graph's next one)
            made = self.fn(*self.args)
            self.left = self.saved
        self.left -= 1
        self.made = made if self.left > 0 else None
        return made


class _Recipe:
    __slots__ = ("shared", "size", "stride", "offset")

    def __init__(self, shared: _Shared, saved: torch.Tensor):
        self.shared = shared
        self.size, self.stride, self.offset = saved.size(), saved.stride(), saved.storage_offset()
        shared.saved += 1

    def tensor(self) -> torch.Tensor:
        return self.shared.tensor().as_strided(self.size, self.stride, self.offset)


def _unpack(saved):
    return saved.tensor() if isinstance(saved, _Recipe) else saved


def _current_hooks():
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


@contextlib.contextmanager
def recomputed(t: torch.Tensor, fn: Callable, *args) -> Iterator[bool]:
    """Inside: autograd keeps `fn(*args)` as a recipe wherever it saves `t`. Yields whether it does."""
    hooks = _current_hooks()
    outer = hooks[0] if hooks is not None else None
    if not t.requires_grad or (outer is not None and not getattr(outer, "_tunelab_recipes", False)):
        yield False
        return
    # plain values only: autograd may keep `pack` as long as the graph, and a reference to `t` or its storage would
    # keep the very memory alive that this frees
    address, numel, dtype = t.untyped_storage().data_ptr(), t.numel(), t.dtype
    shared = _Shared(fn, args)

    def pack(s: torch.Tensor):
        if type(s) is torch.Tensor and s.dtype == dtype and s.numel() == numel \
                and s.untyped_storage().data_ptr() == address:  # (a quantized weight is a subclass, with no storage)
            return _Recipe(shared, s)
        # not `s` itself: a node that saves its own output (attention, rsqrt) would then hold a Python reference to
        # a tensor whose grad_fn is that node, a cycle only a backward breaks (a forward without one kept its graph)
        return outer(s) if outer is not None else s.detach()

    pack._tunelab_recipes = True
    with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
        yield True
