"""The exchange of expert parallelism: the differentiable ``all_to_all``, the
:class:`ExpertParallel` bank, the experts' split over the ranks and the per-rank random stream.

Below :mod:`sparsemoe.layers`: it imports the dispatch and the expert banks, never a layer.
See :mod:`sparsemoe.parallel` for the algorithm.

Index letters: ``W`` ranks, ``n`` experts, ``n_l = n/W`` experts per rank, ``N`` rows this
rank sends, ``M`` rows this rank's experts compute, ``d`` width.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import _functional_collectives as funcol

from .._checks import autocast_dtype, check_expert_bank, check_int
from ..dispatch import SortedPairs, gather_tokens, sort_by_expert, unsort
from ..experts import FeedForwardExperts

ProcessGroup = dist.ProcessGroup


def _resolved(group: ProcessGroup | None) -> ProcessGroup:
    """The process group that ``None`` stands for: the default group."""
    return group if group is not None else dist.group.WORLD


def all_to_all(
    x: Tensor, recv_rows: list[int], send_rows: list[int], group: ProcessGroup | None = None
) -> Tensor:
    """Differentiable ``all_to_all_single`` with uneven splits: rows ``send_rows[j]`` of ``x``
    go to rank ``j``; ``recv_rows[j]`` rows come from rank ``j``, in rank order.

    torch's functional collective (``all_to_all_single_autograd``): ``torch.compile`` traces
    it as one operator of the graph, with ``recv_rows`` and ``send_rows`` symbolic where they
    were read from tensors. The backward is the reverse exchange. It runs where ``x`` requires
    a gradient, so every rank of the group must pass an ``x`` that requires a gradient, or
    none may (the same model on every rank does): a rank that skipped it would leave the
    others waiting in theirs.

    Args:
        x: ``[sum(send_rows), ...]``.
        recv_rows, send_rows: ``W`` row counts each.
        group: the process group (None: the default group).

    Returns:
        ``[sum(recv_rows), ...]``, a plain tensor: the collective waited for (``wait_tensor``,
        an identity for autograd). Eagerly the functional collective returns an
        ``AsyncCollectiveTensor`` that waits at its first non-view operation; a view of it
        (a reshape) handed to a kernel that reads the memory itself (the few-row grouped
        GEMM's ``data_ptr``) would read a wrapper, not the rows.
    """
    y = funcol.all_to_all_single_autograd(x.contiguous(), recv_rows, send_rows,
                                          _resolved(group))
    return funcol.wait_tensor(y)


@dataclass(frozen=True)
class ExchangeStats:
    """What one forward of an :class:`ExpertParallel` bank moved, seen from one rank.

    Bytes "sent" leave the rank: the rows a rank keeps for its own experts are not counted.
    A training step moves each exchange twice: the backward sends the gradients of the rows
    it received, in the reverse direction.

    Attributes:
        rank: this rank's index in the group.
        rows_sent: ``[W]`` rows dispatched to each rank (own rank included).
        rows_received: ``[W]`` rows received from each rank; the combine returns them.
        bytes_in_row: bytes of one dispatched row (``d`` × element size).
        bytes_out_row: bytes of one returned row (``d_out`` × element size).
        count_bytes: bytes of the per-expert counts sent to the other ranks.
        multiply_adds_per_row: of the local experts (None when the bank does not say).
        io_per_row: numbers entering and leaving an expert per row (``d + d_out``).
        dropped_rows: with an ``exchange_capacity``, the rows beyond it that this rank did not
            send (a 0-dim tensor, read when logging: reading it waits for the device); None
            for the exact exchange.
        routed_rows: with an ``exchange_capacity``, the rows this rank's router chose (sent
            or dropped; a 0-dim tensor, as ``dropped_rows``); None for the exact exchange.
    """

    rank: int
    rows_sent: tuple[int, ...]
    rows_received: tuple[int, ...]
    bytes_in_row: int
    bytes_out_row: int
    count_bytes: int
    multiply_adds_per_row: int | None
    io_per_row: int
    dropped_rows: Tensor | None = field(default=None, compare=False)
    routed_rows: Tensor | None = field(default=None, compare=False)

    @property
    def remote_rows_sent(self) -> int:
        return sum(self.rows_sent) - self.rows_sent[self.rank]

    @property
    def remote_rows_received(self) -> int:
        return sum(self.rows_received) - self.rows_received[self.rank]

    @property
    def forward_bytes_sent(self) -> int:
        """Dispatched rows to other ranks, their outputs back to them, and the counts."""
        return (self.remote_rows_sent * self.bytes_in_row
                + self.remote_rows_received * self.bytes_out_row + self.count_bytes)

    @property
    def backward_bytes_sent(self) -> int:
        """The reverse exchanges: gradients of the returned rows, then of the dispatched ones."""
        return (self.remote_rows_sent * self.bytes_out_row
                + self.remote_rows_received * self.bytes_in_row)

    @property
    def step_bytes_sent(self) -> int:
        """Bytes sent in one training step (forward and backward) by this layer."""
        return self.forward_bytes_sent + self.backward_bytes_sent

    @property
    def expert_multiply_adds(self) -> int | None:
        """Multiply-adds of this rank's experts in the forward (``M`` rows), or None."""
        if self.multiply_adds_per_row is None:
            return None
        return sum(self.rows_received) * self.multiply_adds_per_row

    @property
    def step_expert_multiply_adds(self) -> int | None:
        """Multiply-adds of this rank's experts in one training step: the forward and, in the
        backward, two products of the same size per matmul (input and weight gradients)."""
        forward = self.expert_multiply_adds
        return None if forward is None else 3 * forward

    @property
    def compute_to_io(self) -> float | None:
        """Expert multiply-adds per number entering or leaving an expert: the hidden width
        ``h`` for one-hidden-layer experts (the paper's §3.2)."""
        if self.multiply_adds_per_row is None:
            return None
        return self.multiply_adds_per_row / self.io_per_row

    def as_dict(self) -> dict[str, float | int | None]:
        """The scalar quantities, for logging."""
        return {"forward_bytes_sent": self.forward_bytes_sent,
                "step_bytes_sent": self.step_bytes_sent,
                "expert_multiply_adds": self.expert_multiply_adds,
                "step_expert_multiply_adds": self.step_expert_multiply_adds,
                "compute_to_io": self.compute_to_io,
                "rows_computed": sum(self.rows_received)}


def require_distributed() -> None:
    """Raise a RuntimeError that says how to start one unless a default process group is
    initialised."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert parallelism needs an initialised torch.distributed process "
                           "group: call torch.distributed.init_process_group() first (torchrun "
                           "sets up its environment)")


def local_share(num_experts: int, group: ProcessGroup | None = None) -> tuple[int, int]:
    """``(n/W, first expert)`` of this rank for ``num_experts`` experts over ``group``.

    Raises:
        RuntimeError: the default process group is not initialised.
        ValueError: ``num_experts`` is not divisible by the group's size.
    """
    require_distributed()
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if num_experts % world:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by the process group's "
                         f"size ({world}): every rank holds num_experts / size experts")
    n_local = num_experts // world
    return n_local, rank * n_local


class ExpertParallel(nn.Module):
    """An expert bank whose ``n`` experts are spread over the ``W`` ranks of a process group.

    It holds this rank's ``n/W`` experts in :attr:`local` (any expert bank; the experts of rank
    ``r`` are the global experts ``r·n/W …``) and behaves as a bank of all ``n``: rows sorted
    by global expert go in, their outputs come out in the same order. Between, the rows travel
    to the rank of their expert and back (see the module docstring); the local bank runs the
    same grouped path as one process. Under autocast the rows travel in the autocast dtype
    (the experts would cast them anyway), halving the bytes for bfloat16.

    After each forward, :attr:`last_exchange` holds the :class:`ExchangeStats`.

    Two exchanges:

    - exact (``exchange_capacity=None``): the ranks first exchange their per-expert counts and
      read them on the host (one ``.tolist()``), then every row travels, with uneven splits;
    - padded (``exchange_capacity=C``, GShard's static shapes): each rank sends exactly ``C``
      rows to each expert, its first ``C`` rows for that expert in sorted order (token
      order) and zeros after them; rows beyond ``C`` are dropped (output 0, no gradient, as a
      capacity's dropped pairs: the token keeps its other experts). Every shape is fixed, so
      nothing is read on the host; each expert computes ``W·C`` rows, padding included (its
      outputs are discarded and contribute no gradient). With ``C`` at least the most rows a
      rank sends one expert, it equals the exact exchange.

    Args:
        local: this rank's expert bank (``num_experts`` = ``n/W``).
        group: the process group (None: the default group).
        exchange_capacity: rows each rank sends to each expert (padded exchange), or None
            (exact exchange).

    Raises:
        TypeError: ``local`` is not an expert bank, or ``exchange_capacity`` not an int.
        ValueError: ``exchange_capacity`` is below 1.
        RuntimeError: no process group is initialised.

    Shape:
        ``[N, d]`` rows sorted by global expert, with :class:`~sparsemoe.dispatch.SortedPairs` over
        ``n`` experts → ``[N, d_out]``.
    """

    def __init__(self, local: nn.Module, group: ProcessGroup | None = None,
                 exchange_capacity: int | None = None) -> None:
        super().__init__()
        check_expert_bank("local", local)
        if exchange_capacity is not None:
            check_int("exchange_capacity", exchange_capacity)
        require_distributed()
        self.exchange_capacity = exchange_capacity
        self.local = local
        self.group = group
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.num_local_experts = local.num_experts
        self.num_experts = local.num_experts * self.world_size
        self.first_expert = self.rank * self.num_local_experts
        self.last_exchange: ExchangeStats | None = None

    def forward(self, x: Tensor, routes: SortedPairs) -> Tensor:
        dt = autocast_dtype(x.device.type)
        if dt is not None:
            x = x.to(dt)
        if self.exchange_capacity is not None:
            return self._padded(x, routes, self.exchange_capacity)
        w, n_local = self.world_size, self.num_local_experts
        send = routes.tokens_per_expert.reshape(w, n_local).contiguous()  # [W, n_l]
        recv = funcol.all_to_all_single(send, None, None, _resolved(self.group))  # [W, n_l]
        # the one host read; symbolic sizes under torch.compile with capture_scalar_outputs
        send_rows, recv_rows = torch.stack([send.sum(1), recv.sum(1)]).tolist()
        masked = x.shape[0] - sum(send_rows)  # rows of masked pairs, last (see SortedPairs)
        x = x[:sum(send_rows)]
        x_recv = all_to_all(x, recv_rows, send_rows, self.group)  # [M, d]: by rank, then expert
        m = x_recv.shape[0]
        expert = torch.arange(n_local, device=x.device).repeat(w)
        expert = expert.repeat_interleave(recv.reshape(-1), output_size=m)  # [M] local expert
        local_routes = sort_by_expert(expert[:, None], n_local)
        y_local = self.local(gather_tokens(x_recv, local_routes, 1), local_routes)
        y = all_to_all(unsort(y_local, local_routes), send_rows, recv_rows, self.group)
        torch._check(masked >= 0)  # for the compiler: sizes it cannot see are not negative
        y = torch.cat([y, y.new_zeros(masked, y.shape[1])])
        self._record(x, y_local, send_rows, recv_rows, (w - 1) * n_local * send.element_size())
        return y

    def _padded(self, x: Tensor, routes: SortedPairs, capacity: int) -> Tensor:
        """The padded exchange (see the class): ``[N, d]`` → ``[N, d_out]``, fixed shapes."""
        w, n_local, n = self.world_size, self.num_local_experts, self.num_experts
        rows = torch.arange(x.shape[0], device=x.device)
        start = routes.tokens_per_expert.cumsum(0) - routes.tokens_per_expert  # [n]
        position = rows - start[routes.expert_index]  # [N] within the row's expert
        sent = position < capacity
        if routes.computed is not None:
            sent = sent & routes.computed
        # slot e·C + position in the [n·C] send buffer; rows not sent go to a last, dropped slot
        slot = torch.where(sent, routes.expert_index * capacity + position, n * capacity)
        buffer = x.new_zeros(n * capacity + 1, x.shape[1]).index_add(0, slot, x)
        per_rank = [n_local * capacity] * w
        x_recv = all_to_all(buffer[:-1], per_rank, per_rank, self.group)  # [W·n_l·C, d]
        # by local expert, then sending rank: each expert's W·C rows in one block
        x_local = x_recv.reshape(w, n_local, capacity, -1).transpose(0, 1)
        x_local = x_local.reshape(w * n_local * capacity, -1)
        block = torch.full((n_local,), w * capacity, device=x.device)
        expert = torch.arange(n_local, device=x.device).repeat_interleave(
            w * capacity, output_size=w * n_local * capacity)
        local_rows = torch.arange(w * n_local * capacity, device=x.device)
        y_local = self.local(x_local, SortedPairs(local_rows, local_rows, expert, block))
        y_back = y_local.reshape(n_local, w, capacity, -1).transpose(0, 1)
        y_back = y_back.reshape(w * n_local * capacity, -1)
        y = all_to_all(y_back, per_rank, per_rank, self.group)  # [n·C, d_out] by global expert
        y = torch.cat([y, y.new_zeros(1, y.shape[1])]).index_select(0, slot)
        computed = sent.new_ones(x.shape[0]) if routes.computed is None else routes.computed
        dropped = (~sent & computed).sum()
        self._record(x, y_local, per_rank, per_rank, 0, dropped, computed.sum())
        return y

    def _record(self, x: Tensor, y_local: Tensor, send_rows: list[int], recv_rows: list[int],
                count_bytes: int, dropped: Tensor | None = None,
                routed: Tensor | None = None) -> None:
        self.last_exchange = ExchangeStats(
            rank=self.rank, rows_sent=tuple(send_rows), rows_received=tuple(recv_rows),
            bytes_in_row=x.shape[1] * x.element_size(),
            bytes_out_row=y_local.shape[1] * y_local.element_size(),
            count_bytes=count_bytes,
            multiply_adds_per_row=getattr(self.local, "multiply_adds_per_row", None),
            io_per_row=x.shape[1] + y_local.shape[1], dropped_rows=dropped, routed_rows=routed,
        )

    def extra_repr(self) -> str:
        padded = (f", exchange_capacity={self.exchange_capacity}"
                  if self.exchange_capacity is not None else "")
        return (f"num_experts={self.num_experts}, world_size={self.world_size}, "
                f"rank={self.rank}, experts {self.first_expert}..."
                f"{self.first_expert + self.num_local_experts - 1} on this rank{padded}")


def rank_seed(group: ProcessGroup | None = None) -> int:
    """A seed of this rank's own: one number drawn from the default stream (the same on every
    rank, so the default stream stays the same across ranks) plus the rank."""
    return int(torch.randint(2**62, ())) + dist.get_rank(group)


@contextmanager
def rank_seeded(group: ProcessGroup | None = None) -> Iterator[None]:
    """Draw from a random stream of this rank's own (seeded by :func:`rank_seed`), leaving the
    default stream as every other rank leaves it.

    For the initialisation of local experts: built from the same seed on every rank, they
    would otherwise be copies of each other.
    """
    seed = rank_seed(group)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def shard_experts(bank: FeedForwardExperts, group: ProcessGroup | None = None,
                  exchange_capacity: int | None = None) -> ExpertParallel:
    """This rank's share of a whole bank: experts ``r·n/W … (r+1)·n/W − 1`` of ``bank``
    (copied; ``bank`` is left unchanged), as an :class:`ExpertParallel` bank over ``group``
    with the exact exchange, or the padded one of ``exchange_capacity`` rows per expert.

    Raises:
        TypeError: ``bank`` is not a :class:`~sparsemoe.experts.FeedForwardExperts`.
        ValueError: its number of experts is not divisible by the group's size.
    """
    check_feed_forward_bank(bank, "bank")
    n_local, first = local_share(bank.num_experts, group)
    with torch.device("meta"):  # no initialisation work, no draw from the random stream
        local = FeedForwardExperts(n_local, bank.d_model, bank.hidden,
                                   activation=bank.activation, bias=bank.b1 is not None,
                                   impl=bank.impl, recompute=bank.recompute,
                                   reuse_grad_memory=bool(bank.grad_buffers))
    for name, p in bank.named_parameters(recurse=False):
        share = p.detach()[first : first + n_local].clone()
        setattr(local, name, nn.Parameter(share, requires_grad=p.requires_grad))
    return ExpertParallel(local, group, exchange_capacity)


def check_feed_forward_bank(bank: nn.Module, name: str) -> None:
    """``bank`` must be a :class:`~sparsemoe.experts.FeedForwardExperts` (parameters stacked
    over the experts), the one bank whose experts can be sliced and gathered."""
    if not isinstance(bank, FeedForwardExperts):
        raise TypeError(
            f"{name} must be a FeedForwardExperts bank (parameters stacked over the experts) to "
            f"be sharded or resharded, got {type(bank).__name__}; for other banks build each "
            f"rank's experts yourself and wrap them in ExpertParallel(local_bank, group)"
        )
