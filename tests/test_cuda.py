"""The same layers on CUDA equal the CPU layers with the same weights (skipped without a GPU)."""

import pytest
import torch

import sparsemoe
from sparsemoe.dispatch import _grouped_mm_supported, grouped_matmul

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_matmul_on_cuda_matches_loop(dtype):
    torch.manual_seed(0)
    counts = torch.tensor([5, 0, 17, 3, 0, 9], device="cuda")
    x = torch.randn(int(counts.sum()), 64, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(6, 64, 32, device="cuda", dtype=dtype, requires_grad=True)
    fast = grouped_matmul(x, w, counts, "auto")
    slow = grouped_matmul(x, w, counts, "loop")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fast, slow, rtol=tol, atol=tol)
    g = torch.randn_like(fast)
    for a, b in zip(torch.autograd.grad(fast, (x, w), g), torch.autograd.grad(slow, (x, w), g),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * 10)


@cuda
def test_bfloat16_uses_grouped_mm_on_sm80():
    x = torch.zeros(4, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.zeros(2, 64, 32, device="cuda", dtype=torch.bfloat16)
    expected = torch.cuda.get_device_capability() >= (8, 0)
    assert _grouped_mm_supported(x, w) == expected


@cuda
@pytest.mark.parametrize("hierarchical", [False, True])
def test_layer_on_cuda_equals_cpu(hierarchical):
    torch.manual_seed(0)
    if hierarchical:
        layer = sparsemoe.HierarchicalMoE(64, 4, 4, 2, 2, hidden=128).eval()
    else:
        layer = sparsemoe.MoE(64, 16, 2, 128).eval()
    with torch.no_grad():
        for p in layer.router.parameters():
            p.normal_()
    x = torch.randn(3, 40, 64)
    cpu_out = layer(x)
    cpu_out.sum().backward()
    params = [p for p in layer.parameters() if p.grad is not None]  # W_noise unused in eval
    cpu_grads = [p.grad.clone() for p in params]
    layer.zero_grad()
    layer.cuda()
    out = layer(x.cuda())
    out.sum().backward()
    torch.testing.assert_close(out.cpu(), cpu_out, rtol=1e-4, atol=1e-4)
    for p, g in zip(params, cpu_grads, strict=True):
        torch.testing.assert_close(p.grad.cpu(), g, rtol=1e-3, atol=1e-3)


@cuda
def test_bfloat16_autocast_and_compile_on_cuda():
    torch.manual_seed(0)
    layer = sparsemoe.MoE(128, 8, 2, 256).cuda()
    x = torch.randn(512, 128, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
        loss = y.float().square().mean() + layer.aux_loss
    loss.backward()
    assert y.dtype == torch.bfloat16 and torch.isfinite(layer.experts.w1.grad).all()
    compiled = torch.compile(layer.eval())
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-4, atol=1e-4)


@cuda
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("kind", ["noisy_top_k_capacity", "switch", "gshard"])
def test_training_step_has_no_host_synchronisation(kind, autocast):
    """Forward, backward and an optimiser step with the token-choice routers, capacity
    included, under ``set_sync_debug_mode("error")``: any host synchronisation raises."""
    torch.manual_seed(0)
    router = {"noisy_top_k_capacity": sparsemoe.routers.NoisyTopKRouter(64, 8, 2),
              "switch": sparsemoe.routers.SwitchRouter(64, 8),
              "gshard": sparsemoe.routers.GShardRouter(64, 8)}[kind]
    layer = sparsemoe.MoELayer(router, sparsemoe.FeedForwardExperts(8, 64, 128, bias=True),
                               capacity=sparsemoe.Capacity(factor=0.5)).cuda()
    with torch.no_grad():
        for p in layer.router.parameters():
            p.normal_()
    opt = torch.optim.SGD(layer.parameters(), lr=1e-3)
    x = torch.randn(4, 256, 64, device="cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)
            loss = y.float().square().mean() + layer.aux_loss
        loss.backward()
        opt.step()

    step()  # warm-up: kernels loaded, allocator primed
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert layer.stats.drop_fraction > 0  # read after the step: the statistics sync here
