"""Expert parallelism at the level of a model: shard its MoE layers
(:func:`expert_parallel`), save and load the single-process layout of its state and its
optimizer's state, and synchronise its gradients (:class:`GradientSync`, deprecated for
:func:`~sparsemoe.parallel.parallelize`).

Above the layers' protocol: it finds MoE layers as :class:`~sparsemoe.module.MoEModule`
instances and imports no layer class.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..module import MoEModule
from .exchange import (
    ExchangeStats,
    ExpertParallel,
    ProcessGroup,
    check_feed_forward_bank,
    require_distributed,
    shard_experts,
)


def _same_group(a: ProcessGroup | None, b: ProcessGroup | None) -> bool:
    world = dist.group.WORLD
    return (a if a is not None else world) is (b if b is not None else world)


def expert_parallel(model: nn.Module, group: ProcessGroup | None = None,
                    exchange_capacity: int | None = None) -> nn.Module:
    """Shard every MoE layer of ``model`` over ``group``, in place: each layer's
    :class:`~sparsemoe.experts.FeedForwardExperts` bank is replaced by this rank's share of it
    (:func:`shard_experts`), with the exact exchange or, given ``exchange_capacity``, the
    padded one (:class:`ExpertParallel`; a layer built already spread keeps its own). Routers,
    shared experts and every other parameter stay whole: they are data-parallel.

    Build the same single-process model on every rank (the same seed) and call this: the
    distributed model then starts from exactly the single-process weights.

    Returns:
        ``model``.

    Raises:
        ValueError: ``model`` contains no MoE layer, or one whose number of experts is not
            divisible by the group's size.
        TypeError: a layer's bank is not a ``FeedForwardExperts``.
    """
    layers = [m for m in model.modules() if isinstance(m, MoEModule)]
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) contains no sparsemoe MoE layer")
    for layer in layers:
        if not isinstance(layer.experts, ExpertParallel):
            layer.experts = shard_experts(layer.experts, group, exchange_capacity)
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
        check_feed_forward_bank(bank.local, f"{name}.local")
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
    """The gradient step of expert-parallel training, made explicit. Deprecated: use
    :func:`~sparsemoe.parallel.parallelize` on a ``("dp", "ep")`` device mesh (FSDP2 reduces
    the gradients) and :func:`~sparsemoe.parallel.clip_grad_norm_`.

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
        warnings.warn("sparsemoe.parallel.GradientSync is deprecated: use "
                      "sparsemoe.parallel.parallelize(model, mesh) and "
                      "sparsemoe.parallel.clip_grad_norm_", DeprecationWarning, stacklevel=2)
        banks = _expert_banks(model)
        if banks:
            experts_group = _common_group(banks)
            if group is not None and not _same_group(group, experts_group):
                raise ValueError("group must be the process group of the expert-parallel "
                                 "layers (each rank's tokens are averaged over the same ranks "
                                 "that hold the experts), got a different group")
            group = experts_group
        require_distributed()
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
