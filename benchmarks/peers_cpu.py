"""Forward+backward time of one MoE layer on CPU, float32: sparsemoe against other libraries.

Every contender gets the same router weight, the same ReLU expert weights, the same input ``x``
and the same output gradient ``g``; before any timing, each peer's output is compared with
sparsemoe's (max abs error; ≤ 1e-5 expected where the functions match). A timed step is: zero
the gradients (``set_to_none``), ``y = layer(x)`` (tuples unwrapped), ``loss = (y·g).sum()``
plus the layer's auxiliary loss if it returns one, ``loss.backward()``. One warm-up step each,
then ``--repeats`` steps with the contenders in round robin (repeat ``r`` starts with contender
``r``); the table gives medians and the ratio sparsemoe / peer (< 1: sparsemoe is faster).

The sparsemoe contender is
``MoELayer(TopKRouter(d, n, k, normalize=...), FeedForwardExperts(n, d, h, activation="relu"))``
(dropless), with ``normalize`` chosen per peer to match its gate:

========================  =====================================================  ==========
peer                      gate (softmax p = softmax(x·W_g) over all n experts)   normalize
========================  =====================================================  ==========
deepspeed                 top-1: p of the arg-max expert (top1gating);           k > 1
                          top-2: the two p renormalised (top2gating)
torchtitan                top-k of p; route_norm=(k > 1) (k = 1: p itself)       k > 1
pytorch-mixtures          softmax over the top-k *logits* (k = 1: weight 1)      True
st-moe-pytorch            top-n of p renormalised (n ≥ 2 only)                   True
mixture-of-experts        top-2 of p renormalised (+1e-9 in the denominator)     True
========================  =====================================================  ==========

Peer settings (all dropless, deterministic):

- ``deepspeed``: ``deepspeed.moe.layer.MoE(d, expert, n, ep_size=1, k, drop_tokens=False,
  top2_2nd_expert_sampling=False, use_rts=False)``, experts ``Linear-ReLU-Linear`` (no bias)
  deep-copied ``n`` times and run in a Python loop on ``[capacity, d]`` buffers (capacity =
  the largest expert load); torch.distributed initialised with gloo, world size 1. k ∈ {1, 2}.
- ``torchtitan``: its ``MoE`` (``TokenChoiceTopKRouter`` softmax, ``LocalTokenDispatcher``,
  ``torch._grouped_mm``) with ``GroupedExperts`` replaced by an **fp32 ReLU subclass**
  (``relu(x·w1ᵀ)·w2ᵀ``, same dispatch): the stock experts are SwiGLU computed in bfloat16
  (hard-coded casts), a different function; ``--peers torchtitan-stock`` times those too
  ("function differs").
- ``pytorch-mixtures``: ``TopkMoE`` (``expert_fn="ff"``, ReLU; its Linear biases are zeroed,
  still trained), a Python loop over experts with ``torch.where``; no auxiliary loss.
- ``st-moe-pytorch``: ``MoE(gating_top_n=k, threshold_train=threshold_eval=1e-9,
  capacity_factor_train=capacity_factor_eval=n)`` with bias-free ReLU experts: every second
  expert is kept and capacity = sequence length, so the dense ``[b, L, n, L]`` dispatch runs
  every expert on all ``T`` rows (n/k times the needed expert FLOPs).
- ``mixture-of-experts`` (lucidrains): ``MoE(second_policy_*="all", capacity_factor_*=n)``;
  top-2 only; the same dense dispatch as st-moe.

The 3-D peers see ``x`` as ``[T / L, L, d]`` with ``L = --seq-len``; only st-moe-pytorch and
mixture-of-experts depend on ``L`` (their capacity is per sequence). A contender is skipped for
a configuration when the memory already in use (the process's resident set: the shared weights
and every contender built so far) plus its predicted memory (its parameters, their gradients
and its activations, formulas from each library's code, see ``predicted_bytes``) exceeds
``--max-gib``, or when a step takes (or is predicted to take) over ``--limit-s`` seconds; the
reason is printed and put in the table. Gradients are freed after every step, outside the
timed region, so that only one contender's gradients exist at a time. With ``--json`` the
results so far are written after every configuration.

Install the peers into a separate virtual environment (they pin other torch versions; keep
the CPU torch it was created with)::

    python -m venv /tmp/peers && /tmp/peers/bin/pip install torch==2.13.0
    /tmp/peers/bin/pip install numpy tqdm
    /tmp/peers/bin/pip install --no-deps -e .                      # sparsemoe
    /tmp/peers/bin/pip install hjson ninja packaging psutil py-cpuinfo pydantic msgpack einops
    DS_BUILD_OPS=0 /tmp/peers/bin/pip install --no-build-isolation deepspeed==0.19.8
    /tmp/peers/bin/pip install --no-deps torchtitan==0.3.0 spmd_types==0.2.3 triton
    /tmp/peers/bin/pip install tyro
    /tmp/peers/bin/pip install --no-deps pytorch-mixtures==0.1.5
    /tmp/peers/bin/pip install --no-deps st-moe-pytorch==0.1.8 CoLT5-attention
    /tmp/peers/bin/pip install einops beartype
    /tmp/peers/bin/pip install mixture-of-experts==0.2.3

(triton is only needed to import torchtitan's MoE module. DeepSpeed builds no op at install;
on its first ``init_distributed`` it JIT-compiles its small CPU ``deepspeed_shm_comm`` op, which
needs a C++ compiler and is cached in ``~/.cache/torch_extensions``.) Run::

    /tmp/peers/bin/python benchmarks/peers_cpu.py --json peers_cpu.json   # also peers_cpu.md
    OMP_NUM_THREADS=1 /tmp/peers/bin/python benchmarks/peers_cpu.py --d 64 --hidden 128 \
        --tokens 256 --experts 8 --k 1 2 --repeats 2                       # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sparsemoe
from sparsemoe.experts import FeedForwardExperts
from sparsemoe.routers import TopKRouter

PEERS = ["deepspeed", "torchtitan", "pytorch-mixtures", "st-moe-pytorch", "mixture-of-experts"]
OPTIONAL_PEERS = ["torchtitan-stock"]
F32 = 4  # bytes


@dataclass
class Weights:
    """The shared parameters in sparsemoe's layout: ``w_gate [d, n]``, ``w1 [n, d, h]``,
    ``w2 [n, h, d]``."""

    w_gate: Tensor
    w1: Tensor
    w2: Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        n, d, h = self.w1.shape
        return d, n, h


@dataclass
class Config:
    d: int
    h: int
    tokens: int
    n: int
    k: int
    seq_len: int
    max_load: int  # the largest number of (token, expert) pairs on one expert

    @property
    def batch(self) -> int:
        return self.tokens // self.seq_len


@dataclass
class Contender:
    name: str
    layer: nn.Module
    forward: Callable[[Tensor], tuple[Tensor, Tensor | None]]  # x [T, d] -> (y [T, d], aux)
    normalize: bool | None = None  # the sparsemoe variant it is compared with
    note: str = ""
    function_differs: str = ""  # non-empty: no error check, the reason instead
    times: list[float] = field(default_factory=list)


def sparsemoe_layer(w: Weights, k: int, normalize: bool) -> nn.Module:
    d, n, h = w.shape
    layer = sparsemoe.MoELayer(TopKRouter(d, n, k, normalize=normalize),
                               FeedForwardExperts(n, d, h, activation="relu"))
    with torch.no_grad():
        layer.router.w_gate.copy_(w.w_gate)
        layer.experts.w1.copy_(w.w1)
        layer.experts.w2.copy_(w.w2)
    return layer


def relu_mlp(d: int, h: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, h, bias=False), nn.ReLU(), nn.Linear(h, d, bias=False))


def copy_mlps(mlps, w: Weights) -> None:
    """nn.Linear stores ``[out, in]``: expert i gets ``w1[i]ᵀ`` and ``w2[i]ᵀ``."""
    with torch.no_grad():
        for i, mlp in enumerate(mlps):
            mlp[0].weight.copy_(w.w1[i].T)
            mlp[2].weight.copy_(w.w2[i].T)


# ---------------------------------------------------------------------------------------------
# peers: gate semantics (the ``normalize`` of the matching sparsemoe router), unsupported k,
# predicted memory, builders


def normalize_for(peer: str, k: int) -> bool:
    if peer in ("deepspeed", "torchtitan", "torchtitan-stock"):
        return k > 1  # top1gating / route_norm=False: p itself; top-2: renormalised
    return True  # softmax over the top-k logits, or top-n of p renormalised


def unsupported(peer: str, k: int) -> str:
    if peer == "deepspeed" and k > 2:
        return "k > 2 goes through topkgating, not covered here"
    if peer == "st-moe-pytorch" and k < 2:
        return "gating_top_n must be >= 2"
    if peer == "mixture-of-experts" and k != 2:
        return "top-2 only"
    return ""


def predicted_bytes(peer: str, c: Config) -> int:
    """Bytes a contender adds: its parameters and their gradients, and its peak activations
    from each library's code (float32; rough upper estimates).

    Expert rows keep input, output and their gradients (4·d) plus the hidden layer, its ReLU
    and its gradient (3·h) per row.
    """
    return 2 * F32 * (2 * c.n * c.d * c.h + c.d * c.n) + _activation_bytes(peer, c)


def _activation_bytes(peer: str, c: Config) -> int:
    row = F32 * (4 * c.d + 3 * c.h)
    if peer == "deepspeed":
        # [n, capacity, d] buffers with capacity = the largest load (drop_tokens=False), and
        # about ten [T, n] int64 masks / cumsums in top1gating / top2gating.
        return c.n * c.max_load * row + 10 * 8 * c.tokens * c.n
    if peer in ("st-moe-pytorch", "mixture-of-experts"):
        # capacity = min(L, int(L·cf/n)) = L per sequence: [b, L, n, L] combine and dispatch
        # tensors (st-moe: a [k, b, L, n, L] product summed over k, the dispatch, its
        # straight-through copy and both gradients; lucidrains: two products, their sum,
        # dispatch and gradients), and every expert runs on all b·L = T rows.
        dense = c.tokens * c.n * c.seq_len * F32
        factor = c.k + 6 if peer == "st-moe-pytorch" else 7
        return factor * dense + c.n * c.tokens * row
    return c.k * c.tokens * row  # grouped or looped dispatch: k·T rows


def resident_bytes() -> int:
    """This process's resident set size (Linux ``/proc/self/statm``; 0 where it is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def predicted_rows(peer: str, c: Config) -> int:
    """Expert rows a step computes (sparsemoe: k·T), to predict the time from sparsemoe's."""
    if peer in ("st-moe-pytorch", "mixture-of-experts"):
        return c.n * c.tokens
    if peer == "deepspeed":
        return c.n * c.max_load
    return c.k * c.tokens


def three_d(c: Config) -> Callable[[Tensor], Tensor]:
    return lambda x: x.view(c.batch, c.seq_len, c.d)


_DIST_READY = False


def init_deepspeed() -> None:
    global _DIST_READY
    if _DIST_READY:
        return
    import logging

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)),
                       ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo")
    _DIST_READY = True


def build_deepspeed(w: Weights, c: Config) -> Contender:
    init_deepspeed()
    from deepspeed.moe.layer import MoE

    moe = MoE(hidden_size=c.d, expert=relu_mlp(c.d, c.h), num_experts=c.n, ep_size=1, k=c.k,
              drop_tokens=False, top2_2nd_expert_sampling=False, use_rts=False)
    moe.set_deepspeed_parallelism()
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(w.w_gate.T)
    copy_mlps(moe.deepspeed_moe.experts.deepspeed_experts, w)

    def forward(x):
        y, aux, _ = moe(x)
        return y, aux

    return Contender("deepspeed", moe, forward,
                     note=f"dropless, capacity {c.max_load}, Python loop over experts")


def _torchtitan_moe(c: Config, relu: bool):
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import (
        GroupedExperts,
        MoE,
        RoutedExperts,
        TokenChoiceTopKRouter,
    )
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    class ReLUGroupedExperts(GroupedExperts):
        """fp32 ``relu(x·w1[e]ᵀ)·w2[e]ᵀ`` on torchtitan's ``w1_EFD [n, h, d]``,
        ``w2_EDF [n, d, h]`` (``w3`` unused), with its ``torch._grouped_mm``."""

        def forward(self, x_RD, num_tokens_per_expert_E):
            offs = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)
            hid = F.relu(torch._grouped_mm(x_RD, self.w1_EFD.transpose(-2, -1), offs=offs))
            return torch._grouped_mm(hid, self.w2_EDF.transpose(-2, -1), offs=offs)

    experts = GroupedExperts.Config(dim=c.d, hidden_dim=c.h, num_experts=c.n)
    cfg = MoE.Config(
        num_experts=c.n,
        routed_experts=RoutedExperts.Config(
            inner_experts=experts,
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=c.n, top_k=c.k)),
        router=TokenChoiceTopKRouter.Config(
            num_experts=c.n, gate=Linear.Config(in_features=c.d, out_features=c.n, bias=False),
            top_k=c.k, score_func="softmax", route_norm=normalize_for("torchtitan", c.k)),
        load_balance_coeff=None)
    moe = cfg.build()
    if relu:
        moe.routed_experts.inner_experts = ReLUGroupedExperts(experts)
    return moe


def build_torchtitan(w: Weights, c: Config, relu: bool = True) -> Contender:
    moe = _torchtitan_moe(c, relu)
    ex = moe.routed_experts.inner_experts
    with torch.no_grad():
        moe.router.gate.weight.copy_(w.w_gate.T)
        ex.w1_EFD.copy_(w.w1.transpose(1, 2))
        ex.w2_EDF.copy_(w.w2.transpose(1, 2))
        # stock SwiGLU: silu(x·w1ᵀ) ⊙ (x·w3ᵀ); w3 from the same init, it has no counterpart
        ex.w3_EFD.copy_(w.w1.transpose(1, 2).flip(0) if not relu else torch.zeros_like(ex.w3_EFD))
    view = three_d(c)

    def forward(x):
        return moe(view(x)).reshape(x.shape), None

    if relu:
        return Contender("torchtitan", moe, forward,
                         note="fp32 ReLU subclass of GroupedExperts (_grouped_mm)")
    return Contender("torchtitan-stock", moe, forward, note="stock experts",
                     function_differs="stock experts are SwiGLU computed in bfloat16")


def build_pytorch_mixtures(w: Weights, c: Config) -> Contender:
    from pytorch_mixtures import MoEConfig, TopkMoE

    cfg = MoEConfig(hidden_dim=c.d, intermediate_dim=c.h, num_experts=c.n, expert_fn="ff",
                    expert_act="relu", router_fn="topk", capacity_factor=None, topk=c.k,
                    dtype=torch.float32)
    moe = TopkMoE(cfg)
    with torch.no_grad():
        moe.weight.copy_(w.w_gate)
        for i, ex in enumerate(moe.experts):
            ex.up.weight.copy_(w.w1[i].T)
            ex.up.bias.zero_()
            ex.down.weight.copy_(w.w2[i].T)
            ex.down.bias.zero_()
    view = three_d(c)

    def forward(x):
        return moe(view(x)).reshape(x.shape), None

    return Contender("pytorch-mixtures", moe, forward,
                     note="TopkMoE, Python loop over experts, zero biases")


def build_st_moe(w: Weights, c: Config) -> Contender:
    from st_moe_pytorch import MoE

    mlps = [relu_mlp(c.d, c.h) for _ in range(c.n)]
    copy_mlps(mlps, w)
    moe = MoE(dim=c.d, num_experts=c.n, gating_top_n=c.k, experts=nn.ModuleList(mlps),
              threshold_train=1e-9, threshold_eval=1e-9, capacity_factor_train=float(c.n),
              capacity_factor_eval=float(c.n), is_distributed=False)
    with torch.no_grad():
        moe.gate.to_gates.weight.copy_(w.w_gate.T)
    view = three_d(c)

    def forward(x):
        out = moe(view(x))
        return out[0].reshape(x.shape), out[1]

    return Contender("st-moe-pytorch", moe, forward,
                     note=f"dense dispatch, capacity = L = {c.seq_len}")


def build_lucidrains(w: Weights, c: Config) -> Contender:
    from mixture_of_experts import MoE

    moe = MoE(dim=c.d, num_experts=c.n, hidden_dim=c.h, activation=nn.ReLU,
              second_policy_train="all", second_policy_eval="all",
              capacity_factor_train=float(c.n), capacity_factor_eval=float(c.n))
    with torch.no_grad():
        moe.gate.w_gating.copy_(w.w_gate)
        moe.experts.w1.copy_(w.w1)
        moe.experts.w2.copy_(w.w2)
    view = three_d(c)

    def forward(x):
        y, aux = moe(view(x))
        return y.reshape(x.shape), aux

    return Contender("mixture-of-experts", moe, forward,
                     note=f"dense dispatch, capacity = L = {c.seq_len}")


BUILDERS = {
    "deepspeed": build_deepspeed,
    "torchtitan": build_torchtitan,
    "torchtitan-stock": lambda w, c: build_torchtitan(w, c, relu=False),
    "pytorch-mixtures": build_pytorch_mixtures,
    "st-moe-pytorch": build_st_moe,
    "mixture-of-experts": build_lucidrains,
}


# ---------------------------------------------------------------------------------------------
# timing


def step(contender: Contender, x: Tensor, g: Tensor) -> tuple[float, Tensor]:
    """One timed training step; returns the seconds and the detached output."""
    start = time.perf_counter()
    contender.layer.zero_grad(set_to_none=True)
    x.grad = None
    y, aux = contender.forward(x)
    loss = (y * g).sum()
    if aux is not None:
        loss = loss + aux
    loss.backward()
    seconds = time.perf_counter() - start
    contender.layer.zero_grad(set_to_none=True)  # untimed: one contender's gradients at a time
    return seconds, y.detach()


def bench(args, n: int, k: int) -> list[dict]:
    d, h, tokens = args.d, args.hidden, args.tokens
    seq_len = args.seq_len if tokens % args.seq_len == 0 else tokens
    torch.manual_seed(0)  # sparsemoe's own initialisation, shared by every contender
    init = sparsemoe.MoELayer(TopKRouter(d, n, k), FeedForwardExperts(n, d, h))
    w = Weights(*(p.detach().clone() for p in (init.router.w_gate, init.experts.w1,
                                                init.experts.w2)))
    del init
    x = torch.randn(tokens, d, requires_grad=True)
    g = torch.randn(tokens, d)
    with torch.no_grad():
        choice = (x @ w.w_gate).softmax(-1).topk(k, -1).indices
    max_load = int(torch.bincount(choice.flatten(), minlength=n).max())
    c = Config(d, h, tokens, n, k, seq_len, max_load)

    rows: dict[str, dict] = {p: {"peer": p} for p in args.peers}
    peers = []
    for p in args.peers:
        if reason := unsupported(p, k):
            rows[p]["skipped"] = reason
            print(f"  {p}: skipped ({reason})", flush=True)
        else:
            peers.append(p)

    # sparsemoe variants first: their warm-up step gives the reference outputs
    refs: dict[bool, Contender] = {}
    ref_y: dict[bool, Tensor] = {}
    ref_s: dict[bool, float] = {}
    variants = [k > 1] + [m for m in {normalize_for(p, k) for p in peers} if m != (k > 1)]
    for normalize in variants:
        name = f"sparsemoe(normalize={normalize})"
        layer = sparsemoe_layer(w, k, normalize)
        refs[normalize] = Contender(name, layer, lambda x, m=layer: (m(x), m.aux_loss),
                                    normalize=normalize)
        ref_s[normalize], ref_y[normalize] = step(refs[normalize], x, g)

    timed: list[Contender] = list(refs.values())
    limit_gib = args.max_gib * 2**30
    for p in peers:
        row = rows[p]
        need = predicted_bytes(p, c)
        in_use = resident_bytes()
        normalize = normalize_for(p, k)
        predicted_s = ref_s[normalize] * predicted_rows(p, c) / (k * tokens)
        if in_use + need > limit_gib:
            row["skipped"] = (f"predicted memory {need / 2**30:.3g} GiB + {in_use / 2**30:.3g} "
                              f"GiB in use > {args.max_gib:g} GiB")
        elif predicted_s > args.limit_s:
            row["skipped"] = (f"predicted step {predicted_s:.3g} s > {args.limit_s:g} s "
                              f"({predicted_rows(p, c)} expert rows)")
        if "skipped" in row:
            print(f"  {p}: skipped ({row['skipped']})", flush=True)
            continue
        try:
            torch.manual_seed(1)
            contender = BUILDERS[p](w, c)
            contender.normalize = normalize
            seconds, y = step(contender, x, g)  # warm-up, and the check
        except Exception as e:  # one failing peer must not stop the others
            row["skipped"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            print(f"  {p}: {row['skipped']}", flush=True)
            continue
        row["note"] = contender.note
        if contender.function_differs:
            row["function_differs"] = contender.function_differs
        else:
            row["max_abs_err"] = (y - ref_y[normalize]).abs().max().item()
        if seconds > args.limit_s:
            row["skipped"] = f"warm-up step {seconds:.3g} s > {args.limit_s:g} s"
            print(f"  {p}: skipped ({row['skipped']})", flush=True)
            continue
        timed.append(contender)

    for r in range(args.repeats):
        s = r % len(timed)
        for contender in timed[s:] + timed[:s]:
            contender.times.append(step(contender, x, g)[0])

    med = {ct.name: statistics.median(ct.times) for ct in timed}
    out = []
    for p in args.peers:
        row = {"d": d, "h": h, "tokens": tokens, "experts": n, "k": k, "seq_len": seq_len,
               "tokens_per_expert": tokens * k / n, "max_load": max_load, **rows[p]}
        normalize = normalize_for(p, k)
        if p in med:
            row["normalize"] = normalize
            row["sparsemoe_ms"] = 1e3 * med[refs[normalize].name]
            row["peer_ms"] = 1e3 * med[p]
            row["sparsemoe_over_peer"] = med[refs[normalize].name] / med[p]
        out.append(row)
    del timed, refs
    return out


# ---------------------------------------------------------------------------------------------
# output


def markdown(rows: list[dict]) -> str:
    head = ["n", "k", "tok/expert", "peer", "sparsemoe ms", "peer ms", "sparsemoe/peer",
            "max abs err", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(value, spec):
        return "–" if value is None else format(value, spec)

    for r in rows:
        if "function_differs" in r:
            err = "function differs: " + r["function_differs"]
        else:
            err = fmt(r.get("max_abs_err"), ".1e")
        notes = "; ".join(s for s in (r.get("note", ""), r.get("skipped", "")) if s)
        if "normalize" in r:
            notes = f"normalize={r['normalize']}" + (f"; {notes}" if notes else "")
        cells = [str(r["experts"]), str(r["k"]), f"{r['tokens_per_expert']:.0f}", r["peer"],
                 fmt(r.get("sparsemoe_ms"), ".1f"), fmt(r.get("peer_ms"), ".1f"),
                 fmt(r.get("sparsemoe_over_peer"), ".2f"), err, notes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64, 512])
    p.add_argument("--k", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peers", nargs="+", default=PEERS, choices=PEERS + OPTIONAL_PEERS)
    p.add_argument("--seq-len", type=int, default=512, help="sequence length L of the 3-D "
                   "peers' input [T/L, L, d] (the capacity of st-moe / lucidrains is per L)")
    p.add_argument("--max-gib", type=float, default=16.0, help="skip a contender when "
                   "the memory in use plus its predicted memory exceed this")
    p.add_argument("--limit-s", type=float, default=60.0, help="skip a contender whose step "
                   "takes (or is predicted to take) longer than this")
    p.add_argument("--json", default=None, help="also write the rows to this file, and the "
                   "markdown table next to it (.md)")
    args = p.parse_args()
    # torchtitan's router asks for a float32 CPU autocast, which torch ignores with a warning
    warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype")
    print(f"torch {torch.__version__}, cpu, {torch.get_num_threads()} threads, float32, "
          f"d {args.d}, h {args.hidden}, {args.tokens} tokens", flush=True)
    rows = []
    for n in args.experts:
        for k in args.k:
            print(f"n={n} k={k}", flush=True)
            rows += bench(args, n, k)
            if args.json:  # what is done survives a later configuration's failure
                Path(args.json).write_text(json.dumps(rows, indent=2))
                Path(args.json).with_suffix(".md").write_text(markdown(rows) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
