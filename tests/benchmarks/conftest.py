"""Make the repository's ``benchmarks`` package importable (pytest runs with ``--import-mode=importlib``)."""

import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = str(Path(__file__).resolve().parents[2])
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run each test on one torch thread: on a shared 2-core machine, two OpenMP threads that meet a busy core
    spin at every barrier and these small MoE forwards run ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
