"""Randomly translated digits, as Eigen, Ranzato and Sutskever (2013) build jittered MNIST:
each ``h×w`` digit is placed on an ``(h+2m)×(w+2m)`` canvas at an offset drawn uniformly from
``{−m, …, m}²`` (MNIST: 28×28 on 36×36, ``m = 4``, 81 positions).

An offset ``(dy, dx)`` puts the digit's top-left pixel at canvas row ``m + dy``, column
``m + dx``; ``(0, 0)`` centres it. Offsets are numbered row-major, ``(dy + m)·(2m+1) + dx + m``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_int


def num_offsets(max_offset: int) -> int:
    """``(2m+1)²``: the positions a digit can take."""
    return (2 * max_offset + 1) ** 2


def random_offsets(count: int, max_offset: int, generator: torch.Generator | None = None
                   ) -> Tensor:
    """``[count, 2]`` int64 offsets ``(dy, dx)``, each uniform on ``{−m, …, m}``."""
    check_int("max_offset", max_offset, minimum=0)
    return torch.randint(-max_offset, max_offset + 1, (count, 2), generator=generator)


def all_offsets(max_offset: int) -> Tensor:
    """``[(2m+1)², 2]`` every offset, in the order of :func:`offset_index`."""
    r = torch.arange(-max_offset, max_offset + 1)
    return torch.cartesian_prod(r, r)


def offset_index(offsets: Tensor, max_offset: int) -> Tensor:
    """``[N]`` the number of each offset ``[N, 2]``: ``(dy + m)·(2m+1) + dx + m``."""
    side = 2 * max_offset + 1
    return (offsets[:, 0] + max_offset) * side + offsets[:, 1] + max_offset


def place_on_canvas(images: Tensor, offsets: Tensor, max_offset: int) -> Tensor:
    """Digits ``[N, h, w]`` on zero canvases ``[N, h+2m, w+2m]`` at ``offsets [N, 2]``.

    Raises:
        ValueError: if the shapes disagree or an offset is outside ``[−m, m]``.
    """
    check_int("max_offset", max_offset, minimum=0)
    if images.dim() != 3:
        raise ValueError(f"images must be [N, h, w], got shape {tuple(images.shape)}")
    if tuple(offsets.shape) != (images.shape[0], 2):
        raise ValueError(f"offsets must have shape ({images.shape[0]}, 2), got "
                         f"{tuple(offsets.shape)}")
    if offsets.numel() and int(offsets.abs().max()) > max_offset:
        raise ValueError(f"offsets must lie in [-{max_offset}, {max_offset}], got "
                         f"{int(offsets.abs().max())}")
    n, h, w = images.shape
    canvas = images.new_zeros(n, h + 2 * max_offset, w + 2 * max_offset)
    rows = (offsets[:, :1] + max_offset) + torch.arange(h)  # [N, h]
    cols = (offsets[:, 1:] + max_offset) + torch.arange(w)  # [N, w]
    canvas[torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]] = images
    return canvas


def jitter(images: Tensor, max_offset: int, generator: torch.Generator | None = None
           ) -> tuple[Tensor, Tensor]:
    """Each digit at its own uniformly random offset: ``(canvases [N, h+2m, w+2m],
    offsets [N, 2])``."""
    offsets = random_offsets(images.shape[0], max_offset, generator)
    return place_on_canvas(images, offsets, max_offset), offsets
