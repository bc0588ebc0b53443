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
- masked pairs are sorted behind every valid pair, past the last expert's block: the grouped
  matmul does not compute them, so they cost nothing, and the combine reads them as zero;
- no host synchronisation: block sizes stay on the device (``grouped_mm``'s ``offs``) and no
  row count depends on the data, so the forward and backward run under
  ``torch.compile(fullgraph=True, dynamic=True)`` as one graph for every token count.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from . import few_rows
from ._checks import autocast_dtype, check_choice, deprecated_alias
from .memory import GradientBuffers, pool_of

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
    """The ``N = T·k`` (token, expert) pairs of a routing grid, sorted by expert (stable: token
    order kept).

    With a validity mask the pairs that are not computed (masked) sort behind every computed
    pair: the computed pairs are the first ``tokens_per_expert.sum()`` rows. The masked ones
    still have rows in the expert bank's input and output, which are not computed
    (:func:`grouped_matmul` returns 0 there; an expert bank must leave them finite) and which
    the combine weighs with 0. Their number is never read on the host, so the dispatch has no
    host synchronisation.

    Attributes:
        order: ``[N]`` position of each sorted pair in the flattened ``[T, k]`` routing grid.
        token_index: ``[N]`` the token of each sorted pair (``order // k``).
        expert_index: ``[N]`` the expert of each sorted pair, non-decreasing (``n - 1`` for a
            masked pair, so that it indexes per-expert parameters in range).
        tokens_per_expert: ``[n]`` int64, the size of each expert's block of computed rows.
        computed: ``[N]`` bool, False for a masked pair; None when every pair is computed.
    """

    order: Tensor
    token_index: Tensor
    expert_index: Tensor
    tokens_per_expert: Tensor
    computed: Tensor | None = None


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
        :class:`SortedPairs` over all ``T·k`` pairs, the masked ones last.
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
    computed = None
    if valid is not None:
        tokens_per_expert = tokens_per_expert[:num_experts]
        computed = expert_index < num_experts
        expert_index = expert_index.clamp(max=num_experts - 1)
    token_index = torch.div(order, k, rounding_mode="floor")
    return SortedPairs(order, token_index, expert_index, tokens_per_expert, computed)


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
            and w.shape[2] >= DECODE_MIN_COLUMNS and w.is_contiguous())


def _grouped_mm_supported(x: Tensor, w: Tensor) -> bool:
    if not hasattr(F, "grouped_mm") or x.dtype not in _GROUPED_MM_DTYPES:
        return False
    # torch's grouped GEMM (CPU and CUDA) needs row strides that are multiples of 16 bytes.
    if any(s * x.element_size() % 16 for s in w.shape[1:]):
        return False
    if x.device.type == "cuda":
        return torch.cuda.get_device_capability(x.device) >= (8, 0)
    return x.device.type == "cpu"


def _resolve_impl(impl: str, x: Tensor, w: Tensor, transpose: bool = False) -> str:
    """The implementation ``impl="auto"`` stands for in the product ``x·w[e]`` (``x·w[e]ᵀ``
    if ``transpose``: the input gradient; the weight gradient follows the forward's) with these
    operands (see :data:`GROUPED_MM_IMPLS`); any other ``impl`` is returned as it is."""
    if impl != "auto":
        return impl
    if decode_sized(x, w):
        return "loop"
    if (few_rows.supported(x, w) and x.dtype != torch.float64
            and few_rows.preferred(x.shape[0], w.shape[0], few_rows.dot_form(w, transpose))
            and few_rows.library() is not None):
        return "few_rows"
    return "grouped_mm" if _grouped_mm_supported(x, w) else "loop"


def _offsets(tokens_per_expert: Tensor) -> Tensor:
    """``grouped_mm``'s ``offs``: the int32 end row of each expert's block, on the device."""
    return torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)


def _blocks(x: Tensor, sizes: list[int]) -> tuple[Tensor, ...]:
    """The experts' row blocks of ``x`` (rows of masked pairs, after the last block, left out)."""
    return x[:sum(sizes)].split(sizes)


def _zero_rows_after_blocks(y: Tensor, tokens_per_expert: Tensor) -> Tensor:
    """``y`` with the rows after the last block (masked pairs, which the kernels leave
    unwritten) set to 0 in place: on a CPU by their count (reading it costs nothing there), on
    other devices by a mask computed on the device (no host synchronisation)."""
    if y.device.type == "cpu":
        y[int(tokens_per_expert.sum()):].zero_()
    else:
        rows = torch.arange(y.shape[0], device=y.device)
        y.masked_fill_((rows >= tokens_per_expert.sum())[:, None], 0)
    return y


def _product(x: Tensor, w: Tensor, tokens_per_expert: Tensor, impl: str,
             transpose: bool = False) -> Tensor:
    """``x_e · w[e]`` (``x_e · w[e]ᵀ`` with ``transpose``) for every block, 0 for the rows after
    the last block, for a resolved ``impl``; not differentiable for ``"few_rows"``."""
    if impl == "few_rows":
        y = (few_rows.input_grad if transpose else few_rows.forward)(x, w, tokens_per_expert)
        return _zero_rows_after_blocks(y, tokens_per_expert)
    if transpose:
        w = w.transpose(1, 2)
    if impl == "grouped_mm":
        y = F.grouped_mm(x, w, offs=_offsets(tokens_per_expert))
        return _zero_rows_after_blocks(y, tokens_per_expert)
    sizes = tokens_per_expert.tolist()  # "loop": a host synchronisation
    blocks = [xe @ we for xe, we, s in zip(_blocks(x, sizes), w.unbind(0), sizes, strict=True)
              if s]
    if not blocks:  # no computed row (all masked, or none): an empty product, in the graph
        return x @ w[0] * 0
    rest = x.shape[0] - sum(sizes)
    if rest:  # rows of masked pairs
        blocks.append(x.new_zeros(rest, w.shape[2]))
    return torch.cat(blocks)


def _weight_grad(x: Tensor, dy: Tensor, w: Tensor, tokens_per_expert: Tensor, impl: str,
                 pool: GradientBuffers | None = None) -> Tensor:
    """``dw[e] = x_eᵀ · dy_e`` (zero for an expert without rows) for a resolved ``impl``, laid
    out like ``w``: for a transposed view of a contiguous weight (``transformers``' experts) it
    is computed as ``(dy_eᵀ · x_e)ᵀ`` in the storage's layout, so that accumulating it into the
    parameter's gradient copies nothing. In memory of ``pool`` when given.

    Shape: ``x [N, p]``, ``dy [N, q]``, ``w [n, p, q]`` → ``[n, p, q]``."""
    if few_rows.transposed_view(w):
        storage = w.transpose(1, 2)
        out = None if pool is None else pool.take(storage)
        return _blockwise_weight_grad(dy, x, tokens_per_expert, impl, out).transpose(1, 2)
    out = None if pool is None else pool.take(w)
    return _blockwise_weight_grad(x, dy, tokens_per_expert, impl, out)


def _blockwise_weight_grad(x: Tensor, dy: Tensor, tokens_per_expert: Tensor, impl: str,
                           out: Tensor | None = None) -> Tensor:
    """``dw[e] = x_eᵀ · dy_e`` (zero for an expert without rows) for a resolved ``impl``,
    written into ``out`` when given. Shape: ``x [N, p]``, ``dy [N, q]`` → ``[n, p, q]``."""
    if impl == "few_rows":
        return few_rows.weight_grad(x, dy, tokens_per_expert, out)
    if impl == "grouped_mm" and out is None and x.device.type != "cpu":
        return F.grouped_mm(x.t(), dy, offs=_offsets(tokens_per_expert))
    if out is None:
        out = x.new_empty(tokens_per_expert.numel(), x.shape[1], dy.shape[1])
    sizes = tokens_per_expert.tolist()  # a host synchronisation (free on a CPU)
    for e, (xe, ge, s) in enumerate(zip(_blocks(x, sizes), _blocks(dy, sizes), sizes,
                                        strict=True)):
        if s:
            torch.mm(xe.t(), ge, out=out[e])
        else:
            out[e].zero_()
    return out


def _differentiable_product(x: Tensor, w: Tensor, tokens_per_expert: Tensor,
                            impl: str) -> Tensor:
    """:func:`_product` built from differentiable operations (for higher derivatives)."""
    if impl == "few_rows":
        y = few_rows.FewRowsMatmul.apply(x, w, tokens_per_expert)
        return _zero_rows_after_blocks(y, tokens_per_expert)
    return _product(x, w, tokens_per_expert, impl)


class _GroupedMatmul(torch.autograd.Function):
    """:func:`grouped_matmul` with its derivative: ``dx = dy·wᵀ`` blockwise (0 for the rows
    after the last block), ``dw[e] = x_eᵀ·dy_e`` (zero for an expert without rows), written
    into memory of a :class:`~sparsemoe.memory.GradientBuffers` when one is given."""

    @staticmethod
    def forward(ctx, x, w, tokens_per_expert, impl, buffers):  # type: ignore[override]
        ctx.save_for_backward(x, w, tokens_per_expert)
        # the forward's resolution serves the weight gradient too; the input gradient has its own
        ctx.impl, ctx.resolved, ctx.buffers = impl, _resolve_impl(impl, x, w), buffers
        return _product(x, w, tokens_per_expert, ctx.resolved)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, w, tokens_per_expert = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # create_graph: differentiate a differentiable forward
            inputs = [t for t, need in ((x, need_x), (w, need_w)) if need]
            with torch.enable_grad():
                y = _differentiable_product(x, w, tokens_per_expert, ctx.resolved)
            grads = list(torch.autograd.grad(y, inputs, dy, create_graph=True))
            dx = grads.pop(0) if need_x else None
            return dx, grads.pop(0) if need_w else None, None, None, None
        dy = dy.contiguous()  # an expanded gradient (of a sum) has strides grouped_mm rejects
        dx = None
        if need_x:
            dx = _product(dy, w, tokens_per_expert,
                          _resolve_impl(ctx.impl, dy, w, transpose=True), transpose=True)
        dw = _weight_grad(x, dy, w, tokens_per_expert, ctx.resolved, ctx.buffers) if need_w \
            else None
        return dx, dw, None, None, None


@torch.library.custom_op("sparsemoe::grouped_matmul", mutates_args=())
def _grouped_matmul_op(x: Tensor, w: Tensor, tokens_per_expert: Tensor, impl: str,
                       transpose: bool) -> Tensor:
    """:func:`_product` as one operator of a compiled graph: ``impl`` (``"auto"`` too) is
    resolved here, on the run's concrete shapes, so the graph holds no guard on them and the
    few-row kernel runs in it."""
    return _product(x, w, tokens_per_expert, _resolve_impl(impl, x, w, transpose), transpose)


@_grouped_matmul_op.register_fake
def _(x, w, tokens_per_expert, impl, transpose):
    return x.new_empty(x.shape[0], w.shape[1] if transpose else w.shape[2])


@torch.library.custom_op("sparsemoe::grouped_weight_grad", mutates_args=())
def _grouped_weight_grad_op(x: Tensor, dy: Tensor, w: Tensor, tokens_per_expert: Tensor,
                            impl: str) -> Tensor:
    """:func:`_weight_grad` of ``sparsemoe::grouped_matmul`` (``impl`` resolved as there),
    written into the memory of the weight's :class:`~sparsemoe.memory.GradientBuffers` where
    the expert bank attached one (:func:`~sparsemoe.memory.attach_pool`)."""
    pool = pool_of(w) if w.device.type == "cpu" else None
    return _weight_grad(x, dy, w, tokens_per_expert, _resolve_impl(impl, x, w), pool)


@_grouped_weight_grad_op.register_fake
def _(x, dy, w, tokens_per_expert, impl):
    if few_rows.transposed_view(w):  # laid out like w (see _weight_grad)
        return x.new_empty(w.shape[0], dy.shape[1], x.shape[1]).transpose(1, 2)
    return x.new_empty(w.shape[0], x.shape[1], dy.shape[1])


def _setup_grouped_matmul_op(ctx, inputs, output):
    x, w, tokens_per_expert, impl, transpose = inputs
    if transpose:
        raise RuntimeError("sparsemoe::grouped_matmul: the input gradient of a compiled grouped "
                           "matmul is not differentiable again (double backward needs eager)")
    ctx.save_for_backward(x, w, tokens_per_expert)
    ctx.impl = impl


def _backward_grouped_matmul_op(ctx, dy):
    x, w, tokens_per_expert = ctx.saved_tensors
    dy = dy.contiguous()
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = torch.ops.sparsemoe.grouped_matmul(dy, w, tokens_per_expert, ctx.impl, True)
    if ctx.needs_input_grad[1]:
        dw = torch.ops.sparsemoe.grouped_weight_grad(x, dy, w, tokens_per_expert, ctx.impl)
    return dx, dw, None, None, None


_grouped_matmul_op.register_autograd(_backward_grouped_matmul_op,
                                     setup_context=_setup_grouped_matmul_op)


def grouped_matmul(
    x: Tensor,
    w: Tensor,
    tokens_per_expert: Tensor,
    impl: str = "auto",
    grad_buffers: GradientBuffers | None = None,
) -> Tensor:
    """Row block ``e`` of ``x`` times ``w[e]``, for every expert ``e`` at once.

    ``out[r] = x[r] @ w[e(r)]`` where ``e(r)`` is the block row ``r`` falls in; rows after the
    last block (masked pairs, see :class:`SortedPairs`) are 0, and so is their gradient.
    Autocast-aware: under ``torch.autocast`` both operands are cast to the autocast dtype, as
    ``F.linear`` does. Under ``torch.compile`` it is one operator of the graph
    (``sparsemoe::grouped_matmul``, whose ``"auto"`` is resolved when it runs, so the graph
    does not depend on the number of rows, and the few-row kernel runs in it). Only
    ``impl="loop"`` (and, on a GPU, the weight gradient of ``"loop"``) reads
    ``tokens_per_expert`` on the host.

    Args:
        x: ``[N, p]`` rows sorted by expert.
        w: ``[n, p, q]`` one matrix per expert.
        tokens_per_expert: ``[n]`` integer block sizes summing to at most ``N``.
        impl: one of :data:`GROUPED_MM_IMPLS`.
        grad_buffers: on a CPU, write ``w``'s gradient into memory this pool keeps across
            backward passes instead of a fresh allocation (see
            :class:`~sparsemoe.memory.GradientBuffers`; the gradient's value is the same).
            Not used under autocast or on other devices, whose allocators keep freed memory.
            Under ``torch.compile`` the pool :func:`~sparsemoe.memory.attach_pool` attached to
            ``w`` is used instead (the expert banks attach theirs).

    Returns:
        ``[N, q]``.
    """
    dt = autocast_dtype(x.device.type)
    if dt is not None:
        x, w = x.to(dt), w.to(dt)
    check_choice("impl", impl, GROUPED_MM_IMPLS)
    if impl == "few_rows" and not few_rows.supported(x, w):
        raise ValueError(f"impl='few_rows' needs CPU tensors of one dtype among "
                         f"{tuple(few_rows.DTYPES)}, got x {x.dtype} on {x.device.type}, "
                         f"w {w.dtype} on {w.device.type}")
    if torch.compiler.is_compiling():
        return torch.ops.sparsemoe.grouped_matmul(x, w, tokens_per_expert, impl, False)
    if grad_buffers is None or dt is not None or w.device.type != "cpu":
        grad_buffers = None
    return _GroupedMatmul.apply(x, w, tokens_per_expert, impl, grad_buffers)


def _inverse_permutation(routes: SortedPairs) -> Tensor:
    """``[N]`` the sorted position of each grid pair."""
    inverse = torch.empty_like(routes.order)
    inverse[routes.order] = torch.arange(routes.order.numel(), device=inverse.device)
    return inverse


def _zero_masked(rows: Tensor, computed: Tensor | None) -> Tensor:
    """``rows`` (``[N, ...]`` in sorted order) with the rows of masked pairs set to 0."""
    if computed is None:
        return rows
    return torch.where(computed.view(-1, *[1] * (rows.dim() - 1)), rows, 0)


def _grid_weights(computed: Tensor | None, inverse: Tensor) -> Tensor | None:
    """``[T, k]`` 1 for a computed pair, 0 for a masked one, in grid order (None: all 1): the
    per-pair weights with which the bag sums leave masked rows out (their values are finite:
    the grouped matmul returns 0 there, and the experts map it to finite values)."""
    return None if computed is None else computed[inverse]


def _bag_sum(src: Tensor, index: Tensor, weights: Tensor | None) -> Tensor:
    """``out[t] = Σ_j weights[t, j] · src[index[t, j]]`` for ``index [T, k]``: one fused gather
    and weighted sum (``F.embedding_bag``), without building the ``[T, k, d]`` intermediate."""
    if weights is not None:
        weights = weights.to(src.dtype)
    return F.embedding_bag(index, src, mode="sum", per_sample_weights=weights)


class _GatherTokens(torch.autograd.Function):
    """``x[token_index]`` whose gradient is a gather through the inverse permutation and a sum
    over each token's ``k`` pairs, not ``index_select``'s scattering ``index_add``."""

    @staticmethod
    def forward(ctx, x, token_index, inverse, computed):  # type: ignore[override]
        ctx.save_for_backward(inverse, computed)
        return x.index_select(0, token_index)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        inverse, computed = ctx.saved_tensors
        return _bag_sum(grad, inverse, _grid_weights(computed, inverse)), None, None, None


def gather_tokens(x: Tensor, routes: SortedPairs, k: int) -> Tensor:
    """The input row of every pair, in :class:`SortedPairs` order: ``x[routes.token_index]``.

    Args:
        x: ``[T, d]`` tokens.
        routes: from :func:`sort_by_expert` over a ``[T, k]`` routing grid.
        k: choices per token.

    Returns:
        ``[N, d]``; its gradient flows back through the inverse permutation (a gather that sums
        each token's ``k`` pairs; masked pairs pass no gradient).
    """
    inverse = _inverse_permutation(routes).view(-1, k)
    return _GatherTokens.apply(x, routes.token_index, inverse, routes.computed)


def unsort(values: Tensor, routes: SortedPairs) -> Tensor:
    """Put per-pair values from :class:`SortedPairs` order back into flattened ``[T·k]`` grid order.

    A gather through the inverse permutation: deterministic, no atomic adds. Grid positions of
    pairs that were not computed (masked) read a zero row.

    Args:
        values: ``[N, ...]`` in sorted order.
        routes: from :func:`sort_by_expert`.

    Returns:
        ``[T·k, ...]`` where row ``t·k + j`` belongs to token ``t``'s ``j``-th choice.
    """
    return _zero_masked(values, routes.computed).index_select(0, _inverse_permutation(routes))


class _Combine(torch.autograd.Function):
    """``y[t] = Σ_j w[t, j] · y_sorted[inverse[t, j]]`` with hand-written gradients; masked
    pairs count with weight 0 and get no gradient.

    Forward: one ``embedding_bag`` (gather and weighted sum fused). Backward: the output
    gradient is gathered once per pair (``g[token_index]``); that one ``[N, d]`` buffer gives
    the gate gradients (a row-wise dot with ``y_sorted``) and then, scaled in place by the
    pair's gate (0 for a masked pair), the experts' output gradient.
    """

    @staticmethod
    def forward(ctx, y_sorted, weights, token_index, order, inverse,  # type: ignore[override]
                computed):
        w = weights.to(y_sorted.dtype)
        ctx.save_for_backward(y_sorted, w, token_index, order, computed, inverse)
        ctx.weights_dtype = weights.dtype
        keep = _grid_weights(computed, inverse)
        return _bag_sum(y_sorted, inverse, w if keep is None else w * keep)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        y_sorted, w, token_index, order, computed, inverse = ctx.saved_tensors
        g_rows = _bag_sum(grad, token_index[:, None], None)  # [N, d]: each pair's token gradient
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.empty_like(w.reshape(-1))
            grad_w[order] = torch.linalg.vecdot(g_rows, y_sorted)
            grad_w = grad_w.view(w.shape)
            keep = _grid_weights(computed, inverse)
            grad_w = (grad_w if keep is None else grad_w * keep).to(ctx.weights_dtype)
        w_sorted = _zero_masked(w.reshape(-1).index_select(0, order), computed)[:, None]
        # In place unless a double backward is recording this graph (vecdot has saved g_rows).
        grad_y = g_rows * w_sorted if torch.is_grad_enabled() else g_rows.mul_(w_sorted)
        return grad_y, grad_w, None, None, None, None


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
    inverse = _inverse_permutation(routes).view(combine_weights.shape)
    return _Combine.apply(y_sorted, combine_weights, routes.token_index, routes.order, inverse,
                          routes.computed)


def dispatch_combine(
    x: Tensor,
    expert_indices: Tensor,
    combine_weights: Tensor,
    experts: Experts,
    valid: Tensor | None = None,
) -> tuple[Tensor, SortedPairs]:
    """Run every token through its chosen experts and mix the results by the gates.

    No host synchronisation (with the stacked expert banks and ``impl`` other than
    ``"loop"``): block sizes stay on the device, and masked pairs are carried to the end of
    the sorted rows instead of being cut off.

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
    inverse = _inverse_permutation(routes).view(expert_indices.shape)
    x_sorted = _GatherTokens.apply(x, routes.token_index, inverse, routes.computed)
    y_sorted = experts(x_sorted, routes)
    y = _Combine.apply(y_sorted, combine_weights, routes.token_index, routes.order, inverse,
                       routes.computed)
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
