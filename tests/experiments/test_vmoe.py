import json

import pytest
import torch

from sparsemoe.cli import main
from sparsemoe.experiments.vmoe import RATIOS, validation_split


def test_validation_split_is_fixed_disjoint_and_complete():
    images = torch.arange(50.0).reshape(50, 1, 1)
    labels = torch.arange(50) % 10
    (tx, ty), (vx, vy) = validation_split(images, labels, 0.1)
    assert (len(tx), len(vx)) == (45, 5)
    seen = torch.cat([tx.flatten(), vx.flatten()]).long()
    assert sorted(seen.tolist()) == list(range(50))  # every image exactly once
    assert torch.equal(ty, seen[:45] % 10) and torch.equal(vy, seen[45:] % 10)  # pairs kept
    torch.manual_seed(123)  # the training seed does not move the split
    (_, _), (vx2, _) = validation_split(images, labels, 0.1)
    assert torch.equal(vx, vx2)
    (tx0, _), (vx0, _) = validation_split(images, labels, 0.0)
    assert (len(tx0), len(vx0)) == (50, 0)


def test_vmoe_run_on_the_8x8_digits_end_to_end(tmp_path):
    out = tmp_path / "vmoe"
    main(["vmoe", "run", "--data", "digits8", "--seeds", "1", "--epochs", "1", "--out", str(out)])
    results = json.loads((out / "vmoe.json").read_text())
    assert results["ratios"] == list(RATIOS) and results["config"]["epochs"] == 1
    digits = results["data"]["digits8"]
    assert (digits["train"], digits["valid"], digits["test"]) == (1293, 144, 360)
    (run,) = digits["runs"]
    assert 0.0 <= run["valid"] <= 1.0 and round(run["valid"] * 144) == pytest.approx(
        run["valid"] * 144)
    assert len(run["BPR"]) == len(run["no BPR"]) == len(RATIOS)
    for acc in [run["dropless"], *run["BPR"], *run["no BPR"]]:
        assert 0.0 <= acc <= 1.0 and round(acc * 360) == pytest.approx(acc * 360)
    table = (out / "vmoe.md").read_text()
    assert "valid, dropless" in table and f"| {100 * run['valid']:.1f} ± 0.0 |" in table
    assert "| digits8 | BPR |" in table and "| digits8 | no BPR |" in table
    pytest.importorskip("matplotlib")
    assert (out / "vmoe_capacity.png").stat().st_size > 1000
