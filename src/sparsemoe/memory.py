"""Measuring activation memory: the bytes autograd keeps for the backward pass.

On a CPU there is no allocator high-water mark to read, and peak resident memory mixes in the
parameters, the allocator's caches and the Python heap. What a layer design changes is what
autograd saves between the forward and the backward pass, which
:func:`saved_tensor_bytes` counts exactly, on any device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from torch import Tensor
from torch.autograd.graph import saved_tensors_hooks

T = TypeVar("T")


def saved_tensor_bytes(fn: Callable[[], T], exclude: Iterable[Tensor] = ()) -> tuple[T, int]:
    """Run ``fn()`` and count the bytes of the tensors autograd saves for its backward pass.

    Each storage counts once however many ops save it (a ReLU's output that the next matrix
    multiply also saves is one tensor); storages of ``exclude`` (typically the parameters and
    the input, which exist anyway) are not counted. Tensors saved inside a non-reentrant
    :func:`torch.utils.checkpoint.checkpoint` are dropped after its forward and do not count.

    Returns:
        ``(fn(), bytes)``.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(saved.values())
