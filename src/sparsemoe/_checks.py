"""Argument validation shared by the public entry points.

Every error names the argument, what was expected and what was received.
Internals trust their callers; only constructors and public functions call these.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn


def check_int(name: str, value: object, *, minimum: int = 1, reason: str = "") -> int:
    """``value`` must be a Python int (not bool) of at least ``minimum`` (``reason``, e.g.
    ``"for top-2 gating"``, is said in the error)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        why = f" {reason}" if reason else ""
        raise ValueError(f"{name} must be >= {minimum}{why}, got {value}")
    return value


def check_bool(name: str, value: object) -> bool:
    """``value`` must be a bool (not an int standing in for one)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_top_k(name: str, k: object, num_experts: int) -> int:
    """``k`` experts per token out of ``num_experts``: 1 <= k <= num_experts."""
    check_int(name, k)
    if k > num_experts:
        raise ValueError(
            f"{name} must be <= the number of experts ({num_experts}), got {k}; "
            f"lower {name} or add experts"
        )
    return k


def check_float_tensor(name: str, t: object, *, ndim: int | None = None) -> Tensor:
    """``t`` must be a floating-point tensor, optionally of a given rank."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor, got dtype {t.dtype}; "
            f"convert it with {name}.float()"
        )
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def check_shape(name: str, t: Tensor, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def check_like(name: str, t: Tensor, ref_name: str, ref: Tensor, *, dtype: bool = True) -> None:
    """``t`` must live on ``ref``'s device (and have its dtype unless ``dtype=False``)."""
    if t.device != ref.device:
        raise ValueError(
            f"{name} is on device {t.device} but {ref_name} is on {ref.device}; "
            f"move them to the same device"
        )
    if dtype and t.dtype != ref.dtype:
        raise TypeError(
            f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; "
            f"cast one of them (or use torch.autocast)"
        )


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The lower-precision dtype autocast would use on ``device_type``, or None when off."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def check_number(
    name: str, value: object, *, low: float | None = None, high: float | None = None,
    low_open: bool = False, high_open: bool = False,
) -> float:
    """``value`` must be a real number (not bool) in the interval ``[low, high]``, with either
    end open when ``low_open``/``high_open``."""
    lo = "" if low is None else f"{'(' if low_open else '['}{low}, "
    hi = "" if high is None else f"{high}{')' if high_open else ']'}"
    if low is not None and high is None:
        expected = f"a number {'>' if low_open else '>='} {low}"
    elif high is not None and low is None:
        expected = f"a number {'<' if high_open else '<='} {high}"
    else:
        expected = f"a number in {lo}{hi}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high or value != value:  # NaN fails every comparison
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def check_expert_bank(name: str, bank: object) -> nn.Module:
    """``bank`` must be an expert bank: a module with an int ``num_experts`` that maps rows
    sorted by expert and their routes to outputs (:mod:`sparsemoe.experts`)."""
    if not isinstance(bank, nn.Module) or not isinstance(getattr(bank, "num_experts", None), int):
        raise TypeError(f"{name} must be an expert bank (a module with num_experts, such as "
                        f"FeedForwardExperts or ModuleListExperts), got {type(bank).__name__}")
    return bank


def check_choice(name: str, value: object, choices: tuple) -> object:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def renamed_argument(
    owner: str, old: str, old_value: object, new: str, new_value: object
) -> object:
    """The value of argument ``new``, also accepted under its deprecated name ``old``
    (with a DeprecationWarning). None means "not given" for both."""
    if old_value is None:
        return new_value
    warnings.warn(f"{owner}({old}=...) is deprecated: use {new}= (same meaning)",
                  DeprecationWarning, stacklevel=3)
    if new_value is not None:
        raise TypeError(f"{owner} got both {old}= and {new}=; give only {new}=")
    return old_value


def deprecated_alias(module: str, name: str, new: str, value: object) -> object:
    """``value``, which the deprecated attribute ``module.name`` stands for, with a
    DeprecationWarning that says to use ``new`` instead (for a module's ``__getattr__``)."""
    warnings.warn(f"{module}.{name} is deprecated: use {new}", DeprecationWarning, stacklevel=3)
    return value
