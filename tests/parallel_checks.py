"""Checks that run on every rank of a gloo process group, spawned by ``test_parallel.py``.

Each check compares what the expert-parallel model computes on this rank with the
single-process model computed here, on the same weights and the same inputs: every rank
holds the whole batch (one slice per rank), runs its own slice through the distributed model
and every slice through the single-process one. Checks return their largest errors; the tests
assert on them in the parent process, and a failing check reports its traceback.
"""

from __future__ import annotations

import copy
import json
import os
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import ClassVar

import torch
import torch.distributed as dist
from helpers import randomise_gates
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from sparsemoe import Capacity, FeedForwardExperts, HierarchicalMoE, MoE, MoELayer, routers
from sparsemoe import parallel as P
from sparsemoe.optim import FactoredAdam, param_groups

D, HIDDEN, EXPERTS = 8, 12, 8


def max_err(a, b, relative=False) -> float:
    """max |a − b|, or divided by max |b| when ``relative``."""
    if not a.numel():
        return 0.0
    b = b.detach().double()
    err = float((a.detach().double() - b).abs().max())
    return err / max(float(b.abs().max()), 1e-30) if relative else err


def global_name(name: str) -> str:
    return name.replace("experts.local.", "experts.")


def shard_of(ep_model, name, full):
    """The slice of a single-process tensor that ``ep_model``'s parameter ``name`` holds."""
    if "experts.local." not in name:
        return full
    bank = ep_model.get_submodule(name.split(".local.")[0])
    return full[bank.first_expert : bank.first_expert + bank.num_local_experts]


def slices(world, counts, seed, width=D):
    """The same per-rank inputs on every rank."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(c, width, generator=g) for c in counts]


def equivalence(make_layer, counts, seed=0, training=True, gates=True, autocast=False,
                exchange_capacity=None, reference_capacity=None):
    """Outputs, auxiliary loss and every gradient of the expert-parallel layer on this rank
    against the single-process layer on this rank's slice; the expert gradients against the
    sum over every rank's slice. ``exchange_capacity``: the padded exchange;
    ``reference_capacity``: a :class:`~sparsemoe.Capacity` of the single-process layer only
    (the drops the padded exchange must reproduce)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed)
    ref = make_layer()
    if gates:
        randomise_gates(ref, seed)
    ep = P.expert_parallel(copy.deepcopy(ref), exchange_capacity=exchange_capacity)
    ref.capacity = reference_capacity or ref.capacity
    ref.train(training)
    ep.train(training)
    xs = slices(world, counts, seed + 1)
    probes = slices(world, counts, seed + 2)

    def loss_of(layer, x, r):
        torch.manual_seed(seed + 10 + r)  # the same noise for slice r in both layers
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)
        return y, (y.float() * probes[r]).sum() + layer.aux_loss

    x = xs[rank].clone().requires_grad_(True)
    y, loss = loss_of(ep, x, rank)
    loss.backward()

    params = dict(ref.named_parameters())
    expert_total = {n: torch.zeros_like(p) for n, p in params.items() if ".experts." in f".{n}"}
    for r in range(world):
        xr = xs[r].clone().requires_grad_(True)
        yr, lr = loss_of(ref, xr, r)
        grads = torch.autograd.grad(lr, [xr, *params.values()], allow_unused=True,
                                    materialize_grads=True)
        named = dict(zip(params, grads[1:], strict=True))
        for n in expert_total:
            expert_total[n] += named[n]
        if r == rank:
            y_ref, aux_ref, x_grad_ref, own = yr, ref.aux_loss, grads[0], named
            ref_dropped = ref.stats.dropped_pairs
    rel = autocast  # bfloat16: relative errors
    errors = {"output": max_err(y, y_ref, rel), "aux_loss": max_err(ep.aux_loss, aux_ref, rel),
              "x_grad": max_err(x.grad, x_grad_ref, rel)}
    for name, p in ep.named_parameters():
        g = global_name(name)
        want = shard_of(ep, name, expert_total[g]) if g in expert_total else own[g]
        grad = p.grad if p.grad is not None else torch.zeros_like(p)  # unused (w_noise in eval)
        errors[f"grad {g}"] = max_err(grad, want, rel)
    exchange = ep.experts.last_exchange
    return {"errors": errors, "rows_sent": exchange.rows_sent,
            "rows_received": exchange.rows_received, "tokens": counts[rank],
            "dropped": ep.stats.dropped_pairs.item() if ep.stats.dropped_pairs is not None
            else None,
            "reference_dropped": ref_dropped.item() if ref_dropped is not None else None,
            "exchange_dropped": exchange.dropped_rows.item()
            if exchange.dropped_rows is not None else None,
            "exchange_routed": exchange.routed_rows.item()
            if exchange.routed_rows is not None else None}


def top_k_layer():
    return MoE(D, EXPERTS, k=2, hidden=HIDDEN)


def check_top_k(counts):
    return equivalence(top_k_layer, counts)


def check_top_k_eval(counts):
    return equivalence(top_k_layer, counts, training=False)


def check_padded(counts):
    """The padded exchange with room for every row (a rank sends an expert at most one row
    per token): the exact exchange's results."""
    return equivalence(top_k_layer, counts, exchange_capacity=max(counts))


def check_padded_one_expert_per_rank(counts):
    """:func:`check_padded` with one expert per rank: the received rows reach the bank through
    views of the exchange's output alone (no copy), which the bank's kernel must read as rows."""
    return equivalence(lambda: MoE(D, dist.get_world_size(), k=2, hidden=HIDDEN), counts,
                       exchange_capacity=max(counts))


def check_padded_binding(counts, capacity=2):
    """The padded exchange dropping rows: top-1 routing, so that the first ``capacity`` rows
    of an expert in sorted order are its first ``capacity`` tokens, which a one-process layer
    with ``Capacity(tokens=capacity)`` keeps on each rank's slice."""
    def top1_layer():
        return MoELayer(routers.TopKRouter(D, EXPERTS, k=1), FeedForwardExperts(EXPERTS, D,
                                                                                 HIDDEN))
    return equivalence(top1_layer, counts, exchange_capacity=capacity,
                       reference_capacity=Capacity(tokens=capacity))


def switch_layer():
    return MoELayer(routers.SwitchRouter(D, EXPERTS), FeedForwardExperts(EXPERTS, D, HIDDEN),
                    capacity=Capacity(factor=1.0, minimum=1))


def expert_choice_layer():
    bank = FeedForwardExperts(EXPERTS, D, HIDDEN, activation="swiglu", bias=True)
    return MoELayer(routers.ExpertChoiceRouter(D, EXPERTS), bank)


def hierarchical_layer():
    return HierarchicalMoE(D, 2, EXPERTS // 2, hidden=HIDDEN)


def check_switch_capacity(counts):
    return equivalence(switch_layer, counts)


def check_expert_choice(counts):
    return equivalence(expert_choice_layer, counts)


def check_hierarchical(counts):
    return equivalence(hierarchical_layer, counts)


def check_autocast(counts):
    return equivalence(top_k_layer, counts, autocast=True)


def one_rank_layer():
    """Every token chooses experts 0 and 1, which live on rank 0: the other ranks receive
    nothing."""
    layer = MoELayer(routers.TopKRouter(D, EXPERTS, k=2, bias=True),
                     FeedForwardExperts(EXPERTS, D, HIDDEN))
    with torch.no_grad():
        layer.router.b_gate.copy_(torch.tensor([50.0, 40.0] + [0.0] * (EXPERTS - 2)))
    return layer


def check_one_rank_receives(counts):
    return equivalence(one_rank_layer, counts, gates=False)


def check_compiled(counts):
    """An expert-parallel layer under ``torch.compile(fullgraph=True)`` (AOTAutograd, no code
    generation) against the same layer run eagerly, at two token counts: outputs, input and
    parameter gradients, the exchange's statistics; the graphs compiled and the graph breaks.
    The exact exchange in training (noisy gating, the same noise) and evaluation, with
    ``capture_scalar_outputs`` so that the split sizes read from the exchanged counts stay in
    the graph; the padded exchange (``exchange_capacity``) without it: it reads nothing on
    the host."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    rank, world = dist.get_rank(), dist.get_world_size()
    errors, frames = {}, {}
    modes = (("training", True, None, True), ("evaluation", False, None, True),
             ("padded", True, max(counts), False))
    for mode, training, exchange_capacity, capture in modes:
        torch.manual_seed(0)
        eager = P.expert_parallel(top_k_layer(), exchange_capacity=exchange_capacity)
        eager.train(training)
        randomise_gates(eager, 0)
        compiled_layer = copy.deepcopy(eager)
        backend = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(compiled_layer, backend=backend, fullgraph=True)
        counters.clear()
        with torch._dynamo.config.patch(capture_scalar_outputs=capture):
            for step, step_counts in enumerate((counts, counts[::-1])):
                x = slices(world, step_counts, 1 + step)[rank]
                outputs = []
                for layer in (eager, compiled):
                    xr = x.clone().requires_grad_(True)
                    torch.manual_seed(10 + rank)  # the same gating noise
                    y = layer(xr)
                    (y * y).sum().backward()
                    outputs.append((y, xr.grad))
                errors[f"{mode} output {step}"] = max_err(outputs[1][0], outputs[0][0])
                errors[f"{mode} x_grad {step}"] = max_err(outputs[1][1], outputs[0][1])
                errors[f"{mode} exchange stats {step}"] = float(
                    compiled_layer.experts.last_exchange != eager.experts.last_exchange)
        for (name, p), q in zip(eager.named_parameters(), compiled_layer.parameters(),
                                strict=True):
            if p.grad is None:  # unused in evaluation (the noise weights): unused in both
                errors[f"{mode} grad {name}"] = 0.0 if q.grad is None else float("inf")
            else:
                errors[f"{mode} grad {name}"] = max_err(q.grad, p.grad)
        frames[mode] = {"graphs": backend.frame_count,
                        "breaks": sum(counters["graph_break"].values())}
        torch._dynamo.reset()
    return {"errors": errors, "frames": frames}


class CountedBytes(TorchDispatchMode):
    """Bytes that leave this rank through torch's functional ``all_to_all_single`` (the
    exchanges' operator, forward and backward), own rank excluded, one entry per call."""

    def __init__(self, rank):
        super().__init__()
        self.rank, self.sent = rank, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops._c10d_functional.all_to_all_single.default:
            x, _, send_rows = args[:3]
            row_bytes = x[0].numel() * x.element_size() if x.shape[0] else 0
            self.sent.append(sum(r for j, r in enumerate(send_rows) if j != self.rank)
                             * row_bytes)
        return func(*args, **(kwargs or {}))


def counted_bytes(counts):
    """ExchangeStats against the bytes that really went through the all-to-all operator
    (forward and backward), counted as it runs."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    layer = P.expert_parallel(top_k_layer())
    randomise_gates(layer, 0)
    x = slices(dist.get_world_size(), counts, 1)[rank].requires_grad_(True)
    with CountedBytes(rank) as counter:
        layer(x).sum().backward()
    sent = counter.sent
    (stats,) = P.exchange_stats(layer)
    per_row = layer.experts.local.multiply_adds_per_row
    return {"counted": sum(sent), "reported": stats.step_bytes_sent, "calls": len(sent),
            "forward_counted": sum(sent[:3]), "forward_reported": stats.forward_bytes_sent,
            "compute_to_io": stats.compute_to_io,
            "expert_multiply_adds": stats.expert_multiply_adds,
            "step_expert_multiply_adds": stats.step_expert_multiply_adds,
            "rows_computed": sum(stats.rows_received), "multiply_adds_per_row": per_row}


class Net(nn.Module):
    """A dense layer, an MoE with its auxiliary loss, and a readout."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.moe = MoE(D, EXPERTS, k=2, hidden=HIDDEN, noise_epsilon=0.5)
        self.out = nn.Linear(D, 3)

    def forward(self, x):
        return self.out(x + self.moe(torch.tanh(self.inp(x))))


def batch_for(step, world_slices, per_slice=6):
    g = torch.Generator().manual_seed(100 + step)
    xs = torch.randn(world_slices, per_slice, D, generator=g)
    ys = torch.randn(world_slices, per_slice, 3, generator=g)
    return xs, ys


def step_loss(model, x, y, noise_seed):
    torch.manual_seed(noise_seed)
    return nn.functional.mse_loss(model(x), y) + model.moe.aux_loss


def reference_step(model, opt, step, world_slices, clip):
    """One step on one process: the mean of the per-slice losses, as W ranks compute them."""
    xs, ys = batch_for(step, world_slices)
    losses = [step_loss(model, xs[r], ys[r], 1000 * step + r) for r in range(world_slices)]
    opt.zero_grad()
    torch.stack(losses).mean().backward()
    norm = nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return [loss.item() for loss in losses], norm.item()


def parameter_errors(ep_model, ref_model):
    full = dict(ref_model.named_parameters())
    return max(max_err(p, shard_of(ep_model, n, full[global_name(n)]))
               for n, p in ep_model.named_parameters())


def adam(model):
    return torch.optim.Adam(model.parameters(), lr=3e-2)


def factored_adam(model):
    """Appendix D's optimizer with a bank's factors per expert; beta2 0.9 so that five steps
    move the factors well away from their first values."""
    return FactoredAdam(param_groups(model), lr=3e-2, beta2=0.9)


OPTIMIZERS = {"adam": adam, "factored_adam": factored_adam}


def gathered_errors(model_state, opt_state, ref, ref_opt):
    """Largest error of a gathered (single-process layout) model and optimizer state dict
    against ``ref``'s and ``ref_opt``'s, and whether their keys differ (1.0) or not."""
    ref_model, ref_state = ref.state_dict(), ref_opt.state_dict()
    errors = [max_err(v, ref_model[k]) for k, v in model_state.items()]
    for index, entry in opt_state["state"].items():
        errors += [max_err(v, ref_state["state"][index][name]) for name, v in entry.items()]
    keys_differ = (list(model_state) != list(ref_model)
                   or {i: sorted(e) for i, e in opt_state["state"].items()}
                   != {i: sorted(e) for i, e in ref_state["state"].items()})
    return max(errors), float(keys_differ)


def gather_stop(name, group, ck, ref, ref_opt, seed, step, errors):
    """Load the single-process checkpoint ``ck`` into a fresh ``expert_parallel`` model on
    ``group`` (another seed: nothing of its own weights may survive), compare its shards, its
    optimizer state and the loss of this rank's slice (the exchange on ``group``) with
    ``ref``'s, then gather its state on the group's rank 0 and compare that with ``ref``'s;
    ``(model state, optimizer state)`` on the group's rank 0, else None."""
    torch.manual_seed(seed)
    model = P.expert_parallel(Net(), group)
    opt = adam(model)
    P.load_full_state_dict(model, ck["model"])
    P.load_full_optimizer_state_dict(model, opt, ck["optimizer"])
    errors[f"load {name}"] = parameter_errors(model, ref)
    errors[f"load {name} state"] = state_errors(model, opt, ref, ref_opt)[0]
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    xs, ys = batch_for(step, world)
    with torch.no_grad():
        loss = step_loss(model, xs[rank], ys[rank], seed)
        errors[f"loss on {name}"] = max_err(loss, step_loss(ref, xs[rank], ys[rank], seed))
    model_state, opt_state = P.full_state_dict(model), P.full_optimizer_state_dict(model, opt)
    if rank != 0:
        return None
    errors[f"gathered {name}"], errors[f"gathered {name} keys"] = gathered_errors(
        model_state, opt_state, ref, ref_opt)
    return {"model": model_state, "optimizer": opt_state}


def check_gather_round_trip(_counts, clip=0.05):
    """The rank-0 gather of the one-group layout (``expert_parallel`` without a mesh,
    ``full_state_dict`` and the optimizer versions): a single-process checkpoint (Adam after a
    step) → W ranks → file → two independent groups of W/2 ranks → files → one process → W
    ranks (4 ranks only). At each stop the loaded shards, Adam's moments and the loss of this
    rank's slice against one process, and the gathered state dicts against the single-process
    ones; one process takes a step on what it loaded against the reference's step. The
    distributed steps between stops are those of ``check_mesh_reshard``: this layout does not
    average data-parallel gradients."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(os.environ["SPARSEMOE_TEST_DIR"])
    torch.manual_seed(0)
    ref = Net()
    ref_opt = adam(ref)
    reference_step(ref, ref_opt, 0, world, clip)
    single = {"model": copy.deepcopy(ref.state_dict()),
              "optimizer": copy.deepcopy(ref_opt.state_dict())}
    errors = {}

    # 1 → W → file
    whole = gather_stop("1 -> W", None, single, ref, ref_opt, 1, 1, errors)
    if rank == 0:
        torch.save(whole, out / "w.pt")
    dist.barrier()

    # W → W/2: two groups of W/2 ranks each load the file; each group's rank 0 writes its own
    halves = [dist.new_group(list(range(0, world // 2))),
              dist.new_group(list(range(world // 2, world)))]
    half = halves[rank // (world // 2)]
    half_state = gather_stop("W -> W/2", half, torch.load(out / "w.pt"), ref, ref_opt, 2, 2,
                             errors)
    if half_state is not None:
        torch.save(half_state, out / f"half{rank}.pt")
    dist.barrier()

    # W/2 → 1: one process loads the file of ranks 0..W/2-1 and takes a step
    ck = torch.load(out / "half0.pt")
    torch.manual_seed(3)
    one = Net()
    one_opt = adam(one)
    one.load_state_dict(ck["model"])
    one_opt.load_state_dict(ck["optimizer"])
    errors["load W/2 -> 1"] = parameter_errors(one, ref)
    reference_step(one, one_opt, 3, world, clip)
    reference_step(ref, ref_opt, 3, world, clip)
    errors["step on 1"] = parameter_errors(one, ref)
    errors["step on 1 state"] = state_errors(one, one_opt, ref, ref_opt)[0]

    # 1 → W: back to every rank
    gather_stop("1 -> W (back)", None, {"model": one.state_dict(),
                                        "optimizer": one_opt.state_dict()}, ref, ref_opt, 4, 4,
                errors)
    for group in halves:
        dist.destroy_process_group(group)
    return {"errors": errors}


def check_constructed(_counts):
    """``MoE(..., process_group=...)``: n/W experts per rank, distinct across ranks; the
    data-parallel parameters, and whatever is built after the layer, the same on every rank."""
    world = dist.get_world_size()
    torch.manual_seed(0)
    layer = MoE(D, EXPERTS, k=2, hidden=HIDDEN, process_group=dist.group.WORLD)
    after = nn.Linear(D, D)

    def gathered(t):
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        return parts

    w1 = gathered(layer.experts.local.w1)
    same = [gathered(t) for t in (layer.router.w_gate, after.weight)]
    x = torch.randn(5, D)
    layer(x).sum().backward()
    return {"local_experts": layer.experts.local.num_experts,
            "global_experts": layer.num_experts,
            "distinct_experts": all(not torch.equal(w1[0], w) for w in w1[1:]),
            "data_parallel_equal": all(torch.equal(p[0], q) for p in same for q in p[1:])}


def factored_optimizer_state():
    """FactoredAdam's per-expert factors are not shaped like the parameters: gathering them
    must fail on every rank alike, not keep rank 0's."""
    ep = P.expert_parallel(MoE(D, 2 * dist.get_world_size(), k=1, hidden=4))
    opt = FactoredAdam(ep.parameters())
    for p in ep.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    P.full_optimizer_state_dict(ep, opt)


def check_errors(_counts):
    """What a user is told: the numbers that do not divide, the bank that cannot be sharded."""
    world = dist.get_world_size()
    messages = {}
    for name, make in {
        "indivisible": lambda: MoE(D, 2 * world + 1, k=2, hidden=HIDDEN,
                                   process_group=dist.group.WORLD),
        "shard": lambda: P.expert_parallel(MoE(D, world, k=1, expert_modules=[
            nn.Linear(D, D) for _ in range(world)])),
        "experts_count": lambda: MoE(D, 2 * world, k=1, process_group=dist.group.WORLD,
                                     expert_modules=[nn.Linear(D, D) for _ in range(2 * world)]),
        "no_moe": lambda: P.expert_parallel(nn.Linear(D, D)),
        "checkpoint": lambda: P.load_full_state_dict(
            P.expert_parallel(MoE(D, 2 * world, k=1, hidden=4)),
            MoE(D, world, k=1, hidden=4).state_dict()),
        "factored_state": factored_optimizer_state,
        "sharded_without_mesh": lambda: P.save_sharded_checkpoint(
            Path(os.environ["SPARSEMOE_TEST_DIR"]) / "never",
            P.expert_parallel(MoE(D, world, k=1, hidden=4))),
        "mesh_other_group": lambda: P.parallelize(
            MoE(D, 2 * world, k=1, hidden=4, process_group=dist.new_group(list(range(world)))),
            init_device_mesh("cpu", (1, world), mesh_dim_names=P.MESH_DIMS)),
        "mesh_dims": lambda: P.parallelize(MoE(D, world, k=1, hidden=4), init_device_mesh(
            "cpu", (world,), mesh_dim_names=("ep",))),
        "replicate_type": lambda: P.parallelize(MoE(D, world, k=1, hidden=4), init_device_mesh(
            "cpu", (1, world), mesh_dim_names=P.MESH_DIMS), replicate="yes"),
        "mesh_divisible": lambda: P.parallelize(
            MoE(D, 2 * world + 1, k=1, hidden=4),
            init_device_mesh("cpu", (1, world), mesh_dim_names=P.MESH_DIMS)),
    }.items():
        try:
            make()
            messages[name] = None
        except (TypeError, ValueError) as e:
            messages[name] = f"{type(e).__name__}: {e}"
    return {"messages": messages, "world": world}


MESH_SHAPES = {2: ((2, 1), (1, 2)), 4: ((4, 1), (2, 2), (1, 4))}
"""The dp × ep meshes of 2 and 4 ranks."""


def full_value(t):
    """A DTensor's whole value (a collective over its mesh), a tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def mesh_errors(model, ref, grads=False):
    """Largest error of every parameter (or gradient) of a parallelize-d ``model`` against the
    single-process ``ref``: expert banks against the rows of this rank's ep group."""
    full = {n: p.grad if grads else p for n, p in ref.named_parameters()}
    errors = []
    for name, p in model.named_parameters():
        mine = full_value(p.grad if grads else p)
        errors.append(max_err(mine, shard_of(model, name, full[global_name(name)])))
    return max(errors)


def state_errors(model, opt, ref, ref_opt):
    """Largest error of the optimizer state of every parameter of a parallelize-d ``model``
    (DTensor shards and replicas made whole over their mesh) against the single-process
    ``ref_opt``'s, relative to the largest magnitude of the single-process tensor (the
    factors of clipped gradients are small numbers; every rank divides by the same number);
    ``(error, names of the state tensors compared)``."""
    ref_params = dict(ref.named_parameters())
    worst, names = 0.0, set()
    for name, p in model.named_parameters():
        mine, theirs = opt.state[p], ref_opt.state[ref_params[global_name(name)]]
        if set(mine) != set(theirs):
            raise AssertionError(f"{name}: state {sorted(mine)}, one process {sorted(theirs)}")
        for key, value in mine.items():
            full = theirs[key] if value.dim() == 0 else shard_of(model, name, theirs[key])
            scale = max(float(theirs[key].abs().max()), 1e-30)
            worst = max(worst, max_err(full_value(value), full) / scale)
            names.add(key)
    return worst, sorted(names)


def mesh_step(model, opt, step, clip):
    """One step of a parallelize-d model on its rank's slice; ``(loss, norm)``."""
    rank = dist.get_rank()
    xs, ys = batch_for(step, dist.get_world_size())
    loss = step_loss(model, xs[rank], ys[rank], 1000 * step + rank)
    opt.zero_grad()
    loss.backward()
    norm = P.clip_grad_norm_(model, clip)
    opt.step()
    return loss.item(), norm.item()


def mesh_model(shape, seed, replicate=False):
    torch.manual_seed(seed)
    model = Net()
    if shape == (1, 1):
        return model
    return P.parallelize(model, init_device_mesh("cpu", shape, mesh_dim_names=P.MESH_DIMS),
                         replicate=replicate)


def local_numbers(model):
    """Numbers this rank stores of the parameters: ``(experts, the rest)``."""
    counts = [0, 0]
    for name, p in model.named_parameters():
        counts[".experts." not in f".{name}"] += (p.to_local() if isinstance(p, DTensor)
                                                 else p).numel()
    return counts


def check_mesh_training(_counts, optimizer="adam", replicate=False, steps=5, clip=0.05):
    """Five steps of ``optimizer`` (a key of :data:`OPTIMIZERS`) with clipping on each
    dp × ep mesh of the world's 2 or 4 ranks (sharded, or ``replicate``-d over dp) against one
    process:
    losses, gradient norms, gradients (after clipping), parameters and optimizer state; the
    numbers of parameters each rank stores."""
    rank, world = dist.get_rank(), dist.get_world_size()
    make_opt = OPTIMIZERS[optimizer]
    errors, norms, state, stored = {}, [], [], {}
    for shape in MESH_SHAPES[world]:
        torch.manual_seed(0)
        ref = Net()
        model = mesh_model(shape, 0, replicate)
        stored[f"{shape[0]}x{shape[1]}"] = local_numbers(model)
        ref_opt, opt = make_opt(ref), make_opt(model)
        worst = {"loss": 0.0, "grad_norm": 0.0, "gradients": 0.0, "parameters": 0.0,
                 "state": 0.0}
        for step in range(steps):
            ref_losses, ref_norm = reference_step(ref, ref_opt, step, world, clip)
            loss, norm = mesh_step(model, opt, step, clip)
            norms.append(norm)
            for key, err in (("loss", abs(loss - ref_losses[rank])),
                             ("grad_norm", abs(norm - ref_norm)),
                             ("gradients", mesh_errors(model, ref, grads=True)),
                             ("parameters", mesh_errors(model, ref))):
                worst[key] = max(worst[key], err)
            err, state = state_errors(model, opt, ref, ref_opt)
            worst["state"] = max(worst["state"], err)
        errors.update({f"{shape[0]}x{shape[1]} {k}": v for k, v in worst.items()})
    return {"errors": errors, "norms": norms, "clip": clip, "state": state, "stored": stored,
            "single": local_numbers(Net())}


class CountedCollectives:
    """The collectives FSDP2 runs (``dist.all_gather_single``, ``dist.reduce_scatter_single``,
    ``dist.all_reduce``, looked up on ``torch.distributed`` when called), one record per call:
    ``(kind, bytes of the whole buffer, ranks in the group)``."""

    # the buffer whose size is the collective's: (keyword, position) of each function's
    BUFFER: ClassVar = {"all_gather_single": ("output_tensor", 0),
                        "reduce_scatter_single": ("input", 1), "all_reduce": ("tensor", 0)}

    def __init__(self):
        self.calls, self.saved = [], {}

    def __enter__(self):
        for name, (keyword, position) in self.BUFFER.items():
            inner = self.saved[name] = getattr(dist, name)

            def counted(*args, _name=name, _key=keyword, _at=position, _inner=inner, **kwargs):
                buffer = kwargs[_key] if _key in kwargs else args[_at]
                self.calls.append((_name, buffer.numel() * buffer.element_size(),
                                   dist.get_world_size(kwargs.get("group"))))
                return _inner(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, inner in self.saved.items():
            setattr(dist, name, inner)


def padded_numel(p, world):
    """Numbers of ``p`` once FSDP2 pads its first dimension to a multiple of ``world``."""
    rows = -(-p.shape[0] // world) * world if p.dim() else 1
    return rows * (p[0].numel() if p.dim() else 1)


def check_fsdp_bytes(_counts):
    """FSDP2's collectives in one training step (forward, backward) on each mesh, sharded and
    replicated, and the parameter counts the traffic model of ``benchmarks/parallel_scaling.py``
    takes: outside the experts ``P`` (and padded by FSDP2 to a multiple of ``W`` rows per
    parameter), and a rank's bank (``n/ep`` experts, padded to a multiple of ``dp``)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    single = Net()
    bank = dict(single.moe.experts.named_parameters())
    out = {}
    for shape in MESH_SHAPES[world]:
        dp, ep = shape
        local_bank = {n: p[: EXPERTS // ep] for n, p in bank.items()}
        counts = {"non_expert": sum(p.numel() for n, p in single.named_parameters()
                                    if not n.startswith("moe.experts.")),
                  "non_expert_padded": sum(padded_numel(p, world)
                                           for n, p in single.named_parameters()
                                           if not n.startswith("moe.experts.")),
                  "bank": sum(p.numel() for p in local_bank.values()),
                  "bank_padded": sum(padded_numel(p, dp) for p in local_bank.values())}
        for replicate in (False, True):
            model = mesh_model(shape, 0, replicate)
            xs, ys = batch_for(0, world)
            with CountedCollectives() as counter:
                step_loss(model, xs[rank], ys[rank], rank).backward()
            out[f"{dp}x{ep}{' replicated' if replicate else ''}"] = {
                "calls": counter.calls, **counts}
    return out


SHARDED_STOPS = (((4, 1), False), ((2, 2), False), ((1, 4), False), ((1, 1), False),
                 ((4, 1), False))
REPLICATED_STOPS = (((2, 2), True), ((4, 1), False), ((1, 4), True), ((1, 1), False),
                    ((4, 1), True))


def check_mesh_reshard(_counts, optimizer="adam", stops=SHARDED_STOPS, clip=0.05):
    """A distributed checkpoint of the model and its ``optimizer`` (a key of
    :data:`OPTIMIZERS`) through ``stops`` (``(dp × ep, replicate)``: by default 4x1 -> 2x2 ->
    1x4 -> 1x1 -> 4x1, sharded), a step at each stop, against the same steps on one process
    (parameters and optimizer state); the last checkpoint consolidated into one file."""
    rank, world = dist.get_rank(), dist.get_world_size()
    make_opt = OPTIMIZERS[optimizer]
    replicated = "_replicated" if any(replicate for _, replicate in stops) else ""
    out = Path(os.environ["SPARSEMOE_TEST_DIR"]) / f"dcp_{optimizer}{replicated}"
    torch.manual_seed(0)
    ref = Net()
    ref_opt = make_opt(ref)
    errors = {}
    for i, (shape, replicate) in enumerate(stops):
        name = f"{i}: {shape[0]}x{shape[1]}"
        if shape == (1, 1) and rank != 0:
            reference_step(ref, ref_opt, i, world, clip)
            dist.barrier()  # rank 0 alone: load, step, save
            continue
        model = mesh_model(shape, 0 if i == 0 else 10 + i, replicate)
        opt = make_opt(model)
        if i:
            P.load_sharded_checkpoint(out, model, opt)
            errors[f"load {name}"] = mesh_errors(model, ref)
            errors[f"load {name} state"] = state_errors(model, opt, ref, ref_opt)[0]
        if shape == (1, 1):
            reference_step(model, opt, i, world, clip)
        else:
            mesh_step(model, opt, i, clip)
        reference_step(ref, ref_opt, i, world, clip)
        errors[f"step on {name}"] = mesh_errors(model, ref)
        errors[f"step on {name} state"] = state_errors(model, opt, ref, ref_opt)[0]
        P.save_sharded_checkpoint(out, model, opt, extra={"stop": i})
        if shape == (1, 1):
            dist.barrier()
    if rank == 0:
        whole = torch.load(P.consolidate(out, out.with_name("whole.pt")), weights_only=True)
        errors["consolidated"] = max(max_err(v, ref.state_dict()[k])
                                     for k, v in whole["model"].items())
        errors["consolidated keys"] = float(set(whole["model"]) != set(ref.state_dict()))
        errors["extra"] = float(whole["stop"] != len(stops) - 1)
    return {"errors": errors, "files": sorted(p.name for p in out.iterdir())}


CHECKS = {
    "constructed": check_constructed, "errors": check_errors,
    "top_k": check_top_k, "top_k_eval": check_top_k_eval,
    "padded": check_padded, "padded_binding": check_padded_binding,
    "padded_one_expert": check_padded_one_expert_per_rank,
    "switch_capacity": check_switch_capacity, "expert_choice": check_expert_choice,
    "hierarchical": check_hierarchical, "autocast": check_autocast,
    "one_rank_receives": check_one_rank_receives, "bytes": counted_bytes,
    "compiled": check_compiled, "fsdp_bytes": check_fsdp_bytes,
    "gather_round_trip": check_gather_round_trip,
    "mesh_training": check_mesh_training, "mesh_reshard": check_mesh_reshard,
    "mesh_training_factored": lambda c: check_mesh_training(c, "factored_adam"),
    "mesh_reshard_factored": lambda c: check_mesh_reshard(c, "factored_adam"),
    "mesh_training_replicated": lambda c: check_mesh_training(c, replicate=True),
    "mesh_reshard_replicated": lambda c: check_mesh_reshard(c, "factored_adam",
                                                            REPLICATED_STOPS),
}


def worker(rank: int, world: int, init_method: str, out_dir: str, plan: list) -> None:
    """Run ``plan`` (``[(result name, check name, per-rank token counts)]``) on this rank;
    write ``rank{rank}.json``. After a failure the ranks may disagree on the next collective,
    so the remaining checks are skipped (the others then time out and say so)."""
    torch.set_num_threads(1)
    os.environ["SPARSEMOE_TEST_DIR"] = out_dir
    dist.init_process_group("gloo", init_method=init_method, rank=rank,
                            world_size=world, timeout=timedelta(seconds=30))
    results = {}
    for name, check, counts in plan:
        start = time.perf_counter()
        try:
            results[name] = {"ok": True, **CHECKS[check](counts)}
            results[name]["seconds"] = time.perf_counter() - start
        except Exception:
            results[name] = {"ok": False, "error": traceback.format_exc()}
            break
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()

