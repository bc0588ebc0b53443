"""The DMoE experiment: the mutual-information estimator by hand, the jittered data set, the
gate analysis, and a CLI run on the 8×8 digits end to end."""

import json
import math

import numpy as np
import pytest
import torch

from sparsemoe.cli import main
from sparsemoe.data import load_digit_set, place_on_canvas
from sparsemoe.experiments.dmoe import (
    MODELS,
    DMoETrainConfig,
    JitteredDigits,
    entropy,
    expected_chance_mi,
    gate_analysis,
    mutual_information,
)
from sparsemoe.models import DeepMoE, DeepMoEConfig


def test_mutual_information_by_hand():
    # p = [[.4, .1], [.1, .4]]: marginals ½, I = .8·log2(.4/.25) + .2·log2(.1/.25)
    hand = 0.8 * math.log2(1.6) + 0.2 * math.log2(0.4)
    assert mutual_information(np.array([[4, 1], [1, 4]])) == pytest.approx(hand, abs=1e-12)
    assert hand == pytest.approx(0.2780719, abs=1e-7)
    assert mutual_information(np.eye(4)) == pytest.approx(2.0)  # 4 experts ↔ 4 values
    assert mutual_information(np.outer([1, 2, 3], [5, 1])) == pytest.approx(0, abs=1e-12)
    # a zero cell: p = [[½, 0], [¼, ¼]] → I = ½·log2(½/(½·¾)) + ¼·log2(¼/(½·¾)) + ¼·log2(¼/(½·¼))
    hand = 0.5 * math.log2(4 / 3) + 0.25 * math.log2(2 / 3) + 0.25 * math.log2(2)
    assert mutual_information(np.array([[2, 0], [1, 1]])) == pytest.approx(hand, abs=1e-12)
    assert entropy(np.array([1, 1, 2])) == pytest.approx(1.5)
    assert expected_chance_mi(4, 81, 81_000) == pytest.approx(240 / (162_000 * math.log(2)))
    with pytest.raises(ValueError, match="joint must be a non-negative 2-D table"):
        mutual_information(np.array([1.0, 2.0]))


def test_jittered_test_set_has_one_fixed_offset_per_image():
    split = load_digit_set("digits8")
    data = JitteredDigits.build(split, seed=0)
    assert data.test_offsets.shape == (360, 2) and data.test_offsets.abs().max() <= 4
    canvases = place_on_canvas(data.test_images, data.test_offsets, 4)
    torch.testing.assert_close(data.test_inputs, canvases.reshape(360, 256).float() / 16)
    assert torch.equal(JitteredDigits.build(split, seed=0).test_offsets, data.test_offsets)
    g = torch.Generator().manual_seed(0)
    first = torch.cat([x for x, _ in data.train_epoch(g, 100)])
    second = torch.cat([x for x, _ in data.train_epoch(g, 100)])
    assert first.shape == (1437, 256) and not torch.equal(first, second)  # fresh offsets


def test_gate_analysis_tables_are_consistent():
    torch.manual_seed(0)
    data = JitteredDigits.build(load_digit_set("digits8"), seed=0)
    model = DeepMoE(DeepMoEConfig(d_in=256, widths=(16, 16), gate_hidden=8))
    layers = gate_analysis(model, data)
    assert len(layers) == 2
    for layer in layers:
        by_offset, by_class = np.array(layer["gate_by_offset"]), np.array(layer["gate_by_class"])
        assert by_offset.shape == (4, 81) and by_class.shape == (4, 10)
        np.testing.assert_allclose(by_offset.sum(0), 1, rtol=1e-6)  # gates sum to 1 everywhere
        np.testing.assert_allclose(by_class.sum(0), 1, rtol=1e-6)
        # both tables average to the overall mean gate (classes weighted by their size)
        sizes = np.bincount(data.test_labels.numpy())
        np.testing.assert_allclose(by_offset.mean(1), by_class @ sizes / sizes.sum(), rtol=1e-6)
        assert sum(layer["share"]) == pytest.approx(1)
        assert 0 <= layer["mi_offset"] <= layer["entropy"] <= 2


def test_cli_train_and_report_on_8x8_digits(tmp_path, capsys):
    """The 8×8 digits on 16×16 canvases, 20 + 5 epochs: the DMoE learns (test error 23.3%,
    asserted under 28%; chance is 90%), its layer-1 gates follow the offset, not the class, and
    its layer-2 gates follow the class more than layer 1's do."""
    pytest.importorskip("matplotlib")
    main(["dmoe", "train", "--data", "digits8", "--models", "dmoe,single", "--width", "32",
          "--gate-hidden", "16", "--epochs", "20", "--finetune-epochs", "5", "--lr", "1e-2",
          "--out", str(tmp_path / "runs")])
    printed = capsys.readouterr().out
    assert "dmoe: test error" in printed and "single: test error" in printed
    run = json.loads((tmp_path / "runs" / "dmoe" / "metrics.json").read_text())
    assert run["test_error"] < 0.28 and run["data"] == "digits8"
    assert len(run["curve"]) == 25 and run["config"]["margin"] == DMoETrainConfig.margin
    layer1, layer2 = run["layers"]
    assert layer1["mi_offset"] > 0.5 and layer1["mi_class"] < 0.1
    assert layer2["mi_class"] > 3 * layer1["mi_class"]
    main(["dmoe", "report", "--runs", str(tmp_path / "runs"), "--figures", str(tmp_path)])
    table = capsys.readouterr().out
    assert "| `dmoe`: " + MODELS["dmoe"].description in table and "| `dmoe` | 2 |" in table
    assert (tmp_path / "dmoe_gates_dmoe.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "dmoe_gates_single.png").exists()
    assert (tmp_path / "runs" / "results.md").read_text().strip() == table.strip()


def test_bad_experiment_arguments(tmp_path, capsys):
    from sparsemoe.experiments.dmoe import train

    with pytest.raises(ValueError, match=r"models must be among .* got \['moe'\]"):
        train(["moe"], DMoETrainConfig(data="digits8"), tmp_path)
    with pytest.raises(SystemExit) as exited:  # one line on stderr, no traceback
        main(["dmoe", "report", "--runs", str(tmp_path)])
    assert exited.value.code == 1
    assert "run `sparsemoe dmoe train` first" in capsys.readouterr().err
    for field, value in (("epochs", 0), ("finetune_epochs", -1), ("width", 0), ("lr", 0.0),
                         ("batch_size", 0), ("margin", -1.0)):
        with pytest.raises(ValueError, match=f"{field} must be"):
            DMoETrainConfig(**{field: value})
