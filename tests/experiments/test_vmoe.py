import json

import pytest

from sparsemoe.cli import main
from sparsemoe.experiments.vmoe import RATIOS


def test_vmoe_run_on_the_8x8_digits_end_to_end(tmp_path):
    out = tmp_path / "vmoe"
    main(["vmoe", "run", "--data", "digits8", "--seeds", "1", "--epochs", "1", "--out", str(out)])
    results = json.loads((out / "vmoe.json").read_text())
    assert results["ratios"] == list(RATIOS) and results["config"]["epochs"] == 1
    digits = results["data"]["digits8"]
    assert (digits["train"], digits["test"]) == (1437, 360)
    (run,) = digits["runs"]
    assert len(run["BPR"]) == len(run["no BPR"]) == len(RATIOS)
    for acc in [run["dropless"], *run["BPR"], *run["no BPR"]]:
        assert 0.0 <= acc <= 1.0 and round(acc * 360) == pytest.approx(acc * 360)
    table = (out / "vmoe.md").read_text()
    assert "| digits8 | BPR |" in table and "| digits8 | no BPR |" in table
    pytest.importorskip("matplotlib")
    assert (out / "vmoe_capacity.png").stat().st_size > 1000
