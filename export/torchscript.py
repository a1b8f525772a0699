"""TorchScript export (deprecated upstream: prefer :func:`moefx.export.pt2`)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moefx.errors import MoefxError, first_line
from moefx.export.serving import ParityReference, atomic_output, check_parity, export_inputs, serving_model


def torchscript(model: nn.Module, path: str | os.PathLike, example_inputs: Any, verify: bool = True) -> Path:
    """Trace ``model`` with ``torch.jit.trace`` and save it; returns the path.

    Load it with ``torch.jit.load(path)`` and call it with the example inputs' tensors in order; it returns
    the logits. TorchScript is deprecated in PyTorch; :func:`moefx.export.pt2` is the recommended artifact.
    The trace takes inputs of a new shape (one more row, three more positions than the example: see
    :func:`~moefx.export.serving.export_inputs`). With ``verify``, the saved module is loaded back and run on
    the example (within 1e-4 of eager).
    """
    serving, inputs = serving_model(model, example_inputs)
    traced_inputs, checked = export_inputs(serving, inputs, trace_elsewhere=True)
    with atomic_output(path) as scratch:
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(serving, traced_inputs, check_trace=False)
        except Exception as exc:
            raise MoefxError(f"TorchScript tracing of {type(model).__name__} failed: {first_line(exc)}") from exc
        torch.jit.save(traced, str(scratch))
        if verify:
            loaded = torch.jit.load(str(scratch))
            with torch.no_grad():
                check_parity("TorchScript", ParityReference.of(serving, checked), lambda feed: loaded(*feed))
    return Path(path)
