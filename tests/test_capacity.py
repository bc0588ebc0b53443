"""Validity masks and expert capacity in the dispatch, against pair-by-pair references."""

import pytest
import torch
from helpers import check_against_reference, gate_reference, layer_with, router_logits
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import (
    dense_gates,
    naive_aux,
    naive_capacity,
    naive_softmax,
    naive_top_k,
    ranked_experts,
)
from torch import nn

import sparsemoe
from sparsemoe.capacity import Capacity, capacity_mask
from sparsemoe.dispatch import dispatch_combine, equal_routes, sort_by_expert, unsort
from sparsemoe.experts import ModuleListExperts
from sparsemoe.routers import TopKRouter


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 5), k=st.integers(1, 3), groups=st.integers(1, 3),
    group_size=st.integers(0, 9), capacity=st.integers(0, 7), seed=st.integers(0, 10_000),
    masked=st.booleans(), prioritised=st.booleans(),
)
def test_capacity_mask_equals_pair_by_pair_filling(
    n, k, groups, group_size, capacity, seed, masked, prioritised
):
    g = torch.Generator().manual_seed(seed)
    t = groups * group_size
    idx = torch.randint(0, n, (t, k), generator=g)
    valid = torch.rand(t, k, generator=g) > 0.3 if masked else None
    # Few distinct priorities, so that ties (resolved in token order) occur.
    priority = torch.randint(0, 4, (t,), generator=g).float() if prioritised else None
    keep = capacity_mask(idx, valid, n, capacity, group_size=group_size or None,
                         priority=priority)
    assert keep.tolist() == naive_capacity(idx, valid, n, capacity, group_size or None, priority)
    # never over capacity, in any group
    for start in range(0, t, max(group_size, 1)):
        block_idx, block_keep = idx[start:start + group_size], keep[start:start + group_size]
        counts = torch.bincount(block_idx[block_keep], minlength=n)
        assert int(counts.max()) <= capacity
    if valid is not None:
        assert not (keep & ~valid).any()  # a masked pair never takes capacity


def test_first_choices_fill_before_second_choices():
    # Capacity 2: expert 0 fills with the first choices of tokens 0 and 2, so token 1's second
    # choice is dropped although token 1 precedes token 2; expert 1 takes token 1's first
    # choice and token 0's second, and drops token 2's second.
    idx = torch.tensor([[0, 1], [1, 0], [0, 1]])
    keep = capacity_mask(idx, None, 2, 2)
    assert keep.tolist() == [[True, True], [True, False], [True, False]]
    # by priority, capacity 1: token 2 takes expert 0 and token 1 expert 1
    keep = capacity_mask(idx, None, 2, 1, priority=torch.tensor([0.1, 0.5, 0.9]))
    assert keep.tolist() == [[False, False], [True, False], [True, False]]


def test_capacity_formula_and_arguments():
    assert Capacity(factor=1.0).per_expert(64, 1, 8) == 8  # Switch: ceil(T/n·f)
    assert Capacity(factor=1.25).per_expert(64, 2, 8) == 20  # ceil(k·T/n·f)
    assert Capacity(factor=1.0).per_expert(3, 1, 8) == 4  # the minimum
    assert Capacity(factor=1.0, minimum=0).per_expert(0, 2, 8) == 0
    assert Capacity(tokens=3).per_expert(1000, 2, 8) == 3
    with pytest.raises(ValueError, match="exactly one of factor= or tokens=, got factor=None"):
        Capacity()
    with pytest.raises(ValueError, match="exactly one of factor= or tokens="):
        Capacity(factor=1.0, tokens=4)
    with pytest.raises(ValueError, match=r"factor must be a number in \(0, inf\), got 0"):
        Capacity(factor=0)
    with pytest.raises(ValueError, match="tokens must be >= 0, got -1"):
        Capacity(tokens=-1)
    with pytest.raises(ValueError, match=r"policy must be one of \('position', 'priority'\), "
                                         r"got 'random'"):
        Capacity(factor=1.0, policy="random")
    with pytest.raises(ValueError, match="group must be one of .*got 'expert'"):
        Capacity(factor=1.0, group="expert")


class Spy(nn.Linear):
    """An expert that records how many rows it was given."""

    def __init__(self, calls):
        super().__init__(3, 3)
        self.calls = calls

    def forward(self, x):
        self.calls.append(x.shape[0])
        return super().forward(x)


def test_masked_pairs_are_not_computed_and_add_nothing():
    torch.manual_seed(0)
    calls = []
    bank = ModuleListExperts([Spy(calls) for _ in range(3)])
    x = torch.randn(4, 3)
    idx = torch.tensor([[0, 2], [1, 2], [2, 0], [1, 0]])
    w = torch.rand(4, 2)
    valid = torch.tensor([[True, False], [True, True], [False, False], [True, True]])
    y, routes = dispatch_combine(x, idx, w, bank, valid)
    assert routes.tokens_per_expert.tolist() == [2, 2, 1]
    assert sorted(calls) == [1, 2, 2]  # 5 valid pairs computed, 3 masked ones not
    expected = torch.stack([
        w[0, 0] * bank.experts[0](x[0]),
        w[1, 0] * bank.experts[1](x[1]) + w[1, 1] * bank.experts[2](x[1]),
        torch.zeros(3),
        w[3, 0] * bank.experts[1](x[3]) + w[3, 1] * bank.experts[0](x[3]),
    ])
    torch.testing.assert_close(y, expected)
    # the un-permute puts the computed values back and zeros in masked cells
    grid = unsort(routes.expert_index.double()[:, None] + 1, routes).view(4, 2)
    assert grid.tolist() == [[1, 0], [2, 3], [0, 0], [2, 1]]


def test_all_masked_and_no_tokens():
    bank = ModuleListExperts([nn.Linear(3, 3) for _ in range(2)])
    idx = torch.zeros(3, 2, dtype=torch.long)
    x = torch.randn(3, 3, requires_grad=True)
    none = torch.zeros(3, 2, dtype=torch.bool)
    y, routes = dispatch_combine(x, idx, torch.ones(3, 2), bank, none)
    assert torch.equal(y, torch.zeros(3, 3)) and routes.tokens_per_expert.tolist() == [0, 0]
    y.sum().backward()  # still part of the graph
    r = sort_by_expert(torch.zeros(0, 2, dtype=torch.long), 2, torch.zeros(0, 2, dtype=torch.bool))
    assert r.order.numel() == 0


def test_equal_routes():
    r = equal_routes(3, 2)
    assert r.expert_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert r.tokens_per_expert.tolist() == [2, 2, 2]
    assert equal_routes(2, 0).order.numel() == 0


def top_k_with_capacity(capacity):
    """Top-k gates with the pairs beyond each expert's capacity removed, filled pair by pair."""

    def gates_and_aux(layer, p, x, lead_shape):
        r, n = layer.router, layer.num_experts
        logits = router_logits(p, x)
        probs = naive_softmax(logits)
        gates = naive_top_k(probs, r.k, r.normalize)
        idx = torch.tensor([ranked_experts(probs[t])[:r.k] for t in range(x.shape[0])],
                           dtype=torch.long).reshape(x.shape[0], r.k)
        weights = gates.gather(1, idx)
        t = x.shape[0]
        group = lead_shape[-1] if capacity.group == "sequence" else t
        priority = weights.max(1).values if capacity.policy == "priority" else None
        cap = capacity.per_expert(group, r.k, n)
        keep = naive_capacity(idx, None, n, cap, group or None, priority)
        aux = naive_aux(r, logits, probs, gates, (gates > 0).to(gates.dtype))
        return dense_gates(idx, weights, n, keep), aux, keep

    return gates_and_aux


CAPACITIES = [Capacity(factor=1.0, minimum=0), Capacity(factor=0.5, minimum=1, policy="priority"),
              Capacity(tokens=2, group="sequence"), Capacity(factor=1.25, group="sequence",
                                                             policy="priority"),
              Capacity(factor=100.0)]


@pytest.mark.parametrize("capacity", CAPACITIES, ids=lambda c: f"{c.factor}-{c.tokens}-"
                         f"{c.policy}-{c.group}")
@pytest.mark.parametrize("shape,n,k", [((3, 8, 6), 4, 2), ((16, 6), 3, 1), ((2, 5, 6), 1, 1),
                                       ((0, 6), 3, 2), ((2, 0, 6), 2, 1)])
def test_layer_with_capacity_equals_reference_and_counts_drops(capacity, shape, n, k):
    torch.manual_seed(n * 10 + k)
    router = TopKRouter(6, n, k, w_z=1e-3)
    with torch.no_grad():
        router.w_gate.normal_()
        router.w_gate[:, 0] += 1.0  # crowd expert 0, so that capacities bind
    layer = layer_with(router, capacity=capacity)
    x = torch.randn(*shape)
    gates_and_aux = top_k_with_capacity(capacity)
    check_against_reference(layer, x, gate_reference(
        lambda layer, p, x64: gates_and_aux(layer, p, x64, shape[:-1])[:2]))
    keep = gates_and_aux(layer, {n_: q.double() for n_, q in layer.named_parameters()},
                         x.reshape(-1, 6).double(), shape[:-1])[2]
    kept = sum(map(sum, keep))
    tokens = x.numel() // 6
    stats = layer.stats
    assert int(stats.routed_pairs) == tokens * k
    assert int(stats.dropped_pairs) == tokens * k - kept  # exact
    assert int(stats.tokens_per_expert.sum()) == kept
    if capacity.group == "batch":
        cap = capacity.per_expert(tokens, k, n)
        assert int(stats.tokens_per_expert.max()) <= cap
    if capacity.factor == 100.0:  # larger than the tokens: nothing dropped, same as dropless
        assert stats.drop_fraction == 0.0
        dropless = layer_with(router)
        dropless.load_state_dict(layer.state_dict())
        torch.testing.assert_close(dropless(x), layer(x), rtol=0, atol=0)


def test_dropped_tokens_keep_their_residual_and_stats_report_the_fraction():
    torch.manual_seed(0)
    router = TopKRouter(4, 2, 1)
    with torch.no_grad():
        router.w_gate.zero_()
        router.w_gate[0, 0] = 10.0  # tokens with x_0 > 0 all go to expert 0
    layer = layer_with(router, capacity=Capacity(tokens=1))
    x = torch.randn(6, 4)
    x[:, 0] = torch.tensor([1.0, 2.0, -1.0, 3.0, -2.0, 0.5])
    y = layer(x)
    # expert 0 (tokens 0, 1, 3, 5) keeps token 0; expert 1 (tokens 2, 4) keeps token 2
    dropped = torch.tensor([False, True, False, True, True, True])
    assert (y[dropped] == 0).all() and (y[~dropped] != 0).all()
    assert int(layer.stats.dropped_pairs) == 4
    assert layer.stats.drop_fraction == pytest.approx(4 / 6)
    assert layer.stats.as_dict()["drop_fraction"] == pytest.approx(4 / 6)
    model_output = x + y  # the model's residual: a dropped token passes through unchanged
    torch.testing.assert_close(model_output[dropped], x[dropped])


def test_dropless_stats_and_capacity_argument():
    layer = layer_with(TopKRouter(4, 2, 1))
    layer(torch.randn(5, 4))
    assert layer.stats.routed_pairs is None and layer.stats.drop_fraction == 0.0
    with pytest.raises(TypeError, match="capacity must be a sparsemoe.Capacity or None, "
                                        "got float"):
        layer_with(TopKRouter(4, 2, 1), capacity=1.25)


def test_expert_output_masking():
    torch.manual_seed(0)
    layer = layer_with(TopKRouter(4, 3, 2), expert_output_masking=0.25)
    x = torch.randn(4000, 4)
    layer(x)
    computed = int(layer.stats.tokens_per_expert.sum())
    assert computed == pytest.approx(0.75 * 8000, rel=0.05)  # a quarter of the pairs dropped
    layer.eval()
    plain = layer_with(TopKRouter(4, 3, 2)).eval()
    plain.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x[:10]), 0.75 * plain(x[:10]))  # fairseq's eval scaling
    with pytest.raises(ValueError, match=r"expert_output_masking must be a number in \[0, 1\), "
                                         r"got 1.0"):
        layer_with(TopKRouter(4, 3, 2), expert_output_masking=1.0)


def test_paper_layers_take_a_capacity():
    torch.manual_seed(0)
    for layer in (sparsemoe.MoE(4, 4, 2, 8, capacity=Capacity(tokens=3)),
                  sparsemoe.HierarchicalMoE(4, 2, 2, 1, 2, hidden=8, capacity=Capacity(tokens=3))):
        layer(torch.randn(20, 4))
        assert int(layer.stats.tokens_per_expert.max()) <= 3
        assert int(layer.stats.dropped_pairs) == 40 - int(layer.stats.tokens_per_expert.sum())


@pytest.mark.parametrize("name", ["Capacity", "capacity_mask", "DROP_POLICIES", "CAPACITY_GROUPS"])
def test_capacity_names_in_dispatch_are_deprecated_aliases(name):
    with pytest.warns(DeprecationWarning, match=f"sparsemoe.capacity.{name}"):
        alias = getattr(sparsemoe.dispatch, name)
    assert alias is getattr(sparsemoe.capacity, name)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        sparsemoe.dispatch.not_a_name  # noqa: B018
