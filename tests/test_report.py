"""The compression report: JSON round trip, saving beside checkpoints, markdown and plots."""

from __future__ import annotations

import copy
import functools
import json
import warnings

import numpy as np
import pytest

import moefx
from moefx.api import CompressionReport, QualityCheck
from moefx.errors import CheckpointError
from moefx.losparse import LoSparseExperts
from moefx.report import element_size, groups_figure, markdown, remaining_figure, summary, write_report
from moefx.zoo import example_inputs, tiny_model


@functools.cache
def _compressed(method: str):
    """A compiled tiny Mixtral, shared (do not modify); mc-smoe at rank 4 with its first layer skipped."""
    calib = [example_inputs("mixtral", batch=4, seq=16, seed=s) for s in range(3)]
    options = {"rank": 4, "skip_layers": [0]} if method == "mc-smoe" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", moefx.MoefxWarning)
        return moefx.compile(tiny_model("mixtral"), calib, method=method, experts=0.5, **options)


def _report(method: str = "mc-smoe") -> CompressionReport:
    """A fresh copy of the report of :func:`_compressed`."""
    return copy.deepcopy(_compressed(method).moefx_report)


@pytest.mark.parametrize("method", ["mc-smoe", "prune-frequency"])
def test_report_round_trips_through_json(method):
    report = _report(method)
    report.quality = QualityCheck("loss", 2.0, 2.5)
    assert CompressionReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report


def test_save_writes_the_report_and_load_restores_it(tmp_path):
    model = _compressed("mc-smoe")
    moefx.save(model, tmp_path / "ckpt", example_inputs("mixtral"))
    assert json.loads((tmp_path / "ckpt" / "report.json").read_text()) == model.moefx_report.to_dict()
    assert moefx.load(tmp_path / "ckpt").moefx_report == model.moefx_report


@pytest.mark.parametrize("content", ["{not json", '{"config": {}}', '{"config": {"experts": 7.5}, "blocks": []}'])
def test_corrupt_report_json_is_a_checkpoint_error(tmp_path, content):
    (tmp_path / "report.json").write_text(content)
    with pytest.raises(CheckpointError, match="corrupt or not a moefx report"):
        moefx.export.load_report(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        moefx.export.load_report(tmp_path / "elsewhere")


def test_remaining_fractions_are_the_losparse_sizes():
    model = _compressed("mc-smoe")
    report = model.moefx_report
    assert report.blocks[0].remaining == []  # skipped: not compressed
    bank = model.get_submodule(report.blocks[1].name).experts
    assert isinstance(bank, LoSparseExperts)
    expected = [
        [m.num_parameters() / (m.out_features * m.in_features) for m in (*e.in_linears, e.out_linear)]
        for e in bank.experts
    ]
    np.testing.assert_allclose(report.blocks[1].remaining, expected)
    assert len(expected) == report.blocks[1].kept and all(0 < f < 1 for e in expected for f in e)


def test_markdown_states_every_layer_group_and_stage():
    report = _report()
    report.quality = QualityCheck("next-token loss", 2.0, 2.25)
    text = markdown(report)
    for i, b in enumerate(report.blocks):
        assert f"| {i} | `{b.name}` | {b.kept} / {b.num_experts} |" in text
    merged = report.blocks[1]
    for g, group in enumerate(merged.groups):
        dominant, *others = group
        cells = [f"**{dominant} ({merged.frequency[dominant]:.3f})**"] + [
            f"{e} ({merged.frequency[e]:.3f})" for e in others
        ]
        assert f"| {g} | {', '.join(cells)} |" in text
    assert "Unchanged. Frequencies: 0: " in text  # the skipped layer
    for stage, seconds in report.seconds.items():
        assert f"| {stage} | {seconds:.2f} |" in text
    assert "| quality: next-token loss | 2.0000 | 2.2500 | +0.2500 |" in text
    assert "LoSparse kept" in text


def test_summary_counts_bytes_by_dtype():
    report = _report("m-smoe")
    before, after = report.expert_params_before, report.expert_params_after
    assert f"{before * 4 / 1e3:.2f} kB" in summary(report)  # float32: 4 bytes per parameter
    assert "| experts | 16 | 8 | -50.0% |" in summary(report)
    for b in report.blocks:
        b.dtype = "bfloat16"
    assert f"{after * 2 / 1e3:.2f} kB" in summary(report)
    assert element_size("bfloat16") == 2 and "quality" not in summary(report)


def test_grouping_plot_colours_each_expert_by_its_kept_expert():
    report = _report("prune-frequency")
    image = groups_figure(report).axes[0].images[0].get_array()
    for i, b in enumerate(report.blocks):
        for g, group in enumerate(b.groups):
            assert all(image[i, e] == g for e in group)
        kept = {e for group in b.groups for e in group}
        assert all(bool(image.mask[i, e]) == (e not in kept) for e in range(b.num_experts))
    assert remaining_figure(report) is None


def test_write_report_writes_markdown_and_plots(tmp_path):
    path = write_report(_report(), tmp_path / "new")
    assert path == tmp_path / "new" / "report.md"
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "frequency.png",
        "groups.png",
        "remaining.png",
        "report.md",
    ]
    text = path.read_text()
    for name in ("frequency.png", "groups.png", "remaining.png"):
        assert f"]({name})" in text
        assert (path.parent / name).read_bytes().startswith(b"\x89PNG")


def test_write_report_leaves_nothing_when_a_plot_fails(tmp_path, monkeypatch):
    def broken(report):
        raise RuntimeError("no plot")

    monkeypatch.setattr(
        "moefx.report.PLOTS", (*moefx.report.PLOTS[:2], ("remaining parameters", "remaining.png", broken))
    )
    with pytest.raises(RuntimeError, match="no plot"):
        write_report(_report(), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_frequency_plot_is_the_report_frequencies():
    report = _report()
    fig = moefx.report.frequency_figure(report)
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), [b.frequency for b in report.blocks])
