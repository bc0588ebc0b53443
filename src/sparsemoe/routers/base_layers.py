"""BASE layers: balanced assignment of tokens to experts (Lewis et al. 2021, "BASE Layers:
Simplifying Training of Large, Sparse Models", arXiv:2103.16716)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import LinearRouter, Routing


def balanced_capacities(
    tokens: int, num_experts: int, device: torch.device | None = None
) -> Tensor:
    """Tokens per expert of a balanced assignment: ``⌈T/n⌉`` for the first ``T mod n`` experts,
    ``⌊T/n⌋`` for the rest (exactly ``T/n`` each when ``n`` divides ``T``)."""
    q, r = divmod(tokens, num_experts)
    return q + (torch.arange(num_experts, device=device) < r).long()


def balanced_assignment(scores: Tensor, capacities: Tensor | None = None) -> Tensor:
    """The balanced linear assignment of BASE layers (Lewis et al. 2021), by auction.

    Maximises ``Σ_t scores[t, a_t]`` subject to expert ``e`` receiving exactly
    ``capacities[e]`` tokens (default :func:`balanced_capacities`). Solved with the auction
    algorithm (Bertsekas 1988) with experts as bidders, each wanting ``capacities[e]`` tokens,
    and ε-scaling down to ``ε = max(range, 1)·1e-9 / T`` on float64 copies of the scores.
    ε-complementary slackness holds throughout, so the result is within ``T·ε`` of the optimum:
    optimal unless two assignments differ by less than ``1e-9·max(range, 1)``.

    A round: every expert short of ``r_e`` tokens bids for its ``r_e`` best tokens by value
    ``score − price`` (tokens it holds excluded); each bid raises a token's price so that its
    value to the bidder falls to ``w_e − ε``, where ``w_e`` is the bidder's ``(r_e+1)``-th best
    value; every token goes to its highest bidder. The tokens a bidding expert keeps are
    re-priced to the same value ``w_e − ε``, so that all of an expert's tokens stay within ε of
    its best (the condition for optimality when one bidder holds several tokens). Vectorised over
    experts and tokens; the Python loop runs over rounds.

    Every round raises a price by at least ε; a phase given more than
    ``T·n·(⌈range/ε⌉ + 2)`` rounds (capacities that cannot be met, say) raises instead of
    looping.

    Args:
        scores: ``[T, n]`` finite token–expert affinities (``h_t · w_e`` in BASE).
        capacities: ``[n]`` int64 summing to ``T``.

    Returns:
        ``[T]`` int64, the expert of each token.

    Raises:
        ValueError: a score is NaN or infinite, or their range overflows (the auction's
            prices would never settle).
        RuntimeError: a phase exceeds its round bound.
    """
    t, n = scores.shape
    device = scores.device
    if capacities is None:
        capacities = balanced_capacities(t, n, device)
    if t == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    finite = torch.isfinite(scores).all(1)
    if not bool(finite.all()):
        raise ValueError(f"scores must be finite, got {scores[~finite][0].tolist()} for token "
                         f"{int((~finite).nonzero()[0])} (NaN or inf features or weights)")
    a = scores.detach().to(torch.float64).T.contiguous()  # [n, T]: experts bid for tokens
    spread = float(a.max() - a.min())
    if not math.isfinite(spread):
        raise ValueError(f"scores must span a finite range, got [{float(a.min())}, "
                         f"{float(a.max())}]")
    eps_final = max(spread, 1.0) * 1e-9 / t
    eps = max(spread / 4, eps_final)
    price = a.new_zeros(t)
    experts = torch.arange(n, device=device)
    while True:  # ε-scaling phases: keep the prices, restart the assignment
        owner = torch.full((t,), -1, dtype=torch.long, device=device)
        bound = t * n * (math.ceil(spread / eps) + 2)
        for _ in range(bound + 1):  # rounds
            held = (owner[None, :] == experts[:, None]).sum(1)
            short = capacities - held  # r_e
            if not bool((short > 0).any()):
                break
            width = min(int(short.max()) + 1, t)
            mine = owner[None, :] == experts[:, None]  # [n, T]
            value = (a - price).masked_fill(mine, -math.inf)
            top_value, top_token = value.topk(width, dim=1)  # [n, width], best first
            # w_e: the (r_e+1)-th best value; an expert that must take every token it can see
            # has none, and bids its r_e-th best value less a margin wider than any score gap.
            nth = top_value.gather(1, short.clamp(min=1, max=width)[:, None] - 1)
            after = top_value.gather(1, short.clamp(max=width - 1)[:, None])
            w = torch.where(
                (short[:, None] < width) & (after > -math.inf), after, nth - (spread + 1.0)
            )
            bidding = torch.arange(width, device=device)[None, :] < short[:, None]
            bid = torch.where(bidding, price[top_token] + top_value - w + eps, -math.inf)
            bids = a.new_full((n, t), -math.inf).scatter_(1, top_token, bid)
            best_bid, winner = bids.max(0)
            won = best_bid > -math.inf
            # Tokens kept by an expert that bid this round: re-priced to value w_e − ε.
            keeper = torch.where(owner >= 0, owner, 0)
            kept = (owner >= 0) & ~won & (short[keeper] > 0)
            repriced = a[keeper, torch.arange(t, device=device)] - w[keeper, 0] + eps
            price = torch.where(kept, torch.maximum(price, repriced), price)
            price = torch.where(won, best_bid, price)
            owner = torch.where(won, winner, owner)
        else:
            raise RuntimeError(f"balanced_assignment: the auction did not settle within {bound} "
                               f"rounds (ε = {eps:.3g}, score range {spread:.3g})")
        if eps <= eps_final:
            return owner
        eps = max(eps / 8, eps_final)


class BASERouter(LinearRouter):
    """Balanced assignment in training, greedy top-1 at inference, sigmoid-gated outputs.

    Expert ``e`` has an embedding ``w_e`` (column ``e`` of ``w_gate``). In training, token
    ``t`` goes to ``a_t`` where ``a`` maximises ``Σ_t h_t·w_{a_t}`` subject to every expert
    receiving exactly ``T/n`` tokens (``⌈T/n⌉`` for the first ``T mod n`` experts when ``n``
    does not divide ``T``), solved exactly by the auction algorithm
    (:func:`balanced_assignment`). At inference ``a_t = argmax_e h_t·w_e``.
    The expert's output is weighted by ``σ(h_t·w_{a_t})``; the BASE layer returns
    ``h_t + σ(h_t·w_{a_t})·f_{a_t}(h_t)`` (:class:`sparsemoe.dense_paths.BASELayer` adds the
    residual). The balancing needs no auxiliary loss; the gate learns through the sigmoid.

    Args:
        d_model: input width ``d``.
        num_experts: ``n``.
        w_importance, w_switch, w_z: see :class:`LinearRouter` (defaults 0).

    Shape:
        ``w_gate [d, n]`` (the expert embeddings); forward ``[T, d] -> Routing`` with one
        choice per token.
    """

    def __init__(
        self, d_model: int, num_experts: int, *, w_importance: float = 0.0,
        w_switch: float = 0.0, w_z: float = 0.0,
    ) -> None:
        super().__init__(d_model, num_experts, w_importance=w_importance, w_switch=w_switch,
                         w_z=w_z)

    def forward(self, x: Tensor) -> Routing:
        scores = self.logits(x)  # h_t · w_e
        if self.training:
            choice = balanced_assignment(scores)[:, None]
        else:
            choice = scores.argmax(-1, keepdim=True)
        weights = torch.sigmoid(scores.gather(1, choice))
        return self.routing(scores, scores.softmax(-1), choice, weights)
