"""GShard top-2 gating (Lepikhin et al. 2020, "GShard", arXiv:2006.16668, Algorithm 1)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_bool, check_int
from .base import LinearRouter, Routing


class GShardRouter(LinearRouter):
    """Top-2 gating with random routing of the second expert.

    ``g = Softmax(x·W_g)``; ``(e1, g1), (e2, g2)`` the two largest; ``g1, g2 ← g1/(g1+g2),
    g2/(g1+g2)``; the token always goes to ``e1`` and, in training, to ``e2`` only if
    ``2·g2 > U(0, 1)`` (probability ``2·g2 ≤ 1``, "proportional to its weight"). A second
    expert not taken is a masked pair (not computed, weight unchanged elsewhere: the first
    expert keeps ``g1``, as in the paper). The paper describes training; in evaluation this
    router keeps both experts, deterministically (``random_second_eval=True`` samples there too,
    as ``transformers``' NLLB-MoE does). The weights are normalised before the random choice
    and any capacity drop, following Algorithm 1.

    Auxiliary loss: ``ℓ_aux = (1/E) Σ_e (c_e/S)·m_e`` scaled by ``E²`` as in the GShard code,
    i.e. ``E · Σ_e f_e · P_e`` with ``c_e`` counting first choices only — the Switch loss on
    ``e1`` (``w_switch``, default 1e-2). Group-level capacity ``2N/(G·E)`` is
    ``Capacity(factor=1.0, group="sequence")`` on the layer.

    Args:
        d_model: input width ``d``.
        num_experts: ``n`` (at least 2).
        random_second_eval: sample the second expert in evaluation too.
        w_importance, w_switch, w_z, bias: see :class:`LinearRouter`.

    Shape:
        ``w_gate [d, n]``; forward ``[T, d] -> Routing`` with 2 choices and a validity mask.
    """

    def __init__(
        self, d_model: int, num_experts: int, *, random_second_eval: bool = False,
        w_importance: float = 0.0, w_switch: float = 1e-2, w_z: float = 0.0, bias: bool = False,
    ) -> None:
        check_int("num_experts", num_experts, minimum=2, reason="for top-2 gating")
        super().__init__(d_model, num_experts, w_importance=w_importance, w_switch=w_switch,
                         w_z=w_z, bias=bias)
        self.random_second_eval = check_bool("random_second_eval", random_second_eval)

    def forward(self, x: Tensor) -> Routing:
        logits = self.logits(x)
        probs = logits.softmax(-1)
        top, choice = probs.topk(2, dim=-1)
        weights = top / top.sum(-1, keepdim=True)
        valid = None
        if self.training or self.random_second_eval:
            second = 2 * weights[:, 1] > torch.rand_like(weights[:, 1])
            valid = torch.stack([torch.ones_like(second), second], dim=1)
        return self.routing(logits, probs, choice, weights, valid, dispatched=choice[:, :1])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, random_second_eval={self.random_second_eval}"
