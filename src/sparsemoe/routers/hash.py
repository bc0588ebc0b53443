"""Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models", arXiv:2106.04426)."""

from __future__ import annotations

import heapq

import torch
from torch import Tensor

from .. import functional as MF
from .._checks import check_choice, check_int
from .base import Router, Routing

HASH_TABLES = ("random", "balanced")


def balanced_hash_table(token_frequencies: Tensor, num_experts: int) -> Tensor:
    """A frequency-balanced token → expert table.

    Token ids in decreasing frequency (ties by id) each go to the expert with the smallest
    total frequency so far (ties to the lower expert): greedy bin packing, so that the expected
    number of tokens per expert is as even as the frequencies allow. The gap between the
    busiest and the idlest expert is at most the largest single frequency.

    Args:
        token_frequencies: ``[V]`` non-negative counts (or probabilities) of each token id.
        num_experts: ``n``.

    Returns:
        ``[V]`` int64.
    """
    freq = token_frequencies.detach().double().cpu()
    order = torch.sort(-freq, stable=True).indices.tolist()
    values = freq.tolist()
    bins = [(0.0, e) for e in range(num_experts)]  # (total frequency, expert): a min-heap
    table = [0] * len(values)
    for token in order:  # a one-off construction before training
        total, e = heapq.heappop(bins)
        table[token] = e
        heapq.heappush(bins, (total + values[token], e))
    return torch.tensor(table, dtype=torch.long)


class HashRouter(Router):
    """Routing by a fixed hash of the token id: ``y = E_{h(id)}(x)``, weight 1.

    The table ``h`` is fixed before training and never learned:

    - ``table="random"``: each id draws a uniform random expert (``seed``), Roller et al.'s
      "Random Hash";
    - ``table="balanced"``: :func:`balanced_hash_table` over ``token_frequencies``, their
      frequency-balanced assignment.

    The layer's forward then takes the ids: ``layer(x, token_ids=ids)``.

    Args:
        d_model: input width ``d`` (unused by the decision; kept for the layer's checks).
        num_experts: ``n``.
        vocab_size: ``V``, ids are in ``[0, V)``.
        table: ``"random"`` or ``"balanced"``.
        token_frequencies: ``[V]`` counts, required for ``"balanced"``.
        seed: the random table's seed.

    Shape:
        buffer ``table [V]``; forward ``([T, d], token_ids [T]) -> Routing`` with one choice.
    """

    uses_token_ids = True

    def __init__(
        self, d_model: int, num_experts: int, vocab_size: int, *, table: str = "random",
        token_frequencies: Tensor | None = None, seed: int = 0,
    ) -> None:
        super().__init__()
        self.d_model = check_int("d_model", d_model)
        self.num_experts = check_int("num_experts", num_experts)
        self.vocab_size = check_int("vocab_size", vocab_size)
        check_choice("table", table, HASH_TABLES)
        if table == "balanced":
            if not isinstance(token_frequencies, Tensor) or tuple(token_frequencies.shape) != (
                vocab_size,
            ):
                got = (tuple(token_frequencies.shape) if isinstance(token_frequencies, Tensor)
                       else type(token_frequencies).__name__)
                raise ValueError(f"table='balanced' needs token_frequencies of shape "
                                 f"({vocab_size},), got {got}")
            if bool((token_frequencies < 0).any()):
                raise ValueError("token_frequencies must be >= 0, got a negative entry")
            values = balanced_hash_table(token_frequencies, num_experts)
        else:
            if token_frequencies is not None:
                raise ValueError("token_frequencies is only used by table='balanced', "
                                 f"got it with table={table!r}")
            g = torch.Generator().manual_seed(seed)
            values = torch.randint(0, num_experts, (vocab_size,), generator=g)
        self.table_kind = table
        self.register_buffer("table", values)

    def forward(self, x: Tensor, token_ids: Tensor) -> Routing:
        lo, hi = (int(token_ids.min()), int(token_ids.max())) if token_ids.numel() else (0, 0)
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"token_ids must lie in [0, vocab_size = {self.vocab_size}), got "
                             f"values in [{lo}, {hi}]")
        choice = self.table[token_ids][:, None]
        load = MF.pair_load(choice, self.num_experts).to(x.dtype)
        return Routing(choice, x.new_ones(choice.shape), load, load, x.new_zeros(()))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, "
                f"vocab_size={self.vocab_size}, table={self.table_kind!r}")
