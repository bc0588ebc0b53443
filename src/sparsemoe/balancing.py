"""Load balancing over more than one forward pass: the balancing loss of a global batch, and the
bias step of auxiliary-loss-free balancing.

- :class:`GlobalBatchBalancing`: each MoE layer's auxiliary loss computed from the balancing
  statistics summed over gradient-accumulation micro-batches and data-parallel ranks (Qiu et
  al. 2025, "Demons in the Detail: On Implementing Load Balancing Loss for Training Specialized
  Mixture-of-Expert Models", arXiv:2501.11873): the loss of the global batch, not the mean of
  the micro-batches' losses.
- :func:`update_expert_biases`: the auxiliary-loss-free step of every
  :class:`~sparsemoe.routers.DeepSeekV3Router` of a model (DeepSeek-V3; Wang et al. 2024).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .layers import MoELayer
from .routers import BalanceSums, DeepSeekV3Router, Router, Routing


def _moe_layers(model: nn.Module) -> list[MoELayer]:
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) contains no sparsemoe MoE layer")
    return layers


class _Accumulator:
    """One layer's sums over the forwards since the global batch began."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.sums: BalanceSums | None = None

    def aux_loss(self, router: Router, routing: Routing) -> Tensor:
        if routing.sums is None:
            raise TypeError(f"global-batch balancing needs a router whose loss is computed from "
                            f"sums over tokens (Routing.sums); {type(router).__name__} gives "
                            f"none (with its options: a loss per sequence, per token order or "
                            f"without sums; DeepSeekV3Router needs w_sequence=0)")
        self.sums = routing.sums if self.sums is None else self.sums + routing.sums
        sums = self.sums
        if self.group is not None:
            world = dist.get_world_size(self.group)
            flat = torch.cat([s.detach().reshape(-1) for s in sums])
            dist.all_reduce(flat, group=self.group)
            # The global value, with each rank's gradient scaled by W: averaging the ranks'
            # gradients (FSDP2 under parallel.parallelize, DistributedDataParallel) then sums
            # them, as one process holding every rank's tokens would.
            parts = flat.split([s.numel() for s in sums])
            sums = BalanceSums(*(g.view_as(s) + world * (s - s.detach())
                                 for g, s in zip(parts, sums, strict=True)))
        return router.balance_loss(sums)


class GlobalBatchBalancing:
    """The balancing loss of a global batch: micro-batches and data-parallel ranks.

    While active (``with GlobalBatchBalancing(model, group): ...``), every MoE layer of
    ``model`` adds the :class:`~sparsemoe.routers.BalanceSums` of each forward pass to those of
    the earlier forwards since the context was entered, sums them over the ranks of
    ``process_group`` (an all-reduce of the per-expert sums: importance, load, router
    probabilities, dispatch counts, token count), and sets its :attr:`~MoELayer.aux_loss` to
    its router's loss of those global sums. After the last micro-batch the layer's aux loss is
    the loss one forward over the whole global batch would give — in value and, with the
    micro-batches' losses backpropagated together, in gradient.

    Gradients: the all-reduced sums carry each rank's own gradient scaled by the world size
    ``W``, so that averaging the ranks' gradients (as FSDP2 under
    :func:`sparsemoe.parallel.parallelize` and ``DistributedDataParallel`` do) gives the
    gradient of one process holding every rank's tokens. Add only the last micro-batch's aux
    loss (``sparsemoe.aux_loss(model)`` after the last forward) to the loss: it already covers
    the earlier micro-batches, whose autograd graphs it keeps until the backward pass (the
    memory of one big batch). Across ranks the memory stays that of one rank's batch.

    Routers: those that fill :attr:`Routing.sums` (noisy top-k, hierarchical, top-k, Switch,
    GShard, DeepSeek-V3 with ``w_sequence=0``: its sequence-wise loss is per sequence by
    definition). Other routers raise an error at the first forward.

    Args:
        model: a module containing sparsemoe MoE layers.
        process_group: the data-parallel group to sum over (every rank must run the same
            number of forwards); None for micro-batches in one process.

    Example::

        with GlobalBatchBalancing(model, group):
            losses = [task_loss(model(mb)) / len(micro_batches) for mb in micro_batches]
            loss = sum(losses) + sparsemoe.aux_loss(model)
        loss.backward()
    """

    def __init__(self, model: nn.Module, process_group: dist.ProcessGroup | None = None) -> None:
        self.layers = _moe_layers(model)
        self.process_group = process_group

    def __enter__(self) -> GlobalBatchBalancing:
        for layer in self.layers:
            if layer.global_batch is not None:
                raise RuntimeError("a GlobalBatchBalancing is already active on this model")
            layer.global_batch = _Accumulator(self.process_group)
        return self

    def __exit__(self, *exc: object) -> None:
        for layer in self.layers:
            layer.global_batch = None


def update_expert_biases(
    model: nn.Module, process_group: dist.ProcessGroup | None = None
) -> list[Tensor]:
    """The auxiliary-loss-free bias step of every :class:`~sparsemoe.routers.DeepSeekV3Router`
    in ``model`` (:meth:`~sparsemoe.routers.DeepSeekV3Router.update_bias`); call it after each
    optimiser step.

    Args:
        model: a module containing such routers.
        process_group: sum each router's counts over this group's ranks first (the routers of
            a data- or expert-parallel model are replicated; every rank takes the same step).

    Returns:
        The load each router's step used, in module order.
    """
    routers = [m for m in model.modules() if isinstance(m, DeepSeekV3Router)]
    if not routers:
        raise ValueError(f"model ({type(model).__name__}) contains no DeepSeekV3Router")
    return [r.update_bias(process_group) for r in routers]
