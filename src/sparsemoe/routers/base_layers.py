"""BASE layers: balanced assignment of tokens to experts (Lewis et al. 2021, "BASE Layers:
Simplifying Training of Large, Sparse Models", arXiv:2103.16716)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as MF
from .base import LinearRouter, Routing


class BASERouter(LinearRouter):
    """Balanced assignment in training, greedy top-1 at inference, sigmoid-gated outputs.

    Expert ``e`` has an embedding ``w_e`` (column ``e`` of ``w_gate``). In training, token
    ``t`` goes to ``a_t`` where ``a`` maximises ``Σ_t h_t·w_{a_t}`` subject to every expert
    receiving exactly ``T/n`` tokens (``⌈T/n⌉`` for the first ``T mod n`` experts when ``n``
    does not divide ``T``), solved exactly by the auction algorithm
    (:func:`sparsemoe.functional.balanced_assignment`). At inference ``a_t = argmax_e h_t·w_e``.
    The expert's output is weighted by ``σ(h_t·w_{a_t})``; the BASE layer returns
    ``h_t + σ(h_t·w_{a_t})·f_{a_t}(h_t)`` (:class:`sparsemoe.dense_paths.BASELayer` adds the
    residual). The balancing needs no auxiliary loss; the gate learns through the sigmoid.

    Args:
        d_model: input width ``d``.
        num_experts: ``n``.
        w_importance, w_switch, w_z: see :class:`LinearRouter` (defaults 0).

    Shape:
        ``w_gate [d, n]`` (the expert embeddings); forward ``[T, d] -> Routing`` with one
        choice per token.
    """

    def __init__(
        self, d_model: int, num_experts: int, *, w_importance: float = 0.0,
        w_switch: float = 0.0, w_z: float = 0.0,
    ) -> None:
        super().__init__(d_model, num_experts, w_importance=w_importance, w_switch=w_switch,
                         w_z=w_z)

    def forward(self, x: Tensor) -> Routing:
        scores = self.logits(x)  # h_t · w_e
        if self.training:
            choice = MF.balanced_assignment(scores)[:, None]
        else:
            choice = scores.argmax(-1, keepdim=True)
        weights = torch.sigmoid(scores.gather(1, choice))
        return self.routing(scores, scores.softmax(-1), choice, weights)
