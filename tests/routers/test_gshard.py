"""GShard top-2 gating with random routing of the second expert."""

import pytest
import torch
from helpers import (
    assert_router_gets_gradient,
    check_against_reference,
    gate_reference,
    layer_with,
    router_logits,
)
from reference import naive_aux, naive_softmax, ranked_experts

from sparsemoe.routers import GShardRouter


def gshard_gates(uniform=None):
    def gates_and_aux(layer, p, x):
        logits = router_logits(p, x)
        probs = naive_softmax(logits)
        gates, top1 = torch.zeros_like(probs), torch.zeros_like(probs)
        for t in range(x.shape[0]):
            e1, e2 = ranked_experts(probs[t])[:2]
            g1 = probs[t, e1] / (probs[t, e1] + probs[t, e2])
            g2 = probs[t, e2] / (probs[t, e1] + probs[t, e2])
            gates[t, e1] = g1
            if uniform is None or 2 * float(g2.detach()) > float(uniform[t]):
                gates[t, e2] = g2
            top1[t, e1] = 1.0
        return gates, naive_aux(layer.router, logits, probs, gates, top1)
    return gates_and_aux


def test_gshard_eval_keeps_both_experts():
    torch.manual_seed(0)
    layer = layer_with(GShardRouter(6, 5, w_importance=0.1, w_z=1e-3)).eval()
    with torch.no_grad():
        layer.router.w_gate.normal_()
    check_against_reference(layer, torch.randn(30, 6), gate_reference(gshard_gates()))
    out = layer.router(torch.randn(10, 6))
    torch.testing.assert_close(out.combine_weights.sum(-1), torch.ones(10))
    assert out.valid is None


def test_gshard_training_keeps_the_second_expert_iff_2g2_exceeds_uniform():
    torch.manual_seed(0)
    layer = layer_with(GShardRouter(6, 5))
    with torch.no_grad():
        layer.router.w_gate.normal_()
    x = torch.randn(60, 6)
    torch.manual_seed(3)
    uniform = torch.rand(60)
    check_against_reference(layer, x, gate_reference(gshard_gates(uniform)), seed=3)
    torch.manual_seed(3)
    out = layer.router(x)
    skipped = ~out.valid[:, 1]
    assert out.valid[:, 0].all() and 0 < int(skipped.sum()) < 60
    # pairs skipped are not computed
    assert layer.stats.tokens_per_expert.sum() == 60 + int(out.valid[:, 1].sum())


def test_second_expert_frequency_is_2g2():
    torch.manual_seed(0)
    router = GShardRouter(4, 3)
    x = torch.randn(1, 4).expand(20000, 4)
    out = router(x)
    g2 = out.combine_weights[0, 1].item()
    assert out.valid[:, 1].float().mean().item() == pytest.approx(2 * g2, abs=0.015)
    router.random_second_eval = True
    assert not router.eval()(x).valid[:, 1].all()


def test_gradient_and_arguments():
    torch.manual_seed(0)
    assert_router_gets_gradient(layer_with(GShardRouter(6, 4)), torch.randn(30, 6))
    with pytest.raises(ValueError, match="num_experts must be >= 2 for top-2 gating, got 1"):
        GShardRouter(4, 1)


def test_random_second_eval_is_checked():
    with pytest.raises(TypeError, match="random_second_eval must be a bool, got str 'no'"):
        GShardRouter(4, 2, random_second_eval="no")
