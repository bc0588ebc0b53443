"""Expert families: the conditional densities ``P_i(y | x)`` of a (hierarchical) mixture.

Every family keeps the parameters of all ``k`` experts stacked (``weights: [k, d, t]``, the
intercept in the last row of ``d = n_features + 1``) and supplies the pieces the EM loop and the
gradient solver need:

- ``log_prob(X1, Y) -> [n, k]``: ``log P_i(y_n | x_n)``;
- ``initialize(X1, Y, R)``: a first fit from initial responsibilities ``R: [n, k]``;
- ``m_step(X1, Y, R)``: maximise (or, where stated, increase) the expected complete-data
  log-likelihood ``Σ_n Σ_i R_ni log P_i(y_n | x_n)`` minus the family's penalty;
- ``gradient(X1, Y, R)``: the gradient of that same sum in ``get_flat`` order; at the posteriors
  it is the expert part of the log-likelihood gradient (the adaptive-local-experts rule of
  Jacobs et al. 1991: each expert learns in proportion to its posterior);
- ``predictions(X1)``: per-expert means ``[n, k, t]`` (regression) or class probabilities
  ``[n, k, c]`` (classification); ``sample(X1, z, rng)``; ``n_parameters()``.

An expert whose total responsibility is (numerically) zero keeps its parameters: they do not
enter the M-step objective at all.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.optimize import brentq, linprog
from scipy.special import digamma, gammaln

from .logit import (
    fit_logit,
    logit_log_proba,
    logit_loss_grad,
    ridge_penalty,
    sample_categorical,
    unstandardise_weights,
)

_ALIVE = 1e-10  # total responsibility below which an expert is left as it is
_LOG_2PI = np.log(2.0 * np.pi)
DF_BOUNDS = (0.1, 1000.0)
"""The Student-t degrees of freedom are estimated within these bounds."""


def weighted_least_squares(X1: np.ndarray, Y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``argmin_W Σ_n w_n ‖y_n − x̃_n W‖²`` (minimum-norm when rank-deficient). Returns [d, t]."""
    sw = np.sqrt(w)[:, None]
    return np.linalg.lstsq(sw * X1, sw * Y, rcond=None)[0]


def weighted_least_absolute_deviations(
    X1: np.ndarray, y: np.ndarray, w: np.ndarray
) -> np.ndarray | None:
    """``argmin_β Σ_n w_n |y_n − x̃_n β|`` exactly, as the linear program
    ``min Σ w (u⁺ + u⁻)  s.t.  X̃β + u⁺ − u⁻ = y,  u± ≥ 0`` (HiGHS); the weighted-median
    regression (L1 / median regression of Barrodale & Roberts). Returns [d], or None if the
    solver fails."""
    keep = w > 0
    X1, y, w = X1[keep], y[keep], w[keep]
    n, d = X1.shape
    eye = sparse.identity(n, format="csr")
    A = sparse.hstack([sparse.csr_matrix(X1), eye, -eye], format="csr")
    c = np.concatenate([np.zeros(d), w, w])
    bounds = [(None, None)] * d + [(0, None)] * (2 * n)
    res = linprog(c, A_eq=A, b_eq=y, bounds=bounds, method="highs")
    return res.x[:d] if res.status == 0 else None


class _StackedWeights:
    """Experts acting through ``x̃ W_i``, ``weights: [k, d, o]`` with the intercept row last
    (``o``: outputs for regression, classes for classification)."""

    weights: np.ndarray

    @property
    def coef(self) -> np.ndarray:
        """ndarray of shape (n_experts, o, n_features)."""
        return np.transpose(self.weights[:, :-1], (0, 2, 1))

    @property
    def intercept(self) -> np.ndarray:
        """ndarray of shape (n_experts, o)."""
        return self.weights[:, -1]

    def unstandardise_inputs(self, x_mean: np.ndarray, x_scale: np.ndarray) -> None:
        """Rewrite the experts, fitted to the inputs ``(x − x_mean) / x_scale``, for the raw
        inputs ``x``: the same experts. ``unstandardise_inputs(−x_mean / x_scale, 1 / x_scale)``
        is the inverse."""
        self.weights = unstandardise_weights(self.weights, x_mean, x_scale)


class _LinearExperts(_StackedWeights):
    """Regression experts whose location is linear: ``μ_i(x) = x̃ W_i``."""

    def predictions(self, X1: np.ndarray) -> np.ndarray:
        """``μ_i(x_n)``, shape (n_samples, n_experts, n_outputs)."""
        return np.einsum("nd,kdt->nkt", X1, self.weights)

    def residuals(self, X1: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """``y_n − μ_i(x_n)``, shape (n_samples, n_experts, n_outputs)."""
        return Y[:, None, :] - self.predictions(X1)

    def penalty(self) -> float:
        return 0.0

    def unstandardise_targets(self, y_mean: np.ndarray, y_scale: np.ndarray) -> None:
        """Rewrite the experts, fitted to the targets ``(y − y_mean) / y_scale``, for the raw
        targets ``y = y_mean + y_scale · v``: locations ``μ ↦ y_mean + y_scale μ`` and every
        output's noise scale multiplied by ``y_scale`` (the density of ``y`` is that of ``v``
        divided by ``Π_t y_scale_t``). ``unstandardise_targets(−y_mean / y_scale, 1 / y_scale)``
        is the inverse."""
        self.weights = self.weights * y_scale
        self.weights[:, -1] += y_mean
        self._scale_noise(y_scale)

    def _scale_noise(self, y_scale: np.ndarray) -> None:
        """Multiply every output's noise scale by ``y_scale``; here the per-output ``scale``
        (``[k, t]``) of the Laplace and Student-t families."""
        self.scale = self.scale * y_scale


class GaussianExperts(_LinearExperts):
    """Linear-Gaussian experts ``P_i(y|x) = N(y | W_iᵀ x̃, Σ_i)`` (Jordan & Jacobs 1994).

    ``covariance_type="diag"``: one variance per expert and output; ``"full"``: a full
    ``t × t`` covariance per expert (multi-output). EM M-step, exact: weighted least squares for
    ``W_i`` (the generalised-least-squares solution equals per-output WLS because every output
    shares the regressors), then ``Σ_i = Σ_n R_ni e e ᵀ / Σ_n R_ni`` maximised under the
    constraint "every eigenvalue ≥ min_variance" (eigenvalues clipped; for "diag" the diagonal
    clipped), which keeps the likelihood monotone. Gradient parametrisation: the Cholesky factor
    ``L`` of the precision ``Σ⁻¹ = L Lᵀ`` with log-diagonal.

    Attributes
    ----------
    weights : ndarray of shape (n_experts, n_features + 1, n_outputs)
    covariance : ndarray of shape (n_experts, n_outputs, n_outputs), diagonal for "diag".
    precision_cholesky : ndarray of shape (n_experts, n_outputs, n_outputs)
        Lower-triangular ``L`` with ``L Lᵀ = Σ⁻¹`` (what the densities are computed from).
    """

    def __init__(self, n_experts: int, n_features: int, n_outputs: int, *,
                 covariance_type: str = "diag", min_variance: float = 1e-6) -> None:
        self.covariance_type = covariance_type
        self.min_variance = min_variance
        self.weights = np.zeros((n_experts, n_features + 1, n_outputs))
        self.precision_cholesky = np.tile(np.eye(n_outputs), (n_experts, 1, 1))

    @property
    def covariance(self) -> np.ndarray:
        """``Σ = (L Lᵀ)⁻¹``, shape (n_experts, n_outputs, n_outputs)."""
        L_inv = np.linalg.inv(self.precision_cholesky)
        return np.transpose(L_inv, (0, 2, 1)) @ L_inv

    def _set_covariance(self, i: int, cov: np.ndarray) -> None:
        self.precision_cholesky[i] = np.linalg.cholesky(np.linalg.inv(cov))

    def _scale_noise(self, y_scale: np.ndarray) -> None:
        # Σ ↦ D Σ D with D = diag(y_scale): Σ⁻¹ ↦ (D⁻¹L)(D⁻¹L)ᵀ, and D⁻¹L is still lower
        # triangular with a positive diagonal.
        self.precision_cholesky = self.precision_cholesky / y_scale[None, :, None]

    def log_prob(self, X1: np.ndarray, Y: np.ndarray) -> np.ndarray:
        L = self.precision_cholesky
        z = np.einsum("nks,ksr->nkr", self.residuals(X1, Y), L)  # Lᵀe per sample and expert
        logdet = np.log(np.diagonal(L, axis1=1, axis2=2)).sum(axis=1)
        return -0.5 * Y.shape[1] * _LOG_2PI + logdet - 0.5 * np.sum(z**2, axis=2)

    def initialize(self, X1: np.ndarray, Y: np.ndarray, R: np.ndarray) -> None:
        self.m_step(X1, Y, R)

    def m_step(self, X1: np.ndarray, Y: np.ndarray, R: np.ndarray) -> None:
        for i in range(R.shape[1]):
            w = R[:, i]
            if w.sum() <= _ALIVE:
                continue
            self.weights[i] = weighted_least_squares(X1, Y, w)
            e = Y - X1 @ self.weights[i]
            S = (w[:, None] * e).T @ e / w.sum()
            if self.covariance_type == "diag":
                self._set_covariance(i, np.diag(np.maximum(np.diag(S), self.min_variance)))
            else:
                vals, vecs = np.linalg.eigh(S)
                self._set_covariance(i, (vecs * np.maximum(vals, self.min_variance)) @ vecs.T)

    def _free_mask(self) -> np.ndarray:
        t = self.precision_cholesky.shape[1]
        return np.eye(t, dtype=bool) if self.covariance_type == "diag" else np.tri(t, dtype=bool)

    def get_flat(self) -> np.ndarray:
        L = self.precision_cholesky.copy()
        idx = np.arange(L.shape[1])
        L[:, idx, idx] = np.log(L[:, idx, idx])
        return np.concatenate([self.weights.ravel(), L[:, self._free_mask()].ravel()])

    def set_flat(self, theta: np.ndarray) -> None:
        k, t = self.precision_cholesky.shape[:2]
        self.weights = theta[: self.weights.size].reshape(self.weights.shape).copy()
        L = np.zeros((k, t, t))
        L[:, self._free_mask()] = theta[self.weights.size:].reshape(k, -1)
        idx = np.arange(t)
        L[:, idx, idx] = np.exp(L[:, idx, idx])
        self.precision_cholesky = L

    def gradient(self, X1: np.ndarray, Y: np.ndarray, R: np.ndarray) -> np.ndarray:
        L = self.precision_cholesky
        precision = L @ np.transpose(L, (0, 2, 1))
        e = self.residuals(X1, Y)  # [n, k, t]
        g_w = np.einsum("nd,nk,nks,kst->kdt", X1, R, e, precision)
        # ∂/∂L of Σ_n R (log|L| − ½‖Lᵀe‖²) = diag(Σ R / L_tt) − (Σ_n R e eᵀ) L
        g_L = -np.einsum("nk,nks,nkr,krq->ksq", R, e, e, L)
        idx = np.arange(L.shape[1])
        g_L[:, idx, idx] += R.sum(axis=0)[:, None] / L[:, idx, idx]
        g_L[:, idx, idx] *= L[:, idx, idx]  # chain rule for the log-diagonal
        return np.concatenate([g_w.ravel(), g_L[:, self._free_mask()].ravel()])

    def n_parameters(self) -> int:
        k, d, t = self.weights.shape
        return k * (d * t + int(self._free_mask().sum()))

    def sample(self, X1: np.ndarray, z: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
        mu = self.predictions(X1)[np.arange(len(z)), z]
        # C = L⁻ᵀ has C Cᵀ = (L Lᵀ)⁻¹ = Σ without forming Σ, whose entries overflow for y
        # beyond ~1e154 while L's stay representable.
        C = np.linalg.inv(np.transpose(self.precision_cholesky, (0, 2, 1)))[z]
        return mu + np.einsum("nts,ns->nt", C, rng.standard_normal(mu.shape))


class LaplaceExperts(_LinearExperts):
    """Linear-Laplace experts ``P_i(y|x) = Π_t exp(−|y_t − μ_it(x)| / b_it) / (2 b_it)``
    (outputs independent given the expert).

    EM M-step, exact: for each expert and output, the weighted least-absolute-deviations
    regression (a linear program; :func:`weighted_least_absolute_deviations`), then
    ``b = Σ R |e| / Σ R`` floored so that the variance ``2b² ≥ min_variance``. The new
    coefficients are kept only if they do not increase the weighted absolute error (guarding
    against solver tolerance), so the likelihood is monotone.

    Attributes
    ----------
    weights : ndarray of shape (n_experts, n_features + 1, n_outputs)
    scale : ndarray of shape (n_experts, n_outputs), the Laplace scales ``b``.
    """

    def __init__(self, n_experts: int, n_features: int, n_outputs: int, *,
                 min_variance: float = 1e-6) -> None:
        self.min_variance = min_variance
        self.weights = np.zeros((n_experts, n_features + 1, n_outputs))
        self.scale = np.ones((n_experts, n_outputs))

    def log_prob(self, X1: np.ndarray, Y: np.ndarray) -> np.ndarray:
        b = self.scale[None]
        return np.sum(-np.log(2.0 * b) - np.abs(self.residuals(X1, Y)) / b, axis=2)

    def initialize(self, X1: np.ndarray, Y: np.ndarray, R: np.ndarray) -> None:
        self.m_step(X1, Y, R)

    def m_step(self, X1: np.ndarray, Y: np.ndarray, R: np.ndarray) -> None:
        floor = np.sqrt(self.min_variance / 2.0)
        for i in range(R.shape[1]):
            w = R[:, i]
            if w.sum() <= _ALIVE:
                continue
            for t in range(Y.shape[1]):
                old = self.weights[i, :, t]
                new = weighted_least_absolute_deviations(X1, Y[:, t], w)
                if new is not None and (w @ np.abs(Y[:, t] - X1 @ new)
                                        <= w @ np.abs(Y[:, t] - X1 @ old)):
                    self.weights[i, :, t] = new
            absres = np.abs(Y - X1 @ self.weights[i])
            self.scale[i] = np.maximum(w @ absres / w.sum(), floor)

    def get_flat(self) -> np.ndarray:
        return np.concatenate([self.weights.ravel(), np.log(self.scale).ravel()])

    def set_flat(self, theta: np.ndarray) -> None:
        self.weights = theta[: self.weights.size].reshape(self.weights.shape).copy()
        self.scale = np.exp(theta[self.weights.size:]).reshape(self.scale.shape)

    def gradient(self, X1: np.ndarray, Y: np.ndarray, R: np.ndarray) -> np.ndarray:
        e = self.residuals(X1, Y)
        b = self.scale[None]
        g_w = np.einsum("nd,nk,nkt->kdt", X1, R, np.sign(e) / b)
        g_logb = np.einsum("nk,nkt->kt", R, np.abs(e) / b - 1.0)
        return np.concatenate([g_w.ravel(), g_logb.ravel()])

    def n_parameters(self) -> int:
        k, d, t = self.weights.shape
        return k * (d * t + t)

    def sample(self, X1: np.ndarray, z: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
        mu = self.predictions(X1)[np.arange(len(z)), z]
        return rng.laplace(mu, self.scale[z])


class StudentTExperts(_LinearExperts):
    """Linear Student-t experts (robust regression; Lange, Little & Taylor 1989):
    ``P_i(y|x) = t_ν(y | μ_i(x), diag(σ_i²))``, the multivariate t with ``ν_i`` degrees of
    freedom, i.e. ``y | u ~ N(μ, diag(σ²)/u)`` with a latent scale ``u ~ Gamma(ν/2, ν/2)``.

    EM (ECM) M-step with the latent scales: the E-step gives, per sample and expert,
    ``E[u] = (ν + t)/(ν + δ)`` with ``δ = Σ_t e_t²/σ_t²``; the coefficients are weighted least
    squares with weights ``R · E[u]`` (IRLS), ``σ_t² = Σ R E[u] e_t² / Σ R`` (floored at
    ``min_variance``), and, with ``df="estimate"``, ``ν`` solves McLachlan & Peel's (2000,
    eq. 7.42) score equation on ``DF_BOUNDS`` by Brent's method. Each conditional step
    maximises the expected complete-data log-likelihood, so the likelihood is monotone.

    Attributes
    ----------
    weights : ndarray of shape (n_experts, n_features + 1, n_outputs)
    scale : ndarray of shape (n_experts, n_outputs), the scales ``σ`` (not squared).
    df : ndarray of shape (n_experts,), the degrees of freedom ``ν``.
    """

    def __init__(self, n_experts: int, n_features: int, n_outputs: int, *,
                 df: float | str = 4.0, min_variance: float = 1e-6) -> None:
        self.estimate_df = df == "estimate"
        self.min_variance = min_variance
        self.weights = np.zeros((n_experts, n_features + 1, n_outputs))
        self.scale = np.ones((n_experts, n_outputs))
        self.df = np.full(n_experts, 4.0 if self.estimate_df else float(df))

    def _mahalanobis(self, e: np.ndarray) -> np.ndarray:
        return np.sum((e / self.scale[None]) ** 2, axis=2)  # δ: [n, k]

    def log_prob(self, X1: np.ndarray, Y: np.ndarray) -> np.ndarray:
        t = Y.shape[1]
        nu = self.df[None]
        delta = self._mahalanobis(self.residuals(X1, Y))
        return (gammaln((nu + t) / 2) - gammaln(nu / 2) - 0.5 * t * np.log(nu * np.pi)
                - np.log(self.scale).sum(axis=1)[None] - 0.5 * (nu + t) * np.log1p(delta / nu))

    def initialize(self, X1: np.ndarray, Y: np.ndarray, R: np.ndarray) -> None:
        """A Gaussian fit (all latent scales 1) to start from."""
        for i in range(R.shape[1]):
            w = R[:, i]
            self.weights[i] = weighted_least_squares(X1, Y, w)
            e = Y - X1 @ self.weights[i]
            self.scale[i] = np.sqrt(np.maximum(w @ e**2 / w.sum(), self.min_variance))

    def m_step(self, X1: np.ndarray, Y: np.ndarray, R: np.ndarray) -> None:
        t = Y.shape[1]
        nu = self.df.copy()
        delta = self._mahalanobis(self.residuals(X1, Y))
        u = (nu[None] + t) / (nu[None] + delta)  # E[u | y, expert]: [n, k]
        for i in range(R.shape[1]):
            w = R[:, i]
            if w.sum() <= _ALIVE:
                continue
            wu = w * u[:, i]
            self.weights[i] = weighted_least_squares(X1, Y, wu)
            e = Y - X1 @ self.weights[i]
            self.scale[i] = np.sqrt(np.maximum(wu @ e**2 / w.sum(), self.min_variance))
            if self.estimate_df:
                e_log_u = digamma((nu[i] + t) / 2) - np.log((nu[i] + delta[:, i]) / 2)
                const = 1.0 + w @ (e_log_u - u[:, i]) / w.sum()
                self.df[i] = self._solve_df(const)

    @staticmethod
    def _solve_df(const: float) -> float:
        """The maximiser over ``DF_BOUNDS`` of the ν part of the expected complete-data
        log-likelihood, whose derivative ``log(ν/2) − ψ(ν/2) + const`` decreases in ν."""
        def score(nu: float) -> float:
            return np.log(nu / 2) - digamma(nu / 2) + const

        lo, hi = DF_BOUNDS
        if score(hi) >= 0:
            return hi
        if score(lo) <= 0:
            return lo
        return brentq(score, lo, hi, xtol=1e-10)

    def get_flat(self) -> np.ndarray:
        parts = [self.weights.ravel(), np.log(self.scale).ravel()]
        if self.estimate_df:
            parts.append(np.log(self.df))
        return np.concatenate(parts)

    def set_flat(self, theta: np.ndarray) -> None:
        nw, ns = self.weights.size, self.scale.size
        self.weights = theta[:nw].reshape(self.weights.shape).copy()
        self.scale = np.exp(theta[nw:nw + ns]).reshape(self.scale.shape)
        if self.estimate_df:
            self.df = np.exp(theta[nw + ns:])

    def gradient(self, X1: np.ndarray, Y: np.ndarray, R: np.ndarray) -> np.ndarray:
        t = Y.shape[1]
        nu = self.df[None]
        e = self.residuals(X1, Y)
        delta = self._mahalanobis(e)
        f = (nu + t) / (nu + delta)  # also E[u]: the t's IRLS weight
        std = e / self.scale[None]
        g_w = np.einsum("nd,nk,nkt->kdt", X1, R * f, std / self.scale[None])
        g_logs = np.einsum("nk,nkt->kt", R, f[:, :, None] * std**2 - 1.0)
        parts = [g_w.ravel(), g_logs.ravel()]
        if self.estimate_df:
            d_nu = 0.5 * (digamma((nu + t) / 2) - digamma(nu / 2) - t / nu
                          - np.log1p(delta / nu) + (nu + t) * delta / (nu * (nu + delta)))
            parts.append(self.df * np.sum(R * d_nu, axis=0))
        return np.concatenate(parts)

    def n_parameters(self) -> int:
        k, d, t = self.weights.shape
        return k * (d * t + t + int(self.estimate_df))

    def sample(self, X1: np.ndarray, z: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
        mu = self.predictions(X1)[np.arange(len(z)), z]
        nu = self.df[z]
        u = rng.chisquare(nu) / nu  # one latent scale per sample, shared by the outputs
        return mu + self.scale[z] * rng.standard_normal(mu.shape) / np.sqrt(u)[:, None]


class MultinomialLogitExperts(_StackedWeights):
    """Classification experts ``P_i(y = c | x) = softmax(x̃ W_i)_c``: logistic regression for two
    classes, multinomial logistic for more (Jordan & Jacobs 1994).

    EM M-step: each expert is a multinomial logit fitted to the one-hot labels with sample
    weights ``R_ni`` and ridge ``alpha`` (L-BFGS on the IRLS objective, never worse than the
    current weights).

    Attributes
    ----------
    weights : ndarray of shape (n_experts, n_features + 1, n_classes)
    """

    def __init__(self, n_experts: int, n_features: int, n_classes: int, *,
                 alpha: float = 1e-2) -> None:
        self.alpha = alpha
        self.weights = np.zeros((n_experts, n_features + 1, n_classes))

    def predictions(self, X1: np.ndarray) -> np.ndarray:
        """``P_i(y = c | x_n)``, shape (n_samples, n_experts, n_classes)."""
        return np.exp(logit_log_proba(X1, self.weights))

    def log_prob(self, X1: np.ndarray, y: np.ndarray) -> np.ndarray:
        return logit_log_proba(X1, self.weights)[np.arange(len(y)), :, y]

    def _targets(self, y: np.ndarray, R: np.ndarray) -> np.ndarray:
        onehot = np.eye(self.weights.shape[2])[y]  # [n, c]
        return R.T[:, :, None] * onehot[None]  # [k, n, c]

    def initialize(self, X1: np.ndarray, y: np.ndarray, R: np.ndarray) -> None:
        self.m_step(X1, y, R)

    def m_step(self, X1: np.ndarray, y: np.ndarray, R: np.ndarray) -> None:
        self.weights = fit_logit(self.weights, X1, self._targets(y, R), self.alpha)

    def penalty(self) -> float:
        return ridge_penalty(self.weights, self.alpha)

    def get_flat(self) -> np.ndarray:
        return self.weights.ravel().copy()

    def set_flat(self, theta: np.ndarray) -> None:
        self.weights = theta.reshape(self.weights.shape).copy()

    def gradient(self, X1: np.ndarray, y: np.ndarray, R: np.ndarray) -> np.ndarray:
        return -logit_loss_grad(self.weights, X1, self._targets(y, R), self.alpha)[1].ravel()

    def n_parameters(self) -> int:
        k, d, c = self.weights.shape
        return k * d * (c - 1)

    def sample(self, X1: np.ndarray, z: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
        p = self.predictions(X1)[np.arange(len(z)), z]  # [n, c]
        return sample_categorical(p, rng)
