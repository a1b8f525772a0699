"""The tuning script: its rows on the classifier, and how it judges a choice on all fixtures together."""

from __future__ import annotations

import math

import pytest

from benchmarks import tuning
from benchmarks.data import data_dir


@pytest.mark.slow  # two classifier calibrations and evaluations on the dev split: about a minute on 2 cores
def test_tuning_rows_on_the_classifier(monkeypatch):
    if not (data_dir() / "sst2").is_dir():
        pytest.skip(f"benchmark data not found at {data_dir()} (set MOEFX_DATA)")
    gradient = {"method": "mc-smoe", "sparse_score": "gradient"}
    monkeypatch.setattr(tuning, "RATIOS", (0.5,))
    small, larger = tuning.Calibration(32), tuning.Calibration(64)
    monkeypatch.setattr(tuning, "CHOICES", [("mc-smoe sparse score", "gradient", gradient, small),
                                            ("calibration sequences", "32", gradient, small),
                                            ("calibration sequences", "64", gradient, larger)])  # fmt: skip
    rows = tuning.fixture_rows(tuning.cls_fixture())
    assert [(r["choice"], r["experts"]) for r in rows] == [("original", 1.0), ("gradient", 0.5), ("32", 0.5),
                                                           ("64", 0.5)]  # fmt: skip
    assert all(0.0 < r["accuracy"] <= 1.0 and math.isfinite(r["loss"]) for r in rows)
    # one configuration, compressed once: the very same scores
    assert rows[1]["loss"] == rows[2]["loss"]
    assert "| calibration sequences | 64 |" in tuning.render(rows, 60.0)


def _rows(losses: dict[str, float], accuracies: dict[str, float]) -> list[dict]:
    rows = [
        {"fixture": "lm", "option": "", "choice": "original", "experts": 1.0, "loss": 1.0},
        {"fixture": "cls", "option": "", "choice": "original", "experts": 1.0, "loss": 0.3, "accuracy": 0.8},
    ]
    rows += [{"fixture": "lm", "option": "refit", "choice": c, "experts": 0.5, "loss": v} for c, v in losses.items()]
    rows += [
        {"fixture": "cls", "option": "refit", "choice": c, "experts": 0.5, "loss": 0.4, "accuracy": v}
        for c, v in accuracies.items()
    ]
    return rows


def test_a_choice_is_judged_by_its_mean_retained_over_all_fixtures(monkeypatch):
    monkeypatch.setattr(tuning, "RATIOS", (0.5,))
    monkeypatch.setattr(tuning, "CHOICES", [("refit", "a (default)", {}, tuning.CALIB),
                                            ("refit", "b", {"refit": "out"}, tuning.CALIB)])  # fmt: skip
    # b is best on cls but far worse on lm: a wins on the mean
    text = tuning.render(_rows({"a (default)": 1.1, "b": 1.5}, {"a (default)": 0.72, "b": 0.8}), 60.0)
    assert f"| refit | b | 1.5000 ({math.exp(-0.5):.3f}) | 0.8000 (1.000) | {(math.exp(-0.5) + 1) / 2:.3f} |" in text
    assert f"- refit: the default, a (default) ({(math.exp(-0.1) + 0.9) / 2:.3f})." in text
    text = tuning.render(_rows({"a (default)": 1.1, "b": 1.05}, {"a (default)": 0.72, "b": 0.8}), 60.0)
    assert "- refit: b (" in text and "over the default a (default)" in text
    # a lead below the table's precision is a tie, which the default keeps
    text = tuning.render(_rows({"a (default)": 1.1, "b": 1.1}, {"a (default)": 0.72, "b": 0.7203}), 60.0)
    assert "- refit: the default, a (default)" in text


def test_choices_within_the_noise_of_the_best_are_named_with_it(monkeypatch):
    monkeypatch.setattr(tuning, "RATIOS", (0.5,))
    names = ("a (default)", "b", "c", "d")
    monkeypatch.setattr(tuning, "CHOICES", [("refit", name, {}, tuning.CALIB) for name in names])
    # b and c lead the default by about 0.02 and lie 0.0002 apart; d trails
    losses = {"a (default)": 1.1, "b": 1.06, "c": 1.0604, "d": 1.2}
    text = tuning.render(_rows(losses, dict.fromkeys(names, 0.72)), 60.0)
    assert "- refit: b (" in text and f"; c ({(math.exp(-0.0604) + 0.9) / 2:.3f}) within the noise of it." in text
    assert "d (" not in text.split("- refit:")[1]


def _as_sample(rows: list[dict], choice: str, lm_loss: float) -> list[dict]:
    """The default's rows as the calibration sample ``choice``, with lm's loss set to ``lm_loss``."""
    default = [dict(r, option=tuning.SAMPLE_OPTION, choice=choice) for r in rows if r["choice"] == "a (default)"]
    return [dict(r, loss=lm_loss) if r["fixture"] == "lm" else r for r in default]


def test_a_lead_smaller_than_another_calibration_sample_makes_is_a_tie(monkeypatch):
    monkeypatch.setattr(tuning, "RATIOS", (0.5,))
    other_sample = tuning.Calibration(256, 1)
    monkeypatch.setattr(tuning, "CHOICES", [("refit", "a (default)", {}, tuning.CALIB),
                                            ("refit", "b", {"refit": "out"}, tuning.CALIB),
                                            (tuning.SAMPLE_OPTION, "first (default)", {}, tuning.CALIB),
                                            (tuning.SAMPLE_OPTION, "second", {}, other_sample)])  # fmt: skip
    rows = _rows({"a (default)": 1.1, "b": 1.09}, {"a (default)": 0.72, "b": 0.72})
    first = _as_sample(rows, "first (default)", 1.1)
    # b leads by about 0.0045: a choice without calibration noise, a tie once another sample moves the mean 0.009
    assert "- refit: b (" in tuning.render(rows + first + _as_sample(rows, "second", 1.1), 60.0)
    text = tuning.render(rows + first + _as_sample(rows, "second", 1.12), 60.0)
    noise = (math.exp(-0.1) - math.exp(-0.12)) / 2  # lm's retained moves, cls's does not
    assert "- refit: the default, a (default)" in text and f"moves the mean retained by up to {noise:.4f}" in text
    assert "- calibration sample" not in text


def test_other_calibration_samples_of_the_classifier_draw_other_sentences():
    examples = list(range(100))
    assert tuning._sample(examples, tuning.Calibration(10)) == examples[:10]
    other = tuning._sample(examples, tuning.Calibration(10, 1))
    assert len(set(other)) == 10 and other != examples[:10]
    assert other == tuning._sample(examples, tuning.Calibration(10, 1))
