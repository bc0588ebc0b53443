"""Routing as a discrete action trained with REINFORCE (Bengio, Bacon, Pineau and Precup 2015,
"Conditional Computation in Neural Networks for faster models", arXiv:1511.06297)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_number
from .base import LinearRouter, Routing


class ReinforceRouter(LinearRouter):
    """A stochastic policy over experts, trained by the score-function estimator.

    ``π(e | x) = Softmax(x·W_g)_e``. In training each token samples one expert ``a ~ π(·|x)``;
    at inference it takes ``argmax_e π``. The chosen expert's output enters with weight 1, so
    the task loss gives ``W_g`` no gradient; after the forward, the training loop calls
    :meth:`policy_loss` with each token's reward (e.g. minus its task loss):

    ``L_π = −(1/T) Σ_t (r_t − b)·log π(a_t | x_t)``, whose gradient is the REINFORCE estimate
    (Williams 1992) of ``−∇ E[r]``; ``b`` is a running mean of the rewards (a variance-reducing
    baseline, updated with ``baseline_decay``). Bengio et al. gate blocks with independent
    Bernoulli units; routing each token to one expert is the categorical form of the same
    estimator (routing as a discrete action).

    Args:
        d_model: input width ``d``.
        num_experts: ``n``.
        baseline_decay: the running mean's decay (0.9).
        w_importance, w_switch, w_z: see :class:`LinearRouter` (defaults 0).

    Shape:
        ``w_gate [d, n]``; forward ``[T, d] -> Routing`` with one choice per token;
        :meth:`policy_loss` takes ``reward [T]``.
    """

    def __init__(
        self, d_model: int, num_experts: int, *, baseline_decay: float = 0.9,
        w_importance: float = 0.0, w_switch: float = 0.0, w_z: float = 0.0,
    ) -> None:
        super().__init__(d_model, num_experts, w_importance=w_importance, w_switch=w_switch,
                         w_z=w_z)
        self.baseline_decay = check_number("baseline_decay", baseline_decay, low=0, high=1,
                                           high_open=True)
        self.register_buffer("baseline", torch.zeros(()))
        self.register_buffer("baseline_steps", torch.zeros((), dtype=torch.long))
        self.log_prob: Tensor | None = None

    def forward(self, x: Tensor) -> Routing:
        logits = self.logits(x)
        probs = logits.softmax(-1)
        if self.training and x.shape[0]:
            bad = ~torch.isfinite(probs).all(-1)
            if bool(bad.any()):
                raise ValueError(f"x: token {int(bad.nonzero()[0])} gives non-finite routing "
                                 f"probabilities (its features hold NaN or inf), so no expert "
                                 f"can be sampled for it")
            choice = torch.multinomial(probs.detach(), 1)
        else:
            choice = probs.argmax(-1, keepdim=True)
        self.log_prob = logits.log_softmax(-1).gather(1, choice)[:, 0]  # log π(a_t | x_t)
        return self.routing(logits, probs, choice, probs.new_ones(choice.shape))

    def policy_loss(self, reward: Tensor) -> Tensor:
        """``−mean_t (r_t − b)·log π(a_t|x_t)`` for the last forward; updates the baseline.

        Args:
            reward: ``[T]`` one reward per token of the last forward (treated as a constant).
        """
        if self.log_prob is None:
            raise RuntimeError("policy_loss needs a forward pass first")
        if not isinstance(reward, Tensor) or tuple(reward.shape) != tuple(self.log_prob.shape):
            got = tuple(reward.shape) if isinstance(reward, Tensor) else type(reward).__name__
            raise ValueError(f"reward must be a tensor of shape {tuple(self.log_prob.shape)} "
                             f"(one per token of the last forward), got {got}")
        reward = reward.detach().to(self.log_prob.dtype)
        baseline = self.baseline.to(reward.dtype)
        loss = -((reward - baseline) * self.log_prob).mean() if reward.numel() else reward.sum()
        if self.training and reward.numel():
            with torch.no_grad():
                # The first step seeds the running mean with the mean reward itself.
                decay = self.baseline_decay if int(self.baseline_steps) else 0.0
                self.baseline.mul_(decay).add_((1 - decay) * reward.mean())
                self.baseline_steps += 1
        return loss

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, baseline_decay={self.baseline_decay}"
