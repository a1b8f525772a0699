"""Compress a transformers checkpoint streamed from its shards, one decoder layer in memory at a time.

:func:`compress_checkpoint` builds the model's skeleton on the meta device (no weights), loads everything
but the decoder layers (embeddings, final norm, head: transformers' own weight conversion maps the
checkpoint's names and layouts onto the model's), and runs :mod:`moefx.layerwise`'s driver with layers
materialised from the shards one at a time. Each compressed layer is written to the output's shards in
the checkpoint's dtype and freed before the next is read. The output is sharded safetensors and
``report.json``, plus either a transformers ``config.json`` (a plain checkpoint, where the result can be
one) or ``moefx.json`` (moefx's own format, which :func:`moefx.load` reads).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import fx, nn

from moefx.api import CompressionReport
from moefx.block import BLOCK_TOLERANCE, float32_reference, max_block_diff
from moefx.config import CompressionConfig
from moefx.distributed import rank_and_size, sharded, share
from moefx.errors import CheckpointError, first_line
from moefx.export.checkpoint import (
    DESCRIPTION,
    FORMAT,
    INDEX,
    REPORT,
    VERSION,
    WEIGHTS,
    describe_block,
    input_spec,
    new_directory,
    plain_blocker,
    transformers_block_state,
    transformers_config,
)
from moefx.export.serving import is_canonical_block
from moefx.layerwise import (
    LayerResult,
    check_layerwise,
    compress_layers,
    decoder_layers,
    first_layer_inputs,
    map_large_allocations,
)


def read_weight_map(directory: Path) -> dict[str, str]:
    """Checkpoint tensor name -> shard file, from the index (or the single ``model.safetensors``), with
    every shard checked to exist and to hold the tensors the index places in it."""
    index = directory / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is corrupt ({first_line(exc)}): re-download the checkpoint") from None
    elif (directory / WEIGHTS).is_file():
        weight_map = {name: WEIGHTS for name in _shard_names(directory / WEIGHTS)}
    else:
        raise CheckpointError(f"{directory} has neither {INDEX} nor {WEIGHTS}: it holds no safetensors weights")
    by_shard: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, set()).add(name)
    for shard, names in sorted(by_shard.items()):
        path = directory / shard
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the index names it; re-download the checkpoint")
        absent = names - _shard_names(path)
        if absent:
            raise CheckpointError(f"{path} lacks {sorted(absent)[0]}, which {INDEX} places there: the index and "
                                  "shards do not match; re-download the checkpoint")  # fmt: skip
    return weight_map


def _shard_names(path: Path) -> set[str]:
    try:
        with safe_open(str(path), framework="pt") as shard:
            return set(shard.keys())
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is corrupt or truncated ({first_line(exc)})") from None


class CheckpointModel:
    """A transformers causal LM whose weights stay in its checkpoint until asked for.

    ``model`` is the skeleton: its decoder layers are on the meta device until :meth:`load_layer`, and go
    back there with :meth:`release_layer`; everything else is loaded at construction.
    """

    def __init__(self, directory: Path) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.conversion_mapping import get_model_conversion_mapping

        self.directory = directory
        self.weight_map = read_weight_map(directory)
        try:
            self.config = AutoConfig.from_pretrained(directory, local_files_only=True)
        except Exception as exc:  # OSError, ValueError or KeyError, depending on what is wrong with config.json
            raise CheckpointError(f"cannot read the transformers config in {directory}: {first_line(exc)}") from None
        self.dtype = self.config.dtype if isinstance(self.config.dtype, torch.dtype) else torch.float32
        try:
            with torch.device("meta"):
                self.model = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype).eval()
        except ValueError as exc:
            raise CheckpointError(f"{directory} holds a {self.config.model_type} model, which is not a causal "
                                  f"language model ({first_line(exc)})") from None  # fmt: skip
        self.layers_path, self.layers = decoder_layers(self.model)
        self.conversions = get_model_conversion_mapping(self.model)
        self.layer_keys: list[list[str]] = [[] for _ in self.layers]
        rest = []
        pattern = re.compile(rf"^{re.escape(self.layers_path)}\.(\d+)\.")
        for name in self.weight_map:
            found = pattern.match(name)
            (self.layer_keys[int(found.group(1))] if found else rest).append(name)
        self._load(rest)
        self._materialise_buffers()

    def _load(self, names: list[str]) -> None:
        """Load checkpoint tensors ``names`` into the skeleton through transformers' weight conversions."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
        from transformers.utils import logging as hf_logging

        by_shard: dict[str, list[str]] = {}
        for name in names:
            by_shard.setdefault(self.weight_map[name], []).append(name)
        with contextlib.ExitStack() as stack:
            state = {}
            for shard, shard_names in by_shard.items():
                handle = stack.enter_context(safe_open(str(self.directory / shard), framework="pt"))
                state.update({name: handle.get_slice(name) for name in shard_names})
            load_config = LoadStateDictConfig(dtype=self.dtype, weight_mapping=self.conversions)
            hf_logging.disable_progress_bar()
            try:
                info, _ = convert_and_load_state_dict_in_model(self.model, state, load_config)
            finally:
                hf_logging.enable_progress_bar()
        if info.unexpected_keys:
            name = sorted(info.unexpected_keys)[0]
            model = type(self.model).__name__
            raise CheckpointError(f"{self.directory / self.weight_map.get(name, INDEX)} holds {name}, which {model} "
                                  "has no place for: is config.json this checkpoint's?")  # fmt: skip

    def _materialise_buffers(self) -> None:
        """Compute the buffers no checkpoint holds (rotary frequencies) as transformers does after loading."""
        owners = {}
        for name, buffer in self.model.named_buffers():
            if buffer.is_meta and not name.startswith(f"{self.layers_path}."):
                owner_name, _, leaf = name.rpartition(".")
                owner = self.model.get_submodule(owner_name)
                owner.register_buffer(leaf, torch.empty_like(buffer, device="cpu"),
                                      persistent=leaf not in owner._non_persistent_buffers_set)  # fmt: skip
                owners[owner_name] = owner
        for owner in owners.values():
            self.model._init_weights(owner)
        missing = [
            n for n, p in self.model.named_parameters() if p.is_meta and not n.startswith(f"{self.layers_path}.")
        ]
        if missing:
            raise CheckpointError(f"{self.directory} has no weight for {missing[0]}: the checkpoint is incomplete")

    def load_layer(self, i: int) -> nn.Module:
        """Decoder layer ``i`` with its weights read from the shards (and layer ``i + 1``'s bytes read ahead)."""
        self._load(self.layer_keys[i])
        if i + 1 < len(self.layers):
            self._read_ahead(self.layer_keys[i + 1])
        layer = self.layers[i]
        missing = [n for n, p in layer.named_parameters() if p.is_meta]
        if missing:
            name = f"{self.layers_path}.{i}.{missing[0]}"
            raise CheckpointError(f"{self.directory} has no weight for {name}: the checkpoint is incomplete")
        return layer

    def _read_ahead(self, names: list[str]) -> None:
        """Ask the kernel to read tensors ``names`` into the page cache in the background (not into this
        process's memory), so that the disk reads of the next layer overlap this layer's compression."""
        if not hasattr(os, "posix_fadvise"):
            return
        by_shard: dict[str, list[str]] = {}
        for name in names:
            by_shard.setdefault(self.weight_map[name], []).append(name)
        for shard, shard_names in by_shard.items():
            with open(self.directory / shard, "rb") as file:
                header_size = int.from_bytes(file.read(8), "little")
                header = json.loads(file.read(header_size))
                for name in shard_names:
                    begin, end = header[name]["data_offsets"]
                    os.posix_fadvise(file.fileno(), 8 + header_size + begin, end - begin, os.POSIX_FADV_WILLNEED)

    def release_layer(self, i: int) -> None:
        """Give back layer ``i``'s memory (its tensors go back to the meta device)."""
        self.layers[i].to("meta")


class ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_shard_bytes`` and, at :meth:`close`, the
    index transformers reads (``model-00001-of-00003.safetensors`` ..., ``model.safetensors.index.json``).

    Added tensors are held (not copied, unless they share memory with another held tensor, which
    safetensors refuses) until a shard is full or :meth:`flush` is called."""

    def __init__(self, directory: Path, max_shard_bytes: int) -> None:
        self.directory, self.max_shard_bytes = directory, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.storages: set[int] = set()
        self.files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, state: dict[str, torch.Tensor]) -> None:
        for name, tensor in state.items():
            size = tensor.numel() * tensor.element_size()
            if self.pending and self.pending_bytes + size > self.max_shard_bytes:
                self.flush()
            tensor = tensor.detach().to("cpu").contiguous()
            storage = tensor.untyped_storage().data_ptr()
            if storage in self.storages:
                tensor = tensor.clone()
            self.storages.add(tensor.untyped_storage().data_ptr())
            self.pending[name] = tensor
            self.pending_bytes += size
            self.total_bytes += size

    def flush(self) -> None:
        """Write the held tensors as a shard (nothing if none are held)."""
        if self.pending:
            self._write()

    def _write(self) -> None:
        name = f"shard-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(self.directory / name), metadata={"format": "pt"})
        self.files.append((name, list(self.pending)))
        self.pending, self.pending_bytes, self.storages = {}, 0, set()

    def close(self) -> None:
        if self.pending or not self.files:  # an empty model still gets one shard
            self._write()
        count, weight_map = len(self.files), {}
        for i, (name, tensors) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.directory / name, self.directory / final)
            weight_map.update(dict.fromkeys(tensors, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / INDEX).write_text(json.dumps(index, indent=1) + "\n")


class _LayerSink:
    """Takes each compressed layer (in the checkpoint's dtype) and writes it, in one of two formats.

    The first layer with MoE blocks decides: where every block has a pruned router and dense experts (and
    no block is left out), the output is a plain transformers checkpoint of the same class with fewer
    experts in its config (hub tensor names, as ``save_pretrained`` writes them); otherwise it is moefx's
    own format (``moefx.json`` describes the blocks). Dense layers are the same in both.
    """

    def __init__(self, source: CheckpointModel, writer: ShardWriter, config: CompressionConfig) -> None:
        self.source, self.writer = source, writer
        self.may_be_plain = not config.skip_layers  # a left-out block keeps every expert: counts would differ
        self.plain: nn.Module | None = None  # the compressed config's model on the meta device, once decided
        self.decided = False
        self.blocks: dict[str, dict] = {}

    def __call__(self, i: int, layer: nn.Module, dtype: torch.dtype) -> None:
        from transformers.core_model_loading import revert_weight_conversion

        prefix = f"{self.source.layers_path}.{i}"
        graphs = {f"{prefix}.{n}": m for n, m in layer.named_modules() if is_canonical_block(m)}
        if graphs and not self.decided:
            self._decide(graphs)
        if self.plain is not None:  # checked in float32, before the cast: no float32 copy of the layer is made
            for name, graph in graphs.items():
                self._check_plain(name, graph)
                self._check_same_function(name, graph, transformers_block_state(self.plain, name, graph))
        layer.to(dtype)
        state = {f"{prefix}.{name}": tensor for name, tensor in layer.state_dict().items()}
        if self.plain is None:
            self.blocks.update({name: describe_block(graph) for name, graph in graphs.items()})
        else:
            state = {k: v for k, v in state.items() if not any(k.startswith(f"{b}.") for b in graphs)}
            for name, graph in graphs.items():
                state.update(transformers_block_state(self.plain, name, graph))
            state = revert_weight_conversion(self.plain, state)
        self.writer.add(state)
        self.writer.flush()  # a shard per layer (or more): nothing of it is held while the next is compressed
        self.source.release_layer(i)

    def _decide(self, graphs: dict[str, fx.GraphModule]) -> None:
        self.decided = True
        counts = {graph.experts.num_experts for graph in graphs.values()}
        if self.may_be_plain and len(counts) == 1 and all(plain_blocker(*item) is None for item in graphs.items()):
            model = self.source.model
            config = transformers_config(type(model), self.source.config, *next(iter(graphs.items())))
            with torch.device("meta"):
                self.plain = type(model)(config)

    def _check_plain(self, name: str, graph: fx.GraphModule) -> None:
        reason = plain_blocker(name, graph)
        block = graph.meta["moefx_block"]  # the plain block's router rows, or its experts' (routed outside it)
        counted = block.router_weight_path or block.experts_source.in_proj
        expected = self.plain.get_submodule(name).get_parameter(counted).shape[0]
        if reason is None and graph.experts.num_experts != expected:
            reason = f"{name} keeps {graph.experts.num_experts} experts, the layers before {expected}"
        if reason is not None:
            raise CheckpointError(f"the first MoE layers were written as a transformers checkpoint, but {reason}: "
                                  "compress with --router exact for moefx's own format")  # fmt: skip

    def _check_same_function(self, name: str, graph: fx.GraphModule, block_state: dict[str, torch.Tensor]) -> None:
        """Refuse to write a plain block that does not compute what moefx's block computes (both run in
        float32 on the same weights, on random hidden states; the written ones are their cast)."""
        plain = copy.deepcopy(self.plain.get_submodule(name))  # on the meta device until its weights are assigned
        plain.load_state_dict({k.removeprefix(f"{name}."): v.float() for k, v in block_state.items()}, assign=True)
        block = graph.meta["moefx_block"]
        diff = max_block_diff(float32_reference(graph), plain.eval(), block, block.input_ndim)
        if not diff <= BLOCK_TOLERANCE:
            raise CheckpointError(f"the plain transformers form of {name} differs from moefx's block by {diff:.3g}: "
                                  "compress with --router exact for moefx's own format")  # fmt: skip

    def finish(self, directory: Path, description: dict) -> None:
        """Write the config (transformers) or moefx.json (moefx's format)."""
        if self.plain is not None:
            self.plain.config.save_pretrained(directory)
        else:
            (directory / DESCRIPTION).write_text(json.dumps({**description, "blocks": self.blocks}, indent=1,
                                                            default=str) + "\n")  # fmt: skip


def output_format(directory: str | os.PathLike) -> str:
    """``"moefx"`` for a checkpoint :func:`moefx.load` reads, ``"transformers"`` for a plain one."""
    return "moefx" if (Path(directory) / DESCRIPTION).is_file() else "transformers"


def compress_checkpoint(
    model_dir: str | os.PathLike,
    calib_batches: Iterable[Any],
    out_dir: str | os.PathLike,
    config: CompressionConfig | None = None,
    max_shard_bytes: int = 2**30,
    progress: Callable[[int, int, LayerResult], None] | None = None,
    **overrides: Any,
) -> CompressionReport:
    """Compress the causal LM in ``model_dir`` (transformers, safetensors, sharded or not) layer by layer and
    write the result to ``out_dir``; returns the report (also in ``out_dir/report.json``).

    The output is a plain transformers checkpoint where the result can be one (pruned router, the same
    expert count in every layer, dense experts: ``AutoModelForCausalLM.from_pretrained`` loads it), else a
    moefx checkpoint (:func:`moefx.load`); :func:`output_format` tells which. The input's other files (the
    tokenizer's) are copied beside the weights. Peak memory is about one decoder layer in float32, the
    calibration hidden states and one layer's statistics. ``progress(i, num_layers, result)`` is told after
    each layer.

    Under torch.distributed (an initialised default process group, as ``torchrun`` sets up) every rank
    calls this with the same batches: each calibrates on its share, the statistics are summed across ranks
    (:mod:`moefx.distributed`) and rank 0 alone writes ``out_dir``.

    So that the resident size does not grow with depth, this sets glibc's allocator to map every block of
    4 MiB or more on its own, for the rest of the process (:func:`moefx.layerwise.map_large_allocations`).
    """
    config = CompressionConfig.from_arguments(config, overrides)
    check_layerwise(config)
    map_large_allocations()
    source = CheckpointModel(Path(model_dir))
    batches = list(calib_batches)
    writes = rank_and_size()[0] == 0

    def told(i: int, result: LayerResult) -> None:
        if progress is not None:
            progress(i, len(source.layers), result)

    def release(i: int, _: nn.Module, __: torch.dtype) -> None:
        source.release_layer(i)

    with sharded(), contextlib.ExitStack() as stack:
        start = time.perf_counter()
        inputs = first_layer_inputs(source.model, source.layers, share(batches))
        seconds = time.perf_counter() - start
        if writes:
            scratch = stack.enter_context(new_directory(out_dir))
            writer = ShardWriter(scratch, max_shard_bytes)
            skeleton_rest = {n: t for n, t in source.model.state_dict().items()
                             if not n.startswith(f"{source.layers_path}.") and not t.is_meta}  # fmt: skip
            writer.add(skeleton_rest)
            writer.flush()
        # another rank of a torchrun job calibrates and propagates; rank 0 writes
        sink = _LayerSink(source, writer, config) if writes else release
        report = compress_layers(source.layers, source.layers_path, inputs, config, source.load_layer, sink, told)
        report.seconds["first layer inputs"] = seconds
        if not writes:
            return report
        writer.close()
        description = {
            "format": FORMAT,
            "version": VERSION,
            "base": {"transformers_class": type(source.model).__name__, "config": source.config.to_dict()},
            "example_inputs": input_spec({k: v[:2] for k, v in batches[0].items()}),
        }
        sink.finish(scratch, description)
        for extra in sorted(Path(model_dir).iterdir()):  # the tokenizer's files, generation config, ...
            if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in (INDEX, "config.json"):
                shutil.copy2(extra, scratch / extra.name)
        (scratch / REPORT).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    return report
