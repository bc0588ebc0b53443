"""Expert parallelism at the level of a model on one process group: shard its MoE layers
(:func:`expert_parallel`), save and load the single-process layout of its state and its
optimizer's state by a gather on rank 0.

This layout runs the experts distributed; it does not average the data-parallel gradients
(routers, every non-expert layer). Training on several ranks goes through
:func:`~sparsemoe.parallel.parallelize`, whose FSDP2 (sharded or ``replicate=True``) reduces
them.

Above the layers' protocol: it finds MoE layers as :class:`~sparsemoe.module.MoEModule`
instances and imports no layer class.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..module import MoEModule
from .exchange import (
    ExchangeStats,
    ExpertParallel,
    ProcessGroup,
    check_feed_forward_bank,
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

    Each rank's forward and backward then equal one process's on that rank's tokens (the
    expert gradients summing every rank's tokens), but nothing averages the data-parallel
    gradients: this layout serves inference and expert parallelism by hand. Training on
    several ranks: :func:`~sparsemoe.parallel.parallelize` (sharded, or ``replicate=True``
    for DDP's layout), which calls this on the mesh's "ep" group.

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
