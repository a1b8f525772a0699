"""Checkpoints of compressed models.

``moefx.save(model, dir)`` writes ``model.safetensors`` (every weight, nothing pickled) and ``moefx.json``
(the base architecture, example-input shapes, and per MoE block the structure compression gave it: number
of experts, router outputs, LoSparse ranks and kept slices), plus ``report.json`` (the compression report)
when the model has one. ``moefx.load(dir)`` rebuilds the base model (a transformers model from its config,
or the ``model`` you pass), re-runs moefx's detection on it to rebuild each canonical block, reshapes the
blocks as described, loads the weights and the report.

:func:`save_pretrained` writes an ordinary transformers checkpoint (loadable without moefx) for models whose
every compressed block has a pruned router, dense experts and the same expert count.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_model
from torch import fx, nn
from torch.fx.passes.infra.pass_manager import PassManager

from moefx.api import CompressionReport
from moefx.block import (
    FusedExpertsSource,
    ModuleExpertsSource,
    MoEBlock,
    block_router,
    build_block,
    selection_nodes,
)
from moefx.capture import max_output_diff, normalize_inputs
from moefx.errors import CheckpointError, MoefxError, first_line
from moefx.export.serving import atomic_output, is_canonical_block, random_input
from moefx.losparse import LoSparseExperts, LoSparseFFN, LoSparseLinear
from moefx.passes.losparse import CompressExperts, parts_activation
from moefx.passes.merge import BlockPlan, MergeExperts
from moefx.passes.router import PruneRouter
from moefx.routing import combine_by_group

FORMAT, VERSION = "moefx-checkpoint", 1
WEIGHTS, DESCRIPTION, REPORT = "model.safetensors", "moefx.json", "report.json"
INDEX = "model.safetensors.index.json"  # sharded weights (moefx compress streams a checkpoint into shards)


def _canonical_blocks(model: nn.Module) -> dict[str, fx.GraphModule]:
    return {name: m for name, m in model.named_modules() if is_canonical_block(m)}


def describe_block(graph: fx.GraphModule) -> dict:
    bank = graph.get_submodule("experts")
    selection = selection_nodes(graph.graph)[0]
    description = {
        "router_outputs": getattr(block_router(graph), "out_features", None),  # None: routed outside the block
        "num_experts": bank.num_experts,
        "combine": any(n.target is combine_by_group for n in graph.graph.nodes),
        "selection": dict(selection.kwargs),
        "losparse": None,
    }
    if isinstance(bank, LoSparseExperts):
        description["losparse"] = [
            [
                {"rank": m.rank, "kept": m.index.numel(), "axis": m.axis, "bias": m.bias is not None}
                for m in (*e.in_linears, e.out_linear)
            ]
            for e in bank.experts
        ]
    return description


def input_spec(example_inputs: Any) -> dict:
    args, kwargs = normalize_inputs(example_inputs)
    if args:
        raise CheckpointError("save needs example inputs given as a dict of keyword tensors (e.g. input_ids)")
    return {
        name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "high": int(t.max()) + 1}
        for name, t in kwargs.items()
        if isinstance(t, torch.Tensor)
    }


def _synthesize(spec: dict) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        name: random_input(name, s["shape"], getattr(torch, s["dtype"]), (0, max(s["high"], 1)), g)
        for name, s in spec.items()
    }


def save(model: nn.Module, directory: str | os.PathLike, example_inputs: Any) -> Path:
    """Save a compressed model to ``directory`` (created; must not exist) as safetensors plus JSON.

    ``example_inputs`` (a dict of tensors the model runs on) tells :func:`load` how to re-detect the blocks.
    """
    blocks = _canonical_blocks(model)
    if not blocks:
        raise CheckpointError("save expects a model compressed by moefx.compile (it has no moefx MoE blocks)")
    config = getattr(model, "config", None)
    base = None
    if config is not None and hasattr(config, "to_dict"):
        base = {"transformers_class": type(model).__name__, "config": config.to_dict()}
    description = {
        "format": FORMAT,
        "version": VERSION,
        "base": base,
        "example_inputs": input_spec(example_inputs),
        "blocks": {name: describe_block(g) for name, g in blocks.items()},
    }
    report = getattr(model, "moefx_report", None)
    with new_directory(directory) as scratch:
        save_model(model, str(scratch / WEIGHTS))
        (scratch / DESCRIPTION).write_text(json.dumps(description, indent=1, default=str) + "\n")
        if report is not None:
            (scratch / REPORT).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    return Path(directory)


@contextlib.contextmanager
def new_directory(directory: str | os.PathLike) -> Iterator[Path]:
    """A directory to fill that appears at ``directory`` (which must not exist) only if the block succeeds."""
    target = Path(directory)
    if target.exists():
        raise CheckpointError(f"{target} already exists: choose a new directory for the checkpoint")
    with atomic_output(target) as scratch:
        scratch.mkdir()
        yield scratch


def _read_description(directory: Path) -> dict:
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint at {directory}: the directory does not exist")
    if not (directory / DESCRIPTION).is_file():
        raise CheckpointError(f"{directory} is not a moefx checkpoint: {DESCRIPTION} is missing")
    if not (directory / WEIGHTS).is_file() and not (directory / INDEX).is_file():
        raise CheckpointError(f"{directory} is not a moefx checkpoint: {WEIGHTS} is missing")
    try:
        description = json.loads((directory / DESCRIPTION).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{directory / DESCRIPTION} is corrupt ({first_line(exc)})") from None
    if description.get("format") != FORMAT or description.get("version") != VERSION:
        raise CheckpointError(f"{directory / DESCRIPTION} is not a moefx checkpoint of version {VERSION}")
    return description


def load_report(directory: str | os.PathLike) -> CompressionReport:
    """The compression report :func:`save` wrote beside a checkpoint (``report.json``)."""
    path = Path(directory) / REPORT
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: is {directory} a directory written by moefx.save?")
    try:
        return CompressionReport.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, MoefxError) as exc:
        raise CheckpointError(f"{path} is corrupt or not a moefx report ({first_line(exc)})") from None


def checkpoint_inputs(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Inputs of the shapes and dtypes of the example inputs a checkpoint was saved with (random token ids)."""
    return _synthesize(_read_description(Path(directory))["example_inputs"])


def _base_model(description: dict, model: nn.Module | None) -> nn.Module:
    if model is not None:
        return copy.deepcopy(model).eval()
    base = description["base"]
    if base is None:
        raise CheckpointError("this checkpoint is not a transformers model: pass model=<the uncompressed architecture>")
    import transformers

    cls = getattr(transformers, base["transformers_class"], None)
    if cls is None:
        raise CheckpointError(f"transformers has no class {base['transformers_class']}: upgrade transformers")
    config = cls.config_class.from_dict(base["config"])
    return cls(config).eval()


def _reshape_block(graph: fx.GraphModule, block: MoEBlock, saved: dict) -> fx.GraphModule:
    """Give a canonical block the structure a saved one had (weights are loaded afterwards)."""
    groups = saved["num_experts"]
    if saved["combine"] or groups != block.num_experts:
        members = [[g] for g in range(groups)]
        members[-1].extend(range(groups, block.num_experts))
        table = [min(e, groups - 1) for e in range(block.num_experts)]
        plan = BlockPlan(block.name, block.num_experts, members, [[1.0 / len(m)] * len(m) for m in members], table,
                         False, "exact")  # fmt: skip
        PassManager([MergeExperts(plan)])(graph)
        pruned = saved["router_outputs"] == groups + block.extra_router_outputs  # one output per group
        if pruned and groups != block.num_experts:
            router = graph.router
            bias = None if router.bias is None else router.bias[:groups]
            PassManager([PruneRouter(plan, router.weight[:groups], bias)])(graph)
    if saved["losparse"] is not None:
        bank = graph.get_submodule("experts")
        experts = []
        for e, linears in enumerate(saved["losparse"]):
            ffn = bank.ffn(e)
            shapes = [w.shape for w in (*ffn.in_weights, ffn.out_weight)]
            dtype = ffn.out_weight.dtype
            built = [_empty_losparse(shape, spec, dtype) for shape, spec in zip(shapes, linears, strict=True)]
            experts.append(LoSparseFFN.like(ffn, built, parts_activation(bank)))
        PassManager([CompressExperts(experts)])(graph)
    selection = selection_nodes(graph.graph)[0]
    selection.kwargs = saved["selection"]
    graph.recompile()
    return graph


def _empty_losparse(shape: torch.Size, spec: dict, dtype: torch.dtype) -> LoSparseLinear:
    out_features, in_features = shape
    rank, kept = spec["rank"], spec["kept"]
    sparse = torch.zeros(out_features, kept) if spec["axis"] == "columns" else torch.zeros(kept, in_features)
    return LoSparseLinear(
        torch.zeros(out_features, rank, dtype=dtype),
        torch.zeros(rank, in_features, dtype=dtype),
        sparse.to(dtype),
        torch.arange(kept),
        torch.zeros(out_features, dtype=dtype) if spec["bias"] else None,
        spec["axis"],
    )


def load(directory: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load a checkpoint written by :func:`save`.

    Transformers models are rebuilt from the saved config; for other models pass ``model``, an instance of
    the uncompressed architecture (its weights are replaced). The saved report, if any, is ``moefx_report``.
    """
    from moefx.passes.detect import find_moe_blocks
    from moefx.stream import read_weight_map

    directory = Path(directory)
    description = _read_description(directory)
    target = _base_model(description, model)
    found = {b.name: b for b in find_moe_blocks(target, _synthesize(description["example_inputs"]))}
    missing = set(description["blocks"]) - set(found)
    if missing:
        raise CheckpointError(f"the checkpoint's block {sorted(missing)[0]} is not an MoE block of the base model")
    for name, saved in description["blocks"].items():
        block = found[name]
        target.set_submodule(name, _reshape_block(build_block(block.module, block), block, saved))
    if (directory / INDEX).is_file():
        _load_shards(target, directory, sorted(set(read_weight_map(directory).values())))
    else:
        try:
            missing_keys, unexpected = load_model(target, str(directory / WEIGHTS), strict=False)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"{directory / WEIGHTS} is corrupt or truncated ({first_line(exc)})") from None
        if missing_keys or unexpected:
            detail = sorted(missing_keys or unexpected)[0]
            raise CheckpointError(f"{directory / WEIGHTS} does not match its description (e.g. {detail})")
    if (directory / REPORT).is_file():
        target.moefx_report = load_report(directory)
    return target.eval()


def _load_shards(target: nn.Module, directory: Path, shards: list[str]) -> None:
    """Load the shards ``moefx compress --sequential`` wrote (every name stored, in its saved dtype)."""
    found: set[str] = set()
    for shard in shards:
        try:
            state = load_file(str(directory / shard))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{directory / shard} is corrupt or truncated ({first_line(exc)})") from None
        try:
            target.load_state_dict(state, strict=False, assign=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{directory / shard} does not match its description ({first_line(exc)})") from None
        found.update(state)
    expected = set(target.state_dict())
    if found != expected:
        detail = sorted((expected - found) or (found - expected))[0]
        raise CheckpointError(f"{directory} does not match its description (e.g. {detail})")


def _config_field(config: Any, value: int, accept: Any) -> str:
    """The config field equal to ``value`` that ``accept(key, trial_config)`` confirms; a field of a nested
    config (DBRX's ``ffn_config.moe_num_experts``) is named by its dotted path."""

    def fields(owner: Any, prefix: str) -> Iterator[tuple[str, Any]]:
        for key, current in owner.to_dict().items():
            nested = getattr(owner, key, None)
            if isinstance(current, dict) and hasattr(nested, "to_dict"):
                yield from fields(nested, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", current

    for key, current in fields(config, ""):
        if current == value and not isinstance(current, bool) and accept(key, config):
            return key
    raise MoefxError(f"cannot find the field of {type(config).__name__} that holds {value}")


def _set_field(config: Any, path: str, value: Any) -> None:
    """Set the (possibly nested, dotted) config field ``path``."""
    *owners, key = path.split(".")
    for name in owners:
        config = getattr(config, name)
    setattr(config, key, value)


def _changes_router(cls: type, block: MoEBlock, groups: int) -> Any:
    """``accept`` for :func:`_config_field`: setting the field to ``groups`` gives the router ``groups`` rows
    (and its identity or shared experts' rows after them)."""

    def accept(key: str, config: Any) -> bool:
        trial = copy.deepcopy(config)
        _set_field(trial, key, groups)
        with torch.device("meta"):
            probe = cls(trial)
        rows = probe.get_submodule(block.name).get_parameter(block.router_weight_path).shape[0]
        return rows == groups + block.extra_router_outputs

    return accept


def _transformers_state(
    graph: fx.GraphModule, block: MoEBlock, prefix: str, expert_names: list[str]
) -> dict[str, torch.Tensor]:
    """A compressed canonical block's weights under the original block's parameter names and layout.

    ``expert_names`` are the child names of the experts container (for experts held as modules).
    """
    state = {}
    if block.router_weight_path is not None:  # not routed outside the block
        state[f"{prefix}{block.router_weight_path}"] = graph.router.weight.detach()
    if block.router_bias_path is not None:
        state[f"{prefix}{block.router_bias_path}"] = graph.router.bias.detach()
    if block.correction_bias_path is not None:
        state[f"{prefix}{block.correction_bias_path}"] = graph.correction_bias.detach()
    if block.scale_parameter_path is not None:
        state[f"{prefix}{block.scale_parameter_path}"] = graph.scale_parameter
    bank = graph.experts
    src = block.experts_source
    if isinstance(src, FusedExpertsSource):

        def stored(stack: torch.Tensor, transposed: bool) -> torch.Tensor:  # [E, out, in] in the source's layout
            stack = stack.detach().transpose(1, 2) if transposed else stack.detach()
            return stack.reshape(-1, stack.shape[2]) if src.flat else stack

        paths = (src.in_proj,) if src.up_proj is None else (src.in_proj, src.up_proj)
        for path, stack in zip(paths, bank.in_proj.chunk(len(paths), dim=1), strict=True):
            state[f"{prefix}{path}"] = stored(stack, src.in_transposed)
        state[f"{prefix}{src.out_proj}"] = stored(bank.out_proj, src.out_transposed)
        if src.in_bias is not None:
            state[f"{prefix}{src.in_bias}"] = bank.in_bias.detach()
        if src.out_bias is not None:
            state[f"{prefix}{src.out_bias}"] = bank.out_bias.detach()
        if src.out_norm is not None:
            state[f"{prefix}{src.out_norm}"] = bank.out_norm.detach()
    else:
        for child, expert in zip(expert_names, bank.experts, strict=True):
            for name, tensor in expert.state_dict().items():
                state[f"{prefix}{src.container}.{child}.{name}"] = tensor
    kept_as_they_are = [  # (the canonical block's child, the original block's child)
        *((f"shared_expert_{i}", path) for i, path in enumerate(block.shared_experts)),
        *((f"shared_expert_gate_{i}", path) for i, path in enumerate(block.shared_expert_gates)),
        *([("output_norm", block.output_norm)] if block.output_norm is not None else []),
    ]
    for child, path in kept_as_they_are:
        for name, tensor in graph.get_submodule(child).state_dict().items():
            state[f"{prefix}{path}.{name}"] = tensor
    return state


def plain_blocker(name: str, graph: fx.GraphModule) -> str | None:
    """Why the compressed canonical block ``graph`` cannot be held by its transformers class, or None."""
    if isinstance(graph.experts, LoSparseExperts):
        return f"{name} has LoSparse experts, which transformers cannot hold: use moefx.save"
    if any(n.target is combine_by_group for n in graph.graph.nodes):
        if graph.meta["moefx_block"].given_routing is not None:
            return f"{name}'s experts are chosen by a router outside it, which moefx leaves as it is: use moefx.save"
        return f"{name} keeps the exact router: compile with router='pruned' for a transformers model"
    return None


def transformers_config(cls: type, config: Any, name: str, graph: fx.GraphModule) -> Any:
    """A copy of ``config`` whose expert count (and capacity) are those of the compressed block ``name``,
    which every compressed block shares."""
    block = replace(graph.meta["moefx_block"], name=name)
    groups = graph.experts.num_experts
    new_config = copy.deepcopy(config)
    if groups != block.num_experts:
        _set_field(new_config, _config_field(config, block.num_experts, _changes_router(cls, block, groups)), groups)
    capacity = selection_nodes(graph.graph)[0].kwargs.get("capacity")
    if capacity is not None and capacity != block.routing.capacity:
        field = _config_field(config, block.routing.capacity, lambda key, trial: "capacity" in key)
        _set_field(new_config, field, capacity)
    return new_config


def transformers_block_state(plain: nn.Module, name: str, graph: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The weights of compressed block ``name`` under the names ``plain`` (a model of the compressed
    config, possibly on the meta device) gives them."""
    block = graph.meta["moefx_block"]
    names = []
    if isinstance(block.experts_source, ModuleExpertsSource):
        names = [n for n, _ in plain.get_submodule(f"{name}.{block.experts_source.container}").named_children()]
    return _transformers_state(graph, block, f"{name}.", names)


def to_transformers(model: nn.Module, example_inputs: Any) -> nn.Module:
    """An ordinary transformers model (no moefx modules) equal to a compressed ``model``.

    Every compressed block must have a pruned router (one output per expert), dense experts, and the
    same number of experts; the result is a model of the same class whose config has that many experts.
    Its outputs are checked against ``model``'s on ``example_inputs`` (max abs diff <= 1e-5).
    """
    blocks = _canonical_blocks(model)
    config = getattr(model, "config", None)
    if not blocks or config is None or not hasattr(config, "to_dict"):
        raise MoefxError("to_transformers expects a transformers model compressed by moefx.compile")
    for name, graph in blocks.items():
        reason = plain_blocker(name, graph)
        if reason is not None:
            raise MoefxError(reason)
    if len({graph.experts.num_experts for graph in blocks.values()}) != 1:
        raise MoefxError("the blocks keep different expert counts: compile with adaptive=False for transformers")
    cls = type(model)
    plain = cls(transformers_config(cls, config, *next(iter(blocks.items())))).eval()
    state = {k: v for k, v in model.state_dict().items() if not any(k.startswith(f"{b}.") for b in blocks)}
    for name, graph in blocks.items():
        state.update(transformers_block_state(plain, name, graph))
    missing, unexpected = plain.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in dict(plain.named_buffers())]
    if missing or unexpected:
        raise MoefxError(f"cannot map the compressed weights onto {cls.__name__} (e.g. {(missing or unexpected)[0]})")
    args, kwargs = normalize_inputs(example_inputs)
    with torch.no_grad():
        diff = max_output_diff(_logits(model(*args, **kwargs)), _logits(plain(*args, **kwargs)))
    if not diff <= 1e-5:
        raise MoefxError(f"the transformers model differs from the compressed one by {diff:.3g}")
    return plain


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def save_pretrained(model: nn.Module, directory: str | os.PathLike, example_inputs: Any) -> Path:
    """Write a transformers checkpoint (``from_pretrained`` loads it without moefx); see :func:`to_transformers`."""
    plain = to_transformers(model, example_inputs)
    target = Path(directory)
    if target.exists():
        raise CheckpointError(f"{target} already exists: choose a new directory for the checkpoint")
    with atomic_output(target) as scratch:
        plain.save_pretrained(str(scratch))
    return target
