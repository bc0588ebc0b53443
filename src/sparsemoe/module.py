"""What every MoE layer of sparsemoe offers, whatever its routing: :class:`MoEModule` (an
expert bank, the auxiliary loss and the load statistics of the last forward),
:class:`MoEStats`, and :func:`aux_loss` that sums the losses of a whole model.

The layers (:mod:`sparsemoe.layers`, :mod:`sparsemoe.dense_paths`) implement it; the
model-level helpers (:func:`aux_loss`, :mod:`sparsemoe.parallel`) find layers through it, so
they import no layer class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._checks import autocast_dtype, check_expert_bank, check_float_tensor, check_like
from ._copy import deepcopy_without_graph


def coefficient_of_variation(v: Tensor) -> float:
    """CV = population std / mean of ``v`` in float64 (0.0 for an all-zero ``v``, NaN when
    ``v`` holds NaN): the CV(Importance) and CV(Load) of Table 6 of Shazeer et al. (2017)."""
    v = v.double()
    mean = v.mean()
    if mean > 0:
        return float(v.std(correction=0) / mean)
    return 0.0 if mean == 0 else math.nan


def max_over_mean(v: Tensor) -> float:
    """max / mean of ``v`` in float64 (0.0 when the mean is not positive): Table 6's
    max(Load)/mean(Load), 1.0 for a perfect balance."""
    v = v.double()
    mean = v.mean()
    return float(v.max() / mean) if mean > 0 else 0.0


@dataclass(frozen=True)
class MoEStats:
    """Load statistics of one forward pass (all ``[n]`` tensors are detached).

    Attributes:
        importance: Σ_x G(x) per expert (eq. 6).
        load: the load the router balances: the smooth estimator Σ_x P(x, i) of eq. 10 in
            training with noise, else the number of tokens per expert.
        tokens_per_expert: (token, expert) pairs each expert actually computed.
        routed_pairs: 0-d, the (valid) pairs the router chose, or None without a capacity.
        dropped_pairs: 0-d, the pairs of those that the capacity dropped, or None.
    """

    importance: Tensor
    load: Tensor
    tokens_per_expert: Tensor
    routed_pairs: Tensor | None = None
    dropped_pairs: Tensor | None = None

    @property
    def cv_importance(self) -> float:
        """CV(Importance), population std / mean (Table 6 of the paper)."""
        return coefficient_of_variation(self.importance)

    @property
    def cv_load(self) -> float:
        """CV(Load) of :attr:`load`."""
        return coefficient_of_variation(self.load)

    @property
    def max_over_mean_load(self) -> float:
        """max / mean of :attr:`tokens_per_expert`: how much the busiest expert exceeds an even
        share (1.0 is perfect balance; Table 6's max(Load)/mean(Load))."""
        return max_over_mean(self.tokens_per_expert)

    @property
    def drop_fraction(self) -> float:
        """Dropped pairs / routed pairs (0.0 without a capacity or without pairs)."""
        if self.routed_pairs is None or int(self.routed_pairs) == 0:
            return 0.0
        return float(self.dropped_pairs) / float(self.routed_pairs)

    def as_dict(self) -> dict[str, float]:
        """The scalar statistics, for logging."""
        return {
            "cv_importance": self.cv_importance,
            "cv_load": self.cv_load,
            "max_over_mean_load": self.max_over_mean_load,
            "drop_fraction": self.drop_fraction,
        }


class MoEModule(nn.Module):
    """The protocol of a sparsemoe MoE layer: a router and an expert bank.

    The layer holds its router in :attr:`router` (a module with ``d_model`` and
    ``num_experts``) and its bank in :attr:`experts` (expert parallelism replaces it by an
    :class:`~sparsemoe.parallel.ExpertParallel` bank). Every forward sets :attr:`aux_loss` (a
    scalar in the autograd graph, already weighted) and the statistics that :attr:`stats`
    returns, through :meth:`_record`.

    Args:
        router: the routing module.
        experts: an expert bank with the router's ``num_experts``.
    """

    def __init__(self, router: nn.Module, experts: nn.Module) -> None:
        super().__init__()
        check_expert_bank("experts", experts)
        if router.num_experts != experts.num_experts:
            raise ValueError(
                f"router has {router.num_experts} experts but experts has "
                f"{experts.num_experts}; they must match"
            )
        width = getattr(experts, "d_model", getattr(experts, "d_in", router.d_model))
        if width != router.d_model:
            raise ValueError(f"router has d_model {router.d_model} but experts take inputs of "
                             f"width {width}; they must match")
        self.router = router
        self.experts = experts
        self.d_model: int = router.d_model
        self.num_experts: int = router.num_experts
        self.aux_loss: Tensor | None = None
        self._last: MoEStats | None = None

    __deepcopy__ = deepcopy_without_graph  # aux_loss is in the last forward's graph

    def _check_input(self, x: Tensor) -> None:
        """``x [..., d_model]``, floating point, on the layer's device and (outside autocast)
        in its dtype."""
        check_float_tensor("x", x)
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must have last dimension d_model = {self.d_model}, got shape {tuple(x.shape)}"
            )
        param = next(self.parameters())
        check_like("x", x, "the layer", param, dtype=False)
        if autocast_dtype(x.device.type) is None:  # under autocast the dtypes may differ
            check_like("x", x, "the layer", param)

    def _record(self, aux: Tensor, stats: MoEStats) -> None:
        """Keep the auxiliary loss and the statistics of this forward."""
        self.aux_loss = aux
        self._last = stats

    @property
    def stats(self) -> MoEStats:
        """Load statistics of the last forward (computed only when read)."""
        if self._last is None:
            raise RuntimeError("stats are available after the layer's first forward pass")
        return self._last


def aux_loss(model: nn.Module) -> Tensor:
    """The sum of :attr:`MoEModule.aux_loss` over every MoE layer in ``model``.

    Call it after the forward pass and add it to the task loss::

        loss = task_loss + sparsemoe.aux_loss(model)
    """
    layers = [m for m in model.modules() if isinstance(m, MoEModule)]
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) contains no sparsemoe MoE layer")
    missing = [type(m).__name__ for m in layers if m.aux_loss is None]
    if missing:
        raise RuntimeError(f"aux_loss(model): {len(missing)} MoE layer(s) have not run a forward "
                           "pass yet; call the model first")
    return torch.stack([m.aux_loss for m in layers]).sum()
