"""Fixtures shared by the pass tests."""

from __future__ import annotations

import pytest
from torch.fx.passes.infra.pass_manager import PassManager

from moefx.block import build_block
from moefx.passes.observe import CalibrationNeeds, InsertObservers


@pytest.fixture(scope="session")
def observed_block():
    """``observed_block(block, needs=None)``: the block's canonical graph with calibration observers inserted."""

    def observe(block, needs: CalibrationNeeds | None = None):
        graph = build_block(block.module, block)
        needs = needs or CalibrationNeeds()
        return PassManager([InsertObservers(block.hidden_size, block.mask_key, needs)])(graph).graph_module

    return observe
