"""The meta-pi network: its squared-error gradient against numerical differentiation, and its
fit against the definition and against a single linear regression."""

import numpy as np
import pytest
from classic_data import piecewise_linear
from scipy.optimize import check_grad
from scipy.special import softmax
from sklearn.linear_model import LinearRegression

from sparsemoe.classic import MetaPiRegressor
from sparsemoe.classic.logit import add_intercept
from sparsemoe.classic.meta_pi import meta_pi_loss_grad


@pytest.mark.parametrize("n_outputs", [1, 2])
def test_loss_and_gradient(n_outputs):
    rng = np.random.RandomState(0)
    X1 = add_intercept(rng.randn(30, 2))
    Y = rng.randn(30, n_outputs)
    V, W = rng.randn(3, 4), rng.randn(4, 3, n_outputs)
    f = np.einsum("nk,nkt->nt", softmax(X1 @ V, axis=1), np.einsum("nd,kdt->nkt", X1, W))
    expected = 0.5 * np.sum((Y - f) ** 2) / 30 + 0.5 * 0.4 * np.sum(V[:-1] ** 2) / 30
    assert meta_pi_loss_grad(V, W, X1, Y, 0.4)[0] == pytest.approx(expected, rel=1e-12)

    def split(theta):
        return theta[:V.size].reshape(V.shape), theta[V.size:].reshape(W.shape)

    def grad(theta):
        _, gV, gW = meta_pi_loss_grad(*split(theta), X1, Y, 0.4)
        return np.concatenate([gV.ravel(), gW.ravel()])

    theta = np.concatenate([V.ravel(), W.ravel()])
    err = check_grad(lambda th: meta_pi_loss_grad(*split(th), X1, Y, 0.4)[0], grad, theta,
                     epsilon=1e-7)
    assert err < 1e-5 * np.linalg.norm(grad(theta))


def test_fit_predicts_the_gated_sum_and_beats_linear_regression():
    x, y, _ = piecewise_linear(300)
    model = MetaPiRegressor(3, random_state=0).fit(x, y)
    assert np.all(np.diff(model.loss_history_) <= 1e-12)
    g = model.gate_proba(x)
    mu = x[:, 0, None] * model.coef_[:, 0, 0] + model.intercept_[:, 0]
    np.testing.assert_allclose(model.predict(x), (g * mu).sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(model.predict(x, hard=True), mu[np.arange(300), g.argmax(1)])
    assert model.loss_ == pytest.approx(  # of the standardised problem
        0.5 * np.mean(((model.predict(x) - y) / y.std()) ** 2)
        + 0.5 * model.gate_alpha * np.sum((model.gate_.coef * x.std(0)) ** 2) / 300, rel=1e-9)
    assert model.score(x, y) > LinearRegression().fit(x, y).score(x, y) + 0.3
    assert model.score(x, y) > 0.98


def test_needs_enough_samples():
    with pytest.raises(ValueError, match="needs n_samples >= 5, got n_samples = 3"):
        MetaPiRegressor(5).fit(np.zeros((3, 1)), np.zeros(3))


@pytest.mark.parametrize(("x_scale", "y_scale"), [(1.0, 1e-8), (1.0, 1e8), (1e-8, 1.0),
                                                  (1e8, 1.0), (1e3, 1e-5)])
def test_fit_is_equivariant_to_the_scales_of_x_and_y(x_scale, y_scale):
    """Standardised internally: scaling y scales the predictions, scaling X changes nothing,
    and the fitted parameters describe the same function. The scaled data standardise to
    values within rounding of the unscaled ones; L-BFGS, run until the gradient is below
    ``tol``, ends at the same optimum from either (measured: predictions within 1e-6·sd(y),
    gate within 5e-6, loss within 2e-11 relative; the tolerances leave 10-50×)."""
    x, y, _ = piecewise_linear(300)
    base = MetaPiRegressor(3, random_state=0).fit(x, y)
    scaled = MetaPiRegressor(3, random_state=0).fit(x * x_scale, y * y_scale)
    np.testing.assert_allclose(scaled.predict(x * x_scale) / y_scale, base.predict(x),
                               atol=2e-5 * y.std())
    assert scaled.score(x * x_scale, y * y_scale) == pytest.approx(base.score(x, y), abs=1e-7)
    np.testing.assert_allclose(scaled.gate_proba(x * x_scale), base.gate_proba(x), atol=1e-4)
    assert scaled.loss_ == pytest.approx(base.loss_, rel=1e-9)
