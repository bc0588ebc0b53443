"""Conversion between sparsemoe layers and the MoE blocks of other libraries.

:func:`from_transformers` and :func:`to_transformers` convert the MoE blocks of Hugging Face
``transformers`` (an optional dependency: ``pip install sparsemoe[hf]``); :func:`register`
makes ``"sparsemoe"`` an experts implementation of ``transformers``
(:mod:`sparsemoe.interop.backend`); :func:`patch` and :func:`unpatch` put sparsemoe layers in
place of the MoE blocks of a whole model and back (:mod:`sparsemoe.interop.patch`).
"""

from .patch import BLOCK_CONVERTERS, PatchedBlock, patch, unpatch
from .transformers import SUPPORTED_BLOCKS, from_transformers, to_transformers


def register() -> None:
    """Register ``"sparsemoe"`` in ``transformers``' ``ExpertsInterface`` (see
    :func:`sparsemoe.interop.backend.register`; importing that module does the same)."""
    from . import backend

    backend.register()


__all__ = [
    "BLOCK_CONVERTERS",
    "SUPPORTED_BLOCKS",
    "PatchedBlock",
    "from_transformers",
    "patch",
    "register",
    "to_transformers",
    "unpatch",
]
