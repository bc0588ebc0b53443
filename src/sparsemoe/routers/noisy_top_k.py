"""Noisy top-k gating (Shazeer et al. 2017, §2.1 and Appendices A–B) as routers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import functional as MF
from .._checks import check_int, check_top_k
from .base import BalanceSums, Router, Routing, full_precision, gate_hidden_layer


class _BalancedRouter(Router):
    """What the noisy top-k routers share: the noise floor and the balancing-loss weights."""

    def __init__(
        self, d_model: int, num_experts: int, noise_epsilon: float, w_importance: float,
        w_load: float,
    ) -> None:
        super().__init__()
        self.d_model = check_int("d_model", d_model)
        self.num_experts = num_experts
        self.noise_epsilon = noise_epsilon
        self.w_importance = w_importance
        self.w_load = w_load

    def _routing(
        self, expert_indices: Tensor, combine_weights: Tensor, importance: Tensor, load: Tensor
    ) -> Routing:
        """The routing record with L_importance + L_load (eqs. 7 and 11) as its aux loss."""
        zero, none = importance.new_zeros(()), importance.new_zeros(self.num_experts)
        sums = BalanceSums(zero + expert_indices.shape[0], importance, load, none, none, zero)
        return Routing(expert_indices, combine_weights, importance, load,
                       self.balance_loss(sums), None, sums)

    def balance_loss(self, sums: BalanceSums) -> Tensor:
        """L_importance + L_load of the sums' Importance and Load (eqs. 7 and 11)."""
        return MF.balancing_loss(sums.importance, sums.load, self.w_importance, self.w_load)


class NoisyTopKRouter(_BalancedRouter):
    """Noisy top-k gating, eqs. 3–5, with the balancing losses of eqs. 6–11.

    ``W_g`` and ``W_noise`` start at zero, as in the paper's reference code: no signal and some
    noise, so that the load starts balanced. Noise is added only in training mode.

    Args:
        d_model: input width ``d``.
        num_experts: ``n``.
        k: experts per token.
        noisy_gating: learn ``W_noise`` and add noise in training (False: plain top-k softmax).
        noise_epsilon: floor of the noise stddev (reference code: 1e-2).
        w_importance: weight of CV(Importance)², eq. 7 (paper, language modelling: 0.1).
        w_load: weight of CV(Load)², eq. 11 (paper, language modelling: 0.1).
        hidden: gate on ``relu(x·A + a)`` instead of ``x`` (the gating network of the Deep
            Mixture of Experts, Eigen et al. 2013; :class:`~sparsemoe.routers.GateHiddenLayer`),
            None for the paper's linear gate.

    Shape:
        ``w_gate [d, n]``, ``w_noise [d, n]`` (``[h, n]`` each with a hidden layer); forward
        ``[T, d] -> Routing`` with ``k`` choices.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 2,
        *,
        noisy_gating: bool = True,
        noise_epsilon: float = 1e-2,
        w_importance: float = 0.1,
        w_load: float = 0.1,
        hidden: int | None = None,
    ) -> None:
        check_int("num_experts", num_experts)
        super().__init__(d_model, num_experts, noise_epsilon, w_importance, w_load)
        self.k = check_top_k("k", k, num_experts)
        self.gate_hidden = gate_hidden_layer(d_model, hidden)
        fan_in = d_model if hidden is None else hidden
        self.w_gate = nn.Parameter(torch.zeros(fan_in, num_experts))
        self.w_noise = nn.Parameter(torch.zeros(fan_in, num_experts)) if noisy_gating else None

    def forward(self, x: Tensor) -> Routing:
        with full_precision(x, self.w_gate) as x:
            if self.gate_hidden is not None:
                x = self.gate_hidden(x)
            g = MF.noisy_top_k_gating(
                x, self.w_gate, self.w_noise, self.k,
                train=self.training, noise_epsilon=self.noise_epsilon,
            )
        return self._routing(g.top_k_indices, g.top_k_gates, MF.importance(g.gates), g.load)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, "
                f"noisy_gating={self.w_noise is not None}, w_importance={self.w_importance}, "
                f"w_load={self.w_load}")


class HierarchicalNoisyTopKRouter(_BalancedRouter):
    """Two-level noisy top-k gating of the hierarchical MoE, Appendix B (eqs. 12–14).

    A primary gate picks ``k_primary`` of ``a`` groups; each chosen group's own gate picks
    ``k_secondary`` of its ``b`` experts. Every token reaches ``k_primary·k_secondary`` of the
    ``n = a·b`` experts, with weight G_primary(x)_i·G_i(x)_j. The losses use Importance_H and
    Load_H over all ``a·b`` experts. All gate weights start at zero.

    Args:
        d_model: input width ``d``.
        groups: ``a``.
        experts_per_group: ``b``.
        k_primary: groups per token (paper: 2).
        k_secondary: experts per chosen group (paper: 2).
        noisy_gating, noise_epsilon, w_importance, w_load: as in :class:`NoisyTopKRouter`.

    Shape:
        ``w_gate_primary [d, a]``, ``w_gate_secondary [a, d, b]`` (and the noise weights);
        forward ``[T, d] -> Routing`` with ``k_primary·k_secondary`` choices over ``a·b``
        experts, expert ``(i, j)`` at flat index ``i·b + j``.
    """

    def __init__(
        self,
        d_model: int,
        groups: int,
        experts_per_group: int,
        k_primary: int = 2,
        k_secondary: int = 2,
        *,
        noisy_gating: bool = True,
        noise_epsilon: float = 1e-2,
        w_importance: float = 0.1,
        w_load: float = 0.1,
    ) -> None:
        n = check_int("groups", groups) * check_int("experts_per_group", experts_per_group)
        super().__init__(d_model, n, noise_epsilon, w_importance, w_load)
        self.groups = groups
        self.experts_per_group = experts_per_group
        self.k_primary = check_top_k("k_primary", k_primary, groups)
        self.k_secondary = check_top_k("k_secondary", k_secondary, experts_per_group)
        self.w_gate_primary = nn.Parameter(torch.zeros(d_model, groups))
        self.w_gate_secondary = nn.Parameter(torch.zeros(groups, d_model, experts_per_group))
        if noisy_gating:
            self.w_noise_primary = nn.Parameter(torch.zeros(d_model, groups))
            self.w_noise_secondary = nn.Parameter(
                torch.zeros(groups, d_model, experts_per_group)
            )
        else:
            self.w_noise_primary = self.w_noise_secondary = None

    def forward(self, x: Tensor) -> Routing:
        with full_precision(x, self.w_gate_primary) as x:
            g = MF.hierarchical_noisy_top_k_gating(
                x, self.w_gate_primary, self.w_noise_primary,
                self.w_gate_secondary, self.w_noise_secondary,
                self.k_primary, self.k_secondary,
                train=self.training, noise_epsilon=self.noise_epsilon,
            )
        return self._routing(g.expert_indices, g.combine_weights, g.importance, g.load)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, groups={self.groups}, "
                f"experts_per_group={self.experts_per_group}, k_primary={self.k_primary}, "
                f"k_secondary={self.k_secondary}, noisy_gating={self.w_noise_primary is not None}")
