"""A smoke run of the tuning script on the classifier: the gradient score's loss comes from the dev labels."""

from __future__ import annotations

import math

import pytest

from benchmarks import tuning
from benchmarks.data import data_dir


@pytest.mark.slow  # a classifier calibration and evaluation on the dev split: about 40 s on 2 cores
def test_tuning_rows_on_the_classifier(monkeypatch):
    if not (data_dir() / "sst2").is_dir():
        pytest.skip(f"benchmark data not found at {data_dir()} (set MOEFX_DATA)")
    monkeypatch.setattr(tuning, "RATIOS", (0.5,))
    monkeypatch.setattr(tuning, "CHOICES", [("mc-smoe, gradient", {"method": "mc-smoe", "sparse_score": "gradient"})])
    rows = tuning.cls_rows()
    assert [(r["choice"], r["experts"]) for r in rows] == [("original", 1.0), ("mc-smoe, gradient", 0.5)]
    assert all(0.0 < r["accuracy"] <= 1.0 and math.isfinite(r["loss"]) for r in rows)
    assert "| cls | 0.5 | mc-smoe, gradient |" in tuning.render(rows, 60.0)
