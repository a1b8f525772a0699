"""ONNX export, served by ONNX Runtime."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.fx.passes.infra.pass_manager import PassManager

from moefx.errors import MoefxError, first_line
from moefx.export.serving import atomic_output, check_parity, dynamic_shapes_for, is_canonical_block, serving_model
from moefx.passes.lower import ONNX_TRANSLATIONS, LowerToFusedMoE

EXTERNAL_DATA_BYTES = 1 << 30  # weights beyond this go to a separate data file (protobuf caps files at 2 GiB)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs a warning per optional torchvision op; none applies here."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        yield
    finally:
        registration.setLevel(level)


def lower_fused(serving: nn.Module) -> list[str]:
    """Lower every canonical block that the fused MoE operator can compute; returns their names."""
    lowered = []
    for name, module in list(serving.named_modules()):
        if is_canonical_block(module) and PassManager([LowerToFusedMoE()])(module).modified:
            lowered.append(name)
    return lowered


def onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: Any,
    dynamic: bool = True,
    fused: bool = True,
    verify: bool = True,
    external_data: bool | None = None,
    dtype: torch.dtype | None = torch.float32,
) -> Path:
    """Export ``model`` to an ONNX file that ONNX Runtime runs; returns the path.

    The graph takes the example inputs' tensors (by name) and returns the logits, with dynamic batch and
    sequence axes unless ``dynamic=False``. With ``fused``, each MoE block the fused ``com.microsoft.MoE``
    operator can compute becomes one such node (others keep the portable standard-ONNX form, which runs
    each expert once on its routed tokens). Weights go to ``<name>.data`` beside the file when
    ``external_data`` (default: when they exceed 1 GiB). Floating-point weights (and inputs) are written in
    ``dtype``, float32 unless asked: ONNX Runtime's CPU provider has no bfloat16 kernels for common
    operators, so a bf16 or fp16 model exports in float32 (``dtype=None`` keeps the model's dtypes). With
    ``verify``, ONNX Runtime runs the file on inputs of a new shape and must match eager (the model in
    ``dtype``) within 1e-4. The file appears only once everything succeeded; ``model`` is not changed.
    """
    import onnxruntime

    serving, inputs = serving_model(model, example_inputs)
    if dtype is not None:  # the serving model is a copy
        serving.to(dtype)
        inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)
    if fused:
        lower_fused(serving)
    size = sum(t.numel() * t.element_size() for t in [*serving.parameters(), *serving.buffers()])
    shapes = dynamic_shapes_for(inputs) if dynamic else None
    with atomic_output(path) as scratch:
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_exporter():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(
                    serving, inputs, input_names=serving.input_names, output_names=["logits"],
                    dynamic_shapes=shapes, dynamo=True, custom_translation_table=ONNX_TRANSLATIONS, verbose=False,
                )  # fmt: skip
        except Exception as exc:  # torch.onnx's own message is a generic step; the cause names the operator
            cause = exc
            while cause.__cause__ is not None:
                cause = cause.__cause__
            raise MoefxError(f"ONNX export of {type(model).__name__} failed: {first_line(cause)}") from exc
        program.save(str(scratch), external_data=size > EXTERNAL_DATA_BYTES if external_data is None else external_data)
        if verify:
            session = onnxruntime.InferenceSession(str(scratch), providers=["CPUExecutionProvider"])

            def run(feed: tuple[torch.Tensor, ...]) -> Any:
                names = [i.name for i in session.get_inputs()]
                try:
                    return session.run(None, {n: t.numpy() for n, t in zip(serving.input_names, feed, strict=True)
                                              if n in names})  # fmt: skip
                except Exception as exc:  # e.g. a shape the export fixed: the file is wrong for other inputs
                    raise MoefxError(
                        f"ONNX Runtime cannot run the exported {type(model).__name__} on inputs of a new shape: "
                        f"{first_line(exc)}; export with dynamic=False and verify=False for the example's shape only"
                    ) from exc

            check_parity("ONNX", serving, run, inputs)
    return Path(path)
