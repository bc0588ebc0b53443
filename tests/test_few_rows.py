"""The few-row CPU grouped GEMM (sparsemoe.few_rows) against a float64 loop, gradcheck, and
its fallback when it cannot be built."""

import warnings

import pytest
import torch

from sparsemoe import FeedForwardExperts, few_rows
from sparsemoe.dispatch import equal_routes, grouped_matmul
from sparsemoe.memory import GradientBuffers

pytestmark = pytest.mark.skipif(few_rows.library() is None,
                                reason="the few-row kernel could not be built here")


def loop_reference(x, w, counts):
    """Float64 products of each expert's block, one matmul per expert."""
    x, w = x.double(), w.double()
    blocks = [xe @ we for xe, we in zip(x.split(counts.tolist()), w.unbind(0), strict=True)]
    return torch.cat(blocks)


def products(x, w, counts, dy, impl, buffers=None):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    y = grouped_matmul(x, w, counts, impl, buffers)
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    return y, gx, gw


# Shapes that exercise every path of the kernel: widths that are not a multiple of a vector,
# more than one 6-row tile per expert, more than one column block (128) and row block (48).
SHAPES = [(5, 3), (16, 32), (37, 70), (64, 160), (100, 131)]
COUNTS = [[3, 0, 7, 1, 13, 2], [0, 0, 0, 0, 0, 0], [0, 20, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]]
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p,q", SHAPES)
@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed-view"])
def test_products_match_float64_loop(dtype, p, q, counts, transposed):
    torch.manual_seed(0)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), p).to(dtype)
    w = (torch.randn(len(counts), q, p).transpose(1, 2) if transposed
         else torch.randn(len(counts), p, q)).to(dtype)
    dy = torch.randn(x.shape[0], q).to(dtype)
    y, gx, gw = products(x, w, counts, dy, "few_rows")
    assert y.dtype == gx.dtype == gw.dtype == dtype
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    yr = loop_reference(xr, wr, counts)
    rx, rw = torch.autograd.grad(yr, (xr, wr), dy.double())
    tol = TOLERANCE[dtype]
    for got, want in ((y, yr.detach()), (gx, rx), (gw, rw)):
        scale = max(float(want.abs().amax()) if want.numel() else 0.0, 1.0)  # the largest entry
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * scale)


def test_transposed_view_is_read_in_place(monkeypatch):
    """transformers stores expert weights ``[n, out, in]``: their ``[n, in, out]`` view reaches
    the kernel as its own storage in the forward and input-gradient products, not as a copy
    (the values of all three products are checked by test_products_match_float64_loop)."""
    storage = torch.randn(4, 24, 16, requires_grad=True)  # [n, q, p]
    x = torch.randn(6, 16, requires_grad=True)
    seen = []
    call = few_rows._call

    def spy(name, a, b, *rest):
        seen.append((name, b.data_ptr()))
        return call(name, a, b, *rest)

    monkeypatch.setattr(few_rows, "_call", spy)
    y = grouped_matmul(x, storage.transpose(1, 2), torch.tensor([2, 0, 3, 1]), "few_rows")
    y.backward(torch.randn_like(y))
    assert [name for name, _ in seen] == ["smoe_input_grad", "smoe_forward", "smoe_weight_grad"]
    assert seen[0][1] == seen[1][1] == storage.data_ptr()
    assert storage.grad.shape == storage.shape


def test_gradcheck_and_gradgradcheck():
    torch.manual_seed(0)
    counts = torch.tensor([2, 0, 9, 1])
    x = torch.randn(12, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 7, 19, dtype=torch.float64, requires_grad=True)

    def fn(x, w):
        return grouped_matmul(x, w, counts, "few_rows")

    assert torch.autograd.gradcheck(fn, (x, w))
    assert torch.autograd.gradgradcheck(fn, (x, w))


def test_reused_gradient_memory_gives_the_same_gradients():
    torch.manual_seed(0)
    counts = torch.tensor([5, 0, 3, 8])
    x, w, dy = torch.randn(16, 24), torch.randn(4, 24, 40), torch.randn(16, 40)
    buffers = GradientBuffers()
    _, gx, gw = products(x, w, counts, dy, "few_rows", buffers)
    _, rx, rw = products(x, w, counts, dy, "loop")
    torch.testing.assert_close(gx, rx, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(gw, rw, rtol=2e-6, atol=2e-6)
    assert buffers.nbytes == gw.nbytes  # written into the pool's memory


def test_threads_do_not_change_the_result():
    torch.manual_seed(0)
    counts = torch.tensor([3, 30, 0, 7] * 8)
    x, w = torch.randn(int(counts.sum()), 64), torch.randn(32, 64, 256)
    dy = torch.randn(x.shape[0], 256)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append((few_rows.forward(x, w, counts), few_rows.input_grad(dy, w, counts),
                            few_rows.weight_grad(x, dy, counts)))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p,q", [(24, 48), (37, 70)])
def test_streamed_weight_grad(monkeypatch, dtype, p, q):
    """A weight gradient of at least STREAM_BYTES is written with non-temporal stores where
    its memory is aligned for them and with plain stores elsewhere: the same values either way,
    and an output one element off alignment (every vector store falls back) too."""
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 9, 1, 7])
    x, dy = torch.randn(20, p).to(dtype), torch.randn(20, q).to(dtype)
    cached = few_rows.weight_grad(x, dy, counts)
    xr = x.double().requires_grad_()
    w = torch.zeros(len(counts), p, q, dtype=torch.float64, requires_grad=True)
    (want,) = torch.autograd.grad(loop_reference(xr, w, counts), w, dy.double())
    torch.testing.assert_close(cached.double(), want, rtol=TOLERANCE[dtype],
                               atol=TOLERANCE[dtype] * float(want.abs().amax()))
    monkeypatch.setattr(few_rows, "STREAM_BYTES", 0)
    for offset in (0, 1):
        storage = torch.full((offset + cached.numel(),), float("nan"), dtype=dtype)
        out = storage[offset:].view(cached.shape)
        assert (out.data_ptr() % 32 == 0) == (offset == 0)
        few_rows.weight_grad(x, dy, counts, out)
        assert torch.equal(out, cached)  # the expert without rows: zeros, not the NaNs there


def _products_on_kernel(monkeypatch, x, w, rows_per_expert):
    """Which of forward, input gradient and weight gradient ``impl="auto"`` runs on the
    kernel for ``x·w`` with ``rows_per_expert`` rows for each of ``w``'s experts."""
    seen = set()
    for name in ("forward", "input_grad", "weight_grad"):
        real = getattr(few_rows, name)
        monkeypatch.setattr(few_rows, name, lambda *a, _n=name, _f=real: seen.add(_n) or _f(*a))
    x = x.requires_grad_()
    w = w.detach().requires_grad_()
    counts = torch.full((w.shape[0],), rows_per_expert)
    grouped_matmul(x, w, counts, "auto").sum().backward()
    monkeypatch.undo()
    return seen


@pytest.mark.parametrize("layout", ["contiguous", "transposed-view"])
def test_auto_uses_the_kernel_for_few_rows_only(monkeypatch, layout):
    """Each product takes the kernel up to its form's limit: the register tiles (``x·W``) to
    MAX_ROWS_PER_EXPERT rows, the dot products (``x·Wᵀ`` of a contiguous W: the input gradient
    here, the forward through transformers' transposed view) to MAX_ROWS_PER_EXPERT_DOT; the
    weight gradient follows the forward."""
    torch.manual_seed(0)
    w = (torch.randn(8, 16, 32) if layout == "contiguous"
         else torch.randn(8, 32, 16).transpose(1, 2))
    tiles, dots = few_rows.MAX_ROWS_PER_EXPERT, few_rows.MAX_ROWS_PER_EXPERT_DOT
    forward = {"forward", "weight_grad"}
    if layout == "contiguous":
        expected = {dots: forward | {"input_grad"}, dots + 1: forward, tiles: forward,
                    tiles + 1: set()}
    else:
        expected = {dots: forward | {"input_grad"}, dots + 1: {"input_grad"},
                    tiles: {"input_grad"}, tiles + 1: set()}
    for rows, on_kernel in expected.items():
        assert _products_on_kernel(monkeypatch, torch.randn(8 * rows, 16), w, rows) == on_kernel
    float64 = _products_on_kernel(monkeypatch, torch.randn(16, 16, dtype=torch.float64),
                                  w.double(), 2)
    assert float64 == set()  # float64 keeps the loop's BLAS products


def _calls(monkeypatch):
    """Count the kernel's forward calls."""
    calls = []
    forward = few_rows.forward
    monkeypatch.setattr(few_rows, "forward", lambda *a: calls.append(1) or forward(*a))
    return calls


def test_expert_bank_runs_on_the_kernel(monkeypatch):
    calls = _calls(monkeypatch)
    torch.manual_seed(0)
    bank = FeedForwardExperts(4, 8, 16)
    reference = FeedForwardExperts(4, 8, 16, impl="loop")
    reference.load_state_dict(bank.state_dict())
    x = torch.randn(12, 8)
    routes = equal_routes(4, 3)
    torch.testing.assert_close(bank(x, routes), reference(x, routes), rtol=1e-6, atol=1e-6)
    assert len(calls) == 2  # both of the bank's matrices


def test_build_failure_falls_back_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SPARSEMOE_CACHE", str(tmp_path))
    monkeypatch.setattr(few_rows, "_state", {})
    torch.manual_seed(0)
    counts = torch.tensor([2, 2, 2, 2])
    x, w, dy = torch.randn(8, 16), torch.randn(4, 16, 32), torch.randn(8, 32)
    with pytest.warns(RuntimeWarning, match="could not be built.*using torch's grouped GEMM"):
        y, gx, gw = products(x, w, counts, dy, "auto")
    yr, rx, rw = products(x, w, counts, dy, "grouped_mm")
    assert torch.equal(y, yr) and torch.equal(gx, rx) and torch.equal(gw, rw)
    with pytest.raises(RuntimeError, match="impl='few_rows' needs the few-row kernel"):
        grouped_matmul(x, w, counts, "few_rows")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the failure is remembered
        grouped_matmul(x, w, counts, "auto")


def test_rejects_unsupported_dtype():
    x, w = torch.zeros(2, 16, dtype=torch.float16), torch.zeros(1, 16, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"needs CPU tensors .*got x torch.float16 on cpu"):
        grouped_matmul(x, w, torch.tensor([2]), "few_rows")
