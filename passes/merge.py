"""Merge: plan which experts each block keeps and how the others join them, then rewrite the expert bank.

Planning (:func:`plan_compression`) follows M-SMoE (Li et al., ICLR 2024, Section 3.1), with the steps that
differ between methods asked of the method's object (:mod:`moefx.methods`):

1. score every expert (activation frequency, REAP saliency or contribution: the method's ``selection``),
   normalise the scores within each layer (the best expert of a layer gets 1.0) and keep the globally best
   ones, so the number kept per layer adapts while the average is what was asked (``adaptive=False``: the
   same count per layer). ``selection="error"`` instead keeps the set whose stand-ins reproduce the block's
   output best and gives the budget to the layers where one more expert lowers that error most
   (:mod:`moefx.selection`);
2. the method groups the other experts around the kept (dominant) ones and weights each group's members
   (M-SMoE: the most similar dominant, frequency-weighted; pruning methods: the kept experts alone);
3. each group is merged as the weighted average, after aligning every member's hidden neurons to the
   group's dominant expert by weight matching (a linear assignment problem over the concatenated FFN
   weights, solved with ``scipy.optimize.linear_sum_assignment``), and the input projections are refit
   when the options ask (:mod:`moefx.passes.refit`).

:class:`MergeExperts` applies a block's plan to its canonical graph.
"""

from __future__ import annotations

import heapq
import operator
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from moefx.block import MoEBlock, experts_node
from moefx.config import CompressionConfig
from moefx.errors import ConfigError
from moefx.experts import FFN
from moefx.methods import BlockEvidence
from moefx.passes.observe import BlockStats
from moefx.routing import combine_by_group
from moefx.selection import error_gains, select_by_error

UNIT_CANDIDATE_MEMBERS = 8  # the pool of a unit refit grows by one expert's width (and Gram rows) per member


@dataclass
class BlockPlan:
    """How one block is compressed.

    ``groups[g]`` lists the original experts that become output expert ``g``, its dominant
    (representative) expert first, with merge ``coefficients[g]``. ``expert_to_group[e]`` is the group of
    expert ``e``, or -1 when the expert is dropped. ``router`` is ``"exact"`` or ``"pruned"``.
    """

    name: str
    num_experts: int
    groups: list[list[int]]
    coefficients: list[list[float]]
    expert_to_group: list[int]
    align: bool
    router: str
    merged: list[FFN] | None = None  # the merged experts, when planning computed them

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def merged_groups(self) -> list[int]:
        """The groups of more than one expert: a one-member group is its expert, unchanged."""
        return [g for g, members in enumerate(self.groups) if len(members) > 1]

    def unit_candidates(self, group: int) -> list[tuple[int, float]]:
        """The members whose hidden units the ``"units"`` refit may keep, with their merge coefficients:
        the dominant, then the others by coefficient, at most :data:`UNIT_CANDIDATE_MEMBERS`."""
        members = list(zip(self.groups[group], self.coefficients[group], strict=True))
        return [members[0], *sorted(members[1:], key=lambda m: -m[1])][:UNIT_CANDIDATE_MEMBERS]

    @property
    def is_identity(self) -> bool:
        return self.groups == [[e] for e in range(self.num_experts)]

    @staticmethod
    def identity(name: str, num_experts: int) -> BlockPlan:
        groups = [[e] for e in range(num_experts)]
        return BlockPlan(name, num_experts, groups, [[1.0]] * num_experts, list(range(num_experts)), False, "exact")


def expert_counts(
    sizes: list[int],
    target: float | int,
    adaptive: bool,
    min_keep: list[int],
    gains: list[list[float]],
    names: list[str] | None = None,
) -> list[int]:
    """How many experts each layer keeps.

    ``target`` is a fraction of each layer's experts (float) or an average count (int). Without
    ``adaptive`` every layer keeps the same share. With it, each layer first keeps its ``min_keep``, and
    each further expert of the global budget goes to the layer whose next expert gains most:
    ``gains[layer][c]`` is the gain of that layer's ``(c + 1)``-th expert. ``names``, the layers' block
    names, are what errors call them.
    """
    names = names or [f"MoE layer {i}" for i in range(len(sizes))]
    if isinstance(target, float):
        per_layer = [max(1, round(target * n)) for n in sizes]
        budget = round(target * sum(sizes))
    else:
        larger = [(i, n) for i, n in enumerate(sizes) if target > n]
        if larger:
            i, n = larger[0]
            raise ConfigError(f"experts={target} is more than {names[i]}'s {n} experts: give at most {n}, "
                              "or a fraction")  # fmt: skip
        per_layer, budget = [target] * len(sizes), target * len(sizes)
    if not adaptive:
        short = [(i, c, m) for i, (c, m) in enumerate(zip(per_layer, min_keep, strict=True)) if c < m]
        if short:
            i, c, m = short[0]
            raise ConfigError(
                f"experts={target} keeps {c} experts in {names[i]}, fewer than its top_k={m}; keep at least {m}"
            )
        return per_layer
    if budget < sum(min_keep):
        raise ConfigError(
            f"experts={target} keeps {budget} experts over {len(sizes)} MoE layers, fewer than their top_k "
            f"({sum(min_keep)} in all); keep at least top_k experts per layer"
        )
    counts = list(min_keep)
    # ties go to the earlier layer
    heap = [(-gains[layer][c], layer) for layer, c in enumerate(counts) if c < sizes[layer]]
    heapq.heapify(heap)
    for _ in range(budget - sum(min_keep)):
        _, layer = heapq.heappop(heap)
        counts[layer] += 1
        if counts[layer] < sizes[layer]:
            heapq.heappush(heap, (-gains[layer][counts[layer]], layer))
    return counts


def ranking(scores: torch.Tensor) -> list[int]:
    """Experts by descending score (ties by index)."""
    return sorted(range(len(scores)), key=lambda e: (-float(scores[e]), e))


def allocate_experts(
    scores: list[torch.Tensor],
    target: float | int,
    adaptive: bool,
    min_keep: list[int],
    names: list[str] | None = None,
) -> list[list[int]]:
    """The experts each layer keeps, best first: the best by score, as many as :func:`expert_counts` gives,
    whose adaptive allocation ranks experts by score normalised within their layer (the paper's adaptive
    ratio: the best expert of each layer scores 1)."""
    order = [ranking(s) for s in scores]
    gains = []
    for s, o in zip(scores, order, strict=True):
        best = float(s.max()) if len(s) else 0.0
        gains.append([float(s[e]) / best if best > 0 else 0.0 for e in o])
    counts = expert_counts([len(s) for s in scores], target, adaptive, min_keep, gains, names)
    return [o[:c] for o, c in zip(order, counts, strict=True)]


def unit_features(ffn: FFN) -> torch.Tensor:
    """``[I, *]``: everything attached to each hidden unit (input rows, biases, output column), float32."""
    parts = [*ffn.in_weights, *(b[:, None] for b in ffn.in_biases if b is not None), ffn.out_weight.T]
    return torch.cat([p.detach().float() for p in parts], dim=1)


def _assignment(reference_features: torch.Tensor, other: FFN) -> torch.Tensor:
    # one float32 product (a ranking, not a solve); the assignment itself runs in float64
    cost = reference_features @ unit_features(other).T
    _, columns = linear_sum_assignment(cost.double().numpy(), maximize=True)
    return torch.as_tensor(columns, dtype=torch.long)


def align_ffn(reference: FFN, other: FFN) -> torch.Tensor:
    """The permutation of ``other``'s hidden units that best matches ``reference`` (weight matching).

    Maximises the summed inner products of corresponding input rows, biases and output columns, one
    permutation shared by every matrix (gate, up and down of a gated FFN). ``other.units(perm)`` is the
    aligned expert; it computes the same function as ``other``.
    """
    return _assignment(unit_features(reference), other)


def align_group(ffns: list[FFN], align: bool) -> list[FFN]:
    """A group's experts with every member's hidden units aligned to the first (the dominant) when ``align``."""
    if not align or len(ffns) == 1:
        return list(ffns)
    reference = unit_features(ffns[0])
    return [ffns[0]] + [f.units(_assignment(reference, f)) for f in ffns[1:]]


def merge_plan(
    plan: BlockPlan, ffns: list[FFN], input_grams: torch.Tensor | None = None, ridge: float = 1e-2
) -> list[FFN]:
    """The plan's merged experts from the block's expert ``ffns``.

    With ``input_grams`` (``[E, H, H]`` routing-weighted input second moments, bias column appended when
    the experts have input biases), the input projections are merged by least squares on the members'
    aligned pre-activations instead of averaged (see :func:`moefx.passes.refit.least_squares_inputs`).
    """
    from moefx.passes.refit import least_squares_inputs

    merged = []
    for group, coefficients in zip(plan.groups, plan.coefficients, strict=True):
        if len(group) == 1:
            merged.append(ffns[group[0]])
            continue
        aligned = align_group([ffns[e] for e in group], plan.align)
        ffn = FFN.weighted_sum(aligned, coefficients)
        if input_grams is not None:
            ffn = least_squares_inputs(ffn, aligned, [input_grams[e] for e in group], ridge)
        merged.append(ffn)
    return merged


def _expert_to_group(groups: list[list[int]], num_experts: int) -> list[int]:
    table = [-1] * num_experts
    for g, members in enumerate(groups):
        for e in members:
            table[e] = g
    return table


SCORES = {"frequency": "frequency", "reap": "reap_saliency", "contribution": "contribution"}  # BlockStats'


def _kept_experts(blocks: list[MoEBlock], stats: dict[str, BlockStats], config: CompressionConfig) -> list[list[int]]:
    """Each block's kept (dominant) experts, by the configured selection and per-layer budget."""
    selection, adaptive = config.resolved("selection"), config.resolved("adaptive")
    min_keep, names = [b.top_k for b in blocks], [b.name for b in blocks]
    if selection != "error":
        scores = [getattr(stats[b.name], SCORES[selection]) for b in blocks]
        return allocate_experts(scores, config.experts, adaptive, min_keep, names)
    errors = [stats[b.name].substitution_errors for b in blocks]
    gains = [error_gains(e) for e in errors] if adaptive else []
    counts = expert_counts([b.num_experts for b in blocks], config.experts, adaptive, min_keep, gains, names)
    return [
        select_by_error(e, count, [ranking(getattr(stats[b.name], score)) for score in SCORES.values()])
        for b, e, count in zip(blocks, errors, counts, strict=True)
    ]


def plan_compression(
    blocks: list[MoEBlock],
    stats: dict[str, BlockStats],
    ffns: dict[str, list[FFN]],
    router_weights: dict[str, torch.Tensor],
    config: CompressionConfig,
) -> dict[str, BlockPlan]:
    """Plans for every block: skipped blocks get the identity plan."""
    skip = {b.name for i, b in enumerate(blocks) if i in config.skip_layers or b.name in config.skip_layers}
    unknown = [s for s in config.skip_layers if isinstance(s, str) and s not in {b.name for b in blocks}]
    if unknown:
        raise ConfigError(f"skip_layers names {unknown[0]!r}, which is not an MoE block of this model")
    merged = [b for b in blocks if b.name not in skip]
    plans = {b.name: BlockPlan.identity(b.name, b.num_experts) for b in blocks if b.name in skip}
    if not merged:
        return plans
    method = config.method_object
    kept = _kept_experts(merged, stats, config)
    rng = np.random.default_rng(config.seed)
    align = config.resolved("align")
    least_squares_merge = config.refits_inputs
    for block, dominants in zip(merged, kept, strict=True):
        s = stats[block.name]
        groups = method.groups(dominants, BlockEvidence(s, router_weights[block.name], ffns[block.name]), config, rng)
        plans[block.name] = BlockPlan(
            name=block.name,
            num_experts=block.num_experts,
            groups=groups,
            coefficients=method.coefficients(groups, s.frequency),
            expert_to_group=_expert_to_group(groups, block.num_experts),
            align=align and not method.prunes,
            router="pruned" if method.prunes else config.router,
        )
        grams = s.weighted_input_grams if least_squares_merge else None
        plans[block.name].merged = merge_plan(plans[block.name], ffns[block.name], grams, config.ridge)
    return plans


class MergeExperts(PassBase):
    """Replace a canonical block's experts with the merged experts of its plan.

    Matches: the ``experts`` call_module of a canonical block.
    Rewrites: the ``experts`` module becomes a bank of ``plan.num_groups`` experts (each group merged as
    planned; real weights, nothing aliased), and a ``combine_by_group`` call with the plan's ``E -> G``
    table (buffer ``expert_to_group``) is inserted before the experts on their index and weights, so each
    token (or per-slot row) runs each distinct group once with the summed weights of its selected members.
    An identity plan changes nothing.
    """

    def __init__(self, plan: BlockPlan) -> None:
        super().__init__()
        self.plan = plan

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        plan = self.plan
        if plan.is_identity:
            return PassResult(graph_module, False)
        bank = graph_module.get_submodule("experts")
        merged = plan.merged
        if merged is None:
            merged = merge_plan(plan, [bank.ffn(e) for e in range(plan.num_experts)])
        representatives = [group[0] for group in plan.groups]
        graph_module.experts = bank.with_experts(merged, representatives)
        graph_module.register_buffer("expert_to_group", torch.tensor(plan.expert_to_group, dtype=torch.long))
        graph = graph_module.graph
        experts = experts_node(graph)
        tokens, index, weights = experts.args  # the selection's, or its per-slot rows (weights scaling inputs)
        with graph.inserting_before(experts):
            table = graph.get_attr("expert_to_group")
            combined = graph.call_function(combine_by_group, (weights, index, table))
            group_weights = graph.call_function(operator.getitem, (combined, 0))
            group_index = graph.call_function(operator.getitem, (combined, 1))
        experts.args = (tokens, group_index, group_weights)
        graph.lint()
        graph_module.recompile()
        return PassResult(graph_module, True)
