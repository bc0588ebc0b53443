"""Layers and routers under hostile input (issue 19, items 1 and 9): no hang on NaN, every
layer deep-copyable after a forward with grad, bad arguments refused at construction."""

import copy
import math
import multiprocessing

import pytest
import torch

import sparsemoe
from sparsemoe import functional as MF
from sparsemoe import routers
from sparsemoe.experts import FeedForwardExperts, LinearExperts
from sparsemoe.layers import MoEStats

D, N = 8, 4


def _base_layer_step(queue, bad: float) -> None:
    torch.manual_seed(0)
    layer = sparsemoe.BASELayer(routers.BASERouter(D, N), FeedForwardExperts(N, D, 16)).train()
    x = torch.randn(16, D)
    x[5, 2] = bad
    try:
        layer(x)
        queue.put("no error")
    except ValueError as e:
        queue.put(str(e))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_base_layer_with_a_non_finite_token_fails_fast_instead_of_hanging(bad):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_base_layer_step, args=(queue, bad))
    proc.start()
    proc.join(timeout=60)
    if proc.is_alive():
        proc.kill()
        pytest.fail("BASELayer hung on a non-finite token")
    message = queue.get(timeout=5)
    assert message.startswith("scores must be finite, got [") and message.endswith(
        "for token 5 (NaN or inf features or weights)")


def test_balanced_assignment_has_a_round_bound():
    torch.manual_seed(0)
    scores = torch.randn(4, 2)
    with pytest.raises(RuntimeError, match=r"the auction did not settle within 48 rounds"):
        MF.balanced_assignment(scores, torch.tensor([3, 2]))  # 5 wanted, 4 tokens: no end
    huge = torch.tensor([[1e308, 0.0], [-1e308, 0.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"scores must span a finite range, got \[-1e\+308, "
                                         r"1e\+308\]"):
        MF.balanced_assignment(huge)
    # the bound does not cut a solvable auction short: an optimal assignment by brute force
    scores = torch.randn(6, 3, dtype=torch.float64) * 1e3
    got = MF.balanced_assignment(scores)
    import itertools

    best = max((sum(scores[t, e] for t, e in enumerate(p)), p)
               for p in set(itertools.permutations([0, 0, 1, 1, 2, 2])))
    assert float(scores[torch.arange(6), got].sum()) == pytest.approx(float(best[0]), rel=1e-12)


def _layers():
    def bank():
        return FeedForwardExperts(N, D, 16)

    yield "MoE", sparsemoe.MoE(D, N, 2, 16)
    yield "HierarchicalMoE", sparsemoe.HierarchicalMoE(D, 2, 2, 1, 1, 16)
    yield "BASELayer", sparsemoe.BASELayer(routers.BASERouter(D, N), bank())
    yield "SoftMoE", sparsemoe.SoftMoE(routers.SoftMoERouter(D, N), bank())
    yield "SharedExpertMoE", sparsemoe.SharedExpertMoE(routers.TopKRouter(D, N, 2), bank(),
                                                       FeedForwardExperts(1, D, 16))
    for name in ("SwitchRouter", "GShardRouter", "ReinforceRouter", "StrictlyBalancedRouter",
                 "ExpertChoiceRouter", "SoftmaxRouter", "ArgmaxRouter"):
        yield name, sparsemoe.MoELayer(getattr(routers, name)(D, N), bank())
    for name in ("TopKRouter", "NoisyTopKRouter"):
        yield name, sparsemoe.MoELayer(getattr(routers, name)(D, N, 2), bank())


@pytest.mark.parametrize(("name", "layer"), list(_layers()), ids=[n for n, _ in _layers()])
def test_every_layer_deep_copies_after_a_forward_with_grad(name, layer):
    torch.manual_seed(0)
    layer.train()
    x = torch.randn(3, 5, D, requires_grad=True)
    y = layer(x)
    twin = copy.deepcopy(layer)
    # values in the last forward's graph are not the copy's (it has not run that forward);
    # the original keeps them
    for owner, copied, attr in ((layer, twin, "aux_loss"),
                                (layer.router, twin.router, "log_prob")):
        value = getattr(owner, attr, None)
        if value is not None and value.grad_fn is not None:
            assert getattr(copied, attr) is None, attr
        else:
            assert (getattr(copied, attr, None) is None and value is None) or \
                torch.equal(getattr(copied, attr), value), attr
    for (k, a), b in zip(layer.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), k
    layer.eval(), twin.eval()
    torch.manual_seed(1)
    x = torch.randn(2, 4, D)
    assert torch.equal(layer(x), twin(x))
    y.sum().backward()  # the original graph is intact


def test_moe_arguments_are_checked():
    for cls, args in ((sparsemoe.MoE, (D, N, 2, 16)),
                      (sparsemoe.HierarchicalMoE, (D, 2, 2, 1, 1, 16))):
        for name, value, message in (
                ("w_importance", -5.0, r"w_importance must be a number in \[0, inf\), got -5.0"),
                ("w_load", math.nan, r"w_load must be a number in \[0, inf\), got nan"),
                ("noise_epsilon", -1.0, r"noise_epsilon must be a number in \[0, inf\), "
                                        r"got -1.0"),
                ("w_load", math.inf, r"w_load must be a number in \[0, inf\), got inf")):
            with pytest.raises(ValueError, match=message):
                cls(*args, **{name: value})


def test_cv_statistics_are_nan_when_importance_is_nan():
    s = MoEStats(torch.tensor([1.0, math.nan]), torch.tensor([math.nan, 2.0]),
                 torch.tensor([3, 1]))
    assert math.isnan(s.cv_importance) and math.isnan(s.cv_load)
    zero = MoEStats(torch.zeros(2), torch.zeros(2), torch.zeros(2, dtype=torch.long))
    assert zero.cv_importance == 0.0 and zero.cv_load == 0.0
    even = MoEStats(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0]), torch.tensor([2, 2]))
    assert even.cv_importance == pytest.approx(0.5, rel=1e-15) and even.cv_load == 0.0


def test_capacity_factor_must_be_finite():
    with pytest.raises(ValueError, match=r"factor must be a number in \(0, inf\), got inf"):
        sparsemoe.Capacity(factor=math.inf)


def test_reinforce_router_names_a_nan_token():
    router = routers.ReinforceRouter(D, N).train()
    x = torch.randn(6, D)
    x[4, 0] = math.nan
    with pytest.raises(ValueError, match=r"x: token 4 gives non-finite routing probabilities"):
        router(x)


def test_router_and_expert_widths_are_checked_at_construction():
    with pytest.raises(ValueError, match="router has d_model 8 but experts take inputs of "
                                         "width 6; they must match"):
        sparsemoe.MoELayer(routers.TopKRouter(D, N, 2), FeedForwardExperts(N, 6, 16))
    with pytest.raises(ValueError, match="width 5"):
        sparsemoe.MoELayer(routers.TopKRouter(D, N, 2), LinearExperts(N, 5, 3))
