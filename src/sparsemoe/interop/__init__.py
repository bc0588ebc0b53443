"""Conversion between sparsemoe layers and the MoE blocks of other libraries.

:func:`from_transformers` and :func:`to_transformers` convert the MoE blocks of Hugging Face
``transformers`` (an optional dependency: ``pip install sparsemoe[hf]``); :func:`to_mixtral` and
:func:`from_mixtral` convert a whole :class:`~sparsemoe.models.MoETransformer` to and from a
``MixtralForCausalLM``.
"""

from .mixtral import from_mixtral, mixtral_config, to_mixtral
from .transformers import SUPPORTED_BLOCKS, from_transformers, to_transformers

__all__ = ["SUPPORTED_BLOCKS", "from_mixtral", "from_transformers", "mixtral_config",
           "to_mixtral", "to_transformers"]
