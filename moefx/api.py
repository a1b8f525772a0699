"""The public pipeline: ``prepare`` -> calibrate -> ``convert``, and ``compile`` that runs all three.

``prepare`` captures the model, detects its MoE blocks, replaces each with its canonical GraphModule and
inserts calibration observers. Running batches through the prepared model collects statistics.
``convert`` plans the compression of every block and rewrites the block graphs (observers removed, experts
merged, router rewritten). The model keeps its class and call signature: a transformers model stays a
transformers model, with fewer expert weights inside its MoE blocks.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.fx.passes.infra.pass_manager import PassManager

from moefx.block import MoEBlock, build_block
from moefx.capture import call_model
from moefx.config import CompressionConfig
from moefx.errors import CalibrationError, MoefxError, MoefxWarning
from moefx.passes.detect import find_moe_blocks
from moefx.passes.merge import BlockPlan, MergeExperts, plan_compression
from moefx.passes.observe import (
    BlockStats,
    CalibrationNeeds,
    InsertObservers,
    RemoveObservers,
    collect_statistics,
    install_mask_hook,
)
from moefx.passes.router import PruneRouter, fit_pruned_router, router_prune_blocker

_STATE = "_moefx_prepared"


@dataclass
class BlockReport:
    """What compression did to one block."""

    name: str
    num_experts: int
    kept: int
    groups: list[list[int]]
    router: str
    frequency: list[float]
    expert_params_before: int
    expert_params_after: int


@dataclass
class CompressionReport:
    """What ``compile``/``convert`` did: per-block results, the configuration and time per stage (s)."""

    config: CompressionConfig
    blocks: list[BlockReport] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def expert_params_before(self) -> int:
        return sum(b.expert_params_before for b in self.blocks)

    @property
    def expert_params_after(self) -> int:
        return sum(b.expert_params_after for b in self.blocks)


@dataclass
class _Prepared:
    blocks: list[MoEBlock]
    hooks: tuple
    seconds: dict[str, float]


def calibration_needs(config: CompressionConfig) -> CalibrationNeeds:
    """The optional statistics ``config`` needs."""
    return CalibrationNeeds(
        all_token_outputs=config.method == "hc-smoe"
        or (config.similarity == "expert-output" and config.method in ("m-smoe", "average")),
        router_input_moments=config.router == "pruned" and not config.prunes,
    )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def prepare(
    model: nn.Module, example_inputs: Any, needs: CalibrationNeeds | None = None, inplace: bool = False
) -> nn.Module:
    """A copy of ``model`` (the model itself with ``inplace``) whose MoE blocks record calibration statistics.

    Run calibration batches through the result (:func:`calibrate`, or your own loop), then :func:`convert`.
    """
    start = time.perf_counter()
    target = model if inplace else copy.deepcopy(model)
    blocks = find_moe_blocks(target, example_inputs)
    detected = time.perf_counter()
    if any(b.name == "" for b in blocks):
        raise MoefxError("the model itself is an MoE block: wrap it in a parent module so moefx can replace it")
    for b in blocks:
        graph = build_block(b.module, b)
        observe = InsertObservers(b.hidden_size, b.mask_key, needs or CalibrationNeeds())
        _set_submodule(target, b.name, PassManager([observe])(graph).graph_module)
    seconds = {"capture and detection": detected - start, "observer insertion": time.perf_counter() - detected}
    setattr(target, _STATE, _Prepared(blocks, install_mask_hook(target), seconds))
    return target


def calibrate(observed: nn.Module, batches: Iterable[Any], progress: bool = False) -> int:
    """Run ``batches`` through a prepared model (no gradients, eval mode); returns how many were run."""
    _state(observed)
    was_training = observed.training
    observed.eval()
    count = 0
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="calibration", unit="batch")
    try:
        with torch.no_grad():
            for batch in iterator:
                call_model(observed, batch)
                count += 1
    finally:
        observed.train(was_training)
    if count == 0:
        raise CalibrationError("the calibration data yielded no batches: pass a non-empty iterable of batches")
    return count


def _state(model: nn.Module) -> _Prepared:
    state = getattr(model, _STATE, None)
    if state is None:
        raise MoefxError("expected a model returned by moefx.prepare (it has no calibration observers)")
    return state


def _block_graph(model: nn.Module, block: MoEBlock) -> torch.fx.GraphModule:
    return model.get_submodule(block.name)


def _experts_params(bank: nn.Module) -> int:
    return sum(p.numel() for p in bank.parameters())


def convert(
    observed: nn.Module,
    config: CompressionConfig | None = None,
    calib_batches: list[Any] | None = None,
    **overrides: Any,
) -> nn.Module:
    """Compress a prepared, calibrated model in place and return it (observers removed).

    ``calib_batches`` lets a pruned router be fitted by least squares (a second, cheap calibration pass);
    without them its rows are the frequency-weighted mean of each group's rows. The report is in
    ``model.moefx_report``.
    """
    config = CompressionConfig.from_arguments(config, overrides)
    state = _state(observed)
    start = time.perf_counter()
    graphs = {b.name: _block_graph(observed, b) for b in state.blocks}
    stats = {name: collect_statistics(g) for name, g in graphs.items()}
    for name, s in stats.items():
        if s.tokens <= 0:
            raise CalibrationError(
                f"no calibration token reached {name} (all were padding?): calibrate with real, unmasked tokens"
            )
    banks = {name: g.get_submodule("observed_experts").bank for name, g in graphs.items()}
    ffns = {name: [bank.ffn(e) for e in range(bank.num_experts)] for name, bank in banks.items()}
    routers = {name: g.get_submodule("router").weight for name, g in graphs.items()}
    plans = plan_compression(state.blocks, stats, ffns, routers, config)
    planned = time.perf_counter()

    for b in state.blocks:
        plan = plans[b.name]
        reason = router_prune_blocker(b.routing, merges=not config.prunes)
        if plan.router == "pruned" and reason is not None:
            warnings.warn(
                f"{b.name}: router='pruned' is not possible here ({reason}); keeping the exact router",
                MoefxWarning,
                stacklevel=2,
            )
            plan.router = "exact"
    fit = [b for b in state.blocks if plans[b.name].router == "pruned" and not config.prunes]
    if fit and calib_batches is not None:
        for b in fit:
            graphs[b.name].get_submodule("routing_observer").fit_groups(plans[b.name].expert_to_group)
        calibrate(observed, calib_batches, progress=config.progress)
        stats.update({b.name: collect_statistics(graphs[b.name]) for b in fit})
    fitted = time.perf_counter()

    report = CompressionReport(config)
    for b in state.blocks:
        plan, graph = plans[b.name], graphs[b.name]
        before = _experts_params(banks[b.name])
        passes = [RemoveObservers(), MergeExperts(plan)]
        if plan.router == "pruned" and not plan.is_identity:
            weight, bias = fit_pruned_router(graph.router.weight, graph.router.bias, plan, stats[b.name])
            passes.append(PruneRouter(plan, weight, bias))
        compact = PassManager(passes)(graph).graph_module
        _set_submodule(observed, b.name, compact)
        report.blocks.append(_block_report(b, plan, stats[b.name], before, _experts_params(compact.experts)))
    for hook in state.hooks:
        hook.remove()
    delattr(observed, _STATE)
    report.seconds = {**state.seconds, "planning (grouping)": planned - start, "router fit pass": fitted - planned,
                      "merging and rewriting": time.perf_counter() - fitted}  # fmt: skip
    observed.moefx_report = report
    return observed


def _block_report(block: MoEBlock, plan: BlockPlan, stats: BlockStats, before: int, after: int) -> BlockReport:
    return BlockReport(
        name=block.name,
        num_experts=block.num_experts,
        kept=plan.num_groups,
        groups=plan.groups,
        router=plan.router if not plan.is_identity else "unchanged",
        frequency=stats.frequency.tolist(),
        expert_params_before=before,
        expert_params_after=after,
    )


def _materialize(calib_loader: Any) -> list[Any]:
    if isinstance(calib_loader, (torch.Tensor, dict)) or not isinstance(calib_loader, Iterable):
        raise CalibrationError(
            f"calib_loader must be an iterable of batches (e.g. a list of tokenizer outputs), "
            f"not {type(calib_loader).__name__}"
        )
    batches = list(calib_loader)
    if not batches:
        raise CalibrationError("calib_loader yielded no batches (empty or already exhausted): pass calibration data")
    return batches


def compile(  # noqa: A001 - the public name is fixed
    model: nn.Module, calib_loader: Iterable[Any], config: CompressionConfig | None = None, **overrides: Any
) -> nn.Module:
    """Compress ``model``'s MoE blocks using ``calib_loader`` and return the smaller model.

    ``calib_loader`` is any iterable of batches; a batch is a dict of keyword arguments (a tokenizer's
    output), a tuple of positional arguments or a tensor. Options are :class:`CompressionConfig` fields,
    given as ``config`` or as keyword arguments (``experts=0.25, router="pruned"``). The input model is not
    modified unless ``inplace=True``. What was done is in ``compressed.moefx_report``.
    """
    config = CompressionConfig.from_arguments(config, overrides)
    batches = _materialize(calib_loader)
    observed = prepare(model, batches[0], calibration_needs(config), inplace=config.inplace)
    start = time.perf_counter()
    calibrate(observed, batches, progress=config.progress)
    _state(observed).seconds["calibration"] = time.perf_counter() - start
    return convert(observed, config, calib_batches=batches)
