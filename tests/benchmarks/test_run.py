"""A smoke run of the benchmark on the classifier fixture: every output written, with the numbers it measured."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.data import data_dir
from benchmarks.run import DEFAULT, Settings, headline, run


def _smoke_run(tmp_path, serving: bool) -> dict:
    """``serving``: also the ONNX measurements (serving and 4-bit experts)."""
    if not (data_dir() / "sst2").is_dir():
        pytest.skip(f"benchmark data not found at {data_dir()} (set MOEFX_DATA)")
    settings = Settings(
        ratios=(0.5,), fixtures=("cls",), calib_sequences=32, ablations=False, serving_repeats=1,
        serving_fixtures=("cls",) if serving else (), compile_cost_model=False, threads=1,
        expert_bits=(4,) if serving else (),
        labels=(f"{DEFAULT} (default)", "prune-frequency"),
    )  # fmt: skip
    return run(settings, tmp_path)


def test_benchmark_smoke_run_writes_results(tmp_path):
    results = _smoke_run(tmp_path, serving=False)
    labels = [(r["label"], r["experts"]) for r in results["quality"]]
    assert labels == [("original", 1.0), (f"{DEFAULT} (default)", 0.5), ("prune-frequency", 0.5)]
    for row in results["quality"][1:]:
        assert 0.0 < row["test_acc"] <= 1.0 and math.isfinite(row["retained"])
        assert row["expert_params_retained"] == pytest.approx(0.5, abs=0.05)
        assert row["checkpoint_bytes"] < results["quality"][0]["checkpoint_bytes"]
    assert results["serving"] == []
    best = headline(results, "cls", 0.5)
    assert best["baseline_label"] == "prune-frequency"
    markdown = (tmp_path / "results.md").read_text()
    assert f"{best['default']:.4f}" in markdown and "prune-frequency" in markdown
    assert json.loads((tmp_path / "results.json").read_text())["quality"] == results["quality"]
    assert (tmp_path / "quality_vs_memory.png").stat().st_size > 0


@pytest.mark.slow  # four ONNX exports of the fixture with parity checks: minutes
def test_benchmark_smoke_run_measures_serving(tmp_path):
    results = _smoke_run(tmp_path, serving=True)
    assert [r["label"] for r in results["serving"]] == ["original", f"{DEFAULT} (default)"]
    assert all(r["ort_ms_16x128"] > 0 and r["onnx_bytes"] > 0 for r in results["serving"])
    assert results["serving"][1]["onnx_bytes"] < results["serving"][0]["onnx_bytes"]
    assert "ort_ms_16x128" in json.loads((tmp_path / "results.json").read_text())["serving"][0]
    quantized = results["quantized"]
    assert [(r["label"], r["bits"], r["int8_activations"]) for r in quantized] == [
        ("original", 4, False), ("original", 4, True), (f"{DEFAULT} (default)", 4, False),
        (f"{DEFAULT} (default)", 4, True)]  # fmt: skip
    for row, served in zip(quantized, [s for s in results["serving"] for _ in range(2)], strict=True):
        assert 0.0 < row["test_acc"] <= 1.0 and row["onnx_bytes"] < served["onnx_bytes"]  # 4-bit experts
    assert "## Quantized experts" in (tmp_path / "results.md").read_text()
