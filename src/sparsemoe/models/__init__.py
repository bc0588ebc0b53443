"""The papers' architectures built from sparsemoe layers."""

from .deep_moe import DeepMoE, DeepMoEConfig, matched_width, mlp
from .lstm_lm import (
    PRESET_SETS,
    PRESETS,
    LMConfig,
    LSTMLanguageModel,
    multiply_adds_per_token,
    parameter_counts,
    preset,
)

__all__ = [
    "PRESETS",
    "PRESET_SETS",
    "DeepMoE",
    "DeepMoEConfig",
    "LMConfig",
    "LSTMLanguageModel",
    "matched_width",
    "mlp",
    "multiply_adds_per_token",
    "parameter_counts",
    "preset",
]
