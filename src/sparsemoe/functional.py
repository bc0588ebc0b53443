"""The functional core: gating, the smooth load estimator, CV² and the balancing losses.

Pure functions on tensors, no parameters. Equation numbers refer to Shazeer et al. (2017),
"Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer"
(arXiv:1701.06538). Where the paper leaves a numerical detail open, the authors' reference code
(tensor2tensor ``utils/expert_utils.py``) decides, and the docstring says so.

Index letters: ``T`` tokens, ``d`` input width, ``n`` experts, ``k`` experts kept per token,
``a`` groups and ``b`` experts per group in a hierarchical MoE (``n = a·b``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_float_tensor, check_like, check_shape, check_top_k, deprecated_alias
from .dispatch import gather_tokens, grouped_matmul, sort_by_expert, unsort

CV_EPSILON = 1e-10
"""The reference code's epsilon in :func:`cv_squared` and in the hierarchical load (eq. 14)."""


class NoisyTopKGating(NamedTuple):
    """Result of :func:`noisy_top_k_gating`.

    Attributes:
        gates: ``[T, n]`` G(x), eq. 3: softmax over the k kept logits, zeros elsewhere.
        load: ``[n]`` Load(X), eq. 10: Σ_x P(x, i) when smooth (noise on, k < n), otherwise
            the number of non-zero gates per expert.
        clean_logits: ``[T, n]`` x·W_g.
        noisy_logits: ``[T, n]`` H(x), eq. 4 (the clean logits when no noise is added).
        noise_stddev: ``[T, n]`` Softplus(x·W_noise) + noise_epsilon, or None without noise.
        top_k_indices: ``[T, k]`` int64, the kept experts, best first.
        top_k_gates: ``[T, k]`` their gate values (each row sums to 1).
        prob_in_top_k: ``[T, n]`` P(x, i), eq. 9 (or the 0/1 indicator of a non-zero gate);
            ``load`` is its column sum.
    """

    gates: Tensor
    load: Tensor
    clean_logits: Tensor
    noisy_logits: Tensor
    noise_stddev: Tensor | None
    top_k_indices: Tensor
    top_k_gates: Tensor
    prob_in_top_k: Tensor


class HierarchicalGating(NamedTuple):
    """Result of :func:`hierarchical_noisy_top_k_gating` (Appendix B). Expert ``(i, j)`` —
    expert ``j`` of group ``i`` — has the flat index ``i·b + j``.

    Attributes:
        expert_indices: ``[T, k_p·k_s]`` int64 flat indices of the experts each token reaches.
        combine_weights: ``[T, k_p·k_s]`` G_primary(x)_i · G_i(x)_j, eq. 12.
        importance: ``[a·b]`` Importance_H(X), eq. 13.
        load: ``[a·b]`` Load_H(X), eq. 14.
        primary: the primary gating over the ``a`` groups (a :class:`NoisyTopKGating`).
        secondary: the secondary gating of every (token, chosen group) row, rows sorted by
            group; ``[R, b]`` fields with ``R = T·k_p``.
        row_group: ``[R]`` the group of each secondary row.
        row_token: ``[R]`` the token of each secondary row.
    """

    expert_indices: Tensor
    combine_weights: Tensor
    importance: Tensor
    load: Tensor
    primary: NoisyTopKGating
    secondary: NoisyTopKGating
    row_group: Tensor
    row_token: Tensor


def _normal_cdf(x: Tensor, stddev: Tensor) -> Tensor:
    """Φ(x / stddev), with the reference code's 1e-20 guard against a zero stddev."""
    return 0.5 * (1.0 + torch.erf(x / (math.sqrt(2.0) * stddev + 1e-20)))


def prob_in_top_k(
    clean_logits: Tensor, noisy_logits: Tensor, noise_stddev: Tensor, top_logits: Tensor, k: int
) -> Tensor:
    """P(x, i) of eq. 9: the probability that expert ``i`` is among the top ``k`` if only its
    own noise were drawn again (Appendix A).

    ``P(x,i) = Φ(((x·W_g)_i − kth_excluding(H(x), k, i)) / Softplus((x·W_noise)_i))``.
    As in the reference code, kth_excluding comes from the top ``k+1`` noisy logits: if
    ``H(x)_i`` is above the (k+1)-th largest it is in the top k and the threshold is that
    (k+1)-th value, otherwise the threshold is the k-th value.

    Args:
        clean_logits: ``[T, n]``.
        noisy_logits: ``[T, n]``.
        noise_stddev: ``[T, n]``.
        top_logits: ``[T, k+1]`` the largest noisy logits per row, in decreasing order.
        k: experts kept per token, ``k < n``.

    Returns:
        ``[T, n]`` probabilities.
    """
    threshold_if_in = top_logits[:, k : k + 1]
    threshold_if_out = top_logits[:, k - 1 : k]
    is_in = noisy_logits > threshold_if_in
    # Choosing the threshold before Φ gives the reference's where(is_in, Φ_in, Φ_out) value
    # for value, with one normal CDF over [T, n] instead of two (and half the saved tensors).
    threshold = torch.where(is_in, threshold_if_in, threshold_if_out)
    return _normal_cdf(clean_logits - threshold, noise_stddev)


def noisy_top_k_from_logits(
    clean_logits: Tensor,
    raw_noise_stddev: Tensor | None,
    k: int,
    *,
    noise: Tensor | None = None,
    noise_epsilon: float = 1e-2,
) -> NoisyTopKGating:
    """Noisy top-k gating (eqs. 3–5, 8–10) from precomputed logits.

    :func:`noisy_top_k_gating` is this function after the two matmuls; the hierarchical MoE
    calls it on logits produced by a grouped matmul.

    Args:
        clean_logits: ``[T, n]`` x·W_g.
        raw_noise_stddev: ``[T, n]`` x·W_noise, or None for no noise (plain top-k softmax
            gating, or evaluation mode).
        k: experts kept per token.
        noise: ``[T, n]`` standard-normal draws; drawn from torch's RNG when None.
        noise_epsilon: added to the softplus, as in the reference code.
    """
    n = clean_logits.shape[1]
    if raw_noise_stddev is None:
        noise_stddev = None
        noisy_logits = clean_logits
    else:
        # Reference code: (softplus(x W_noise) + noise_epsilon) * train; eq. 4 has no epsilon.
        noise_stddev = F.softplus(raw_noise_stddev) + noise_epsilon
        if noise is None:
            noise = torch.randn_like(clean_logits)
        noisy_logits = clean_logits + noise * noise_stddev
    # k+1 values: the (k+1)-th is the threshold of eq. 9 for experts inside the top k.
    top_logits, top_indices = noisy_logits.topk(min(k + 1, n), dim=1)
    top_k_indices = top_indices[:, :k]
    top_k_gates = top_logits[:, :k].softmax(dim=1)
    gates = torch.zeros_like(clean_logits).scatter(1, top_k_indices, top_k_gates)
    if noise_stddev is not None and k < n:
        prob = prob_in_top_k(clean_logits, noisy_logits, noise_stddev, top_logits, k)
    else:
        # The reference code's _GatesToLoad: the load is the count of non-zero gates.
        prob = (gates > 0).to(gates.dtype)
    return NoisyTopKGating(
        gates, prob.sum(0), clean_logits, noisy_logits, noise_stddev, top_k_indices, top_k_gates,
        prob,
    )


def _check_gating_args(
    x: Tensor,
    w_gate: Tensor,
    w_noise: Tensor | None,
    k: int,
    noise: Tensor | None,
    train: bool,
    suffix: str = "",
    groups: int | None = None,
) -> bool:
    """Validate one level of gating; returns whether noise is added.

    ``groups=None``: ``w_gate [d, n]``, ``noise [T, n]``. ``groups=a``: one gate per group,
    ``w_gate [a, d, b]``, ``noise [T, a, b]``. Argument names carry ``suffix``.
    """
    wg, wn, kn, noise_name = (f"{name}{suffix}" for name in ("w_gate", "w_noise", "k", "noise"))
    check_float_tensor("x", x, ndim=2)
    lead = () if groups is None else (groups,)
    check_float_tensor(wg, w_gate, ndim=len(lead) + 2)
    check_like(wg, w_gate, "x", x)
    if tuple(w_gate.shape[:-1]) != (*lead, x.shape[1]):
        expected = f"d = x.shape[1] = {x.shape[1]}"
        if groups is None:
            expected = f"[d, n] with {expected}"
        else:
            expected = f"[a, d, b] with a = {groups} groups and {expected}"
        raise ValueError(f"{wg} must have shape {expected}, got {tuple(w_gate.shape)}")
    check_top_k(kn, k, w_gate.shape[-1])
    if w_noise is not None:
        check_float_tensor(wn, w_noise)
        check_like(wn, w_noise, "x", x)
        check_shape(wn, w_noise, tuple(w_gate.shape))
    noisy = w_noise is not None and train
    if noise is not None and noisy:
        check_float_tensor(noise_name, noise)
        check_like(noise_name, noise, "x", x)
        check_shape(noise_name, noise, (x.shape[0], *lead, w_gate.shape[-1]))
    return noisy


def noisy_top_k_gating(
    x: Tensor,
    w_gate: Tensor,
    w_noise: Tensor | None,
    k: int,
    *,
    train: bool = True,
    noise: Tensor | None = None,
    noise_epsilon: float = 1e-2,
) -> NoisyTopKGating:
    """Noisy top-k gating of Shazeer et al. (2017), §2.1 eqs. 3–5, with the smooth load
    estimator of Appendix A (eqs. 8–10).

    ``H(x)_i = (x·W_g)_i + StandardNormal() · (Softplus((x·W_noise)_i) + noise_epsilon)``,
    ``G(x) = Softmax(KeepTopK(H(x), k))``.

    Numerics follow the reference code: the noise epsilon is added to the softplus; noise is
    added only when ``train``; P(x, i) uses the top ``k+1`` noisy logits and Φ with a 1e-20
    guard; the load is Σ_x P(x, i) when noisy, training and ``k < n``, otherwise the count of
    non-zero gates. (In evaluation the reference code still evaluates eq. 9 with a zero
    stddev, which gives the same count except at exact ties; the count is used here.)

    Args:
        x: ``[T, d]`` inputs.
        w_gate: ``[d, n]`` W_g.
        w_noise: ``[d, n]`` W_noise, or None for plain top-k softmax gating (eq. 3 on x·W_g).
        k: experts kept per token, ``1 <= k <= n``.
        train: add noise (training mode).
        noise: ``[T, n]`` standard-normal draws to use; drawn from torch's RNG when None.
        noise_epsilon: the reference code's floor on the noise stddev.

    Returns:
        :class:`NoisyTopKGating` whose first two fields are ``gates [T, n]`` and ``load [n]``.
    """
    noisy = _check_gating_args(x, w_gate, w_noise, k, noise, train)
    raw_noise_stddev = x @ w_noise if noisy else None
    return noisy_top_k_from_logits(
        x @ w_gate, raw_noise_stddev, k, noise=noise, noise_epsilon=noise_epsilon
    )


def cv_squared(v: Tensor) -> Tensor:
    """The squared coefficient of variation, CV(v)² = Var(v) / Mean(v)² (eqs. 7 and 11).

    Population variance; the reference code's epsilons: ``size = numel + 1e-10`` and
    ``var / (mean² + 1e-10)``, so a constant or all-zero vector gives 0.

    Args:
        v: ``[n]``.

    Returns:
        A scalar.
    """
    size = v.numel() + CV_EPSILON
    mean = v.sum() / size
    variance = (v - mean).square().sum() / size
    return variance / (mean.square() + CV_EPSILON)


def importance(gates: Tensor) -> Tensor:
    """Importance(X) = Σ_{x∈X} G(x), eq. 6.

    Args:
        gates: ``[T, n]``.

    Returns:
        ``[n]``.
    """
    return gates.sum(0)


def balancing_loss(
    importance: Tensor, load: Tensor, w_importance: float = 0.1, w_load: float = 0.1
) -> Tensor:
    """L_importance + L_load = w_importance·CV(Importance)² + w_load·CV(Load)², eqs. 7 and 11.

    The defaults are the paper's language-modelling weights (0.1 each; 0.01 for translation).

    Args:
        importance: ``[n]``.
        load: ``[n]``.

    Returns:
        A scalar.
    """
    return w_importance * cv_squared(importance) + w_load * cv_squared(load)


def hierarchical_noisy_top_k_gating(
    x: Tensor,
    w_gate_primary: Tensor,
    w_noise_primary: Tensor | None,
    w_gate_secondary: Tensor,
    w_noise_secondary: Tensor | None,
    k_primary: int,
    k_secondary: int,
    *,
    train: bool = True,
    noise_primary: Tensor | None = None,
    noise_secondary: Tensor | None = None,
    noise_epsilon: float = 1e-2,
) -> HierarchicalGating:
    """Two-level noisy top-k gating of a hierarchical MoE, Appendix B (eqs. 12–14).

    ``y_H = Σ_i Σ_j G_primary(x)_i · G_i(x)_j · E_{i,j}(x)``;
    ``Importance_H(X)_{i,j} = Σ_x G_primary(x)_i · G_i(x)_j`` (eq. 13);
    ``Load_H(X)_{i,j} = Load_primary(X)_i · Load_i(X^(i))_j / |X^(i)|`` (eq. 14),
    with ``X^(i)`` the tokens whose primary gate ``i`` is non-zero. Because Load_primary is the
    smooth estimator, the primary gate receives gradient from the load loss. As in the
    reference code, ``|X^(i)|`` is the count of non-zero primary gates plus 1e-10.

    Secondary gates are computed only for the ``k_primary`` groups each token reaches (one
    grouped matmul over those rows), never for all ``a·b`` experts.

    Args:
        x: ``[T, d]``.
        w_gate_primary: ``[d, a]``.
        w_noise_primary: ``[d, a]`` or None.
        w_gate_secondary: ``[a, d, b]``, group i's W_g in ``[i]``.
        w_noise_secondary: ``[a, d, b]`` or None.
        k_primary: groups per token.
        k_secondary: experts per chosen group.
        train: add noise.
        noise_primary: ``[T, a]`` standard-normal draws, or None to draw them.
        noise_secondary: ``[T, a, b]`` standard-normal draws (group i's noise for token t is
            ``noise_secondary[t, i]``), or None to draw them.
        noise_epsilon: the floor on the noise stddev.
    """
    noisy_primary = _check_gating_args(
        x, w_gate_primary, w_noise_primary, k_primary, noise_primary, train, "_primary"
    )
    a = w_gate_primary.shape[1]
    noisy = _check_gating_args(
        x, w_gate_secondary, w_noise_secondary, k_secondary, noise_secondary, train,
        "_secondary", groups=a,
    )
    b = w_gate_secondary.shape[2]
    primary = noisy_top_k_from_logits(
        x @ w_gate_primary,
        x @ w_noise_primary if noisy_primary else None,
        k_primary, noise=noise_primary, noise_epsilon=noise_epsilon,
    )

    # One secondary row per (token, chosen group), rows grouped by group.
    rows = sort_by_expert(primary.top_k_indices, a)
    x_rows = gather_tokens(x, rows, k_primary)
    clean = grouped_matmul(x_rows, w_gate_secondary, rows.tokens_per_expert)
    raw = grouped_matmul(x_rows, w_noise_secondary, rows.tokens_per_expert) if noisy else None
    noise_rows = None
    if noise_secondary is not None and noisy:
        noise_rows = noise_secondary[rows.token_index, rows.expert_index]
    secondary = noisy_top_k_from_logits(
        clean, raw, k_secondary, noise=noise_rows, noise_epsilon=noise_epsilon
    )

    primary_gate_rows = primary.top_k_gates.reshape(-1).index_select(0, rows.order)  # [R]
    # Load_i(X^(i)): only rows whose primary gate is non-zero belong to X^(i).
    in_group = (primary_gate_rows > 0).to(secondary.prob_in_top_k.dtype)
    load_secondary = x.new_zeros(a, b).index_add_(
        0, rows.expert_index, secondary.prob_in_top_k * in_group[:, None]
    )
    group_sizes = (primary.gates > 0).sum(0).to(primary.load.dtype)  # |X^(i)|
    load = (load_secondary * (primary.load / (group_sizes + CV_EPSILON))[:, None]).reshape(-1)

    weights = primary_gate_rows[:, None] * secondary.top_k_gates  # [R, k_s]
    experts = rows.expert_index[:, None] * b + secondary.top_k_indices  # [R, k_s]
    imp = x.new_zeros(a * b).index_add_(0, experts.reshape(-1), weights.reshape(-1))

    # Back from row order to token order.
    t, kk = x.shape[0], k_primary * k_secondary
    expert_indices = unsort(experts, rows).reshape(t, kk)
    combine_weights = unsort(weights, rows).reshape(t, kk)
    return HierarchicalGating(
        expert_indices, combine_weights, imp, load, primary, secondary,
        rows.expert_index, rows.token_index,
    )


# ---------------------------------------------------------------------------------------------
# The rest of the family: losses and selection steps shared by several routers of
# :mod:`sparsemoe.routers`. Papers: Fedus et al. 2021 (Switch Transformers, arXiv:2101.03961),
# Zoph et al. 2022 (ST-MoE, arXiv:2202.08906), Zhou et al. 2022 (expert choice,
# arXiv:2202.09368), Appendix F of Shazeer et al. 2017 (strictly balanced gating) and Eigen,
# Ranzato and Sutskever 2013 (the Deep Mixture of Experts). An algorithm with a single user
# lives beside its router.
# ---------------------------------------------------------------------------------------------


def valid_weights(combine_weights: Tensor, valid: Tensor | None) -> Tensor:
    """``combine_weights [T, k]`` with the pairs that are not valid set to 0."""
    return combine_weights if valid is None else combine_weights * valid.to(combine_weights.dtype)


def pair_importance(
    expert_indices: Tensor, combine_weights: Tensor, num_experts: int, valid: Tensor | None = None
) -> Tensor:
    """Importance(X) = Σ_x G(x) (eq. 6) from a routing grid: the combine weights summed per
    expert, masked pairs excluded.

    Args:
        expert_indices: ``[T, k]`` int64.
        combine_weights: ``[T, k]``.
        num_experts: ``n``.
        valid: ``[T, k]`` bool or None.

    Returns:
        ``[n]``.
    """
    w = valid_weights(combine_weights, valid)
    return combine_weights.new_zeros(num_experts).index_add_(
        0, expert_indices.reshape(-1), w.reshape(-1)
    )


def pair_load(expert_indices: Tensor, num_experts: int, valid: Tensor | None = None) -> Tensor:
    """The number of (valid) pairs each expert was chosen for, as a float ``[n]`` vector."""
    ones = torch.ones(expert_indices.numel(), device=expert_indices.device)
    if valid is not None:
        ones = ones * valid.reshape(-1)
    return ones.new_zeros(num_experts).index_add_(0, expert_indices.reshape(-1), ones)


def switch_loss(probs: Tensor, expert_indices: Tensor, valid: Tensor | None = None) -> Tensor:
    """The Switch Transformer load-balancing loss without its α: ``N · Σ_i f_i · P_i``.

    Fedus et al. (2021), eqs. 4–6: ``f_i`` is the fraction of tokens dispatched to expert
    ``i`` (their arg-max, counted before any capacity drop) and ``P_i`` the mean router
    probability of expert ``i``; only ``P`` carries a gradient. Uniform routing gives 1.
    For ``k`` choices per token ``f_i`` counts every (valid) choice, so uniform routing gives
    ``k``, as in ``transformers``' ``load_balancing_loss_func`` (Mixtral, OLMoE, Qwen2-MoE).

    Args:
        probs: ``[T, n]`` router probabilities (softmax over all experts).
        expert_indices: ``[T, k]`` the experts each token is dispatched to.
        valid: ``[T, k]`` bool, or None when every choice counts.

    Returns:
        A scalar (0 for no tokens).
    """
    t, n = probs.shape
    if t == 0:
        return probs.sum() * 0.0
    f = pair_load(expert_indices, n, valid).to(probs.dtype) / t
    return n * (f * probs.mean(0)).sum()


def logsumexp(logits: Tensor) -> Tensor:
    """``log Σ_i exp(logits_i)`` over the last dimension, shifted by the row maximum as
    ``torch.logsumexp`` is (``-inf`` for a row of ``-inf``): the same value, but traceable by
    ``torch.compile`` with a data-dependent (unbacked) number of rows, on which torch's own
    decomposition guards.

    Shape: ``[..., n] -> [...]``.
    """
    shift = logits.detach().amax(-1, keepdim=True)
    shift = torch.where(shift.isinf(), 0.0, shift)
    return (logits - shift).exp().sum(-1).log() + shift.squeeze(-1)


def z_loss(logits: Tensor) -> Tensor:
    """The router z-loss of ST-MoE (Zoph et al. 2022, eq. 5), without its coefficient:
    ``L_z = (1/T) Σ_x (log Σ_i exp(logits(x)_i))²``; 0 for no tokens.

    Args:
        logits: ``[T, n]`` router logits.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return logsumexp(logits).square().mean()


def top_tokens_per_expert(scores: Tensor, m: int) -> Tensor:
    """``M[t, i] = 1`` iff ``scores[t, i]`` is among the ``m`` largest of column ``i``.

    The selection of expert-choice routing (Zhou et al. 2022: each expert takes its top ``m``
    tokens) and of Appendix F's batchwise mask ``M_batchwise(X, m)``. Ties go to the earlier
    token.

    Args:
        scores: ``[T, n]``.
        m: tokens per expert, ``0 <= m <= T``.

    Returns:
        ``[T, n]`` bool with exactly ``m`` true entries per column.
    """
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if m == 0:
        return mask
    # A stable descending sort, so that ties resolve to the lower token index everywhere.
    top = torch.sort(scores.detach(), dim=0, descending=True, stable=True).indices[:m]
    return mask.scatter_(0, top, True)


def renormalise_masked(weights: Tensor, mask: Tensor) -> Tensor:
    """``w_i·M_i / Σ_j w_j·M_j`` per row: the gates left after a mask, summing to 1 again.

    The renormalisation of Appendix F's masked gates (strictly balanced gating) and of Eigen
    et al.'s running-total constraint. A row whose mask keeps nothing becomes all zeros.

    Args:
        weights: ``[T, k]`` gate values.
        mask: ``[T, k]`` bool, the values kept.

    Returns:
        ``[T, k]``.
    """
    masked = weights * mask.to(weights.dtype)
    total = masked.sum(-1, keepdim=True)
    return masked / torch.where(total > 0, total, 1.0)


def gate_matrix(
    expert_indices: Tensor, combine_weights: Tensor, num_experts: int, valid: Tensor | None = None
) -> Tensor:
    """The dense ``[T, n]`` gates ``G(x)`` of a routing grid: each (valid) pair's weight at its
    expert, zeros elsewhere (what an analysis of the gates needs, e.g. per-example assignment).
    The arguments are :func:`pair_importance`'s; summed over tokens this is the importance.
    """
    w = valid_weights(combine_weights, valid)
    return w.new_zeros(w.shape[0], num_experts).scatter_add_(1, expert_indices, w)


_MOVED = {
    "batchwise_threshold_loss": "strictly_balanced",
    "balanced_capacities": "base_layers",
    "balanced_assignment": "base_layers",
    "MarginConstraint": "margin",
    "margin_constraint": "margin",
}


def __getattr__(name: str) -> object:
    """Single-router algorithms that lived here: deprecated aliases of their router's module."""
    if name in _MOVED:
        from .routers import base_layers, margin, strictly_balanced

        module = {"base_layers": base_layers, "margin": margin,
                  "strictly_balanced": strictly_balanced}[_MOVED[name]]
        return deprecated_alias(__name__, name, f"{module.__name__}.{name}",
                                getattr(module, name))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
