"""The papers' architectures built from sparsemoe layers."""

from .architectures import ARCHITECTURES, Architecture, build_model
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
from .transformer import MoETransformer, TransformerConfig, dense_twin
from .vit import VisionMoE, ViTConfig

__all__ = [
    "ARCHITECTURES",
    "PRESETS",
    "PRESET_SETS",
    "Architecture",
    "DeepMoE",
    "DeepMoEConfig",
    "FactorisedAttention",
    "LMConfig",
    "LSTMLanguageModel",
    "MoETransformer",
    "Seq2Seq",
    "Seq2SeqConfig",
    "TransformerConfig",
    "ViTConfig",
    "VisionMoE",
    "beam_search",
    "build_model",
    "dense_twin",
    "greedy_search",
    "matched_width",
    "mlp",
    "multiply_adds_per_token",
    "parameter_counts",
    "preset",
]
