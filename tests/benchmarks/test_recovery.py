"""A smoke run of the recovery benchmark on the classifier fixture: its rows carry what the issue asks for."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import recovery
from benchmarks.data import data_dir
from benchmarks.run import TASKS, Settings

ROW_KEYS = {"fixture", "method", "experts", "expert_params_retained", "retained_before", "retained", "steps", "seconds"}


def test_recovery_rows_on_the_classifier(tmp_path, monkeypatch):
    if not (data_dir() / "sst2").is_dir():
        pytest.skip(f"benchmark data not found at {data_dir()} (set MOEFX_DATA)")
    monkeypatch.setattr(recovery, "METHODS", (("merge-refit (default)", {}),))
    task = TASKS["cls"](Settings(calib_sequences=32))
    [row] = recovery.recovery_rows(task, steps=3, lr=1e-4)
    assert ROW_KEYS <= set(row) and row["steps"] == 3 and row["experts"] == 0.25
    assert row["expert_params_retained"] == pytest.approx(0.25, abs=0.02)
    full = task.evaluate(task.model)["test_acc"]
    assert row["full"] == full and row["retained_before"] == pytest.approx(row["before"] / full)
    assert row["retained"] == pytest.approx(row["after"] / full) and math.isfinite(row["last_loss"])
    text = recovery.render([row])
    assert f"| cls | merge-refit (default) | {row['expert_params_retained']:.3f} |" in text


def test_recovery_keeps_the_rows_of_fixtures_it_did_not_run(tmp_path, monkeypatch):
    kept = {"fixture": "lm", "method": "mc-smoe", "experts": 0.25, "expert_params_retained": 0.12,
            "retained_before": 0.5, "retained": 0.9, "steps": 10, "seconds": 1.0, "lr": 1e-3, "metric": "val_loss",
            "full": 1.5, "before": 2.2, "after": 1.6, "first_loss": 1.0, "last_loss": 0.5}  # fmt: skip
    (tmp_path / "recovery.json").write_text(json.dumps({"rows": [kept]}))
    new = dict(kept, fixture="cls", method="merge-refit (default)")
    monkeypatch.setattr(recovery, "recovery_rows", lambda task, steps, lr: [new])
    monkeypatch.setattr(recovery, "TASKS", {"lm": None, "lm-fine": None, "cls": lambda settings: None})
    recovery.main(["--fixtures", "cls", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "recovery.json").read_text())["rows"] == [kept, new]
    assert "| cls | merge-refit (default) |" in (tmp_path / "recovery.md").read_text()
