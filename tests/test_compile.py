"""The MoE layer under ``torch.compile(fullgraph=True, dynamic=True)``: one graph, no graph
break, no recompilation across token counts, outputs and gradients equal to eager.

The graphs run on the ``aot_eager`` backend (dynamo's trace and AOT autograd's forward and
backward graphs, run op by op: fast to build, and exactly eager's arithmetic); one test on
inductor is marked slow. The token dimension is marked unbacked, so that 1 (which a backed
dynamic size specialises) shares the graph of every other count.
"""

from __future__ import annotations

import pytest
import torch
from helpers import randomise_gates
from torch._dynamo.decorators import mark_unbacked
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from sparsemoe import Capacity, FeedForwardExperts, MoE, MoELayer
from sparsemoe.routers import GShardRouter, SwitchRouter, TopKRouter

D, N, H = 8, 4, 16
TOKEN_COUNTS = (1, 2, 7, 64, 1000, 8192)


def _layer(kind: str) -> MoELayer:
    """A tiny layer with the token-choice router ``kind`` (capacity where the method has one)."""
    torch.manual_seed(0)
    if kind == "noisy_top_k":
        layer = MoE(D, N, 2, H)
    elif kind == "noisy_top_k_capacity":
        layer = MoE(D, N, 2, H, capacity=Capacity(factor=1.0, policy="priority"))
    else:
        router, capacity = {
            "top_k": (TopKRouter(D, N, 2), None),
            "switch": (SwitchRouter(D, N), Capacity(factor=1.0)),
            "gshard": (GShardRouter(D, N), Capacity(factor=0.5)),
        }[kind]
        layer = MoELayer(router, FeedForwardExperts(N, D, H, bias=True), capacity=capacity)
    randomise_gates(layer, 1)
    return layer


def _step(layer, x, seed, unbacked=False):
    """Forward and backward of ``layer`` at ``x`` (the randomness of noise, jitter and
    GShard's second expert drawn from ``seed``; the token count ``unbacked`` for the
    compiler): output, input and parameter gradients."""
    module = getattr(layer, "_orig_mod", layer)  # the module a compiled one wraps
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    if unbacked:
        mark_unbacked(x, 0)
    torch.manual_seed(seed)
    y = layer(x)
    (y.square().sum() + module.aux_loss).backward()
    return y, x.grad, {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["noisy_top_k", "noisy_top_k_capacity", "top_k", "switch",
                                  "gshard"])
def test_one_graph_for_every_token_count_equal_to_eager(kind):
    torch._dynamo.reset()
    counters.clear()
    layer = _layer(kind)
    eager = _layer(kind)
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend=backend)
    compiles = None
    dropped = 0.0
    for i, tokens in enumerate(TOKEN_COUNTS):
        x = torch.randn(tokens, D)
        got = _step(compiled, x, seed=i, unbacked=True)
        want = _step(eager, x, seed=i)
        if compiles is None:
            compiles = backend.frame_count
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
        assert got[2].keys() == want[2].keys()
        for name in want[2]:
            torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-5, atol=1e-6)
        # statistics are tensors of the graph, read here
        assert torch.equal(layer.stats.tokens_per_expert, eager.stats.tokens_per_expert)
        assert layer.stats.drop_fraction == eager.stats.drop_fraction
        dropped += layer.stats.drop_fraction
    assert backend.frame_count == compiles, "recompiled for another token count"
    assert not counters["graph_break"], dict(counters["graph_break"])
    if kind != "noisy_top_k" and kind != "top_k":
        assert dropped > 0  # the masked pairs were exercised


def test_backed_dynamic_sizes_recompile_only_for_one_token():
    """Without marking, torch specialises a size of 1: one graph for 1 token, one for all
    other counts."""
    torch._dynamo.reset()
    layer = _layer("top_k")
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend=backend)
    _step(compiled, torch.randn(2, D), seed=0)
    compiles = backend.frame_count
    for tokens in TOKEN_COUNTS[2:]:
        _step(compiled, torch.randn(tokens, D), seed=0)
    assert backend.frame_count == compiles


def test_explicit_impls_compile_without_graph_breaks():
    torch._dynamo.reset()
    for impl in ("grouped_mm", "few_rows", "loop"):
        layer = _layer("top_k")
        layer.experts.impl = impl
        eager = _layer("top_k")
        eager.experts.impl = impl
        compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
        x = torch.randn(50, D)
        got, want = _step(compiled, x, 0), _step(eager, x, 0)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        for name in want[2]:
            torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_inductor_equals_eager():
    from torch._inductor.exc import InductorError

    torch._dynamo.reset()
    layer, eager = _layer("noisy_top_k_capacity").eval(), _layer("noisy_top_k_capacity").eval()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for tokens in (3, 300):
        x = torch.randn(tokens, D)
        try:
            got = _step(compiled, x, 0)
        except InductorError as e:  # e.g. no working C++ compiler on this platform
            pytest.skip(f"torch.compile's backend is unavailable here: {e}")
        want = _step(eager, x, 0)
        torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
        for name in want[2]:
            torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-4, atol=1e-5)


def test_compiled_weight_gradients_reuse_the_banks_memory():
    """The compiled weight-gradient operator writes into the bank's GradientBuffers (no fresh
    allocation per step); a deep copy uses its own pools."""
    import copy

    torch._dynamo.reset()
    for layer in (_layer("top_k"), copy.deepcopy(_layer("top_k"))):
        compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
        x = torch.randn(300, D)
        _step(compiled, x, 0)
        first = layer.experts.w1.grad.data_ptr()
        _step(compiled, x, 0)  # zero_grad(set_to_none=True) freed the first gradient
        assert layer.experts.w1.grad.data_ptr() == first
        assert layer.experts.grad_buffers["w1"].nbytes == layer.experts.w1.numel() * 4
