"""Soft MoE routing (Puigcerver, Riquelme, Mustafa and Houlsby 2023, "From Sparse to Soft
Mixtures of Experts", arXiv:2308.00951)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_bool, check_int
from .base import full_precision


class SoftMoEWeights(NamedTuple):
    """Soft MoE's dispatch and combine weights for ``G`` inputs of ``m`` tokens each.

    Attributes:
        dispatch_weights: ``[G, m, n·p]``, each slot's column is a softmax over the ``m`` tokens.
        combine_weights: ``[G, m, n·p]``, each token's row is a softmax over the ``n·p`` slots.
        logits: ``[G, m, n·p]``.
    """

    dispatch_weights: Tensor
    combine_weights: Tensor
    logits: Tensor


class SoftMoERouter(nn.Module):
    """Slots as convex combinations of tokens, outputs as convex combinations of slots.

    For one input ``X`` (``m`` tokens): ``logits = X·Φ`` (``Φ [d, n·p]``, ``p`` slots per
    expert); ``D = softmax over the tokens`` of each slot column, slot inputs ``X̃ = Dᵀ·X``;
    ``C = softmax over the slots`` of each token row, output ``Y = C·Ỹ`` where
    ``Ỹ_s = f_{⌊s/p⌋}(X̃_s)``. With ``normalize=True`` (the paper's default at scale, §2.3)
    ``logits = scale · l2norm(X)·l2norm(Φ)``, both normalised over ``d``, with a learned
    scalar ``scale`` starting at 1.

    Soft MoE has no discrete choice, no dropped tokens and no auxiliary loss; every expert
    processes exactly ``p`` slots per input. It is **not causal**: every slot mixes all tokens
    of its input, so a token's output depends on later tokens (the paper's setting is image
    classification).

    Args:
        d_model: input width ``d``.
        num_experts: ``n``.
        slots_per_expert: ``p``.
        normalize: l2-normalise tokens and Φ and learn a scale.

    Shape:
        ``phi [d, n·p]``, ``scale []``; forward ``[G, m, d] -> SoftMoEWeights``.
    """

    def __init__(
        self, d_model: int, num_experts: int, slots_per_expert: int = 1, *, normalize: bool = True
    ) -> None:
        super().__init__()
        self.d_model = check_int("d_model", d_model)
        self.num_experts = check_int("num_experts", num_experts)
        self.slots_per_expert = check_int("slots_per_expert", slots_per_expert)
        self.normalize = check_bool("normalize", normalize)
        # LeCun-normal initialisation of Φ, as in the paper's code.
        self.phi = nn.Parameter(
            torch.randn(d_model, num_experts * slots_per_expert) / math.sqrt(d_model)
        )
        self.scale = nn.Parameter(torch.ones(())) if normalize else None

    def forward(self, x: Tensor) -> SoftMoEWeights:
        with full_precision(x, self.phi) as x:
            if self.scale is not None:
                logits = self.scale * (F.normalize(x, dim=-1) @ F.normalize(self.phi, dim=0))
            else:
                logits = x @ self.phi
            return SoftMoEWeights(logits.softmax(-2), logits.softmax(-1), logits)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, "
                f"slots_per_expert={self.slots_per_expert}, normalize={self.normalize}")
