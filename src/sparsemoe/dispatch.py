"""Moving tokens to experts and back: sort → gather → grouped matmul → un-permute → combine.

This is the only fast path of sparsemoe; every router and layer goes through it. It is dropless by
default: every (token, expert) pair chosen by the router is computed. A router may mark pairs as
not valid (an expert-choice cell its expert did not pick, GShard's skipped second expert, a pair
beyond its expert's :class:`~sparsemoe.capacity.Capacity`); such a pair is not computed and
contributes nothing to its token's output.

Index letters: ``T`` tokens, ``k`` experts per token, ``N = T·k`` (token, expert) pairs,
``n`` experts, ``p``/``q`` input/output widths of a grouped matmul.

Design (why it is fast and memory-flat):

- the ``[T, k]`` routing decisions are flattened and stably sorted by expert, so each expert's
  tokens are one contiguous block of rows; ``tokens_per_expert`` delimits the blocks;
- all experts run in one grouped matrix multiply over those blocks
  (``torch.nn.functional.grouped_mm``), so an expert with no tokens costs nothing and nothing of
  size ``[T, n]`` or ``[T, n, capacity]`` is ever built;
- outputs are read back through the inverse permutation and mixed by the gates in one fused
  gather-and-weighted-sum (``F.embedding_bag``), never building a ``[T, k, d]`` copy;
- both row movements differentiate to gathers (:func:`gather_tokens`, :func:`combine`), not to
  ``index_select``'s scattering ``index_add`` backward: deterministic, no atomic adds, and on a
  CPU faster (BENCHMARKS.md);
- masked pairs are sorted behind every valid pair and cut off before the expert bank runs, so
  they cost nothing; the un-permute reads a zero row for them.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from . import few_rows
from ._checks import autocast_dtype, check_choice, deprecated_alias
from .memory import GradientBuffers

GROUPED_MM_IMPLS = ("auto", "grouped_mm", "loop", "few_rows")
"""Implementations of :func:`grouped_matmul`: ``"grouped_mm"`` is torch's grouped GEMM,
``"loop"`` one matmul per non-empty expert (any dtype, any device), ``"few_rows"`` the CPU kernel
of :mod:`sparsemoe.few_rows` (float32, bfloat16, float64), ``"auto"`` the loop for decode-sized
batches (:func:`decode_sized`), else the kernel on a CPU where experts average few rows
(:func:`sparsemoe.few_rows.preferred`) and it could be built, else ``"grouped_mm"`` where the
installed torch supports the device and dtype, else ``"loop"``."""

DECODE_MIN_COLUMNS = 1024
""":func:`decode_sized`'s narrowest weight: below it the few-row kernel keeps one-row products."""

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class SortedPairs(NamedTuple):
    """The ``N`` computed (token, expert) pairs, sorted by expert (stable: token order kept).

    ``N = T·k`` without a validity mask; with one, ``N`` is the number of valid pairs.

    Attributes:
        order: ``[N]`` position of each sorted pair in the flattened ``[T, k]`` routing grid.
        token_index: ``[N]`` the token of each sorted pair (``order // k``).
        expert_index: ``[N]`` the expert of each sorted pair, non-decreasing.
        tokens_per_expert: ``[n]`` int64, the size of each expert's block of rows.
    """

    order: Tensor
    token_index: Tensor
    expert_index: Tensor
    tokens_per_expert: Tensor


class Experts(Protocol):
    """What the dispatch needs from an expert bank (see :mod:`sparsemoe.experts`)."""

    num_experts: int

    def __call__(self, x_sorted: Tensor, routes: SortedPairs) -> Tensor: ...


def sort_by_expert(
    expert_indices: Tensor, num_experts: int, valid: Tensor | None = None
) -> SortedPairs:
    """Group the (token, expert) pairs of a routing decision by expert.

    Args:
        expert_indices: ``[T, k]`` int64, the experts each token goes to.
        num_experts: ``n``.
        valid: ``[T, k]`` bool, the pairs to compute; None computes every pair.

    Returns:
        :class:`SortedPairs` over the valid pairs (all ``T·k`` of them when ``valid`` is None).
    """
    k = expert_indices.shape[1]
    flat = expert_indices.reshape(-1)
    if valid is not None:
        # Masked pairs get the key n: the stable sort puts them behind every valid pair.
        flat = torch.where(valid.reshape(-1), flat, num_experts)
    expert_index, order = torch.sort(flat, stable=True)
    # index_add of ones instead of bincount: a static output shape (torch.compile friendly).
    bins = num_experts + (valid is not None)
    tokens_per_expert = flat.new_zeros(bins).index_add_(0, flat, torch.ones_like(flat))
    if valid is not None:
        tokens_per_expert = tokens_per_expert[:num_experts]
        computed = int(tokens_per_expert.sum())  # a host sync: the row count of the experts' input
        order, expert_index = order[:computed], expert_index[:computed]
    token_index = torch.div(order, k, rounding_mode="floor")
    return SortedPairs(order, token_index, expert_index, tokens_per_expert)


def equal_routes(
    num_experts: int, rows_per_expert: int, device: torch.device | None = None
) -> SortedPairs:
    """The sorted pairs of rows already grouped by expert, ``rows_per_expert`` rows each.

    For inputs that are not tokens (Soft MoE's slots): row ``r`` belongs to expert
    ``r // rows_per_expert``; ``order`` and ``token_index`` are the identity.

    Returns:
        :class:`SortedPairs` over ``num_experts · rows_per_expert`` rows.
    """
    rows = torch.arange(num_experts * rows_per_expert, device=device)
    expert_index = torch.div(rows, max(rows_per_expert, 1), rounding_mode="floor")
    tokens_per_expert = torch.full((num_experts,), rows_per_expert, device=device)
    return SortedPairs(rows, rows, expert_index, tokens_per_expert)


def decode_sized(x: Tensor, w: Tensor) -> bool:
    """``impl="auto"``'s choice of ``"loop"`` (one BLAS product per expert hit) on a CPU: at
    most one row per expert (``T·k ≤ n``, the batches of generation) through a contiguous
    ``[n, p, q]`` weight at least :data:`DECODE_MIN_COLUMNS` wide.

    There most experts hit get one row; the few-row kernel multiplies one row by a contiguous
    weight column strip by column strip, which the BLAS's matrix-vector product beats by up to
    2.4× on wide weights (``benchmarks/decode_paths.py``; BENCHMARKS.md, "Decode-sized
    batches and transposed weights"). A transposed view (transformers' ``[n, out, in]``
    storage) keeps the kernel, whose ``x·Wᵀ`` product reads the weight's rows contiguously and
    is as fast.
    """
    return (x.device.type == "cpu" and x.shape[0] <= w.shape[0]
            and w.shape[2] >= DECODE_MIN_COLUMNS and w.is_contiguous()
            and not torch.compiler.is_compiling())


def _grouped_mm_supported(x: Tensor, w: Tensor) -> bool:
    if not hasattr(F, "grouped_mm") or x.dtype not in _GROUPED_MM_DTYPES:
        return False
    # torch's grouped GEMM (CPU and CUDA) needs row strides that are multiples of 16 bytes.
    if any(s * x.element_size() % 16 for s in w.shape[1:]):
        return False
    if x.device.type == "cuda":
        return torch.cuda.get_device_capability(x.device) >= (8, 0)
    return x.device.type == "cpu"


@torch.compiler.disable
def _eager_grouped_mm(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    return F.grouped_mm(x, w, offs=offs)


def _grouped_matmul(x: Tensor, w: Tensor, tokens_per_expert: Tensor, impl: str) -> Tensor:
    """:func:`grouped_matmul` for a resolved ``impl`` (not ``"auto"``)."""
    if impl == "few_rows":
        return few_rows.FewRowsMatmul.apply(x, w, tokens_per_expert)
    if impl == "grouped_mm":
        offsets = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
        # torch.compile traces grouped_mm only for bfloat16 (its meta kernel rejects float32,
        # which the eager CPU kernel runs); other dtypes run it eagerly inside a compiled graph.
        mm = F.grouped_mm if x.dtype == torch.bfloat16 else _eager_grouped_mm
        return mm(x, w, offs=offsets)
    sizes = tokens_per_expert.tolist()
    blocks = [xe @ we for xe, we, s in zip(x.split(sizes), w.unbind(0), sizes, strict=True) if s]
    # No rows at all: an empty product that still belongs to the autograd graph.
    return torch.cat(blocks) if blocks else x @ w[0]


class _GroupedMatmulReusingGrad(torch.autograd.Function):
    """:func:`grouped_matmul` whose weight gradient is written into memory of a
    :class:`~sparsemoe.memory.GradientBuffers` (the derivative is torch's: ``dx = dy·wᵀ``
    blockwise, ``dw[e] = x_eᵀ·dy_e``, zero for an expert without rows)."""

    @staticmethod
    def forward(ctx, x, w, tokens_per_expert, impl, buffers):
        ctx.save_for_backward(x, w, tokens_per_expert)
        ctx.impl, ctx.buffers = impl, buffers
        return _grouped_matmul(x, w, tokens_per_expert, impl)

    @staticmethod
    def backward(ctx, dy):
        x, w, tokens_per_expert = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # create_graph: differentiate torch's own forward again
            inputs = [t for t, need in ((x, need_x), (w, need_w)) if need]
            with torch.enable_grad():
                y = _grouped_matmul(x, w, tokens_per_expert, ctx.impl)
            grads = list(torch.autograd.grad(y, inputs, dy, create_graph=True))
            dx = grads.pop(0) if need_x else None
            return dx, grads.pop(0) if need_w else None, None, None, None
        dy = dy.contiguous()  # an expanded gradient (of a sum) has strides grouped_mm rejects
        if ctx.impl == "few_rows":
            dx = few_rows.input_grad(dy, w, tokens_per_expert) if need_x else None
            dw = few_rows.weight_grad(x, dy, tokens_per_expert, ctx.buffers.take(w)) \
                if need_w else None
            return dx, dw, None, None, None
        dx = _grouped_matmul(dy, w.transpose(1, 2), tokens_per_expert, ctx.impl) if need_x else None
        dw = None
        if need_w:
            dw = ctx.buffers.take(w)
            sizes = tokens_per_expert.tolist()
            blocks = zip(x.split(sizes), dy.split(sizes), sizes, strict=True)
            for e, (xe, ge, s) in enumerate(blocks):
                if s:
                    torch.mm(xe.t(), ge, out=dw[e])
                else:
                    dw[e].zero_()
        return dx, dw, None, None, None


def grouped_matmul(
    x: Tensor,
    w: Tensor,
    tokens_per_expert: Tensor,
    impl: str = "auto",
    grad_buffers: GradientBuffers | None = None,
) -> Tensor:
    """Row block ``e`` of ``x`` times ``w[e]``, for every expert ``e`` at once.

    ``out[r] = x[r] @ w[e(r)]`` where ``e(r)`` is the block row ``r`` falls in. Autocast-aware:
    under ``torch.autocast`` both operands are cast to the autocast dtype, as ``F.linear`` does.

    Args:
        x: ``[N, p]`` rows sorted by expert.
        w: ``[n, p, q]`` one matrix per expert.
        tokens_per_expert: ``[n]`` integer block sizes summing to ``N``.
        impl: one of :data:`GROUPED_MM_IMPLS`.
        grad_buffers: on a CPU, write ``w``'s gradient into memory this pool keeps across
            backward passes instead of a fresh allocation (see
            :class:`~sparsemoe.memory.GradientBuffers`; the gradient's value is the same).
            Not used under autocast, ``torch.compile`` or on other devices, whose allocators
            keep freed memory.

    Returns:
        ``[N, q]``.
    """
    dt = autocast_dtype(x.device.type)
    if dt is not None:
        x, w = x.to(dt), w.to(dt)
    if impl == "auto" and decode_sized(x, w):
        impl = "loop"
    if impl == "auto":
        impl = "grouped_mm" if _grouped_mm_supported(x, w) else "loop"
        if (few_rows.supported(x, w) and x.dtype != torch.float64
                and few_rows.preferred(x.shape[0], w.shape[0], few_rows.transposed_view(w))
                and not torch.compiler.is_compiling() and few_rows.library() is not None):
            impl = "few_rows"
    check_choice("impl", impl, GROUPED_MM_IMPLS)
    if impl == "few_rows" and not few_rows.supported(x, w):
        raise ValueError(f"impl='few_rows' needs CPU tensors of one dtype among "
                         f"{tuple(few_rows.DTYPES)}, got x {x.dtype} on {x.device.type}, "
                         f"w {w.dtype} on {w.device.type}")
    if (grad_buffers is not None and dt is None and w.requires_grad and torch.is_grad_enabled()
            and w.device.type == "cpu" and not torch.compiler.is_compiling()):
        return _GroupedMatmulReusingGrad.apply(x, w, tokens_per_expert, impl, grad_buffers)
    return _grouped_matmul(x, w, tokens_per_expert, impl)


def _inverse_permutation(routes: SortedPairs, num_pairs: int) -> Tensor:
    """``[num_pairs]`` the sorted position of each grid pair; ``N`` (one past the last computed
    pair) for a masked pair."""
    n = routes.order.numel()
    inverse = routes.order.new_full((num_pairs,), n)
    inverse[routes.order] = torch.arange(n, device=inverse.device)
    return inverse


def _pair_rows(index: Tensor, rows: int) -> tuple[Tensor, Tensor | None]:
    """``index`` with masked entries (equal to ``rows``) clamped in range, and the 0/1 weights
    that cancel them (None when nothing is masked)."""
    if rows >= index.numel():  # every pair of the grid was computed: no entry equals rows
        return index, None
    return index.clamp(max=max(rows - 1, 0)), index != rows


def _bag_sum(src: Tensor, index: Tensor, weights: Tensor | None) -> Tensor:
    """``out[t] = Σ_j weights[t, j] · src[index[t, j]]`` for ``index [T, k]``: one fused gather
    and weighted sum (``F.embedding_bag``), without building the ``[T, k, d]`` intermediate."""
    if src.shape[0] == 0:
        return src.new_zeros(index.shape[0], src.shape[1])
    if weights is not None:
        weights = weights.to(src.dtype)
    return F.embedding_bag(index, src, mode="sum", per_sample_weights=weights)


class _GatherTokens(torch.autograd.Function):
    """``x[token_index]`` whose gradient is a gather through the inverse permutation and a sum
    over each token's ``k`` pairs, not ``index_select``'s scattering ``index_add``."""

    @staticmethod
    def forward(ctx, x, token_index, inverse):  # type: ignore[override]
        ctx.save_for_backward(inverse)
        return x.index_select(0, token_index)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (inverse,) = ctx.saved_tensors
        index, keep = _pair_rows(inverse, grad.shape[0])
        return _bag_sum(grad, index, keep), None, None


def gather_tokens(x: Tensor, routes: SortedPairs, k: int) -> Tensor:
    """The input row of every computed pair, in :class:`SortedPairs` order:
    ``x[routes.token_index]``.

    Args:
        x: ``[T, d]`` tokens.
        routes: from :func:`sort_by_expert` over a ``[T, k]`` routing grid.
        k: choices per token.

    Returns:
        ``[N, d]``; its gradient flows back through the inverse permutation (a gather that sums
        each token's ``k`` pairs).
    """
    inverse = _inverse_permutation(routes, x.shape[0] * k).view(-1, k)
    return _GatherTokens.apply(x, routes.token_index, inverse)


def unsort(values: Tensor, routes: SortedPairs, num_pairs: int | None = None) -> Tensor:
    """Put per-pair values from :class:`SortedPairs` order back into flattened ``[T·k]`` grid order.

    A gather through the inverse permutation: deterministic, no atomic adds. Grid positions of
    pairs that were not computed (masked) read a zero row.

    Args:
        values: ``[N, ...]`` in sorted order.
        routes: from :func:`sort_by_expert`.
        num_pairs: ``T·k``, the size of the grid; None means ``N`` (no pair masked).

    Returns:
        ``[T·k, ...]`` where row ``t·k + j`` belongs to token ``t``'s ``j``-th choice.
    """
    n = routes.order.numel()
    num_pairs = n if num_pairs is None else num_pairs
    inverse = _inverse_permutation(routes, num_pairs)
    if n < num_pairs:
        values = torch.cat([values, values.new_zeros(1, *values.shape[1:])])
    return values.index_select(0, inverse)


class _Combine(torch.autograd.Function):
    """``y[t] = Σ_j w[t, j] · y_sorted[inverse[t, j]]`` with hand-written gradients.

    Forward: one ``embedding_bag`` (gather and weighted sum fused). Backward: the output
    gradient is gathered once per pair (``g[token_index]``); that one ``[N, d]`` buffer gives
    the gate gradients (a row-wise dot with ``y_sorted``) and then, scaled in place by the
    pair's gate, the experts' output gradient.
    """

    @staticmethod
    def forward(ctx, y_sorted, weights, token_index, order, inverse):  # type: ignore[override]
        index, keep = _pair_rows(inverse, y_sorted.shape[0])
        w = weights.to(y_sorted.dtype)
        ctx.save_for_backward(y_sorted, w, token_index, order)
        ctx.weights_dtype = weights.dtype
        return _bag_sum(y_sorted, index, w if keep is None else w * keep)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        y_sorted, w, token_index, order = ctx.saved_tensors
        g_rows = _bag_sum(grad, token_index[:, None], None)  # [N, d]: each pair's token gradient
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = w.new_zeros(w.numel())
            grad_w[order] = torch.linalg.vecdot(g_rows, y_sorted)
            grad_w = grad_w.view(w.shape).to(ctx.weights_dtype)
        w_sorted = w.reshape(-1).index_select(0, order)[:, None]
        # In place unless a double backward is recording this graph (vecdot has saved g_rows).
        grad_y = g_rows * w_sorted if torch.is_grad_enabled() else g_rows.mul_(w_sorted)
        return grad_y, grad_w, None, None, None


def combine(y_sorted: Tensor, combine_weights: Tensor, routes: SortedPairs) -> Tensor:
    """Mix the expert outputs of each token: ``y[t] = Σ_j combine_weights[t, j] · y_pair(t, j)``.

    This is eq. 1 of Shazeer et al. (2017), ``y = Σ_i G(x)_i E_i(x)``, over the ``k`` non-zero
    gates of each token; a masked (not computed) pair contributes nothing.

    Args:
        y_sorted: ``[N, d]`` expert outputs in :class:`SortedPairs` order.
        combine_weights: ``[T, k]`` gate values.
        routes: from :func:`sort_by_expert`.

    Returns:
        ``[T, d]`` in the dtype of ``y_sorted``.
    """
    t, k = combine_weights.shape
    inverse = _inverse_permutation(routes, t * k).view(t, k)
    return _Combine.apply(y_sorted, combine_weights, routes.token_index, routes.order, inverse)


def dispatch_combine(
    x: Tensor,
    expert_indices: Tensor,
    combine_weights: Tensor,
    experts: Experts,
    valid: Tensor | None = None,
) -> tuple[Tensor, SortedPairs]:
    """Run every token through its chosen experts and mix the results by the gates.

    Args:
        x: ``[T, d]`` tokens.
        expert_indices: ``[T, k]`` int64 experts chosen per token.
        combine_weights: ``[T, k]`` gate value of each choice.
        experts: an expert bank mapping ``([N, d] rows sorted by expert, SortedPairs)`` to
            ``[N, d_out]``.
        valid: ``[T, k]`` bool, the pairs to compute; a masked pair is not computed and adds
            nothing to its token's output. None computes every pair.

    Returns:
        ``([T, d_out] outputs, SortedPairs)``; ``SortedPairs.tokens_per_expert`` is the true load.
    """
    routes = sort_by_expert(expert_indices, experts.num_experts, valid)
    # gather_tokens and combine, sharing one inverse permutation.
    inverse = _inverse_permutation(routes, expert_indices.numel()).view(expert_indices.shape)
    y_sorted = experts(_GatherTokens.apply(x, routes.token_index, inverse), routes)
    y = _Combine.apply(y_sorted, combine_weights, routes.token_index, routes.order, inverse)
    return y, routes


_MOVED_TO_CAPACITY = ("CAPACITY_GROUPS", "DROP_POLICIES", "Capacity", "capacity_mask")


def __getattr__(name: str) -> object:
    """Deprecated aliases: ``Routes`` (now :class:`SortedPairs`) and the capacity names that
    moved to :mod:`sparsemoe.capacity`."""
    if name == "Routes":
        return deprecated_alias(__name__, name, "sparsemoe.dispatch.SortedPairs", SortedPairs)
    if name in _MOVED_TO_CAPACITY:
        from . import capacity

        return deprecated_alias(__name__, name, f"sparsemoe.capacity.{name}",
                                getattr(capacity, name))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
