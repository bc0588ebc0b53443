"""Deprecated name of :mod:`sparsemoe.dense_paths` (the layers with a dense path beside the
routed experts)."""

import warnings

from .dense_paths import ConditionalMoE, SharedExpertMoE

__all__ = ["ConditionalMoE", "SharedExpertMoE"]

warnings.warn("sparsemoe.shared is deprecated: import sparsemoe.dense_paths (or the layers from "
              "sparsemoe directly)", DeprecationWarning, stacklevel=2)
