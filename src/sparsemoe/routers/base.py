"""The router contract shared by every routing method.

A router maps token features to a routing decision; it never touches the experts. Every layer
runs the decision through the same dispatch path (:mod:`sparsemoe.dispatch`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .. import functional as MF
from .._checks import autocast_dtype, check_bool, check_int, check_number, renamed_argument
from .._copy import deepcopy_without_graph


class Routing(NamedTuple):
    """A routing decision for ``T`` tokens over ``n`` experts.

    Attributes:
        expert_indices: ``[T, k]`` int64, the experts each token goes to.
        combine_weights: ``[T, k]`` the weight of each choice in the output (the gates).
        importance: ``[n]`` Σ_x G(x) (eq. 6 of Shazeer et al. 2017, or its analogue).
        load: ``[n]`` the load estimate the router balances (smooth or counted).
        aux_loss: scalar auxiliary loss, already weighted; part of the autograd graph.
        valid: ``[T, k]`` bool, or None when every pair is valid. A pair that is not valid is
            not computed and contributes nothing: the cells of an expert-choice grid that their
            expert did not pick, GShard's skipped second expert. Capacity drops are applied
            by the layer on top of it.
        sums: the :class:`BalanceSums` ``aux_loss`` was computed from, for routers whose loss
            is a function of sums over tokens (None otherwise); global-batch balancing
            (:mod:`sparsemoe.balancing`) adds them over micro-batches and ranks.
    """

    expert_indices: Tensor
    combine_weights: Tensor
    importance: Tensor
    load: Tensor
    aux_loss: Tensor
    valid: Tensor | None = None
    sums: BalanceSums | None = None


class BalanceSums(NamedTuple):
    """Sums over tokens from which a router computes its balancing loss
    (``router.balance_loss(sums)``). The sums of two batches, field by field, are the sums of
    their union, so the loss of a global batch is the loss of the added sums.

    Attributes:
        tokens: 0-d, the number of tokens ``T``.
        importance: ``[n]`` Σ_x G(x) (eq. 6).
        load: ``[n]`` the load the router balances (eq. 10's Σ_x P(x, i), or pair counts).
        probs: ``[n]`` Σ_x p(x), the router probabilities (``T·P_i`` of the Switch loss).
        dispatched: ``[n]`` the pairs counted in the Switch loss's ``f_i`` (``T·f_i``).
        z: 0-d, Σ_x logsumexp(logits(x))² (``T`` times the z-loss).
    """

    tokens: Tensor
    importance: Tensor
    load: Tensor
    probs: Tensor
    dispatched: Tensor
    z: Tensor

    def __add__(self, other: BalanceSums) -> BalanceSums:  # type: ignore[override]
        return BalanceSums(*(a + b for a, b in zip(self, other, strict=True)))


class Router(nn.Module):
    """Base class of routers. Subclasses implement ``forward(x [T, d]) -> Routing`` over
    ``num_experts`` experts and set ``d_model`` and ``num_experts``.

    A router whose decision depends on the token ids rather than the features (hash routing)
    sets ``uses_token_ids = True`` and implements ``forward(x, token_ids [T])``. A router
    whose loss is computed per sequence sets ``uses_sequences = True`` and implements
    ``forward(x, sequence_ids [T])``; the layer numbers the sequences (the last-but-one
    dimension of its input indexes the tokens of one sequence).

    A router that fills :attr:`Routing.sums` implements ``balance_loss(sums) -> Tensor``,
    the auxiliary loss of those sums, which global-batch balancing calls on the sums of a
    whole global batch.
    """

    num_experts: int
    d_model: int
    uses_token_ids: bool = False
    uses_sequences: bool = False

    __deepcopy__ = deepcopy_without_graph  # a router may keep its last forward's log_prob


class GateHiddenLayer(nn.Module):
    """The hidden layer of a gating network: ``x -> relu(x·A + a)``.

    Eigen, Ranzato and Sutskever (2013), "Learning Factored Representations in a Deep Mixture
    of Experts", gate every layer with ``g(x) = softmax(B·relu(A·x + a) + b)``; a router given
    ``gate_hidden=h`` computes its logits from ``relu(x·A + a)`` instead of ``x``. ``A`` and ``a``
    are initialised like an ``nn.Linear`` (U(±1/√d)).

    Args:
        d_model: input width ``d``.
        hidden: hidden width ``h`` (the paper's MNIST gates: 50).

    Shape:
        ``w_hidden [d, h]``, ``b_hidden [h]``; forward ``[T, d] -> [T, h]``.
    """

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.hidden = check_int("hidden", hidden)
        self.w_hidden = nn.Parameter(torch.empty(d_model, hidden))
        self.b_hidden = nn.Parameter(torch.empty(hidden))
        bound = 1.0 / math.sqrt(d_model)
        nn.init.uniform_(self.w_hidden, -bound, bound)
        nn.init.uniform_(self.b_hidden, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x @ self.w_hidden + self.b_hidden)

    def extra_repr(self) -> str:
        return f"d_model={self.w_hidden.shape[0]}, hidden={self.hidden}"


class LinearRouter(Router):
    """What the learned-gate routers share: a gate ``W_g [d, n]`` (and optional bias) applied
    in float32, and the auxiliary losses they may add.

    With ``gate_hidden=h`` the gate is a network with one hidden layer (Eigen et al. 2013):
    ``logits = relu(x·A + a)·W_g + b`` with ``W_g [h, n]`` (:class:`GateHiddenLayer`;
    ``hidden=`` is the deprecated name of ``gate_hidden=``).

    ``W_g`` starts from the Switch Transformer's reduced-scale initialisation (Fedus et al.
    2021, §2.4): a normal truncated at two standard deviations, std ``sqrt(0.1 / fan_in)``
    (``fan_in`` = ``d``, or ``h`` with a hidden layer).

    Auxiliary losses (weights of 0 switch them off; each router's defaults are its paper's):

    - ``w_importance · CV(Importance)²`` with Importance = Σ_x G(x), eq. 7 of Shazeer et al.
      (2017; paper weight 0.1 for language modelling, 0.01 for translation);
    - ``w_switch · N · Σ_i f_i · P_i``, the Switch load-balancing loss (Fedus et al. 2021,
      eq. 4; α = 1e-2), :func:`sparsemoe.functional.switch_loss`;
    - ``w_z · (1/T) Σ_x logsumexp(logits(x))²``, the router z-loss (Zoph et al. 2022, eq. 5;
      1e-3), :func:`sparsemoe.functional.z_loss`.

    Shape:
        ``w_gate [d, n]`` (``[h, n]`` with a hidden layer), ``b_gate [n]`` (when ``bias``),
        ``gate_hidden`` (a :class:`GateHiddenLayer`, when ``gate_hidden=h``).
    """

    def __init__(
        self, d_model: int, num_experts: int, *, w_importance: float = 0.0,
        w_switch: float = 0.0, w_z: float = 0.0, bias: bool = False,
        gate_hidden: int | None = None, hidden: int | None = None,
    ) -> None:
        gate_hidden = renamed_argument(type(self).__name__, "hidden", hidden, "gate_hidden",
                                       gate_hidden)
        super().__init__()
        self.d_model = check_int("d_model", d_model)
        self.num_experts = check_int("num_experts", num_experts)
        self.w_importance = check_number("w_importance", w_importance, low=0)
        self.w_switch = check_number("w_switch", w_switch, low=0)
        self.w_z = check_number("w_z", w_z, low=0)
        check_bool("bias", bias)
        if gate_hidden is not None:
            check_int("gate_hidden", gate_hidden)
        self.gate_hidden = None if gate_hidden is None else GateHiddenLayer(d_model, gate_hidden)
        fan_in = d_model if gate_hidden is None else gate_hidden
        self.w_gate = nn.Parameter(torch.empty(fan_in, num_experts))
        self.b_gate = nn.Parameter(torch.zeros(num_experts)) if bias else None
        self.reset_gate()

    def reset_gate(self) -> None:
        """Initialise ``W_g``: a normal truncated at two standard deviations, std
        ``sqrt(0.1 / fan_in)``."""
        std = math.sqrt(0.1 / self.w_gate.shape[0])
        nn.init.trunc_normal_(self.w_gate, std=std, a=-2 * std, b=2 * std)

    def gate_input(self, x: Tensor) -> Tensor:
        """What ``W_g`` multiplies: ``x``, or ``relu(x·A + a)`` with a hidden layer."""
        return x if self.gate_hidden is None else self.gate_hidden(x)

    def logits(self, x: Tensor) -> Tensor:
        """``x·W_g (+ b)``, or ``relu(x·A + a)·W_g (+ b)`` with a hidden layer:
        ``[T, d] -> [T, n]``, in the gate's precision (float32 under autocast, see
        :func:`full_precision`)."""
        with full_precision(x, self.w_gate) as x:
            out = self.gate_input(x) @ self.w_gate
            return out if self.b_gate is None else out + self.b_gate

    def balance_sums(
        self, logits: Tensor, probs: Tensor, dispatched: Tensor, importance: Tensor,
        load: Tensor, valid: Tensor | None = None,
    ) -> BalanceSums:
        """The :class:`BalanceSums` of a batch (the sums the configured losses need).

        Args:
            logits: ``[T, n]`` router logits (for the z-loss).
            probs: ``[T, n]`` router probabilities (P_i of the switch loss).
            dispatched: ``[T, k]`` the experts counted in f_i of the switch loss.
            importance: ``[n]`` Σ_x G(x).
            load: ``[n]`` the counted load.
            valid: ``[T, k]`` bool mask of ``dispatched``, or None.
        """
        zero = logits.new_zeros(())
        tokens = zero + logits.shape[0]
        z = MF.logsumexp(logits).square().sum() if self.w_z else zero
        if self.w_switch:
            counts = MF.pair_load(dispatched, self.num_experts, valid).to(probs.dtype)
            probs_sum = probs.sum(0)
        else:
            counts = probs_sum = logits.new_zeros(self.num_experts)
        return BalanceSums(tokens, importance, load, probs_sum, counts, z)

    def balance_loss(self, sums: BalanceSums) -> Tensor:
        """The weighted sum of the configured auxiliary losses, from sums over tokens:

        ``w_importance·CV(Importance)² + w_switch·N·Σ_i (c_i/T)·(ΣP_i/T) + w_z·Σz/T``
        (:func:`~sparsemoe.functional.cv_squared`, :func:`~sparsemoe.functional.switch_loss`,
        :func:`~sparsemoe.functional.z_loss`; each 0 for no tokens).
        """
        aux = sums.z.new_zeros(())
        t = sums.tokens.clamp(min=1)  # no tokens: every sum is 0, and so is the loss
        if self.w_importance:
            aux = aux + self.w_importance * MF.cv_squared(sums.importance)
        if self.w_switch:
            aux = aux + self.w_switch * self.num_experts * (
                sums.dispatched * sums.probs).sum() / t.square()
        if self.w_z:
            aux = aux + self.w_z * sums.z / t
        return aux

    def routing(
        self, logits: Tensor, probs: Tensor, expert_indices: Tensor, combine_weights: Tensor,
        valid: Tensor | None = None, dispatched: Tensor | None = None,
    ) -> Routing:
        """The :class:`Routing` record of a decision, with its importance, counted load and
        auxiliary loss (``dispatched`` defaults to ``expert_indices`` under ``valid``)."""
        importance = MF.pair_importance(expert_indices, combine_weights, self.num_experts, valid)
        load = MF.pair_load(expert_indices, self.num_experts, valid).to(combine_weights.dtype)
        if dispatched is None:
            sums = self.balance_sums(logits, probs, expert_indices, importance, load, valid)
        else:
            sums = self.balance_sums(logits, probs, dispatched, importance, load)
        return Routing(expert_indices, combine_weights, importance, load,
                       self.balance_loss(sums), valid, sums)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, "
                f"w_importance={self.w_importance}, w_switch={self.w_switch}, w_z={self.w_z}, "
                f"bias={self.b_gate is not None}")


def all_experts_grid(num_tokens: int, num_experts: int, device: torch.device) -> Tensor:
    """``[T, n]`` with row ``t`` equal to ``0..n-1``: the grid of routers that consider every
    (token, expert) pair (dense softmax, expert choice, strictly balanced gating)."""
    return torch.arange(num_experts, device=device).expand(num_tokens, num_experts)


@contextmanager
def full_precision(x: Tensor, w: Tensor) -> Iterator[Tensor]:
    """Run a router outside autocast, with ``x`` cast to the gate weights' dtype.

    Under ``torch.autocast`` the top-k choice and the erf of the load estimator would otherwise
    see bfloat16 logits; routers keep float32 ("selective precision", Fedus et al. 2021).
    Without autocast, ``x`` is passed through unchanged (a dtype mismatch is then an error).
    """
    if autocast_dtype(x.device.type) is None:
        yield x
        return
    with torch.autocast(x.device.type, enabled=False):
        yield x.to(w.dtype)
