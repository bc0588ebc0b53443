"""Expert banks: what the dispatch runs on each expert's block of rows.

An expert bank maps ``([N, d] rows sorted by expert, SortedPairs) -> [N, d_out]`` (see
:class:`sparsemoe.dispatch.Experts`). :class:`FeedForwardExperts` and :class:`LinearExperts`
keep all experts in stacked parameters, so any number of experts is a handful of tensors and
one grouped matmul per layer; :class:`ModuleListExperts` runs arbitrary modules (general, one
call per non-empty expert).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ._checks import check_bool, check_choice, check_int
from .dispatch import GROUPED_MM_IMPLS, SortedPairs, grouped_matmul
from .memory import GradientBuffers, attach_pool

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}
# Gated linear units (Shazeer 2020): hidden = act(x W_a) * (x W_b), W_a and W_b stacked in w1.
_GATED_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"swiglu": F.silu, "geglu": F.gelu}

EXPERT_ACTIVATIONS = tuple(_ACTIVATIONS) + tuple(_GATED_ACTIVATIONS)


def resolve_activation(name: str, value: str | Callable[[Tensor], Tensor] | None):
    """An activation given by name (one of ``relu gelu silu tanh sigmoid``), callable or None."""
    if value is None or callable(value):
        return value
    if value in _ACTIVATIONS:
        return _ACTIVATIONS[value]
    raise ValueError(f"{name} must be one of {tuple(_ACTIVATIONS)}, a callable or None, "
                     f"got {value!r}")


def _init_like_linear(w: Tensor, b: Tensor | None) -> None:
    """U(±1/√fan_in) for stacked weights ``w [n, fan_in, out]`` and biases ``b [n, out]``."""
    bound = 1.0 / math.sqrt(w.shape[1])
    nn.init.uniform_(w, -bound, bound)
    if b is not None:
        nn.init.uniform_(b, -bound, bound)


def _grad_buffers(reuse_grad_memory: bool, *names: str) -> dict[str, GradientBuffers]:
    """One gradient pool per stacked weight, or none when ``reuse_grad_memory`` is False."""
    if check_bool("reuse_grad_memory", reuse_grad_memory):
        return {name: GradientBuffers() for name in names}
    return {}


def _attach_pools(bank: nn.Module) -> None:
    """Attach each pool of ``bank.grad_buffers`` to its weight, for compiled graphs."""
    for name, pool in bank.grad_buffers.items():
        attach_pool(getattr(bank, name), pool)


def _setstate_attaching_pools(bank: nn.Module, state: dict) -> None:
    """``__setstate__`` of the stacked banks: a copy (``deepcopy``, unpickling) attaches its
    own pools to its own weights."""
    nn.Module.__setstate__(bank, state)
    _attach_pools(bank)


def _stacked_affine(
    x: Tensor, w: Tensor, b: Tensor | None, routes: SortedPairs, impl: str,
    grad_buffers: GradientBuffers | None,
) -> Tensor:
    """``x[r]·w[e(r)] + b[e(r)]`` for rows sorted by expert: one grouped matmul.

    Shape: ``x [N, p]``, ``w [n, p, q]``, ``b [n, q]`` or None -> ``[N, q]``.
    """
    y = grouped_matmul(x, w, routes.tokens_per_expert, impl, grad_buffers)
    if b is not None:
        y = y + b.index_select(0, routes.expert_index).to(y.dtype)
    return y


class FeedForwardExperts(nn.Module):
    """``n`` independent two-layer feed-forward experts in stacked parameters.

    ``E_e(x) = act(x·w1[e] + b1[e])·w2[e] + b2[e]``; for the gated activations
    (``"swiglu"``, ``"geglu"``) ``w1[e]`` holds ``[W_a | W_b]`` and the hidden layer is
    ``act(x·W_a) ⊙ (x·W_b)``. The paper's experts (Appendix C.1) are ``activation="relu"``.

    Args:
        num_experts: ``n``.
        d_model: input and output width ``d``.
        hidden: hidden width ``h`` of each expert.
        activation: one of :data:`EXPERT_ACTIVATIONS`.
        bias: learn ``b1`` and ``b2`` (the reference code's experts have none).
        impl: grouped-matmul implementation, one of
            :data:`sparsemoe.dispatch.GROUPED_MM_IMPLS`.
        recompute: keep only the input rows for the backward pass and recompute the hidden
            activations there (Shazeer et al. 2017, Appendix D): saves the ``[N, h]``
            activations of every row for one more forward of the first matrix multiply.
        reuse_grad_memory: on a CPU, keep the memory of ``w1``'s and ``w2``'s gradients from
            one backward pass to the next (:class:`~sparsemoe.memory.GradientBuffers`: same
            values, no page faults; ``grad_buffers[name].clear()`` returns the memory).

    Shape:
        Parameters: ``w1 [n, d, h]`` (``[n, d, 2h]`` when gated), ``b1 [n, h]`` (``[n, 2h]``),
        ``w2 [n, h, d]``, ``b2 [n, d]``. Forward: ``[N, d]`` rows sorted by expert → ``[N, d]``.
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        hidden: int,
        *,
        activation: str = "relu",
        bias: bool = False,
        impl: str = "auto",
        recompute: bool = False,
        reuse_grad_memory: bool = True,
    ) -> None:
        super().__init__()
        self.num_experts = check_int("num_experts", num_experts)
        self.d_model = check_int("d_model", d_model)
        self.hidden = check_int("hidden", hidden)
        self.recompute = check_bool("recompute", recompute)
        self.grad_buffers = _grad_buffers(reuse_grad_memory, "w1", "w2")
        check_choice("activation", activation, EXPERT_ACTIVATIONS)
        check_choice("impl", impl, GROUPED_MM_IMPLS)
        self.activation = activation
        self.impl = impl
        width = 2 * hidden if activation in _GATED_ACTIVATIONS else hidden
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, width))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.b1 = nn.Parameter(torch.empty(num_experts, width)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, d_model)) if bias else None
        self.reset_parameters()
        _attach_pools(self)

    __setstate__ = _setstate_attaching_pools

    def reset_parameters(self) -> None:
        """Each expert initialised like an ``nn.Linear``: U(±1/√fan_in) for weights and biases."""
        _init_like_linear(self.w1, self.b1)
        _init_like_linear(self.w2, self.b2)

    @property
    def multiply_adds_per_row(self) -> int:
        """Multiply-adds of one row through its expert (biases and activation not counted):
        ``d·h + h·d`` (``d·2h + h·d`` when gated). Over the ``2d`` numbers that enter and leave
        the expert this is ``h``: the paper's compute-to-I/O ratio (Shazeer et al. 2017, §3.2)."""
        return self.d_model * self.w1.shape[-1] + self.hidden * self.d_model

    def forward(self, x: Tensor, routes: SortedPairs) -> Tensor:
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(self._forward, x, routes, use_reentrant=False)
        return self._forward(x, routes)

    def _forward(self, x: Tensor, routes: SortedPairs) -> Tensor:
        h = _stacked_affine(x, self.w1, self.b1, routes, self.impl, self.grad_buffers.get("w1"))
        if self.activation in _GATED_ACTIVATIONS:
            gate, up = h.chunk(2, dim=-1)
            h = _GATED_ACTIVATIONS[self.activation](gate) * up
        else:
            h = _ACTIVATIONS[self.activation](h)
        return _stacked_affine(h, self.w2, self.b2, routes, self.impl, self.grad_buffers.get("w2"))

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, hidden={self.hidden}, "
                f"activation={self.activation!r}, bias={self.b1 is not None}, impl={self.impl!r}, "
                f"recompute={self.recompute}, reuse_grad_memory={bool(self.grad_buffers)}")


class LinearExperts(nn.Module):
    """``n`` single-layer experts ``E_e(x) = act(x·W[e] + b[e])`` from ``d_in`` to ``d_out``, in
    stacked parameters.

    The experts of the Deep Mixture of Experts (Eigen, Ranzato and Sutskever 2013):
    ``f_i(x) = max(0, W_i·x + b_i)`` (``activation="relu"``, biases on). Input and output widths
    differ (layer 1 maps pixels to hidden units), so a layer built on this bank maps
    ``[..., d_in] -> [..., d_out]``.

    Args:
        num_experts: ``n``.
        d_in: input width.
        d_out: output width of each expert.
        activation: one of ``relu gelu silu tanh sigmoid``, or None for linear experts.
        bias: learn ``b``.
        impl: grouped-matmul implementation, one of :data:`sparsemoe.dispatch.GROUPED_MM_IMPLS`.
        reuse_grad_memory: on a CPU, keep the memory of ``w``'s gradient from one backward pass
            to the next (see :class:`FeedForwardExperts`).

    Shape:
        Parameters: ``w [n, d_in, d_out]``, ``b [n, d_out]``. Forward: ``[N, d_in]`` rows sorted
        by expert → ``[N, d_out]``.
    """

    def __init__(
        self,
        num_experts: int,
        d_in: int,
        d_out: int,
        *,
        activation: str | None = "relu",
        bias: bool = True,
        impl: str = "auto",
        reuse_grad_memory: bool = True,
    ) -> None:
        super().__init__()
        self.num_experts = check_int("num_experts", num_experts)
        self.d_in = check_int("d_in", d_in)
        self.d_out = check_int("d_out", d_out)
        self.grad_buffers = _grad_buffers(reuse_grad_memory, "w")
        if activation is not None and activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(_ACTIVATIONS)} or None, "
                             f"got {activation!r}")
        check_choice("impl", impl, GROUPED_MM_IMPLS)
        self.activation = activation
        self.impl = impl
        self.w = nn.Parameter(torch.empty(num_experts, d_in, d_out))
        self.b = nn.Parameter(torch.empty(num_experts, d_out)) if bias else None
        self.reset_parameters()
        _attach_pools(self)

    __setstate__ = _setstate_attaching_pools

    def reset_parameters(self) -> None:
        """Each expert initialised like an ``nn.Linear``: U(±1/√d_in) for ``W`` and ``b``."""
        _init_like_linear(self.w, self.b)

    def forward(self, x: Tensor, routes: SortedPairs) -> Tensor:
        y = _stacked_affine(x, self.w, self.b, routes, self.impl, self.grad_buffers.get("w"))
        return y if self.activation is None else _ACTIVATIONS[self.activation](y)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, d_in={self.d_in}, d_out={self.d_out}, "
                f"activation={self.activation!r}, bias={self.b is not None}, impl={self.impl!r}, "
                f"reuse_grad_memory={bool(self.grad_buffers)}")


class ModuleListExperts(nn.Module):
    """Arbitrary expert modules, each mapping ``[N_e, d] -> [N_e, d_out]``.

    The general, slower path: one call per expert that received tokens (experts with no tokens
    are skipped), with the block sizes read on the host (a synchronisation on a GPU, a graph
    break under ``torch.compile``). Prefer :class:`FeedForwardExperts` when the experts are
    feed-forward layers.
    """

    def __init__(self, experts: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(experts) == 0:
            raise ValueError("experts must hold at least one module, got an empty sequence")
        bad = [type(e).__name__ for e in experts if not isinstance(e, nn.Module)]
        if bad:
            raise TypeError(f"experts must all be nn.Module instances, got {bad}")
        self.experts = nn.ModuleList(experts)
        self.num_experts = len(self.experts)

    def forward(self, x: Tensor, routes: SortedPairs) -> Tensor:
        sizes = routes.tokens_per_expert.tolist()  # a host synchronisation: blocks of any size
        computed = sum(sizes)
        blocks = [
            expert(xe)
            for expert, xe, s in zip(self.experts, x[:computed].split(sizes), sizes, strict=True)
            if s
        ]
        if not blocks:  # no computed row: one call that keeps the output in the autograd graph
            return self.experts[0](x)
        if computed < x.shape[0]:  # rows of masked pairs (see SortedPairs)
            blocks.append(blocks[0].new_zeros(x.shape[0] - computed, blocks[0].shape[1]))
        return torch.cat(blocks)
