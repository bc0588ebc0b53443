"""The classical mixtures on real data: held-out comparison with standard regressors, and the
plot of the fitted experts and gate over x. Behind ``sparsemoe classic report``.

Data sets: the motorcycle-crash data (``mcycle``, 133 rows, 1 input; fetched by
:func:`sparsemoe.data.load_mcycle`) and scikit-learn's bundled diabetes data (442 rows, 10
inputs). Inputs and target are standardised with the training fold's statistics; log-likelihoods
are per held-out sample in units of the standardised target (subtract log sd(y) for the
original units; the ranking is the same), errors are RMSE in the target's original units.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from scipy.special import logsumexp
from sklearn.datasets import load_diabetes
from sklearn.ensemble import GradientBoostingRegressor
from sklearn.exceptions import ConvergenceWarning
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel
from sklearn.linear_model import LinearRegression
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import KFold

from ..classic import (
    HierarchicalMixtureOfExpertsRegressor,
    MetaPiRegressor,
    MixtureOfExpertsRegressor,
)
from ..data import load_mcycle
from .runs import save_figure


@dataclass
class ComparisonConfig:
    folds: int = 5  # K-fold cross-validation, shuffled
    repeats: int = 2  # independent shufflings of the folds
    seed: int = 0
    n_init: int = 5  # restarts of every mixture fit
    experts: dict[str, int] = field(default_factory=lambda: {"mcycle": 4, "diabetes": 2})


class GaussianMixtureRegression:
    """Gaussian mixture regression: a full-covariance GaussianMixture on the joint ``[x, y]``
    and the conditional ``p(y|x) = Σ_k w_k(x) N(y | m_k(x), s_k²)`` with ``w_k(x) ∝ π_k
    N(x | μ_xk, Σ_xxk)``, ``m_k(x) = μ_yk + Σ_yxk Σ_xxk⁻¹ (x − μ_xk)``, ``s_k² = Σ_yyk −
    Σ_yxk Σ_xxk⁻¹ Σ_xyk`` (Ghahramani & Jordan 1994). Single output."""

    def __init__(self, n_components: int, random_state: int, n_init: int) -> None:
        self.gmm = GaussianMixture(n_components, covariance_type="full", n_init=n_init,
                                   random_state=random_state)

    def fit(self, X: np.ndarray, y: np.ndarray) -> GaussianMixtureRegression:
        self.gmm.fit(np.column_stack([X, y]))
        return self

    def _conditionals(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p = X.shape[1]
        log_w, means, variances = [], [], []
        for pi, mu, cov in zip(self.gmm.weights_, self.gmm.means_, self.gmm.covariances_,
                               strict=True):
            Sxx, Sxy, Syy = cov[:p, :p], cov[:p, p], cov[p, p]
            coef = np.linalg.solve(Sxx, Sxy)
            log_w.append(np.log(pi) + stats.multivariate_normal(mu[:p], Sxx).logpdf(X))
            means.append(mu[p] + (X - mu[:p]) @ coef)
            variances.append(Syy - Sxy @ coef)
        log_w = np.column_stack(log_w).reshape(X.shape[0], -1)
        return log_w - logsumexp(log_w, axis=1, keepdims=True), np.column_stack(means), \
            np.array(variances)

    def predict(self, X: np.ndarray) -> np.ndarray:
        log_w, means, _ = self._conditionals(X)
        return np.sum(np.exp(log_w) * means, axis=1)

    def log_likelihood(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        log_w, means, variances = self._conditionals(X)
        return logsumexp(log_w + stats.norm(means, np.sqrt(variances)).logpdf(y[:, None]), axis=1)


def _gaussian_log_lik(mean: np.ndarray, sd: np.ndarray | float, y: np.ndarray) -> np.ndarray:
    return stats.norm(mean, sd).logpdf(y)


def _evaluate(name: str, model: Any, X: np.ndarray, y: np.ndarray, Xt: np.ndarray,
              yt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fit on (X, y), return held-out predictions and log-likelihoods (NaN where the model has
    no likelihood)."""
    model.fit(X, y)
    if isinstance(model, GaussianProcessRegressor):
        mean, sd = model.predict(Xt, return_std=True)
        return mean, _gaussian_log_lik(mean, sd, yt)
    pred = model.predict(Xt)
    if hasattr(model, "log_likelihood"):
        return pred, model.log_likelihood(Xt, yt)
    if isinstance(model, LinearRegression):
        sd = np.std(y - model.predict(X))  # the Gaussian MLE of the noise
        return pred, _gaussian_log_lik(pred, sd, yt)
    return pred, np.full(len(yt), np.nan)


def candidate_models(n_experts: int, seed: int, n_init: int) -> dict[str, Callable[[], Any]]:
    """The regressors compared, by table name."""
    kernel = ConstantKernel() * RBF() + WhiteKernel()
    return {
        "linear regression": LinearRegression,
        "gradient boosting": lambda: GradientBoostingRegressor(random_state=seed),
        "Gaussian process (RBF + noise)": lambda: GaussianProcessRegressor(
            kernel, normalize_y=True, random_state=seed),
        f"Gaussian mixture regression ({n_experts})": lambda: GaussianMixtureRegression(
            n_experts, seed, n_init),
        f"MoE, Gaussian experts ({n_experts})": lambda: MixtureOfExpertsRegressor(
            n_experts, n_init=n_init, random_state=seed),
        f"MoE, Student-t experts ({n_experts})": lambda: MixtureOfExpertsRegressor(
            n_experts, expert="student_t", n_init=n_init, random_state=seed),
        "HME, Gaussian experts (2×2)": lambda: HierarchicalMixtureOfExpertsRegressor(
            (2, 2), n_init=n_init, random_state=seed),
        f"meta-pi ({n_experts}, squared error)": lambda: MetaPiRegressor(
            n_experts, n_init=n_init, random_state=seed),
    }


@dataclass
class Score:
    model: str
    log_lik: float  # mean held-out log-likelihood per sample (standardised target)
    rmse: float  # held-out root mean squared error, original units
    seconds: float


def compare(X: np.ndarray, y: np.ndarray, n_experts: int, cfg: ComparisonConfig
            ) -> list[Score]:
    """Repeated K-fold cross-validation of every candidate model on (X [n, p], y [n])."""
    models = candidate_models(n_experts, cfg.seed, cfg.n_init)
    log_liks = {name: [] for name in models}
    sq_errors = {name: [] for name in models}
    seconds = dict.fromkeys(models, 0.0)
    for repeat in range(cfg.repeats):
        folds = KFold(cfg.folds, shuffle=True, random_state=cfg.seed + repeat)
        for train, test in folds.split(X):
            mx, sx = X[train].mean(0), X[train].std(0)
            my, sy = y[train].mean(), y[train].std()
            Xs, Xt = (X[train] - mx) / sx, (X[test] - mx) / sx
            ys, yt = (y[train] - my) / sy, (y[test] - my) / sy
            for name, make in models.items():
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    pred, ll = _evaluate(name, make(), Xs, ys, Xt, yt)
                seconds[name] += time.perf_counter() - start
                log_liks[name].append(ll)
                sq_errors[name].append((sy * (pred - yt)) ** 2)
    return [Score(name, float(np.mean(np.concatenate(log_liks[name]))),
                  float(np.sqrt(np.mean(np.concatenate(sq_errors[name])))), seconds[name])
            for name in models]


def format_table(title: str, scores: list[Score]) -> str:
    lines = [f"**{title}**", "",
             "| model | held-out log-lik / sample ↑ | held-out RMSE ↓ | fit time (s) |",
             "|---|---|---|---|"]
    for s in scores:
        ll = "—" if np.isnan(s.log_lik) else f"{s.log_lik:.3f}"
        lines.append(f"| {s.model} | {ll} | {s.rmse:.3f} | {s.seconds:.1f} |")
    return "\n".join(lines)


def plot_mcycle(times: np.ndarray, accel: np.ndarray, path: Path, n_experts: int,
                seed: int = 0, n_init: int = 5) -> MixtureOfExpertsRegressor:
    """Fit a Gaussian MoE to all of mcycle (standardised) and draw the data, each expert's line
    (solid where its gate weight exceeds 0.5), the mixture mean ± 2 sd, and the gate over x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mx, sx, my, sy = times.mean(), times.std(), accel.mean(), accel.std()
    x, y = ((times - mx) / sx)[:, None], (accel - my) / sy
    model = MixtureOfExpertsRegressor(n_experts, n_init=n_init, random_state=seed).fit(x, y)
    grid = np.linspace(x.min(), x.max(), 400)[:, None]
    gate = model.gate_proba(grid)
    mu = model.experts_.predictions(np.hstack([grid, np.ones_like(grid)]))[:, :, 0]
    var = model.experts_.covariance[:, 0, 0]
    mean = np.sum(gate * mu, axis=1)
    sd = np.sqrt(np.sum(gate * (var + mu**2), axis=1) - mean**2)  # the mixture's own sd
    t = grid[:, 0] * sx + mx
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1.3]})
    top.scatter(times, accel, s=12, color="0.3", label="mcycle")
    for i in range(n_experts):
        line = mu[:, i] * sy + my
        top.plot(t, np.where(gate[:, i] > 0.5, line, np.nan), lw=2, color=f"C{i}",
                 label=f"expert {i + 1}")
        top.plot(t, line, lw=1, ls=":", color=f"C{i}")
        bottom.plot(t, gate[:, i], lw=2, color=f"C{i}")
    top.plot(t, mean * sy + my, color="k", lw=1.5, label="mixture mean")
    top.fill_between(t, (mean - 2 * sd) * sy + my, (mean + 2 * sd) * sy + my, color="k",
                     alpha=0.1, label="± 2 sd")
    top.set_ylim(accel.min() - 30, accel.max() + 30)
    top.set_ylabel("head acceleration (g)")
    top.legend(loc="lower right", fontsize=8, ncol=2)
    top.set_title(f"Mixture of {n_experts} linear-Gaussian experts on mcycle (EM)")
    bottom.set_ylabel("gate g_i(x)")
    bottom.set_xlabel("time after impact (ms)")
    bottom.set_ylim(-0.05, 1.05)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return model


def run_report(out: Path, cfg: ComparisonConfig,
               mcycle: tuple[np.ndarray, np.ndarray] | None = None) -> str:
    """The full report: both comparison tables (markdown, returned) and ``out/classic_mcycle.png``.
    ``mcycle`` may be given (tests use a stand-in); by default it is loaded from the cache."""
    times, accel = load_mcycle() if mcycle is None else mcycle
    diabetes = load_diabetes()
    out.mkdir(parents=True, exist_ok=True)
    k_m, k_d = cfg.experts["mcycle"], cfg.experts["diabetes"]
    tables = [
        format_table(f"mcycle (n = {len(times)}, 1 input; {cfg.repeats}× {cfg.folds}-fold CV)",
                     compare(times[:, None], accel, k_m, cfg)),
        format_table(f"diabetes (scikit-learn, n = {len(diabetes.target)}, 10 inputs; "
                     f"{cfg.repeats}× {cfg.folds}-fold CV)",
                     compare(diabetes.data, diabetes.target, k_d, cfg)),
    ]
    plot_mcycle(times, accel, out / "classic_mcycle.png", k_m, cfg.seed, cfg.n_init)
    return "\n\n".join(tables)
