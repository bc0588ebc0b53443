"""Eigen et al.'s running-total constraint against degenerate gating."""

import pytest
import torch
from helpers import check_against_reference, gate_reference, layer_with
from reference import dense_gates, naive_gate_network, naive_margin_constraint

from sparsemoe.routers import HashRouter, MarginConstrainedRouter, SoftmaxRouter, TopKRouter
from sparsemoe.routers.margin import margin_constraint


def biased_router(d=6, n=4, favourite=0, hidden=None):
    """A softmax gate that gives most of every example to one expert (the degenerate case)."""
    router = SoftmaxRouter(d, n, bias=True, gate_hidden=hidden)
    with torch.no_grad():
        router.b_gate[favourite] = 4.0
    return router


@pytest.mark.parametrize("margin", [0.0, 0.7, 3.0])
def test_dense_constraint_equals_reference(margin):
    torch.manual_seed(0)
    gates = torch.randn(40, 5).mul(2).softmax(-1).double()
    totals = torch.tensor([0.0, 2.0, -1.0, 0.5, 0.0], dtype=torch.float64)
    grid = torch.arange(5).expand(40, 5)
    out = margin_constraint(grid, gates, totals, margin)
    mask, ref, ref_totals = naive_margin_constraint(gates, totals.tolist(), margin)
    assert torch.equal(out.mask, mask)
    torch.testing.assert_close(out.combine_weights, ref, rtol=0, atol=1e-15)
    torch.testing.assert_close(out.totals, torch.tensor(ref_totals, dtype=torch.float64))
    assert totals.tolist() == [0.0, 2.0, -1.0, 0.5, 0.0]  # the input totals are not modified
    assert mask.any(1).all()  # dense gating: some expert is always active
    torch.testing.assert_close(out.combine_weights.sum(1), torch.ones(40, dtype=torch.float64))


def test_top_k_grid_and_validity_mask():
    """k < n: only the chosen pairs count; a token whose choices are all over the margin is
    left with none; pairs the router marked invalid are never active."""
    idx = torch.tensor([[0, 1], [0, 1], [2, 3], [0, 1]])
    w = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.9, 0.1], [0.5, 0.5]])
    valid = torch.tensor([[True, True], [True, True], [True, False], [True, True]])
    out = margin_constraint(idx, w, torch.zeros(4, dtype=torch.float64), 0.2, valid)
    # after token 0 the totals are .5 .5 0 0: experts 0 and 1 are .25 above the mean, more
    # than m = .2, so token 1 (choices 0 and 1) keeps none
    assert out.mask.tolist() == [[True, True], [False, False], [True, False], [True, True]]
    assert out.combine_weights.tolist() == [[0.5, 0.5], [0.0, 0.0], [1.0, 0.0], [0.5, 0.5]]
    assert out.totals.tolist() == [1.0, 1.0, 1.0, 0.0]


def test_no_expert_runs_ahead_by_more_than_the_margin_while_active():
    """Over a run of training batches with a gate that prefers expert 0, an expert only gets
    gate mass while its running total is within m of the mean; the totals the router keeps are
    the sums of the gates it gave."""
    torch.manual_seed(0)
    margin = 2.5
    layer = layer_with(MarginConstrainedRouter(biased_router(hidden=5), margin))
    given = torch.zeros(4, dtype=torch.float64)
    for _ in range(12):
        x = torch.randn(17, 6)
        before = layer.router.totals.clone()
        routing = layer.router(x)
        gates = dense_gates(routing.expert_indices, routing.combine_weights.double(), 4,
                            routing.valid.tolist())
        running = before.clone()
        for row in gates:  # replay the examples in order
            active = row > 0
            assert (running[active] - running.mean() <= margin).all()
            running += row
        torch.testing.assert_close(layer.router.totals, running)
        given += gates.sum(0)
        assert (running - running.mean()).max() <= margin + 1  # one example past the margin
    torch.testing.assert_close(layer.router.totals, given)
    assert given.max() - given.min() < 2 * margin + 2  # balanced despite the biased gate
    # without the constraint the same gate gives expert 0 almost everything
    free = layer.router.router(torch.randn(200, 6)).importance
    assert free[0] > 0.8 * free.sum()


def test_layer_equals_reference_and_gradients_flow():
    torch.manual_seed(1)
    layer = layer_with(MarginConstrainedRouter(biased_router(hidden=3), 0.5))
    layer.router.totals.copy_(torch.tensor([3.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    start = layer.router.totals.tolist()

    def constrained(layer, p, x):
        _, probs = naive_gate_network(x, p["router.router.gate_hidden.w_hidden"],
                                      p["router.router.gate_hidden.b_hidden"],
                                      p["router.router.w_gate"], p["router.router.b_gate"])
        _, gates, _ = naive_margin_constraint(probs, start, 0.5)
        return gates, probs.sum() * 0

    check_against_reference(layer, torch.randn(9, 6), gate_reference(constrained))
    assert layer.stats.tokens_per_expert.sum() < 9 * 4  # masked pairs were not computed


def test_eval_and_removed_constraint_pass_the_gates_through():
    torch.manual_seed(0)
    router = MarginConstrainedRouter(biased_router(), 0.0)
    x = torch.randn(10, 6)
    plain = router.router(x)
    router.eval()
    assert torch.equal(router(x).combine_weights, plain.combine_weights)
    assert router.totals.abs().sum() == 0  # totals move only while constraining
    router.train()
    assert router(x).valid is not None
    kept = router.totals.clone()
    router.remove_constraint()
    out = router(x)
    assert out.valid is None and torch.equal(out.combine_weights, plain.combine_weights)
    assert torch.equal(router.totals, kept)
    assert "totals" in router.state_dict()


def test_sparse_router_under_the_constraint():
    torch.manual_seed(0)
    layer = layer_with(MarginConstrainedRouter(TopKRouter(6, 4, 2, w_switch=0.0), 1.0))
    y = layer(torch.randn(30, 6))
    assert y.shape == (30, 6) and layer.stats.tokens_per_expert.sum() <= 60


def test_bad_arguments():
    with pytest.raises(ValueError, match="margin must be a number >= 0, got -1"):
        MarginConstrainedRouter(SoftmaxRouter(4, 2), -1)
    with pytest.raises(TypeError, match="router must be a sparsemoe.routers.Router, got Linear"):
        MarginConstrainedRouter(torch.nn.Linear(2, 2), 1.0)
    with pytest.raises(ValueError, match="routes by token id"):
        MarginConstrainedRouter(HashRouter(4, 2, vocab_size=10), 1.0)
