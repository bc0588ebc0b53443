"""Gating networks: the softmax gate of a flat mixture and the depth-2 tree of an HME.

A gate gives every sample a prior over the leaves (experts), ``log g: [n, n_leaves]``. Every
gate here is made of multinomial-logit nodes (:mod:`.logit`), so its EM M-step is a weighted
multinomial-logit fit of each node on targets built from the E-step posteriors ``R``, and the
gradient of the log-likelihood with respect to a node is the same expression evaluated at the
posteriors (Fisher's identity).
"""

from __future__ import annotations

import numpy as np

from .logit import (
    fit_logit,
    logit_log_proba,
    logit_loss_grad,
    ridge_penalty,
    unstandardise_weights,
)


class _LogitGate:
    """Shared machinery: ``self.weights`` is a list of stacked logit weights ``[k, d, c]``, one
    per level of the tree; subclasses say how the levels combine (``log_proba``) and which
    targets each level is fitted to (``_targets``)."""

    weights: list[np.ndarray]
    alpha: float
    shape: tuple[int, ...]

    @property
    def n_leaves(self) -> int:
        return int(np.prod(self.shape))

    def log_proba(self, X1: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _targets(self, R: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    def m_step(self, X1: np.ndarray, R: np.ndarray) -> None:
        """Each node: weighted multinomial logit on its posterior targets (IRLS's objective,
        solved by L-BFGS; never worse than the current weights)."""
        self.weights = [fit_logit(W, X1, T, self.alpha)
                        for W, T in zip(self.weights, self._targets(R), strict=True)]

    def penalty(self) -> float:
        """``(α/2)‖V‖²`` over every node's non-intercept weights (a Gaussian prior: MAP-EM)."""
        return sum(ridge_penalty(W, self.alpha) for W in self.weights)

    def gradient(self, X1: np.ndarray, R: np.ndarray) -> np.ndarray:
        """Flat gradient of ``Σ_n Σ_leaf R log g − penalty`` in ``get_flat`` order; at the
        posteriors ``R = h`` this is the gate part of the log-likelihood gradient."""
        return -np.concatenate([logit_loss_grad(W, X1, T, self.alpha)[1].ravel()
                                for W, T in zip(self.weights, self._targets(R), strict=True)])

    def unstandardise_inputs(self, x_mean: np.ndarray, x_scale: np.ndarray) -> None:
        """Rewrite every node, fitted to the inputs ``(x − x_mean) / x_scale``, for the raw
        inputs ``x``: the same gate (``V_f / s_f`` and intercept ``v_0 − Σ_f m_f V_f / s_f``).
        ``unstandardise_inputs(−x_mean / x_scale, 1 / x_scale)`` is the inverse."""
        self.weights = [unstandardise_weights(W, x_mean, x_scale) for W in self.weights]

    def get_flat(self) -> np.ndarray:
        return np.concatenate([W.ravel() for W in self.weights])

    def set_flat(self, theta: np.ndarray) -> None:
        sizes = np.cumsum([W.size for W in self.weights])[:-1]
        self.weights = [part.reshape(W.shape)
                        for W, part in zip(self.weights, np.split(theta, sizes), strict=True)]

    def n_parameters(self) -> int:
        """Free parameters: a softmax over c outputs has c − 1 free weight vectors."""
        return sum(k * d * (c - 1) for k, d, c in (W.shape for W in self.weights))


class SoftmaxGate(_LogitGate):
    """The multinomial-logit gate ``g_i(x) = softmax(x̃ V)_i`` over ``n_experts`` (Jacobs et al.
    1991, the gating network's w(x)_i).

    Attributes
    ----------
    weights : list of one ndarray of shape (1, n_features + 1, n_experts), intercept row last.
    """

    def __init__(self, n_experts: int, n_features: int, alpha: float) -> None:
        self.shape = (n_experts,)
        self.alpha = alpha
        self.weights = [np.zeros((1, n_features + 1, n_experts))]

    @property
    def coef(self) -> np.ndarray:
        """ndarray of shape (n_experts, n_features)."""
        return self.weights[0][0, :-1].T

    @property
    def intercept(self) -> np.ndarray:
        """ndarray of shape (n_experts,)."""
        return self.weights[0][0, -1]

    def log_proba(self, X1: np.ndarray) -> np.ndarray:
        """``log g(x)``, shape (n_samples, n_experts)."""
        return logit_log_proba(X1, self.weights[0])[:, 0]

    def _targets(self, R: np.ndarray) -> list[np.ndarray]:
        return [R[None]]


class TreeGate(_LogitGate):
    """Jordan & Jacobs' (1994) depth-2 gating tree: a top gate ``g_i(x)`` over ``a`` branches and
    in branch ``i`` a gate ``g_{j|i}(x)`` over ``b`` experts; the prior of leaf ``(i, j)`` is
    ``g_i g_{j|i}`` (leaves are flattened as ``i * b + j``).

    M-step: with leaf posteriors ``h_ij``, the top gate is a multinomial logit on ``h_i = Σ_j
    h_ij`` and gate ``i`` one on ``h_{j|i}`` with sample weights ``h_i``, i.e. on the targets
    ``h_i h_{j|i} = h_ij``.

    Attributes
    ----------
    weights : [top of shape (1, n_features + 1, a), lower of shape (a, n_features + 1, b)].
    """

    def __init__(self, n_branches: tuple[int, int], n_features: int, alpha: float) -> None:
        a, b = n_branches
        self.shape = (a, b)
        self.alpha = alpha
        self.weights = [np.zeros((1, n_features + 1, a)), np.zeros((a, n_features + 1, b))]

    @property
    def top_coef(self) -> np.ndarray:
        """ndarray of shape (a, n_features)."""
        return self.weights[0][0, :-1].T

    @property
    def top_intercept(self) -> np.ndarray:
        """ndarray of shape (a,)."""
        return self.weights[0][0, -1]

    @property
    def lower_coef(self) -> np.ndarray:
        """ndarray of shape (a, b, n_features)."""
        return np.transpose(self.weights[1][:, :-1], (0, 2, 1))

    @property
    def lower_intercept(self) -> np.ndarray:
        """ndarray of shape (a, b)."""
        return self.weights[1][:, -1]

    def log_proba(self, X1: np.ndarray) -> np.ndarray:
        """``log g_i + log g_{j|i}``, shape (n_samples, a * b)."""
        top = logit_log_proba(X1, self.weights[0])[:, 0]  # [n, a]
        lower = logit_log_proba(X1, self.weights[1])  # [n, a, b]
        return (top[:, :, None] + lower).reshape(X1.shape[0], -1)

    def _targets(self, R: np.ndarray) -> list[np.ndarray]:
        Rt = R.reshape(R.shape[0], *self.shape)  # h_ij: [n, a, b]
        return [Rt.sum(axis=2)[None], np.transpose(Rt, (1, 0, 2))]
