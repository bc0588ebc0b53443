"""MoE layers: a router, an expert bank and the shared dispatch.

:class:`MoELayer` takes any :class:`~sparsemoe.routers.Router` (and an optional
:class:`~sparsemoe.capacity.Capacity`); :class:`MoE` and :class:`HierarchicalMoE` are the
paper's layers; :class:`SoftMoE` runs Soft MoE's slots through the same expert banks. All
implement :class:`~sparsemoe.module.MoEModule` (auxiliary loss, load statistics). Layers with
a dense path beside the routed experts (shared experts, BASE's residual, NLLB's dense FFN) are
in :mod:`sparsemoe.dense_paths`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ._checks import check_like, check_number, renamed_argument
from .capacity import Capacity
from .dispatch import dispatch_combine, equal_routes
from .experts import FeedForwardExperts, ModuleListExperts, resolve_activation
from .module import MoEModule, MoEStats, aux_loss
from .parallel.exchange import ExpertParallel, ProcessGroup, local_share, rank_seeded
from .routers import HierarchicalNoisyTopKRouter, NoisyTopKRouter, Router, Routing, SoftMoERouter

__all__ = ["HierarchicalMoE", "MoE", "MoELayer", "MoEStats", "SoftMoE", "aux_loss"]


class MoELayer(MoEModule):
    """A mixture-of-experts layer from any router and any expert bank.

    ``y = Σ_i G(x)_i E_i(x)`` (eq. 1), then ``output_activation`` if given. Every token goes
    to the experts its router chooses through the grouped dispatch of
    :mod:`sparsemoe.dispatch`: dropless by default; with a ``capacity``, each expert computes
    at most its capacity of pairs and a dropped pair contributes nothing (the token keeps its
    other experts, and the model's residual). Pairs the router marks as not valid
    (:attr:`Routing.valid`) are never computed either.

    After each forward, :attr:`aux_loss` holds the router's weighted auxiliary loss (a scalar
    in the autograd graph) and :attr:`stats` gives the load statistics of that forward,
    including the fraction of pairs dropped by the capacity.

    Args:
        router: a :class:`sparsemoe.routers.Router`.
        experts: an expert bank with ``num_experts`` equal to the router's.
        output_activation: None, a name (``"sigmoid"``, ``"relu"``, ``"tanh"``, ...) or a
            callable applied to the layer output (the paper's language model uses sigmoid).
        capacity: a :class:`sparsemoe.Capacity`, or None for dropless.
        expert_output_masking: ``p`` of NLLB's expert output masking (NLLB Team 2022): in
            training each computed pair is dropped with probability ``p``; in evaluation
            the expert mixture is scaled by ``1 − p``, as in the released fairseq code. 0
            turns it off (the NLLB-200 recipe uses 0.2).

    Shape:
        ``x [..., d_model] -> [..., d_out]`` (``d_out`` is the expert bank's output width:
        ``d_model`` for feed-forward experts, any width for
        :class:`~sparsemoe.experts.LinearExperts`): all leading dimensions are flattened into one
        batch of tokens, so a whole batch×time block is one MoE call (the paper's
        "convolutional" application). A router with ``uses_token_ids`` (hash routing) needs
        ``token_ids [...]``, one id per token.
    """

    def __init__(
        self,
        router: Router,
        experts: nn.Module,
        *,
        output_activation: str | Callable[[Tensor], Tensor] | None = None,
        capacity: Capacity | None = None,
        expert_output_masking: float = 0.0,
    ) -> None:
        super().__init__(router, experts)
        if capacity is not None and not isinstance(capacity, Capacity):
            raise TypeError(f"capacity must be a sparsemoe.Capacity or None, got "
                            f"{type(capacity).__name__}")
        check_number("expert_output_masking", expert_output_masking, low=0, high=1,
                     high_open=True)
        self.output_activation = resolve_activation("output_activation", output_activation)
        self.capacity = capacity
        self.expert_output_masking = expert_output_masking
        # set by sparsemoe.balancing.GlobalBatchBalancing while it is active
        self.global_batch = None

    def _flat_token_ids(self, x: Tensor, token_ids: Tensor | None) -> Tensor | None:
        """``token_ids`` checked against the router and ``x``, flattened to ``[T]`` int64."""
        if not self.router.uses_token_ids:
            if token_ids is not None:
                raise ValueError(f"token_ids is only used by routers that route by token id; "
                                 f"{type(self.router).__name__} routes by features, got token_ids")
            return None
        if not isinstance(token_ids, Tensor):
            raise TypeError(f"{type(self.router).__name__} routes by token id: forward needs "
                            f"token_ids, a tensor of shape {tuple(x.shape[:-1])}, got "
                            f"{type(token_ids).__name__}")
        if token_ids.is_floating_point() or token_ids.is_complex() or token_ids.dtype == torch.bool:
            raise TypeError(f"token_ids must be an integer tensor, got dtype {token_ids.dtype}")
        if tuple(token_ids.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"token_ids must have shape {tuple(x.shape[:-1])} (x without its "
                             f"last dimension), got {tuple(token_ids.shape)}")
        return token_ids.reshape(-1).to(torch.long)

    def _kept_tokens(self, x: Tensor, mask: Tensor) -> Tensor:
        """The indices ``[T']`` of the flattened tokens whose ``mask`` is 1."""
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a tensor of shape {tuple(x.shape[:-1])}, got "
                            f"{type(mask).__name__}")
        if tuple(mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"mask must have shape {tuple(x.shape[:-1])} (x without its last "
                             f"dimension), got {tuple(mask.shape)}")
        check_like("mask", mask, "x", x, dtype=False)
        if mask.dtype != torch.bool:
            if mask.is_complex() or bool(((mask != 0) & (mask != 1)).any()):
                raise ValueError(f"mask must be bool or hold only 0 and 1, got dtype "
                                 f"{mask.dtype} with other values")
            mask = mask != 0
        if (self.capacity is not None and self.capacity.group == "sequence"
                and self.capacity.tokens is None):
            raise ValueError("mask with a per-sequence capacity factor is not supported (the "
                             "sequences' kept tokens differ in number); give a fixed "
                             "Capacity(tokens=..., group='sequence') or group='batch', got "
                             f"{self.capacity}")
        return mask.reshape(-1).nonzero().squeeze(1)

    def _route(
        self, tokens: Tensor, token_ids: Tensor | None, sequence_ids: Tensor | None
    ) -> Routing:
        if self.router.uses_token_ids:
            return self.router(tokens, token_ids)
        if self.router.uses_sequences:
            return self.router(tokens, sequence_ids)
        return self.router(tokens)

    def _pairs_to_compute(
        self, routing: Routing, x: Tensor, kept: Tensor | None = None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The pairs to compute after capacity and expert output masking; the routed and the
        dropped pair counts (None without a capacity). ``kept`` indexes the routed tokens
        among ``x``'s when a mask removed the others."""
        valid = routing.valid
        routed = dropped = None
        if self.capacity is not None:
            keep = self.capacity.keep(routing.expert_indices, routing.combine_weights, valid,
                                      self.num_experts, x.shape, kept)
            routed = (valid.sum() if valid is not None
                      else torch.tensor(routing.expert_indices.numel(), device=keep.device))
            dropped = routed - keep.sum()
            valid = keep
        if self.training and self.expert_output_masking > 0:
            kept = torch.rand(routing.expert_indices.shape, device=x.device)
            kept = kept >= self.expert_output_masking
            valid = kept if valid is None else valid & kept
        return valid, routed, dropped

    def routed_experts(
        self, tokens: Tensor, x: Tensor, token_ids: Tensor | None = None,
        sequence_ids: Tensor | None = None, kept: Tensor | None = None,
    ) -> Tensor:
        """The mixture of the routed experts, ``[T, d] -> [T, d_out]``; sets :attr:`aux_loss`
        and :attr:`stats`. ``x`` is the unflattened input (for per-sequence capacity);
        ``token_ids`` and ``sequence_ids`` are ``[T]``, for the routers that use them;
        ``kept`` indexes ``tokens`` among ``x``'s when a mask removed the others."""
        routing = self._route(tokens, token_ids, sequence_ids)
        valid, routed, dropped = self._pairs_to_compute(routing, x, kept)
        y, routes = dispatch_combine(
            tokens, routing.expert_indices, routing.combine_weights, self.experts, valid
        )
        if not self.training and self.expert_output_masking > 0:
            y = y * (1.0 - self.expert_output_masking)
        aux = routing.aux_loss
        if self.global_batch is not None:
            aux = self.global_batch.aux_loss(self.router, routing)
        self._record(aux, MoEStats(routing.importance.detach(), routing.load.detach(),
                                   routes.tokens_per_expert, routed, dropped))
        return y

    def add_dense_paths(self, tokens: Tensor, y: Tensor) -> Tensor:
        """Combine the routed mixture ``y`` with any always-on path (none here); subclasses
        add shared experts, a residual or a dense FFN."""
        return y

    def forward(
        self, x: Tensor, token_ids: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """``x [..., d_model] -> [..., d_out]``.

        Args:
            x: the tokens.
            token_ids: ``[...]`` one id per token, for routers that route by id.
            mask: ``[...]`` bool (or 0/1), 0 for padding: a masked token is not routed, costs
                nothing, counts in no statistic, loss or capacity, and its output is 0. The
                layer equals itself run on the kept tokens alone.
        """
        self._check_input(x)
        tokens = x.reshape(-1, self.d_model)  # [T, d]
        token_ids = self._flat_token_ids(x, token_ids)
        sequence_ids = None
        if self.router.uses_sequences:  # the last-but-one dimension indexes a sequence's tokens
            length = max(x.shape[-2], 1) if x.dim() > 1 else 1
            sequence_ids = torch.arange(tokens.shape[0], device=x.device) // length
        kept = None
        if mask is not None:
            kept = self._kept_tokens(x, mask)
            tokens = tokens.index_select(0, kept)  # [T', d]
            token_ids = None if token_ids is None else token_ids[kept]
            sequence_ids = None if sequence_ids is None else sequence_ids[kept]
        y = self.routed_experts(tokens, x, token_ids, sequence_ids, kept)
        y = self.add_dense_paths(tokens, y)
        if self.output_activation is not None:
            y = self.output_activation(y)
        if kept is not None:  # padding gets 0
            y = y.new_zeros(x.shape[:-1].numel(), y.shape[-1]).index_copy(0, kept, y)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def _expert_bank(
    num_experts: int,
    d_model: int,
    hidden: int | None,
    expert_modules: Sequence[nn.Module] | None,
    activation: str,
    bias: bool,
    impl: str,
    recompute: bool,
    process_group: ProcessGroup | None = None,
) -> nn.Module:
    """The layer's bank of ``num_experts`` experts; with a process group, this rank's share of
    them wrapped in :class:`~sparsemoe.parallel.ExpertParallel`."""
    if hidden is not None and expert_modules is not None:
        raise ValueError(f"give either hidden or expert_modules=, not both (got hidden={hidden})")
    if expert_modules is None and hidden is None:
        raise ValueError("hidden (the experts' hidden width) is required unless expert_modules= "
                         "gives the expert modules, got hidden=None")
    if expert_modules is not None and recompute:
        raise ValueError("recompute=True applies to the feed-forward experts built from "
                         "hidden=, got expert_modules=; wrap them in "
                         "torch.utils.checkpoint instead")

    def feed_forward(n: int) -> FeedForwardExperts:
        return FeedForwardExperts(n, d_model, hidden, activation=activation, bias=bias,
                                  impl=impl, recompute=recompute)

    if process_group is None:
        if expert_modules is None:
            return feed_forward(num_experts)
        if len(expert_modules) != num_experts:
            raise ValueError(f"expert_modules must hold num_experts = {num_experts} modules, "
                             f"got {len(expert_modules)}")
        return ModuleListExperts(expert_modules)
    n_local, _ = local_share(num_experts, process_group)
    if expert_modules is None:
        with rank_seeded(process_group):  # distinct experts on every rank
            local = feed_forward(n_local)
    elif len(expert_modules) != n_local:
        raise ValueError(f"with a process group, expert_modules must hold this rank's "
                         f"num_experts / world size = {num_experts} / "
                         f"{num_experts // n_local} = {n_local} modules, "
                         f"got {len(expert_modules)}")
    else:
        local = ModuleListExperts(expert_modules)
    return ExpertParallel(local, process_group)


class MoE(MoELayer):
    """The Sparsely-Gated Mixture-of-Experts layer of Shazeer et al. (2017).

    Noisy top-k gating (eqs. 3–5; ``W_g`` and ``W_noise`` zero-initialised as in the paper,
    ``W_g`` from N(0, gate_init_std²) on request), ``num_experts``
    feed-forward experts, and the balancing losses L_importance + L_load (eqs. 6–11) in
    :attr:`aux_loss`. Add ``sparsemoe.aux_loss(model)`` to the training loss.

    Args:
        d_model: input and output width.
        num_experts: ``n``.
        k: experts per token.
        hidden: hidden width of each feed-forward expert (Appendix C.1: 1024 for d = 512).
        expert_modules: instead of ``hidden``, ``num_experts`` arbitrary modules
            ``[N, d] -> [N, d]`` (general, slower path); ``experts=`` is its deprecated name.
        activation: expert activation (``"relu"`` as in the paper, ``"gelu"``, ``"silu"``,
            ``"swiglu"``, ``"geglu"``, ...).
        output_activation: applied to the layer output (the paper's language model: sigmoid).
        noisy_gating: add tunable Gaussian noise in training (False: top-k softmax gating).
        noise_epsilon: floor of the noise stddev.
        w_importance, w_load: loss weights (paper, language modelling: 0.1 each).
        gate_init_std: ``W_g ~ N(0, gate_init_std²)`` instead of the paper's zeros (0, the
            default); see :class:`~sparsemoe.routers.NoisyTopKRouter`.
        bias: expert biases (default off: the reference code's experts are bias-free, as
            are Mixtral's).
        impl: grouped-matmul implementation (``"auto"``, ``"grouped_mm"``, ``"loop"``).
        capacity: a :class:`~sparsemoe.capacity.Capacity` (None: dropless, the paper's layer).
        recompute: recompute the experts' hidden activations in the backward pass instead of
            keeping them (Appendix D's memory saving; see :class:`FeedForwardExperts`).
        process_group: expert parallelism (:mod:`sparsemoe.parallel`): the experts are spread
            over the group's ``W`` ranks, ``num_experts / W`` on each (``expert_modules`` then
            holds this rank's modules), and tokens travel to them. The local experts are initialised
            from a stream of the rank's own; to start from a single-process model's weights,
            build it on every rank and call :func:`sparsemoe.parallel.expert_parallel`.
            Nothing averages the other parameters' gradients over the ranks: to train on
            several ranks, build the layer without a group and call
            :func:`sparsemoe.parallel.parallelize`.

    Shape:
        ``[..., d_model] -> [..., d_model]``.

    Example:
        >>> moe = MoE(d_model=64, num_experts=16, k=2, hidden=128)
        >>> y = moe(torch.randn(8, 10, 64))
        >>> loss = y.square().mean() + moe.aux_loss
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 2,
        hidden: int | None = None,
        *,
        expert_modules: Sequence[nn.Module] | None = None,
        activation: str = "relu",
        output_activation: str | Callable[[Tensor], Tensor] | None = None,
        noisy_gating: bool = True,
        noise_epsilon: float = 1e-2,
        w_importance: float = 0.1,
        w_load: float = 0.1,
        gate_init_std: float = 0.0,
        bias: bool = False,
        impl: str = "auto",
        capacity: Capacity | None = None,
        recompute: bool = False,
        process_group: ProcessGroup | None = None,
        experts: Sequence[nn.Module] | None = None,
    ) -> None:
        expert_modules = renamed_argument("MoE", "experts", experts, "expert_modules",
                                          expert_modules)
        router = NoisyTopKRouter(
            d_model, num_experts, k, noisy_gating=noisy_gating, noise_epsilon=noise_epsilon,
            w_importance=w_importance, w_load=w_load, gate_init_std=gate_init_std,
        )
        bank = _expert_bank(num_experts, d_model, hidden, expert_modules, activation, bias, impl,
                            recompute, process_group)
        super().__init__(router, bank, output_activation=output_activation,
                         capacity=capacity)


class HierarchicalMoE(MoELayer):
    """The hierarchical MoE of Shazeer et al. (2017), Appendix B.

    ``a = groups`` groups of ``b = experts_per_group`` experts. A primary noisy top-k gate picks
    ``k_primary`` groups, each chosen group's secondary gate picks ``k_secondary`` experts
    (eq. 12); losses on Importance_H and Load_H (eqs. 13–14). The ``a·b`` experts are one
    stacked bank and run through the same grouped dispatch as :class:`MoE`.

    Args:
        d_model: input and output width.
        groups: ``a`` (the paper's primary branching factor: 16).
        experts_per_group: ``b``.
        k_primary, k_secondary: choices per level (paper: 2 and 2).
        hidden, expert_modules, activation, output_activation, noisy_gating, noise_epsilon,
        w_importance, w_load, gate_init_std, bias, impl, capacity, recompute, process_group: as in
        :class:`MoE`; ``expert_modules`` must then hold ``a·b`` modules (``a·b / W`` with a
        process group), group ``i``'s expert ``j`` at index ``i·b + j``; ``experts=`` is its
        deprecated name.

    Shape:
        ``[..., d_model] -> [..., d_model]``.
    """

    def __init__(
        self,
        d_model: int,
        groups: int,
        experts_per_group: int,
        k_primary: int = 2,
        k_secondary: int = 2,
        hidden: int | None = None,
        *,
        expert_modules: Sequence[nn.Module] | None = None,
        activation: str = "relu",
        output_activation: str | Callable[[Tensor], Tensor] | None = None,
        noisy_gating: bool = True,
        noise_epsilon: float = 1e-2,
        w_importance: float = 0.1,
        w_load: float = 0.1,
        gate_init_std: float = 0.0,
        bias: bool = False,
        impl: str = "auto",
        capacity: Capacity | None = None,
        recompute: bool = False,
        process_group: ProcessGroup | None = None,
        experts: Sequence[nn.Module] | None = None,
    ) -> None:
        expert_modules = renamed_argument("HierarchicalMoE", "experts", experts,
                                          "expert_modules", expert_modules)
        router = HierarchicalNoisyTopKRouter(
            d_model, groups, experts_per_group, k_primary, k_secondary,
            noisy_gating=noisy_gating, noise_epsilon=noise_epsilon,
            w_importance=w_importance, w_load=w_load, gate_init_std=gate_init_std,
        )
        bank = _expert_bank(
            router.num_experts, d_model, hidden, expert_modules, activation, bias, impl,
            recompute, process_group,
        )
        super().__init__(router, bank, output_activation=output_activation,
                         capacity=capacity)


class SoftMoE(MoEModule):
    """The Soft MoE layer (Puigcerver et al. 2023): experts process slots, soft mixtures of
    the tokens of one input, and every token's output is a soft mixture of the slot outputs.

    ``X̃ = Dᵀ·X`` (``D`` softmax over tokens), ``Ỹ_s = f_{⌊s/p⌋}(X̃_s)``, ``Y = C·Ỹ`` (``C``
    softmax over slots); see :class:`~sparsemoe.routers.SoftMoERouter`. Each input (a sequence,
    an image) has its own slots; the slots of all inputs are grouped by expert and run through
    the expert bank's grouped matmul with an equal number of rows per expert. No token is
    dropped and there is no auxiliary loss (:attr:`aux_loss` is 0). **Not causal**: do not use
    it where a token may only see earlier tokens. It implements the layer protocol
    (:class:`~sparsemoe.module.MoEModule`) with its own forward; a capacity, expert output
    masking and dense paths do not apply to slots.

    Args:
        router: a :class:`~sparsemoe.routers.SoftMoERouter`.
        experts: an expert bank with the router's ``num_experts``.
        output_activation: as in :class:`MoELayer`.

    Shape:
        ``[..., m, d_model] -> [..., m, d_model]``: the last-but-one dimension indexes the
        ``m`` tokens of one input; the leading ones index inputs.
        :attr:`stats`: ``tokens_per_expert`` counts slots, ``importance`` sums the combine
        weights of each expert's slots.
    """

    def __init__(
        self, router: SoftMoERouter, experts: nn.Module, *,
        output_activation: str | Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if not isinstance(router, SoftMoERouter):
            raise TypeError(f"router must be a SoftMoERouter, got {type(router).__name__}")
        super().__init__(router, experts)
        self.output_activation = resolve_activation("output_activation", output_activation)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if x.dim() < 2:
            raise ValueError(f"x must be [..., m, d_model] (at least 2-D: tokens of an input), "
                             f"got shape {tuple(x.shape)}")
        n, p = self.num_experts, self.router.slots_per_expert
        m = x.shape[-2]
        inputs = x.reshape(-1, m, self.d_model)  # [G, m, d]
        g = inputs.shape[0]
        r = self.router(inputs)
        slots = r.dispatch_weights.transpose(1, 2).to(inputs.dtype) @ inputs  # [G, n·p, d]
        rows = slots.view(g, n, p, self.d_model).transpose(0, 1).reshape(n * g * p, -1)
        routes = equal_routes(n, g * p, x.device)
        y_rows = self.experts(rows, routes)  # [n·G·p, d_out], grouped by expert
        y_slots = y_rows.view(n, g, p, -1).transpose(0, 1).reshape(g, n * p, -1)
        y = r.combine_weights.to(y_slots.dtype) @ y_slots  # [G, m, d_out]
        if self.output_activation is not None:
            y = self.output_activation(y)
        importance = r.combine_weights.detach().sum((0, 1)).view(n, p).sum(1)
        self._record(r.logits.new_zeros(()),
                     MoEStats(importance, routes.tokens_per_expert.to(importance.dtype),
                              routes.tokens_per_expert))
        return y.reshape(*x.shape[:-1], y.shape[-1])

