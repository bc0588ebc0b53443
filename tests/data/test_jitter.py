"""Jittered digits: offsets uniform on {−m..m}², placement on the canvas, reproducibility."""

import numpy as np
import pytest
import torch
from scipy import stats

from sparsemoe.data import (
    all_offsets,
    jitter,
    num_offsets,
    offset_index,
    place_on_canvas,
    random_offsets,
)


def test_offsets_cover_the_81_positions_uniformly():
    offsets = random_offsets(81_000, 4, torch.Generator().manual_seed(0))
    assert offsets.min() == -4 and offsets.max() == 4
    counts = torch.bincount(offset_index(offsets, 4), minlength=81).numpy()
    assert num_offsets(4) == 81 and (counts > 0).all()
    assert stats.chisquare(counts).pvalue > 1e-3  # uniform over the 81 positions


def test_offset_numbering():
    grid = all_offsets(4)
    assert grid.shape == (81, 2) and grid[0].tolist() == [-4, -4] and grid[40].tolist() == [0, 0]
    assert torch.equal(offset_index(grid, 4), torch.arange(81))
    assert offset_index(torch.tensor([[-4, 4], [1, -2]]), 4).tolist() == [8, 5 * 9 + 2]


def test_canvas_placement_against_a_loop():
    images = torch.arange(1, 3 * 28 * 28 + 1).reshape(3, 28, 28)
    offsets = torch.tensor([[-4, -4], [0, 0], [4, -1]])
    canvas = place_on_canvas(images, offsets, 4)
    assert canvas.shape == (3, 36, 36)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        expected = torch.zeros(36, 36, dtype=images.dtype)
        for r in range(28):
            for c in range(28):
                expected[4 + dy + r, 4 + dx + c] = images[i, r, c]
        assert torch.equal(canvas[i], expected)
    assert canvas[0, 0, 0] == images[0, 0, 0] and canvas[2, 35, 3:31].tolist() == \
        images[2, 27].tolist()  # the extremes touch the canvas edges
    small = place_on_canvas(torch.ones(1, 8, 8), torch.tensor([[2, -3]]), 4)
    assert small.shape == (1, 16, 16) and small.sum() == 64
    assert small[0, 6:14, 1:9].sum() == 64


def test_jitter_is_reproducible_with_a_seed():
    images = torch.randint(0, 255, (50, 8, 8), dtype=torch.uint8)
    a, oa = jitter(images, 4, torch.Generator().manual_seed(5))
    b, ob = jitter(images, 4, torch.Generator().manual_seed(5))
    _, oc = jitter(images, 4, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and torch.equal(oa, ob) and not torch.equal(oa, oc)
    assert torch.equal(a, place_on_canvas(images, oa, 4))
    np.testing.assert_array_equal(a.sum((1, 2)).numpy(), images.sum((1, 2)).numpy())


def test_bad_jitter_arguments():
    with pytest.raises(ValueError, match=r"offsets must lie in \[-4, 4\], got 5"):
        place_on_canvas(torch.zeros(1, 8, 8), torch.tensor([[5, 0]]), 4)
    with pytest.raises(ValueError, match=r"offsets must have shape \(2, 2\), got \(1, 2\)"):
        place_on_canvas(torch.zeros(2, 8, 8), torch.tensor([[0, 0]]), 4)
    with pytest.raises(ValueError, match=r"images must be \[N, h, w\], got shape \(8, 8\)"):
        place_on_canvas(torch.zeros(8, 8), torch.tensor([[0, 0]]), 4)
    with pytest.raises(ValueError, match="max_offset must be >= 0, got -1"):
        random_offsets(3, -1)
