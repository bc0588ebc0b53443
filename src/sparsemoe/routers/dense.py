"""Classical gating: every expert weighted by a softmax, or the single arg-max expert.

The meta-pi network and the adaptive mixtures of local experts (Jacobs, Jordan, Nowlan and
Hinton 1991) gate with ``G(x) = Softmax(x·W_g)`` over all experts; the hard MoE takes only
``argmax_i G(x)_i``. The Deep Mixture of Experts (Eigen, Ranzato and Sutskever 2013) gates each
layer with a one-hidden-layer network, ``G(x) = Softmax(B·relu(A·x + a) + b)``:
``SoftmaxRouter(d, n, gate_hidden=h, bias=True)``.
"""

from __future__ import annotations

from torch import Tensor

from .base import LinearRouter, Routing, all_experts_grid


class SoftmaxRouter(LinearRouter):
    """Dense softmax gating: ``y = Σ_{i=1}^{n} G(x)_i E_i(x)``, ``G(x) = Softmax(x·W_g)``, or
    with ``gate_hidden=h`` the gating network of the Deep Mixture of Experts (Eigen et al. 2013),
    ``G(x) = Softmax(B·relu(A·x + a) + b)`` (``A = w_hidden``, ``B = w_gate``).

    Every expert runs on every token (``k = n``); the gate gets its gradient through the
    output. No auxiliary loss by default (the classical mixtures have none).

    Args:
        d_model: input width ``d``.
        num_experts: ``n``.
        w_importance, w_switch, w_z, bias, gate_hidden: see :class:`LinearRouter` (defaults 0, no
            bias, no hidden layer).

    Shape:
        ``w_gate [d, n]`` (``[h, n]`` with a hidden layer); forward ``[T, d] -> Routing`` with
        ``k = n`` choices per token.
    """

    def forward(self, x: Tensor) -> Routing:
        logits = self.logits(x)
        probs = logits.softmax(-1)
        grid = all_experts_grid(x.shape[0], self.num_experts, x.device)
        return self.routing(logits, probs, grid, probs)


class ArgmaxRouter(LinearRouter):
    """Hard gating: ``y = E_{a(x)}(x)`` with ``a(x) = argmax_i (x·W_g)_i`` and weight 1.

    The output carries no gradient to ``W_g`` (the arg-max is piecewise constant); train the
    gate through an auxiliary loss (``w_switch`` or ``w_importance``, which see the softmax
    probabilities) or with the EM-trained classical estimators.

    Args:
        d_model: input width ``d``.
        num_experts: ``n``.
        w_importance, w_switch, w_z, bias, gate_hidden: see :class:`LinearRouter` (defaults 0, no
            bias, no hidden layer).

    Shape:
        ``w_gate [d, n]`` (``[h, n]`` with a hidden layer); forward ``[T, d] -> Routing`` with
        one choice per token.
    """

    def forward(self, x: Tensor) -> Routing:
        logits = self.logits(x)
        probs = logits.softmax(-1)
        choice = logits.argmax(-1, keepdim=True)
        return self.routing(logits, probs, choice, probs.new_ones(choice.shape))
