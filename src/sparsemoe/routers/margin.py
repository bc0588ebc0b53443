"""The Deep Mixture of Experts' remedy for degenerate gating (Eigen, Ranzato and Sutskever
2013): an expert that has been given more than its share is switched off until the others
catch up."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import functional as MF
from .._checks import check_number
from .base import Router, Routing


class MarginConstraint(NamedTuple):
    """Result of :func:`margin_constraint`.

    Attributes:
        mask: ``[T, k]`` bool, the (token, expert) pairs left active.
        combine_weights: ``[T, k]`` the gates renormalised over the active pairs.
        totals: ``[n]`` float64 running totals after the ``T`` tokens.
    """

    mask: Tensor
    combine_weights: Tensor
    totals: Tensor


def margin_constraint(
    expert_indices: Tensor,
    combine_weights: Tensor,
    totals: Tensor,
    margin: float,
    valid: Tensor | None = None,
) -> MarginConstraint:
    """The running-total constraint that keeps a Deep Mixture of Experts' gates from
    degenerating (Eigen, Ranzato and Sutskever 2013).

    Tokens are taken one after another, as the paper's examples are. Before token ``t``,
    expert ``i`` has the running total ``G_i(t) = Σ_{t' < t} g_i(x_{t'})`` of the gates it
    received; if ``G_i(t) − (1/n) Σ_j G_j(t) > m`` its gate for ``x_t`` is set to 0 and the
    token's remaining gates are renormalised. The totals add the renormalised gates, so an
    expert is active only while its total is within ``m`` of the mean. (The paper does not say
    whether the totals count the gates before or after the constraint; after is what the gates
    actually did, and what makes that bound hold.)

    With every expert in the grid (dense gating, ``k = n``), at least one expert — one at or
    below the mean — stays active for every token. With ``k < n`` a token whose ``k`` choices
    are all over the margin keeps no expert (a zero row).

    The decisions are sequential, so they are computed on the host from detached values; the
    returned gates are :func:`~sparsemoe.functional.renormalise_masked` of ``combine_weights``
    and carry its gradient.

    Args:
        expert_indices: ``[T, k]`` int64.
        combine_weights: ``[T, k]`` gates (rows summing to 1 over the valid pairs).
        totals: ``[n]`` running totals before the first token (not modified).
        margin: ``m >= 0``.
        valid: ``[T, k]`` bool, pairs the router chose, or None for all.

    Returns:
        :class:`MarginConstraint` ``(mask, combine_weights, totals)``.
    """
    n = totals.numel()
    run = totals.detach().to("cpu", torch.float64).tolist()
    experts = expert_indices.tolist()
    weights = combine_weights.detach().to(torch.float64).tolist()
    chosen = [[True] * len(row) for row in experts] if valid is None else valid.tolist()
    mask = []
    for row, w, ok in zip(experts, weights, chosen, strict=True):
        mean = sum(run) / n
        active = [bool(v) and run[e] - mean <= margin for e, v in zip(row, ok, strict=True)]
        kept = sum(wj for wj, a in zip(w, active, strict=True) if a)
        if kept > 0:
            for e, wj, a in zip(row, w, active, strict=True):
                if a:
                    run[e] += wj / kept
        mask.append(active)
    mask_t = torch.tensor(mask, dtype=torch.bool, device=expert_indices.device)
    mask_t = mask_t.reshape(expert_indices.shape)
    return MarginConstraint(
        mask_t,
        MF.renormalise_masked(combine_weights, mask_t),
        torch.tensor(run, dtype=torch.float64, device=totals.device),
    )


class MarginConstrainedRouter(Router):
    """Any router under Eigen et al.'s running-total constraint.

    In training, while :attr:`constrained` is True, the router keeps running totals
    ``G_i(t) = Σ_{t' < t} g_i(x_{t'})`` of the gates each expert received since the start
    (a buffer, saved with the model); an expert with ``G_i(t) − mean_j G_j(t) > m`` gets gate 0
    for ``x_t`` and the token's other gates are renormalised
    (:func:`margin_constraint`). The paper trains with the constraint and
    then removes it and fine-tunes: set ``constrained = False`` (or call
    ``remove_constraint()``). In evaluation mode the gates pass through unchanged.

    Without the constraint a softmax gate trained by the output loss alone tends to give
    (almost) every example to the same expert early on, which then learns fastest and keeps
    winning. The margin ``m`` is counted in examples' worth of gate mass (each token adds 1 to
    the totals); the paper does not give its value.

    The masked pairs are marked not valid in the :class:`Routing` (never computed); importance
    and load are recomputed from the constrained gates; the inner router's auxiliary loss is
    kept.

    Args:
        router: the router to constrain (the DMoE's: a ``SoftmaxRouter`` with a hidden layer).
        margin: ``m >= 0``.

    Shape:
        ``totals [n]`` float64 buffer; forward ``[T, d] -> Routing`` as the inner router.
    """

    def __init__(self, router: Router, margin: float) -> None:
        super().__init__()
        if not isinstance(router, Router):
            raise TypeError(f"router must be a sparsemoe.routers.Router, got "
                            f"{type(router).__name__}")
        if router.uses_token_ids:
            raise ValueError(f"router must route by features; {type(router).__name__} "
                             f"routes by token id")
        self.router = router
        self.margin = check_number("margin", margin, low=0)
        self.d_model = router.d_model
        self.num_experts = router.num_experts
        self.constrained = True
        self.register_buffer("totals", torch.zeros(router.num_experts, dtype=torch.float64))

    def remove_constraint(self) -> None:
        """Stop constraining (the paper's fine-tuning phase); the totals are kept."""
        self.constrained = False

    def forward(self, x: Tensor) -> Routing:
        routing = self.router(x)
        if not (self.training and self.constrained):
            return routing
        c = margin_constraint(routing.expert_indices, routing.combine_weights, self.totals,
                                 self.margin, routing.valid)
        self.totals.copy_(c.totals)
        n = self.num_experts
        return routing._replace(
            combine_weights=c.combine_weights,
            importance=MF.pair_importance(routing.expert_indices, c.combine_weights, n, c.mask),
            load=MF.pair_load(routing.expert_indices, n, c.mask).to(c.combine_weights.dtype),
            valid=c.mask,
            sums=None,  # the constraint depends on the order of the tokens
        )

    def extra_repr(self) -> str:
        return f"margin={self.margin}, constrained={self.constrained}"
