"""The performance suite: one MoE layer's forward+backward against the compute-matched dense FFN,
the peers' implementations with the same weights, and the machine's own limits.

    python benchmarks/suite.py                                   # the full grid, ~30 min, 2 cores
    python benchmarks/suite.py --experts 8 64 --k 2 --repeats 3  # a quick look
    python benchmarks/suite.py --out runs/bench                  # also suite.json and suite.md
    python benchmarks/suite.py --device cuda --sections paper peers --out runs/gpu   # a GPU

On a GPU the defaults are the GPU grid: n = 8, 64, 512, float32 and bfloat16 (autocast: float32
parameters, bfloat16 matmuls, float32 routing), 8192 and 65,536 tokens, and the layer compiled
with ``torch.compile`` (inductor) as a third contender. On a CPU: n = 8…4096, float32, 8192
tokens, no compiled contender (``--dtypes``, ``--tokens``, ``--compile`` choose).

For every (dtype, tokens, experts n, k) of the grid (d_model 512, expert hidden 1024):

- **paper** — sparsemoe's :class:`~sparsemoe.MoE` (noisy top-k gating, ReLU experts, the
  balancing losses; hierarchical 64×64 :class:`~sparsemoe.HierarchicalMoE` at n = 4096, k
  split as k_primary × k_secondary = 1×1, 1×2, 2×2) against a dense ReLU FFN of hidden k·h, the
  compute-matched ideal, against the same layer under ``torch.compile`` (when asked), and
  against the roofline floor
  ``max(FLOPs / peak FLOP/s, bytes / bandwidth)``. FLOPs: 3× the forward's (the backward does
  two matmuls per forward matmul), gating included. Bytes: the minimum traffic of a
  forward+backward over the weights — each used expert's weights read in the forward, read
  again in the backward and their gradient written once (3× their bytes), same for the gates.
  Peak FLOP/s is a large square matmul (in the run's dtype) and bandwidth a large copy, both
  measured in this run; bytes count the compute dtype's element size.
- **peers** — a Mixtral block of ``transformers`` (softmax top-k router, SwiGLU experts) with
  each of its expert implementations (``eager`` loop, ``grouped_mm``, ``batched_mm``) against
  the sparsemoe layer converted from it (:func:`sparsemoe.interop.from_transformers`); the
  block's expert parameters are then views of the layer's, so both read the same weights in
  the same memory. Their outputs are checked equal before timing. ``batched_mm`` copies one
  expert's weights per (token, expert) pair; it runs only where that copy fits the memory budget.
  ``eager`` indexes the stacked parameters expert by expert, and the backward of every index is
  a zero-filled gradient the size of the whole stack: ~n² bank-sized writes per step (n = 64,
  k = 4: 25 GiB, 18 s a step on 2 cores); it runs while that stays under ``--eager-max-gb``.
- **memory** — peak resident memory of one forward+backward, each contender in a fresh process
  (``VmHWM`` after resetting it through ``/proc/self/clear_refs``), minus the resident memory
  before the step (parameters and input), plus the gradient memory the expert banks keep from
  the warm-up step (:class:`~sparsemoe.memory.GradientBuffers`), which the dense FFN allocates
  afresh. Reported with the parameter-gradient bytes the step also needs, so that the
  activations and temporaries can be read off.

Timings are medians of ``--repeats`` forward+backward steps after one warm-up; the contenders
alternate, each repeat starting with the next one, so that machine noise hits all alike. A
contender that fails (an implementation a device or dtype lacks, memory) is reported with its
error in the row and the table, and the others still run. The
expert hidden width is halved where 2× the SwiGLU experts (parameters and gradients) would not
fit in ``--memory-gb``; the table says which h ran (at n = 4096 this machine runs h = 256: the
bytes per multiply-add, hence the roofline regime, do not depend on h).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import sparsemoe

F32 = 4  # bytes
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
"""``--clock``: the wall clock, or the process's CPU time (one thread on a shared machine: the
time spent waiting for a core is left out)."""
_clock = CLOCK["wall"]


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _autocast(device_type: str, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype``, or no autocast for None."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def _describe(err: Exception) -> str:
    """``Type: first line of the message`` (at most 200 characters of it)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


def _median_time(fn, repeats: int, device: str) -> float:
    fn()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = _clock()
        fn()
        _synchronize(device)
        times.append(_clock() - start)
    return statistics.median(times)


def machine_limits(device: str, repeats: int = 5, dtype: torch.dtype = torch.float32,
                   size: int = 4096, copy_elements: int = 2**28) -> dict:
    """Peak matmul FLOP/s (``size``² in ``dtype``) and copy bandwidth (``copy_elements`` float32,
    1 GiB by default, bytes read + written)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    flops = 2 * size**3 / _median_time(lambda: torch.mm(a, b, out=out), repeats, device)
    src = torch.randn(copy_elements, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.nbytes / _median_time(lambda: dst.copy_(src), repeats, device)
    return {"matmul_flops": flops, "copy_bytes_per_s": bandwidth}


def hidden_for(n: int, d: int, hidden: int, memory_bytes: float) -> int:
    """The largest ``hidden / 2^i`` at which 2× a SwiGLU bank of n experts fits the budget."""
    h = hidden
    while h > 16 and 2 * n * 3 * d * h * F32 > memory_bytes:
        h //= 2
    return h


def hierarchical_split(n: int, k: int, threshold: int) -> tuple[int, int, int, int] | None:
    """``(groups, experts_per_group, k_primary, k_secondary)`` for n ≥ threshold, else None."""
    if n < threshold:
        return None
    a = math.isqrt(n)
    if a * a != n:
        raise SystemExit(f"--experts {n}: a hierarchical layer needs a square n, got {n}")
    k_primary = 2 if k >= 4 else 1
    return a, a, k_primary, k // k_primary


def paper_layer(d: int, n: int, k: int, h: int, hier) -> nn.Module:
    if hier is None:
        return sparsemoe.MoE(d, n, k, h)
    a, b, kp, ks = hier
    return sparsemoe.HierarchicalMoE(d, a, b, kp, ks, h)


def dense_ffn(d: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, hidden, bias=False), nn.ReLU(),
                         nn.Linear(hidden, d, bias=False))


def step_fn(model: nn.Module, x: torch.Tensor, grad: torch.Tensor, forward=None,
            autocast: torch.dtype | None = None):
    """One forward+backward with a fixed output gradient (plus the layer's aux loss); the
    forward under ``torch.autocast`` to ``autocast`` when given."""
    forward = model if forward is None else forward

    def run():
        model.zero_grad(set_to_none=True)
        x.grad = None
        with _autocast(x.device.type, autocast):
            y = forward(x)
        loss = (y.float() * grad).sum()
        aux = getattr(model, "aux_loss", None)
        if isinstance(aux, torch.Tensor):
            loss = loss + aux
        loss.backward()

    return run


def time_alternating(runs: dict, repeats: int, device: str, errors: dict | None = None) -> dict:
    """Median seconds per contender; repeat r starts with contender r (round robin).

    With ``errors`` given, a contender whose warm-up step raises is left out of the timing and
    its error recorded there (``{name: "Type: message"}``); without, the error propagates.
    """
    names = []
    for name in runs:  # warm-up
        try:
            runs[name]()
        except Exception as err:  # any failure is recorded; the other contenders still run
            if errors is None:
                raise
            errors[name] = _describe(err)
            _release(device)
            continue
        names.append(name)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            _synchronize(device)
            start = _clock()
            runs[name]()
            _synchronize(device)
            times[name].append(_clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def gating_madds(d: int, n: int, tokens: int, hier) -> int:
    """Forward multiply-adds of the gates (clean and noise logits)."""
    if hier is None:
        return 2 * tokens * d * n
    a, b, kp, _ = hier
    return 2 * tokens * d * a + 2 * tokens * kp * d * b


def roofline(madds: float, weight_bytes: float, limits: dict) -> float:
    """Seconds at the floor: 3× the forward FLOPs at peak, or 3× the weight bytes at bandwidth."""
    return max(3 * 2 * madds / limits["matmul_flops"],
               3 * weight_bytes / limits["copy_bytes_per_s"])


def _ms(med: dict, name: str) -> float | None:
    return 1e3 * med[name] if name in med else None


def _ratio(med: dict, a: str, b: str) -> float | None:
    return med[a] / med[b] if a in med and b in med else None


def _with_impl(bank: nn.Module, impl: str, run):
    """``run`` with the expert bank's grouped-matmul implementation switched to ``impl``."""
    def switched():
        saved, bank.impl = bank.impl, impl
        try:
            run()
        finally:
            bank.impl = saved
    return switched


def bench_paper(d, n, k, h, tokens, repeats, device, limits, hier,
                dtype: str = "float32", compile_backend: str | None = None,
                baseline_impl: str | None = None) -> dict:
    """One row of the paper section; ``dtype`` "bfloat16" runs every contender under autocast,
    ``compile_backend`` adds the layer compiled with ``torch.compile(backend=...)``,
    ``baseline_impl`` the same layer with its experts on another grouped-matmul implementation
    (before/after comparisons in one run)."""
    torch.manual_seed(0)
    moe = paper_layer(d, n, k, h, hier).to(device)
    dense = dense_ffn(d, k * h).to(device)
    x = torch.randn(tokens, d, device=device, requires_grad=True)
    grad = torch.randn(tokens, d, device=device)
    autocast = None if dtype == "float32" else DTYPES[dtype]
    runs = {"dense": step_fn(dense, x, grad, autocast=autocast),
            "sparsemoe": step_fn(moe, x, grad, autocast=autocast)}
    if baseline_impl:
        runs["baseline"] = _with_impl(moe.experts, baseline_impl,
                                      step_fn(moe, x, grad, autocast=autocast))
    if compile_backend:
        torch._dynamo.reset()
        runs["compiled"] = step_fn(moe, x, grad, torch.compile(moe, backend=compile_backend),
                                   autocast=autocast)
    errors: dict = {}
    med = time_alternating(runs, repeats, device, errors)
    with torch.no_grad(), _autocast(torch.device(device).type, autocast):
        moe(x)  # the eager layer's statistics (the compiled one may have run last)
    used = int((moe.stats.tokens_per_expert > 0).sum())
    bank = moe.experts
    size = DTYPES[dtype].itemsize
    expert_bytes = used * (bank.w1[0].numel() + bank.w2[0].numel()) * size
    gate_bytes = sum(p.numel() for p in moe.router.parameters()) * size
    madds = tokens * k * 2 * d * h + gating_madds(d, n, tokens, hier)
    floor = roofline(madds, expert_bytes + gate_bytes, limits)
    dense_floor = roofline(tokens * 2 * d * k * h, 2 * d * k * h * size, limits)
    return {
        "section": "paper", "dtype": dtype, "experts": n, "k": k, "hidden": h, "tokens": tokens,
        "hierarchical": None if hier is None else f"{hier[0]}x{hier[1]} k={hier[2]}x{hier[3]}",
        "tokens_per_expert": tokens * k / n, "experts_used": used,
        "dense_ms": _ms(med, "dense"), "sparsemoe_ms": _ms(med, "sparsemoe"),
        "compiled_ms": _ms(med, "compiled"), "compile_backend": compile_backend,
        "baseline_ms": _ms(med, "baseline"), "baseline_impl": baseline_impl,
        "sparsemoe_over_baseline": _ratio(med, "sparsemoe", "baseline"),
        "baseline_over_dense": _ratio(med, "baseline", "dense"),
        "roofline_ms": 1e3 * floor, "dense_roofline_ms": 1e3 * dense_floor,
        "sparsemoe_over_dense": _ratio(med, "sparsemoe", "dense"),
        "compiled_over_sparsemoe": _ratio(med, "compiled", "sparsemoe"),
        "compiled_over_dense": _ratio(med, "compiled", "dense"),
        "sparsemoe_over_roofline": med["sparsemoe"] / floor if "sparsemoe" in med else None,
        "dense_over_roofline": med["dense"] / dense_floor if "dense" in med else None,
        "max_over_mean_load": moe.stats.max_over_mean_load,
        "errors": errors,
    }


def mixtral_block(d: int, n: int, k: int, h: int):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=d, intermediate_size=h, num_local_experts=n,
                           num_experts_per_tok=k, router_jitter_noise=0.0)
    config._experts_implementation = "eager"
    block = MixtralSparseMoeBlock(config)  # parameters uninitialised outside a PreTrainedModel
    with torch.no_grad():
        for p in block.parameters():  # like nn.Linear: U(±1/√fan_in), fan_in the last dim
            p.uniform_(-p.shape[-1] ** -0.5, p.shape[-1] ** -0.5)
    return block


def sharing_layer(block: nn.Module) -> nn.Module:
    """The sparsemoe layer of a Mixtral block; the block's expert parameters then become views
    of the layer's (one copy of the weights in memory, row-major ``[n, d, 2h]`` and ``[n, h, d]``:
    the layout torch's grouped GEMM wants, and one the block's ``eager`` matmuls read without a
    copy)."""
    from sparsemoe.interop import from_transformers

    layer = from_transformers(block)
    block.experts.gate_up_proj = nn.Parameter(layer.experts.w1.detach().transpose(1, 2))
    block.experts.down_proj = nn.Parameter(layer.experts.w2.detach().transpose(1, 2))
    return layer


def bench_peers(d, n, k, h, tokens, repeats, device, memory_bytes, eager_max_bytes,
                dtype: str = "float32") -> dict:
    """One row of the peers section; ``dtype`` "bfloat16" runs every contender under autocast."""
    torch.manual_seed(0)
    autocast = None if dtype == "float32" else DTYPES[dtype]
    block = mixtral_block(d, n, k, h).to(device)
    layer = sharing_layer(block)
    x = torch.randn(tokens, d, device=device, requires_grad=True)
    grad = torch.randn(tokens, d, device=device)
    impls = ["grouped_mm"]
    # eager indexes the stacked parameters expert by expert; the backward of each index is a
    # full-size zero-filled gradient of the stack, summed over the experts hit: ~n² bank bytes.
    eager_bytes = n * n * 3 * d * h * F32
    if eager_bytes <= eager_max_bytes:
        impls.insert(0, "eager")
    batched_bytes = 2 * tokens * k * 3 * d * h * F32  # its per-pair weight copies and their grads
    if batched_bytes <= memory_bytes:
        impls.append("batched_mm")

    def hf(impl):
        def forward(inp):
            block.experts.config._experts_implementation = impl
            out = block(inp[None])
            return (out[0] if isinstance(out, tuple) else out)[0]
        return forward

    failures: dict = {}
    output_errors = {}
    with torch.no_grad(), _autocast(torch.device(device).type, autocast):
        ref = layer(x).float()
        for impl in impls:
            try:
                output_errors[impl] = float((hf(impl)(x).float() - ref).abs().max())
            except Exception as err:  # any failure is recorded; the other contenders still run
                failures[f"hf_{impl}"] = _describe(err)
    runs = {"sparsemoe": step_fn(layer, x, grad, autocast=autocast)}
    runs.update({f"hf_{impl}": step_fn(block, x, grad, hf(impl), autocast=autocast)
                 for impl in impls if f"hf_{impl}" not in failures})
    med = time_alternating(runs, repeats, device, failures)
    row = {"section": "peers", "dtype": dtype, "experts": n, "k": k, "hidden": h,
           "tokens": tokens, "tokens_per_expert": tokens * k / n,
           "sparsemoe_ms": _ms(med, "sparsemoe"),
           "max_abs_output_error": max(output_errors.values(), default=None),
           "errors": failures}
    for impl in ("eager", "grouped_mm", "batched_mm"):
        if impl in impls:
            row[f"hf_{impl}_ms"] = _ms(med, f"hf_{impl}")
            row[f"sparsemoe_over_hf_{impl}"] = _ratio(med, "sparsemoe", f"hf_{impl}")
        elif impl == "eager":
            row["hf_eager_ms"] = None
            row["hf_eager_skipped"] = (f"n = {n}: its backward would write "
                                       f"{eager_bytes / 2**30:,.0f} GiB of per-expert full-size "
                                       f"gradients > {eager_max_bytes / 2**30:,.0f} GiB")
        else:
            row[f"hf_{impl}_ms"] = None
            row[f"hf_{impl}_skipped"] = (f"needs {batched_bytes / 2**30:.0f} GiB of per-pair "
                                         f"weight copies > budget {memory_bytes / 2**30:.0f} GiB")
    return row


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


# glibc keeps freed memory in its heap, and after the first large free its mmap threshold grows
# to 32 MiB, so the resident set after a warm-up step already holds that step's freed
# activations and the next step's high-water mark counts only what goes beyond them: an
# arbitrary undercount. A fixed threshold (which also stops it adapting) and no trim threshold
# give every allocation of 64 KiB or more its own mapping, returned at free: the resident set
# then follows the live tensors. (Other C libraries ignore the variables.)
_PROBE_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def memory_probe(spec: dict) -> dict:
    """Run in a fresh process: bytes of one forward+backward above the resident set before it."""
    torch.manual_seed(0)
    d, n, k, h, tokens = spec["d"], spec["experts"], spec["k"], spec["hidden"], spec["tokens"]
    hier = spec["hierarchical"]
    if spec["model"] == "dense":
        model = dense_ffn(d, k * h)
    else:
        model = paper_layer(d, n, k, h, None if hier is None else tuple(hier))
        if spec["model"] == "sparsemoe-recompute":
            model.experts.recompute = True
    x = torch.randn(tokens, d, requires_grad=True)
    grad = torch.randn(tokens, d)
    run = step_fn(model, x, grad)
    run()  # warm-up: lazy initialisation, library workspaces
    model.zero_grad(set_to_none=True)
    x.grad = None
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = _status_kib("VmRSS")
    run()
    peak = _status_kib("VmHWM")
    params = sum(p.numel() for p in model.parameters()) * F32
    # The expert banks keep their gradients' memory across steps (GradientBuffers): resident
    # before this step, yet memory the step uses, as a fresh gradient is for the dense FFN.
    kept = sum(buffers.nbytes for m in model.modules()
               for buffers in getattr(m, "grad_buffers", {}).values())
    return {"peak_step_bytes": (peak - before) * 1024 + kept, "parameter_bytes": params}


def bench_memory(d, n, k, h, tokens, hier) -> dict:
    row = {"section": "memory", "experts": n, "k": k, "hidden": h, "tokens": tokens}
    for model in ("dense", "sparsemoe", "sparsemoe-recompute"):
        spec = {"d": d, "experts": n, "k": k, "hidden": h, "tokens": tokens,
                "hierarchical": hier, "model": model}
        out = subprocess.run([sys.executable, __file__, "--probe", json.dumps(spec)],
                             capture_output=True, text=True, check=True, env=_PROBE_ENV)
        probe = json.loads(out.stdout.strip().splitlines()[-1])
        row[f"{model}_peak_step_mb"] = probe["peak_step_bytes"] / 2**20
        row[f"{model}_parameter_mb"] = probe["parameter_bytes"] / 2**20
    for model in ("sparsemoe", "sparsemoe-recompute"):
        # Activations and temporaries: the step's peak less the gradients it allocates.
        act = row[f"{model}_peak_step_mb"] - row[f"{model}_parameter_mb"]
        dense_act = row["dense_peak_step_mb"] - row["dense_parameter_mb"]
        row[f"{model}_activations_over_dense"] = act / dense_act
    return row


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _table(title: str, columns: list[str], cells: list[list]) -> list[str]:
    """A Markdown section: ``### title``, a table of ``cells`` under ``columns``, a blank line."""
    return [f"### {title}", "", "| " + " | ".join(columns) + " |",
            "|" + "---|" * len(columns),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in cells), ""]


def _errors(rows: list[dict]) -> list[str]:
    """The contenders that failed, one line each, after a table (and its blank line)."""
    lines = [f"- {r['dtype']}, T = {r['tokens']}, n = {r['experts']}, k = {r['k']}: {name} "
             f"failed: {err}" for r in rows for name, err in r["errors"].items()]
    return ["", *lines, ""] if lines else [""]


def tables(rows: list[dict], limits: dict, header: str) -> str:
    """The Markdown report; ``limits`` maps each dtype to :func:`machine_limits`."""
    out = [header, ""]
    for dtype, lim in limits.items():
        out.append(f"Measured limits ({dtype}): matmul {lim['matmul_flops'] / 1e9:.0f} GFLOP/s, "
                   f"copy {lim['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write).")
    out.append("")
    paper = [r for r in rows if r["section"] == "paper"]
    if paper:
        out += _table(
            "The paper's layer vs the compute-matched dense FFN and the roofline",
            ["dtype", "T", "n", "k", "h", "tokens/expert", "dense ms", "sparsemoe ms",
             "compiled ms", "baseline ms", "roofline ms", "sparsemoe/dense",
             "compiled/sparsemoe", "baseline/dense", "sparsemoe/baseline", "sparsemoe/roofline",
             "dense/roofline", "max/mean load"],
            [[r["dtype"], r["tokens"],
              f"{r['experts']} ({r['hierarchical']})" if r["hierarchical"] else r["experts"],
              r["k"], r["hidden"], f"{r['tokens_per_expert']:.0f}", _fmt(r["dense_ms"], ".1f"),
              _fmt(r["sparsemoe_ms"], ".1f"), _fmt(r["compiled_ms"], ".1f"),
              _fmt(r["baseline_ms"], ".1f"), f"{r['roofline_ms']:.1f}",
              _fmt(r["sparsemoe_over_dense"], ".2f"), _fmt(r["compiled_over_sparsemoe"], ".2f"),
              _fmt(r["baseline_over_dense"], ".2f"), _fmt(r["sparsemoe_over_baseline"], ".2f"),
              _fmt(r["sparsemoe_over_roofline"], ".2f"), _fmt(r["dense_over_roofline"], ".2f"),
              f"{r['max_over_mean_load']:.2f}"]
             for r in paper])
        out[-1:] = _errors(paper)
    peers = [r for r in rows if r["section"] == "peers"]
    if peers:
        out += _table(
            "Same weights: sparsemoe vs transformers' Mixtral experts",
            ["dtype", "T", "n", "k", "h", "sparsemoe ms", "eager ms", "grouped_mm ms",
             "batched_mm ms", "sparsemoe/eager", "sparsemoe/grouped_mm", "sparsemoe/batched_mm",
             "max abs err"],
            [[r["dtype"], r["tokens"], r["experts"], r["k"], r["hidden"],
              _fmt(r["sparsemoe_ms"], ".1f"), _fmt(r["hf_eager_ms"], ".1f"),
              _fmt(r["hf_grouped_mm_ms"], ".1f"), _fmt(r["hf_batched_mm_ms"], ".1f"),
              _fmt(r.get("sparsemoe_over_hf_eager"), ".2f"),
              _fmt(r.get("sparsemoe_over_hf_grouped_mm"), ".2f"),
              _fmt(r.get("sparsemoe_over_hf_batched_mm"), ".2f"),
              _fmt(r["max_abs_output_error"], ".1e")]
             for r in peers])
        out[-1:] = _errors(peers)
        for impl in ("eager", "batched_mm"):
            skipped = [r[f"hf_{impl}_skipped"] for r in peers if f"hf_{impl}_skipped" in r]
            if skipped:
                out[-1:] = ["", f"{impl} not run: " + "; ".join(dict.fromkeys(skipped)) + ".", ""]
    memory = [r for r in rows if r["section"] == "memory"]
    if memory:
        out += _table(
            "Peak memory of one forward+backward (MB above parameters and input)",
            ["n", "k", "h", "dense", "sparsemoe", "recompute", "sparsemoe params",
             "activations sparsemoe/dense", "recompute/dense"],
            [[r["experts"], r["k"], r["hidden"], f"{r['dense_peak_step_mb']:.0f}",
              f"{r['sparsemoe_peak_step_mb']:.0f}", f"{r['sparsemoe-recompute_peak_step_mb']:.0f}",
              f"{r['sparsemoe_parameter_mb']:.0f}",
              f"{r['sparsemoe_activations_over_dense']:.2f}",
              f"{r['sparsemoe-recompute_activations_over_dense']:.2f}"]
             for r in memory])
    return "\n".join(out)


def run_cell(args, dtype, tokens, n, k, h, limits, memory_bytes, backend, with_memory):
    """The asked sections for one (dtype, tokens, n, k), each row printed as it is done."""
    rows = []
    hier = hierarchical_split(n, k, args.hierarchical_from)
    if "paper" in args.sections:
        rows.append(bench_paper(args.d, n, k, h, tokens, args.repeats, args.device, limits,
                                hier, dtype, backend, args.baseline_impl))
        print(json.dumps(rows[-1]), flush=True)
    _release(args.device)
    if "peers" in args.sections:
        rows.append(bench_peers(args.d, n, k, h, tokens, args.repeats, args.device,
                                memory_bytes, args.eager_max_gb * 2**30, dtype))
        print(json.dumps(rows[-1]), flush=True)
    _release(args.device)
    if "memory" in args.sections and args.device == "cpu" and with_memory:
        rows.append(bench_memory(args.d, n, k, h, tokens, hier))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--tokens", type=int, nargs="+", default=None,
                   help="default: 8192 on a CPU, 8192 and 65536 on a GPU")
    p.add_argument("--experts", type=int, nargs="+", default=None,
                   help="default: 8 64 512 4096 on a CPU, 8 64 512 on a GPU")
    p.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES),
                   help="bfloat16 runs under autocast; default: float32 on a CPU, both on a GPU")
    p.add_argument("--compile", default=None, choices=["none", "inductor", "aot_eager", "eager"],
                   help="torch.compile backend of the compiled contender (paper section); "
                        "default: inductor on a GPU, none on a CPU")
    p.add_argument("--clock", default="wall", choices=list(CLOCK),
                   help="cpu: time the contenders by the process's CPU time (with one thread)")
    p.add_argument("--baseline-impl", default=None,
                   choices=[i for i in sparsemoe.dispatch.GROUPED_MM_IMPLS if i != "auto"],
                   help="add the paper layer with its experts on this grouped-matmul "
                        "implementation as a contender (before/after in one run)")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--hierarchical-from", type=int, default=4096,
                   help="n at which the paper's layer is hierarchical (√n × √n)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sections", nargs="+", default=["paper", "peers", "memory"],
                   choices=["paper", "peers", "memory"])
    p.add_argument("--memory-gb", type=float, default=None,
                   help="budget for the experts and per-pair copies (default: 60%% of RAM)")
    p.add_argument("--eager-max-gb", type=float, default=256,
                   help="skip transformers' eager loop where its backward's per-expert full-size "
                        "gradients would exceed this (n=64: 25 GiB, 18 s a step here)")
    p.add_argument("--out", default=None, help="directory for suite.json and suite.md")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.probe:
        print(json.dumps(memory_probe(json.loads(args.probe))))
        return
    global _clock
    _clock = CLOCK[args.clock]
    gpu = args.device.startswith("cuda")
    tokens = args.tokens or ([8192, 65536] if gpu else [8192])
    experts = args.experts or ([8, 64, 512] if gpu else [8, 64, 512, 4096])
    dtypes = args.dtypes or (["float32", "bfloat16"] if gpu else ["float32"])
    backend = args.compile or ("inductor" if gpu else "none")
    backend = None if backend == "none" else backend
    if gpu:
        total = torch.cuda.get_device_properties(torch.device(args.device)).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    memory_bytes = (args.memory_gb * 2**30) if args.memory_gb else 0.6 * total
    device_name = torch.cuda.get_device_name(torch.device(args.device)) if gpu else \
        (platform.processor() or platform.machine())
    header = (f"## sparsemoe performance suite — {device_name}, {os.cpu_count()} cores, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}, device "
              f"{args.device}, {'/'.join(dtypes)}, d {args.d}, tokens "
              f"{'/'.join(map(str, tokens))}, compiled contender {backend}, "
              f"repeats {args.repeats}")
    print(header, flush=True)
    limits = {dt: machine_limits(args.device, dtype=DTYPES[dt]) for dt in dtypes}
    print(f"limits: {limits}", flush=True)
    rows = []
    for dtype in dtypes:
        for t in tokens:
            for n in experts:
                h = hidden_for(n, args.d, args.hidden, memory_bytes)
                for k in args.k:
                    rows += run_cell(args, dtype, t, n, k, h, limits[dtype], memory_bytes,
                                     backend, with_memory=dtype == dtypes[0] and t == tokens[0])
    report = tables(rows, limits, header)
    print(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "suite.json").write_text(json.dumps({"limits": limits, "rows": rows}, indent=2))
        (out / "suite.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
