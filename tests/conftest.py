"""Shared fixtures: each tiny family model is built, captured and analysed once per test session."""

from __future__ import annotations

import functools
import logging
import os
import warnings

import pytest
import torch

import moefx
from moefx.capture import trace
from moefx.passes.detect import find_moe_blocks
from moefx.zoo import FAMILIES, example_inputs, tiny_model

logging.getLogger("transformers").setLevel(logging.ERROR)

# under pytest-xdist the workers share the cores: each its share of them, not every core each
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@functools.cache
def _prepared(family: str):
    model = tiny_model(family)
    inputs = example_inputs(family)
    graph = trace(model, inputs)
    blocks = find_moe_blocks(model, inputs, graph_module=graph)
    return model, inputs, graph, blocks


@pytest.fixture(scope="session")
def zoo():
    """``zoo(family)``: the cached ``(model, example_inputs, graph, blocks)`` of a family. Do not mutate."""
    return _prepared


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def prepared(family):
    """``(model, example_inputs, captured graph, blocks)`` of the tiny model of ``family``. Do not mutate."""
    return _prepared(family)


@pytest.fixture
def new_shape_inputs(family) -> dict[str, torch.Tensor]:
    """Inputs of ``family`` with a batch and sequence length unlike the example's, left-padded in one row."""
    inputs = example_inputs(family, batch=3, seq=11, seed=1)
    if "attention_mask" in inputs:
        inputs["attention_mask"][0, :3] = 0
    return inputs


@functools.cache
def _compiled_tiny(family: str, options: tuple) -> torch.nn.Module:
    if not options:
        return tiny_model(family)
    calib = [example_inputs(family, batch=4, seq=16, seed=s) for s in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", moefx.MoefxWarning)
        return moefx.compile(tiny_model(family), calib, **dict(options))


@pytest.fixture(scope="session")
def compiled_tiny():
    """``compiled_tiny(family, **options)``: the tiny model of ``family`` compiled with ``options`` on two
    4x16 example batches (moefx's warnings silenced), or the original without options; built once per
    session. Do not mutate."""
    return lambda family, **options: _compiled_tiny(family, tuple(sorted(options.items())))
