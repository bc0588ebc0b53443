"""The multinomial logit: the one model behind every gate and every classification expert.

A softmax gate is a multinomial logit whose "targets" are the E-step posteriors (Jordan & Jacobs
1994, the gate M-step), and a logistic / multinomial-logistic expert is a multinomial logit on the
class labels weighted by its posteriors. Both M-steps maximise the same weighted objective

    L(W) = Σ_n Σ_c T_nc log softmax(x̃_n W)_c − (α/2) ‖W_{:-1}‖²,

with x̃ = [x, 1] (the intercept is the last row of W and is not penalised) and a non-negative
target matrix T whose rows need not sum to one. Index letters: n samples, d = n_features + 1
(intercept last), c outputs of the logit (classes or experts), k stacked independent problems.
"""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax


def add_intercept(X: np.ndarray) -> np.ndarray:
    """``[X, 1]``: the design matrix with the intercept column last. ``[n, d-1] -> [n, d]``."""
    return np.hstack([X, np.ones((X.shape[0], 1))])


def standardisation(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and standard deviations of ``A: [n, c]`` (a constant column gets scale 1,
    as in scikit-learn's ``StandardScaler``); computed without overflow for values near the
    float64 limit."""
    mean = A.mean(axis=0)
    spread = np.abs(A - mean).max(axis=0)
    spread = np.where(spread > 0, spread, 1.0)
    scale = spread * ((A - mean) / spread).std(axis=0)
    return mean, np.where(scale > 0, scale, 1.0)


def unstandardise_weights(A: np.ndarray, x_mean: np.ndarray, x_scale: np.ndarray) -> np.ndarray:
    """Weights ``A: [..., p + 1, c]`` (intercept row last) of a linear map of the standardised
    inputs ``(x − x_mean) / x_scale``, rewritten for the raw inputs ``x``: the same map."""
    A = np.array(A, dtype=np.float64)
    coef = A[..., :-1, :] / x_scale[:, None]
    intercept = A[..., -1, :] - np.einsum("f,...fc->...c", x_mean, coef)
    return np.concatenate([coef, intercept[..., None, :]], axis=-2)


def sample_categorical(P: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """One draw per row of the probabilities ``P: [n, c]``; returns indices ``[n]``."""
    below = (rng.random_sample(P.shape[0])[:, None] > np.cumsum(P, axis=1)).sum(axis=1)
    return np.minimum(below, P.shape[1] - 1)  # a rounded cumulative sum may end below 1


def logit_log_proba(X1: np.ndarray, W: np.ndarray) -> np.ndarray:
    """``log softmax(x̃ W)`` for one ``W: [d, c]`` (returns ``[n, c]``) or stacked ``W: [k, d, c]``
    (returns ``[n, k, c]``)."""
    if W.ndim == 2:
        return log_softmax(X1 @ W, axis=-1)
    return log_softmax(np.einsum("nd,kdc->nkc", X1, W), axis=-1)


def ridge_penalty(W: np.ndarray, alpha: float) -> float:
    """``(α/2) ‖W‖²`` over every row but the last (the intercept) of ``W: [..., d, c]``."""
    return 0.5 * alpha * float(np.sum(W[..., :-1, :] ** 2))


def logit_loss_grad(
    W: np.ndarray, X1: np.ndarray, T: np.ndarray, alpha: float
) -> tuple[float, np.ndarray]:
    """``−L(W)`` (module docstring) and its gradient, for stacked independent problems.

    Parameters
    ----------
    W : ndarray of shape (k, d, c)
    X1 : ndarray of shape (n, d), intercept column last.
    T : ndarray of shape (k, n, c), non-negative targets.
    alpha : float, ridge strength on the non-intercept rows.

    Returns
    -------
    loss : float, ``Σ_k −L(W_k)``.
    grad : ndarray of shape (k, d, c), ``∂ loss / ∂W = X̃ᵀ(softmax · Σ_c T − T) + α W``.
    """
    logp = logit_log_proba(X1, W)  # [n, k, c]
    Tn = np.moveaxis(T, 0, 1)  # [n, k, c]
    loss = -float(np.sum(Tn * logp)) + ridge_penalty(W, alpha)
    resid = np.exp(logp) * Tn.sum(axis=-1, keepdims=True) - Tn
    grad = np.einsum("nd,nkc->kdc", X1, resid)
    grad[:, :-1, :] += alpha * W[:, :-1, :]
    return loss, grad


def logit_hessian(W: np.ndarray, X1: np.ndarray, T: np.ndarray, alpha: float) -> np.ndarray:
    """Hessian of ``−L`` for stacked ``W: [k, d, c]``, shape (k, d·c, d·c) in ``W[i].ravel()``
    order: ``Σ_n (Σ_c T_nc) x̃ x̃ᵀ ⊗ (diag p − p pᵀ) + α I`` (non-intercept rows)."""
    k, d, c = W.shape
    P = np.exp(logit_log_proba(X1, W))  # [n, k, c]
    s = T.sum(axis=-1).T  # [n, k]
    M = s[:, :, None, None] * (P[..., None] * np.eye(c) - P[..., :, None] * P[..., None, :])
    H = np.einsum("nd,ne,nkcf->kdcef", X1, X1, M).reshape(k, d * c, d * c)
    penalised = np.ones((d, c))
    penalised[-1] = 0.0
    idx = np.arange(d * c)
    H[:, idx, idx] += alpha * penalised.ravel()
    return H


def fit_logit(
    W0: np.ndarray, X1: np.ndarray, T: np.ndarray, alpha: float, *, max_iter: int = 25
) -> np.ndarray:
    """Maximise ``L`` over stacked ``W: [k, d, c]`` by Newton–Raphson (IRLS) with a backtracking
    (Armijo) line search, starting at ``W0``.

    Only steps that decrease ``−L`` are taken, so the result is never worse than ``W0`` and an
    EM M-step built on it never decreases the expected complete-data log-likelihood (a
    generalised EM step if ``max_iter`` stops it early). Softmax weights are invariant to a
    shift common to all outputs; a relative jitter of 1e-10 on the Hessian's diagonal picks a
    direction in that flat subspace (the step is still a descent direction).
    """
    W = W0.copy()
    loss, G = logit_loss_grad(W, X1, T, alpha)
    for _ in range(max_iter):
        H = logit_hessian(W, X1, T, alpha)
        jitter = 1e-10 * np.trace(H, axis1=1, axis2=2)[:, None] / H.shape[1] + 1e-12
        H[:, np.arange(H.shape[1]), np.arange(H.shape[1])] += jitter
        step = np.linalg.solve(H, G.reshape(G.shape[0], -1, 1)).reshape(W.shape)
        slope = float(np.sum(G * step))  # > 0: the decrease rate along −step
        t = 1.0
        while t > 1e-10:
            new_loss, new_G = logit_loss_grad(W - t * step, X1, T, alpha)
            if new_loss <= loss - 1e-4 * t * slope:
                break
            t *= 0.5
        else:
            return W
        W = W - t * step
        converged = loss - new_loss <= 1e-12 * (1.0 + abs(loss))
        loss, G = new_loss, new_G
        if converged:
            break
    return W
