"""``copy.deepcopy`` for modules that keep values of their last forward pass.

A layer keeps its last ``aux_loss`` (and a REINFORCE router its ``log_prob``) for the training
loss to pick up; those tensors are inside the autograd graph, which ``copy.deepcopy`` refuses to
copy. A copy (an EMA or best-model snapshot) has not run that forward, so it gets ``None`` in
their place; everything else is copied as ``copy.deepcopy`` would.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn


def deepcopy_without_graph(module: nn.Module, memo: dict) -> nn.Module:
    """The ``__deepcopy__`` of such modules: a deep copy in which every attribute holding a
    non-leaf tensor (one with a ``grad_fn``) is ``None``."""
    cls = type(module)
    new = cls.__new__(cls)
    memo[id(module)] = new
    new.__setstate__({k: None if isinstance(v, Tensor) and v.grad_fn is not None
                      else copy.deepcopy(v, memo) for k, v in module.__dict__.items()})
    return new
