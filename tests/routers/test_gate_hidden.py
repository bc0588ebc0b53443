"""Gates with a hidden layer, g(x) = softmax(B·relu(A·x + a) + b) (Eigen et al. 2013), in the
dense softmax, top-k and noisy top-k routers."""

import pytest
import torch
from helpers import check_against_reference, gate_reference, layer_with
from reference import (
    naive_aux,
    naive_cv_squared,
    naive_gate_network,
    naive_noisy_top_k,
    naive_top_k,
)

from sparsemoe.routers import GateHiddenLayer, NoisyTopKRouter, SoftmaxRouter, TopKRouter


def hidden_gates(layer, p, x):
    r = layer.router
    logits, probs = naive_gate_network(x, p["router.gate_hidden.w_hidden"],
                                       p["router.gate_hidden.b_hidden"], p["router.w_gate"],
                                       p.get("router.b_gate"))
    gates = probs if not isinstance(r, TopKRouter) else naive_top_k(probs, r.k, r.normalize)
    return gates, naive_aux(r, logits, probs, gates, (gates > 0).to(gates.dtype))


@pytest.mark.parametrize("make", [
    lambda: SoftmaxRouter(7, 4, gate_hidden=5, bias=True),
    lambda: SoftmaxRouter(7, 1, gate_hidden=3, w_importance=0.1),
    lambda: TopKRouter(7, 5, 2, gate_hidden=6, bias=True, w_importance=0.1),
], ids=["softmax", "one-expert", "top-2"])
@pytest.mark.parametrize("t", [0, 13])
def test_hidden_layer_gates_equal_reference(make, t):
    torch.manual_seed(t)
    layer = layer_with(make())
    if layer.router.b_gate is not None:
        with torch.no_grad():
            layer.router.b_gate.normal_()
    check_against_reference(layer, torch.randn(t, 7), gate_reference(hidden_gates))


def test_gates_are_distributions_of_the_right_shape():
    torch.manual_seed(0)
    r = SoftmaxRouter(12, 4, gate_hidden=50, bias=True)
    out = r(torch.randn(9, 12))
    assert r.gate_hidden.w_hidden.shape == (12, 50) and r.w_gate.shape == (50, 4)
    assert out.expert_indices.tolist() == [[0, 1, 2, 3]] * 9
    assert out.combine_weights.shape == (9, 4) and (out.combine_weights > 0).all()
    torch.testing.assert_close(out.combine_weights.sum(-1), torch.ones(9))
    torch.testing.assert_close(out.importance, out.combine_weights.sum(0))


def test_noisy_top_k_with_hidden_layer_equals_reference():
    torch.manual_seed(0)
    layer = layer_with(NoisyTopKRouter(6, 5, 2, gate_hidden=4))
    with torch.no_grad():
        layer.router.w_gate.normal_()
        layer.router.w_noise.normal_(std=0.5)

    def reference(layer, p, x, noise):
        h = torch.relu(x @ p["router.gate_hidden.w_hidden"] + p["router.gate_hidden.b_hidden"])
        gates, load, _ = naive_noisy_top_k(h, p["router.w_gate"], p["router.w_noise"], 2, noise)
        aux = 0.1 * naive_cv_squared(gates.sum(0)) + 0.1 * naive_cv_squared(load)
        return gate_reference(lambda *_: (gates, aux))(layer, p, x, noise)

    check_against_reference(layer, torch.randn(11, 6), reference, noise_shape=(11, 5))


def test_hidden_layer_init_and_arguments():
    layer = GateHiddenLayer(16, 50)
    assert layer.w_hidden.abs().max() <= 0.25 and layer.b_hidden.abs().max() <= 0.25
    assert SoftmaxRouter(16, 4).gate_hidden is None
    with pytest.raises(ValueError, match="gate_hidden must be >= 1, got 0"):
        SoftmaxRouter(4, 2, gate_hidden=0)
    with pytest.raises(TypeError, match="gate_hidden must be an int, got float 5.0"):
        NoisyTopKRouter(4, 2, 1, gate_hidden=5.0)


@pytest.mark.parametrize("cls, args", [(SoftmaxRouter, (6, 4)), (TopKRouter, (6, 4, 2)),
                                       (NoisyTopKRouter, (6, 4, 2))])
def test_hidden_is_a_deprecated_name_of_gate_hidden(cls, args):
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning, match=r"hidden=\.\.\.\) is deprecated: use gate_hidden="):
        old = cls(*args, hidden=5)
    torch.manual_seed(0)
    new = cls(*args, gate_hidden=5)
    assert old.state_dict().keys() == new.state_dict().keys()
    for key, value in new.state_dict().items():
        assert torch.equal(old.state_dict()[key], value), key
    with pytest.raises(TypeError, match="got both hidden= and gate_hidden="), \
            pytest.warns(DeprecationWarning):
        cls(*args, hidden=5, gate_hidden=5)


@pytest.mark.parametrize("make, message", [
    (lambda: TopKRouter(4, 2, 1, normalize=1), "normalize must be a bool, got int 1"),
    (lambda: SoftmaxRouter(4, 2, bias="yes"), "bias must be a bool, got str 'yes'"),
    (lambda: NoisyTopKRouter(4, 2, 1, noisy_gating=None), "noisy_gating must be a bool"),
])
def test_router_flags_are_checked(make, message):
    with pytest.raises(TypeError, match=message):
        make()


@pytest.mark.parametrize("name", ["noise_epsilon", "w_importance", "w_load"])
def test_noisy_router_weights_are_checked(name):
    from sparsemoe.routers import HierarchicalNoisyTopKRouter

    with pytest.raises(ValueError, match=rf"{name} must be a number in \[0, inf\), got -1"):
        NoisyTopKRouter(4, 2, 1, **{name: -1})
    with pytest.raises(ValueError, match=rf"{name} must be a number in \[0, inf\), got -1"):
        HierarchicalNoisyTopKRouter(4, 2, 2, 1, 1, **{name: -1})
