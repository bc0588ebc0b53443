"""The Switch Transformer's headline metric in miniature: how much sooner an MoE Transformer
reaches the quality of its compute-matched dense twin.

Fedus et al. (2021, §3, Figure 1 and Table 1) report the training steps (and time) a Switch model
needs to reach the dense T5 model's final quality ("7× speed-up" for Switch-Base with 128
experts). From the runs of ``sparsemoe lm compare --arch transformer`` (their ``metrics.json``; the
comparison writes the table to ``dense_quality.md``, :mod:`sparsemoe.experiments.lm_report`),
for every MoE run whose dense twin (:func:`sparsemoe.models.transformer.dense_twin`) was trained
in the same comparison:

- **steps to dense quality**: the first step at which the MoE's validation perplexity reaches
  the twin's final one, linearly interpolated in log-perplexity between validations; the
  speed-up is the twin's steps over that;
- **test perplexity at equal steps** (both trained for the same steps and tokens);
- **validation perplexity at equal wall time**: both curves read at the shorter of the two
  training times (interpolated in log-perplexity over training seconds);
- **tokens/s** of both.

The curves are the periodic validations (the first ``eval_tokens`` of the validation text, the
same for every run), so the target and the crossing are measured on the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict

from ..models.transformer import TransformerConfig, dense_twin


def interpolate_log(xs: list[float], ys: list[float], x: float) -> float | None:
    """``y`` at ``x`` on the curve ``(xs, ys)`` (``xs`` increasing), linear in ``log y``; None
    outside ``[xs[0], xs[-1]]``."""
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    for i in range(1, len(xs)):
        if x <= xs[i]:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            w = 0.0 if x1 == x0 else (x - x0) / (x1 - x0)
            return math.exp((1 - w) * math.log(y0) + w * math.log(y1))
    return ys[-1]


def steps_to_reach(steps: list[float], perplexity: list[float], target: float) -> float | None:
    """The first step at which the curve ``(steps, perplexity)`` reaches ``target`` or below,
    interpolated linearly in log-perplexity from the validation before; None if it never does.
    A curve that starts at or below ``target`` reaches it at its first step."""
    for i, p in enumerate(perplexity):
        if p <= target:
            if i == 0:
                return float(steps[0])
            lo, hi = math.log(perplexity[i - 1]), math.log(p)
            w = (lo - math.log(target)) / (lo - hi)
            return steps[i - 1] + w * (steps[i] - steps[i - 1])
    return None


def dense_quality(moe: dict, dense: dict) -> dict:
    """The headline numbers of one MoE run against its dense twin's run (both ``metrics.json``
    dictionaries with a ``history`` of ``valid_step``, ``valid_perplexity``, ``valid_seconds``).

    Returns:
        ``target`` (the twin's final periodic validation perplexity), ``dense_steps``,
        ``steps_to_dense_quality`` (None if never reached), ``speedup`` (None likewise),
        ``test_perplexity`` and ``dense_test_perplexity`` (at equal steps), ``equal_time``
        (seconds), ``valid_perplexity_at_equal_time`` and ``dense_valid_perplexity_at_equal_time``,
        ``tokens_per_second`` and ``dense_tokens_per_second``.
    """
    mh, dh = moe["history"], dense["history"]
    if not dh["valid_perplexity"] or not mh["valid_perplexity"]:
        raise ValueError("both runs need periodic validations in their history, got "
                         f"{len(mh['valid_perplexity'])} and {len(dh['valid_perplexity'])}")
    target = dh["valid_perplexity"][-1]
    dense_steps = dh["valid_step"][-1]
    reached = steps_to_reach(mh["valid_step"], mh["valid_perplexity"], target)
    equal_time = min(mh["valid_seconds"][-1], dh["valid_seconds"][-1])
    return {
        "target": target, "dense_steps": dense_steps, "steps_to_dense_quality": reached,
        "speedup": dense_steps / reached if reached else None,
        "test_perplexity": moe["test_perplexity"],
        "dense_test_perplexity": dense["test_perplexity"],
        "equal_time": equal_time,
        "valid_perplexity_at_equal_time": interpolate_log(
            mh["valid_seconds"], mh["valid_perplexity"], equal_time),
        "dense_valid_perplexity_at_equal_time": interpolate_log(
            dh["valid_seconds"], dh["valid_perplexity"], equal_time),
        "tokens_per_second": moe["tokens_per_second"],
        "dense_tokens_per_second": dense["tokens_per_second"],
    }


def pair_with_twins(results: list[dict]) -> list[tuple[dict, dict]]:
    """``(moe run, its dense twin's run)`` for every MoE Transformer run whose twin (the same
    model config with dense FFNs, :func:`~sparsemoe.models.transformer.dense_twin`) is among
    ``results``."""
    by_config = {tuple(sorted(r["model_config"].items())): r for r in results}
    pairs = []
    for r in results:
        cfg = TransformerConfig(**r["model_config"])
        if cfg.router == "none":
            continue
        twin = by_config.get(tuple(sorted(asdict(dense_twin(cfg)).items())))
        if twin is not None:
            pairs.append((r, twin))
    return pairs


def _fmt(value: float | None, spec: str) -> str:
    return "never" if value is None else format(value, spec)


def dense_quality_table(results: list[dict]) -> str:
    """The markdown table of :func:`dense_quality` for every MoE run with its twin."""
    rows = ["| model | dense twin | steps to twin's final valid PPL (twin: steps) | speed-up | "
            "test PPL, equal steps (twin) | valid PPL at equal time (twin) | tokens/s (twin) |",
            "|---|---|---|---|---|---|---|"]
    for moe, dense in pair_with_twins(results):
        q = dense_quality(moe, dense)
        rows.append(
            f"| {moe['preset']} | {dense['preset']} | "
            f"{_fmt(q['steps_to_dense_quality'], '.0f')} ({q['dense_steps']}) | "
            f"{_fmt(q['speedup'], '.2f')}{'×' if q['speedup'] else ''} | "
            f"{q['test_perplexity']:.1f} ({q['dense_test_perplexity']:.1f}) | "
            f"{_fmt(q['valid_perplexity_at_equal_time'], '.1f')} "
            f"({_fmt(q['dense_valid_perplexity_at_equal_time'], '.1f')}) at "
            f"{q['equal_time']:.0f} s | "
            f"{q['tokens_per_second']:,.0f} ({q['dense_tokens_per_second']:,.0f}) |")
    return "\n".join(rows)

