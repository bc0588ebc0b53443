import pytest
import torch

from sparsemoe.dispatch import combine, gather_tokens, grouped_matmul, sort_by_expert, unsort


def naive_grouped(x, w, counts):
    """Row r times the matrix of the group it falls in, one row at a time."""
    group = torch.repeat_interleave(torch.arange(len(counts)), counts)
    if len(group) == 0:
        return x @ w[0]
    return torch.stack([x[r] @ w[group[r]] for r in range(x.shape[0])])


# (8, 4) float32 rows are 16-byte aligned and run on torch's grouped_mm; (5, 3) rows are not,
# and "auto" must fall back to the loop for them.
CASES = [("grouped_mm", torch.float32, 8, 4), ("loop", torch.float32, 8, 4),
         ("loop", torch.float64, 8, 4), ("few_rows", torch.float32, 8, 4),
         ("auto", torch.float32, 8, 4), ("auto", torch.float32, 5, 3),
         ("auto", torch.float64, 5, 3)]


@pytest.mark.parametrize("impl,dtype,p,q", CASES)
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 0, 0], [0, 7, 0, 0], [1, 1, 1, 1]])
@pytest.mark.parametrize("masked", [0, 3])
def test_grouped_matmul_matches_rowwise(impl, dtype, p, q, counts, masked):
    """Block rows as the row-by-row product; ``masked`` rows after the blocks (masked pairs)
    are 0 and pass no gradient, whatever the kernel leaves in its memory."""
    torch.manual_seed(0)
    counts = torch.tensor(counts)
    computed = int(counts.sum())
    x = torch.randn(computed + masked, p, dtype=dtype, requires_grad=True)
    w = torch.randn(4, p, q, dtype=dtype, requires_grad=True)
    out = grouped_matmul(x, w, counts, impl)
    ref = torch.cat([naive_grouped(x[:computed], w, counts), x.new_zeros(masked, q)])
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), g, allow_unused=True, materialize_grads=True)
    rx, rw = torch.autograd.grad(ref, (x, w), g, allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(gx, rx, rtol=tol, atol=tol)
    torch.testing.assert_close(gw, rw, rtol=tol, atol=tol)


@pytest.mark.parametrize("impl", ["loop", "grouped_mm", "few_rows", "auto"])
@pytest.mark.parametrize("compiled", [False, True])
def test_transposed_weight_gets_its_gradient_in_its_own_layout(impl, compiled):
    """``transformers`` stores its experts ``[n, out, in]`` and multiplies by the transposed
    view: the weight gradient reaches the parameter already in the storage's layout (no copy
    when it is accumulated), equal to the row-by-row reference in float64."""
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1])
    storage = torch.randn(4, 4, 8, dtype=torch.float64, requires_grad=True)  # [n, q, p]
    x = torch.randn(11, 8, dtype=torch.float64)  # 2 masked rows after the blocks
    dtype = torch.float32 if impl in ("grouped_mm", "few_rows") else torch.float64
    leaf = storage.detach().to(dtype).requires_grad_()
    arriving = []
    leaf.register_hook(lambda g: arriving.append(g))
    fn = grouped_matmul
    if compiled:
        fn = torch.compile(grouped_matmul, backend="aot_eager", fullgraph=True)
    out = fn(x.to(dtype), leaf.transpose(1, 2), counts, impl)
    g = torch.randn_like(out)
    out.backward(g)
    ref = naive_grouped(x[:9], storage.transpose(1, 2), counts)
    ref.backward(g[:9].to(torch.float64))
    assert arriving[0].is_contiguous()
    torch.testing.assert_close(leaf.grad.double(), storage.grad, rtol=1e-5, atol=1e-5)


def test_grouped_matmul_rejects_unknown_impl():
    with pytest.raises(ValueError, match=r"impl must be one of .*got 'cuda_magic'"):
        grouped_matmul(torch.zeros(1, 2), torch.zeros(1, 2, 2), torch.tensor([1]), "cuda_magic")


def test_sort_by_expert_groups_pairs_stably():
    idx = torch.tensor([[2, 0], [0, 1], [2, 1]])
    r = sort_by_expert(idx, num_experts=4)
    assert r.expert_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert r.token_index.tolist() == [0, 1, 1, 2, 0, 2]
    assert r.order.tolist() == [1, 2, 3, 5, 0, 4]
    assert r.tokens_per_expert.tolist() == [2, 2, 2, 0]
    flat = idx.reshape(-1)
    assert torch.equal(unsort(r.expert_index, r), flat)


def test_combine_is_gate_weighted_sum():
    idx = torch.tensor([[2, 0], [0, 1], [2, 1]])
    w = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.1, 0.9]], dtype=torch.float64)
    r = sort_by_expert(idx, 3)
    # expert e's "output" for token t is 10*e + t
    y_sorted = (10.0 * r.expert_index + r.token_index).to(torch.float64)[:, None]
    out = combine(y_sorted, w, r)
    expected = [0.7 * 20 + 0.3 * 0, 0.5 * 1 + 0.5 * 11, 0.1 * 22 + 0.9 * 12]
    torch.testing.assert_close(out[:, 0], torch.tensor(expected, dtype=torch.float64))


def _routes(t, k, n, masked, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (t, k), generator=g)
    valid = torch.rand(t, k, generator=g) > 0.4 if masked else None
    return idx, valid, sort_by_expert(idx, n, valid)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_gather_and_combine_equal_the_dense_definition_with_gradients(k, masked):
    """The hand-written backward passes of gather_tokens and combine against autograd through
    a loop over the grid, float64, with and without masked (not computed) pairs."""
    torch.manual_seed(0)
    t, n, d = 11, 4, 5
    idx, valid, r = _routes(t, k, n, masked, seed=k)
    x = torch.randn(t, d, dtype=torch.float64, requires_grad=True)
    w = torch.rand(t, k, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(n, d, dtype=torch.float64, requires_grad=True)  # a per-expert "expert"
    out = combine(gather_tokens(x, r, k) * scale[r.expert_index], w, r)
    ref = torch.stack([
        sum((w[i, j] * x[i] * scale[idx[i, j]] for j in range(k)
             if valid is None or valid[i, j]), torch.zeros(d, dtype=torch.float64))
        for i in range(t)])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn(t, d, dtype=torch.float64)
    got = torch.autograd.grad(out, (x, w, scale), g)
    want = torch.autograd.grad(ref, (x, w, scale), g, allow_unused=True, materialize_grads=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("masked", [False, True])
def test_gather_and_combine_pass_gradcheck_and_gradgradcheck(masked):
    torch.manual_seed(1)
    t, k, n, d = 6, 2, 3, 4
    _, _, r = _routes(t, k, n, masked, seed=5)
    x = torch.randn(t, d, dtype=torch.float64, requires_grad=True)
    w = torch.rand(t, k, dtype=torch.float64, requires_grad=True)

    def f(x, w):
        rows = gather_tokens(x, r, k)
        return combine(rows * rows, w, r)

    assert torch.autograd.gradcheck(f, (x, w))
    assert torch.autograd.gradgradcheck(f, (x, w))


def test_combine_with_every_pair_masked_returns_zeros():
    idx = torch.zeros(3, 2, dtype=torch.long)
    r = sort_by_expert(idx, 2, torch.zeros(3, 2, dtype=torch.bool))
    # the rows of masked pairs are not computed; whatever finite values they hold count 0
    out = combine(torch.randn(6, 4), torch.ones(3, 2), r)
    assert torch.equal(out, torch.zeros(3, 4))


def test_routes_is_a_deprecated_name_of_sorted_pairs():
    import sparsemoe.dispatch as D

    with pytest.warns(DeprecationWarning, match="use sparsemoe.dispatch.SortedPairs"):
        assert D.Routes is D.SortedPairs
