"""Expert parallelism (sparsemoe.parallel) on 2 and 4 gloo ranks against the single-process
layer, plus the errors a user meets without a process group.

The ranks are spawned once per world size and run every check of ``parallel_checks.py``
(module-scoped fixtures); each test then asserts on one check's numbers. A run that does not
finish within its time limit fails instead of hanging.
"""

from __future__ import annotations

import itertools
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import join_within, load_benchmark
from parallel_checks import worker

from sparsemoe import MoE, parallel
from sparsemoe.experts import FeedForwardExperts

TOL = 1e-5

LAYER_CHECKS = ("top_k", "top_k_eval", "switch_capacity", "expert_choice", "hierarchical")

MESH_RUNS = {"adam": "", "factored_adam": "_factored", "replicated": "_replicated"}
"""The mesh runs of 4 ranks (training, and checkpoints through every mesh): their suffixes."""
MESH_RUNS_2 = {k: MESH_RUNS[k] for k in ("adam", "replicated")}
"""The mesh training runs of 2 ranks."""


def plan(world: int) -> list[tuple[str, str, list[int]]]:
    """``(result name, check, tokens per rank)``; uneven counts throughout."""
    counts = {2: [13, 9], 4: [13, 9, 4, 11]}[world]
    uneven = {2: [21, 0], 4: [5, 0, 17, 3]}[world]
    steps = [(name, name, counts) for name in LAYER_CHECKS]
    steps += [("padded", "padded", counts), ("padded_binding", "padded_binding", counts),
              ("padded_one_expert", "padded_one_expert", counts)]
    steps += [("switch_capacity_uneven", "switch_capacity", uneven),
              ("rank_sends_nothing", "top_k", uneven),
              ("no_tokens_anywhere", "top_k", [0] * world),
              ("one_rank_receives", "one_rank_receives", counts),
              ("autocast", "autocast", counts),
              ("bytes", "bytes", counts),
              ("constructed", "constructed", counts),
              ("errors", "errors", counts)]
    if world == 2:
        steps.append(("compiled", "compiled", counts))
        steps += [(f"mesh_training{suffix}", f"mesh_training{suffix}", counts)
                  for suffix in MESH_RUNS_2.values()]
    if world == 4:
        steps += [("gather_round_trip", "gather_round_trip", counts),
                  ("fsdp_bytes", "fsdp_bytes", counts)]
        steps += [(f"mesh_{check}{suffix}", f"mesh_{check}{suffix}", counts)
                  for suffix in MESH_RUNS.values()
                  for check in ("training", "reshard")]
    return steps


def spawn(world: int, tmp_path, timeout: float = 300.0) -> dict:
    """Run the plan on ``world`` ranks; ``{result name: [per-rank result]}``. The limit is a
    guard against a hang: 4 ranks on a loaded 2-core machine take well over a minute to start."""
    init = tmp_path / "init"
    ctx = mp.start_processes(worker, args=(world, f"file://{init}", str(tmp_path), plan(world)),
                             nprocs=world, join=False, start_method="forkserver")
    join_within(ctx, timeout, f"the {world}-rank run")
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    return {name: [r.get(name, {"ok": False, "error": "not run"}) for r in per_rank]
            for name, _, _ in plan(world)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    # Ranks are forked from a fresh server process that imports torch and sparsemoe once
    # (seconds each on a small machine), not from pytest's process, which may hold threads.
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.get_context("forkserver").set_forkserver_preload(["sparsemoe"])
    return {w: spawn(w, tmp_path_factory.mktemp(f"world{w}")) for w in (2, 4)}


def results(runs, world, name):
    out = runs[world][name]
    failed = [f"rank {r}:\n{res['error']}" for r, res in enumerate(out) if not res["ok"]]
    assert not failed, "\n".join(failed)
    return out


def assert_errors(per_rank, tol=TOL):
    worst = {}
    for res in per_rank:
        for key, value in res["errors"].items():
            worst[key] = max(worst.get(key, 0.0), value)
    bad = {k: v for k, v in worst.items() if not v <= tol}
    assert not bad, f"errors above {tol}: {bad}"
    return worst


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", LAYER_CHECKS)
def test_layer_equals_single_process(runs, world, name):
    """Output, auxiliary loss, input gradient, router gradients (this rank's tokens) and
    expert gradients (every rank's tokens) equal the single-process layer."""
    per_rank = results(runs, world, name)
    worst = assert_errors(per_rank)
    assert any(k.startswith("grad router") for k in worst) and "grad experts.w1" in worst
    assert sum(sum(r["rows_received"]) for r in per_rank) > 0


@pytest.mark.parametrize("world", [2, 4])
def test_padded_exchange(runs, world):
    """``exchange_capacity``: with room for every row, the exact exchange's results (the
    single-process layer; also with one expert per rank), nothing dropped, every routed row
    counted, ``W·n/W·C`` rows sent; binding (2 rows per
    expert, top-1), the single-process layer with ``Capacity(tokens=2)`` on each rank's
    slice, the same pairs dropped."""
    roomy = results(runs, world, "padded")
    assert_errors(roomy)
    assert all(r["exchange_dropped"] == 0 for r in roomy)
    assert all(r["exchange_routed"] == 2 * r["tokens"] for r in roomy)  # k = 2
    assert all(r["rows_sent"] == [8 // world * 13] * world for r in roomy)  # C = max(counts)
    assert_errors(results(runs, world, "padded_one_expert"))
    binding = results(runs, world, "padded_binding")
    assert_errors(binding)
    assert all(r["exchange_dropped"] == r["reference_dropped"] for r in binding)
    assert sum(r["exchange_dropped"] for r in binding) > 0
    assert all(r["exchange_routed"] == r["tokens"] for r in binding)  # top-1


@pytest.mark.parametrize("world", [2, 4])
def test_capacity_drops_pairs_like_one_process(runs, world):
    for name in ("switch_capacity", "switch_capacity_uneven"):
        per_rank = results(runs, world, name)
        assert_errors(per_rank)
        assert sum(r["dropped"] for r in per_rank) > 0  # the capacity was binding


@pytest.mark.parametrize("world", [2, 4])
def test_rank_without_tokens_and_no_tokens_at_all(runs, world):
    idle = results(runs, world, "rank_sends_nothing")
    assert_errors(idle)
    assert idle[1]["tokens"] == 0 and sum(idle[1]["rows_sent"]) == 0
    assert sum(idle[1]["rows_received"]) > 0  # its experts still serve the other ranks
    empty = results(runs, world, "no_tokens_anywhere")
    assert_errors(empty)
    assert all(sum(r["rows_received"]) == 0 for r in empty)


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_that_receive_nothing(runs, world):
    per_rank = results(runs, world, "one_rank_receives")
    assert_errors(per_rank)
    assert sum(per_rank[0]["rows_received"]) > 0
    assert all(sum(r["rows_received"]) == 0 for r in per_rank[1:])


@pytest.mark.parametrize("world", [2, 4])
def test_bfloat16_autocast_matches_one_process(runs, world):
    """Relative errors: the expert gradients sum every rank's rows in one bfloat16 product
    here and one product per rank there."""
    assert_errors(results(runs, world, "autocast"), tol=1e-2)


@pytest.mark.parametrize("world", [2, 4])
def test_exchange_bytes_are_what_travelled(runs, world):
    """ExchangeStats against the bytes counted in the all-to-all operator (own rank excluded),
    forward and backward; the compute-to-I/O ratio is the expert hidden width."""
    for res in results(runs, world, "bytes"):
        assert res["calls"] == 5  # the counts, the rows and the outputs, then both in reverse
        assert res["reported"] == res["counted"] > 0
        assert res["forward_reported"] == res["forward_counted"]
        assert res["compute_to_io"] == 12  # HIDDEN of parallel_checks
        assert res["expert_multiply_adds"] == res["rows_computed"] * 2 * 8 * 12
        assert res["step_expert_multiply_adds"] == 3 * res["expert_multiply_adds"]


def test_rank0_gather_round_trip_4_2_1_and_back(runs):
    """The one-group layout's checkpoints (``full_state_dict`` and the optimizer versions):
    one process -> 4 ranks -> two groups of 2 -> one process (a step) -> 4 ranks, every load,
    loss and gathered state against one process, same keys."""
    per_rank = results(runs, 4, "gather_round_trip")
    worst = assert_errors(per_rank)
    for stop in ("1 -> W", "W -> W/2", "1 -> W (back)"):
        for kind in ("load ", "loss on ", "gathered "):
            assert f"{kind}{stop}" in worst, stop
        assert worst[f"gathered {stop} keys"] == 0 and f"load {stop} state" in worst
    assert "step on 1 state" in worst


def test_expert_parallel_layer_under_torch_compile(runs):
    """Compiled as one graph (``fullgraph=True``, no graph break) equals eager, forward and
    backward, in training and evaluation, and with the padded exchange (no host read: it
    compiles without capture_scalar_outputs); a second token count compiles at most one more
    graph (the first call's sizes are specialised, then made dynamic)."""
    per_rank = results(runs, 2, "compiled")
    worst = assert_errors(per_rank)
    for mode in ("training", "evaluation", "padded"):
        assert f"{mode} grad experts.local.w1" in worst and f"{mode} x_grad 1" in worst
        for res in per_rank:
            assert res["frames"][mode]["breaks"] == 0 and res["frames"][mode]["graphs"] <= 2


def test_fsdp2_bytes_are_the_scaling_models(runs):
    """The collectives FSDP2 ran in one training step on each mesh of 4 ranks (their buffers
    counted as they ran) against ``benchmarks/parallel_scaling.py``'s ``fsdp_bytes`` and
    ``fsdp_messages``: per rank, a ring's ``(g−1)/g`` of each all-gather and reduce-scatter
    buffer, twice that of an all-reduce. Sharded, the root is gathered once (not resharded
    after the forward) and a bank three times; the model's counts padded as FSDP2 pads."""
    scaling = load_benchmark("parallel_scaling")
    per_rank = results(runs, 4, "fsdp_bytes")
    for res in per_rank:
        for mesh, got in res.items():
            if mesh in ("ok", "seconds"):
                continue
            (dp, ep), replicate = map(int, mesh.split()[0].split("x")), "replicated" in mesh
            sent = sum(size * (g - 1) / g * (2 if kind == "all_reduce" else 1)
                       for kind, size, g in got["calls"])
            messages = sum((g - 1) * (2 if kind == "all_reduce" else 1)
                           for kind, size, g in got["calls"])
            kinds = sorted({kind for kind, _, _ in got["calls"]})
            if replicate:  # the parameters whole: all-reduces of their own size
                assert kinds == ["all_reduce"], mesh
                model = scaling.fsdp_bytes(got["non_expert"], got["bank"], dp, ep, 4, True)
            else:
                assert len(got["calls"]) == 2 + 3 * (dp > 1), mesh
                model = scaling.fsdp_bytes(got["non_expert_padded"], got["bank_padded"], dp,
                                           ep, 4, False)
            assert sent == model > 0, mesh
            assert messages == scaling.fsdp_messages(1, dp, ep, replicate), mesh


@pytest.mark.parametrize(("world", "run"), [*((4, run) for run in MESH_RUNS),
                                            *((2, run) for run in MESH_RUNS_2)])
def test_mesh_training_equals_one_process(runs, world, run):
    """Experts over "ep", FSDP2 over "dp" (or replicated over "dp" with FSDP2's replicate):
    4x1, 2x2 and 1x4 meshes of 4 ranks (2x1 and 1x2 of 2) against one process, five steps of
    Adam or FactoredAdam with clipping (losses, norms, clipped gradients, parameters, and the
    optimizer state relative to its magnitude: FactoredAdam's column factors summed over the
    ranks holding the other rows); what each rank stores."""
    (res, *_) = per_rank = results(runs, world, f"mesh_training{MESH_RUNS[run]}")
    worst = assert_errors(per_rank)
    shapes = {4: {"4x1", "2x2", "1x4"}, 2: {"2x1", "1x2"}}[world]
    assert {k.split()[0] for k in worst} == shapes
    assert f"1x{world} state" in worst
    assert min(res["norms"]) > res["clip"]  # clipping was active at every step
    expected = ["col", "row", "step", "v"] if run == "factored_adam" else \
        ["exp_avg", "exp_avg_sq", "step"]
    assert res["state"] == expected
    experts, rest = res["single"]
    for r in per_rank:
        for shape, (own_experts, own_rest) in r["stored"].items():
            if run == "replicated":  # the ep group's experts, every other number
                assert own_experts == experts // int(shape.split("x")[1]) and own_rest == rest
            else:  # 1/W of the experts, at most 1/W (rounded up) of each other parameter
                assert own_experts == experts // world
                assert own_rest < rest * (1 / world + 1 / 12)


@pytest.mark.parametrize("run", MESH_RUNS)
def test_sharded_checkpoint_through_every_mesh(runs, run):
    """DCP: 4x1 -> 2x2 -> 1x4 -> one process -> 4x1, a step at each stop (replicated:
    2x2 replicated -> 4x1 -> 1x4 replicated -> one process -> 4x1 replicated, FactoredAdam);
    every rank wrote a file; the consolidated file is the single-process state. Parameters
    within 1e-6, the optimizer state within 1e-5 of its magnitude, and every load exactly
    what was saved (its errors are those of the step before it)."""
    per_rank = results(runs, 4, f"mesh_reshard{MESH_RUNS[run]}")
    worst = assert_errors(per_rank, tol=1e-5)
    assert_errors([{"errors": {k: v for k, v in r["errors"].items() if "state" not in k}}
                   for r in per_rank], tol=1e-6)
    assert "step on 4: 4x1" in worst and "load 3: 1x1" in worst and worst["extra"] == 0
    stops = ["0: 2x2", "1: 4x1", "2: 1x4", "3: 1x1", "4: 4x1"] if run == "replicated" \
        else ["0: 4x1", "1: 2x2", "2: 1x4", "3: 1x1", "4: 4x1"]
    for before, stop in itertools.pairwise(stops):
        for kind in ("", " state"):
            assert worst[f"load {stop}{kind}"] == worst[f"step on {before}{kind}"], stop
    assert worst["consolidated keys"] == 0
    assert per_rank[0]["files"] == [".metadata", *(f"__{r}_0.distcp" for r in range(4)),
                                    "extra.pt", "extra.pt.sha256"]


@pytest.mark.parametrize("world", [2, 4])
def test_layer_built_with_a_process_group(runs, world):
    for res in results(runs, world, "constructed"):
        assert res["local_experts"] == 8 // world and res["global_experts"] == 8
        assert res["distinct_experts"] and res["data_parallel_equal"]


@pytest.mark.parametrize("world", [2, 4])
def test_errors_name_what_is_wrong(runs, world):
    m = results(runs, world, "errors")[0]["messages"]
    n = 2 * world + 1
    assert m["indivisible"] == (f"ValueError: num_experts ({n}) must be divisible by the "
                                f"process group's size ({world}): every rank holds "
                                f"num_experts / size experts")
    assert "must be a FeedForwardExperts bank" in m["shard"] and "ModuleListExperts" in m["shard"]
    assert f"= {2 * world} / {world} = 2 modules, got {2 * world}" in m["experts_count"]
    assert m["no_moe"].startswith("ValueError: model (Linear) contains no sparsemoe MoE layer")
    assert f"has {2 * world} experts along the first dimension" in m["checkpoint"]
    assert m["factored_state"].startswith("ValueError: optimizer state 'col' of expert "
                                          "parameter") and "FactoredAdam" in m["factored_state"]
    assert m["sharded_without_mesh"] == (
        "ValueError: model (MoE) has expert-parallel layers on a process group without a "
        "device mesh; distributed checkpoints need parallelize(model, mesh) (or "
        "full_state_dict for this layout)")
    assert m["mesh_other_group"] == (
        "ValueError: experts: the layer's experts are spread over another process group than "
        "the mesh's 'ep' dimension; build the layer for one process (no process_group) and let "
        "parallelize spread it")
    assert m["mesh_dims"] == ("ValueError: mesh must have the dimensions ('dp', 'ep') "
                              "(init_device_mesh(device, (dp, ep), mesh_dim_names=('dp', 'ep'))),"
                              " got ('ep',)")
    assert m["replicate_type"] == "TypeError: replicate must be a bool, got str 'yes'"
    assert m["mesh_divisible"] == (f"ValueError: model: num_experts ({2 * world + 1}) must be "
                                   f"divisible by dp × ep (1 × {world} = {world}): every rank "
                                   f"stores num_experts / (dp × ep) experts")


def test_errors_without_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        parallel.ExpertParallel(FeedForwardExperts(2, 8, 8))
    with pytest.raises(RuntimeError, match="init_process_group"):
        parallel.expert_parallel(MoE(8, 4, k=2, hidden=8))
    with pytest.raises(TypeError, match="local must be an expert bank .* got Linear"):
        parallel.ExpertParallel(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="exchange_capacity must be >= 1, got 0"):
        parallel.ExpertParallel(FeedForwardExperts(2, 8, 8), exchange_capacity=0)
    with pytest.raises(TypeError, match="exchange_capacity must be an int, got float 2.0"):
        parallel.ExpertParallel(FeedForwardExperts(2, 8, 8), exchange_capacity=2.0)
    with pytest.raises(TypeError, match="mesh must be a torch.distributed DeviceMesh, got tuple"):
        parallel.parallelize(MoE(8, 4, k=2, hidden=8), (2, 2))
