"""ONNX export, served by ONNX Runtime."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.fx.passes.infra.pass_manager import PassManager

from moefx.errors import ConfigError, MoefxError, first_line
from moefx.export.generation import GENERATION_KEY, cached_decoder
from moefx.export.serving import (
    ParityReference,
    atomic_output,
    canonicalize,
    check_parity,
    export_inputs,
    export_program,
    is_canonical_block,
    serving_model,
    set_implementation,
)
from moefx.passes.complex_views import ComplexViewsAsReal
from moefx.passes.lower import (
    ONNX_TRANSLATIONS,
    QUANTIZED_BLOCK,
    LowerToFusedMoE,
    float_activations,
    fused_moe_blocker,
    matrix_inputs,
    quantization_block_size,
    quantize_experts,
)

logger = logging.getLogger(__name__)
# weights beyond this go to a separate data file, which ONNX Runtime memory-maps: from a single file it parses a
# second copy, and a session then peaks at about 1.6 times the weights while loading (and protobuf caps at 2 GiB)
EXTERNAL_DATA_BYTES = 1 << 26
FUSED_BLOCKS_KEY = "moefx.fused_blocks"  # metadata: block name -> None (fused) or why it is portable


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


def file_bytes(path: str | os.PathLike) -> int:
    """The bytes of an ONNX file written by :func:`onnx`, its external data file (``<name>.data``) included."""
    path = Path(path)
    data = path.with_name(f"{path.name}.data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def cpu_session(path: str | os.PathLike, threads: int | None = None, profile_prefix: str | None = None) -> Any:
    """An ONNX Runtime session on the CPU provider, on ``threads`` intra-op threads (default: ONNX Runtime's),
    without memory patterns (see below).

    With ``profile_prefix``, ONNX Runtime's profiler records every run and every node's time;
    ``session.end_profiling()`` writes them (Chrome trace JSON, ``<profile_prefix>_<time>.json``) and
    returns the file's path."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    options.inter_op_num_threads = 1
    # a memory pattern is planned per input shape, and a generator's shapes change every step; with patterns
    # on, a 16x128 first step of an OLMoE-shaped decoder ran slower and peaked higher
    options.enable_mem_pattern = False
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def block_lowering(served: nn.Module, fused: bool) -> dict[str, str | None]:
    """Every canonical block of ``served`` by name, with None where it will be lowered to the fused operator
    and otherwise why not."""
    return {name: fused_moe_blocker(module) if fused else "not asked (fused=False)"
            for name, module in served.named_modules() if is_canonical_block(module)}  # fmt: skip


def quantize_blocks(
    served: nn.Module, lowering: dict[str, str | None], bits: int | None, int8_activations: bool = False
) -> None:
    """Round the experts of every block in ``lowering`` as ``expert_bits=bits`` writes them, refusing with
    one line (before changing anything) where the QMoE operator cannot run a block."""
    if int8_activations and bits != 4:
        raise ConfigError(
            f"int8_activations applies to 4-bit experts, not expert_bits={bits}: ONNX Runtime's 8-bit kernel on "
            "int8 activations does not compute what moefx's eager rounding does; pass expert_bits=4 with it"
        )
    if bits not in (8, 4):
        raise ConfigError(f"expert_bits must be 8 or 4 (or None for float experts), not {bits!r}")
    blocked = next(((name, reason) for name, reason in lowering.items() if reason is not None), None)
    if blocked is not None:
        raise ConfigError(
            f"expert_bits={bits} puts every MoE block in ONNX Runtime's QMoE operator, which cannot run "
            f"{blocked[0]}: {blocked[1]}; export it without expert_bits"
        )
    banks = {name: served.get_submodule(name).get_submodule("experts") for name in lowering}
    for name, ffn in ((n, b.ffn(0)) for n, b in banks.items() if int8_activations):
        in_features = matrix_inputs(ffn)
        if not quantization_block_size(bits, in_features):
            raise ConfigError(
                f"int8_activations quantizes expert inputs in blocks of {QUANTIZED_BLOCK} columns, which "
                f"{name}'s experts (inputs of {in_features[0]} and {in_features[1]}) do not divide into; "
                f"export it without int8_activations"
            )
    for bank in banks.values():
        quantize_experts(bank, bits)


def with_quantized_experts(
    model: nn.Module, example_inputs: Any, bits: int, int8_activations: bool = False
) -> nn.Module:
    """A copy of ``model`` whose MoE blocks (in moefx's canonical form) compute with their experts' weights
    rounded as ``onnx(..., expert_bits=bits)`` writes them (with ``int8_activations``, lowered to the QMoE
    operator's eager form, which rounds the activations too): the eager model such a file matches, to
    measure what quantization costs (loss, accuracy, generated text) in PyTorch. ``model`` is not changed."""
    copied = canonicalize(copy.deepcopy(model), example_inputs)
    lowering = block_lowering(copied, fused=True)
    quantize_blocks(copied, lowering, bits, int8_activations)
    if int8_activations:
        lower_blocks(copied, lowering, bits, int8_activations)
    return copied


def lower_blocks(
    served: nn.Module,
    lowering: dict[str, str | None],
    expert_bits: int | None = None,
    int8_activations: bool = False,
    width_splits: int = 1,
) -> None:
    """Lower each block ``lowering`` maps to None to one fused MoE node (QMoE with ``expert_bits``), float
    experts cut into ``width_splits`` operator experts each."""
    lower = LowerToFusedMoE(expert_bits, int8_activations, width_splits if expert_bits is None else 1)
    for name, reason in lowering.items():
        if reason is None:
            PassManager([lower])(served.get_submodule(name))


def describe_lowering(blocks: dict[str, str | None]) -> str:
    """One line: how many blocks are fused, and why each other one is portable."""
    portable = "".join(f"; {name} portable: {reason}" for name, reason in blocks.items() if reason is not None)
    fused = sum(r is None for r in blocks.values())
    return f"{fused} of {len(blocks)} MoE blocks fused into com.microsoft.MoE{portable}"


def fused_blocks(path: str | os.PathLike) -> dict[str, str | None]:
    """The MoE blocks of an ONNX file :func:`onnx` wrote: each block's name, with None where it runs as one
    fused ``com.microsoft.MoE`` node and otherwise why it is in the portable form."""
    import onnx as onnx_pkg

    props = {p.key: p.value for p in onnx_pkg.load(str(path), load_external_data=False).metadata_props}
    return json.loads(props.get(FUSED_BLOCKS_KEY, "{}"))


def onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: Any,
    dynamic: bool = True,
    fused: bool = False,
    verify: bool = True,
    external_data: bool | None = None,
    dtype: torch.dtype | None = torch.float32,
    expert_bits: int | None = None,
    kv_cache: bool = False,
    int8_activations: bool = False,
    width_splits: int = 2,
) -> Path:
    """Export ``model`` to an ONNX file that ONNX Runtime runs; returns the path.

    The graph takes the example inputs' tensors (by name) and returns the logits, with dynamic batch and
    sequence axes unless ``dynamic=False``. MoE blocks take the portable standard-ONNX form, which runs each
    expert once on its routed tokens (a MatMul each, which ONNX Runtime prepacks and spreads over its
    threads). With ``fused``, each MoE block whose experts the ``com.microsoft.MoE`` operator can run
    becomes one such node instead, whatever its routing (routing the operator cannot compute itself runs
    before the node); blocks it cannot run (LoSparse experts, or an activation it lacks) stay portable.
    ONNX Runtime 1.32's CPU kernel of that operator runs each expert's GEMM on one thread and gives each
    thread a contiguous range of experts, so a block whose experts carry unequal shares of the tokens (as
    merged groups do) leaves threads idle: ``width_splits`` (default 2) cuts each float expert's hidden
    units into that many operator experts, which every routed token takes together, so that each of that
    many threads gets an equal share of every expert's work (the same function; see
    :mod:`moefx.passes.lower`). On the CPU the portable form is often the faster one still. The file's metadata
    says which blocks are fused (:func:`fused_blocks`), and the ``moefx.export.onnx`` logger logs it. With
    ``expert_bits`` (8 or 4), every block becomes one ``com.microsoft.QMoE`` node on symmetrically
    quantized expert weights (4-bit: a scale per 32 input columns where the sizes allow, otherwise and for
    8-bit a scale per row), and the parity check compares with eager on the same quantized weights.
    ``int8_activations`` (with ``expert_bits=4``) has ONNX Runtime's CPU kernel quantize each expert
    matrix's input to int8 too, per 32 columns, and multiply in integers (``accuracy_level=4``; the expert
    sizes must divide by 32). The file then computes something else than eager on the quantized weights: the lowering is
    checked against eager as above, in PyTorch, and the file against eager on the lowered model, which
    rounds the activations as the kernel does. An activation that lands within float rounding of a
    half-way point may round the other way there, and at real sizes many do, so that check asks the file
    to be ten times closer to that eager model on average than eager on float activations is, and nowhere
    farther (:data:`~moefx.export.serving.ROUNDING_FLIP_MARGIN`).
    Weights go to ``<name>.data`` beside the file when ``external_data`` (default: when they exceed 64 MiB,
    so that ONNX Runtime memory-maps them rather than holding a parsed copy beside its own; see
    :func:`file_bytes`).
    Floating-point weights (and inputs) are written in ``dtype``, float32 unless asked: ONNX Runtime's CPU
    provider has no bfloat16 kernels for common operators, so a bf16 or fp16 model exports in float32
    (``dtype=None`` keeps the model's dtypes). A dynamic graph is traced on inputs of a new shape (one more
    row, three more positions than the example). With ``verify``, ONNX Runtime runs the file on inputs of
    another shape than the traced one (the example's, when dynamic) and must match eager (the model in
    ``dtype``, before lowering) within 1e-4. The file appears only once everything succeeded; ``model`` is
    not changed.

    A transformers model's attention is exported in its eager form (``q @ k^T`` as one MatMul, into which
    ONNX Runtime fuses the key's transpose), not SDPA, whose ONNX translation transposes and scales the
    whole key cache at every decoding step.

    With ``kv_cache``, a causal LM is written as one decoding step with its attention key/value cache
    (``past_key_values.*`` in, ``present.*`` out; see :mod:`moefx.export.generation`), which
    :class:`~moefx.export.generation.OnnxGenerator` decodes greedily; the parity check then covers the
    logits and the cache.
    """
    if isinstance(width_splits, bool) or not isinstance(width_splits, int) or width_splits < 1:
        raise ConfigError(f"width_splits must be a positive whole number of parts per expert, not {width_splits!r}")
    serving, inputs = serving_model(model, example_inputs)
    # q @ k^T as one MatMul, whose key transpose ONNX Runtime fuses into it; SDPA's ONNX translation
    # transposes and scales the whole key cache at every decoding step
    set_implementation(serving.served, "attn", "eager")
    lowering = block_lowering(serving.served, fused or expert_bits is not None)
    if kv_cache:
        serving, inputs = cached_decoder(serving.served, serving.input_names, inputs)
    if dtype is not None:  # the serving model is a copy
        serving.to(dtype)
        inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)
    if expert_bits is not None or int8_activations:  # eager on the rounded weights is what the file must match
        quantize_blocks(serving.served, lowering, expert_bits, int8_activations)
    traced, checked = export_inputs(serving, inputs, dynamic and not kv_cache)
    # before lowering, so the check covers it; eager breaks top-k ties as ONNX's TopK does
    reference = ParityReference.of(serving, checked, onnx_topk=True) if verify else None
    lower_blocks(serving.served, lowering, expert_bits, int8_activations, width_splits)
    if verify and int8_activations:  # the lowering against eager in PyTorch; the file against int8 activations
        with float_activations():
            check_parity("lowered", reference, lambda feed: serving(*feed))
        reference = ParityReference.of(serving, checked, onnx_topk=True, float_activations=reference)
    logger.info(describe_lowering(lowering))
    size = sum(t.numel() * t.element_size() for t in [*serving.parameters(), *serving.buffers()])
    shapes = serving.dynamic_shapes(traced) if dynamic else None
    with atomic_output(path) as scratch:
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_exporter():
                warnings.simplefilter("ignore")
                captured = export_program(serving, traced, shapes)
                PassManager([ComplexViewsAsReal()])(captured.graph_module)
                program = torch.onnx.export(
                    captured, input_names=serving.input_names, output_names=serving.output_names, dynamo=True,
                    custom_translation_table=ONNX_TRANSLATIONS, verbose=False,
                )  # fmt: skip
        except MoefxError:
            raise
        except Exception as exc:  # torch.onnx's own message is a generic step; the cause names the operator
            cause = exc
            while cause.__cause__ is not None:
                cause = cause.__cause__
            raise MoefxError(f"ONNX export of {type(model).__name__} failed: {first_line(cause)}") from exc
        program.model.metadata_props[FUSED_BLOCKS_KEY] = json.dumps(lowering)
        if kv_cache:
            program.model.metadata_props[GENERATION_KEY] = serving.generation_metadata()
        program.save(str(scratch), external_data=size > EXTERNAL_DATA_BYTES if external_data is None else external_data)
        if verify:
            session = cpu_session(scratch)

            def run(feed: tuple[torch.Tensor, ...]) -> Any:
                names = [i.name for i in session.get_inputs()]
                return session.run(None, {n: t.numpy() for n, t in zip(serving.input_names, feed, strict=True)
                                          if n in names})  # fmt: skip

            check_parity("ONNX", reference, run)
    return Path(path)
