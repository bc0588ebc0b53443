"""A grouped GEMM for few rows per expert on a CPU (``grouped_matmul(..., impl="few_rows")``).

torch's CPU ``grouped_mm`` hands each expert's product to the BLAS in turn; with 2–64 rows per
expert the BLAS packs each expert's weight matrix for a product it then barely uses, and runs
far below the machine's speed. This kernel (``csrc/few_rows_gemm.cpp``, C++ with OpenMP) reads
each weight matrix in place, once per tile of up to six rows, many experts per call and the
experts spread over the threads:

- forward ``y_e = X_e · W_e``,
- input gradient ``dX_e = dY_e · W_eᵀ``,
- weight gradient ``dW_e = X_eᵀ · dY_e`` (zero for an expert without rows),

float32 and bfloat16 (accumulated in float32) and float64 (for gradient checks), on
``torch.get_num_threads()`` threads. A weight given as the transposed view of a contiguous
tensor (transformers' ``[n, out, in]`` experts) is read in place: ``X·W`` is then the
input-gradient product of its storage and ``dY·Wᵀ`` the forward one. The library links
``libgomp.so.1``, which in a process that has imported torch is torch's own OpenMP runtime:
one thread pool for both.

The source ships in the package and is compiled on first use with the system's C++ compiler
(``$CXX``, else ``c++``) into ``cache_dir()/kernels``, keyed by the source, the flags and the
CPU, then loaded with :mod:`ctypes`. Where the build fails, :func:`library` warns once and
returns None, and ``impl="auto"`` keeps torch's grouped GEMM.

When ``impl="auto"`` picks it (:func:`preferred`): measured on 2 AMD EPYC cores (AVX2) against
torch 2.13's CPU ``grouped_mm`` (BENCHMARKS.md, "The few-row kernel"), forward + both gradients
of one weight.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

from .data.fetch import cache_dir

SOURCE = Path(__file__).with_name("csrc") / "few_rows_gemm.cpp"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float64: 2}

MAX_ROWS_PER_EXPERT = 32
"""``impl="auto"`` uses the kernel's register-tile form (``x·W`` through a contiguous weight)
where the experts get at most this many rows on average."""

STREAM_BYTES = 32 << 20
"""A weight gradient of at least this many bytes is written with non-temporal stores (past the
caches, without first reading the lines it overwrites): 2.1–2.8× faster at 2–4 rows per
expert, where the weight gradient is nothing but that write (BENCHMARKS.md); a smaller one stays
in the cache for the optimiser."""

MAX_ROWS_PER_EXPERT_DOT = 8
""":data:`MAX_ROWS_PER_EXPERT` for the kernel's dot-product form (``x·Wᵀ`` through a contiguous
weight: the input gradient of a contiguous weight, and the forward of a transposed view,
transformers' experts), which torch's grouped GEMM overtakes sooner: at 16 rows the kernel
takes 0.86–1.34 of its time, at 32–128 rows 1.15–1.8 (``benchmarks/few_rows_gemm.py``, both
``--layout``s)."""

_state: dict[str, ctypes.CDLL | None] = {}


def _cpu_id() -> str:
    """The CPU's model and feature flags (``-march=native`` code runs only on such a CPU)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return "\n".join(dict.fromkeys(s for s in lines if s.startswith(("model name", "flags"))))


def _build(compiler: str) -> Path:
    """Compile the source into the cache (atomically: concurrent builds do not collide)."""
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, *FLAGS, _cpu_id()]).encode())
    target = cache_dir() / "kernels" / f"few_rows_gemm-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], check=True,
                       capture_output=True, text=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on the first call; None (with one warning) if it cannot be."""
    if "lib" not in _state:
        compiler = os.environ.get("CXX", "c++")
        try:
            lib = ctypes.CDLL(str(_build(compiler)))
        except (OSError, subprocess.CalledProcessError) as err:
            detail = getattr(err, "stderr", None) or str(err)
            warnings.warn(f"sparsemoe: the few-row CPU grouped GEMM could not be built with "
                          f"{compiler!r} ({detail.strip()[-500:]}); using torch's grouped GEMM "
                          f"instead", RuntimeWarning, stacklevel=3)
            lib = None
        else:
            args = [ctypes.c_int, *[ctypes.c_void_p] * 4, *[ctypes.c_int64] * 3, ctypes.c_int]
            for name in ("smoe_forward", "smoe_input_grad", "smoe_weight_grad"):
                getattr(lib, name).argtypes = args + [ctypes.c_int] * (name == "smoe_weight_grad")
                getattr(lib, name).restype = ctypes.c_int
        _state["lib"] = lib
    return _state["lib"]


def supported(x: Tensor, w: Tensor) -> bool:
    """The kernel runs ``x``, ``w``: CPU tensors of one of its dtypes."""
    return x.device.type == "cpu" and w.device.type == "cpu" and x.dtype in DTYPES \
        and w.dtype == x.dtype


def dot_form(w: Tensor, transpose: bool) -> bool:
    """The kernel computes ``x·w[e]`` (``x·w[e]ᵀ`` if ``transpose``) in its dot-product form:
    ``x·Wᵀ`` of a contiguous ``W`` (see :func:`forward`, :func:`input_grad`)."""
    return transposed_view(w) != transpose


def preferred(rows: int, num_experts: int, dot: bool = False) -> bool:
    """``impl="auto"``'s rule: the kernel where the experts average few rows (see module doc):
    at most :data:`MAX_ROWS_PER_EXPERT`, or :data:`MAX_ROWS_PER_EXPERT_DOT` for a product in
    the dot-product form (:func:`dot_form`)."""
    limit = MAX_ROWS_PER_EXPERT_DOT if dot else MAX_ROWS_PER_EXPERT
    return rows <= limit * num_experts


def _call(name: str, a: Tensor, b: Tensor, out: Tensor, counts: Tensor, p: int, q: int,
          *extra: int) -> Tensor:
    lib = library()
    if lib is None:
        raise RuntimeError("impl='few_rows' needs the few-row kernel, which could not be built "
                           "(see the warning above); use impl='grouped_mm' or 'loop'")
    status = getattr(lib, name)(DTYPES[out.dtype], a.data_ptr(), b.data_ptr(), out.data_ptr(),
                                counts.data_ptr(), counts.numel(), p, q, torch.get_num_threads(),
                                *extra)
    if status:
        raise TypeError(f"the few-row kernel got dtype {out.dtype}; expected one of "
                        f"{tuple(DTYPES)}")
    return out


def _counts(tokens_per_expert: Tensor) -> Tensor:
    return tokens_per_expert.to(device="cpu", dtype=torch.int64).contiguous()


def transposed_view(w: Tensor) -> bool:
    """``w [n, p, q]`` is ``W.transpose(1, 2)`` of a contiguous ``W [n, q, p]`` (how
    ``transformers`` stores its experts' ``[n, out, in]`` weights for an ``x·w`` product)."""
    return not w.is_contiguous() and w.transpose(1, 2).is_contiguous()


def _rows_times(a: Tensor, w: Tensor, tokens_per_expert: Tensor, transpose: bool) -> Tensor:
    """``a[r] · w[e(r)]`` (``a[r] · w[e(r)]ᵀ`` if ``transpose``) by the kernel.

    ``x·W`` and ``x·Wᵀ`` are the kernel's forward and input-gradient products, so a transposed
    view of a contiguous weight is read in place by the other product, never copied.
    """
    if transposed_view(w):
        w, transpose = w.transpose(1, 2), not transpose
    a, w = a.contiguous(), w.contiguous()
    out = a.new_empty(a.shape[0], w.shape[1] if transpose else w.shape[2])
    return _call("smoe_input_grad" if transpose else "smoe_forward", a, w, out,
                 _counts(tokens_per_expert), w.shape[1], w.shape[2])


@torch.compiler.disable
def forward(x: Tensor, w: Tensor, tokens_per_expert: Tensor) -> Tensor:
    """``y[r] = x[r] · w[e(r)]``. Shape: ``x [N, p]``, ``w [n, p, q]`` → ``[N, q]``.

    ``w`` contiguous or a transposed view of a contiguous tensor is read in place."""
    return _rows_times(x, w, tokens_per_expert, transpose=False)


@torch.compiler.disable
def input_grad(dy: Tensor, w: Tensor, tokens_per_expert: Tensor) -> Tensor:
    """``dx[r] = dy[r] · w[e(r)]ᵀ``. Shape: ``dy [N, q]``, ``w [n, p, q]`` → ``[N, p]``.

    ``w`` contiguous or a transposed view of a contiguous tensor is read in place."""
    return _rows_times(dy, w, tokens_per_expert, transpose=True)


@torch.compiler.disable
def weight_grad(x: Tensor, dy: Tensor, tokens_per_expert: Tensor,
                out: Tensor | None = None) -> Tensor:
    """``dw[e] = x_eᵀ · dy_e`` (zero where expert ``e`` has no rows).

    Shape: ``x [N, p]``, ``dy [N, q]``, ``tokens_per_expert [n]`` → ``[n, p, q]``, written into
    ``out`` (contiguous) when given.
    """
    x, dy = x.contiguous(), dy.contiguous()
    counts = _counts(tokens_per_expert)
    if out is None:
        out = x.new_empty(counts.numel(), x.shape[1], dy.shape[1])
    return _call("smoe_weight_grad", x, dy, out, counts, x.shape[1], dy.shape[1],
                 int(out.nbytes >= STREAM_BYTES))


class FewRowsMatmul(torch.autograd.Function):
    """``y = X_e · W_e`` per expert block through the kernel, forward and backward.

    Under ``create_graph`` the backward is built from differentiable operations (this function
    again for ``dX``, one ``mm`` per expert for ``dW``), so higher derivatives are exact too.
    """

    @staticmethod
    def forward(ctx, x, w, tokens_per_expert):  # type: ignore[override]
        ctx.save_for_backward(x, w, tokens_per_expert)
        return forward(x, w, tokens_per_expert)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, w, tokens_per_expert = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        dx = dw = None
        if torch.is_grad_enabled():
            if need_x:
                dx = FewRowsMatmul.apply(dy, w.transpose(1, 2), tokens_per_expert)
            if need_w:
                sizes = tokens_per_expert.tolist()
                rows = sum(sizes)  # the rows after them belong to masked pairs
                dw = torch.stack([xe.t() @ ge for xe, ge in
                                  zip(x[:rows].split(sizes), dy[:rows].split(sizes),
                                      strict=True)])
            return dx, dw, None
        if need_x:
            dx = input_grad(dy, w, tokens_per_expert)
        if need_w:  # for a transposed view: (dyᵀ·x)ᵀ, the gradient laid out as w's storage
            dw = weight_grad(dy, x, tokens_per_expert).transpose(1, 2) if transposed_view(w) \
                else weight_grad(x, dy, tokens_per_expert)
        return dx, dw, None
