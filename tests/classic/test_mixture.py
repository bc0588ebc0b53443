"""The mixtures end to end: EM monotonicity at every iteration, posteriors against a direct
Bayes computation, recovery of a known piecewise-linear mixture, EM against the gradient
solver, the scikit-learn conventions and the error messages."""

import warnings

import numpy as np
import pytest
from classic_data import piecewise_linear
from scipy import stats
from scipy.special import softmax
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import InvalidParameterError

from sparsemoe.classic import (
    HierarchicalMixtureOfExpertsClassifier,
    HierarchicalMixtureOfExpertsRegressor,
    MixtureOfExpertsClassifier,
    MixtureOfExpertsRegressor,
)


def classification_data(n=300, seed=0):
    """Labels follow a different linear rule on each side of x₀ = 0 (one logistic regression
    cannot fit both)."""
    rng = np.random.RandomState(seed)
    X = rng.uniform(-2, 2, size=(n, 2))
    score = np.where(X[:, 0] < 0, 3 * X[:, 1], -3 * X[:, 1])
    y = np.where(rng.rand(n) < 1 / (1 + np.exp(-score)), "yes", "no")
    return X, y


def two_output_data(n=300, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.uniform(-2, 2, size=(n, 1))
    noise = rng.multivariate_normal([0, 0], [[0.04, 0.03], [0.03, 0.04]], size=n)
    Y = np.where(x < 0, np.hstack([x, -x]), np.hstack([2 * x, 1 + 0 * x])) + noise
    return x, Y


MODELS = {
    "gaussian": lambda: MixtureOfExpertsRegressor(3, gate_alpha=0.0),
    "gaussian-full": lambda: MixtureOfExpertsRegressor(2, covariance_type="full", gate_alpha=0.0),
    "laplace": lambda: MixtureOfExpertsRegressor(3, expert="laplace", gate_alpha=0.0),
    "student-t": lambda: MixtureOfExpertsRegressor(3, expert="student_t", gate_alpha=0.0),
    "student-t-df": lambda: MixtureOfExpertsRegressor(3, expert="student_t", df="estimate"),
    "hme": lambda: HierarchicalMixtureOfExpertsRegressor((2, 2), gate_alpha=0.0),
    "classifier": lambda: MixtureOfExpertsClassifier(2, alpha=0.0, gate_alpha=0.0),
    "hme-classifier": lambda: HierarchicalMixtureOfExpertsClassifier((2, 2), alpha=0.1),
}


def fit_data(name, n=200):
    if "classifier" in name:
        return classification_data(n)
    if name == "gaussian-full":
        return two_output_data(n)
    x, y, _ = piecewise_linear(n, noise=0.3)
    return x, y


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("init_params", ["kmeans", "random"])
def test_em_never_decreases_the_objective(name, init_params):
    """Checked after every M-step of every restart's kept history; with zero penalties the
    objective is the log-likelihood itself (test_objective_is_the_mean_log_likelihood)."""
    X, y = fit_data(name)
    model = MODELS[name]().set_params(init_params=init_params, max_iter=60, random_state=1)
    with pytest.warns(ConvergenceWarning) if name == "laplace" else _no_warning():
        model.set_params(tol=0.0 if name == "laplace" else 1e-12).fit(X, y)
    steps = np.diff(model.objective_history_)
    assert len(steps) >= 5
    assert steps.min() >= -1e-10 * abs(model.objective_), steps.min()


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("name", ["gaussian", "classifier", "hme"])
def test_objective_is_the_mean_log_likelihood(name):
    X, y = fit_data(name)
    model = MODELS[name]().set_params(random_state=0).fit(X, y)
    assert model.objective_ == pytest.approx(model.log_likelihood(X, y).mean(), rel=1e-12)


def test_objective_subtracts_the_ridge_penalties():
    """The ridges act on the weights of the standardised inputs: raw-unit coefficients times
    the training columns' standard deviations."""
    X, y = classification_data()
    model = MixtureOfExpertsClassifier(2, alpha=0.3, gate_alpha=0.2, random_state=0).fit(X, y)
    gate_w = model.gate_.coef * X.std(axis=0)
    expert_w = model.experts_.coef * X.std(axis=0)
    penalty = 0.5 * 0.2 * np.sum(gate_w**2) + 0.5 * 0.3 * np.sum(expert_w**2)
    expected = model.log_likelihood(X, y).mean() - penalty / len(X)
    assert model.objective_ == pytest.approx(expected, rel=1e-12)


def test_responsibilities_are_bayes_posteriors():
    x, y, _ = piecewise_linear(300, noise=0.3)
    model = MixtureOfExpertsRegressor(3, random_state=0).fit(x, y)
    gate = softmax(x @ model.gate_.coef.T + model.gate_.intercept, axis=1)
    mu = x[:, 0, None] * model.experts_.coef[:, 0, 0] + model.experts_.intercept[:, 0]
    sd = np.sqrt(model.experts_.covariance[:, 0, 0])
    joint = gate * stats.norm(mu, sd).pdf(y[:, None])
    np.testing.assert_allclose(model.responsibilities(x, y), joint / joint.sum(1, keepdims=True),
                               rtol=1e-9, atol=1e-300)
    np.testing.assert_allclose(model.gate_proba(x), gate, rtol=1e-12)
    np.testing.assert_allclose(model.log_likelihood(x, y), np.log(joint.sum(1)), rtol=1e-12)
    np.testing.assert_allclose(model.predict(x), (gate * mu).sum(1), rtol=1e-12)
    np.testing.assert_allclose(model.predict(x, hard=True), mu[np.arange(300), gate.argmax(1)])


def test_hme_posteriors_are_the_nested_bayes_quantities():
    """h_ij ∝ g_i g_{j|i} P_ij, h_i = Σ_j h_ij, h_{j|i} = h_ij / h_i (Jordan & Jacobs 1994)."""
    x, y, _ = piecewise_linear(300, noise=0.3)
    model = HierarchicalMixtureOfExpertsRegressor((2, 3), random_state=0).fit(x, y)
    g_top = softmax(x @ model.gate_.top_coef.T + model.gate_.top_intercept, axis=1)  # [n, a]
    g_low = softmax(np.einsum("nf,abf->nab", x, model.gate_.lower_coef)
                    + model.gate_.lower_intercept, axis=2)  # [n, a, b]
    mu = (x[:, 0, None] * model.experts_.coef[:, 0, 0] + model.experts_.intercept[:, 0])
    sd = np.sqrt(model.experts_.covariance[:, 0, 0])
    P = stats.norm(mu, sd).pdf(y[:, None]).reshape(300, 2, 3)
    joint = g_top[:, :, None] * g_low * P
    h = joint / joint.sum(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(model.responsibilities(x, y), h, rtol=1e-9, atol=1e-300)
    np.testing.assert_allclose(model.gate_proba(x), g_top[:, :, None] * g_low, rtol=1e-12)
    h_i = h.sum(axis=2)
    np.testing.assert_allclose((h / h_i[:, :, None]).sum(axis=2), 1.0)


def test_classifier_probabilities_are_the_gated_sum():
    X, y = classification_data()
    model = MixtureOfExpertsClassifier(2, random_state=0).fit(X, y)
    gate = model.gate_proba(X)
    experts = model.experts_.predictions(np.hstack([X, np.ones((len(X), 1))]))
    np.testing.assert_allclose(model.predict_proba(X), np.einsum("nk,nkc->nc", gate, experts),
                               rtol=1e-12)
    assert set(model.predict(X)) <= {"yes", "no"}
    assert list(model.classes_) == ["no", "yes"]


def test_recovers_a_known_piecewise_linear_mixture():
    """600 samples, noise 0.1: each true piece has a fitted expert within 0.05 in slope and
    intercept and 10% in noise sd, and the gate switches within 0.1 of the true boundaries."""
    x, y, pieces = piecewise_linear()
    model = MixtureOfExpertsRegressor(3, n_init=3, random_state=0).fit(x, y)
    fitted = np.column_stack([model.experts_.coef[:, 0, 0], model.experts_.intercept[:, 0]])
    order = np.argsort(fitted[:, 0])
    true_order = np.argsort(pieces[:, 0])
    np.testing.assert_allclose(fitted[order], pieces[true_order], atol=0.05)
    np.testing.assert_allclose(np.sqrt(model.experts_.covariance[:, 0, 0]), 0.1, rtol=0.1)
    grid = np.linspace(-3, 3, 6001)[:, None]
    winner = model.gate_proba(grid).argmax(axis=1)
    switches = grid[1:, 0][np.diff(winner) != 0]
    np.testing.assert_allclose(switches, [-1.0, 1.0], atol=0.1)
    assert np.mean(np.abs(model.predict(x) - y)) < 0.1


def test_robust_experts_ignore_outliers():
    """With 10% gross outliers, Student-t and Laplace experts keep the true slopes; Gaussian
    experts are pulled away."""
    x, y, pieces = piecewise_linear(400, noise=0.1, seed=3)
    rng = np.random.RandomState(0)
    bad = rng.rand(400) < 0.1
    y = np.where(bad, y + rng.choice([-8.0, 8.0], 400), y)
    errors = {}
    for expert in ["gaussian", "student_t", "laplace"]:
        model = MixtureOfExpertsRegressor(3, expert=expert, n_init=3, random_state=0).fit(x, y)
        slopes = np.sort(model.experts_.coef[:, 0, 0])
        errors[expert] = np.abs(slopes - np.sort(pieces[:, 0])).max()
    assert errors["student_t"] < 0.1 and errors["laplace"] < 0.1, errors
    assert errors["gaussian"] > 2 * max(errors["student_t"], errors["laplace"]), errors


AGREE = {
    "gaussian": lambda: MixtureOfExpertsRegressor(3),
    "gaussian-full": lambda: MixtureOfExpertsRegressor(2, covariance_type="full"),
    "classifier": lambda: MixtureOfExpertsClassifier(2),
    "hme-classifier": lambda: HierarchicalMixtureOfExpertsClassifier((2, 2)),
}


def agreement_data(name):
    if "classifier" in name:
        return classification_data(300)
    if name == "gaussian-full":
        return two_output_data(300)
    x, y, _ = piecewise_linear(300, noise=0.1)
    return x, y


def outputs(model, X):
    return model.predict_proba(X) if hasattr(model, "predict_proba") else model.predict(X)


@pytest.mark.parametrize("name", AGREE)
def test_gradient_solver_agrees_with_em(name):
    """Same objective, same k-means start: EM and L-BFGS on the local-experts gradient reach the
    same maximum (objective within 1e-6 per sample, outputs within 1e-3)."""
    X, y = agreement_data(name)
    em = AGREE[name]().set_params(random_state=2, tol=1e-10, max_iter=1000).fit(X, y)
    gd = AGREE[name]().set_params(random_state=2, tol=1e-12, max_iter=5000,
                                  solver="gradient").fit(X, y)
    assert gd.objective_ == pytest.approx(em.objective_, abs=1e-6)
    assert np.all(np.diff(gd.objective_history_) >= -1e-12)
    np.testing.assert_allclose(outputs(gd, X), outputs(em, X), atol=1e-3)


@pytest.mark.parametrize(("name", "tolerance"), [
    ("gaussian", 1e-8), ("laplace", 1e-8), ("hme", 1e-8), ("student-t-df", 1e-3),
])
def test_em_optimum_is_stationary_for_the_gradient_solver(name, tolerance):
    """Warm-starting the gradient solver at EM's optimum cannot improve it (Student-t with
    estimated ν: EM for ν converges slowly, hence the looser tolerance)."""
    x, y, _ = piecewise_linear(300, noise=0.1)
    model = MODELS[name]().set_params(gate_alpha=1e-2, random_state=2, tol=1e-10, max_iter=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
        before, prediction = model.objective_, model.predict(x)
        model.set_params(solver="gradient", warm_start=True, tol=1e-12, max_iter=5000).fit(x, y)
    assert model.objective_ - before < tolerance
    atol = 1e-4 if tolerance < 1e-6 else 1e-2
    np.testing.assert_allclose(model.predict(x), prediction, atol=atol)


def test_bic_aic_and_parameter_count():
    x, y, _ = piecewise_linear(200)
    model = MixtureOfExpertsRegressor(3, random_state=0).fit(x, y)
    k = 2 * 2 + 3 * (2 + 1)  # gate: (3 − 1)·(1 + 1); experts: slope, intercept, variance
    assert model.n_parameters() == k
    ll = model.log_likelihood(x, y).sum()
    assert model.bic(x, y) == pytest.approx(-2 * ll + k * np.log(200))
    assert model.aic(x, y) == pytest.approx(-2 * ll + 2 * k)
    smaller = MixtureOfExpertsRegressor(1).fit(x, y)
    assert model.bic(x, y) < smaller.bic(x, y)


def test_sample_draws_from_the_fitted_conditional():
    x, y, _ = piecewise_linear(300)
    model = MixtureOfExpertsRegressor(3, random_state=0).fit(x, y)
    X = np.full((20000, 1), 0.4)
    draws, leaves = model.sample(X, random_state=0)
    assert draws.shape == (20000,)
    np.testing.assert_allclose(np.bincount(leaves, minlength=3) / 20000, model.gate_proba(X[:1])[0],
                               atol=0.01)
    assert draws.mean() == pytest.approx(model.predict(X[:1])[0], abs=0.01)
    labels, _ = MixtureOfExpertsClassifier(2, random_state=0).fit(*classification_data()).sample(
        np.zeros((5, 2)), random_state=0)
    assert set(labels) <= {"yes", "no"}


def test_n_init_keeps_the_best_restart():
    x, y, _ = piecewise_linear(200, noise=0.3)
    singles = [MixtureOfExpertsRegressor(3, init_params="random", random_state=s).fit(x, y)
               for s in range(3)]
    best = MixtureOfExpertsRegressor(3, init_params="random", n_init=8, random_state=0).fit(x, y)
    assert best.objective_ >= max(m.objective_ for m in singles[:1]) - 1e-12


def test_warm_start_continues_from_the_previous_fit():
    x, y, _ = piecewise_linear(200, noise=0.3)
    model = MixtureOfExpertsRegressor(3, max_iter=3, warm_start=True, random_state=0)
    with pytest.warns(ConvergenceWarning, match="did not converge in max_iter=3"):
        model.fit(x, y)
    first = model.objective_
    with pytest.warns(ConvergenceWarning):
        model.fit(x, y)
    assert model.objective_history_[0] == pytest.approx(first, rel=1e-12)
    assert model.objective_ >= first


def test_verbose_reports_progress(capsys):
    x, y, _ = piecewise_linear(100)
    MixtureOfExpertsRegressor(2, verbose=2, n_init=2, random_state=0).fit(x, y)
    out = capsys.readouterr().out
    assert "init 2: objective" in out and "iteration 1: objective" in out


def test_multi_output_full_covariance_finds_the_correlation():
    x, Y = two_output_data(600)
    model = MixtureOfExpertsRegressor(2, covariance_type="full", random_state=0).fit(x, Y)
    assert model.predict(x).shape == (600, 2)
    np.testing.assert_allclose(model.experts_.covariance, [[[0.04, 0.03], [0.03, 0.04]]] * 2,
                               atol=0.01)
    diag = MixtureOfExpertsRegressor(2, random_state=0).fit(x, Y)
    assert model.log_likelihood(x, Y).mean() > diag.log_likelihood(x, Y).mean() + 0.3


def test_mixture_classifier_beats_one_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    X, y = classification_data(600)
    single = LogisticRegression().fit(X, y).score(X, y)
    assert MixtureOfExpertsClassifier(2, random_state=0).fit(X, y).score(X, y) > single + 0.2
    hme = HierarchicalMixtureOfExpertsClassifier((2, 2), random_state=0).fit(X, y)
    assert hme.score(X, y) > single + 0.2


@pytest.mark.parametrize(("params", "error", "message"), [
    ({"n_experts": 0}, InvalidParameterError,
     "'n_experts' parameter .* must be an int in the range"),
    ({"expert": "cauchy"}, InvalidParameterError, "'expert' parameter .* must be a str among"),
    ({"df": -1.0}, InvalidParameterError, "'df' parameter"),
    ({"expert": "laplace", "covariance_type": "full"}, ValueError,
     "covariance_type='full' needs expert='gaussian', got expert='laplace'"),
    ({"n_experts": 50}, ValueError, "needs n_samples >= 50, got n_samples = 20"),
])
def test_bad_parameters_are_explained(params, error, message):
    x, y, _ = piecewise_linear(20)
    with pytest.raises(error, match=message):
        MixtureOfExpertsRegressor(**params).fit(x, y)


def test_bad_branches_and_targets_are_explained():
    x, y, _ = piecewise_linear(40)
    with pytest.raises(ValueError, match=r"n_branches must be two positive ints .* got \(2, 0\)"):
        HierarchicalMixtureOfExpertsRegressor((2, 0)).fit(x, y)
    model = MixtureOfExpertsRegressor(2, random_state=0).fit(x, y)
    with pytest.raises(ValueError,
                       match=r"y must have shape \(40,\) or \(40, 1\) .* got \(40, 2\)"):
        model.responsibilities(x, np.column_stack([y, y]))
    X, labels = classification_data(60)
    clf = MixtureOfExpertsClassifier(2, random_state=0).fit(X, labels)
    with pytest.raises(ValueError, match=r"labels not seen in fit: \['maybe'\]"):
        clf.log_likelihood(X[:1], ["maybe"])
