import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import naive_cv_squared, naive_hierarchical, naive_noisy_top_k

import sparsemoe.functional as MF
from sparsemoe.memory import saved_tensor_bytes

DOUBLE = torch.float64


def gate_inputs(t, d, n, seed, dtype=DOUBLE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g, dtype=dtype)
    w_gate = torch.randn(d, n, generator=g, dtype=dtype)
    w_noise = torch.randn(d, n, generator=g, dtype=dtype) * 0.5
    noise = torch.randn(t, n, generator=g, dtype=dtype)
    return x, w_gate, w_noise, noise


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    t=st.integers(0, 12), d=st.integers(1, 6), n=st.integers(1, 7),
    data=st.data(), seed=st.integers(0, 10_000), noisy=st.booleans(), train=st.booleans(),
)
def test_gating_matches_naive_definition(t, d, n, data, seed, noisy, train):
    k = data.draw(st.integers(1, n))
    x, wg, wn, noise = gate_inputs(t, d, n, seed)
    wn = wn if noisy else None
    g = MF.noisy_top_k_gating(x, wg, wn, k, train=train, noise=noise)
    gates, load, prob = naive_noisy_top_k(x, wg, wn, k, noise, train)
    torch.testing.assert_close(g.gates, gates, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g.load, load, rtol=1e-12, atol=1e-12)
    if prob is not None:
        torch.testing.assert_close(g.prob_in_top_k, prob, rtol=1e-12, atol=1e-12)
    assert g.top_k_indices.shape == (t, k)
    torch.testing.assert_close(g.top_k_gates.sum(1), torch.ones(t, dtype=DOUBLE))
    torch.testing.assert_close(g.gates.gather(1, g.top_k_indices), g.top_k_gates)
    assert ((g.gates > 0).sum(1) <= k).all()


def test_reference_numerics_stddev_and_epsilon():
    """noise_stddev = softplus(x W_noise) + noise_epsilon, as in the reference code."""
    x, wg, wn, noise = gate_inputs(5, 3, 4, 0)
    g = MF.noisy_top_k_gating(x, wg, wn, 2, noise=noise, noise_epsilon=0.05)
    torch.testing.assert_close(g.noise_stddev, torch.log1p(torch.exp(x @ wn)) + 0.05)
    torch.testing.assert_close(g.noisy_logits, x @ wg + noise * g.noise_stddev)


def test_eval_is_noise_free_and_deterministic():
    x, wg, wn, _ = gate_inputs(20, 4, 6, 1)
    a = MF.noisy_top_k_gating(x, wg, wn, 2, train=False)
    b = MF.noisy_top_k_gating(x, wg, wn, 2, train=False)
    assert a.noise_stddev is None
    torch.testing.assert_close(a.noisy_logits, x @ wg)
    assert torch.equal(a.gates, b.gates)
    # evaluation load is the count of non-zero gates
    torch.testing.assert_close(a.load, (a.gates > 0).to(DOUBLE).sum(0))


def test_full_k_uses_counted_load():
    x, wg, wn, noise = gate_inputs(9, 3, 4, 2)
    g = MF.noisy_top_k_gating(x, wg, wn, 4, noise=noise)
    torch.testing.assert_close(g.load, torch.full((4,), 9.0, dtype=DOUBLE))
    torch.testing.assert_close(g.gates.sum(1), torch.ones(9, dtype=DOUBLE))


def test_single_expert():
    x, wg, wn, noise = gate_inputs(5, 3, 1, 3)
    g = MF.noisy_top_k_gating(x, wg, wn, 1, noise=noise)
    torch.testing.assert_close(g.gates, torch.ones(5, 1, dtype=DOUBLE))
    # the reference code's size + 1e-10 leaves ~1e-20 for a constant vector
    assert MF.cv_squared(g.load).item() < 1e-15


def test_load_estimator_matches_monte_carlo():
    """P(x, i) (eq. 9) is the probability that expert i stays in the top k when only its own
    noise is drawn again. Re-draw element i's noise M times and count."""
    t, d, n, k, m = 5, 4, 6, 2, 40_000
    x, wg, wn, noise = gate_inputs(t, d, n, 7)
    g = MF.noisy_top_k_gating(x, wg, wn, k, noise=noise)
    gen = torch.Generator().manual_seed(11)
    for ti in range(t):
        for i in range(n):
            others = torch.cat([g.noisy_logits[ti, :i], g.noisy_logits[ti, i + 1 :]])
            kth_excluding = others.sort(descending=True).values[k - 1]
            eps = torch.randn(m, generator=gen, dtype=DOUBLE)
            redrawn = g.clean_logits[ti, i] + eps * g.noise_stddev[ti, i]
            estimate = (redrawn > kth_excluding).to(DOUBLE).mean().item()
            p = g.prob_in_top_k[ti, i].item()
            # 5 binomial standard deviations: a false alarm has probability ~1e-6 per pair.
            tol = 5 * math.sqrt(max(p * (1 - p), 1e-4) / m)
            assert abs(estimate - p) < tol, (ti, i, estimate, p)
    # and the load is the sum over the batch
    torch.testing.assert_close(g.load, g.prob_in_top_k.sum(0))


def test_zero_initialised_gates_balance_load():
    """W_g = W_noise = 0: no signal and some noise, so every expert's expected share is equal.

    Each per-expert total is a sum of T i.i.d. per-token terms; it must lie within 5 standard
    deviations (estimated from the per-token terms) of its expectation."""
    t, d, n, k = 8192, 8, 8, 2
    torch.manual_seed(0)
    x = torch.randn(t, d, dtype=DOUBLE)
    zeros = torch.zeros(d, n, dtype=DOUBLE)
    g = MF.noisy_top_k_gating(x, zeros, zeros, k)
    for per_token, expected in ((g.prob_in_top_k, k / n), (g.gates, 1 / n),
                                ((g.gates > 0).to(DOUBLE), k / n)):
        total = per_token.sum(0)
        bound = 5 * torch.sqrt(t * per_token.var(0))
        assert ((total - t * expected).abs() < bound).all(), (total, bound)
    assert (g.load.std() / g.load.mean()).item() < 0.02


def test_cv_squared_and_losses():
    v = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=DOUBLE)
    # population variance 3.5, mean 3 -> 3.5 / 9
    torch.testing.assert_close(MF.cv_squared(v), torch.tensor(3.5 / 9, dtype=DOUBLE))
    torch.testing.assert_close(MF.cv_squared(v), naive_cv_squared(v))
    assert MF.cv_squared(torch.full((5,), 2.0, dtype=DOUBLE)).item() < 1e-15
    assert MF.cv_squared(torch.zeros(5)).item() == 0.0
    assert MF.cv_squared(torch.zeros(0)).item() == 0.0
    imp = torch.tensor([1.0, 3.0], dtype=DOUBLE)
    load = torch.tensor([2.0, 2.0, 2.0, 8.0], dtype=DOUBLE)
    loss = MF.balancing_loss(imp, load, w_importance=0.2, w_load=0.5)
    expected = 0.2 * 0.25 + 0.5 * (6.75 / 12.25)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=DOUBLE))
    gates = torch.tensor([[0.25, 0.75], [1.0, 0.0]], dtype=DOUBLE)
    torch.testing.assert_close(MF.importance(gates), torch.tensor([1.25, 0.75], dtype=DOUBLE))


def test_gradcheck_gating_and_losses():
    x, wg, wn, noise = gate_inputs(6, 3, 5, 4)
    for p in (x, wg, wn):
        p.requires_grad_(True)

    def fn(x, wg, wn):
        g = MF.noisy_top_k_gating(x, wg, wn, 2, noise=noise)
        return g.gates, g.load, MF.balancing_loss(MF.importance(g.gates), g.load)

    assert torch.autograd.gradcheck(fn, (x, wg, wn))
    v = torch.rand(7, dtype=DOUBLE, requires_grad=True)
    assert torch.autograd.gradcheck(MF.cv_squared, (v,))


def test_gating_keeps_five_token_by_expert_tensors_for_backward():
    """What the flat gating holds between the passes, in [T, n] float tensors: the noise
    logits (softplus), the noise, and Φ's argument, its scaled stddev and its quotient —
    one Φ over the chosen threshold, not two selected afterwards (which kept eight)."""
    t, n = 64, 32
    x, wg, wn, _ = gate_inputs(t, 8, n, 0)
    wg.requires_grad_(True)
    wn.requires_grad_(True)
    g, saved = saved_tensor_bytes(lambda: MF.noisy_top_k_gating(x, wg, wn, 2), exclude=(x, wg, wn))
    token_by_expert = t * n * x.element_size()  # one float64 [T, n] tensor
    # five of them, plus the bool mask and the [T, k+1] top-k results (0.28 of one here)
    assert 5 * token_by_expert <= saved < 6 * token_by_expert
    assert g.load.requires_grad


def hier_inputs(t, d, a, b, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=DOUBLE)  # noqa: E731
    return (r(t, d), r(d, a), 0.5 * r(d, a), r(a, d, b), 0.5 * r(a, d, b), r(t, a), r(t, a, b))


@pytest.mark.parametrize("a,b,k1,k2,train", [(3, 4, 2, 2, True), (4, 2, 1, 2, True),
                                             (2, 3, 2, 1, True), (3, 3, 2, 2, False),
                                             (1, 4, 1, 3, True)])
def test_hierarchical_matches_naive(a, b, k1, k2, train):
    x, wgp, wnp, wgs, wns, np_, ns = hier_inputs(11, 4, a, b, 5)
    h = MF.hierarchical_noisy_top_k_gating(
        x, wgp, wnp, wgs, wns, k1, k2, train=train, noise_primary=np_, noise_secondary=ns
    )
    dense, imp, load = naive_hierarchical(x, wgp, wnp, wgs, wns, k1, k2, np_, ns, train)
    got = torch.zeros(11, a * b, dtype=DOUBLE).scatter_add(1, h.expert_indices, h.combine_weights)
    torch.testing.assert_close(got, dense.reshape(11, -1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h.importance, imp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h.load, load, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.sum(1), torch.ones(11, dtype=DOUBLE))


def test_hierarchical_underflowed_primary_gate_leaves_group():
    """X^(i) holds the tokens whose primary gate is non-zero (the reference code dispatches on
    gates > 0). With logits ~1000 apart the second of two kept gates underflows to exactly 0:
    that token must not count in group i's load nor in |X^(i)|."""
    x, wgp, wnp, wgs, wns, np_, ns = hier_inputs(11, 4, 3, 3, 8)
    wgp = wgp * 1000
    h = MF.hierarchical_noisy_top_k_gating(
        x, wgp, wnp, wgs, wns, 2, 2, noise_primary=np_, noise_secondary=ns
    )
    assert (h.primary.top_k_gates == 0).any()
    _, imp, load = naive_hierarchical(x, wgp, wnp, wgs, wns, 2, 2, np_, ns)
    torch.testing.assert_close(h.load, load, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h.importance, imp, rtol=1e-12, atol=1e-12)


def test_hierarchical_gradcheck_and_primary_gets_load_gradient():
    x, wgp, wnp, wgs, wns, np_, ns = hier_inputs(7, 3, 3, 3, 6)
    params = (wgp, wnp, wgs, wns)
    for p in params:
        p.requires_grad_(True)

    def fn(wgp, wnp, wgs, wns):
        h = MF.hierarchical_noisy_top_k_gating(
            x, wgp, wnp, wgs, wns, 2, 2, noise_primary=np_, noise_secondary=ns
        )
        return h.combine_weights, h.importance, h.load

    assert torch.autograd.gradcheck(fn, params)
    # The load loss alone reaches the primary gate through Load_primary (eq. 14).
    h = MF.hierarchical_noisy_top_k_gating(
        x, wgp, wnp, wgs, wns, 2, 2, noise_primary=np_, noise_secondary=ns
    )
    MF.cv_squared(h.load).backward()
    assert wgp.grad.abs().sum() > 1e-6
    assert wnp.grad.abs().sum() > 1e-6


def test_empty_batch():
    x, wg, wn, _ = gate_inputs(0, 3, 4, 0)
    g = MF.noisy_top_k_gating(x, wg, wn, 2)
    assert g.gates.shape == (0, 4) and g.load.shape == (4,)
    assert MF.balancing_loss(MF.importance(g.gates), g.load).item() == 0.0
    x, wgp, wnp, wgs, wns, _, _ = hier_inputs(0, 3, 2, 2, 0)
    h = MF.hierarchical_noisy_top_k_gating(x, wgp, wnp, wgs, wns, 1, 1)
    assert h.expert_indices.shape == (0, 1) and h.load.shape == (4,)


def test_bad_arguments_name_themselves():
    x, wg, wn, _ = gate_inputs(4, 3, 5, 0)
    with pytest.raises(ValueError, match=r"k must be <= the number of experts \(5\), got 6"):
        MF.noisy_top_k_gating(x, wg, wn, 6)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        MF.noisy_top_k_gating(x, wg, wn, 0)
    with pytest.raises(TypeError, match="k must be an int, got float"):
        MF.noisy_top_k_gating(x, wg, wn, 2.0)
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got dtype torch.int64"):
        MF.noisy_top_k_gating(x.long(), wg, wn, 2)
    with pytest.raises(ValueError, match=r"w_gate must have shape \[d, n\] with d = x.shape\[1\]"):
        MF.noisy_top_k_gating(x[:, :2], wg, wn, 2)
    with pytest.raises(ValueError, match=r"w_noise must have shape \(3, 5\), got \(3, 4\)"):
        MF.noisy_top_k_gating(x, wg, wn[:, :4], 2)
    with pytest.raises(TypeError, match="w_gate has dtype torch.float32 but x has dtype"):
        MF.noisy_top_k_gating(x, wg.float(), wn, 2)
    with pytest.raises(ValueError, match="w_gate is on device meta but x is on cpu"):
        MF.noisy_top_k_gating(x, wg.to("meta"), wn, 2)
    with pytest.raises(ValueError, match=r"noise must have shape \(4, 5\), got \(4, 4\)"):
        MF.noisy_top_k_gating(x, wg, wn, 2, noise=torch.zeros(4, 4, dtype=DOUBLE))
    x, wgp, wnp, wgs, wns, _, _ = hier_inputs(4, 3, 2, 3, 0)
    with pytest.raises(ValueError, match=r"k_secondary must be <= the number of experts \(3\)"):
        MF.hierarchical_noisy_top_k_gating(x, wgp, wnp, wgs, wns, 1, 4)
    with pytest.raises(ValueError, match=r"k_primary must be <= the number of experts \(2\)"):
        MF.hierarchical_noisy_top_k_gating(x, wgp, wnp, wgs, wns, 3, 1)
    with pytest.raises(ValueError, match=r"w_gate_secondary must have shape \[a, d, b\] with a = 2 "
                       r"groups and d = x.shape\[1\] = 3, got \(3, 3, 3\)"):
        MF.hierarchical_noisy_top_k_gating(x, wgp, wnp, wgs[[0, 1, 1]], wns, 1, 1)
    with pytest.raises(ValueError, match=r"noise_secondary must have shape \(4, 2, 3\)"):
        MF.hierarchical_noisy_top_k_gating(x, wgp, wnp, wgs, wns, 1, 1,
                                           noise_secondary=torch.zeros(4, 3, dtype=DOUBLE))
