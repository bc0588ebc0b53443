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
from .seq2seq import FactorisedAttention, Seq2Seq, Seq2SeqConfig, beam_search, greedy_search

__all__ = [
    "PRESETS",
    "PRESET_SETS",
    "DeepMoE",
    "DeepMoEConfig",
    "FactorisedAttention",
    "LMConfig",
    "LSTMLanguageModel",
    "Seq2Seq",
    "Seq2SeqConfig",
    "beam_search",
    "greedy_search",
    "matched_width",
    "mlp",
    "multiply_adds_per_token",
    "parameter_counts",
    "preset",
]
