"""Strictly balanced gating, Appendix F of Shazeer et al. (2017), used for translation."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import functional as MF
from .._checks import check_number, check_top_k
from .base import LinearRouter, Routing, all_experts_grid


def batchwise_threshold_loss(scores: Tensor, thresholds: Tensor, batch_mask: Tensor) -> Tensor:
    """L_batchwise of Appendix F (strictly balanced gating), which trains the thresholds.

    ``L = Σ_j Σ_i (M_threshold(x_j, T)_i − M_batchwise(X, m)_{j,i}) · (X_{j,i} − T_i)`` with
    ``M_threshold(x, T)_i = 1[x_i > T_i]``. Every term is ≥ 0; its gradient moves each ``T_i``
    until the threshold selects what the batchwise mask selects. ``X`` is taken as given
    (detached): the loss trains the thresholds, not the gate.

    Args:
        scores: ``[T, n]`` the gate values the masks are taken on, G_σ(x).
        thresholds: ``[n]`` T.
        batch_mask: ``[T, n]`` bool, M_batchwise.

    Returns:
        A scalar.
    """
    x = scores.detach()
    over = (x > thresholds).to(x.dtype)
    return ((over - batch_mask.to(x.dtype)) * (x - thresholds)).sum()


class StrictlyBalancedRouter(LinearRouter):
    """Batchwise-masked softmax gating with learned per-expert thresholds for inference.

    ``G(x)_i = G_σ(x)_i·M(G_σ(x))_i / Σ_j G_σ(x)_j·M(G_σ(x))_j`` with ``G_σ(x) =
    Softmax(x·W_g)``. In training ``M = M_batchwise(X, m)``: expert ``i`` takes the ``m`` tokens
    of the batch with the largest ``G_σ(x)_i``, ``m = ⌈k·|X|/n⌉`` (capped at ``|X|``), so every
    expert gets exactly ``m`` tokens. At inference, where a batch may be small,
    ``M = M_threshold(x, T)_i = 1[G_σ(x)_i > T_i]`` with thresholds ``T`` learned in training by
    ``L_batchwise`` (:func:`batchwise_threshold_loss`, weight
    ``w_batchwise``; the paper gives no weight, and the loss only reaches ``T``). A token no
    expert takes gets no expert output (a masked row).

    The training-mode decision for one token depends on the rest of the batch (not causal).

    Args:
        d_model: input width ``d``.
        num_experts: ``n``.
        k: average experts per token (the paper's translation models: 4 flat, 2 hierarchical).
        w_batchwise: weight of L_batchwise (1.0).
        w_importance, w_switch, w_z: see :class:`LinearRouter` (defaults 0).

    Shape:
        ``w_gate [d, n]``, ``thresholds [n]`` (zero-initialised); forward ``[T, d] -> Routing``
        with ``k = n`` and ``valid [T, n]``.
    """

    def __init__(
        self, d_model: int, num_experts: int, k: int = 2, *, w_batchwise: float = 1.0,
        w_importance: float = 0.0, w_switch: float = 0.0, w_z: float = 0.0,
    ) -> None:
        super().__init__(d_model, num_experts, w_importance=w_importance, w_switch=w_switch,
                         w_z=w_z)
        self.k = check_top_k("k", k, num_experts)
        self.w_batchwise = check_number("w_batchwise", w_batchwise, low=0)
        self.thresholds = nn.Parameter(torch.zeros(num_experts))

    def per_expert(self, tokens: int) -> int:
        """``m = min(T, ⌈k·T/n⌉)``, the tokens each expert takes in training."""
        return min(tokens, math.ceil(self.k * tokens / self.num_experts))

    def forward(self, x: Tensor) -> Routing:
        logits = self.logits(x)
        g_sigma = logits.softmax(-1)
        if self.training:
            mask = MF.top_tokens_per_expert(g_sigma, self.per_expert(x.shape[0]))
        else:
            mask = g_sigma > self.thresholds.detach()
        weights = MF.renormalise_masked(g_sigma, mask)
        grid = all_experts_grid(x.shape[0], self.num_experts, x.device)
        routing = self.routing(logits, g_sigma, grid, weights, mask)
        if self.training and self.w_batchwise:
            aux = routing.aux_loss + self.w_batchwise * batchwise_threshold_loss(
                g_sigma, self.thresholds, mask
            )
            routing = routing._replace(aux_loss=aux, sums=None)  # L_batchwise is no sum
        return routing

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}, w_batchwise={self.w_batchwise}"
