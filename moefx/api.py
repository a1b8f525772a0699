"""The public pipeline: ``prepare`` -> calibrate -> ``convert``, and ``compile`` that runs all three.

``prepare`` captures the model, detects its MoE blocks, replaces each with its canonical GraphModule and
inserts calibration observers. Running batches through the prepared model collects statistics.
``convert`` plans the compression of every block and rewrites the block graphs (observers removed, experts
merged, router rewritten). The model keeps its class and call signature: a transformers model stays a
transformers model, with fewer expert weights inside its MoE blocks.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_manager import PassManager

from moefx.block import MoEBlock, block_router, build_block
from moefx.capture import call_model
from moefx.config import CompressionConfig
from moefx.distributed import computed_on_first, summed_across_ranks
from moefx.errors import CalibrationError, ConfigError, MoefxError, MoefxWarning
from moefx.experts import FFN
from moefx.losparse import LoSparseExperts, LoSparseLinear, stable_rank
from moefx.objective import NO_LOSS, LossFn, loss_available, task_loss
from moefx.passes.detect import find_moe_blocks, rebind
from moefx.passes.losparse import (
    CompressExperts,
    decompose_experts,
    losparse_linears,
    residual_keep,
    sensitivity_scores,
)
from moefx.passes.merge import BlockPlan, MergeExperts, plan_compression
from moefx.passes.observe import (
    BlockStats,
    CalibrationNeeds,
    InsertObservers,
    RemoveObservers,
    collect_statistics,
    install_mask_hook,
)
from moefx.passes.refit import least_squares_output, least_squares_units
from moefx.passes.router import PruneRouter, fit_pruned_router, router_prune_blocker

_STATE = "_moefx_prepared"


@dataclass
class BlockReport:
    """What compression did to one block (FLOPs are per token, for the block's MoE layer)."""

    name: str
    num_experts: int
    kept: int
    groups: list[list[int]]
    router: str
    frequency: list[float]
    expert_params_before: int
    expert_params_merged: int
    expert_params_after: int
    flops_before: int
    flops_merged: int
    flops_after: int
    # with config.stable_ranks: per original expert, mean over its matrices; per merged expert, before LoSparse
    stable_rank_before: list[float] = field(default_factory=list)
    stable_rank_after: list[float] = field(default_factory=list)
    dtype: str = "float32"  # of the expert weights: parameters times its size are the bytes
    # method="mc-smoe": per kept expert, per matrix (input projections, then output), the fraction of the
    # dense matrix's parameters its low-rank plus sparse form stores (empty where LoSparse did not run)
    remaining: list[list[float]] = field(default_factory=list)


@dataclass
class QualityCheck:
    """A metric measured on the model before and after compression (e.g. held-out next-token loss)."""

    metric: str
    before: float
    after: float


@dataclass
class CompressionReport:
    """What ``compile``/``convert`` did: per-block results, the configuration and time per stage (s).

    ``quality`` is left for the caller that evaluates the result (``moefx compress --eval`` sets it).
    :func:`moefx.report.write_report` renders a report as markdown and plots.
    """

    config: CompressionConfig
    blocks: list[BlockReport] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    quality: QualityCheck | None = None

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-serialisable data (:meth:`from_dict` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionReport:
        """The report :meth:`to_dict` gave (raises ``ConfigError``/``TypeError``/``KeyError`` on other data)."""
        quality = data.get("quality")
        return cls(
            config=CompressionConfig.from_arguments(None, data["config"]),
            blocks=[BlockReport(**b) for b in data["blocks"]],
            seconds=dict(data["seconds"]),
            quality=None if quality is None else QualityCheck(**quality),
        )

    @property
    def expert_params_before(self) -> int:
        return sum(b.expert_params_before for b in self.blocks)

    @property
    def expert_params_after(self) -> int:
        return sum(b.expert_params_after for b in self.blocks)

    @property
    def flops_before(self) -> int:
        return sum(b.flops_before for b in self.blocks)

    @property
    def flops_after(self) -> int:
        return sum(b.flops_after for b in self.blocks)


@dataclass
class _Prepared:
    """What :func:`prepare` set up, read back by :func:`convert` (as torch.ao's prepare records for convert)."""

    blocks: list[MoEBlock]
    hooks: tuple
    seconds: dict[str, float]
    config: CompressionConfig  # the configuration the observers were set up for
    needs: CalibrationNeeds


def prepare(
    model: nn.Module,
    example_inputs: Any,
    config: CompressionConfig | None = None,
    *,
    blocks: list[MoEBlock] | None = None,
    **overrides: Any,
) -> nn.Module:
    """A copy of ``model`` (the model itself with ``inplace=True``) whose MoE blocks record calibration
    statistics: those the configuration (``config`` and/or :class:`CompressionConfig` keywords) needs.

    Run calibration batches through the result (:func:`calibrate`, or your own loop), then :func:`convert`,
    which compresses as configured here. ``blocks``, the blocks found in another model of the same structure
    (:func:`prepared_blocks`), skips capture and detection: each is re-bound to this model and verified.
    """
    config = CompressionConfig.from_arguments(config, overrides)
    if config.sequential:
        raise ConfigError("sequential=True is moefx.compile's layer-wise mode: prepare and convert see the whole model")
    needs = config.method_object.needs(config)
    start = time.perf_counter()
    target = model if config.inplace else copy.deepcopy(model)
    blocks = find_moe_blocks(target, example_inputs) if blocks is None else [rebind(b, target) for b in blocks]
    detected = time.perf_counter()
    if any(b.name == "" for b in blocks):
        raise MoefxError("the model itself is an MoE block: wrap it in a parent module so moefx can replace it")
    for b in blocks:
        graph = build_block(b.module, b)
        observe = InsertObservers(b.hidden_size, b.mask_key, needs)
        target.set_submodule(b.name, PassManager([observe])(graph).graph_module)
    seconds = {"capture and detection": detected - start, "observer insertion": time.perf_counter() - detected}
    setattr(target, _STATE, _Prepared(blocks, install_mask_hook(target), seconds, config, needs))
    return target


def calibrate(observed: nn.Module, batches: Iterable[Any], progress: bool = False) -> int:
    """Run ``batches`` through a prepared model (no gradients, eval mode); returns how many were run.

    Within :func:`moefx.distributed.sharded` the statistics are then summed across ranks."""
    _state(observed)
    was_training = observed.training
    observed.eval()
    count = 0
    try:
        with torch.no_grad(), summed_across_ranks(observed):
            for batch in _progress(batches, "calibration", "batch", progress):
                call_model(observed, batch)
                count += 1
    finally:
        observed.train(was_training)
    if count == 0:
        raise CalibrationError("the calibration data yielded no batches: pass a non-empty iterable of batches")
    return count


def timed_calibration(observed: nn.Module, batches: Iterable[Any], progress: bool = False) -> None:
    """:func:`calibrate`, its time recorded as the report's ``calibration`` stage."""
    with Stages(_state(observed).seconds)("calibration"):
        calibrate(observed, batches, progress=progress)


def _progress(items: Iterable[Any], desc: str, unit: str, enabled: bool) -> Iterable[Any]:
    """``items``, with a tqdm progress bar when ``enabled``."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit)


def prepared_blocks(observed: nn.Module) -> list[MoEBlock]:
    """The MoE blocks :func:`prepare` found and observes in ``observed``."""
    return _state(observed).blocks


def _state(model: nn.Module) -> _Prepared:
    state = getattr(model, _STATE, None)
    if state is None:
        raise MoefxError("expected a model returned by moefx.prepare (it has no calibration observers)")
    return state


def _experts_params(bank: nn.Module) -> int:
    return sum(p.numel() for p in bank.parameters())


def block_flops(graph: torch.fx.GraphModule, bank: nn.Module, top_k: int) -> int:
    """Analytic FLOPs per token of a canonical block with expert ``bank``: router, ``top_k`` average
    experts, shared experts (matmuls only, 2 FLOPs per multiply-accumulate)."""
    experts = sum(bank.expert_flops(e) for e in range(bank.num_experts)) / max(bank.num_experts, 1)
    shared = sum(
        2 * m.weight.numel()
        for name, m in graph.named_modules()
        if name.startswith("shared_expert") and isinstance(m, nn.Linear)
    )
    router = block_router(graph)
    router_flops = 0 if router is None else 2 * router.weight.numel()
    return int(router_flops + top_k * experts + shared)


def _mean_stable_rank(ffn: FFN) -> float:
    matrices = [*ffn.in_weights, ffn.out_weight]
    return sum(stable_rank(w) for w in matrices) / len(matrices)


class Stages:
    """Accumulates wall time per named stage."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@torch.no_grad()  # weights derived from parameters must not carry autograd graphs (they hold solver buffers)
def convert(
    observed: nn.Module,
    config: CompressionConfig | None = None,
    calib_batches: list[Any] | None = None,
    loss: LossFn | None = None,
    **overrides: Any,
) -> nn.Module:
    """Compress a prepared, calibrated model in place and return it (observers removed).

    ``calib_batches`` allows the passes that need a second look at the data once the groups are known: the
    least-squares fit of a pruned router, the refit of merged experts, and MC-SMoE's activation-aware
    compression and gradient scores. Without them a pruned router averages its groups' rows, merged experts
    are not refit and MC-SMoE uses plain SVD and activation scores. ``loss(output, batch)`` is the loss of
    ``sparse_score="gradient"`` where the model has no loss of its own (see :mod:`moefx.objective`). The
    report is in ``model.moefx_report``.
    """
    state = _state(observed)
    config = CompressionConfig.from_arguments(config or state.config, overrides)
    _check_prepared_for(state, config)
    stage = Stages(state.seconds)
    graphs = {b.name: observed.get_submodule(b.name) for b in state.blocks}
    with stage("planning"):
        stats, banks, ffns, plans = _plan_blocks(state.blocks, graphs, config)
    refits_output = _refits_output(ffns, plans, config)
    second = [b for b in state.blocks if _needs_second_pass(plans[b.name], refits_output[b.name], config)]
    if second and calib_batches is None:
        if config.refits:
            warnings.warn("merged experts were not refit: refitting needs calib_batches", MoefxWarning, stacklevel=2)
        second = []
    if second:
        with stage("second calibration pass"):
            for b in second:
                _start_second_pass(graphs[b.name], plans[b.name], banks[b.name], refits_output[b.name], config)
            calibrate(observed, calib_batches, progress=config.progress)
            stats.update({b.name: collect_statistics(graphs[b.name]) for b in second})
    report = CompressionReport(config)
    for b in _progress(state.blocks, "merging", "block", config.progress):
        # the block's observed graph, statistics, original bank and experts are let go once used
        with stage("merging and rewriting"):
            graph, s, bank, originals = graphs.pop(b.name), stats.pop(b.name), banks.pop(b.name), ffns.pop(b.name)
            _refit_merged(plans[b.name], s, originals, config)
            compact, block_report = _rewrite_block(b, graph, plans[b.name], s, bank, originals, config)
            plans[b.name].merged = None  # held in compact now
            observed.set_submodule(b.name, compact)
            report.blocks.append(block_report)
    if config.method_object.compresses_experts:
        with stage("low-rank and sparse compression"):
            merged_blocks = [b for b in state.blocks if not plans[b.name].is_identity]
            _compress_experts(observed, merged_blocks, config, calib_batches, loss)
        _report_compressed_experts(observed, state.blocks, report)
    for hook in state.hooks:
        hook.remove()
    delattr(observed, _STATE)
    report.seconds = dict(state.seconds)
    observed.moefx_report = report
    return observed


def _plan_blocks(
    blocks: list[MoEBlock], graphs: dict[str, fx.GraphModule], config: CompressionConfig
) -> tuple[dict[str, BlockStats], dict[str, nn.Module], dict[str, list[FFN]], dict[str, BlockPlan]]:
    """Stage 2, plan: every block's first-pass statistics, expert bank, experts (as FFNs) and plan."""
    stats = {name: collect_statistics(g) for name, g in graphs.items()}
    for name, s in stats.items():
        if s.tokens <= 0:
            raise CalibrationError(
                f"no calibration token reached {name} (all were padding?): calibrate with real, unmasked tokens"
            )
    banks = {name: g.get_submodule("observed_experts").bank for name, g in graphs.items()}
    ffns = {name: [bank.ffn(e) for e in range(bank.num_experts)] for name, bank in banks.items()}
    routers = {name: getattr(block_router(g), "weight", None) for name, g in graphs.items()}

    def plan() -> dict[str, BlockPlan]:
        plans = plan_compression(blocks, stats, ffns, routers, config)
        _keep_exact_routers_that_cannot_be_pruned(blocks, plans, config)
        return plans

    # under torchrun rank 0 plans; the experts every rank holds are not sent back to them
    plans = computed_on_first(plan, [t for fs in ffns.values() for f in fs for t in f.tensors() if t is not None])
    for name, s in stats.items():  # planning's per-expert input moments (E x H^2, gigabytes) are done with
        s.weighted_input_grams = graphs[name].get_submodule("observed_experts").weighted_input_grams = None
    return stats, banks, ffns, plans


def _refits_output(
    ffns: dict[str, list[FFN]], plans: dict[str, BlockPlan], config: CompressionConfig
) -> dict[str, bool]:
    """Which blocks' merged experts get their output projections refit (all, where the method refits, but
    those whose experts end in their own RMSNorm: a least-squares output would miss the norm after it)."""
    refit = config.refits
    normed = [name for name, f in ffns.items() if f[0].out_norm is not None and plans[name].merged_groups]
    if refit and normed:
        warnings.warn(f"{', '.join(normed)}: experts that end in their own RMSNorm are refit on their input "
                      "projections only", MoefxWarning, stacklevel=3)  # fmt: skip
    return {name: refit and name not in normed for name in ffns}


def _start_second_pass(
    graph: fx.GraphModule, plan: BlockPlan, bank: nn.Module, refits_output: bool, config: CompressionConfig
) -> None:
    """Stage 3, second statistics: switch the block's observers to what its plan needs from the data."""
    if plan.router == "pruned" and not config.method_object.prunes:
        graph.get_submodule("routing_observer").fit_groups(plan.expert_to_group)
    if refits_output and plan.merged_groups:
        merged = bank.with_experts(plan.merged, [g[0] for g in plan.groups])
        plan.merged = [merged.ffn(g) for g in range(merged.num_experts)]  # views: held once
        candidates = None
        if config.refits_units:
            candidates = [[e for e, _ in plan.unit_candidates(g)] for g in plan.merged_groups]
        observed_experts = graph.get_submodule("observed_experts")
        observed_experts.start_refit(plan.expert_to_group, merged, plan.merged_groups, candidates)


def _refit_merged(plan: BlockPlan, s: BlockStats, originals: list[FFN], config: CompressionConfig) -> None:
    """The refit solves of a block's merged experts, from its second-pass statistics (where it had one)."""
    if s.refit_grams is None:
        return
    for slot, g in enumerate(s.refit_groups.tolist()):
        gram, cross = s.refit_system(slot)
        if config.refits_units:
            members, coefficients = zip(*plan.unit_candidates(g), strict=True)
            pool = [originals[e] for e in members]
            plan.merged[g] = least_squares_units(plan.merged[g], pool, list(coefficients), gram, cross, config.ridge)
        else:
            plan.merged[g] = least_squares_output(plan.merged[g], gram, cross, config.ridge)


def _rewrite_block(
    b: MoEBlock,
    graph: fx.GraphModule,
    plan: BlockPlan,
    s: BlockStats,
    bank: nn.Module,
    originals: list[FFN],
    config: CompressionConfig,
) -> tuple[fx.GraphModule, BlockReport]:
    """Stage 4, rewrite: the block without observers, its experts merged and its router pruned where
    planned, and its report."""
    before = (_experts_params(bank), block_flops(graph, bank, b.top_k))
    passes = [RemoveObservers(), MergeExperts(plan)]
    if plan.router == "pruned" and not plan.is_identity:
        weight, bias = fit_pruned_router(graph.router.weight, graph.router.bias, plan, s)
        passes.append(PruneRouter(plan, weight, bias))
    compact = PassManager(passes)(graph).graph_module
    after = (_experts_params(compact.experts), block_flops(compact, compact.experts, b.top_k))
    ranked = originals if config.stable_ranks else None
    return compact, _block_report(b, plan, s, before, after, ranked, compact)


def _report_compressed_experts(model: nn.Module, blocks: list[MoEBlock], report: CompressionReport) -> None:
    """The report's parameters, FLOPs and LoSparse remainders after the low-rank and sparse stage."""
    for r, b in zip(report.blocks, blocks, strict=True):
        graph = model.get_submodule(b.name)
        r.expert_params_after = _experts_params(graph.experts)
        r.flops_after = block_flops(graph, graph.experts, b.top_k)
        if isinstance(graph.experts, LoSparseExperts):
            r.remaining = [[_remaining(m) for m in (*e.in_linears, e.out_linear)] for e in graph.experts.experts]


def _check_prepared_for(state: _Prepared, config: CompressionConfig) -> None:
    """Refuse a configuration that needs statistics :func:`prepare` did not set up to collect."""
    missing = [f.name for f in dataclasses.fields(CalibrationNeeds)
               if getattr(config.method_object.needs(config), f.name) and not getattr(state.needs, f.name)]  # fmt: skip
    if missing:
        raise ConfigError(
            f"the model was prepared without the {missing[0].replace('_', ' ')} that method={config.method!r} "
            "with these options needs: pass the same options to moefx.prepare as to moefx.convert"
        )


def _remaining(linear: LoSparseLinear) -> float:
    """The fraction of its dense matrix's parameters (with bias) a LoSparse linear stores."""
    bias = linear.out_features if linear.bias is not None else 0
    return linear.num_parameters() / (linear.out_features * linear.in_features + bias)


def _needs_second_pass(plan: BlockPlan, refit: bool, config: CompressionConfig) -> bool:
    """Whether a block needs the data again once its groups are known (pruned-router fit or refit)."""
    if plan.is_identity:
        return False
    return (refit and bool(plan.merged_groups)) or (plan.router == "pruned" and not config.method_object.prunes)


def _keep_exact_routers_that_cannot_be_pruned(
    blocks: list[MoEBlock], plans: dict[str, BlockPlan], config: CompressionConfig
) -> None:
    for b in blocks:
        reason = router_prune_blocker(b.routing, not config.method_object.prunes, b.identity_experts)
        if plans[b.name].router == "pruned" and reason is not None:
            warnings.warn(
                f"{b.name}: router='pruned' is not possible here ({reason}); keeping the exact router",
                MoefxWarning,
                stacklevel=3,
            )
            plans[b.name].router = "exact"


def _compress_experts(
    model: nn.Module,
    blocks: list[MoEBlock],
    config: CompressionConfig,
    calib_batches: list[Any] | None,
    loss: LossFn | None,
) -> None:
    """MC-SMoE's second stage: LoSparse every merged block's experts (one global sparse threshold)."""
    graphs = {b.name: model.get_submodule(b.name) for b in blocks}
    moments: dict[str, list[tuple[torch.Tensor | None, torch.Tensor | None]]] = {}
    if calib_batches is not None:
        needs = CalibrationNeeds(expert_input_moments=True)
        for b in blocks:
            PassManager([InsertObservers(b.hidden_size, b.mask_key, needs)])(graphs[b.name])
        calibrate(model, calib_batches, progress=config.progress)
        for b in blocks:
            s = collect_statistics(graphs[b.name])
            PassManager([RemoveObservers()])(graphs[b.name])
            moments[b.name] = [
                (s.input_grams[e].double() / s.routed[e], s.hidden_grams[e].double() / s.routed[e])
                if s.routed[e] > 0
                else (None, None)
                for e in range(len(s.routed))
            ]
    experts, scores = decompose_experts(
        {b.name: graphs[b.name].experts for b in blocks},
        moments,
        config.rank,
        activation_aware=config.svd == "activation-aware",
        axis=config.sparse_axis,
    )
    for b in blocks:
        PassManager([CompressExperts(experts[b.name])])(graphs[b.name])
    linears = losparse_linears(experts)
    if config.sparse_score == "gradient" and linears:
        if calib_batches is None:
            message = "sparse_score='gradient' needs calib_batches: scored by activation"
            warnings.warn(message, MoefxWarning, stacklevel=3)
        else:
            scores = sensitivity_scores(model, linears, _losses(model, calib_batches, loss))
    for linear, kept in zip(linears, residual_keep(linears, scores, config.sparse_keep), strict=True):
        linear.keep_slices(kept)


def _losses(model: nn.Module, batches: list[Any], loss: LossFn | None) -> Iterator[torch.Tensor]:
    """The task loss of ``model`` on each batch (see :mod:`moefx.objective`)."""
    for batch in batches:
        value = task_loss(model, call_model(model, batch), batch, loss)
        if value is None:
            raise ConfigError(NO_LOSS)
        yield value


def _block_report(
    block: MoEBlock,
    plan: BlockPlan,
    stats: BlockStats,
    before: tuple[int, int],
    merged: tuple[int, int],
    original: list[FFN] | None,
    compact: torch.fx.GraphModule,
) -> BlockReport:
    """``original`` are the block's experts before merging, for their stable ranks (None: not recorded)."""
    bank = compact.experts
    return BlockReport(
        name=block.name,
        num_experts=block.num_experts,
        kept=plan.num_groups,
        groups=plan.groups,
        router=plan.router if not plan.is_identity else "unchanged",
        frequency=stats.frequency.tolist(),
        expert_params_before=before[0],
        expert_params_merged=merged[0],
        expert_params_after=merged[0],
        flops_before=before[1],
        flops_merged=merged[1],
        flops_after=merged[1],
        stable_rank_before=[] if original is None else [_mean_stable_rank(f) for f in original],
        stable_rank_after=[] if original is None else [_mean_stable_rank(bank.ffn(g)) for g in range(bank.num_experts)],
        dtype=str(next(bank.parameters()).dtype).removeprefix("torch."),
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
    model: nn.Module,
    calib_loader: Iterable[Any],
    config: CompressionConfig | None = None,
    loss: LossFn | None = None,
    **overrides: Any,
) -> nn.Module:
    """Compress ``model``'s MoE blocks using ``calib_loader`` and return the smaller model.

    ``calib_loader`` is any iterable of batches; a batch is a dict of keyword arguments (a tokenizer's
    output), a tuple of positional arguments or a tensor. Options are :class:`CompressionConfig` fields,
    given as ``config`` or as keyword arguments (``experts=0.25, router="pruned"``). The input model is not
    modified unless ``inplace=True``. ``loss(output, batch)`` is only for ``sparse_score="gradient"`` on a
    model without a loss of its own (one that is not a causal LM and gets no ``labels``). What was done is
    in ``compressed.moefx_report``.
    """
    config = CompressionConfig.from_arguments(config, overrides)
    batches = _materialize(calib_loader)
    gradient_scores = config.method_object.compresses_experts and config.sparse_score == "gradient"
    if gradient_scores and not loss_available(model, batches[0], loss):
        raise ConfigError(NO_LOSS)
    if config.sequential:
        from moefx.layerwise import compile_layerwise

        return compile_layerwise(model, batches, config)
    observed = prepare(model, batches[0], config)
    timed_calibration(observed, batches, progress=config.progress)
    return convert(observed, config, calib_batches=batches, loss=loss)
