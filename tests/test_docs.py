"""The README's claims that code can check: its family table, its option list and its two set-up commands."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from moefx.block import build_block
from moefx.config import CompressionConfig
from moefx.passes.lower import fused_moe_blocker
from moefx.zoo import FAMILIES

README = Path(__file__).resolve().parents[1] / "README.md"
DISPLAY_NAMES = {
    "Mixtral": "mixtral", "Qwen2-MoE": "qwen2_moe", "Qwen3-MoE": "qwen3_moe", "OLMoE": "olmoe",
    "DeepSeek-V3": "deepseek_v3", "SwitchTransformers": "switch", "GPT-OSS": "gpt_oss",
    "hand-written PyTorch": "hand_written",
}  # fmt: skip


def _family_table() -> dict[str, list[str]]:
    section = README.read_text(encoding="utf-8").split("## Supported model families", 1)[1].split("\n##", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("|")]
    return {DISPLAY_NAMES[r[0]]: r[1:] for r in rows[2:]}  # after the header and the rule


def test_family_table_lists_exactly_the_tested_families():
    assert sorted(_family_table()) == sorted(FAMILIES)


def test_family_table_fused_onnx_column_matches_the_lowering(zoo):
    for family, cells in _family_table().items():
        blocks = zoo(family)[3]
        fusable = all(fused_moe_blocker(build_block(b.module, b)) is None for b in blocks)
        assert cells[-1].startswith("yes" if fusable else "no"), family


def test_readme_has_the_two_setup_commands_and_ci_runs_the_test_one():
    commands = re.findall(r"```bash\n(python3 -m venv .*)\n```", README.read_text(encoding="utf-8"))
    assert len(commands) == 2 and commands[0].endswith("moefx demo") and commands[1].endswith("python -m pytest")
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert ci.strip().splitlines()[-1] == commands[1]


def test_the_option_list_names_every_compression_option():
    section = README.read_text(encoding="utf-8").split("Options (`CompressionConfig` fields", 1)[1].split("\n\n", 1)[0]
    listed = set(re.findall(r"`([a-z_]+)`", section))
    assert {f.name for f in dataclasses.fields(CompressionConfig)} <= listed
