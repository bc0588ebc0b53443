"""The language-model trainer on a device mesh (gloo, 4 ranks): the loss curve of a run that
moves between meshes and one process equals the curve of one process, step for step."""

from __future__ import annotations

import json
import socket
from dataclasses import replace

import pytest
import torch.multiprocessing as mp
from helpers import join_within
from lm_mesh_checks import mesh_rank

from sparsemoe.experiments.lm import SHARDED_CHECKPOINT, LMTrainConfig, Trainer, load_trained

WORLD = 4


def exact_config(corpus_file, out, steps):
    """A tiny MoE Transformer whose distributed run is the single-process one: no dropout,
    a deterministic top-k router and no balancing loss (each rank's would be its own tokens')."""
    return LMTrainConfig(arch="transformer", corpus=(corpus_file,), vocab_size=None,
                         preset=None, batch_size=WORLD, bptt=5, steps=steps, decay_steps=20,
                         eval_every=5, eval_tokens=60, warmup=3, lr=1e-2, out=str(out),
                         model={"router": "top-k", "num_experts": 4, "k": 2, "d_model": 8,
                                "n_layers": 1, "n_heads": 2, "ffn_hidden": 16, "hidden": 8,
                                "w_switch": 0.0})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_on_mesh(cfg, data_parallel, tmp_path, name, timeout=240.0, fails=False, **layout):
    """``cfg`` on a ``data_parallel × WORLD/data_parallel`` mesh (``layout``: ``replicate``,
    ``exchange_capacity``); every rank's result."""
    out = tmp_path / name
    out.mkdir()
    ctx = mp.start_processes(mesh_rank,
                             args=(WORLD, free_port(), data_parallel, cfg, str(out), layout),
                             nprocs=WORLD, join=False, start_method="forkserver")
    join_within(ctx, timeout, "the mesh run")
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    if fails:
        return results
    failed = [f"rank {r}:\n{res['error']}" for r, res in enumerate(results) if not res["ok"]]
    assert not failed, "\n".join(failed)
    return results


def test_loss_curve_through_meshes_equals_one_process(corpus_file, tmp_path):
    """One process 0-5 (checkpoint.pt), mesh 2x2 5-10, mesh 1x4 10-15 (distributed
    checkpoints), one process 15-20, against 20 steps on one process."""
    mp.get_context("forkserver").set_forkserver_preload(["sparsemoe"])
    whole = Trainer(exact_config(corpus_file, tmp_path / "one", 20), progress=False).run()
    run = tmp_path / "moving"
    Trainer(exact_config(corpus_file, run, 5), progress=False).run()
    on_2x2 = run_on_mesh(exact_config(corpus_file, run, 10), 2, tmp_path, "2x2")
    on_1x4 = run_on_mesh(exact_config(corpus_file, run, 15), 1, tmp_path, "1x4")
    assert [r["mesh"] for r in on_2x2 + on_1x4] == [[2, 2]] * WORLD + [[1, 4]] * WORLD
    assert (run / SHARDED_CHECKPOINT / ".metadata").is_file()
    moved = Trainer(exact_config(corpus_file, run, 20), progress=False).run()
    assert moved["steps"] == 20
    want, got = whole["history"]["train_loss"], moved["history"]["train_loss"]
    assert len(got) == 20
    worst = max(abs(a - b) for a, b in zip(got, want, strict=True))
    print(f"largest loss difference over 20 steps: {worst:.1e}")
    assert worst < 1e-4, " ".join(f"{a - b:.1e}" for a, b in zip(got, want, strict=True))
    assert moved["test_perplexity"] == pytest.approx(whole["test_perplexity"], rel=1e-4)
    assert all(r["train_loss"] == on_1x4[0]["train_loss"] for r in on_1x4)  # every rank


def test_a_mesh_run_evaluates_on_one_process(corpus_file, tmp_path):
    """``load_trained`` reads the distributed checkpoint into a model on one process."""
    cfg = exact_config(corpus_file, tmp_path / "run", 5)
    mp.get_context("forkserver").set_forkserver_preload(["sparsemoe"])
    run_on_mesh(cfg, 2, tmp_path, "2x2")
    model, ck = load_trained(tmp_path / "run")
    assert ck["step"] == 5 and "model" not in ck
    reference = Trainer(replace(cfg, out=str(tmp_path / "one")), progress=False)
    reference.run()
    for (name, p), q in zip(model.state_dict().items(),
                            reference.model.state_dict().values(), strict=True):
        assert (p - q).abs().max() < 1e-5, name


def test_factored_adam_resumes_on_another_mesh(corpus_file, tmp_path):
    """``--optimizer factored-adam`` (its factors DTensors like the parameters' shards) on a
    2x2 mesh for steps 1-5, resumed on a 1x4 mesh for 6-10 (the factors resharded by DCP):
    the loss curve of 10 steps on one process."""
    mp.get_context("forkserver").set_forkserver_preload(["sparsemoe"])

    def config(out, steps):
        return replace(exact_config(corpus_file, out, steps), optimizer="factored-adam")

    whole = Trainer(config(tmp_path / "one", 10), progress=False).run()
    run = tmp_path / "moving"
    run_on_mesh(config(run, 5), 2, tmp_path, "2x2")
    on_1x4 = run_on_mesh(config(run, 10), 1, tmp_path, "1x4")
    want, got = whole["history"]["train_loss"], on_1x4[0]["train_loss"]
    assert len(got) == 10 and all(r["steps"] == 10 for r in on_1x4)
    worst = max(abs(a - b) for a, b in zip(got, want, strict=True))
    print(f"FactoredAdam: largest loss difference over 10 steps: {worst:.1e}")
    assert worst < 1e-4, " ".join(f"{a - b:.1e}" for a, b in zip(got, want, strict=True))


def largest_loss_difference(got, want):
    assert len(got) == len(want)
    return max(abs(a - b) for a, b in zip(got, want, strict=True))


def test_replicated_mesh_equals_one_process(corpus_file, tmp_path):
    """``--replicate`` (FSDP2's replicate, all-reduced gradients) on a 2x2 mesh: the loss
    curve of one process."""
    mp.get_context("forkserver").set_forkserver_preload(["sparsemoe"])
    whole = Trainer(exact_config(corpus_file, tmp_path / "one", 5), progress=False).run()
    on_mesh = run_on_mesh(exact_config(corpus_file, tmp_path / "run", 5), 2, tmp_path, "2x2",
                          replicate=True)
    worst = largest_loss_difference(on_mesh[0]["train_loss"], whole["history"]["train_loss"])
    print(f"replicated 2x2: largest loss difference over 5 steps: {worst:.1e}")
    assert worst < 1e-4
    assert "dropped_rows" not in on_mesh[0]["exchange"]  # the exact exchange
    assert "sent" in on_mesh[0]["progress"] and "dropped" not in on_mesh[0]["progress"]
    assert on_mesh[0]["placements"] == ["Replicate"]  # whole copies, not FSDP2's Shard(0)


def test_padded_exchange_equals_the_exact_one_or_counts_its_drops(corpus_file, tmp_path):
    """``--exchange-capacity``: 5 rows per expert (a rank's 1 stream × 5 tokens sends an
    expert at most 5) on a 1x4 mesh is the exact exchange, the loss curve of one process,
    nothing dropped; 1 row drops rows, counted over the steps, layers and ranks against the
    rows routed (5 steps × 4 ranks × 5 tokens × k = 2), and the run differs."""
    mp.get_context("forkserver").set_forkserver_preload(["sparsemoe"])
    whole = Trainer(exact_config(corpus_file, tmp_path / "one", 5), progress=False).run()
    want = whole["history"]["train_loss"]
    roomy = run_on_mesh(exact_config(corpus_file, tmp_path / "roomy", 5), 1, tmp_path, "c5",
                        exchange_capacity=5)
    tight = run_on_mesh(exact_config(corpus_file, tmp_path / "tight", 5), 1, tmp_path, "c1",
                        exchange_capacity=1)
    worst = largest_loss_difference(roomy[0]["train_loss"], want)
    print(f"exchange capacity 5, 1x4: largest loss difference over 5 steps: {worst:.1e}")
    assert worst < 1e-4
    routed = 5 * WORLD * 5 * 2
    assert roomy[0]["exchange"]["dropped_rows"] == 0
    assert roomy[0]["exchange"]["routed_rows"] == routed
    drops = tight[0]["exchange"]
    assert drops["routed_rows"] == routed and 0 < drops["dropped_rows"] < routed
    assert drops["drop_fraction"] == drops["dropped_rows"] / routed
    assert all(r["exchange"] == drops for r in tight)  # summed over the ranks, on each
    assert roomy[0]["placements"] == ["Shard"]  # sharded: the default layout
    assert roomy[0]["progress"]["dropped"] == "0.0%"  # the progress bar, last step
    assert 0 < float(tight[0]["progress"]["dropped"].rstrip("%")) < 100
    assert largest_loss_difference(tight[0]["train_loss"], want) > 1e-3
