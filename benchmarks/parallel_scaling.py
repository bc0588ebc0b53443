"""Where expert parallelism stops paying off, on paper: a scaling table from this machine's
measured expert compute rate and an assumed interconnect, on a ``dp × ep`` device mesh with
FSDP2 (:func:`sparsemoe.parallel.parallelize`).

Weak scaling, as in the paper (§3.1): every rank keeps ``T`` tokens per step and computes the
rows of ``n_l`` experts per MoE layer, so a mesh of ``W = dp·ep`` ranks trains ``n = ep·n_l``
experts per layer on ``W·T`` tokens. The model is built (on the meta device) from the
architecture's config, so its ``L`` MoE layers, its ``P`` parameters outside the experts and
its ``E`` parameters per expert (all layers) are counted, not typed in. Per rank and training
step (balanced routing, no drops, ``b`` bytes per exchanged element, ``b_p`` per parameter):

    expert work   C = 3 · L · T·k · m                multiply-adds (forward, input and weight
                                                     gradients; ``m`` per row: 2·d·h, 3·d·h gated)
    exchanged     V = 4 · L · T·k · d · b · (ep−1)/ep  bytes sent in the ep group (dispatch and
                                                     return, forward and backward)
    FSDP2         F = b_p · (2·P·(W−1)/W + 3·E·n_l·(dp−1)/dp)   sharded (fully_shard)
                  F = b_p · (2·P·(W−1)/W + 2·E·n_l·(dp−1)/dp)   replicated (replicate=True)
    step time     t = C / R + (V + F) / B + α · messages      (no overlap)

FSDP2's bytes are those a ring algorithm sends per rank: an all-gather or a reduce-scatter of
``S`` bytes over ``g`` ranks sends ``S·(g−1)/g``, an all-reduce twice that. The model outside
the experts is FSDP2's root unit over all ``W`` ranks: one all-gather in the forward (the root
keeps its parameters for the backward) and one reduce-scatter, ``2·P``, the same bytes as the
replicated all-reduce. Each layer's bank of ``n_l`` experts is a unit of its own over its dp
group: gathered in the forward, again in the backward, and its gradients reduce-scattered,
``3·E·n_l`` (replicated: one all-reduce, ``2·E·n_l``). Messages: ``4·L·(ep−1)`` for the
exchanges, ``(g−1)`` per all-gather or reduce-scatter and ``2·(g−1)`` per all-reduce.

``R`` is the measured multiply-adds per second of the expert bank (forward+backward, the
library's grouped path), ``B`` the assumed bandwidth per rank and ``α`` the assumed latency of
one message. The efficiency ``e = (C/R) / t`` is the share of the step spent in the experts
(other compute is not counted), ``W·e`` the speed-up in tokens per second over one rank, and
the FSDP2 share the part of ``t`` spent in FSDP2's collectives.

    python benchmarks/parallel_scaling.py                           # the LM preset's experts
    python benchmarks/parallel_scaling.py --meshes 1x8 8x8 --replicate
    python benchmarks/parallel_scaling.py --rate 1.5e14 --bytes-per-element 2  # a GPU, assumed
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from sparsemoe.dispatch import equal_routes
from sparsemoe.experts import FeedForwardExperts
from sparsemoe.models.architectures import ARCHITECTURES, architecture


@dataclass(frozen=True)
class ModelCounts:
    """What the traffic model reads from a built model: ``L`` MoE layers, ``P`` parameters
    outside the experts, ``E`` parameters of one expert over all layers, ``m`` multiply-adds
    of one row through one expert, ``d`` the exchanged row's width."""

    moe_layers: int
    non_expert: int
    per_expert: int
    multiply_adds_per_row: int
    d_model: int


def count_model(model: torch.nn.Module) -> ModelCounts:
    """:class:`ModelCounts` of a model with ``moe_layers()`` whose banks are
    ``FeedForwardExperts`` of the same shape (a parameter shared by two modules counts once)."""
    banks = [layer.experts for layer in model.moe_layers()]
    experts = {id(p) for bank in banks for p in bank.parameters()}
    non_expert = sum(p.numel() for p in model.parameters() if id(p) not in experts)
    per_expert = sum(p.numel() for bank in banks for p in bank.parameters()
                     ) // banks[0].num_experts
    return ModelCounts(len(banks), non_expert, per_expert, banks[0].multiply_adds_per_row,
                       banks[0].d_model)


def build_counts(arch: str, fields: dict, vocab_size: int, num_experts: int) -> ModelCounts:
    """Count ``arch``'s model with config ``fields``, ``num_experts`` experts per layer, built
    on the meta device (no memory, no initialisation)."""
    spec = architecture(arch)
    cfg = spec.model_config(None, {**fields, "num_experts": num_experts}, vocab_size)
    with torch.device("meta"):
        return count_model(spec.build(cfg))


def exchange_bytes(counts: ModelCounts, tokens: int, k: int, ep: int, b: int) -> float:
    """``V``: bytes sent per rank and step by the expert exchanges of every MoE layer."""
    return 4 * counts.moe_layers * tokens * k * counts.d_model * b * (ep - 1) / ep


def fsdp_bytes(non_expert: int, bank: int, dp: int, ep: int, b: int, replicate: bool,
               layers: int = 1) -> float:
    """``F``: bytes FSDP2 sends per rank and step (ring algorithms), for ``non_expert``
    parameters in the root unit over all ``dp·ep`` ranks and ``layers`` banks of ``bank``
    parameters each (a rank's ``n_l`` experts) over the dp group, ``b`` bytes per parameter.
    Sharded: the root all-gathers once and reduce-scatters (``2·P``), a bank all-gathers in
    the forward and the backward and reduce-scatters (``3·bank``); replicated: one all-reduce
    (``2·``) each."""
    w = dp * ep
    bank_passes = 2 if replicate else 3
    return b * (2 * non_expert * (w - 1) / w + bank_passes * layers * bank * (dp - 1) / dp)


def fsdp_messages(layers: int, dp: int, ep: int, replicate: bool) -> int:
    """Messages of FSDP2's ring collectives per rank and step: ``g − 1`` per all-gather or
    reduce-scatter over ``g`` ranks, ``2·(g − 1)`` per all-reduce. The root over ``W``: two
    collectives sharded, one all-reduce replicated (``2·(W − 1)`` either way); each of the
    ``layers`` banks over ``dp``: three collectives sharded, one all-reduce replicated."""
    return 2 * (dp * ep - 1) + (2 if replicate else 3) * layers * (dp - 1)


def measured_rate(d: int, h: int, rows: int, experts: int, repeats: int,
                  activation: str = "relu") -> float:
    """Multiply-adds per second of forward+backward through ``experts`` experts, ``rows`` rows
    spread evenly over them (median of ``repeats``)."""
    torch.manual_seed(0)
    bank = FeedForwardExperts(experts, d, h, activation=activation)
    per_expert = rows // experts
    routes = equal_routes(experts, per_expert)
    x = torch.randn(experts * per_expert, d, requires_grad=True)
    grad = torch.randn(experts * per_expert, d)

    def step() -> float:
        bank.zero_grad(set_to_none=True)
        start = time.perf_counter()
        bank(x, routes).backward(grad)
        return time.perf_counter() - start

    step()  # warm-up
    seconds = statistics.median(step() for _ in range(repeats))
    return 3 * experts * per_expert * bank.multiply_adds_per_row / seconds


def parse_mesh(text: str) -> tuple[int, int]:
    """``"DPxEP"`` → ``(dp, ep)``."""
    dp, sep, ep = text.partition("x")
    if not (sep and dp.isdigit() and ep.isdigit() and int(dp) > 0 and int(ep) > 0):
        raise argparse.ArgumentTypeError(f"a mesh is DPxEP with positive integers, e.g. 2x4; "
                                         f"got {text!r}")
    return int(dp), int(ep)


def parse_field(text: str) -> tuple[str, object]:
    """``"name=value"`` → ``(name, value)``, the value an int, a float, a bool or a string."""
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"a model field is NAME=VALUE, got {text!r}")
    for kind in (int, float):
        try:
            return name, kind(value)
        except ValueError:
            pass
    return name, {"true": True, "false": False}.get(value.lower(), value)


def model_fields(args: argparse.Namespace) -> dict:
    fields = {"d_model": args.d_model, "hidden": args.hidden, "k": args.k, **dict(args.set)}
    if args.arch == "transformer":
        fields.setdefault("router", "top-k")
    return fields


def table(args: argparse.Namespace, rate: float) -> str:
    head = ("| W | mesh dp×ep | experts | exchange MB | FSDP2 MB sharded | FSDP2 MB replicated | "
            + " | ".join(f"{bw:g} GB/s: e, W·e, FSDP2" for bw in args.bandwidths) + " |")
    lines = [head, "|---" * (6 + len(args.bandwidths)) + "|"]
    fields = model_fields(args)
    for dp, ep in args.meshes:
        w = dp * ep
        counts = build_counts(args.arch, fields, args.vocab_size, ep * args.experts_per_rank)
        compute = 3 * counts.moe_layers * args.tokens * args.k * counts.multiply_adds_per_row \
            / rate
        v = exchange_bytes(counts, args.tokens, args.k, ep, args.bytes_per_element)
        bank = counts.per_expert // counts.moe_layers * args.experts_per_rank
        f_sharded, f_replicated = (
            fsdp_bytes(counts.non_expert, bank, dp, ep, args.param_bytes, replicate,
                       counts.moe_layers) for replicate in (False, True))
        f = f_replicated if args.replicate else f_sharded
        latency = args.latency_us * 1e-6
        cells = []
        messages = fsdp_messages(counts.moe_layers, dp, ep, args.replicate)
        for bw in args.bandwidths:
            fsdp_time = f / (bw * 1e9) + messages * latency
            t = compute + v / (bw * 1e9) + 4 * counts.moe_layers * (ep - 1) * latency + fsdp_time
            e = compute / t
            cells.append(f"{100 * e:.0f}%, {w * e:.1f}, {100 * fsdp_time / t:.0f}%")
        lines.append(f"| {w} | {dp}×{ep} | {ep * args.experts_per_rank} | {v / 1e6:.2f} | "
                     f"{f_sharded / 1e6:.2f} | {f_replicated / 1e6:.2f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="lstm", choices=tuple(ARCHITECTURES),
                   help="the model whose parameters FSDP2 moves (built on the meta device)")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=10_000)
    p.add_argument("--set", type=parse_field, nargs="*", default=[], metavar="FIELD=VALUE",
                   help="other fields of the arch's config (e.g. n_layers=32)")
    p.add_argument("--tokens", type=int, default=32 * 35, help="tokens per rank and step")
    p.add_argument("--experts-per-rank", type=int, default=16,
                   help="n_l: experts per layer whose rows a rank computes (n = ep·n_l)")
    p.add_argument("--meshes", type=parse_mesh, nargs="+",
                   default=[parse_mesh(m) for m in ("1x1", "1x2", "1x4", "1x8", "1x16", "1x64",
                                                    "1x256")],
                   help="dp×ep meshes, one row each")
    p.add_argument("--replicate", action="store_true",
                   help="the step time with the replicated layout's all-reduces")
    p.add_argument("--bandwidths", type=float, nargs="+", default=[1.25, 12.5, 50.0],
                   help="GB/s per rank (10 GbE, 100 Gb/s and 400 Gb/s InfiniBand)")
    p.add_argument("--latency-us", type=float, default=10.0, help="per message")
    p.add_argument("--bytes-per-element", type=int, default=4,
                   help="exchanged rows: 4 float32, 2 bfloat16 autocast")
    p.add_argument("--param-bytes", type=int, default=4,
                   help="FSDP2's parameters and gradients (parallelize keeps them in float32)")
    p.add_argument("--rate", type=float, default=None,
                   help="expert multiply-adds per second (default: measured here)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    activation = dict(args.set).get("activation", "relu" if args.arch == "lstm" else "gelu")
    rate = args.rate or measured_rate(args.d_model, args.hidden, args.tokens * args.k,
                                      args.experts_per_rank, args.repeats, activation)
    source = "assumed" if args.rate else f"measured ({torch.get_num_threads()} threads)"
    first = args.meshes[0][1] * args.experts_per_rank  # the first row's experts per layer
    counts = build_counts(args.arch, model_fields(args), args.vocab_size, first)
    compute = 3 * counts.moe_layers * args.tokens * args.k * counts.multiply_adds_per_row / rate
    print(f"{args.arch}: d {args.d_model}, h {args.hidden}, k {args.k}, {counts.moe_layers} MoE "
          f"layer(s), {counts.non_expert:,} parameters outside the experts (with {first} "
          f"experts per layer, the first row's), {counts.per_expert:,} per expert; "
          f"{args.tokens} tokens and {args.experts_per_rank} experts per rank, "
          f"{args.bytes_per_element}-byte rows, {args.param_bytes}-byte parameters, latency "
          f"{args.latency_us:g} us; expert rate {rate:.3g} multiply-adds/s ({source}); expert "
          f"time per step {1e3 * compute:.2f} ms\n")
    print(table(args, rate))


if __name__ == "__main__":
    main()
