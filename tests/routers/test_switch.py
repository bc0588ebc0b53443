"""Switch top-1 routing: float32 router, multiplicative jitter, switch loss and z-loss."""

import pytest
import torch
from helpers import (
    assert_router_gets_gradient,
    check_against_reference,
    gate_reference,
    layer_with,
    router_logits,
)
from reference import naive_aux, naive_capacity, naive_softmax

from sparsemoe.capacity import Capacity
from sparsemoe.routers import SwitchRouter


def switch_gates(jitter=None, keep=None):
    def gates_and_aux(layer, p, x):
        xr = x if jitter is None else x * jitter.double()
        logits = router_logits(p, xr)
        probs = naive_softmax(logits)
        gates, top1 = torch.zeros_like(probs), torch.zeros_like(probs)
        for t in range(x.shape[0]):
            i = int(probs[t].argmax())
            top1[t, i] = 1.0
            if keep is None or keep[t][0]:
                gates[t, i] = probs[t, i]
        # importance and f count the router's choice, before any capacity drop
        aux = naive_aux(layer.router, logits, probs, probs * top1, top1)
        return gates, aux
    return gates_and_aux


@pytest.mark.parametrize("bias", [False, True])
def test_switch_eval_equals_dense_reference(bias):
    torch.manual_seed(1)
    layer = layer_with(SwitchRouter(6, 5, bias=bias, w_importance=0.1)).eval()
    with torch.no_grad():
        layer.router.w_gate.normal_()
    check_against_reference(layer, torch.randn(4, 9, 6), gate_reference(switch_gates()))


def test_switch_training_jitters_the_router_input_only():
    torch.manual_seed(0)
    eps = 0.3  # large, so that the jitter changes some choices
    layer = layer_with(SwitchRouter(6, 5, jitter=eps))
    with torch.no_grad():
        layer.router.w_gate.normal_()
    x = torch.randn(40, 6)
    torch.manual_seed(7)
    jitter = torch.empty(40, 6).uniform_(1 - eps, 1 + eps)
    check_against_reference(layer, x, gate_reference(switch_gates(jitter)), seed=7)
    layer.eval()
    assert not torch.equal(layer(x), layer.train()(x))


def test_switch_with_capacity_equals_reference_with_dropped_tokens_zeroed():
    torch.manual_seed(2)
    router = SwitchRouter(6, 4, jitter=0.0)
    with torch.no_grad():
        router.w_gate.normal_()
        router.w_gate[:, 0] += 1.0  # crowd expert 0
    capacity = Capacity(factor=1.0, minimum=0)  # ceil(T/n) = 8 per expert
    layer = layer_with(router, capacity=capacity)
    x = torch.randn(32, 6)
    choice = router(x).expert_indices
    keep = naive_capacity(choice, None, 4, 8)
    check_against_reference(layer, x, gate_reference(switch_gates(keep=keep)))
    dropped = sum(not row[0] for row in keep)
    assert dropped > 0
    assert int(layer.stats.dropped_pairs) == dropped and layer.stats.routed_pairs == 32
    assert layer.stats.drop_fraction == pytest.approx(dropped / 32)
    assert layer.stats.tokens_per_expert.max() <= 8


def test_losses_and_selective_precision():
    torch.manual_seed(0)
    layer = layer_with(SwitchRouter(16, 4), hidden=32)
    x = torch.randn(256, 16)
    layer(x)
    r = layer.router
    logits = x @ r.w_gate
    probs = logits.softmax(-1)
    one_hot = torch.nn.functional.one_hot(probs.argmax(-1), 4).float()
    # near-uniform at the reduced-scale initialisation: N·Σ f·P ≈ 1
    assert layer.aux_loss.item() == pytest.approx(
        0.01 * (4 * (one_hot.mean(0) * probs.mean(0)).sum()).item()
        + 1e-3 * (torch.logsumexp(logits, -1) ** 2).mean().item(), rel=0.05)  # jitter
    assert_router_gets_gradient(layer, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = r(x)
    assert out.combine_weights.dtype == torch.float32 and out.aux_loss.dtype == torch.float32


def test_bad_jitter():
    with pytest.raises(ValueError, match=r"jitter must be a number in \[0, 1\), got 1.5"):
        SwitchRouter(4, 2, jitter=1.5)
