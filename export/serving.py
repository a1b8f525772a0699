"""What every exporter shares: the serving module, new-shape parity checks and atomic writes.

An artifact serves a model's logits from positional tensor inputs named after the example inputs (a
language model: ``input_ids``, ``attention_mask``; SwitchTransformers adds ``decoder_input_ids``). An
original model (not compressed by moefx) is exported through its canonical MoE blocks, which compute exactly
what its own blocks compute but, unlike transformers 5's export-time grouped-mm op, translate to ONNX.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils._python_dispatch import TorchDispatchMode

from moefx.block import build_block
from moefx.capture import normalize_inputs
from moefx.errors import CheckpointError, MoefxError, first_line
from moefx.export.recurrences import scanned_recurrences
from moefx.objective import logits_of

PARITY_TOLERANCE = 1e-4
# int8 activations: an activation within float rounding of a half-way point rounds either way, moving the outputs
# after it; at real sizes many do. An artifact that rounds activations must be this many times closer to eager
# rounding them alike, on average, than eager on float activations is (and nowhere farther than that is)
ROUNDING_FLIP_MARGIN = 10
ROUTING_TIE = 1e-5  # relative gap between the k-th and (k+1)-th router logit


def is_canonical_block(module: nn.Module) -> bool:
    """Whether ``module`` is a block moefx built (by ``compile`` or :func:`canonicalize`)."""
    return isinstance(module, torch.fx.GraphModule) and "moefx_block" in getattr(module, "meta", {})


def canonicalize(model: nn.Module, example_inputs: Any) -> nn.Module:
    """``model`` with every MoE block replaced by its canonical form, unless moefx already built them."""
    if any(is_canonical_block(m) for m in model.modules()):
        return model
    from moefx.passes.detect import find_moe_blocks

    for block in find_moe_blocks(model, example_inputs):
        model.set_submodule(block.name, build_block(block.module, block))
    return model


class ServingModule(nn.Module):
    """Calls the model with named tensors given positionally and returns its logits tensor."""

    output_names = ["logits"]

    def __init__(self, model: nn.Module, input_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.input_names = list(input_names)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(**dict(zip(self.input_names, inputs, strict=True))))

    def check_inputs(self, example: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Inputs of a shape unlike ``example``'s, for the parity check."""
        return new_shape_inputs(example, self.input_names)

    def dynamic_shapes(self, example: tuple[torch.Tensor, ...]) -> tuple[tuple[dict, ...]]:
        """The exporters' ``dynamic_shapes``: every input's batch and sequence axes."""
        return dynamic_shapes_for(example)

    @property
    def served(self) -> nn.Module:
        """The copy of the user's model inside (its module names are the user's)."""
        return self.model.model if isinstance(self.model, _PositionalAdapter) else self.model


def serving_model(model: nn.Module, example_inputs: Any) -> tuple[ServingModule, tuple[torch.Tensor, ...]]:
    """A serving copy of ``model`` (cache off, eval, canonical MoE blocks) and its positional example inputs."""
    args, kwargs = normalize_inputs(example_inputs)
    if args:
        kwargs = {f"input_{i}": a for i, a in enumerate(args)} | kwargs
        names = list(kwargs)
        model = _PositionalAdapter(model, len(args))
    else:
        names = list(kwargs)
    if not all(isinstance(v, torch.Tensor) for v in kwargs.values()):
        raise MoefxError("export needs example inputs that are all tensors (e.g. input_ids and attention_mask)")
    copied = copy.deepcopy(model).eval()
    for m in copied.modules():
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "use_cache"):
            config.use_cache = False
    canonicalize(copied, kwargs)
    # experts that no canonical block replaced (DeepSeek-V4's hash-routed blocks) run as batched matmuls, which
    # the exporters capture; transformers' default grouped_mm is a custom op ONNX cannot translate
    set_implementation(copied, "experts", "batched_mm")
    return ServingModule(copied, names), tuple(kwargs.values())


def set_implementation(model: nn.Module, kind: str, name: str) -> None:
    """Have the outermost transformers model in ``model``, which sets it for every config below it, use the
    ``kind`` (``"attn"`` or ``"experts"``) implementation ``name``, where its class lets it be set."""
    can_set = f"_can_set_{kind}_implementation"
    outermost = next((m for m in model.modules() if getattr(m, can_set, None)), None)
    if outermost is not None and getattr(outermost, can_set)():
        getattr(outermost, f"set_{kind}_implementation")(name)


class _PositionalAdapter(nn.Module):
    """Lets a model that takes positional arguments be called with ``input_0=..., input_1=...``."""

    def __init__(self, model: nn.Module, count: int) -> None:
        super().__init__()
        self.model, self.count = model, count

    def forward(self, **inputs: torch.Tensor) -> Any:
        return self.model(*(inputs[f"input_{i}"] for i in range(self.count)))


def new_shape_inputs(inputs: tuple[torch.Tensor, ...], names: list[str]) -> tuple[torch.Tensor, ...]:
    """Inputs with one more row and three more positions than the examples, for the parity check."""
    g = torch.Generator().manual_seed(1234)
    result = []
    for name, t in zip(names, inputs, strict=True):
        shape = list(t.shape)
        if len(shape) >= 1:
            shape[0] += 1
        if len(shape) >= 2:
            shape[1] += 3
        result.append(random_input(name, shape, t.dtype, (int(t.min()), int(t.max()) + 1), g))
    return tuple(result)


def random_input(
    name: str, shape: list[int], dtype: torch.dtype, bounds: tuple[int, int], generator: torch.Generator
) -> torch.Tensor:
    """A stand-in for a model input: all ones for a mask, normal floats, integers in ``[low, high)``."""
    if "mask" in name:
        return torch.ones(shape, dtype=dtype)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator, dtype=dtype)
    return torch.randint(*bounds, shape, generator=generator, dtype=dtype)


class TopkTiesToLowerIndex(TorchDispatchMode):
    """``topk`` that breaks ties by the lower index, as ONNX's TopK specifies; PyTorch's CPU kernel leaves the
    order of equal values unspecified. Exact ties are common where top-k ranks ReLU'd scores (the DeepSeek
    sparse-attention indexer picks ``index_topk`` keys per query among scores that are often exactly 0), so
    eager must break them as ONNX Runtime does for the file to be comparable with it. A dispatch mode, so
    that it also covers the aten ops of captured graphs."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is torch.ops.aten.topk.default:
            return _topk_lower_index_first(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def _topk_lower_index_first(
    input: torch.Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    values, indices = torch.sort(input, dim=dim, descending=largest, stable=True)
    return values.narrow(dim, 0, k), indices.narrow(dim, 0, k)


def eager_with_routing_ties(
    serving: nn.Module, inputs: tuple[torch.Tensor, ...], onnx_topk: bool = False
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Run eager on ``inputs``: its outputs, and a boolean per batch row saying whether some token of it has a
    near-tie between its k-th and (k+1)-th router logit in some block. Rounding legitimately flips the choice
    of expert there, so an artifact may differ from eager at that token and, through attention, after it.
    With ``onnx_topk``, eager's top-k breaks exact ties as ONNX's TopK does (:class:`TopkTiesToLowerIndex`).
    Blocks routed outside themselves are not watched: their router is the model's, not a block's."""
    rows = inputs[0].shape[0]
    tied = torch.zeros(rows, dtype=torch.bool)

    def record(top_k: int) -> Callable:
        def hook(_: nn.Module, __: tuple, logits: torch.Tensor) -> None:
            if logits.shape[-1] <= top_k:
                return
            top = logits.detach().float().reshape(rows, -1, logits.shape[-1]).topk(top_k + 1, dim=-1).values
            gap = top[..., top_k - 1] - top[..., top_k]
            tied.logical_or_((gap <= ROUTING_TIE * top.abs().amax(dim=-1).clamp(min=1.0)).any(dim=-1))

        return hook

    hooks = [
        m.router.register_forward_hook(record(m.meta["moefx_block"].top_k))
        for m in serving.modules()
        if is_canonical_block(m) and isinstance(getattr(m, "router", None), nn.Module)
    ]
    try:
        with torch.no_grad(), TopkTiesToLowerIndex() if onnx_topk else contextlib.nullcontext():
            output = serving(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return _as_outputs(output), tied


def _as_outputs(output: Any) -> tuple[torch.Tensor, ...]:
    outputs = output if isinstance(output, (tuple, list)) else (output,)
    return tuple(torch.as_tensor(o) for o in outputs)


@dataclass
class ParityReference:
    """What an artifact is checked against: inputs of another shape than the trace's, eager's outputs on them
    (named), and which batch rows have a routing near-tie (see :func:`eager_with_routing_ties`)."""

    inputs: tuple[torch.Tensor, ...]
    expected: tuple[torch.Tensor, ...]
    tied: torch.Tensor
    names: tuple[str, ...] = ("logits",)
    # where the artifact rounds activations to int8: eager's outputs on float activations (ROUNDING_FLIP_MARGIN)
    float_activations: tuple[torch.Tensor, ...] | None = None

    @staticmethod
    def of(
        serving: nn.Module,
        inputs: tuple[torch.Tensor, ...],
        onnx_topk: bool = False,
        float_activations: ParityReference | None = None,
    ) -> ParityReference:
        """Eager's reference for ``serving`` (a :class:`ServingModule` or a
        :class:`~moefx.export.generation.CachedDecoder`) on ``inputs``: computed before any lowering, so the
        check covers it too, or after lowering to int8 activations, whose rounding eager repeats, with
        ``float_activations`` the reference before it. ``onnx_topk``: break top-k ties as ONNX does (for an
        ONNX artifact)."""
        outputs, tied = eager_with_routing_ties(serving, inputs, onnx_topk)
        unrounded = None
        if float_activations is not None:
            unrounded, tied = float_activations.expected, tied | float_activations.tied
        return ParityReference(inputs, outputs, tied, tuple(serving.output_names), unrounded)


def check_parity(
    kind: str, reference: ParityReference, run_artifact: Callable[[tuple[torch.Tensor, ...]], Any]
) -> float:
    """Run the artifact on the reference's inputs and compare every output with eager's; raise naming the
    worst element (or, in one line, why the artifact cannot run them). Batch rows in which eager routing has
    a near-tie are not compared. Where the artifact rounds activations to int8 (the reference has
    ``float_activations``), a value may be off by as much as rounding activations moves it at all, but the
    mean difference must be :data:`ROUNDING_FLIP_MARGIN` times smaller than that (or than
    :data:`PARITY_TOLERANCE`). Returns the largest difference."""
    tied = reference.tied
    try:
        with torch.no_grad():
            outputs = _as_outputs(run_artifact(reference.inputs))
    except Exception as exc:  # e.g. a shape the trace fixed or guarded: the artifact is wrong for other inputs
        shape = "x".join(str(n) for n in reference.inputs[0].shape)
        raise MoefxError(
            f"the {kind} artifact cannot run on the check inputs ({shape}, another shape than the trace's): "
            f"{first_line(exc)}; export with dynamic=False and verify=False for the example's shape only"
        ) from exc
    if len(outputs) != len(reference.expected):
        raise MoefxError(f"the {kind} artifact returned {len(outputs)} outputs, eager {len(reference.expected)}")
    largest = 0.0
    unrounded_outputs = reference.float_activations or (None,) * len(reference.expected)
    for name, got, expected, unrounded in zip(
        reference.names, outputs, reference.expected, unrounded_outputs, strict=True
    ):
        if got.shape != expected.shape:
            raise MoefxError(
                f"the {kind} artifact returned {name} of shape {tuple(got.shape)}, eager {tuple(expected.shape)}"
            )
        diff = (got.float() - expected.float()).abs()
        rounding = None if unrounded is None else (unrounded.float() - expected.float()).abs()
        if diff.ndim >= 1 and diff.shape[0] == len(tied):
            if bool(tied.all()):
                raise MoefxError(f"cannot check the {kind} artifact: every row of the check inputs has a routing tie")
            diff[tied] = 0.0
            if rounding is not None:
                rounding[tied] = 0.0
        worst = float(diff.max()) if diff.numel() else 0.0
        tolerance = PARITY_TOLERANCE if rounding is None else max(PARITY_TOLERANCE, float(rounding.max()))
        if not worst <= tolerance:
            where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
            raise MoefxError(
                f"the {kind} artifact differs from eager on new input shapes: {name}{list(where)} is "
                f"{float(got.flatten()[diff.argmax()]):.6g} vs {float(expected.flatten()[diff.argmax()]):.6g} "
                f"(max abs diff {worst:.3g} > {tolerance:.3g}); pass verify=False to keep it anyway"
            )
        if rounding is not None and diff.numel():
            mean, allowed = float(diff.mean()), max(PARITY_TOLERANCE, float(rounding.mean())) / ROUNDING_FLIP_MARGIN
            if not mean <= allowed:
                raise MoefxError(
                    f"the {kind} artifact differs from eager rounding activations alike on new input shapes: {name} "
                    f"by {mean:.3g} on average (> {allowed:.3g}, a tenth of what rounding them moves or of "
                    f"{PARITY_TOLERANCE}); pass verify=False to keep it anyway"
                )
        largest = max(largest, worst)
    return largest


def export_inputs(
    serving: nn.Module, example: tuple[torch.Tensor, ...], trace_elsewhere: bool
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """The inputs to trace ``serving`` on and those to check its artifact on. With ``trace_elsewhere`` (a
    dynamic graph), the trace takes the check's shape (one more row, three more positions) and the check the
    example's: examples are often powers of two, where code that branches on divisibility (a Mamba scan's
    chunk padding) takes a special case that the trace would keep for every shape."""
    other = serving.check_inputs(example)
    return (other, example) if trace_elsewhere else (example, other)


def export_program(
    serving: nn.Module, inputs: tuple[torch.Tensor, ...], shapes: tuple[tuple[dict, ...]] | None
) -> torch.export.ExportedProgram:
    """``torch.export`` of ``serving`` as ``torch.onnx`` captures a module: non-strict, where an axis of size 1
    may stay dynamic, with transformers' loops over positions as scans (:mod:`moefx.export.recurrences`).
    Refuses with one line where the model's code fixed an axis ``shapes`` asks to be dynamic: the artifact
    would not run on another size."""
    with torch.fx.experimental._config.patch(backed_size_oblivious=True), scanned_recurrences():
        program = torch.export.export(serving, inputs, dynamic_shapes=shapes, strict=False)
    if shapes is None:
        return program
    values = {n.name: n.meta["val"] for n in program.graph.nodes if n.op == "placeholder"}
    user_inputs = zip(serving.input_names, program.graph_signature.user_inputs, shapes[0], strict=True)
    for name, value, axes in ((name, values[node], axes) for name, node, axes in user_inputs):
        fixed = next((axis for axis in axes if is_concrete_int(value.shape[axis])), None)
        if fixed is not None:
            raise MoefxError(
                f"the export fixed axis {fixed} of {name} at {value.shape[fixed]} (the model's code depends on "
                "its size), so the artifact would not run on another shape; export with dynamic=False"
            )
    return program


def dynamic_shapes_for(inputs: tuple[torch.Tensor, ...]) -> tuple[tuple[dict, ...]]:
    """Dynamic batch and sequence dimensions for every input (nested: the inputs are one ``*args``)."""
    return (tuple({d: torch.export.Dim.AUTO for d in range(min(t.ndim, 2))} for t in inputs),)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """A scratch directory beside ``path``; on success its files move to ``path``'s directory atomically.

    Yields the scratch file path to write (same name as ``path``). Nothing is left behind on failure.
    """
    target = Path(path)
    if target.is_dir():
        raise CheckpointError(f"{target} is a directory: give a file path for the artifact")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.exists():
        raise CheckpointError(f"the directory {parent} does not exist: create it first")
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent))
    try:
        yield scratch / target.name
        for produced in sorted(scratch.iterdir()):
            os.replace(produced, parent / produced.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
