"""Routers: token features in, a :class:`Routing` (experts, weights, losses) out.

One module per family; see ``docs/routers.md`` for the table of methods, papers, equations,
defaults and tested invariants.
"""

from .._checks import deprecated_alias
from .base import BalanceSums, GateHiddenLayer, LinearRouter, Router, Routing
from .base_layers import BASERouter
from .deepseek import DeepSeekV3Router
from .dense import ArgmaxRouter, SoftmaxRouter
from .expert_choice import ExpertChoiceRouter
from .gshard import GShardRouter
from .hash import HashRouter, balanced_hash_table
from .margin import MarginConstrainedRouter
from .noisy_top_k import HierarchicalNoisyTopKRouter, NoisyTopKRouter
from .reinforce import ReinforceRouter
from .soft_moe import SoftMoERouter, SoftMoEWeights
from .strictly_balanced import StrictlyBalancedRouter
from .switch import SwitchRouter
from .top_k import TopKRouter

__all__ = [
    "ArgmaxRouter",
    "BASERouter",
    "BalanceSums",
    "DeepSeekV3Router",
    "ExpertChoiceRouter",
    "GShardRouter",
    "GateHiddenLayer",
    "HashRouter",
    "HierarchicalNoisyTopKRouter",
    "LinearRouter",
    "MarginConstrainedRouter",
    "NoisyTopKRouter",
    "ReinforceRouter",
    "Router",
    "Routing",
    "SoftMoERouter",
    "SoftMoEWeights",
    "SoftmaxRouter",
    "StrictlyBalancedRouter",
    "SwitchRouter",
    "TopKRouter",
    "balanced_hash_table",
]


def __getattr__(name: str) -> object:
    """``SoftRouting``: the deprecated name of :class:`SoftMoEWeights`."""
    if name == "SoftRouting":
        return deprecated_alias(__name__, name, "sparsemoe.routers.SoftMoEWeights",
                                SoftMoEWeights)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
