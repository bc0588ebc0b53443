"""DeepSeek-V3 routing (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report", arXiv:2412.19437,
§2.1.2): sigmoid affinities, normalised top-k gates with a routed scaling factor,
group-limited (node-limited) routing, auxiliary-loss-free balancing (Wang et al. 2024,
"Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts", arXiv:2408.15664) and the
complementary sequence-wise balance loss."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from .._checks import check_bool, check_int, check_number, check_top_k
from .base import LinearRouter, Routing


def group_limited_scores(scores: Tensor, groups: int, top_groups: int) -> Tensor:
    """Group-limited routing: ``scores [T, n]`` with the experts outside each token's
    ``top_groups`` best groups set to −∞.

    The ``n`` experts form ``groups`` groups of ``n / groups`` consecutive experts; a group's
    score is the sum of its two best scores (DeepSeek-V3's node-limited routing, as in its
    released code and ``transformers``' ``DeepseekV3TopkRouter``). Ties between groups go to
    the lower group.

    Args:
        scores: ``[T, n]`` the selection scores ``s + b``.
        groups: ``G``, dividing ``n``; each group holds at least 2 experts.
        top_groups: ``M``, the groups kept per token.

    Returns:
        ``[T, n]``.
    """
    t, n = scores.shape
    grouped = scores.view(t, groups, n // groups)
    group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]
    kept = group_scores.topk(top_groups, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
    return grouped.masked_fill(~keep[:, :, None], -torch.inf).view(t, n)


def sequence_balance_loss(
    scores: Tensor, expert_indices: Tensor, sequence_ids: Tensor, valid: Tensor | None = None
) -> Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss, without its α (eqs. 17–20).

    For each sequence of ``T`` tokens, ``L = Σ_i f_i·P_i`` with
    ``f_i = N/(K·T) Σ_t 1[i ∈ TopK_t]`` and ``P_i = (1/T) Σ_t s'_{i,t}``, where
    ``s'_{i,t} = s_{i,t} / Σ_j s_{j,t}`` are the affinities normalised over the ``N`` experts;
    the result is the mean of ``L`` over the sequences that have tokens. Only ``P`` carries a
    gradient; a perfectly balanced sequence gives 1.

    Args:
        scores: ``[T, n]`` the affinities ``s`` (sigmoid scores in DeepSeek-V3).
        expert_indices: ``[T, k]`` the chosen experts, TopK_t.
        sequence_ids: ``[T]`` int64, the sequence of each token (any non-negative ids).
        valid: ``[T, k]`` bool, or None when every choice counts.

    Returns:
        A scalar (0 for no tokens).
    """
    t, n = scores.shape
    if t == 0:
        return scores.sum() * 0.0
    k = expert_indices.shape[1]
    _, seq = torch.unique(sequence_ids, return_inverse=True)  # ids 0..S-1
    num_seq = int(seq.max()) + 1
    length = torch.bincount(seq, minlength=num_seq).to(scores.dtype)  # [S]
    normalised = scores / scores.sum(-1, keepdim=True)
    p = scores.new_zeros(num_seq, n).index_add_(0, seq, normalised) / length[:, None]
    pairs = seq[:, None].expand(t, k).reshape(-1) * n + expert_indices.reshape(-1)
    ones = torch.ones(pairs.numel(), dtype=scores.dtype, device=scores.device)
    if valid is not None:
        ones = ones * valid.reshape(-1)
    counts = scores.new_zeros(num_seq * n).index_add_(0, pairs, ones).view(num_seq, n)
    f = counts * (n / k) / length[:, None]
    return (f * p).sum(1).mean()


def bias_update(load: Tensor, speed: float) -> Tensor:
    """The auxiliary-loss-free bias step ``Δb_i = γ·sign(mean(load) − load_i)`` (Wang et al.
    2024, Algorithm 1; DeepSeek-V3 eq. 16's update): an overloaded expert's bias falls by γ,
    an underloaded one's rises by γ, an expert at the mean keeps its bias.

    Args:
        load: ``[n]`` tokens per expert over the last step.
        speed: γ, the bias update speed.
    """
    return speed * torch.sign(load.mean() - load)


class DeepSeekV3Router(LinearRouter):
    """DeepSeek-V3 routing: sigmoid affinities, balanced by a per-expert bias.

    ``s_{i,t} = Sigmoid(u_tᵀ e_i)``; the ``K_r`` experts of largest ``s_{i,t} + b_i`` are
    chosen (within the ``top_groups`` best of ``groups`` groups when ``groups > 1``), and the
    gates are ``g_{i,t} = λ·s_{i,t} / Σ_{j∈TopK} s_{j,t}`` (``normalize=True``; ``λ·s_{i,t}``
    otherwise), λ the routed scaling factor (eqs. 13–16). The bias ``b`` only chooses; the gates
    use ``s`` without it.

    Auxiliary-loss-free balancing: ``b`` is a buffer, not a parameter. In training the router
    counts the pairs each expert received; :meth:`update_bias`, called after each optimiser
    step (:func:`sparsemoe.balancing.update_expert_biases` for every router of a model), moves
    ``b_i`` by ``γ·sign(mean load − load_i)`` over the pairs counted since the last update
    (summed over a process group's ranks when given, so that every rank applies the same step)
    and restarts the count. ``b`` is saved and loaded with the state dict.

    Auxiliary losses: the complementary sequence-wise balance loss
    ``w_sequence · Σ_i f_i·P_i`` per sequence, averaged over sequences
    (:func:`sequence_balance_loss`; DeepSeek-V3: α = 1e-4), and the
    losses of :class:`LinearRouter`, whose Switch loss takes ``P`` from the affinities
    normalised over the experts.

    Args:
        d_model: input width ``d``.
        num_experts: ``N_r``.
        k: ``K_r``, experts per token (DeepSeek-V3: 8 of 256).
        groups: ``G`` expert groups (DeepSeek-V3: 8); 1 turns group-limited routing off.
        top_groups: ``M`` groups kept per token (DeepSeek-V3: 4).
        normalize: divide the chosen affinities by their sum.
        routed_scaling_factor: λ (DeepSeek-V3: 2.5).
        bias_update_speed: γ (DeepSeek-V3: 0.001); 0 keeps ``b`` fixed.
        w_sequence: α of the sequence-wise loss (0 turns it off).
        w_importance, w_switch, w_z, bias: see :class:`LinearRouter` (``bias`` is a trained
            logit bias, unrelated to ``b``).

    Shape:
        ``w_gate [d, n]``, buffer ``expert_bias [n]``; forward
        ``([T, d], sequence_ids [T]) -> Routing`` with ``k`` choices.
    """

    uses_sequences = True

    def __init__(
        self, d_model: int, num_experts: int, k: int = 2, *, groups: int = 1,
        top_groups: int = 1, normalize: bool = True, routed_scaling_factor: float = 1.0,
        bias_update_speed: float = 1e-3, w_sequence: float = 1e-4, w_importance: float = 0.0,
        w_switch: float = 0.0, w_z: float = 0.0, bias: bool = False,
    ) -> None:
        super().__init__(d_model, num_experts, w_importance=w_importance, w_switch=w_switch,
                         w_z=w_z, bias=bias)
        self.k = check_top_k("k", k, num_experts)
        self.groups = check_int("groups", groups)
        self.top_groups = check_int("top_groups", top_groups)
        if num_experts % groups:
            raise ValueError(f"groups must divide num_experts = {num_experts}, got {groups}")
        if groups > 1 and num_experts // groups < 2:
            raise ValueError(f"group-limited routing scores a group by its best two experts: "
                             f"num_experts / groups must be >= 2, got {num_experts} / {groups}")
        if top_groups > groups:
            raise ValueError(f"top_groups must be <= groups = {groups}, got {top_groups}")
        if k > top_groups * (num_experts // groups):
            raise ValueError(f"k must be <= the experts of the kept groups, top_groups * "
                             f"num_experts / groups = {top_groups * (num_experts // groups)}, "
                             f"got {k}")
        self.normalize = check_bool("normalize", normalize)
        finite = {"high": math.inf, "high_open": True}
        self.routed_scaling_factor = check_number("routed_scaling_factor",
                                                  routed_scaling_factor, low=0, low_open=True,
                                                  **finite)
        self.bias_update_speed = check_number("bias_update_speed", bias_update_speed, low=0,
                                              **finite)
        self.w_sequence = check_number("w_sequence", w_sequence, low=0, **finite)
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        self.register_buffer("load_since_update", torch.zeros(num_experts), persistent=False)

    def forward(self, x: Tensor, sequence_ids: Tensor | None = None) -> Routing:
        logits = self.logits(x)
        scores = logits.sigmoid()  # s_{i,t}
        choice_scores = scores.detach() + self.expert_bias
        if self.groups > 1:
            choice_scores = group_limited_scores(choice_scores, self.groups, self.top_groups)
        choice = choice_scores.topk(self.k, dim=-1).indices
        weights = scores.gather(1, choice)
        if self.normalize:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights * self.routed_scaling_factor
        normalised = scores / scores.sum(-1, keepdim=True)  # s' of the balance losses
        r = self.routing(logits, normalised, choice, weights)
        if self.training and self.bias_update_speed:
            self.load_since_update += r.load.detach().to(self.load_since_update.dtype)
        if self.w_sequence:
            if sequence_ids is None:
                sequence_ids = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            seq = sequence_balance_loss(scores, choice, sequence_ids)
            r = r._replace(aux_loss=r.aux_loss + self.w_sequence * seq, sums=None)  # per sequence
        return r

    @torch.no_grad()
    def update_bias(self, process_group: dist.ProcessGroup | None = None) -> Tensor:
        """One auxiliary-loss-free step: ``b_i += γ·sign(mean load − load_i)`` over the pairs
        counted since the last update (:func:`bias_update`), then restart the count.

        Args:
            process_group: sum the counts over this group's ranks first (data or expert
                parallelism: every rank routes its own tokens and applies the same step).
                None: this process's counts only.

        Returns:
            ``[n]`` the load the step used.
        """
        load = self.load_since_update.clone()
        if process_group is not None:
            dist.all_reduce(load, group=process_group)
        if self.bias_update_speed:
            self.expert_bias += bias_update(load, self.bias_update_speed)
        self.load_since_update.zero_()
        return load

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, k={self.k}, groups={self.groups}, "
                f"top_groups={self.top_groups}, normalize={self.normalize}, "
                f"routed_scaling_factor={self.routed_scaling_factor}, "
                f"bias_update_speed={self.bias_update_speed}, w_sequence={self.w_sequence}")
