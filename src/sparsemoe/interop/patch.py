"""Whole ``transformers`` models with sparsemoe layers in place of their MoE blocks.

:func:`patch` replaces every MoE block of a loaded model by a :class:`PatchedBlock` holding a
sparsemoe layer with the same tensors (router included: swap ``block.layer.router`` for any of
:mod:`sparsemoe.routers` and fine-tune); :func:`unpatch` converts them back, so
``save_pretrained`` writes a checkpoint plain ``transformers`` loads.

The conversion is chosen by the block's class in :data:`BLOCK_CONVERTERS`; a new block type is
one entry there (its ``from_transformers``/``to_transformers`` pair).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from torch import Tensor, nn

from ..layers import MoELayer
from .blocks import (
    dbrx_from_transformers,
    dbrx_to_transformers,
    gpt_oss_from_transformers,
    gpt_oss_to_transformers,
)
from .transformers import from_transformers, to_transformers


class Converter(NamedTuple):
    """How one ``transformers`` block class becomes a sparsemoe layer and back.

    Attributes:
        to_sparsemoe: ``block -> MoELayer``.
        to_block: ``(layer, config) -> block``, ``config`` being the model's text config.
        returns_tuple: the block returns ``(hidden_states, router_scores)`` (GPT-OSS), not a
            tensor; the patched block returns ``(hidden_states, None)``.
    """

    to_sparsemoe: Callable[[nn.Module], MoELayer]
    to_block: Callable[[MoELayer, object], nn.Module]
    returns_tuple: bool = False


BLOCK_CONVERTERS: dict[str, Converter] = {
    "DeepseekV3MoE": Converter(from_transformers, to_transformers),
    "MixtralSparseMoeBlock": Converter(from_transformers, to_transformers),
    "OlmoeSparseMoeBlock": Converter(from_transformers, to_transformers),
    "Qwen2MoeSparseMoeBlock": Converter(from_transformers, to_transformers),
    "Qwen3MoeSparseMoeBlock": Converter(from_transformers, to_transformers),
    "DbrxFFN": Converter(dbrx_from_transformers, dbrx_to_transformers),
    "GptOssMLP": Converter(gpt_oss_from_transformers, gpt_oss_to_transformers,
                           returns_tuple=True),
}
"""Block class name -> :class:`Converter`."""


class PatchedBlock(nn.Module):
    """A sparsemoe layer standing where a ``transformers`` MoE block was.

    Args:
        layer: the sparsemoe layer (``.layer``; its router and experts are ordinary modules).
        block_class: the replaced block's class name (the key of :data:`BLOCK_CONVERTERS`).
        config: the model's (text) config, for :func:`unpatch`.

    Shape:
        ``[..., d] -> [..., d]`` (a ``(tensor, None)`` pair where the block returned a pair).
        The model's ``output_router_logits`` records nothing from a patched block; the layer's
        own ``aux_loss`` and ``stats`` hold its balancing loss and load.
    """

    def __init__(self, layer: MoELayer, block_class: str, config) -> None:
        super().__init__()
        self.layer = layer
        self.block_class = block_class
        self.config = config

    def forward(self, hidden_states: Tensor) -> Tensor | tuple[Tensor, None]:
        y = self.layer(hidden_states)
        return (y, None) if BLOCK_CONVERTERS[self.block_class].returns_tuple else y

    def extra_repr(self) -> str:
        return f"block_class={self.block_class!r}"


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def patch(model: nn.Module) -> nn.Module:
    """Replace every MoE block of a ``transformers`` model by a :class:`PatchedBlock`.

    In evaluation mode the patched model computes the same outputs (within float32 rounding).

    Args:
        model: a ``transformers`` model whose blocks are in :data:`BLOCK_CONVERTERS`
            (Mixtral, DBRX, OLMoE, Qwen2-MoE, Qwen3-MoE, GPT-OSS, DeepSeek-V3).

    Returns:
        ``model``, changed in place.

    Raises:
        TypeError: the model has no MoE block sparsemoe converts (the message names its
            ``model_type``).
    """
    config = _text_config(model)
    blocks = [(name, m) for name, m in model.named_modules()
              if type(m).__name__ in BLOCK_CONVERTERS]
    if not blocks:
        raise TypeError(f"model must be a transformers model with MoE blocks of "
                        f"{sorted(BLOCK_CONVERTERS)}; model_type "
                        f"{getattr(config, 'model_type', None)!r} ({type(model).__name__}) "
                        "has none")
    for name, block in blocks:
        kind = type(block).__name__
        layer = BLOCK_CONVERTERS[kind].to_sparsemoe(block)
        _replace(model, name, PatchedBlock(layer, kind, config))
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Put ``transformers`` blocks back in place of every :class:`PatchedBlock` (their current
    weights, e.g. after fine-tuning), so ``save_pretrained`` writes a plain checkpoint.

    Raises:
        TypeError, ValueError: a layer no longer fits its block (another router or expert
            bank, different sizes); the message names what differs.
    """
    patched = [(name, m) for name, m in model.named_modules() if isinstance(m, PatchedBlock)]
    if not patched:
        raise ValueError(f"model has no PatchedBlock to unpatch ({type(model).__name__}); "
                         "call sparsemoe.interop.patch(model) first")
    for name, p in patched:
        _replace(model, name, BLOCK_CONVERTERS[p.block_class].to_block(p.layer, p.config))
    return model
