"""Test helpers shared by the layer and router tests: float64 copies of a layer's parameters and
the check that a float32 layer equals a float64 reference in its output, auxiliary loss and every
gradient."""

import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch
from reference import dense_moe, ffn_expert

from sparsemoe import FeedForwardExperts, MoELayer
from sparsemoe.data import FetchError


def randomise_gates(layer, seed):
    """Zero-initialised gates tie every logit; tests need a definite top-k."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.router.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "noise" in name else 1.0))


def reference_experts(layer, p):
    """Each expert of ``layer`` as a float64 function of the parameter copies ``p``."""
    get = lambda name, e: None if f"experts.{name}" not in p else p[f"experts.{name}"][e]  # noqa: E731
    return [
        (lambda x, e=e: ffn_expert(x, get("w1", e), get("b1", e), get("w2", e), get("b2", e),
                                   layer.experts.activation))
        for e in range(layer.num_experts)
    ]


def float64_params(layer):
    return {name: p.detach().double().requires_grad_(True) for name, p in layer.named_parameters()}


def check_against_reference(layer, x, reference, noise_shape=None, seed=0, **forward_kwargs):
    """Forward and every gradient of ``layer`` (float32) equal the float64 reference.

    ``reference(layer, p, x64 [T, d], noise) -> (y [T, d], aux)``; ``forward_kwargs`` go to the
    layer (``token_ids`` for hash routing)."""
    torch.manual_seed(seed)
    x = x.requires_grad_(True)
    y = layer(x, **forward_kwargs)
    noise = None
    if noise_shape is not None:
        torch.manual_seed(seed)  # the same draws the layer made
        noise = torch.randn(*noise_shape).double()
    p = float64_params(layer)
    x64 = x.detach().double().requires_grad_(True)
    y_ref, aux_ref = reference(layer, p, x64.reshape(-1, layer.d_model), noise)
    y_ref = y_ref.reshape(x.shape)
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.aux_loss, aux_ref.float(), rtol=1e-5, atol=1e-6)

    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1))
    loss = (y * probe).sum() + layer.aux_loss
    names = [n for n, _ in layer.named_parameters()]
    grads = torch.autograd.grad(loss, [x, *layer.parameters()], allow_unused=True,
                                materialize_grads=True)
    loss_ref = (y_ref * probe.double()).sum() + aux_ref
    ref_grads = torch.autograd.grad(loss_ref, [x64, *p.values()], allow_unused=True,
                                    materialize_grads=True)
    for name, g, rg in zip(["x", *names], grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg.float(), rtol=1e-5, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")


def layer_with(router, hidden=6, activation="relu", **options):
    """An MoELayer of ``router`` over feed-forward experts."""
    bank = FeedForwardExperts(router.num_experts, router.d_model, hidden, activation=activation)
    return MoELayer(router, bank, **options)


def router_logits(p, x):
    """x·W_g (+ b) from float64 parameter copies."""
    logits = x @ p["router.w_gate"]
    return logits + p["router.b_gate"] if "router.b_gate" in p else logits


def gate_reference(gates_and_aux):
    """A reference for :func:`check_against_reference` built from a function
    ``(layer, p, x) -> (gates [T, n], aux)``: y = Σ_i gates_i E_i(x), every expert on every
    token."""

    def reference(layer, p, x, noise):
        gates, aux = gates_and_aux(layer, p, x)
        return dense_moe(x, gates, reference_experts(layer, p)), aux

    return reference


def assert_router_gets_gradient(layer, x, **forward_kwargs):
    """A training step's loss reaches every router parameter."""
    layer.zero_grad()
    y = layer(x, **forward_kwargs)
    (y.square().mean() + layer.aux_loss).backward()
    for name, param in layer.router.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def fetched_or_skip(load):
    """``load()`` of a data set fetched on first use, or skip the test when there is neither a
    network nor a cached copy."""
    try:
        return load()
    except FetchError as e:
        pytest.skip(f"no network and no cached copy: {e}")


def tiny_config(corpus_file, out, **kw):
    """A 4-expert LM small enough to train a few steps in a test."""
    from sparsemoe.experiments.lm import LMTrainConfig

    return LMTrainConfig(corpus=(corpus_file,), vocab_size=None, preset=None,
                         model={"num_experts": 4, "k": 2, "hidden": 16, "d_model": 8},
                         batch_size=4, bptt=5, steps=6, eval_every=2, eval_tokens=200,
                         warmup=3, out=str(out), **kw)


def join_within(ctx, timeout: float, what: str) -> None:
    """Wait for the processes of ``ctx`` (``torch.multiprocessing.start_processes(...,
    join=False)``); past ``timeout`` seconds kill them and fail the test (a guard against a
    hang: ranks on a loaded 2-core machine start slowly)."""
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{what} did not finish within {timeout:.0f} s")


BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def load_benchmark(name: str):
    """The script ``benchmarks/{name}.py`` as a module, registered under ``name`` (a script
    that imports another by name, as it would run, finds it)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
