"""Switch routing: top-1 of a float32 softmax router (Fedus et al. 2021, "Switch Transformers",
arXiv:2101.03961), with the router z-loss of ST-MoE (Zoph et al. 2022, arXiv:2202.08906)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_number
from .base import LinearRouter, Routing


class SwitchRouter(LinearRouter):
    """Switch top-1 routing.

    ``p(x) = Softmax(W_r·x̃)`` with ``x̃ = x ⊙ U(1−ε, 1+ε)`` in training (multiplicative
    jitter on the router's input only) and ``x̃ = x`` in evaluation; the token goes to
    ``i = argmax p(x)`` with weight ``p_i(x)``: ``y = p_i(x) E_i(x)`` (eq. 2). The router runs
    in float32 under autocast ("selective precision", §2.4).

    Auxiliary losses: ``α · N · Σ_i f_i · P_i`` (eq. 4, ``α = w_switch = 1e-2``) with ``f_i`` the
    fraction of tokens whose arg-max is ``i``, before any capacity drop; and the router z-loss
    ``w_z · mean_x logsumexp(logits)²`` (ST-MoE eq. 5, ``1e-3``; set ``w_z=0`` for the original
    Switch Transformer). Capacity is the layer's (:class:`sparsemoe.Capacity`; the
    paper's ``capacity_factor`` 1.0–1.25).

    Where ``transformers``' Switch router jitters the float32 hidden states in place (so the
    experts see the jittered input too), the paper's jitter applies to the router input only,
    and so does this one; evaluation, where there is no jitter, is identical.

    Args:
        d_model: input width ``d``.
        num_experts: ``n``.
        jitter: ε of the multiplicative jitter (1e-2; 0 turns it off).
        w_importance, w_switch, w_z: see :class:`LinearRouter`.
        bias: a router bias (the paper's router has none; ``transformers``' optional one).

    Shape:
        ``w_gate [d, n]``; forward ``[T, d] -> Routing`` with one choice per token.
    """

    def __init__(
        self, d_model: int, num_experts: int, *, jitter: float = 1e-2, w_importance: float = 0.0,
        w_switch: float = 1e-2, w_z: float = 1e-3, bias: bool = False,
    ) -> None:
        super().__init__(d_model, num_experts, w_importance=w_importance, w_switch=w_switch,
                         w_z=w_z, bias=bias)
        self.jitter = check_number("jitter", jitter, low=0, high=1, high_open=True)

    def forward(self, x: Tensor) -> Routing:
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = self.logits(x)
        probs = logits.softmax(-1)
        weight, choice = probs.max(-1, keepdim=True)
        return self.routing(logits, probs, choice, weight)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, jitter={self.jitter}"
