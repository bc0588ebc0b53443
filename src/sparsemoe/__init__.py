"""sparsemoe: Mixture-of-Experts for PyTorch, exact to the papers and fast.

The public API. Layers: :class:`MoE` (Shazeer et al. 2017), :class:`HierarchicalMoE`
(its Appendix B), :class:`MoELayer` (any router with any expert bank, optionally with a
:class:`Capacity`), :class:`BASELayer`, :class:`SoftMoE`, :class:`SharedExpertMoE`
(DeepSeekMoE, Qwen2-MoE) and :class:`ConditionalMoE` (NLLB), all implementing
:class:`MoEModule`. Training helper: :func:`aux_loss`. The functional core is
:mod:`sparsemoe.functional`, the routers :mod:`sparsemoe.routers`, the expert banks
:mod:`sparsemoe.experts`, the token dispatch :mod:`sparsemoe.dispatch`, expert capacity
:mod:`sparsemoe.capacity`, conversion to and from ``transformers`` :mod:`sparsemoe.interop`,
the memory-saving optimiser of Appendix D :mod:`sparsemoe.optim`, expert parallelism over
``torch.distributed`` :mod:`sparsemoe.parallel`, global-batch and auxiliary-loss-free
balancing :mod:`sparsemoe.balancing`.
"""

from . import balancing, capacity, dispatch, functional, interop, optim, parallel, routers
from .capacity import Capacity
from .dense_paths import BASELayer, ConditionalMoE, SharedExpertMoE
from .experts import FeedForwardExperts, LinearExperts, ModuleListExperts
from .layers import HierarchicalMoE, MoE, MoELayer, SoftMoE
from .module import MoEModule, MoEStats, aux_loss
from .upcycle import upcycle

__version__ = "0.1.0"

__all__ = [
    "BASELayer",
    "Capacity",
    "ConditionalMoE",
    "FeedForwardExperts",
    "HierarchicalMoE",
    "LinearExperts",
    "MoE",
    "MoELayer",
    "MoEModule",
    "MoEStats",
    "ModuleListExperts",
    "SharedExpertMoE",
    "SoftMoE",
    "__version__",
    "aux_loss",
    "balancing",
    "capacity",
    "dispatch",
    "functional",
    "interop",
    "optim",
    "parallel",
    "routers",
    "upcycle",
]
