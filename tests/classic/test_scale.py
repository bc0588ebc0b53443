"""Scale equivariance of the mixtures: they fit standardised inputs (and real targets) and
rewrite the fitted gate and experts for the raw units.

The rewriting is checked piece by piece against the change-of-variables formula
``p_y(y | x) = p_v((y − m)/s | (x − m_x)/s_x) / Π s``, and every estimator end to end: fitted to
``X·c`` or ``y·c`` (c = 1e-8, 1e8; y·1e200), it predicts ``c ×`` (for y) the unscaled fit's
predictions, with the same gate, posteriors and log-likelihood up to ``log c``.
"""

import functools
import warnings

import numpy as np
import pytest
from classic_data import piecewise_linear
from sklearn.exceptions import ConvergenceWarning
from test_expert_families import FAMILIES, data, randomised
from test_mixture import classification_data, two_output_data

from sparsemoe.classic import (
    HierarchicalMixtureOfExpertsClassifier,
    HierarchicalMixtureOfExpertsRegressor,
    MixtureOfExpertsClassifier,
    MixtureOfExpertsRegressor,
)
from sparsemoe.classic.experts import MultinomialLogitExperts
from sparsemoe.classic.gates import SoftmaxGate, TreeGate
from sparsemoe.classic.logit import add_intercept

X_MEAN, X_SCALE = np.array([3.0, -2.0]), np.array([0.5, 40.0])
Y_MEAN, Y_SCALE = np.array([-7.0, 1e3]), np.array([2e-3, 5.0])


def raw(X1, Y):
    """Standardised ``(ũ, v)`` to raw ``(x̃, y)`` under the units above."""
    return add_intercept(X_MEAN + X_SCALE * X1[:, :-1]), Y_MEAN + Y_SCALE * Y


@pytest.mark.parametrize("name", FAMILIES)
def test_unstandardised_experts_are_the_same_densities(name):
    U1, V, _ = data()
    family = randomised(FAMILIES[name](2))
    log_p, mu = family.log_prob(U1, V), family.predictions(U1)
    before = family.get_flat()
    X1, Y = raw(U1, V)
    family.unstandardise_inputs(X_MEAN, X_SCALE)
    family.unstandardise_targets(Y_MEAN, Y_SCALE)
    np.testing.assert_allclose(family.predictions(X1), Y_MEAN + Y_SCALE * mu, rtol=1e-12,
                               atol=1e-12 * np.abs(Y_MEAN).max())
    np.testing.assert_allclose(family.log_prob(X1, Y), log_p - np.log(Y_SCALE).sum(),
                               rtol=1e-9)
    family.unstandardise_targets(-Y_MEAN / Y_SCALE, 1 / Y_SCALE)  # the inverse maps
    family.unstandardise_inputs(-X_MEAN / X_SCALE, 1 / X_SCALE)
    np.testing.assert_allclose(family.get_flat(), before, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("make", [lambda: SoftmaxGate(4, 2, alpha=0.0),
                                  lambda: TreeGate((2, 3), 2, alpha=0.0),
                                  lambda: MultinomialLogitExperts(3, 2, 4)])
def test_unstandardised_logits_are_the_same_probabilities(make):
    U1, _, _ = data()
    node = randomised(make())
    log_p = node.log_proba(U1) if hasattr(node, "log_proba") else node.predictions(U1)
    node.unstandardise_inputs(X_MEAN, X_SCALE)
    X1 = raw(U1, np.zeros((len(U1), 1)))[0]
    after = node.log_proba(X1) if hasattr(node, "log_proba") else node.predictions(X1)
    np.testing.assert_allclose(after, log_p, rtol=1e-10, atol=1e-12)


MODELS = {  # name: (estimator, data, tolerance of the predictions relative to sd(y))
    "gaussian": (lambda: MixtureOfExpertsRegressor(3), "pieces", 1e-7),
    "gaussian-full": (lambda: MixtureOfExpertsRegressor(2, covariance_type="full"), "two", 1e-7),
    "laplace": (lambda: MixtureOfExpertsRegressor(3, expert="laplace"), "pieces", 1e-7),
    "student-t": (lambda: MixtureOfExpertsRegressor(3, expert="student_t", df="estimate",
                                                    max_iter=40), "pieces", 1e-7),
    "hme": (lambda: HierarchicalMixtureOfExpertsRegressor((2, 2)), "pieces", 1e-7),
    # L-BFGS amplifies rounding differences in its line searches and stops elsewhere within
    # its tolerance: predictions within 2% of sd(y), R² within 1e-4
    "gaussian-gradient": (lambda: MixtureOfExpertsRegressor(3, solver="gradient"), "pieces",
                          2e-2),
    "classifier": (lambda: MixtureOfExpertsClassifier(2), "labels", 1e-7),
    "classifier-gradient": (lambda: MixtureOfExpertsClassifier(2, solver="gradient"), "labels",
                            1e-4),
    "hme-classifier": (lambda: HierarchicalMixtureOfExpertsClassifier((2, 2), max_iter=30),
                       "labels", 1e-7),
}
DATA = {"pieces": lambda: piecewise_linear(200, noise=0.1)[:2],
        "two": lambda: two_output_data(200), "labels": lambda: classification_data(200)}
SCALES = [(1.0, 1e-8), (1.0, 1e8), (1e-8, 1.0), (1e8, 1.0), (1.0, 1e200)]


def fitted(name, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return MODELS[name][0]().set_params(random_state=0).fit(X, y)


@functools.cache
def unscaled(name):
    X, y = DATA[MODELS[name][1]]()
    return X, y, fitted(name, X, y)


@pytest.mark.parametrize(("x_scale", "y_scale"), SCALES)
@pytest.mark.parametrize("name", [n for n in MODELS if "classifier" not in n])
def test_regressors_are_equivariant_to_the_scales_of_x_and_y(name, x_scale, y_scale):
    X, y, base = unscaled(name)
    model = fitted(name, X * x_scale, y * y_scale)
    tol = MODELS[name][2]
    Xs, ys = X * x_scale, y * y_scale
    np.testing.assert_allclose(model.predict(Xs) / y_scale, base.predict(X),
                               atol=tol * y.std())
    np.testing.assert_allclose(model.gate_proba(Xs), base.gate_proba(X), atol=5 * tol)
    if y_scale < 1e100:  # beyond, scikit-learn's R² squares residuals of 1e200: inf
        assert model.score(Xs, ys) == pytest.approx(base.score(X, y), abs=1e-4)
    if "gradient" in name:
        return
    t = 1 if y.ndim == 1 else y.shape[1]
    log_c = t * np.log(y_scale)  # the density of y·c is that of y divided by c^t
    np.testing.assert_allclose(model.log_likelihood(Xs, ys), base.log_likelihood(X, y) - log_c,
                               rtol=1e-6, atol=1e-6)
    assert model.objective_ == pytest.approx(base.objective_ - log_c, rel=1e-6, abs=1e-6)
    np.testing.assert_allclose(model.responsibilities(Xs, ys), base.responsibilities(X, y),
                               atol=1e-6)
    np.testing.assert_allclose(model.experts_.coef * x_scale / y_scale, base.experts_.coef,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model.experts_.intercept / y_scale, base.experts_.intercept,
                               rtol=1e-6, atol=1e-6)
    draws, _ = model.sample(Xs[:50], random_state=0)
    reference, _ = base.sample(X[:50], random_state=0)
    np.testing.assert_allclose(draws / y_scale, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_scale", [1e-8, 1e8])
@pytest.mark.parametrize("name", [n for n in MODELS if "classifier" in n])
def test_classifiers_are_equivariant_to_the_scale_of_x(name, x_scale):
    X, y, base = unscaled(name)
    model = fitted(name, X * x_scale, y)
    tol = MODELS[name][2]
    np.testing.assert_allclose(model.predict_proba(X * x_scale), base.predict_proba(X),
                               atol=tol)
    np.testing.assert_allclose(model.gate_proba(X * x_scale), base.gate_proba(X), atol=5 * tol)
    assert model.score(X * x_scale, y) == base.score(X, y)
    assert model.objective_ == pytest.approx(base.objective_, rel=1e-6)
