"""benchmarks/suite.py's functions on a tiny configuration on the CPU: the GPU grid (float32 and
bfloat16 autocast, two token counts, the compiled contender, transformers' peers) runs here the
way it will on a GPU, so only the GPU run itself is left."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "suite.py"


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("suite_under_test", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


TINY = {"d": 16, "n": 4, "k": 2, "h": 32, "repeats": 1, "device": "cpu"}


def test_paper_rows_for_both_dtypes_and_token_counts(suite):
    limits = {dt: suite.machine_limits("cpu", 1, suite.DTYPES[dt], size=64, copy_elements=4096)
              for dt in ("float32", "bfloat16")}
    rows = []
    for dtype in ("float32", "bfloat16"):
        for tokens in (32, 64):
            # the compiled contender once, where it is most fragile: autocast to bfloat16
            backend = "eager" if (dtype, tokens) == ("bfloat16", 32) else None
            rows.append(suite.bench_paper(TINY["d"], TINY["n"], TINY["k"], TINY["h"], tokens,
                                          TINY["repeats"], "cpu", limits[dtype], None, dtype,
                                          compile_backend=backend, baseline_impl="loop"))
    for row in rows:
        assert row["errors"] == {}
        assert row["dense_ms"] > 0 and row["sparsemoe_ms"] > 0 and row["baseline_ms"] > 0
        assert row["sparsemoe_over_baseline"] == pytest.approx(
            row["sparsemoe_ms"] / row["baseline_ms"])
    compiled = rows[2]
    assert compiled["compiled_ms"] > 0 and rows[0]["compiled_ms"] is None
    assert compiled["compiled_over_sparsemoe"] == pytest.approx(
        compiled["compiled_ms"] / compiled["sparsemoe_ms"])
    report = suite.tables(rows, limits, "## tiny")
    assert report.count("| bfloat16 |") == 2 and report.count("| float32 |") == 2
    assert "Measured limits (bfloat16)" in report


def test_baseline_contender_switches_the_implementation_back(suite):
    bank = torch.nn.Module()
    bank.impl = "auto"
    seen = []
    suite._with_impl(bank, "grouped_mm", lambda: seen.append(bank.impl))()
    assert seen == ["grouped_mm"] and bank.impl == "auto"


def test_peer_rows_under_autocast(suite):
    pytest.importorskip("transformers")
    for dtype in ("float32", "bfloat16"):
        row = suite.bench_peers(TINY["d"], TINY["n"], TINY["k"], TINY["h"], 32, 1, "cpu",
                                2**30, 2**30, dtype)
        assert row["errors"] == {}, row["errors"]
        assert row["hf_grouped_mm_ms"] > 0 and row["hf_eager_ms"] > 0
        # same weights, same function: float32 to rounding, bfloat16 to its 8-bit mantissa
        assert row["max_abs_output_error"] < (1e-5 if dtype == "float32" else 5e-2)


def test_a_failing_contender_is_reported_and_the_others_run(suite):
    def broken():
        raise RuntimeError("no kernel for this device\nsecond line")

    ran = []
    errors = {}
    med = suite.time_alternating({"ok": lambda: ran.append(1), "broken": broken}, 2, "cpu",
                                 errors)
    assert list(med) == ["ok"] and len(ran) == 3  # warm-up and two repeats
    assert errors == {"broken": "RuntimeError: no kernel for this device"}
    row = {"section": "paper", "dtype": "bfloat16", "tokens": 8, "experts": 4, "k": 1,
           "errors": errors}
    assert suite._errors([row]) == [
        "", "- bfloat16, T = 8, n = 4, k = 1: broken failed: RuntimeError: no kernel for this "
        "device", ""]
    with pytest.raises(RuntimeError, match="no kernel"):
        suite.time_alternating({"broken": broken}, 1, "cpu")


def test_step_runs_under_autocast_only_when_asked(suite):
    seen = []
    model = torch.nn.Linear(4, 4)
    x = torch.randn(3, 4, requires_grad=True)

    def forward(inp):
        out = model(inp)
        seen.append(out.dtype)
        return out

    suite.step_fn(model, x, torch.randn(3, 4), forward)()
    suite.step_fn(model, x, torch.randn(3, 4), forward, autocast=torch.bfloat16)()
    assert seen == [torch.float32, torch.bfloat16]
    assert model.weight.grad.dtype == torch.float32
