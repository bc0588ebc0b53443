"""Decode-sized batches (``T·k ≤ n``): ``grouped_matmul(impl="auto")`` multiplies each expert
hit by its own BLAS product (:func:`sparsemoe.dispatch.decode_sized`); the dispatch through
it must equal a float64 loop over tokens written from the definition, and the grouped kernel's
path, in the output and every gradient (a training step of a few tokens included)."""

import pytest
import torch
from reference import ffn_expert

from sparsemoe import FeedForwardExperts, dispatch, few_rows
from sparsemoe.dispatch import decode_sized, dispatch_combine, grouped_matmul


def test_the_rule_one_row_per_expert_through_a_wide_contiguous_weight(
        grouped_matmul_impls):
    impls = grouped_matmul_impls
    n, p, q = 8, 16, dispatch.DECODE_MIN_COLUMNS
    w = torch.randn(n, p, q)
    for rows, weight, want in [
        (n, w, "loop"),                                     # T·k = n
        (n + 1, w, "few_rows"),                             # more rows than experts
        (n, torch.randn(n, p, q - 1), "few_rows"),          # narrower than DECODE_MIN_COLUMNS
        (n, torch.randn(n, q, p).transpose(1, 2), "few_rows"),  # transformers' layout, as wide
    ]:
        x = torch.randn(rows, weight.shape[1])
        counts = torch.bincount(torch.arange(rows) % n, minlength=n)
        assert decode_sized(x, weight) == (want == "loop")
        if few_rows.library() is None and want == "few_rows":
            continue
        impls.clear()
        torch.testing.assert_close(grouped_matmul(x, weight, counts),
                                   grouped_matmul(x, weight, counts, "loop"))
        assert impls[0] == want


def _reference(bank, x, index, weights):
    """``y_t = Σ_j weights[t, j] · E_{index[t, j]}(x_t)`` token by token in float64."""
    p = {name: t.double() for name, t in bank.named_parameters()}
    rows = []
    for t in range(x.shape[0]):
        y = 0
        for j in range(index.shape[1]):
            e = int(index[t, j])
            b1, b2 = (p["b1"][e], p["b2"][e]) if "b1" in p else (None, None)
            y = y + weights[t, j] * ffn_expert(x[t], p["w1"][e], b1, p["w2"][e], b2,
                                               bank.activation)
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "relu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("tokens", [1, 4])
@pytest.mark.parametrize("reuse_grad_memory", [True, False])
def test_decode_path_equals_the_definition_and_the_grouped_path(
        activation, bias, k, tokens, reuse_grad_memory, grouped_matmul_impls, monkeypatch):
    """Widths of 8 and 16 stand for a wide model: DECODE_MIN_COLUMNS is lowered so that both
    of the bank's weights take the decode path (checked), and compared with the float64
    definition and with the same bank through the grouped kernel (impl="few_rows")."""
    monkeypatch.setattr(dispatch, "DECODE_MIN_COLUMNS", 1)
    n, d, h = 12, 8, 16
    torch.manual_seed(k + 10 * tokens)
    bank = FeedForwardExperts(n, d, h, activation=activation, bias=bias,
                              reuse_grad_memory=reuse_grad_memory)
    x = torch.randn(tokens, d)
    index = torch.stack([torch.randperm(n)[:k] for _ in range(tokens)])
    index[-1, 0] = index[0, -1]  # an expert with two rows (one token: chosen twice) beside
    # experts with one
    weights = torch.rand(tokens, k)
    probe = torch.randn(tokens, d)

    def run(module, x, weights, impl):
        module.impl = impl
        module.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_()
        weights = weights.clone().requires_grad_()
        y, _ = dispatch_combine(x, index, weights, module)
        (y * probe.to(y.dtype)).sum().backward()
        return [y.detach(), x.grad, weights.grad] + [q.grad for q in module.parameters()]

    grouped_matmul_impls.clear()
    got = run(bank, x, weights, "auto")
    assert set(grouped_matmul_impls) == {"loop"}  # forward and backward of both weights
    x64, w64 = x.double().requires_grad_(), weights.double().requires_grad_()
    params = dict(bank.named_parameters())
    ref = _reference(bank, x64, index, w64)
    want = [ref.detach(), *torch.autograd.grad((ref * probe.double()).sum(),
                                               [x64, w64, *params.values()])]
    # autograd through _reference's .double() copies gives the float32 parameters' gradients
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5)
    if few_rows.library() is not None:
        grouped = run(bank, x, weights, "few_rows")
        for a, b in zip(got, grouped, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
