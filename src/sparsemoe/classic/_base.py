"""The shared estimator: EM and gradient fitting of a gated mixture of experts.

:class:`BaseMixtureOfExperts` plays the part of scikit-learn's ``BaseMixture``: it owns the
fitting loop (``n_init`` restarts, E-step/M-step, the convergence test on the objective,
``ConvergenceWarning``, ``warm_start``, ``verbose``) and the methods every model shares
(``gate_proba``, ``responsibilities``, ``log_likelihood``, ``bic``/``aic``, ``sample``). A
subclass supplies the gate (flat softmax or tree), the expert family, and how targets are
validated and encoded.

The model (Jordan & Jacobs 1994): ``P(y | x) = Σ_leaf g_leaf(x) P_leaf(y | x)``. The
objective, maximised by both solvers, is the log-likelihood minus the ridge penalties of the
gate (``gate_alpha``) and of classification experts (``alpha``), i.e. a MAP estimate under
Gaussian priors; with both penalties zero it is the log-likelihood itself. The loop fits
standardised inputs and targets (the penalties act on the weights of standardised inputs) and
rewrites the result for the raw units, so every fit is equivariant to the scales of ``X`` and
``y``.
"""

from __future__ import annotations

import warnings
from abc import ABCMeta, abstractmethod
from numbers import Integral, Real
from typing import Any, ClassVar

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp
from sklearn.base import BaseEstimator
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from .logit import add_intercept, sample_categorical, standardisation


def initial_responsibilities(
    Z: np.ndarray, n_leaves: int, init_params: str, rng: np.random.RandomState
) -> np.ndarray:
    """Starting responsibilities ``[n, n_leaves]`` from ``Z = [X, target features]``.

    ``"kmeans"``: one-hot labels of k-means on the standardised columns of ``Z`` (for
    regression ``Z = [X, y]``: a sample's input and output together say which local linear
    piece it belongs to; for classification ``Z = X``); ``"random"``: rows drawn from a flat
    Dirichlet.
    """
    if init_params == "random":
        return rng.dirichlet(np.ones(n_leaves), size=Z.shape[0])
    std = Z.std(axis=0)
    Zs = (Z - Z.mean(axis=0)) / np.where(std > 0, std, 1.0)
    labels = KMeans(n_clusters=n_leaves, n_init=1,
                    random_state=rng.randint(np.iinfo(np.int32).max)).fit(Zs).labels_
    return np.eye(n_leaves)[labels]


def mixture_objective(X1: np.ndarray, Y: np.ndarray, gate: Any, experts: Any
                      ) -> tuple[float, np.ndarray]:
    """The penalised log-likelihood and the log-posteriors of the leaves (the E-step).

    ``log h_n,leaf = log g_leaf(x_n) + log P_leaf(y_n|x_n) − log Σ_leaf' (…)``, the Bayes
    posterior of each expert given ``(x_n, y_n)``. Returns ``(objective, log_h: [n, n_leaves])``.
    """
    log_joint = gate.log_proba(X1) + experts.log_prob(X1, Y)
    log_lik = logsumexp(log_joint, axis=1)
    objective = float(log_lik.sum()) - gate.penalty() - experts.penalty()
    return objective, log_joint - log_lik[:, None]


def _inverse(units: tuple[np.ndarray, np.ndarray] | None
             ) -> tuple[np.ndarray, np.ndarray] | None:
    """The units ``(m', s')`` that undo ``(m, s)``: ``u = (x − m) / s`` is ``x = m' + s' u``
    with ``m' = −m / s``, ``s' = 1 / s``."""
    return None if units is None else (-units[0] / units[1], 1.0 / units[1])


def _unstandardise(gate: Any, experts: Any, x_units: tuple[np.ndarray, np.ndarray],
                   y_units: tuple[np.ndarray, np.ndarray] | None) -> None:
    """Rewrite a gate and experts fitted to ``(x − m_x) / s_x`` (and, for real targets,
    ``(y − m_y) / s_y``) for the raw ``x`` and ``y``: the same model, in place."""
    gate.unstandardise_inputs(*x_units)
    experts.unstandardise_inputs(*x_units)
    if y_units is not None:
        experts.unstandardise_targets(*y_units)


GATED_CONSTRAINTS: dict = {
    "gate_alpha": [Interval(Real, 0, None, closed="left")],
    "init_params": [StrOptions({"kmeans", "random"})],
    "n_init": [Interval(Integral, 1, None, closed="left")],
    "max_iter": [Interval(Integral, 1, None, closed="left")],
    "tol": [Interval(Real, 0, None, closed="left")],
    "random_state": ["random_state"],
    "verbose": ["verbose"],
}
"""Parameter constraints shared by every gated estimator (the mixtures and meta-pi)."""


class MultiOutputRegression:
    """Target handling shared by the regressors: ``y`` of shape (n,) or (n, n_outputs), kept
    internally as ``[n, n_outputs]`` and returned in the shape it was given."""

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()  # type: ignore[misc]
        tags.target_tags.multi_output = True
        return tags

    def _validate_regression_data(self, X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        """Validated ``X: [n, p]`` and ``Y: [n, n_outputs]`` (float64); sets ``n_outputs_``."""
        X, y = validate_data(self, X, y, multi_output=True, y_numeric=True, dtype=np.float64)
        self._single_output = y.ndim == 1
        Y = y.reshape(y.shape[0], -1).astype(np.float64)
        self.n_outputs_ = Y.shape[1]
        return X, Y

    def _decode_y(self, Y: np.ndarray) -> np.ndarray:
        return Y[:, 0] if self._single_output else Y


class BaseMixtureOfExperts(BaseEstimator, metaclass=ABCMeta):
    """Base class of the gated mixtures (not for direct use); see the concrete estimators."""

    _parameter_constraints: ClassVar[dict] = {
        **GATED_CONSTRAINTS,
        "solver": [StrOptions({"em", "gradient"})],
        "warm_start": ["boolean"],
    }

    def __init__(self, *, solver: str, gate_alpha: float, init_params: str, n_init: int,
                 max_iter: int, tol: float, random_state: Any, warm_start: bool,
                 verbose: int) -> None:
        self.solver = solver
        self.gate_alpha = gate_alpha
        self.init_params = init_params
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose

    # --- what a subclass supplies ------------------------------------------------------------

    @abstractmethod
    def _make_gate(self, n_features: int) -> Any:
        """A fresh gate (:mod:`.gates`) for ``n_features`` inputs."""

    @abstractmethod
    def _make_experts(self, n_experts: int, n_features: int, Y: np.ndarray) -> Any:
        """A fresh family (:mod:`.experts`) of ``n_experts`` experts for targets like ``Y``."""

    @abstractmethod
    def _target_units(self, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """``(mean, scale)`` of real targets ``Y``, which are fitted standardised; ``None``
        for class labels."""

    @abstractmethod
    def _target_features(self, Y: np.ndarray) -> np.ndarray:
        """``Y`` as real columns ``[n, q]`` for the k-means initialisation."""

    @abstractmethod
    def _encode_y(self, y: Any, n_samples: int) -> np.ndarray:
        """Targets given after fitting, checked and in the internal encoding."""

    @abstractmethod
    def _decode_y(self, Y: np.ndarray) -> np.ndarray:
        """Internal targets back to the user's form (labels, 1-D for one output)."""

    # --- fitting -----------------------------------------------------------------------------

    def _fit(self, X_raw: np.ndarray, Y_raw: np.ndarray) -> BaseMixtureOfExperts:
        """Fit on validated ``X: [n, p]`` and internally encoded ``Y``; see ``fit``.

        The fit runs on standardised inputs (and real targets), so that it is equivariant to
        their scales; the kept gate and experts are then rewritten for the raw units, and the
        objective is reported for the raw targets (``log p(y) = log p(v) − Σ_t log s_t`` for
        ``v = (y − m) / s``)."""
        n, p = X_raw.shape
        n_leaves = self._make_gate(p).n_leaves
        if n < n_leaves:
            raise ValueError(
                f"a mixture of {n_leaves} experts needs n_samples >= {n_leaves}, "
                f"got n_samples = {n}; use fewer experts or more data"
            )
        x_units = standardisation(X_raw)
        y_units = self._target_units(Y_raw)
        X = (X_raw - x_units[0]) / x_units[1]
        Y = Y_raw if y_units is None else (Y_raw - y_units[0]) / y_units[1]
        log_jacobian = 0.0 if y_units is None else float(np.log(y_units[1]).sum())
        X1 = add_intercept(X)
        rng = check_random_state(self.random_state)
        warm = self.warm_start and hasattr(self, "experts_")
        solve = self._fit_em if self.solver == "em" else self._fit_gradient
        best = None
        for init in range(1 if warm else self.n_init):
            if warm:  # the previous fit, in this data's standardised units
                gate, experts = self.gate_, self.experts_
                _unstandardise(gate, experts, _inverse(x_units), _inverse(y_units))
            else:
                gate, experts = self._make_gate(p), self._make_experts(n_leaves, p, Y)
                R = initial_responsibilities(np.hstack([X, self._target_features(Y)]),
                                             n_leaves, self.init_params, rng)
                experts.initialize(X1, Y, R)
                gate.m_step(X1, R)
            history, converged, n_iter, _ = solve(X1, Y, gate, experts)
            if self.verbose:
                print(f"{type(self).__name__} init {init + 1}: "
                      f"objective {history[-1] - log_jacobian:.6f} "
                      f"after {n_iter} {self.solver} iterations, converged={converged}")
            if best is None or history[-1] > best[2][-1]:
                best = (gate, experts, history, converged, n_iter)
        self.gate_, self.experts_, history, self.converged_, self.n_iter_ = best
        _unstandardise(self.gate_, self.experts_, x_units, y_units)
        self.objective_history_ = np.asarray(history) - log_jacobian
        self.objective_ = float(self.objective_history_[-1])
        if not self.converged_:
            warnings.warn(
                f"{type(self).__name__} did not converge in max_iter={self.max_iter} "
                f"{self.solver} iterations (tol={self.tol}); increase max_iter or raise tol",
                ConvergenceWarning, stacklevel=3,
            )
        return self

    def _fit_em(self, X1: np.ndarray, Y: np.ndarray, gate: Any, experts: Any
                ) -> tuple[list[float], bool, int, np.ndarray]:
        """EM (Jordan & Jacobs 1994): E-step posteriors, then each expert by weighted maximum
        likelihood and each gate node as a multinomial logit on the posteriors. Records the
        mean objective before the first and after every M-step."""
        n = X1.shape[0]
        objective, log_resp = mixture_objective(X1, Y, gate, experts)
        history = [objective / n]
        converged, iteration = False, 0
        for iteration in range(1, self.max_iter + 1):
            R = np.exp(log_resp)
            experts.m_step(X1, Y, R)
            gate.m_step(X1, R)
            objective, log_resp = mixture_objective(X1, Y, gate, experts)
            history.append(objective / n)
            change = history[-1] - history[-2]
            if self.verbose >= 2:
                print(f"  iteration {iteration}: objective {history[-1]:.6f} "
                      f"(change {change:+.3g})")
            if abs(change) < self.tol:
                converged = True
                break
        return history, converged, iteration, log_resp

    def _fit_gradient(self, X1: np.ndarray, Y: np.ndarray, gate: Any, experts: Any
                      ) -> tuple[list[float], bool, int, np.ndarray]:
        """Gradient ascent on the same objective (L-BFGS over every parameter at once). The
        gradient is the adaptive-mixtures-of-local-experts rule (Jacobs et al. 1991): each
        expert's log-density gradient weighted by its posterior ``h``, and ``x̃ (h − g)`` for
        the gate. Scales are optimised on the log scale; the ``min_variance`` floors of EM do
        not apply."""
        n = X1.shape[0]
        split = gate.get_flat().size

        def negative(theta: np.ndarray) -> tuple[float, np.ndarray]:
            gate.set_flat(theta[:split])
            experts.set_flat(theta[split:])
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                objective, log_resp = mixture_objective(X1, Y, gate, experts)
                R = np.exp(log_resp)
                grad = np.concatenate([gate.gradient(X1, R), experts.gradient(X1, Y, R)])
            if not (np.isfinite(objective) and np.all(np.isfinite(grad))):
                # A line-search trial overflowed (e.g. exp of a huge log-scale): report it as
                # infinitely bad so that L-BFGS backtracks.
                return np.inf, np.zeros_like(theta)
            return -objective / n, -grad / n

        theta0 = np.concatenate([gate.get_flat(), experts.get_flat()])
        history = [-negative(theta0)[0]]

        def record(intermediate_result: Any) -> None:
            history.append(-float(intermediate_result.fun))
            if self.verbose >= 2:
                print(f"  iteration {len(history) - 1}: objective {history[-1]:.6f}")

        res = minimize(negative, theta0, jac=True, method="L-BFGS-B", callback=record,
                       options={"maxiter": self.max_iter, "ftol": self.tol, "gtol": self.tol})
        negative(res.x)
        log_resp = mixture_objective(X1, Y, gate, experts)[1]
        return history, bool(res.success), max(int(res.nit), 1), log_resp

    # --- the fitted model ----------------------------------------------------------------------

    def _design(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        return add_intercept(validate_data(self, X, reset=False))

    def _reshape_leaves(self, A: np.ndarray) -> np.ndarray:
        return A.reshape(A.shape[0], *self.gate_.shape)

    def _combine(self, X1: np.ndarray, hard: bool) -> np.ndarray:
        """``Σ_leaf g_leaf(x) f_leaf(x)`` or, if ``hard``, ``f_argmax g(x)``: [n, outputs]."""
        log_g = self.gate_.log_proba(X1)
        preds = self.experts_.predictions(X1)  # [n, leaves, outputs]
        if hard:
            return preds[np.arange(X1.shape[0]), np.argmax(log_g, axis=1)]
        return np.einsum("nk,nko->no", np.exp(log_g), preds)

    def _log_responsibilities(self, X: Any, y: Any) -> tuple[np.ndarray, float]:
        X1 = self._design(X)
        Y = self._encode_y(y, X1.shape[0])
        objective, log_resp = mixture_objective(X1, Y, self.gate_, self.experts_)
        return log_resp, objective

    def gate_proba(self, X: Any) -> np.ndarray:
        """The gate's prior weights of the experts given ``x`` alone.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples, n_experts), or (n_samples, a, b) for a tree of gates
        (``g_i(x) g_{j|i}(x)``); rows sum to one.
        """
        return self._reshape_leaves(np.exp(self.gate_.log_proba(self._design(X))))

    def responsibilities(self, X: Any, y: Any) -> np.ndarray:
        """The posterior probability of each expert given ``(x, y)`` (the E-step):
        ``h = g(x) P(y|x) / Σ g(x) P(y|x)``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)

        Returns
        -------
        ndarray of shape (n_samples, n_experts), or (n_samples, a, b) for a tree of gates
        (``h_ij``; ``h_i`` is the sum over the last axis, ``h_{j|i} = h_ij / h_i``).
        """
        return self._reshape_leaves(np.exp(self._log_responsibilities(X, y)[0]))

    def log_likelihood(self, X: Any, y: Any) -> np.ndarray:
        """Per-sample log-likelihood ``log P(y_n | x_n)`` (natural log; densities for
        regression, probabilities for classification). Named apart from scikit-learn's
        ``score_samples(X)``, which has no ``y``; ``score`` stays R² / accuracy.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)

        Returns
        -------
        ndarray of shape (n_samples,)
        """
        X1 = self._design(X)
        Y = self._encode_y(y, X1.shape[0])
        log_joint = self.gate_.log_proba(X1) + self.experts_.log_prob(X1, Y)
        return logsumexp(log_joint, axis=1)

    def n_parameters(self) -> int:
        """Free parameters of the fitted model (gate + experts), as counted by ``bic``/``aic``;
        a softmax over ``c`` choices has ``c − 1`` free weight vectors."""
        check_is_fitted(self)
        return self.gate_.n_parameters() + self.experts_.n_parameters()

    def bic(self, X: Any, y: Any) -> float:
        """Bayesian information criterion ``−2 log L + n_parameters · log n`` (lower is better).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
        """
        log_lik = self.log_likelihood(X, y)
        return float(-2.0 * log_lik.sum() + self.n_parameters() * np.log(log_lik.shape[0]))

    def aic(self, X: Any, y: Any) -> float:
        """Akaike information criterion ``−2 log L + 2 n_parameters`` (lower is better).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
        """
        return float(-2.0 * self.log_likelihood(X, y).sum() + 2.0 * self.n_parameters())

    def sample(self, X: Any, random_state: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Draw one ``y`` per row of ``X`` from the fitted ``P(y | x)``: first an expert from
        the gate, then ``y`` from that expert.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        random_state : int, RandomState instance or None

        Returns
        -------
        y : ndarray of shape (n_samples,) or (n_samples, n_outputs)
        leaves : ndarray of shape (n_samples,), the expert drawn (``i * b + j`` in a tree).
        """
        X1 = self._design(X)
        rng = check_random_state(random_state)
        leaves = sample_categorical(np.exp(self.gate_.log_proba(X1)), rng)
        return self._decode_y(self.experts_.sample(X1, leaves, rng)), leaves
