"""Expert parallelism over ``torch.distributed``: the experts are spread over the ranks of a
process group and the tokens travel to them (Shazeer et al. 2017, §3.1–3.2).

With world size ``W`` each rank holds ``n/W`` of the ``n`` experts (rank ``r`` holds experts
``r·n/W … (r+1)·n/W − 1``). Everything else (the gate, the layers around the MoE) is
data-parallel: every rank holds a copy and routes its own tokens. One forward of a layer:

1. the rank routes its ``T`` tokens and sorts its ``N`` (token, expert) pairs by expert
   (:func:`~sparsemoe.dispatch.sort_by_expert`); the sorted rows are then also grouped by the
   rank that holds their expert;
2. the ranks exchange their per-expert counts (``W × n/W`` integers), then the rows
   (``all_to_all_single`` with uneven splits);
3. each rank sorts the rows it received by local expert and runs its bank through the same
   grouped matmul as one process: every expert's batch holds the rows of all ``W`` ranks (the
   paper's remedy for the shrinking batch);
4. the outputs go back by the reverse exchange and are combined by the gates, as on one process.

The exchanges are autograd functions whose backward is the reverse exchange, so gradients
travel back the same way. Parallelism is chosen once, at construction: :class:`ExpertParallel`
is an expert bank like any other, and ``MoELayer.forward`` runs unchanged on it.

- :func:`expert_parallel` shards the banks of a model built for one process (the usual way:
  build the same model on every rank with the same seed, then shard it);
- :class:`GradientSync` makes the training split explicit: data-parallel gradients are
  averaged over the ranks, expert gradients stay on their rank;
- :func:`full_state_dict` / :func:`load_full_state_dict` (and the optimizer versions) save and
  load the single-process layout, so a checkpoint written by ``W`` ranks loads into ``W'``
  ranks or into one process, and back.

Every rank of the group must run each forward and backward of an expert-parallel layer (they
meet in the exchanges), in the same mode (training or evaluation, with or without gradients).

Index letters: ``W`` ranks, ``n`` experts, ``n_l = n/W`` experts per rank, ``N`` rows this
rank sends, ``M`` rows this rank's experts compute, ``d`` width.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._checks import autocast_dtype
from .dispatch import Routes, gather_tokens, sort_by_expert, unsort
from .experts import FeedForwardExperts

ProcessGroup = dist.ProcessGroup


def _exchange(x: Tensor, recv_rows: list[int], send_rows: list[int], group) -> Tensor:
    out = x.new_empty((sum(recv_rows), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_rows, send_rows, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, recv_rows, send_rows, group, anchor):
        ctx.rows, ctx.group = (recv_rows, send_rows), group
        return _exchange(x, recv_rows, send_rows, group)

    @staticmethod
    def backward(ctx, grad):
        recv_rows, send_rows = ctx.rows
        return _exchange(grad, send_rows, recv_rows, ctx.group), None, None, None, None


def all_to_all(
    x: Tensor, recv_rows: list[int], send_rows: list[int], group: ProcessGroup | None = None
) -> Tensor:
    """Differentiable ``all_to_all_single`` with uneven splits: rows ``send_rows[j]`` of ``x``
    go to rank ``j``; ``recv_rows[j]`` rows come from rank ``j``, in rank order.

    The backward is the reverse exchange. It runs on every rank whenever gradients are
    enabled, even where ``x`` does not require a gradient: the other ranks' gradients pass
    through this rank's exchange, so skipping it would leave them waiting.

    Args:
        x: ``[sum(send_rows), ...]``.
        recv_rows, send_rows: ``W`` row counts each.
        group: the process group (None: the default group).

    Returns:
        ``[sum(recv_rows), ...]``.
    """
    anchor = torch.empty(0, device=x.device, requires_grad=True)
    return _AllToAll.apply(x, recv_rows, send_rows, group, anchor)


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
    """

    rank: int
    rows_sent: tuple[int, ...]
    rows_received: tuple[int, ...]
    bytes_in_row: int
    bytes_out_row: int
    count_bytes: int
    multiply_adds_per_row: int | None
    io_per_row: int

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


def _require_distributed() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert parallelism needs an initialised torch.distributed process "
                           "group: call torch.distributed.init_process_group() first (torchrun "
                           "sets up its environment)")


def _same_group(a: ProcessGroup | None, b: ProcessGroup | None) -> bool:
    world = dist.group.WORLD
    return (a if a is not None else world) is (b if b is not None else world)


def local_share(num_experts: int, group: ProcessGroup | None = None) -> tuple[int, int]:
    """``(n/W, first expert)`` of this rank for ``num_experts`` experts over ``group``.

    Raises:
        RuntimeError: the default process group is not initialised.
        ValueError: ``num_experts`` is not divisible by the group's size.
    """
    _require_distributed()
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

    Args:
        local: this rank's expert bank (``num_experts`` = ``n/W``).
        group: the process group (None: the default group).

    Shape:
        ``[N, d]`` rows sorted by global expert, with :class:`~sparsemoe.dispatch.Routes` over
        ``n`` experts → ``[N, d_out]``.
    """

    def __init__(self, local: nn.Module, group: ProcessGroup | None = None) -> None:
        super().__init__()
        if not isinstance(local, nn.Module) or not hasattr(local, "num_experts"):
            raise TypeError(f"local must be an expert bank (a module with num_experts), got "
                            f"{type(local).__name__}")
        _require_distributed()
        self.local = local
        self.group = group
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.num_local_experts = local.num_experts
        self.num_experts = local.num_experts * self.world_size
        self.first_expert = self.rank * self.num_local_experts
        self.last_exchange: ExchangeStats | None = None

    def forward(self, x: Tensor, routes: Routes) -> Tensor:
        w, n_local = self.world_size, self.num_local_experts
        send = routes.tokens_per_expert.reshape(w, n_local).contiguous()  # [W, n_l]
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)  # [W, n_l] from each rank
        send_rows, recv_rows = torch.stack([send.sum(1), recv.sum(1)]).tolist()  # one host sync
        dt = autocast_dtype(x.device.type)
        if dt is not None:
            x = x.to(dt)
        x_recv = all_to_all(x, recv_rows, send_rows, self.group)  # [M, d]: by rank, then expert
        m = x_recv.shape[0]
        expert = torch.arange(n_local, device=x.device).repeat(w)
        expert = expert.repeat_interleave(recv.reshape(-1), output_size=m)  # [M] local expert
        local_routes = sort_by_expert(expert[:, None], n_local)
        y_local = self.local(gather_tokens(x_recv, local_routes, 1), local_routes)
        y = all_to_all(unsort(y_local, local_routes), send_rows, recv_rows, self.group)
        self.last_exchange = ExchangeStats(
            rank=self.rank, rows_sent=tuple(send_rows), rows_received=tuple(recv_rows),
            bytes_in_row=x.shape[1] * x.element_size(),
            bytes_out_row=y_local.shape[1] * y_local.element_size(),
            count_bytes=(w - 1) * n_local * send.element_size(),
            multiply_adds_per_row=getattr(self.local, "multiply_adds_per_row", None),
            io_per_row=x.shape[1] + y_local.shape[1],
        )
        return y

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, world_size={self.world_size}, "
                f"rank={self.rank}, experts {self.first_expert}..."
                f"{self.first_expert + self.num_local_experts - 1} on this rank")


@contextmanager
def rank_seeded(group: ProcessGroup | None = None) -> Iterator[None]:
    """Draw from a random stream of this rank's own, leaving the default stream as every other
    rank leaves it.

    For the initialisation of local experts: built from the same seed on every rank, they
    would otherwise be copies of each other. One number is drawn from the default stream on
    every rank (so it stays the same across ranks) and seeds a forked stream offset by the rank.
    """
    seed = int(torch.randint(2**62, ()))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + dist.get_rank(group))
        yield


def shard_experts(bank: FeedForwardExperts, group: ProcessGroup | None = None) -> ExpertParallel:
    """This rank's share of a whole bank: experts ``r·n/W … (r+1)·n/W − 1`` of ``bank``
    (copied; ``bank`` is left unchanged), as an :class:`ExpertParallel` bank over ``group``.

    Raises:
        TypeError: ``bank`` is not a :class:`~sparsemoe.experts.FeedForwardExperts`.
        ValueError: its number of experts is not divisible by the group's size.
    """
    _check_stacked(bank, "bank")
    n_local, first = local_share(bank.num_experts, group)
    with torch.device("meta"):  # no initialisation work, no draw from the random stream
        local = FeedForwardExperts(n_local, bank.d_model, bank.hidden,
                                   activation=bank.activation, bias=bank.b1 is not None,
                                   impl=bank.impl, recompute=bank.recompute,
                                   reuse_grad_memory=bool(bank.grad_buffers))
    for name, p in bank.named_parameters(recurse=False):
        share = p.detach()[first : first + n_local].clone()
        setattr(local, name, nn.Parameter(share, requires_grad=p.requires_grad))
    return ExpertParallel(local, group)


def _check_stacked(bank: nn.Module, name: str) -> None:
    if not isinstance(bank, FeedForwardExperts):
        raise TypeError(
            f"{name} must be a FeedForwardExperts bank (parameters stacked over the experts) to "
            f"be sharded or resharded, got {type(bank).__name__}; for other banks build each "
            f"rank's experts yourself and wrap them in ExpertParallel(local_bank, group)"
        )


def expert_parallel(model: nn.Module, group: ProcessGroup | None = None) -> nn.Module:
    """Shard every MoE layer of ``model`` over ``group``, in place: each layer's
    :class:`~sparsemoe.experts.FeedForwardExperts` bank is replaced by this rank's share of it
    (:func:`shard_experts`). Routers, shared experts and every other parameter stay whole:
    they are data-parallel.

    Build the same single-process model on every rank (the same seed) and call this: the
    distributed model then starts from exactly the single-process weights.

    Returns:
        ``model``.

    Raises:
        ValueError: ``model`` contains no MoE layer, or one whose number of experts is not
            divisible by the group's size.
        TypeError: a layer's bank is not a ``FeedForwardExperts``.
    """
    from .layers import MoELayer  # the layers build on this module

    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) contains no sparsemoe MoE layer")
    for layer in layers:
        if not isinstance(layer.experts, ExpertParallel):
            layer.experts = shard_experts(layer.experts, group)
    return model


def _expert_banks(model: nn.Module) -> dict[str, ExpertParallel]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertParallel)}


def exchange_stats(model: nn.Module) -> list[ExchangeStats]:
    """The :class:`ExchangeStats` of every expert-parallel layer of ``model`` from its last
    forward (empty for a model without them, or before its first forward)."""
    banks = _expert_banks(model).values()
    return [b.last_exchange for b in banks if b.last_exchange is not None]


def _common_group(banks: dict[str, ExpertParallel]) -> ProcessGroup | None:
    group = next(iter(banks.values())).group
    if any(not _same_group(b.group, group) for b in banks.values()):
        raise ValueError(f"the expert-parallel layers ({', '.join(banks)}) use different process "
                         f"groups; these helpers need one group for the whole model")
    return group


def _bank_keys(model: nn.Module) -> tuple[dict[str, tuple[ExpertParallel, str]], object]:
    """``{local state key: (bank, global key)}`` for the experts' entries, and the group."""
    banks = _expert_banks(model)
    keys = {}
    for name, bank in banks.items():
        _check_stacked(bank.local, f"{name}.local")
        prefix = f"{name}." if name else ""
        for key in bank.local.state_dict():
            keys[f"{prefix}local.{key}"] = (bank, f"{prefix}{key}")
    return keys, _common_group(banks) if banks else None


def _gather_experts(t: Tensor, group, root: bool) -> Tensor | None:
    """``t`` of every rank, concatenated along dim 0 in rank order, on group rank 0."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))] if root else None
    dist.gather(t.contiguous(), parts, group=group, group_dst=0)
    return torch.cat(parts) if root else None


def _is_root(group) -> bool:
    return not dist.is_initialized() or dist.get_rank(group) == 0


def full_state_dict(model: nn.Module) -> dict[str, Tensor] | None:
    """The state dict that the same model has on one process, gathered on rank 0 of the
    experts' group (every rank must call it; the others get None).

    Expert entries (``layer.experts.local.w1 [n/W, d, h]``) are gathered from every rank into
    the single-process entries (``layer.experts.w1 [n, d, h]``); the data-parallel entries are
    rank 0's. A model without expert-parallel layers returns its own ``state_dict()``.
    """
    keys, group = _bank_keys(model)
    root = _is_root(group)
    out = {}
    for key, value in model.state_dict().items():
        if key in keys:
            value = _gather_experts(value, group, root)
            key = keys[key][1]
        out[key] = value
    return out if root else None


def _local_slice(value: Tensor, bank: ExpertParallel, key: str) -> Tensor:
    if value.dim() == 0 or value.shape[0] != bank.num_experts:
        raise ValueError(f"{key}: the checkpoint holds {tuple(value.shape)}, the model's layer "
                         f"has {bank.num_experts} experts along the first dimension")
    return value[bank.first_expert : bank.first_expert + bank.num_local_experts]


def load_full_state_dict(model: nn.Module, state_dict: dict[str, Tensor],
                         strict: bool = True) -> None:
    """Load a single-process state dict (from one process, or from :func:`full_state_dict` of
    any number of ranks) into ``model``: each expert-parallel bank takes its experts' slice.
    No communication: every rank reads the same dictionary.

    Raises:
        ValueError: an expert entry does not hold the layer's number of experts.
    """
    keys, _ = _bank_keys(model)
    by_global = {g: (bank, local) for local, (bank, g) in keys.items()}
    local_state = {}
    for key, value in state_dict.items():
        if key in by_global:
            bank, local_key = by_global[key]
            local_state[local_key] = _local_slice(value, bank, key)
        else:
            local_state[key] = value
    model.load_state_dict(local_state, strict=strict)


def _expert_params(model: nn.Module) -> dict[int, ExpertParallel]:
    return {id(p): bank for bank in _expert_banks(model).values() for p in bank.parameters()}


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """The optimizer's state dict as on one process, gathered on rank 0 of the experts' group
    (every rank must call it; the others get None).

    The state of an expert parameter that has the parameter's shape (Adam's moments) is
    gathered like the parameter; other state (Adam's step count) is rank 0's. Parameter
    indices are those of ``model.parameters()``, the same as on one process.
    """
    state = optimizer.state_dict()
    experts = _expert_params(model)
    group = _common_group(_expert_banks(model)) if experts else None
    root = _is_root(group)
    for index, p in enumerate(_optimizer_params(optimizer)):
        if id(p) not in experts or index not in state["state"]:
            continue
        entry = dict(state["state"][index])  # a copy: state_dict() shares the live state
        for name in sorted(entry):
            value = entry[name]
            if isinstance(value, Tensor) and value.shape == p.shape:
                entry[name] = _gather_experts(value, group, root)
            elif isinstance(value, Tensor) and value.dim() > 0:
                raise ValueError(
                    f"optimizer state {name!r} of expert parameter {index} has shape "
                    f"{tuple(value.shape)}, not the parameter's {tuple(p.shape)}; only state "
                    f"shaped like its parameter (Adam's moments, SGD's momentum) can be "
                    f"gathered across ranks, got {type(optimizer).__name__}")
        state["state"][index] = entry
    return state if root else None


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer,
                                   state_dict: dict) -> None:
    """Load a single-process optimizer state dict into the optimizer of an expert-parallel
    ``model``: per-expert state is sliced like the parameters. No communication."""
    experts = _expert_params(model)
    params = _optimizer_params(optimizer)
    local = {"param_groups": state_dict["param_groups"], "state": {}}
    for index, entry in state_dict["state"].items():
        p = params[index] if index < len(params) else None
        if p is None or id(p) not in experts:
            local["state"][index] = entry
            continue
        bank = experts[id(p)]
        local["state"][index] = {
            name: _local_slice(v, bank, f"optimizer state {index}.{name}")
            if isinstance(v, Tensor) and v.dim() > 0 and v.shape[1:] == p.shape[1:] else v
            for name, v in entry.items()
        }
    optimizer.load_state_dict(local)


class GradientSync:
    """The gradient step of expert-parallel training, made explicit.

    Each rank ``r`` computes its loss ``L_r`` on its own tokens; the step minimises their mean
    ``L = (1/W) Σ_r L_r``, exactly what one process does with all the tokens. Hence:

    - data-parallel parameters (:attr:`data_parallel`: router, gate, every non-expert layer)
      hold ``∂L_r/∂φ`` on rank ``r``: their gradients are averaged over the ranks (one
      all-reduce of a flat buffer, as DDP does);
    - expert parameters (:attr:`expert`) hold ``Σ_r ∂L_r/∂θ`` on the rank of their expert (the
      reverse exchange brought every rank's contribution): they are divided by ``W`` and never
      communicated, nor averaged with other ranks' experts.

    A training loop stays ordinary::

        sync = GradientSync(model)
        for x, y in batches:  # this rank's share of the batch
            loss = loss_fn(model(x), y) + sparsemoe.aux_loss(model)
            opt.zero_grad()
            loss.backward()
            sync.sync()                   # the one line expert parallelism adds
            sync.clip_grad_norm_(1.0)     # optional: the norm over all ranks
            opt.step()

    A parameter whose gradient is None on every rank keeps None (the optimizer skips it, as on
    one process).

    Args:
        model: a model whose expert banks are :class:`ExpertParallel` (or none: plain data
            parallelism).
        group: the data-parallel group; it must be the experts' group (None: theirs, or the
            default group).
    """

    def __init__(self, model: nn.Module, group: ProcessGroup | None = None) -> None:
        banks = _expert_banks(model)
        if banks:
            experts_group = _common_group(banks)
            if group is not None and not _same_group(group, experts_group):
                raise ValueError("group must be the process group of the expert-parallel "
                                 "layers (each rank's tokens are averaged over the same ranks "
                                 "that hold the experts), got a different group")
            group = experts_group
        _require_distributed()
        self.group = group
        self.world_size = dist.get_world_size(group)
        experts = _expert_params(model)
        params = [p for p in model.parameters() if p.requires_grad]
        self.expert = [p for p in params if id(p) in experts]
        self.data_parallel = [p for p in params if id(p) not in experts]
        self.device = params[0].device if params else torch.device("cpu")

    def sync(self) -> None:
        """Average the data-parallel gradients over the ranks; divide the expert gradients by
        ``W``. Call it after ``backward()``, on every rank."""
        w = self.world_size
        buckets: dict[tuple, list[nn.Parameter]] = {}
        for p in self.data_parallel:
            buckets.setdefault((p.device, p.dtype), []).append(p)
        for (device, dtype), params in buckets.items():
            grads = [p.grad if p.grad is not None else p.new_zeros(p.shape) for p in params]
            present = torch.tensor([p.grad is not None for p in params], dtype=dtype,
                                   device=device)
            flat = torch.cat([g.reshape(-1) for g in grads] + [present])
            dist.all_reduce(flat, group=self.group)
            sizes = [g.numel() for g in grads]
            *values, counts = flat.split([*sizes, len(params)])
            for p, value, count in zip(params, values, counts.tolist(), strict=True):
                p.grad = value.view(p.shape).div_(w) if count > 0 else None
        for p in self.expert:
            if p.grad is not None:
                p.grad.div_(w)

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Scale every gradient by ``min(1, max_norm / (‖g‖ + 1e-6))`` where ``‖g‖`` is the
        2-norm of the whole model's gradient, as ``torch.nn.utils.clip_grad_norm_`` on one
        process: the data-parallel gradients (the same on every rank after :meth:`sync`)
        counted once, the expert gradients of every rank. Returns ``‖g‖``.
        """
        dp = [p.grad for p in self.data_parallel if p.grad is not None]
        ex = [p.grad for p in self.expert if p.grad is not None]
        squares = torch.zeros(2, device=self.device)
        for i, grads in enumerate((dp, ex)):
            if grads:
                squares[i] = torch.stack([g.float().square().sum() for g in grads]).sum()
        experts_sq = squares[1:].clone()
        dist.all_reduce(experts_sq, group=self.group)
        total = (squares[0] + experts_sq[0]).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in dp + ex:
            g.mul_(coef.to(g.dtype))
        return total
