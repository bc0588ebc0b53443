"""The functional steps of the routing family against from-definition references."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

import sparsemoe.functional as MF
from sparsemoe.routers.base_layers import balanced_assignment, balanced_capacities
from sparsemoe.routers.strictly_balanced import batchwise_threshold_loss

DOUBLE = torch.float64


def test_switch_loss_from_definition():
    torch.manual_seed(0)
    probs = torch.randn(10, 4, dtype=DOUBLE).softmax(-1)
    idx = probs.argmax(-1, keepdim=True)
    f = [sum(int(idx[t, 0]) == i for t in range(10)) / 10 for i in range(4)]
    p = [float(probs[:, i].mean()) for i in range(4)]
    expected = 4 * sum(fi * pi for fi, pi in zip(f, p, strict=True))
    assert MF.switch_loss(probs, idx).item() == pytest.approx(expected, rel=1e-12)
    # uniform routing gives 1 for top-1 and k for top-k (transformers' "balanced value = k")
    uniform = torch.full((8, 4), 0.25, dtype=DOUBLE)
    assert MF.switch_loss(uniform, torch.arange(8)[:, None] % 4).item() == pytest.approx(1.0)
    two = torch.stack([torch.arange(8) % 4, (torch.arange(8) + 1) % 4], 1)
    assert MF.switch_loss(uniform, two).item() == pytest.approx(2.0)
    # a masked choice does not count; the gradient reaches P only
    valid = torch.tensor([[True, False]] * 8)
    assert MF.switch_loss(uniform, two, valid).item() == pytest.approx(1.0)
    logits = torch.randn(6, 3, dtype=DOUBLE, requires_grad=True)
    MF.switch_loss(logits.softmax(-1), logits.argmax(-1, keepdim=True)).backward()
    assert logits.grad.abs().sum() > 0
    assert MF.switch_loss(torch.zeros(0, 3), torch.zeros(0, 1, dtype=torch.long)).item() == 0.0


def test_z_loss_from_definition():
    torch.manual_seed(0)
    logits = torch.randn(7, 5, dtype=DOUBLE)
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 7
    assert MF.z_loss(logits).item() == pytest.approx(expected, rel=1e-12)
    assert MF.z_loss(torch.zeros(0, 5)).item() == 0.0


def test_pair_importance_and_load():
    idx = torch.tensor([[0, 2], [2, 1]])
    w = torch.tensor([[0.5, 0.25], [1.0, 2.0]])
    valid = torch.tensor([[True, False], [True, True]])
    assert MF.pair_importance(idx, w, 3).tolist() == [0.5, 2.0, 1.25]
    assert MF.pair_importance(idx, w, 3, valid).tolist() == [0.5, 2.0, 1.0]
    assert MF.pair_load(idx, 3, valid).tolist() == [1.0, 1.0, 1.0]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(t=st.integers(0, 12), n=st.integers(1, 4), seed=st.integers(0, 1000), data=st.data())
def test_top_tokens_per_expert_is_each_columns_top_m(t, n, seed, data):
    m = data.draw(st.integers(0, t), label="m")
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (t, n), generator=g).float()  # many ties
    mask = MF.top_tokens_per_expert(scores, m)
    for i in range(n):
        # Python's stable sort: ties go to the earlier token
        order = sorted(range(t), key=lambda r, i=i: -float(scores[r, i]))
        assert sorted(torch.nonzero(mask[:, i]).flatten().tolist()) == sorted(order[:m])


def test_batchwise_threshold_loss_from_definition():
    torch.manual_seed(0)
    x = torch.rand(9, 3, dtype=DOUBLE)
    thresholds = torch.tensor([0.3, 0.5, 0.8], dtype=DOUBLE, requires_grad=True)
    batch = MF.top_tokens_per_expert(x, 2)
    loss = batchwise_threshold_loss(x, thresholds, batch)
    t = thresholds.detach()
    expected = sum(
        ((1.0 if x[j, i] > t[i] else 0.0) - float(batch[j, i])) * float(x[j, i] - t[i])
        for j in range(9) for i in range(3)
    )
    assert loss.item() == pytest.approx(expected, rel=1e-12) and loss.item() >= 0
    loss.backward()
    # dL/dT_i = -(#over threshold - #in the batch mask): T rises where it admits too many
    over = (x > thresholds.detach()).sum(0) - batch.sum(0)
    torch.testing.assert_close(thresholds.grad, -over.to(DOUBLE))


def test_balanced_capacities():
    assert balanced_capacities(12, 4).tolist() == [3, 3, 3, 3]
    assert balanced_capacities(10, 4).tolist() == [3, 3, 2, 2]
    assert balanced_capacities(0, 3).tolist() == [0, 0, 0]


def optimal_total(scores, capacities):
    """The best Σ scores[t, a_t] with the given tokens per expert (scipy's exact solver on the
    problem with each expert's column repeated capacity times)."""
    cols = torch.repeat_interleave(torch.arange(scores.shape[1]), capacities)
    rows, picked = linear_sum_assignment(-scores[:, cols].double().numpy())
    return float(scores[:, cols].double().numpy()[rows, picked].sum())


@settings(max_examples=40, deadline=None, derandomize=True)
@given(t=st.integers(1, 40), n=st.integers(1, 6), seed=st.integers(0, 10_000),
       scale=st.sampled_from([1e-3, 1.0, 100.0]), integer=st.booleans())
def test_balanced_assignment_is_optimal_and_balanced(t, n, seed, scale, integer):
    g = torch.Generator().manual_seed(seed)
    if integer:  # many exactly tied optima
        scores = torch.randint(-3, 4, (t, n), generator=g).double()
    else:
        scores = torch.randn(t, n, generator=g, dtype=DOUBLE) * scale
    caps = balanced_capacities(t, n)
    a = balanced_assignment(scores)
    assert torch.equal(torch.bincount(a, minlength=n), caps)
    total = float(scores[torch.arange(t), a].sum())
    best = optimal_total(scores, caps)
    assert total == pytest.approx(best, rel=1e-9, abs=1e-9 * max(1.0, float(scores.abs().max())))


def test_balanced_assignment_examples():
    # every token prefers expert 0; exactly half must go to expert 1, the ones losing least
    scores = torch.tensor([[5.0, 0.0], [4.0, 3.9], [6.0, 1.0], [1.0, 0.5]])
    assert balanced_assignment(scores).tolist() == [0, 1, 0, 1]
    caps = torch.tensor([3, 1])
    assert balanced_assignment(scores, caps).tolist() == [0, 1, 0, 0]
    assert balanced_assignment(torch.zeros(0, 3)).numel() == 0
    assert balanced_assignment(torch.randn(5, 1)).tolist() == [0] * 5


@pytest.mark.parametrize("name, module", [
    ("balanced_assignment", "base_layers"), ("balanced_capacities", "base_layers"),
    ("batchwise_threshold_loss", "strictly_balanced"), ("margin_constraint", "margin"),
    ("MarginConstraint", "margin"),
])
def test_moved_functions_are_deprecated_aliases_in_functional(name, module):
    import importlib

    with pytest.warns(DeprecationWarning, match=f"use sparsemoe.routers.{module}.{name}"):
        alias = getattr(MF, name)
    assert alias is getattr(importlib.import_module(f"sparsemoe.routers.{module}"), name)
    with pytest.raises(AttributeError, match="no attribute 'renormalize_masked'"):
        MF.renormalize_masked  # noqa: B018
