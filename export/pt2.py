"""torch.export (``.pt2``) export: the recommended PyTorch artifact (TorchScript is deprecated upstream)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moefx.errors import MoefxError, first_line
from moefx.export.serving import (
    ParityReference,
    atomic_output,
    check_parity,
    export_inputs,
    export_program,
    serving_model,
)


def pt2(
    model: nn.Module, path: str | os.PathLike, example_inputs: Any, dynamic: bool = True, verify: bool = True
) -> Path:
    """Export ``model`` with ``torch.export`` and save it as a ``.pt2`` file; returns the path.

    Load it with ``torch.export.load(path).module()`` and call it with the example inputs' tensors in order;
    it returns the logits. A dynamic program is traced on inputs of a new shape (one more row, three more
    positions than the example: see :func:`~moefx.export.serving.export_inputs`). With ``verify``, the saved
    program is loaded back and run on inputs of another shape than the traced one (the example's, when
    dynamic), and must match eager within 1e-4.
    """
    serving, inputs = serving_model(model, example_inputs)
    traced, checked = export_inputs(serving, inputs, dynamic)
    with atomic_output(path) as scratch:
        try:
            program = export_program(serving, traced, serving.dynamic_shapes(traced) if dynamic else None)
        except MoefxError:
            raise
        except Exception as exc:
            raise MoefxError(f"torch.export of {type(model).__name__} failed: {first_line(exc)}") from exc
        torch.export.save(program, str(scratch))
        if verify:
            loaded = torch.export.load(str(scratch)).module()
            check_parity("pt2", ParityReference.of(serving, checked), lambda feed: loaded(*feed))
    return Path(path)
