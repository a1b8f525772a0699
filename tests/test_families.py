"""The family matrix: every MoE text family the installed transformers ships, built tiny by rule.

For each family the README's table says whether moefx compresses it and whether its ONNX export passes
parity. A family marked yes must pass: detection finds every expert bank, ``compile(experts=1.0)`` equals
eager within 1e-5, ``compile(experts=0.5)`` with the default method halves every block and runs, and
(where marked) the ONNX export of that result passes its parity check. A family marked partial passes the
same checks on the blocks detection reads, and compiling it warns, naming every other expert bank. A family
marked no must fail with one line from moefx (a :class:`moefx.MoefxError`), never a traceback from inside
torch or transformers.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import moefx
import moefx.export
from moefx.capture import max_output_diff
from moefx.passes.detect import unread_expert_banks
from moefx.zoo import example_inputs, tiny_transformers_model, transformers_moe_families

README = Path(__file__).resolve().parents[1] / "README.md"
FAMILIES = transformers_moe_families()


def _matrix_table() -> dict[str, tuple[str, str]]:
    """model type -> (compile cell, ONNX cell) from the README's table of every transformers family."""
    text = README.read_text(encoding="utf-8")
    section = text.split("### Every MoE family in transformers", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("|")]
    return {row[0].strip("`"): (row[2], row[3]) for row in rows[2:]}  # after the header and the rule


TABLE = _matrix_table()


def test_the_table_lists_exactly_the_installed_families():
    assert not FAMILIES.keys() - TABLE.keys(), "families missing from the README's table: check and add them"
    assert not TABLE.keys() - FAMILIES.keys(), "the README's table lists families this transformers lacks"
    for family, (compiles, onnx) in TABLE.items():
        assert compiles == "yes" or compiles.startswith(("no: ", "partial: ")), family
        assert onnx in ("yes", "-") or onnx.startswith("no: "), family
        assert (onnx == "-") == compiles.startswith("no: "), family  # ONNX is tried once compression works


def _one_line_moefx_error(call) -> None:
    with pytest.raises(moefx.MoefxError) as error:
        call()
    assert str(error.value) and "\n" not in str(error.value)


def _compiled(model, batches, experts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", moefx.MoefxWarning)
        return moefx.compile(model, batches, experts=experts)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


# Checked only by ``pytest -m slow``: tiny models whose capture alone takes tens of seconds on 2 cores
# (chunked linear attention, Mamba scans, sparse-attention indexers), and the families of moefx.zoo, whose
# own tests cover them in the default run.
SLOW = {
    "bailing_hybrid", "dots3_note_text", "granitemoehybrid", "hy_v4", "inkling2_loop_text", "inkling2_text",
    "kimi_linear", "lara_mini", "nemotron_h", "qwen3_5_moe_text", "qwen3_next", "deepseek_v32", "glm_moe_dsa",
    "axk2", "qwen4_exp_text",
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "switch_transformers",
}  # fmt: skip


def _state(family: str) -> str:
    """yes, partial or no: the table's compile cell up to its reason; "missing" for a family the table
    lacks (a newer transformers), which the table test reports."""
    return TABLE[family][0].split(":")[0] if family in TABLE else "missing"


def _families(state: str) -> list:
    marks = {f: [pytest.mark.slow] if f in SLOW else [] for f in FAMILIES}
    return [pytest.param(f, marks=marks[f]) for f in sorted(FAMILIES) if _state(f) == state]


def test_the_slow_families_are_families():
    assert SLOW <= set(FAMILIES)


def _check_compresses(family: str, partial: bool) -> None:
    model = tiny_transformers_model(family)
    batches = [example_inputs(family, seed=s) for s in range(2)]
    banks = [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] == "experts"]
    same = _compiled(model, batches, 1.0)
    read = [b.name for b in same.moefx_report.blocks]
    unread = unread_expert_banks(model, read)
    assert bool(unread) == partial and len(read) + len(unread) == len(banks) > len(unread)  # every bank accounted
    assert max_output_diff(_logits(same, batches[0]), _logits(model, batches[0])) <= 1e-5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", moefx.MoefxWarning)
        half = moefx.compile(model, batches, experts=0.5)
    named = [str(w.message) for w in caught if "left as they are" in str(w.message)]
    assert bool(named) == partial and all(bank in named[0] for bank in unread)
    assert [(b.num_experts, b.kept) for b in half.moefx_report.blocks] == [(8, 4)] * len(read)
    assert torch.isfinite(_logits(half, batches[0])).all()


@pytest.mark.parametrize("family", _families("yes"))
def test_family_compresses(family):
    _check_compresses(family, partial=False)


@pytest.mark.parametrize("family", _families("partial"))
def test_a_partial_family_compresses_the_blocks_it_reads_and_names_the_others(family):
    _check_compresses(family, partial=True)


@pytest.mark.parametrize("family", _families("no"))
def test_an_unsupported_family_gets_one_line_from_moefx(family):
    model = tiny_transformers_model(family)
    _one_line_moefx_error(lambda: _compiled(model, [example_inputs(family, seed=s) for s in range(2)], 0.5))


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in sorted(FAMILIES) if _state(f) != "no"])
def test_family_exports_to_onnx(family, tmp_path):
    batches = [example_inputs(family, seed=s) for s in range(2)]
    half = _compiled(tiny_transformers_model(family), batches, 0.5)
    if TABLE[family][1] == "yes":
        assert moefx.export.onnx(half, tmp_path / "m.onnx", batches[0]).is_file()  # parity is checked inside
    else:
        _one_line_moefx_error(lambda: moefx.export.onnx(half, tmp_path / "m.onnx", batches[0]))
