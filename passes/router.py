"""Router: shrink a merged block's router to one output per group ("pruned" router mode).

After :class:`~moefx.passes.merge.MergeExperts` a block keeps its E-way router and maps selected experts to
groups (exact mode). :class:`PruneRouter` instead gives the router G outputs and selects the top-k groups
directly, which the paper (Appendix A1.2) names as the way to real latency gains.

For merged groups the G router rows are fitted in closed form: ridge least squares of the group's pooled
logit, ``log sum_{e in group} exp(logit_e)`` (the logit whose softmax is the group's total probability),
centred per token because softmax ignores a per-token shift, on the calibration tokens' router inputs.
Without that data the rows fall back to the frequency-weighted mean of the members' rows. For pruning
methods the rows are the kept experts' own rows. Routing that cannot be pruned soundly (group-limited
selection; sigmoid scores of merged experts) keeps the exact router; :func:`router_prune_blocker` says why.
"""

from __future__ import annotations

import math

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from moefx.block import identity_split, selection_nodes
from moefx.passes.merge import BlockPlan
from moefx.passes.observe import BlockStats
from moefx.passes.refit import ridge_solve
from moefx.routing import INDEPENDENT_SCORINGS, RoutingSpec, combine_by_group


def router_prune_blocker(routing: RoutingSpec, merges: bool, identity_experts: int = 0) -> str | None:
    """Why this routing cannot be given fewer outputs soundly, or None if it can."""
    if routing.scoring == "given":
        return "its experts are chosen by a router outside the block, which moefx leaves as it is"
    if routing.hash_routed:
        return "its experts are chosen by token id from a fixed table, which names the experts it has"
    if identity_experts and merges:
        return "merged experts' pooled logits cannot be fitted beside identity experts' fixed ones"
    if routing.shared_columns and merges:
        return "merged experts' pooled logits cannot be fitted beside the shared experts' fixed ones"
    if routing.n_group is not None:
        return "its group-limited expert selection cannot be expressed over a different number of experts"
    if merges and routing.scoring in INDEPENDENT_SCORINGS:
        return f"independent {routing.scoring} scores of merged experts have no pooled equivalent"
    return None


def fit_pruned_router(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    plan: BlockPlan,
    stats: BlockStats,
    ridge: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``[G, H]`` weight (and ``[G]`` bias) of a pruned router for ``plan``.

    Pruning plans (singleton groups) keep the kept experts' rows. Merging plans use the least-squares fit
    when ``stats`` holds the group-fit sums (``group_cross``, from a second calibration pass), otherwise the
    frequency-weighted mean of each group's rows.
    """
    groups = plan.groups
    if all(len(g) == 1 for g in groups):
        rows = [g[0] for g in groups]
        return weight[rows].detach().clone(), None if bias is None else bias[rows].detach().clone()
    if stats.group_cross is None or stats.router_input_gram is None:
        w = torch.stack([sum(c * weight[e].double() for e, c in zip(g, cs, strict=True)) for g, cs in
                         zip(groups, plan.coefficients, strict=True)])  # fmt: skip
        b = None
        if bias is not None:
            b = torch.stack([sum(c * bias[e].double() for e, c in zip(g, cs, strict=True)) for g, cs in
                             zip(groups, plan.coefficients, strict=True)])  # fmt: skip
        return w.to(weight.dtype), None if b is None else b.to(bias.dtype)
    gram, cross = stats.router_input_gram, stats.group_cross  # [H, H], [H, G]
    if bias is not None:  # augment the input with a constant 1 for the bias column
        n = torch.tensor([[stats.tokens]], dtype=gram.dtype)
        gram = torch.cat([torch.cat([gram, stats.router_input_sum[:, None]], 1),
                          torch.cat([stats.router_input_sum[None, :], n], 1)], 0)  # fmt: skip
        cross = torch.cat([cross, stats.group_target_sums[None, :]], 0)
    solution = ridge_solve(gram, cross.T, torch.zeros_like(cross.T), ridge)
    if bias is not None:
        return solution[:, :-1].to(weight.dtype).contiguous(), solution[:, -1].to(bias.dtype).contiguous()
    return solution.to(weight.dtype).contiguous(), None


class PruneRouter(PassBase):
    """Give a merged canonical block a router with one output per group.

    Matches: the ``router`` call_module, the ``select_experts`` call and the ``combine_by_group`` call that
    :class:`~moefx.passes.merge.MergeExperts` inserted, and a ``split_identity_experts`` call if there is
    one. Rewrites: ``router`` becomes an ``nn.Linear`` with the given ``[G, H]`` weight, followed by the
    identity experts' rows (whose split then starts at G) or the shared experts' scoring rows;
    ``combine_by_group`` and its table are removed so the experts take the selection's outputs directly; the
    selection picks at most ``top_k`` of the router's outputs, its correction bias keeps the
    representatives' (and identity experts') entries, and a capacity
    grows by ``ceil(E / G)`` (a group serves that many experts).
    """

    def __init__(self, plan: BlockPlan, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.plan, self.weight, self.bias = plan, weight, bias

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        num_groups, hidden = self.weight.shape
        weight, bias, kept = self.weight, self.bias, [g[0] for g in self.plan.groups]
        # the router's columns after the experts' (identity or shared experts') follow the groups'
        extra = list(range(self.plan.num_experts, graph_module.router.out_features))
        weight = torch.cat([weight, graph_module.router.weight[extra]])
        bias = None if bias is None else torch.cat([bias, graph_module.router.bias[extra]])
        kept += extra
        split = identity_split(graph)
        if split is not None:
            split.args = (*split.args[:3], num_groups)
        router = nn.Linear(hidden, weight.shape[0], bias=bias is not None, device="meta")
        router.weight = nn.Parameter(weight.detach().clone())
        if bias is not None:
            router.bias = nn.Parameter(bias.detach().clone())
        graph_module.router = router
        selection, _, _ = selection_nodes(graph)
        combine = next((n for n in graph.nodes if n.op == "call_function" and n.target is combine_by_group), None)
        if combine is not None:
            for user in list(combine.users):
                user.replace_all_uses_with(combine.args[0] if user.args[1] == 0 else combine.args[1])
                graph.erase_node(user)
            table = combine.args[2]
            graph.erase_node(combine)
            graph.erase_node(table)
            delattr(graph_module, "expert_to_group")
        kwargs = dict(selection.kwargs)
        kwargs["top_k"] = min(kwargs["top_k"], router.out_features)
        if kwargs.get("capacity") is not None:
            kwargs["capacity"] = kwargs["capacity"] * math.ceil(self.plan.num_experts / num_groups)
        selection.kwargs = kwargs
        if isinstance(selection.args[1], fx.Node):  # the correction bias of the kept experts (of those it has)
            scored = [e for e in kept if e < graph_module.correction_bias.shape[-1]]
            graph_module.correction_bias = graph_module.correction_bias[..., torch.tensor(scored)].clone()
        graph.lint()
        graph_module.recompile()
        return PassResult(graph_module, True)
