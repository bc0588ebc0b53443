"""Distributed checkpoints (sparsemoe.parallel.checkpoint) in one process: the round trip,
the single-file export and the atomic switch. Across ranks and mesh shapes:
tests/test_parallel.py."""

from __future__ import annotations

import os

import pytest
import torch

from sparsemoe import MoE, parallel
from sparsemoe.experiments import lm
from sparsemoe.experiments.runs import RunError


def trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = MoE(6, 4, k=2, hidden=5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(7, 6)).square().sum().backward()
    opt.step()
    return model, opt


def assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_round_trip_model_optimizer_and_extra(tmp_path):
    model, opt = trained(0)
    opt.param_groups[0]["lr"] = 0.123  # as a scheduler leaves it
    parallel.save_sharded_checkpoint(tmp_path / "ck", model, opt, extra={"step": 3})
    other, other_opt = trained(1)
    extra = parallel.load_sharded_checkpoint(tmp_path / "ck", other, other_opt)
    assert extra == {"step": 3} and other_opt.param_groups[0]["lr"] == 0.123
    assert_same(model, other)
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt.state[p][key], other_opt.state[q][key],
                                       rtol=0, atol=0)
    whole = torch.load(parallel.consolidate(tmp_path / "ck", tmp_path / "one.pt"),
                       weights_only=True)
    assert whole["step"] == 3 and set(whole["optimizer"]["state"]) == set(model.state_dict())
    torch.testing.assert_close(whole["model"], model.state_dict(), rtol=0, atol=0)


def test_a_save_that_stops_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """Killed while writing (the new folder incomplete) or between the two renames: the
    previous checkpoint loads."""
    first, first_opt = trained(0)
    parallel.save_sharded_checkpoint(tmp_path / "ck", first, first_opt)
    second, second_opt = trained(1)
    real = os.replace

    def stop_after_first_rename(src, dst):
        real(src, dst)
        if str(dst).endswith(".old"):
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", stop_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        parallel.save_sharded_checkpoint(tmp_path / "ck", second, second_opt)
    monkeypatch.undo()
    assert not (tmp_path / "ck").exists()
    assert parallel.sharded_checkpoint_path(tmp_path / "ck") == tmp_path / "ck.old"
    loaded, loaded_opt = trained(2)
    parallel.load_sharded_checkpoint(tmp_path / "ck", loaded, loaded_opt)
    assert_same(first, loaded)

    parallel.save_sharded_checkpoint(tmp_path / "ck", second, second_opt)  # recovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    parallel.load_sharded_checkpoint(tmp_path / "ck", loaded, loaded_opt)
    assert_same(second, loaded)

    (tmp_path / "ck.new").mkdir()  # a save that died while writing its shards
    (tmp_path / "ck.new" / "__0_0.distcp").write_bytes(b"partial")
    parallel.load_sharded_checkpoint(tmp_path / "ck", loaded, loaded_opt)
    assert_same(second, loaded)


def test_no_checkpoint(tmp_path):
    model, opt = trained(0)
    with pytest.raises(FileNotFoundError, match="no distributed checkpoint at .*nothing"):
        parallel.load_sharded_checkpoint(tmp_path / "nothing", model, opt)


def test_extra_values_are_verified_by_their_checksum(tmp_path):
    """``extra.pt`` has its SHA-256 beside it: one flipped byte, or no checksum file, is
    refused by every reader (the load, the extra values alone, consolidate, the LM's resume)
    with the path and the digests."""
    model, opt = trained(0)
    folder = parallel.save_sharded_checkpoint(tmp_path / "checkpoint", model, opt,
                                              extra={"step": 3})
    extra = folder / parallel.checkpoint.EXTRA
    assert sorted(p.name for p in folder.iterdir()) == [
        ".metadata", "__0_0.distcp", "extra.pt", "extra.pt.sha256"]
    data = bytearray(extra.read_bytes())
    data[len(data) // 2] ^= 1
    extra.write_bytes(bytes(data))
    corrupt = rf"{extra} is corrupt: its SHA-256 is [0-9a-f]{{64}}, extra.pt.sha256 records"
    for read in (lambda: parallel.sharded_checkpoint_extra(folder),
                 lambda: parallel.load_sharded_checkpoint(folder, model, opt),
                 lambda: parallel.consolidate(folder, tmp_path / "one.pt")):
        with pytest.raises(RuntimeError, match=corrupt):
            read()
    with pytest.raises(RunError, match=corrupt):
        lm.latest_checkpoint(tmp_path)
    (folder / "extra.pt.sha256").unlink()
    with pytest.raises(RuntimeError, match="has no checksum file extra.pt.sha256 beside it"):
        parallel.sharded_checkpoint_extra(folder)
