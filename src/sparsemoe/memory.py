"""Memory: what autograd keeps for the backward pass, and memory the experts' gradients reuse.

On a CPU there is no allocator high-water mark to read, and peak resident memory mixes in the
parameters, the allocator's caches and the Python heap. What a layer design changes is what
autograd saves between the forward and the backward pass, which
:func:`saved_tensor_bytes` counts exactly, on any device.

:class:`GradientBuffers` keeps the memory of an expert bank's weight gradients from one backward
pass to the next on a CPU, where nothing else would (see its docstring for the measured cost).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
from torch import Tensor
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.weak import WeakIdKeyDictionary

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


def _storage_use_count(t: Tensor) -> int | None:
    """How many tensors (and Python storage objects) hold ``t``'s storage; None where the
    installed torch does not expose the count (a private function)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    return None if use_count is None else use_count(t.untyped_storage()._cdata)


class GradientBuffers:
    """Memory for one weight's gradient, handed out again by every backward pass that can.

    Why: glibc serves a multi-megabyte allocation with a fresh ``mmap`` and returns it to the
    system when it is freed, so a weight gradient allocated in every backward pass and dropped
    by ``zero_grad()`` faults every 4 KiB page in again, every step (for a large bank this costs
    more than the gradient's multiply-adds; BENCHMARKS.md measures it). A CUDA device has the
    caching allocator for this; a CPU has nothing, so the expert banks keep their gradients'
    memory here.

    Exactness: a buffer is handed out only while no tensor outside the pool shares its storage
    (its last gradient was set to None by ``zero_grad()``, or was accumulated into ``.grad`` and
    dropped), the test PyTorch's CUDA-graph trees use before reusing an output's memory.
    Otherwise a new one is allocated, and the pool keeps at most ``capacity`` of them. A
    gradient is never overwritten while anything can see it: ``.grad`` accumulation over
    micro-batches, the results of ``torch.autograd.grad`` kept by the caller and gradient hooks
    get what they would get without the pool. The cost is that the memory is not returned to
    the system when the gradients are set to None; :meth:`clear` returns it. The count of a
    storage's holders comes from a private torch function (``torch._C._storage_Use_Count``);
    where the installed torch lacks it, every request is a plain allocation.

    Args:
        capacity: most buffers kept (2: the ``.grad`` and the next micro-batch's gradient).
    """

    def __init__(self, capacity: int = 2) -> None:
        self.capacity = capacity
        self._buffers: list[tuple[Tensor, int]] = []  # (buffer, its storage's count when idle)

    def take(self, like: Tensor) -> Tensor:
        """Uninitialised memory of ``like``'s shape, dtype and device, as a fresh tensor (an
        alias of an idle pooled buffer when there is one)."""
        self._buffers = [(b, idle) for b, idle in self._buffers
                         if (b.shape, b.dtype, b.device) == (like.shape, like.dtype, like.device)]
        for buffer, idle in self._buffers:
            if _storage_use_count(buffer) == idle:
                return buffer.detach()
        buffer = torch.empty_like(like, memory_format=torch.contiguous_format)
        idle = _storage_use_count(buffer)
        if len(self._buffers) >= self.capacity or idle is None:
            return buffer
        self._buffers.append((buffer, idle))
        return buffer.detach()

    @property
    def nbytes(self) -> int:
        """Bytes held by the pool."""
        return sum(b.untyped_storage().nbytes() for b, _ in self._buffers)

    def clear(self) -> None:
        """Drop the pool's buffers (their memory goes back once no gradient uses it)."""
        self._buffers = []

    def __deepcopy__(self, memo: dict) -> GradientBuffers:
        return GradientBuffers(self.capacity)

    def __getstate__(self) -> dict:
        return {"capacity": self.capacity, "_buffers": []}

    def __repr__(self) -> str:
        return (f"GradientBuffers(capacity={self.capacity}, buffers={len(self._buffers)}, "
                f"nbytes={self.nbytes})")


_POOL_OF_WEIGHT = WeakIdKeyDictionary()  # weight -> its GradientBuffers (for compiled graphs)


def attach_pool(weight: Tensor, pool: GradientBuffers) -> None:
    """Make ``pool`` the gradient memory of ``weight`` where only the weight is at hand: inside
    the compiled grouped matmul's weight-gradient operator, which receives the parameter but
    no Python object (held weakly: forgotten with the parameter)."""
    _POOL_OF_WEIGHT[weight] = pool


def pool_of(weight: Tensor) -> GradientBuffers | None:
    """The pool :func:`attach_pool` gave ``weight``, or None."""
    return _POOL_OF_WEIGHT.get(weight)
