"""The language-model architectures the LM trainer can build: one factory for all of them.

:mod:`sparsemoe.experiments.lm` trains any entry of :data:`ARCHITECTURES` the same way (metrics,
progress, checkpoints, resume, reports); an entry says how to configure, build and count a
model, and which optimiser and learning-rate schedule it trains with by default.

- ``"lstm"``: the Appendix C.1 LSTM language model of Shazeer et al. (2017),
  :mod:`sparsemoe.models.lstm_lm` (Adam, warm-up then step^-1/2);
- ``"transformer"``: :class:`~sparsemoe.models.transformer.MoETransformer` (AdamW, warm-up then
  cosine decay, as nanoGPT).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

from torch import nn

from .._checks import check_choice
from . import lstm_lm, transformer


@dataclass(frozen=True)
class Architecture:
    """How the LM trainer configures, builds and counts one kind of language model.

    Attributes:
        config: the model's config dataclass (it has a ``vocab_size`` field).
        presets, preset_sets: named field overrides, and named lists of preset names.
        build: ``config -> model`` with ``forward(tokens [B, L], state) -> (logits, state)``
            and ``moe_layers()``.
        multiply_adds_per_token: ``(config, training) -> count``.
        parameter_counts: ``model -> {"total", "body", "active_per_token"}``.
        num_experts: ``config -> experts per MoE layer`` (0 without MoE).
        check_preset: ``name -> name``, raising ValueError for a name not in ``presets``.
        optimizer, schedule: the defaults of
            :class:`~sparsemoe.experiments.lm.LMTrainConfig`.
        context_field: the config field the trainer sets to its ``bptt`` (or None).
    """

    config: type
    presets: dict[str, dict]
    preset_sets: dict[str, tuple[str, ...]]
    build: Callable[[object], nn.Module]
    multiply_adds_per_token: Callable[[object, bool], float]
    parameter_counts: Callable[[nn.Module], dict[str, int]]
    num_experts: Callable[[object], int]
    check_preset: Callable[[object], str]
    optimizer: str
    schedule: str
    context_field: str | None = None

    def model_config(self, preset: str | None, overrides: dict, vocab_size: int,
                     context: int | None = None) -> object:
        """The config of ``preset`` (None: the defaults) with ``overrides`` and the corpus's
        vocabulary size (and the trainer's context length)."""
        values = {**(self.presets[preset] if preset else {}), **overrides,
                  "vocab_size": vocab_size}
        if self.context_field is not None and context is not None:
            values.setdefault(self.context_field, context)
        return replace(self.config(), **values)

    def field_names(self) -> set[str]:
        return {f.name for f in fields(self.config)}


ARCHITECTURES: dict[str, Architecture] = {
    "lstm": Architecture(
        lstm_lm.LMConfig, lstm_lm.PRESETS, lstm_lm.PRESET_SETS, lstm_lm.LSTMLanguageModel,
        lstm_lm.multiply_adds_per_token, lstm_lm.parameter_counts,
        lambda cfg: cfg.num_experts if cfg.middle != "lstm" else 0, lstm_lm.check_preset,
        "adam", "rsqrt"),
    "transformer": Architecture(
        transformer.TransformerConfig, transformer.PRESETS, transformer.PRESET_SETS,
        transformer.MoETransformer, transformer.multiply_adds_per_token,
        transformer.parameter_counts,
        lambda cfg: cfg.num_experts if cfg.router != "none" else 0, transformer.check_preset,
        "adamw", "cosine",
        context_field="context"),
}


def architecture(name: str) -> Architecture:
    """The :data:`ARCHITECTURES` entry ``name``."""
    return ARCHITECTURES[check_choice("arch", name, tuple(ARCHITECTURES))]


def build_model(arch: str, cfg: object) -> nn.Module:
    """The language model of ``arch`` for its config ``cfg``."""
    spec = architecture(arch)
    if not isinstance(cfg, spec.config):
        raise TypeError(f"arch {arch!r} needs a {spec.config.__name__}, got "
                        f"{type(cfg).__name__}")
    return spec.build(cfg)
