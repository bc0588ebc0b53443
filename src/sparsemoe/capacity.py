"""Expert capacity: how many (token, expert) pairs each expert computes, and which pairs
beyond it are dropped.

:class:`Capacity` holds the policy (the capacity's size, the order in which pairs compete,
the groups of tokens it is counted over) and :meth:`Capacity.keep` applies it to a routing
decision through :func:`capacity_mask`, the vectorised mechanism. The dropped pairs are then
masked in :mod:`sparsemoe.dispatch` like any pair that is not valid.

Index letters: ``T`` tokens, ``k`` experts per token, ``n`` experts, ``S`` tokens per group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import check_choice, check_int, check_number

DROP_POLICIES = ("position", "priority")
"""How :func:`capacity_mask` orders the pairs competing for an expert's capacity."""

CAPACITY_GROUPS = ("batch", "sequence")
"""Over which tokens a capacity is counted: all tokens of the forward, or each sequence."""


@dataclass(frozen=True)
class Capacity:
    """An expert capacity and the policy that decides which pairs beyond it are dropped.

    ``capacity = max(minimum, ceil(k · S / n · factor))`` pairs per expert and group of ``S``
    tokens (Switch Transformer: ``ceil(tokens / experts · capacity_factor)``; GShard's
    ``2N / (G·E)`` is ``k = 2``, ``factor = 1``), or a fixed ``tokens`` per expert and group
    (as ``expert_capacity`` in the Switch Transformers of ``transformers``). A dropped pair is
    not computed and contributes nothing: its token keeps only its other experts (and the
    model's residual).

    Args:
        factor: capacity factor (Switch: 1.0 to 1.25 in training, 2.0 in evaluation).
        tokens: a fixed capacity instead of ``factor``.
        minimum: the least capacity whatever ``S`` (DeepSpeed-MoE's ``min_capacity``: 4).
        policy: ``"position"`` — all first choices before all second choices, each in token
            order (GShard Algorithm 1, Switch); ``"priority"`` — the same, but within a choice
            rank tokens go in decreasing order of their largest routing weight (Batch
            Prioritized Routing, Riquelme et al. 2021, V-MoE).
        group: ``"batch"`` — one capacity over all tokens of the forward; ``"sequence"`` —
            one per sequence, the second-to-last input dimension (GShard's groups; the
            Switch Transformers block of ``transformers``).
    """

    factor: float | None = None
    tokens: int | None = None
    minimum: int = 4
    policy: str = "position"
    group: str = "batch"

    def __post_init__(self) -> None:
        if (self.factor is None) == (self.tokens is None):
            raise ValueError("Capacity needs exactly one of factor= or tokens=, got "
                             f"factor={self.factor!r}, tokens={self.tokens!r}")
        if self.factor is not None:
            check_number("factor", self.factor, low=0, high=math.inf, low_open=True,
                         high_open=True)
        if self.tokens is not None:
            check_int("tokens", self.tokens, minimum=0)
        check_int("minimum", self.minimum, minimum=0)
        check_choice("policy", self.policy, DROP_POLICIES)
        check_choice("group", self.group, CAPACITY_GROUPS)

    def per_expert(self, group_tokens: int, k: int, num_experts: int) -> int:
        """The capacity of one expert in a group of ``group_tokens`` tokens with ``k`` choices."""
        if self.tokens is not None:
            return self.tokens
        return max(self.minimum, math.ceil(k * group_tokens / num_experts * self.factor))


    def keep(
        self, expert_indices: Tensor, combine_weights: Tensor, valid: Tensor | None,
        num_experts: int, input_shape: Sequence[int], kept: Tensor | None = None,
    ) -> Tensor:
        """The pairs of a routing decision that fit within the capacity.

        The groups are all ``T`` tokens (``group="batch"``) or each sequence, the
        second-to-last dimension of the layer's input (``group="sequence"``); with
        ``policy="priority"`` a token's priority is its largest valid combine weight.

        Args:
            expert_indices: ``[T, k]`` int64.
            combine_weights: ``[T, k]``.
            valid: ``[T, k]`` bool, the pairs the router chose, or None for all.
            num_experts: ``n``.
            input_shape: the layer input's shape ``[..., S, d]`` (its tokens flattened to
                ``T``, or to more than ``T`` when a padding mask removed some).
            kept: ``[T]`` the indices of the routed tokens among the input's flattened tokens
                when a padding mask removed the others (padding takes no capacity), or None.

        Returns:
            ``[T, k]`` bool: the pairs that are computed.
        """
        t, k = expert_indices.shape
        by_sequence = self.group == "sequence" and len(input_shape) > 1
        group_size = input_shape[-2] if by_sequence else t
        priority = None
        if self.policy == "priority":
            w = combine_weights.detach()
            if valid is not None:
                w = w.masked_fill(~valid, -torch.inf)
            priority = w.amax(1)
        cap = self.per_expert(group_size, k, num_experts)
        if not by_sequence:
            return capacity_mask(expert_indices, valid, num_experts, cap, priority=priority)
        if kept is None:
            return capacity_mask(expert_indices, valid, num_experts, cap,
                                 group_size=group_size or None, priority=priority)
        # The routed tokens back in their sequences; padding pairs take no capacity.
        full = math.prod(input_shape[:-1])
        experts = expert_indices.new_zeros(full, k).index_copy(0, kept, expert_indices)
        mine = torch.ones_like(expert_indices, dtype=torch.bool) if valid is None else valid
        chosen = torch.zeros_like(experts, dtype=torch.bool).index_copy(0, kept, mine)
        if priority is not None:
            priority = priority.new_full((full,), -torch.inf).index_copy(0, kept, priority)
        keep = capacity_mask(experts, chosen, num_experts, cap, group_size=group_size or None,
                             priority=priority)
        return keep.index_select(0, kept)


def capacity_mask(
    expert_indices: Tensor,
    valid: Tensor | None,
    num_experts: int,
    capacity: int,
    *,
    group_size: int | None = None,
    priority: Tensor | None = None,
) -> Tensor:
    """Which (token, expert) pairs fit within each expert's capacity.

    Pairs compete in rank order: choice ``j`` of every token before choice ``j+1`` of any;
    within a choice, tokens in order, or in decreasing ``priority`` (stable). Within each
    group of ``group_size`` consecutive tokens, the first ``capacity`` valid pairs of each
    expert are kept. Vectorised: one sort by (group, expert) over the ranked pairs, no loop.

    Args:
        expert_indices: ``[T, k]`` int64.
        valid: ``[T, k]`` bool, pairs the router chose (masked pairs use no capacity), or None.
        num_experts: ``n``.
        capacity: pairs per expert and group.
        group_size: tokens per group (must divide ``T``); None: one group.
        priority: ``[T]`` token priorities (higher first), or None for token order.

    Returns:
        ``[T, k]`` bool: the pairs that are computed.
    """
    t, k = expert_indices.shape
    device = expert_indices.device
    token_order = torch.arange(t, device=device)
    if priority is not None:
        token_order = torch.sort(priority, descending=True, stable=True).indices
    # rank r = j·T + i is the pair (token_order[i], choice j); ranked[r] is its flat grid index.
    ranked = (token_order[None, :] * k + torch.arange(k, device=device)[:, None]).reshape(-1)
    group = torch.div(ranked, k * (group_size or max(t, 1)), rounding_mode="floor")
    groups = t // group_size if group_size else 1
    dump = groups * num_experts  # the bucket of masked pairs
    bucket = group * num_experts + expert_indices.reshape(-1)[ranked]
    if valid is not None:
        bucket = torch.where(valid.reshape(-1)[ranked], bucket, dump)
    sorted_bucket, by_bucket = torch.sort(bucket, stable=True)
    sizes = bucket.new_zeros(dump + 1).index_add_(0, bucket, torch.ones_like(bucket))
    starts = torch.cumsum(sizes, 0) - sizes
    position = torch.arange(bucket.numel(), device=device) - starts[sorted_bucket]
    keep_sorted = (position < capacity) & (sorted_bucket < dump)
    keep = torch.zeros(t * k, dtype=torch.bool, device=device)
    keep[ranked[by_bucket]] = keep_sorted
    return keep.view(t, k)
