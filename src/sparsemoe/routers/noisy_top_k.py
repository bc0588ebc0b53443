"""Noisy top-k gating (Shazeer et al. 2017, §2.1 and Appendices A–B) as routers."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import functional as MF
from .._checks import check_bool, check_int, check_number, check_top_k, renamed_argument
from .base import BalanceSums, LinearRouter, Router, Routing, full_precision


class _ImportanceLoadLosses:
    """What the two noisy top-k routers share: the noise floor and the balancing losses
    L_importance + L_load (eqs. 7 and 11) of their routing record."""

    def _set_noise_and_loss_weights(
        self, noise_epsilon: float, w_importance: float, w_load: float
    ) -> None:
        finite = {"low": 0, "high": math.inf, "high_open": True}
        self.noise_epsilon = check_number("noise_epsilon", noise_epsilon, **finite)
        self.w_importance = check_number("w_importance", w_importance, **finite)
        self.w_load = check_number("w_load", w_load, **finite)

    @staticmethod
    def _init_gate(w_gate: Tensor, std: float) -> None:
        """``W_g`` ← 0 (the paper's reference code) for ``std == 0``, else N(0, std²)."""
        if std == 0:
            nn.init.zeros_(w_gate)
        else:
            nn.init.normal_(w_gate, std=std)

    def _routing(
        self, expert_indices: Tensor, combine_weights: Tensor, importance: Tensor, load: Tensor
    ) -> Routing:
        """The routing record with L_importance + L_load as its aux loss, and its sums."""
        zero, none = importance.new_zeros(()), importance.new_zeros(self.num_experts)
        sums = BalanceSums(zero + expert_indices.shape[0], importance, load, none, none, zero)
        return Routing(expert_indices, combine_weights, importance, load,
                       self.balance_loss(sums), None, sums)

    def balance_loss(self, sums: BalanceSums) -> Tensor:
        """L_importance + L_load of the sums' Importance and Load (eqs. 7 and 11)."""
        return MF.balancing_loss(sums.importance, sums.load, self.w_importance, self.w_load)


class NoisyTopKRouter(_ImportanceLoadLosses, LinearRouter):
    """Noisy top-k gating, eqs. 3–5, with the balancing losses of eqs. 6–11.

    ``W_g`` and ``W_noise`` start at zero, as in the paper's reference code: no signal and some
    noise, so that the load starts balanced. ``gate_init_std > 0`` draws ``W_g`` from
    N(0, gate_init_std²) instead (the paper's choice stays the default): with zeros, the noise
    (std ≈ 0.7 once W_noise has grown) outweighs the clean logits for hundreds of steps, so the
    routing in evaluation mode (no noise) is not the routing the balancing losses trained.
    In the LSTM LM (d = 128), stds of 0.088 and 0.3 (1/sqrt(d), about 3/sqrt(d)) balanced the
    evaluation routing better than zeros, and 0.088 gave lower perplexity than zeros at 100 and
    300 steps (docs/lm.md). Noise is added only in training mode. The gate
    (and its optional hidden layer) is :class:`~sparsemoe.routers.LinearRouter`'s, without a
    bias; the auxiliary loss is L_importance + L_load, not LinearRouter's.

    Args:
        d_model: input width ``d``.
        num_experts: ``n``.
        k: experts per token.
        noisy_gating: learn ``W_noise`` and add noise in training (False: plain top-k softmax).
        noise_epsilon: floor of the noise stddev (reference code: 1e-2).
        w_importance: weight of CV(Importance)², eq. 7 (paper, language modelling: 0.1).
        w_load: weight of CV(Load)², eq. 11 (paper, language modelling: 0.1).
        gate_hidden: gate on ``relu(x·A + a)`` instead of ``x`` (the gating network of the
            Deep Mixture of Experts, Eigen et al. 2013;
            :class:`~sparsemoe.routers.GateHiddenLayer`), None for the paper's linear gate;
            ``hidden=`` is its deprecated name.
        gate_init_std: standard deviation of ``W_g``'s normal initialisation; 0 (default):
            zeros, as the paper.

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
        gate_hidden: int | None = None,
        gate_init_std: float = 0.0,
        hidden: int | None = None,
    ) -> None:
        gate_hidden = renamed_argument("NoisyTopKRouter", "hidden", hidden, "gate_hidden",
                                       gate_hidden)
        # read by reset_gate, which LinearRouter.__init__ calls
        self.gate_init_std = check_number("gate_init_std", gate_init_std, low=0, high=math.inf,
                                          high_open=True)
        super().__init__(d_model, num_experts, gate_hidden=gate_hidden)
        self._set_noise_and_loss_weights(noise_epsilon, w_importance, w_load)
        self.k = check_top_k("k", k, num_experts)
        check_bool("noisy_gating", noisy_gating)
        self.w_noise = nn.Parameter(torch.zeros_like(self.w_gate)) if noisy_gating else None

    def reset_gate(self) -> None:
        """``W_g`` starts at zero (the reference code), or N(0, gate_init_std²)."""
        self._init_gate(self.w_gate, self.gate_init_std)

    def forward(self, x: Tensor) -> Routing:
        with full_precision(x, self.w_gate) as x:
            g = MF.noisy_top_k_gating(
                self.gate_input(x), self.w_gate, self.w_noise, self.k,
                train=self.training, noise_epsilon=self.noise_epsilon,
            )
        return self._routing(g.top_k_indices, g.top_k_gates, MF.importance(g.gates), g.load)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, "
                f"noisy_gating={self.w_noise is not None}, w_importance={self.w_importance}, "
                f"w_load={self.w_load}, gate_init_std={self.gate_init_std}")


class HierarchicalNoisyTopKRouter(_ImportanceLoadLosses, Router):
    """Two-level noisy top-k gating of the hierarchical MoE, Appendix B (eqs. 12–14).

    A primary gate picks ``k_primary`` of ``a`` groups; each chosen group's own gate picks
    ``k_secondary`` of its ``b`` experts. Every token reaches ``k_primary·k_secondary`` of the
    ``n = a·b`` experts, with weight G_primary(x)_i·G_i(x)_j. The losses use Importance_H and
    Load_H over all ``a·b`` experts. All gate weights start at zero (the noise weights
    always; the gates from N(0, gate_init_std²) when ``gate_init_std > 0``).

    Args:
        d_model: input width ``d``.
        groups: ``a``.
        experts_per_group: ``b``.
        k_primary: groups per token (paper: 2).
        k_secondary: experts per chosen group (paper: 2).
        noisy_gating, noise_epsilon, w_importance, w_load, gate_init_std: as in
            :class:`NoisyTopKRouter` (``gate_init_std`` for both levels' gates).

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
        gate_init_std: float = 0.0,
    ) -> None:
        super().__init__()
        self.d_model = check_int("d_model", d_model)
        self.num_experts = check_int("groups", groups) * check_int("experts_per_group",
                                                                   experts_per_group)
        self._set_noise_and_loss_weights(noise_epsilon, w_importance, w_load)
        check_bool("noisy_gating", noisy_gating)
        self.groups = groups
        self.experts_per_group = experts_per_group
        self.k_primary = check_top_k("k_primary", k_primary, groups)
        self.k_secondary = check_top_k("k_secondary", k_secondary, experts_per_group)
        self.gate_init_std = check_number("gate_init_std", gate_init_std, low=0, high=math.inf,
                                          high_open=True)
        self.w_gate_primary = nn.Parameter(torch.empty(d_model, groups))
        self.w_gate_secondary = nn.Parameter(torch.empty(groups, d_model, experts_per_group))
        for w_gate in (self.w_gate_primary, self.w_gate_secondary):
            self._init_gate(w_gate, gate_init_std)
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
                f"k_secondary={self.k_secondary}, noisy_gating={self.w_noise_primary is not None}, "
                f"gate_init_std={self.gate_init_std}")
