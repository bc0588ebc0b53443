"""The meta-pi network (Hampshire & Waibel 1992): a gated sum of experts trained on squared
error, ``f(x) = Σ_i g_i(x) μ_i(x)``, ``L = (1/2n) Σ_n ‖y_n − f(x_n)‖²``.

Unlike the likelihood mixtures, the experts here cooperate (every expert's output enters every
prediction), so the loss is minimised directly by gradient (L-BFGS), from the same k-means
start as the mixtures: each expert the least-squares fit of its cluster, the gate a multinomial
logit on the clusters.
"""

from __future__ import annotations

import warnings
from numbers import Integral
from typing import Any, ClassVar

import numpy as np
from scipy.optimize import minimize
from sklearn.base import BaseEstimator, RegressorMixin, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted, validate_data

from ._base import GATED_CONSTRAINTS, MultiOutputRegression, initial_responsibilities
from .experts import weighted_least_squares
from .gates import SoftmaxGate
from .logit import (
    add_intercept,
    logit_log_proba,
    ridge_penalty,
    standardisation,
    unstandardise_weights,
)


def meta_pi_loss_grad(V: np.ndarray, W: np.ndarray, X1: np.ndarray, Y: np.ndarray,
                      gate_alpha: float) -> tuple[float, np.ndarray, np.ndarray]:
    """The meta-pi loss ``(1/2n) Σ ‖y − Σ_i g_i μ_i‖² + (gate_alpha / 2n) ‖V_{:-1}‖²`` and its
    gradients.

    Parameters
    ----------
    V : ndarray of shape (d, k), gate weights (intercept row last).
    W : ndarray of shape (k, d, t), expert weights: ``μ_i(x) = x̃ W_i``.
    X1 : ndarray of shape (n, d); Y : ndarray of shape (n, t).

    Returns
    -------
    loss : float
    grad_V : ndarray of shape (d, k), ``X̃ᵀ [g_i rᵀ(μ_i − f)] / n + α V / n`` with ``r = f − y``
    grad_W : ndarray of shape (k, d, t), ``X̃ᵀ [g_i r] / n``
    """
    n = X1.shape[0]
    g = np.exp(logit_log_proba(X1, V))  # [n, k]
    mu = np.einsum("nd,kdt->nkt", X1, W)
    f = np.einsum("nk,nkt->nt", g, mu)
    r = f - Y
    loss = 0.5 * float(np.sum(r**2)) / n + ridge_penalty(V, gate_alpha) / n
    grad_W = np.einsum("nd,nk,nt->kdt", X1, g, r) / n
    dlogits = g * np.einsum("nt,nkt->nk", r, mu - f[:, None, :])  # ∂L/∂(x̃ V)_i, times n
    grad_V = X1.T @ dlogits / n
    grad_V[:-1] += gate_alpha * V[:-1] / n
    return loss, grad_V, grad_W


class MetaPiRegressor(MultiOutputRegression, RegressorMixin, BaseEstimator):
    """Meta-pi network: linear experts combined by a softmax gate, trained on squared error.

    The fit runs on standardised ``X`` and ``y`` (each column centred and divided by its
    standard deviation, as scikit-learn's ``StandardScaler``), so predictions are equivariant
    to the scales of both; the fitted gate and experts are then rewritten for the raw units.

    Parameters
    ----------
    n_experts : int, default=3
    gate_alpha : float >= 0, default=1e-2
        Ridge on the gate's non-intercept weights (for standardised inputs), added to the
        summed squared error / 2.
    init_params : {"kmeans", "random"}, default="kmeans"
        Starting clusters (k-means on the standardised ``[X, y]``, or random soft ones).
    n_init : int, default=1
        Restarts; the lowest loss is kept.
    max_iter : int, default=500
        L-BFGS iterations per restart.
    tol : float, default=1e-8
        L-BFGS stops when every component of the gradient of the standardised loss is at
        most ``tol`` (or when an iteration no longer lowers the loss). There is no
        relative-decrease test: scipy's divides the decrease by ``max(|loss|, 1)``, which is
        1 for this loss (below 1 on standardised data), so it would stop with gradients near
        1e-4, where rounding-level changes of the data move the fit by up to 1e-2·sd(y).
    random_state : int, RandomState instance or None, default=None
    verbose : int, default=0
        1: one line per restart.

    Attributes
    ----------
    gate_ : SoftmaxGate
    coef_ : ndarray of shape (n_experts, n_outputs, n_features)
    intercept_ : ndarray of shape (n_experts, n_outputs)
    loss_ : float
        Final training loss of the standardised problem: the mean of ``((y − f)/σ_y)² / 2``
        plus ``gate_alpha/2 · ‖gate_.coef · σ_x‖² / n`` (σ: the training columns' standard
        deviations).
    loss_history_ : ndarray, that loss at the start and after each L-BFGS iteration.
    converged_ : bool
    n_iter_ : int
    n_outputs_ : int
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (n_features_in_,)
    """

    _parameter_constraints: ClassVar[dict] = {
        **GATED_CONSTRAINTS,
        "n_experts": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(self, n_experts: int = 3, *, gate_alpha: float = 1e-2,
                 init_params: str = "kmeans", n_init: int = 1, max_iter: int = 500,
                 tol: float = 1e-8, random_state: Any = None, verbose: int = 0) -> None:
        self.n_experts = n_experts
        self.gate_alpha = gate_alpha
        self.init_params = init_params
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.verbose = verbose

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any) -> MetaPiRegressor:
        """Minimise the squared error by L-BFGS from each of ``n_init`` starts.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)

        Returns
        -------
        self
        """
        X_raw, Y_raw = self._validate_regression_data(X, y)
        n, p = X_raw.shape
        if n < self.n_experts:
            raise ValueError(f"a meta-pi network of {self.n_experts} experts needs n_samples >= "
                             f"{self.n_experts}, got n_samples = {n}; use fewer experts")
        # fitted on standardised X and y, so that the fit is equivariant to their scales
        x_mean, x_scale = standardisation(X_raw)
        y_mean, y_scale = standardisation(Y_raw)
        X, Y = (X_raw - x_mean) / x_scale, (Y_raw - y_mean) / y_scale
        X1 = add_intercept(X)
        rng = check_random_state(self.random_state)
        best = None
        for init in range(self.n_init):
            R = initial_responsibilities(np.hstack([X, Y]), self.n_experts, self.init_params, rng)
            gate = SoftmaxGate(self.n_experts, p, self.gate_alpha)
            gate.m_step(X1, R)
            W = np.stack([weighted_least_squares(X1, Y, R[:, i]) for i in range(self.n_experts)])
            fitted = self._minimise(X1, Y, gate.weights[0][0], W)
            if self.verbose:
                print(f"MetaPiRegressor init {init + 1}: loss {fitted[2][-1]:.6g} after "
                      f"{fitted[4]} iterations, converged={fitted[3]}")
            if best is None or fitted[2][-1] < best[2][-1]:
                best = fitted
        V, W, history, self.converged_, self.n_iter_ = best
        V = unstandardise_weights(V, x_mean, x_scale)  # the same gate and experts on raw X, y
        W = unstandardise_weights(W, x_mean, x_scale) * y_scale
        W[:, -1] += y_mean
        self.gate_ = SoftmaxGate(self.n_experts, p, self.gate_alpha)
        self.gate_.weights = [V[None]]
        self.coef_ = np.transpose(W[:, :-1], (0, 2, 1))
        self.intercept_ = W[:, -1]
        self.loss_history_ = np.asarray(history)
        self.loss_ = float(history[-1])
        if not self.converged_:
            warnings.warn(f"MetaPiRegressor did not converge in max_iter={self.max_iter} L-BFGS "
                          f"iterations; increase max_iter or standardise the inputs",
                          ConvergenceWarning, stacklevel=2)
        return self

    def _minimise(self, X1: np.ndarray, Y: np.ndarray, V0: np.ndarray, W0: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, list[float], bool, int]:
        split = V0.size

        def fun(theta: np.ndarray) -> tuple[float, np.ndarray]:
            V, W = theta[:split].reshape(V0.shape), theta[split:].reshape(W0.shape)
            loss, gV, gW = meta_pi_loss_grad(V, W, X1, Y, self.gate_alpha)
            return loss, np.concatenate([gV.ravel(), gW.ravel()])

        theta0 = np.concatenate([V0.ravel(), W0.ravel()])
        history = [fun(theta0)[0]]
        res = minimize(fun, theta0, jac=True, method="L-BFGS-B",
                       callback=lambda intermediate_result: history.append(
                           float(intermediate_result.fun)),
                       options={"maxiter": self.max_iter, "ftol": 0.0,  # see ``tol``
                                "gtol": self.tol})
        return (res.x[:split].reshape(V0.shape), res.x[split:].reshape(W0.shape), history,
                bool(res.success), max(int(res.nit), 1))

    def _expert_predictions(self, X1: np.ndarray) -> np.ndarray:
        return np.einsum("nd,ktd->nkt", X1[:, :-1], self.coef_) + self.intercept_[None]

    def gate_proba(self, X: Any) -> np.ndarray:
        """The gate's weights ``g(x)``, shape (n_samples, n_experts)."""
        check_is_fitted(self)
        return np.exp(self.gate_.log_proba(add_intercept(validate_data(self, X, reset=False))))

    def predict(self, X: Any, hard: bool = False) -> np.ndarray:
        """``Σ_i g_i(x) μ_i(x)``, or with ``hard=True`` ``μ_{argmax g(x)}(x)``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        hard : bool, default=False

        Returns
        -------
        ndarray of shape (n_samples,) or (n_samples, n_outputs)
        """
        check_is_fitted(self)
        X1 = add_intercept(validate_data(self, X, reset=False))
        g = np.exp(self.gate_.log_proba(X1))
        mu = self._expert_predictions(X1)
        if hard:
            Y = mu[np.arange(X1.shape[0]), np.argmax(g, axis=1)]
        else:
            Y = np.einsum("nk,nkt->nt", g, mu)
        return self._decode_y(Y)
