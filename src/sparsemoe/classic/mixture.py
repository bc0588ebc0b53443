"""Flat mixtures of experts: a softmax gate over ``n_experts`` regression or classification
experts (Jacobs, Jordan, Nowlan & Hinton 1991; Jordan & Jacobs 1994), as scikit-learn
estimators. The regression and classification halves here are shared with the hierarchical
estimators of :mod:`.hierarchical`, which differ only in their gate."""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any, ClassVar

import numpy as np
from sklearn.base import ClassifierMixin, RegressorMixin, _fit_context
from sklearn.utils import check_array, column_or_1d
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import validate_data

from ._base import BaseMixtureOfExperts, MultiOutputRegression
from .experts import GaussianExperts, LaplaceExperts, MultinomialLogitExperts, StudentTExperts
from .gates import SoftmaxGate
from .logit import standardisation


class RegressionMixture(MultiOutputRegression, RegressorMixin, BaseMixtureOfExperts):
    """Regression half of the mixtures: real targets ``y: [n]`` or ``[n, n_outputs]`` and an
    expert family chosen by ``expert``. Concrete estimators add the gate."""

    _parameter_constraints: ClassVar[dict] = {
        **BaseMixtureOfExperts._parameter_constraints,
        "expert": [StrOptions({"gaussian", "laplace", "student_t"})],
        "covariance_type": [StrOptions({"diag", "full"})],
        "df": [Interval(Real, 0, None, closed="neither"), StrOptions({"estimate"})],
        "min_variance": [Interval(Real, 0, None, closed="neither")],
    }

    def __init__(self, *, expert: str, covariance_type: str, df: float | str,
                 min_variance: float, **base: Any) -> None:
        self.expert = expert
        self.covariance_type = covariance_type
        self.df = df
        self.min_variance = min_variance
        super().__init__(**base)

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any) -> RegressionMixture:
        """Fit the mixture by maximum (penalised) likelihood with ``solver``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)

        Returns
        -------
        self
        """
        if self.covariance_type == "full" and self.expert != "gaussian":
            raise ValueError(
                f"covariance_type='full' needs expert='gaussian', got expert={self.expert!r}; "
                f"Laplace and Student-t experts model the outputs with diagonal scales"
            )
        return self._fit(*self._validate_regression_data(X, y))

    def _make_experts(self, n_experts: int, n_features: int, Y: np.ndarray) -> Any:
        t = Y.shape[1]
        if self.expert == "gaussian":
            return GaussianExperts(n_experts, n_features, t, covariance_type=self.covariance_type,
                                   min_variance=self.min_variance)
        if self.expert == "laplace":
            return LaplaceExperts(n_experts, n_features, t, min_variance=self.min_variance)
        return StudentTExperts(n_experts, n_features, t, df=self.df,
                               min_variance=self.min_variance)

    def _target_units(self, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return standardisation(Y)

    def _target_features(self, Y: np.ndarray) -> np.ndarray:
        return Y

    def _encode_y(self, y: Any, n_samples: int) -> np.ndarray:
        Y = check_array(y, ensure_2d=False, dtype=np.float64, input_name="y")
        Y = Y.reshape(Y.shape[0], -1)
        if Y.shape != (n_samples, self.n_outputs_):
            raise ValueError(
                f"y must have shape ({n_samples},) or ({n_samples}, {self.n_outputs_}) to match "
                f"X and the fitted n_outputs_, got {Y.shape}"
            )
        return Y

    def predict(self, X: Any, hard: bool = False) -> np.ndarray:
        """The mixture's conditional mean ``Σ_i g_i(x) μ_i(x)``, or with ``hard=True`` the
        prediction of the expert the gate weights most, ``μ_{argmax_i g_i(x)}(x)`` (hard MoE).
        For Student-t experts ``μ_i`` is the centre (the mean when ``ν > 1``).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        hard : bool, default=False

        Returns
        -------
        ndarray of shape (n_samples,) or (n_samples, n_outputs)
        """
        return self._decode_y(self._combine(self._design(X), hard))


class ClassificationMixture(ClassifierMixin, BaseMixtureOfExperts):
    """Classification half of the mixtures: logistic (two classes) or multinomial-logistic
    experts with ridge ``alpha``. Concrete estimators add the gate."""

    _parameter_constraints: ClassVar[dict] = {
        **BaseMixtureOfExperts._parameter_constraints,
        "alpha": [Interval(Real, 0, None, closed="left")],
    }

    def __init__(self, *, alpha: float, **base: Any) -> None:
        self.alpha = alpha
        super().__init__(**base)

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any) -> ClassificationMixture:
        """Fit the mixture by maximum (penalised) likelihood with ``solver``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,), class labels.

        Returns
        -------
        self
        """
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        return self._fit(X, codes)

    def _make_experts(self, n_experts: int, n_features: int, Y: np.ndarray) -> Any:
        return MultinomialLogitExperts(n_experts, n_features, len(self.classes_), alpha=self.alpha)

    def _target_units(self, Y: np.ndarray) -> None:
        return None

    def _target_features(self, Y: np.ndarray) -> np.ndarray:
        # k-means on the inputs only: clusters that also split by label would start every
        # expert as a constant classifier, a fixed point of EM where the gate does all the work.
        return np.empty((Y.shape[0], 0))

    def _encode_y(self, y: Any, n_samples: int) -> np.ndarray:
        y = column_or_1d(y)
        if y.shape[0] != n_samples:
            raise ValueError(f"y must have {n_samples} labels to match X, got {y.shape[0]}")
        unseen = np.setdiff1d(y, self.classes_)
        if unseen.size:
            raise ValueError(f"y contains labels not seen in fit: {unseen.tolist()}; "
                             f"the fitted classes_ are {self.classes_.tolist()}")
        return np.searchsorted(self.classes_, y)

    def _decode_y(self, Y: np.ndarray) -> np.ndarray:
        return self.classes_[Y]

    def predict_proba(self, X: Any, hard: bool = False) -> np.ndarray:
        """Class probabilities ``Σ_i g_i(x) P_i(c | x)``, or with ``hard=True`` those of the
        expert the gate weights most.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        hard : bool, default=False

        Returns
        -------
        ndarray of shape (n_samples, n_classes), columns in the order of ``classes_``.
        """
        return self._combine(self._design(X), hard)

    def predict(self, X: Any, hard: bool = False) -> np.ndarray:
        """The most probable class under ``predict_proba(X, hard)``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        hard : bool, default=False

        Returns
        -------
        ndarray of shape (n_samples,)
        """
        proba = self.predict_proba(X, hard)  # checks that the model is fitted
        return self.classes_[np.argmax(proba, axis=1)]


class MixtureOfExpertsRegressor(RegressionMixture):
    """Mixture of linear regression experts under a softmax gate, fitted by EM or by gradient.

    ``P(y | x) = Σ_i g_i(x) P_i(y | x)`` with ``g(x) = softmax(x̃ V)`` (x̃ = [x, 1]) and linear
    experts ``μ_i(x) = x̃ W_i`` whose noise is Gaussian (Jordan & Jacobs 1994; Jacobs et al.
    1991 with variances), Laplace, or Student-t (robust). See :mod:`sparsemoe.classic.experts`
    for each family's EM M-step.

    The fit runs on standardised ``X`` and ``y`` (each column centred and divided by its
    standard deviation, as scikit-learn's ``StandardScaler``), so the fitted model is
    equivariant to their scales: fitted to ``(X·a, y·c)`` it predicts ``c ×`` the predictions
    of the fit to ``(X, y)``. The fitted gate and experts are then rewritten for the raw units
    (the same model); the penalties and floors below are therefore stated for standardised data.

    Parameters
    ----------
    n_experts : int, default=3
        Number of experts ``n``.
    expert : {"gaussian", "laplace", "student_t"}, default="gaussian"
        The experts' noise distribution.
    covariance_type : {"diag", "full"}, default="diag"
        Gaussian experts: one variance per expert and output ("diag"), or a full covariance per
        expert across the outputs ("full", multi-output only makes a difference).
    df : float > 0 or "estimate", default=4.0
        Student-t degrees of freedom ``ν``, fixed, or estimated per expert (ECM, starting at 4).
    min_variance : float > 0, default=1e-6
        EM floor on each expert's variance (Gaussian covariance eigenvalues, Laplace ``2b²``,
        Student-t ``σ²``) for the standardised ``y``, i.e. ``min_variance · var(y_t)`` in raw
        units; it bounds the likelihood, which is otherwise unbounded when an expert collapses
        onto a few points.
    solver : {"em", "gradient"}, default="em"
        "em": expectation-maximisation; "gradient": L-BFGS on the same objective with the
        adaptive-local-experts gradient.
    gate_alpha : float >= 0, default=1e-2
        Ridge ``(gate_alpha/2) ‖V‖²`` on the gate's non-intercept weights for the standardised
        inputs, i.e. ``(gate_alpha/2) Σ (gate_.coef[i, f] · sd(X_f))²`` in raw units (MAP with
        a Gaussian prior); keeps the gate finite when the experts' regions are separable.
    init_params : {"kmeans", "random"}, default="kmeans"
        Starting responsibilities: k-means on the standardised ``[X, y]``, or random.
    n_init : int, default=1
        Restarts; the fit with the highest objective is kept.
    max_iter : int, default=200
        EM iterations (or L-BFGS iterations) per restart.
    tol : float, default=1e-6
        EM stops when the mean objective per sample changes by less than ``tol``; for L-BFGS
        it is the relative-decrease and projected-gradient tolerance.
    random_state : int, RandomState instance or None, default=None
    warm_start : bool, default=False
        Start from the previous fit's parameters (``n_init`` is then ignored).
    verbose : int, default=0
        1: one line per restart (its final ``objective_``); 2: also one line per iteration
        (the objective of the standardised fit, which differs by ``Σ_t log sd(y_t)``).

    Attributes
    ----------
    gate_ : SoftmaxGate
        ``gate_.coef``: (n_experts, n_features), ``gate_.intercept``: (n_experts,).
    experts_ : GaussianExperts, LaplaceExperts or StudentTExperts
        ``experts_.coef``: (n_experts, n_outputs, n_features), ``experts_.intercept``:
        (n_experts, n_outputs), plus the family's scale (``covariance``, ``scale``, ``df``).
    objective_history_ : ndarray of shape (n_iter_ + 1,)
        Mean objective per sample (log-likelihood of the raw ``y`` minus the ``gate_alpha``
        penalty over n) at the start and after each iteration of the kept restart;
        non-decreasing for EM.
    objective_ : float
        Its last value.
    converged_ : bool
    n_iter_ : int
    n_outputs_ : int
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Defined only when ``X`` has string column names.

    Examples
    --------
    >>> import numpy as np
    >>> from sparsemoe.classic import MixtureOfExpertsRegressor
    >>> rng = np.random.RandomState(0)
    >>> x = rng.uniform(-1, 1, size=(300, 1))
    >>> y = np.where(x[:, 0] < 0, -2 * x[:, 0], 3 * x[:, 0]) + 0.05 * rng.randn(300)
    >>> model = MixtureOfExpertsRegressor(n_experts=2, random_state=0).fit(x, y)
    >>> np.sort(model.experts_.coef[:, 0, 0]).round(1)
    array([-2.,  3.])
    """

    _parameter_constraints: ClassVar[dict] = {
        **RegressionMixture._parameter_constraints,
        "n_experts": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(self, n_experts: int = 3, *, expert: str = "gaussian",
                 covariance_type: str = "diag", df: float | str = 4.0,
                 min_variance: float = 1e-6, solver: str = "em", gate_alpha: float = 1e-2,
                 init_params: str = "kmeans", n_init: int = 1, max_iter: int = 200,
                 tol: float = 1e-6, random_state: Any = None, warm_start: bool = False,
                 verbose: int = 0) -> None:
        self.n_experts = n_experts
        super().__init__(expert=expert, covariance_type=covariance_type, df=df,
                         min_variance=min_variance, solver=solver, gate_alpha=gate_alpha,
                         init_params=init_params, n_init=n_init, max_iter=max_iter, tol=tol,
                         random_state=random_state, warm_start=warm_start, verbose=verbose)

    def _make_gate(self, n_features: int) -> SoftmaxGate:
        return SoftmaxGate(self.n_experts, n_features, self.gate_alpha)


class MixtureOfExpertsClassifier(ClassificationMixture):
    """Mixture of logistic (two classes) or multinomial-logistic experts under a softmax gate,
    fitted by EM or by gradient (Jordan & Jacobs 1994).

    ``P(y = c | x) = Σ_i g_i(x) softmax(x̃ W_i)_c`` with ``g(x) = softmax(x̃ V)``.

    Parameters
    ----------
    n_experts : int, default=3
    alpha : float >= 0, default=1e-2
        Ridge on the experts' non-intercept weights for the standardised inputs (MAP; in raw
        units ``(alpha/2) Σ (experts_.coef[i, c, f] · sd(X_f))²``); keeps them finite on
        separable data.
    solver, gate_alpha, init_params, n_init, max_iter, tol, random_state, warm_start, verbose
        As in :class:`MixtureOfExpertsRegressor`; the objective subtracts both ridge penalties.
        The fit runs on standardised ``X`` (fitted attributes in raw units), so the predicted
        probabilities do not depend on the scale of ``X``.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    gate_ : SoftmaxGate
    experts_ : MultinomialLogitExperts
        ``experts_.coef``: (n_experts, n_classes, n_features), ``experts_.intercept``:
        (n_experts, n_classes).
    objective_history_, objective_, converged_, n_iter_, n_features_in_, feature_names_in_
        As in :class:`MixtureOfExpertsRegressor`.
    """

    _parameter_constraints: ClassVar[dict] = {
        **ClassificationMixture._parameter_constraints,
        "n_experts": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(self, n_experts: int = 3, *, alpha: float = 1e-2, solver: str = "em",
                 gate_alpha: float = 1e-2, init_params: str = "kmeans", n_init: int = 1,
                 max_iter: int = 200, tol: float = 1e-6, random_state: Any = None,
                 warm_start: bool = False, verbose: int = 0) -> None:
        self.n_experts = n_experts
        super().__init__(alpha=alpha, solver=solver, gate_alpha=gate_alpha,
                         init_params=init_params, n_init=n_init, max_iter=max_iter, tol=tol,
                         random_state=random_state, warm_start=warm_start, verbose=verbose)

    def _make_gate(self, n_features: int) -> SoftmaxGate:
        return SoftmaxGate(self.n_experts, n_features, self.gate_alpha)
