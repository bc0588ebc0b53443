"""Test-session settings."""

import pytest
import torch

# The tests' tensors are tiny: one intra-op thread is fastest, and on a busy machine the
# OpenMP workers' spin-waiting makes tiny ops 10-100 times slower than on one thread.
torch.set_num_threads(1)


@pytest.fixture
def grouped_matmul_impls(monkeypatch):
    """The implementation each ``grouped_matmul`` call resolved to (``"auto"`` decided), in
    call order."""
    from sparsemoe import dispatch

    seen = []
    inner = dispatch._resolve_impl

    def resolve(impl, x, w, transpose=False):
        seen.append(inner(impl, x, w, transpose))
        return seen[-1]

    monkeypatch.setattr(dispatch, "_resolve_impl", resolve)
    return seen
