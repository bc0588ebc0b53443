"""Which ``transformers`` model families run their experts through ``"sparsemoe"``, checked.

:func:`families` finds, in the installed ``transformers``, every model family (a
``transformers.models.<family>`` package) whose modeling module defines an experts class
decorated with ``@use_experts_implementation`` (found by inspecting the classes, not from a
list). :func:`tiny_model` builds a small random decoder of a family from its config class's
defaults with the sizes shrunk, and :func:`check_family` compares its logits (the last hidden
state for a base model) with the experts through ``"sparsemoe"`` and through ``"eager"``
(``transformers``' own per-expert loop), optionally also the gradients of one training step.

``python -m sparsemoe.interop.coverage [--families a,b] [--grad]`` prints the table of
docs/transformers.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import sys
from dataclasses import dataclass

import torch
from torch import nn

from . import backend

# Config fields shrunk for a tiny model, where the config class has them.
_TINY = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 64,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 32,
    "shared_intermediate_size": 32,
    "dense_intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 16,
    "num_local_experts": 8,
    "num_experts": 8,
    "n_routed_experts": 8,
    "moe_num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_top_k": 2,
    "top_k_experts": 2,
    "moe_k": 2,
    "n_shared_experts": 1,
    "n_group": 2,
    "topk_group": 1,
    "first_k_dense_replace": 0,
    "num_dense_layers": 0,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "o_lora_rank": 16,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    "index_head_dim": 16,
    "index_n_heads": 2,
    "router_hidden_size": 32,
    "max_position_embeddings": 256,
    "sliding_window": 16,
    "mamba_d_state": 8,
    "mamba_n_heads": 8,
    "mamba_head_dim": 16,
    "mamba_num_heads": 8,
    "mamba_d_head": 16,
    "mamba_n_groups": 1,
    "n_groups": 1,
    "mamba_expand": 2,
    "expand": 2,
    "ssm_state_size": 8,
    "linear_num_heads": 4,
    "linear_head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "zero_expert_num": 2,
    "num_nextn_predict_layers": 0,
    "num_mtp_layers": 0,
    "vocab_size_per_layer_input": 128,
    "hidden_size_per_layer_input": 16,
    "enable_moe_block": True,
    "mlp_only_layers": [],
    "per_layer_config": {},
    "initializer_range": 0.1,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "use_mamba_kernels": False,
    "tie_word_embeddings": False,
}

_MODEL_SUFFIXES = ("TextForCausalLM", "ForCausalLM", "TextModel", "Model")


def _is_experts_class(obj: object) -> bool:
    """A class whose ``forward`` is the ``@use_experts_implementation`` dispatcher."""
    forward = getattr(obj, "forward", None)
    code = getattr(forward, "__code__", None)
    return inspect.isclass(obj) and code is not None and "experts_interface" in code.co_freevars


def families() -> dict[str, list[str]]:
    """Every model family of the installed ``transformers`` whose experts use the interface.

    Returns:
        ``{family: [experts class names]}``, sorted by family (the package name under
        ``transformers.models``).
    """
    from transformers.models.auto import configuration_auto

    found: dict[str, list[str]] = {}
    for model_type in configuration_auto.CONFIG_MAPPING_NAMES:
        family = configuration_auto.model_type_to_module_name(model_type)
        if family in found:
            continue
        try:
            module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        except ImportError:
            continue  # a family whose optional dependencies are missing
        names = [name for name, obj in vars(module).items()
                 if _is_experts_class(obj) and obj.__module__ == module.__name__]
        if names:
            found[family] = names
    return dict(sorted(found.items()))


def model_class(family: str) -> type[nn.Module]:
    """The text decoder of a family: its ``…TextForCausalLM``, ``…ForCausalLM``,
    ``…TextModel`` or ``…Model`` (the first that exists, in that order)."""
    from transformers import PreTrainedModel

    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    classes = [obj for obj in vars(module).values()
               if inspect.isclass(obj) and issubclass(obj, PreTrainedModel)
               and obj.__module__ == module.__name__]
    for suffix in _MODEL_SUFFIXES:
        # the shortest name with the suffix: the family's own class, not a variant of it
        for cls in sorted(classes, key=lambda c: len(c.__name__)):
            if cls.__name__.endswith(suffix) and "Vision" not in cls.__name__ and (
                    "Audio" not in cls.__name__):
                return cls
    raise LookupError(f"family {family!r} has no causal-LM or base model class")


# Families whose configs need more than the generic shrinking (validators of their own).
_FAMILY_FIELDS = {
    "zaya": {"num_experts_per_tok": 1},  # ZAYA supports top-1 only
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "deepseek_ocr2": {"mlp_layer_types": ["sparse", "sparse"]},
    "glm5_next": {"qk_rope_head_dim": 0},  # its sparse-attention layers have no RoPE
    "mimo_v2_flash": {"num_key_value_heads": 2},  # its attention needs grouped key/values
    "dots3_note": {"head_dim": 32},  # its sliding-window layers use qk_nope + qk_rope
    # a shared indexer needs a full one before it
    "hy_v4_vl": {"indexer_types": ["full", "shared"]},
    "hy_v4": {"indexer_types": ["full", "shared"]},
    # its indexer scores keys with the query heads of key head 0 (4 heads over 4 key heads: 1)
    "kolibri1_1": {"index_num_heads": 1},
    # its indexed-attention layers always build the QSA indexer, whose sizes default to unset
    "qwen4_exp": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16,
                  "indexer_budget": 8, "indexer_compress_ratio": 4},
}


def _shrink(name: str, default: object, layers: int, target: object) -> object:
    """The tiny value of one config field: :data:`_TINY`'s (a per-layer list of it where the
    default is a list), or a per-layer list cut to its last ``layers`` entries (the last layers
    are the MoE ones when the first are dense)."""
    if isinstance(default, list) and not isinstance(target, list) and target is not None:
        return [target] * len(default)
    if target is None and isinstance(default, list) and len(default) > layers and (
            name.endswith("_types")):
        return default[-layers:]
    return target


def _mrope(rope: dict, rotary_half: int) -> dict:
    """Multimodal RoPE sections re-split for a smaller rotary width (the first two equal, as
    ERNIE-4.5-VL's height and width sections must be)."""
    quarter = rotary_half // 4
    return {**rope, "mrope_section": [quarter, quarter, rotary_half - 2 * quarter]}


def tiny_config(config_class: type, family: str = "", **overrides):
    """``config_class`` with every size of :data:`_TINY` it has shrunk, float32, eager
    attention (and ``overrides`` on top).

    Per-layer lists (``layer_types``, ``mlp_layer_types``, ...) keep their last entries, so
    a family whose first layers are dense still has MoE layers.
    """
    defaults = config_class()
    layers = _TINY["num_hidden_layers"]
    # read from the fields, not attributes: a per-layer field refuses a global read
    known = {**vars(defaults), **defaults.to_dict()}
    for k in _TINY:
        if k not in known:
            with contextlib.suppress(AttributeError):
                known[k] = getattr(defaults, k)
    names = [k for k in known if k.endswith("_types")] + [k for k in _TINY if k in known]
    fields = {}
    for name in names:
        value = _shrink(name, known[name], layers, _TINY.get(name))
        if value is not None or name in _TINY:
            fields[name] = value
    if "qk_nope_head_dim" in fields:
        # multi-head latent attention derives its head_dim, unless head_dim is the rotary
        # width (LongCat-Flash's RoPE reads head_dim)
        rotary_width = known.get("qk_rope_head_dim")
        if rotary_width is not None and known.get("head_dim") == rotary_width:
            fields["head_dim"] = fields["qk_rope_head_dim"]
        else:
            fields.pop("head_dim", None)
    rope = getattr(defaults, "rope_parameters", None)
    modeling = sys.modules[config_class.__module__.replace(".configuration_", ".modeling_")]
    if isinstance(rope, dict) and "mrope_section" in inspect.getsource(modeling):
        rotary = fields.get("qk_rope_head_dim") or int(
            fields.get("head_dim", 16) * rope.get("partial_rotary_factor",
                                                  getattr(defaults, "partial_rotary_factor", 1.0)))
        fields["rope_parameters"] = _mrope(rope, rotary // 2)
    fields.update(_FAMILY_FIELDS.get(family, {}))
    fields.update(overrides)
    config = config_class(**fields)
    config._attn_implementation = "eager"
    return config


def tiny_model(family: str, seed: int = 0, **overrides) -> nn.Module:
    """A small random float32 model of ``family`` in evaluation mode (see :func:`tiny_config`)."""
    cls = model_class(family)
    config = tiny_config(cls.config_class, family, **overrides)
    torch.manual_seed(seed)
    model = cls._from_config(config, experts_implementation="eager", torch_dtype=torch.float32)
    return model.eval()


def _output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@dataclass
class FamilyResult:
    """One family's check: ``error`` is None when it ran; ``max_err`` the largest absolute
    difference of the outputs (and of the gradients with ``grad``); ``scale`` the largest
    change the experts make to the output (eager with and without them), which shows the
    comparison can see a wrong expert."""

    family: str
    model: str
    experts: str
    flags: str
    max_err: float | None = None
    grad_err: float | None = None
    scale: float | None = None
    error: str | None = None

    def passed(self, tol: float = 1e-5) -> bool:
        return (self.error is None and self.max_err is not None and self.max_err <= tol
                and (self.grad_err is None or self.grad_err <= tol)
                and self.scale is not None and self.scale > 100 * tol)


def _flags(module: nn.Module) -> str:
    """The decorator's layout flags of an experts module, in words."""
    if module.has_gate:
        words = ["[gate; up]" if module.is_concatenated else "interleaved"]
    else:
        words = ["no gate"]
    words += ["transposed"] * module.is_transposed + ["bias"] * module.has_bias
    words += ["post-expert norm"] * getattr(module, "has_post_expert_norm", False)
    return ", ".join(words)


def _experts_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` whose class is, or derives from, a decorated experts class
    (Ergo's experts wrap the decorated projections in a ``forward`` of their own)."""
    return [m for m in model.modules() if any(map(_is_experts_class, type(m).__mro__))]


def check_family(family: str, grad: bool = False, tokens: int = 12, seed: int = 0) -> FamilyResult:
    """Compare ``"sparsemoe"`` with ``"eager"`` on a tiny random model of ``family``.

    Args:
        family: a key of :func:`families`.
        grad: also compare the gradients of every parameter after one backward pass of
            ``logits.square().mean()`` (in training mode, dropout off).
        tokens: sequence length of the two random input sequences.
        seed: seed of the weights and the input.

    Returns:
        A :class:`FamilyResult` (exceptions are caught into ``error``).
    """
    result = FamilyResult(family, "", "", "")
    try:
        model = tiny_model(family, seed)
        result.model = type(model).__name__
        experts = _experts_modules(model)
        if not experts:
            raise LookupError("the tiny model has no experts module")
        result.experts = type(experts[0]).__name__
        result.flags = _flags(experts[0])
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, model.config.get_text_config().vocab_size, (2, tokens),
                            generator=gen)
        with torch.no_grad():
            eager = _output(model, ids)
            hooks = [m.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
                     for m in experts]
            without = _output(model, ids)
            for h in hooks:
                h.remove()
            model.set_experts_implementation(backend.NAME)
            ours = _output(model, ids)
        result.scale = (eager - without).abs().max().item()
        result.max_err = (eager - ours).abs().max().item()
        if grad:
            result.grad_err = _grad_error(model, ids)
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return result


def _grads(model: nn.Module, ids: torch.Tensor, implementation: str) -> dict[str, torch.Tensor]:
    model.set_experts_implementation(implementation)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same draws for a router that is random in training (PhiMoE)
    _output(model, ids).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _grad_error(model: nn.Module, ids: torch.Tensor) -> float:
    model.train()
    for m in model.modules():  # training mode for the routing, without dropout's randomness
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    eager = _grads(model, ids, "eager")
    ours = _grads(model, ids, backend.NAME)
    if eager.keys() != ours.keys():
        differ = sorted(eager.keys() ^ ours.keys())
        raise AssertionError(f"gradients of different parameters: {differ}")
    return max((eager[n] - ours[n]).abs().max().item() for n in eager)


def table(results: list[FamilyResult], tol: float = 1e-5) -> str:
    """The Markdown table of docs/transformers.md."""
    lines = ["| family | model | experts layout | max abs err (logits) | max abs err (grads) | "
             "experts' effect | result |", "|---|---|---|---|---|---|---|"]
    for r in results:
        def fmt(v):
            return "–" if v is None else f"{v:.1e}"
        verdict = "pass" if r.passed(tol) else f"fail: {r.error or 'tolerance'}"
        lines.append(f"| {r.family} | {r.model} | {r.flags} | {fmt(r.max_err)} | "
                     f"{fmt(r.grad_err)} | {fmt(r.scale)} | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", help="comma-separated families (default: all)")
    parser.add_argument("--grad", action="store_true", help="also compare gradients")
    args = parser.parse_args(argv)
    names = args.families.split(",") if args.families else list(families())
    from tqdm.auto import tqdm

    results = [check_family(f, grad=args.grad) for f in tqdm(names, desc="families")]
    print(table(results))
    print(f"\n{sum(r.passed() for r in results)} of {len(results)} families pass")


if __name__ == "__main__":
    main()
