"""The memory-saving Adam of Shazeer et al. (2017), Appendix D.

Adam keeps two full-size moment estimates per parameter, which for an expert bank of billions
of parameters costs twice the parameters' memory again. Appendix D ("Reducing the memory of
the optimizer") removes both: the first moment is dropped (β1 = 0) and, for each parameter
matrix, the second moment is stored as a running average of its row means and one of its
column means; the full estimate is their outer product divided by their mean.

An expert bank stacks its experts' matrices into one ``[n, d, h]`` parameter and their biases
into one ``[n, h]``: the first is ``n`` matrices, the second ``n`` vectors, not a matrix.
:func:`param_groups` tells the optimiser so (``expert_dims=1`` for the banks' parameters).

On FSDP2 shards (DTensor parameters, :func:`sparsemoe.parallel.parallelize`) the state is
computed with DTensor operations and is itself a DTensor: the row factor and the full moment
shard like their parameter; the column factor of a matrix sharded along its rows sums each
rank's rows (an all-reduce of ``c`` numbers) and is replicated; an expert bank's factors shard
with its experts (dimension 0).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate

from ._checks import check_bool, check_int, check_number
from .experts import FeedForwardExperts, LinearExperts


def _mean(t: Tensor, dim: int) -> Tensor:
    """``t.mean(dim)``. On a DTensor sharded along ``dim`` each rank sums its own part and one
    all-reduce adds the sums (``Partial`` → ``Replicate``); DTensor's ``mean`` would all-gather
    the whole tensor where the shards are uneven."""
    total = t.sum(dim)
    if isinstance(total, DTensor) and any(p.is_partial() for p in total.placements):
        total = total.redistribute(placements=[Replicate() if p.is_partial() else p
                                               for p in total.placements])
    return total / t.shape[dim]


def factored_second_moment(row: Tensor, col: Tensor) -> Tensor:
    """The second-moment estimate of Appendix D from its factors.

    ``V̂[..., i, j] = R[..., i] · C[..., j] / mean(R[...])``, where ``R`` and ``C`` are the
    running averages of the row means and the column means of the squared gradient. When
    ``g²`` is itself an outer product (rank one), ``V̂`` equals the unfactored estimate.

    Args:
        row: ``R [..., r]``.
        col: ``C [..., c]``, with the same leading dimensions.

    Returns:
        ``[..., r, c]``. A matrix whose factors are all zero gives zeros.
    """
    mean = _mean(row, -1).clamp_min(torch.finfo(row.dtype).tiny)[..., None, None]  # R ≥ 0
    return row.unsqueeze(-1) * col.unsqueeze(-2) / mean


class FactoredAdam(torch.optim.Optimizer):
    """Adam with β1 = 0 and a factored second moment (Shazeer et al. 2017, Appendix D).

    For a parameter ``p`` with gradient ``g`` at step ``t``, whose first ``expert_dims``
    dimensions index experts (a parameter group option; :func:`param_groups` sets it to 1 for
    stacked expert banks) and whose remaining dimensions are one expert's parameter:

    - matrices (``factored`` and ``p.dim() - expert_dims >= 2``): the last two dimensions are
      the matrix and any leading dimensions index independent matrices, so a stacked expert
      bank ``[n, d, h]`` gets one pair of factors per expert;
      ``R ← β2·R + (1−β2)·mean_j g²``, ``C ← β2·C + (1−β2)·mean_i g²`` and
      ``v = R Cᵀ / mean(R)`` (:func:`factored_second_moment`);
    - everything else, vectors and scalars, including a bank's stacked biases ``[n, h]``
      (``n`` vectors; with ``expert_dims=0`` they would be factored as one matrix): the full
      ``v ← β2·v + (1−β2)·g²`` of Adam;
    - then ``p ← p − lr · g / (sqrt(v / (1 − β2^t)) + eps)``, Adam's update with its bias
      correction and no first moment (β1 = 0 makes the first moment the gradient itself).

    Optimizer state per ``[r, c]`` matrix is ``r + c`` numbers instead of Adam's ``2·r·c``;
    vectors keep one full moment instead of two. With ``factored=False`` the update is
    exactly ``torch.optim.Adam(betas=(0, beta2))``.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        beta2: decay of the second-moment running averages, in ``[0, 1)``.
        eps: added to the denominator.
        factored: factor the second moment of matrices (False: keep it full, as Adam).
        expert_dims: how many leading dimensions of a parameter index experts (0: none).

    Raises:
        ValueError: at the first step, a parameter with fewer than ``expert_dims`` dimensions.

    Example:
        >>> opt = FactoredAdam(param_groups(model), lr=1e-3)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        beta2: float = 0.999,
        eps: float = 1e-8,
        factored: bool = True,
        expert_dims: int = 0,
    ) -> None:
        check_number("lr", lr, low=0)
        check_number("beta2", beta2, low=0, high=1, high_open=True)
        check_number("eps", eps, low=0)
        check_bool("factored", factored)
        check_int("expert_dims", expert_dims, minimum=0)
        super().__init__(params, dict(lr=lr, beta2=beta2, eps=eps, factored=factored,
                                      expert_dims=expert_dims))

    def __setstate__(self, state: dict) -> None:
        """Also loads state dicts saved before ``expert_dims`` existed (as ``expert_dims=0``)."""
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("expert_dims", 0)

    @staticmethod
    def is_factored(p: Tensor, group: dict) -> bool:
        """Whether ``p``'s second moment is stored as row and column factors."""
        expert_dims = check_int("expert_dims", group["expert_dims"], minimum=0)
        if p.dim() < expert_dims:
            raise ValueError(f"a parameter of shape {tuple(p.shape)} has fewer than "
                             f"expert_dims={expert_dims} dimensions")
        return group["factored"] and p.dim() - expert_dims >= 2

    def _init_state(self, p: Tensor, group: dict) -> dict:
        """Zero state for ``p``: ``row [..., r]`` and ``col [..., c]`` for a matrix, else ``v``
        shaped like ``p``; float32. On a DTensor, each shaped (and placed) like the mean of a
        DTensor of ``p``'s placements over the last, or the second-to-last, dimension."""
        state = self.state[p]
        state["step"] = torch.zeros((), dtype=torch.float32)
        zeros = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        if self.is_factored(p, group):
            state["row"], state["col"] = _mean(zeros, -1), _mean(zeros, -2)
        else:
            state["v"] = zeros
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta2, eps, lr = group["beta2"], group["eps"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("FactoredAdam does not support sparse gradients; "
                                       "use dense gradients (e.g. nn.Embedding(sparse=False))")
                state = self.state[p] or self._init_state(p, group)
                state["step"] += 1
                g = p.grad.float()
                g2 = g * g
                if "row" in state:
                    state["row"].lerp_(_mean(g2, -1), 1 - beta2)
                    state["col"].lerp_(_mean(g2, -2), 1 - beta2)
                    v = factored_second_moment(state["row"], state["col"])
                else:
                    state["v"].lerp_(g2, 1 - beta2)
                    v = state["v"]
                correction = 1 - beta2 ** state["step"].item()
                denom = (v / correction).sqrt_().add_(eps)
                p.add_((g / denom).to(p.dtype), alpha=-lr)
        return loss


def param_groups(module: nn.Module) -> list[dict]:
    """``module``'s parameters as optimiser groups: the stacked expert banks'
    (:class:`~sparsemoe.experts.FeedForwardExperts`, :class:`~sparsemoe.experts.LinearExperts`,
    one slice per expert along dimension 0) with ``expert_dims=1``, then all others.

    Any ``torch.optim`` optimiser accepts the groups (it keeps the extra key);
    :class:`FactoredAdam` reads it to keep a bank's biases ``[n, h]`` as ``n`` vectors with
    full second moments instead of factoring them as one matrix. Empty groups are left out;
    a parameter shared by several modules appears once.

    Returns:
        ``[{"params": [...], "expert_dims": 1}, {"params": [...]}]``.
    """
    banks = [m for m in module.modules() if isinstance(m, (FeedForwardExperts, LinearExperts))]
    stacked = {id(p): p for m in banks for p in m.parameters(recurse=False)}
    others = [p for p in module.parameters() if id(p) not in stacked]
    groups = [{"params": list(stacked.values()), "expert_dims": 1}, {"params": others}]
    return [g for g in groups if g["params"]]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in ``optimizer``'s per-parameter state tensors (the moment estimates) on
    this process: a DTensor's local shard (or replica)."""
    local = [t.to_local() if isinstance(t, DTensor) else t for s in optimizer.state.values()
             for t in s.values() if isinstance(t, Tensor) and t.dim() > 0]
    return sum(t.numel() * t.element_size() for t in local)
