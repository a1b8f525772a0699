"""Layer-wise compression: one decoder layer at a time, each calibrated on the compressed layers before it.

A decoder-only transformers model is a stack of decoder layers between its embeddings and its head. The
driver here caches the calibration batches' hidden states at the input of the first layer (with the
attention masks and position embeddings the model itself computes for them), then for each layer:

1. materialises it (from memory, or from the shards of a checkpoint: :mod:`moefx.stream`), in float32;
2. runs moefx's own pipeline on it, the layer standing for the model: :func:`moefx.prepare` (observers for
   what the configuration needs), the calibration batches, :func:`moefx.convert` (plan, second statistics,
   rewrite);
3. runs the compressed layer on the cached hidden states to give the next layer's inputs;
4. hands the layer back to its source, which casts it to the model's dtype and may write and free it.

Memory is one layer, the cached hidden states and one layer's statistics, whatever the depth. Planning is
per layer, so every layer keeps the same share of its experts (no adaptive allocation across layers) and
MC-SMoE's sparse threshold is per layer. ``compile(..., sequential=True)`` runs this driver on an
in-memory model; ``moefx compress`` runs it on a checkpoint streamed from disk.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import inspect
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from moefx.api import CompressionReport, Stages, convert, prepare, prepared_blocks, timed_calibration
from moefx.block import MoEBlock
from moefx.capture import call_model, capture_mode
from moefx.config import CompressionConfig
from moefx.distributed import broadcast_from_first
from moefx.errors import CalibrationError, ConfigError, DetectionError
from moefx.passes.detect import warn_unread_expert_banks

# the decoder-layer arguments that carry per-batch tensors (transformers 5 names); caches are never passed
_LAYER_ARGUMENTS = ("attention_mask", "position_embeddings", "position_ids", "cache_position", "input_ids")
_CACHE = re.compile(r"cache|past_key")  # the KV cache arguments (capture runs without one)
_SETTINGS = (type(None), bool, int, float, str)  # argument values that carry nothing from one layer to the next


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The path and the module list of ``model``'s decoder layers: its one ``nn.ModuleList`` of
    ``config.num_hidden_layers`` modules of one class."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    stacks = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) == count and len({type(layer) for layer in m}) == 1
    ]
    if len(stacks) != 1:
        raise ConfigError(
            f"layer-wise compression needs a decoder-only transformers model with one stack of decoder layers; "
            f"{type(model).__name__} has {len(stacks)}: compile it with sequential=False"
        )
    return stacks[0]


class LayerCall(nn.Module):
    """A decoder layer called as moefx calls a model: keyword tensors in, hidden states out.

    ``attention_mask`` is the batch's 2-D padding mask, which the observers read to leave padding out of
    every statistic; the layer gets the mask the model made for it as ``layer_attention_mask``. The layer
    sits at ``path``, its path in the model, so that blocks found in it are named as in the model.
    """

    def __init__(self, layer: nn.Module, path: str = "layer") -> None:
        super().__init__()
        self.path = path
        *parents, leaf = path.split(".")
        owner: nn.Module = self
        for name in parents:
            owner.add_module(name, nn.Module())
            owner = owner.get_submodule(name)
        owner.add_module(leaf, layer)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        layer_attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        position_ids: torch.Tensor | None = None,
        cache_position: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        given = {"attention_mask": layer_attention_mask, "position_embeddings": position_embeddings,
                 "position_ids": position_ids, "cache_position": cache_position,
                 "input_ids": input_ids}  # fmt: skip
        out = self.get_submodule(self.path)(hidden_states, **{k: v for k, v in given.items() if v is not None})
        return out[0] if isinstance(out, tuple) else out


class _Caught(Exception):
    """Raised by the hook on the first layer once it has seen its inputs."""


def first_layer_inputs(model: nn.Module, layers: nn.ModuleList, batches: Iterable[Any]) -> list[dict[str, Any]]:
    """Each batch's keyword arguments for :class:`LayerCall` on the first decoder layer, hidden states in
    float32. Only the layers' parameters may be on the meta device: the model runs up to the first layer."""
    parameters = inspect.signature(layers[0].forward).parameters.values()
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)  # DeepSeek-V4 passes them on
    accepted = set(_LAYER_ARGUMENTS) if takes_any else {p.name for p in parameters}
    calls: list[dict[str, Any]] = []

    def catch(layer: nn.Module, args: tuple, kwargs: dict) -> None:
        names = list(inspect.signature(layer.forward).parameters)
        carried = names[1 : len(args)] + [
            k
            for k, v in kwargs.items()
            if k not in _LAYER_ARGUMENTS and not _CACHE.search(k) and not isinstance(v, _SETTINGS)
        ]
        if carried:
            raise ConfigError(
                f"layer-wise compression runs each decoder layer on the hidden states alone, but "
                f"{type(layer).__name__} also takes {', '.join(carried)}, which moefx does not carry from layer to "
                "layer: compile it with sequential=False"
            )
        hidden = args[0] if args else kwargs["hidden_states"]
        call = {"hidden_states": hidden.float()}
        for name in _LAYER_ARGUMENTS:
            value = kwargs.get(name)
            if name in accepted and value is not None:
                call["layer_" + name if name == "attention_mask" else name] = value
        calls.append(call)
        raise _Caught

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad(), capture_mode(model):
            for batch in batches:
                try:
                    call_model(model, batch)
                except _Caught:
                    pass
                mask = batch.get("attention_mask") if isinstance(batch, dict) else None
                if mask is not None and len(calls):
                    calls[-1]["attention_mask"] = mask
    finally:
        handle.remove()
    if not calls:
        raise CalibrationError("the calibration data yielded no batches: pass a non-empty iterable of batches")
    return calls


def run_layer(call: LayerCall, inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The next layer's inputs: ``inputs`` with their hidden states passed through ``call``."""
    with torch.no_grad():
        return [{**kwargs, "hidden_states": call(**kwargs).float()} for kwargs in inputs]


@dataclass
class LayerResult:
    """What compressing one layer gave: its report (block names relative to the model) and timings."""

    report: CompressionReport | None  # None for a layer without MoE blocks
    seconds: float


def layer_structure(layer: nn.Module) -> tuple:
    """What detection's reading of a layer depends on: its modules' paths and classes, and its parameters'
    names, shapes and dtypes. Layers of equal structure are read alike (and each reading is verified)."""
    modules = tuple((name, type(m)) for name, m in layer.named_modules())
    return modules, tuple((name, tuple(p.shape), p.dtype) for name, p in layer.named_parameters())


def _prepare_layer(
    call: LayerCall, example: dict[str, Any], config: CompressionConfig, readings: dict[tuple, list[MoEBlock]]
) -> nn.Module | None:
    """``call`` prepared in place, or None for a dense layer. Capture and detection run once per layer
    structure: ``readings`` keeps each structure's blocks (without their modules, named relative to the
    layer) for the layers after it."""
    key = layer_structure(call.get_submodule(call.path))
    known = readings.get(key)
    if known == []:
        return _no_block(call)
    if known is not None:
        try:
            return prepare(call, example, config, blocks=[replace(b, name=f"{call.path}.{b.name}") for b in known])
        except DetectionError:  # the reading does not reproduce this layer's block: read it afresh
            pass
    try:
        observed = prepare(call, example, config)
    except DetectionError as exc:
        if not str(exc).startswith("no MoE block"):
            raise
        readings[key] = []
        return _no_block(call)
    readings[key] = [replace(b, module=None, name=b.name.removeprefix(f"{call.path}."))
                     for b in prepared_blocks(observed)]  # fmt: skip
    return observed


def _no_block(call: LayerCall) -> None:
    """A layer without an MoE block moefx reads passes through; expert weights left in it are named."""
    warn_unread_expert_banks(call.get_submodule(call.path), [], call.path)


def compress_layer(
    layer: nn.Module,
    prefix: str,
    inputs: list[dict[str, Any]],
    config: CompressionConfig,
    moe_seen: int,
    readings: dict[tuple, list[MoEBlock]] | None = None,
) -> LayerResult:
    """Compress ``layer``'s MoE blocks in place (float32), calibrated on ``inputs``.

    ``prefix`` is the layer's path in the model and ``moe_seen`` the number of MoE blocks before it, so that
    ``config.skip_layers`` (indices among the model's MoE blocks, or names) applies as it does to the model.
    ``readings`` carries detection's readings from layer to layer (see :func:`_prepare_layer`).
    """
    start = time.perf_counter()
    in_place = replace(config, inplace=True, sequential=False)
    observed = _prepare_layer(LayerCall(layer, prefix), inputs[0], in_place, {} if readings is None else readings)
    if observed is None:
        return LayerResult(None, time.perf_counter() - start)  # a dense layer passes straight through
    skip = [b.name for i, b in enumerate(prepared_blocks(observed))
            if moe_seen + i in config.skip_layers or b.name in config.skip_layers]  # fmt: skip
    timed_calibration(observed, inputs)
    convert(observed, calib_batches=inputs, skip_layers=skip)
    report = observed.moefx_report
    return LayerResult(report, time.perf_counter() - start)


def compress_layers(
    layers: nn.ModuleList,
    prefix: str,
    inputs: list[dict[str, Any]],
    config: CompressionConfig,
    load: Callable[[int], nn.Module],
    done: Callable[[int, nn.Module, torch.dtype], None],
    progress: Callable[[int, LayerResult], None] | None = None,
) -> CompressionReport:
    """Compress every layer of ``layers`` in turn (see the module docstring).

    ``load(i)`` gives layer ``i`` with real weights and ``done(i, layer, dtype)`` takes it back compressed, in
    float32, and casts it to ``dtype``, the dtype it was loaded in (before that, checks may run in float32
    without copying it); ``progress(i, result)`` is told after each layer.
    """
    report = CompressionReport(config)
    stage = Stages(report.seconds)
    readings: dict[tuple, list[MoEBlock]] = {}
    for i in range(len(layers)):
        with stage("reading layers"):
            layer = load(i)
            dtype = next(layer.parameters()).dtype
            layer.float()
        result = compress_layer(layer, f"{prefix}.{i}", inputs, config, len(report.blocks), readings)
        broadcast_from_first(layer)  # under torchrun, every rank propagates through rank 0's result
        with stage("propagation"):
            inputs = run_layer(LayerCall(layer), inputs)
        with stage("writing layers"):
            done(i, layer, dtype)
            del layer
            gc.collect()  # capture leaves reference cycles that hold the float32 layer until the collector runs
            _return_freed_memory()
        if result.report is not None:
            report.blocks.extend(result.report.blocks)
            for name, seconds in result.report.seconds.items():
                report.seconds[name] = report.seconds.get(name, 0.0) + seconds
        if progress is not None:
            progress(i, result)
    return report


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def _return_freed_memory() -> None:
    """Give the layer's freed heap back to the system (glibc keeps it otherwise); elsewhere a no-op."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # mallopt's parameter (glibc's malloc.h)
MAPPED_ALLOCATION_BYTES = 4 * 2**20


def map_large_allocations() -> None:
    """Have glibc serve every allocation of 4 MiB or more from its own mapping, returned to the system when
    freed; elsewhere a no-op. By default glibc raises that threshold (up to 32 MiB) as large blocks are
    freed, after which a layer's tensors come from the heap, whose fragments stay resident: the resident
    size of a layer-wise run then grows with depth (OLMoE-1B-7B shape: 1.80 to 2.13 GB between layers over
    6 layers, against 1.09 GB flat with this, at about 10% more time). Process-wide and lasting."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, MAPPED_ALLOCATION_BYTES)


def check_layerwise(config: CompressionConfig) -> None:
    """Refuse options that need every layer's statistics before planning."""
    if config.adaptive:  # unset (None) means the same share per layer here
        raise ConfigError("adaptive allocation needs every layer's statistics at once: leave adaptive unset "
                          "with sequential (each layer keeps the same share of its experts)")  # fmt: skip
    if config.method_object.compresses_experts and config.sparse_score == "gradient":
        raise ConfigError("sparse_score='gradient' needs the whole model's loss: use the activation score "
                          "with sequential")  # fmt: skip


def _cast(_: int, layer: nn.Module, dtype: torch.dtype) -> None:
    layer.to(dtype)


def compile_layerwise(model: nn.Module, batches: list[Any], config: CompressionConfig) -> nn.Module:
    """``moefx.compile(model, batches, sequential=True)``: the layers of an in-memory model, one at a time."""
    check_layerwise(config)
    target = model if config.inplace else copy.deepcopy(model)
    prefix, layers = decoder_layers(target)
    start = time.perf_counter()
    inputs = first_layer_inputs(target, layers, batches)
    seconds = time.perf_counter() - start
    report = compress_layers(layers, prefix, inputs, config, layers.__getitem__, _cast)
    report.seconds["first layer inputs"] = seconds
    target.moefx_report = report
    return target
