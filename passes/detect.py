"""Detection: find the MoE blocks of a captured model and read their structure off the graph.

Matches, in the ATen graph that :func:`moefx.trace` captures:

* a **router**: a linear whose 2-D weight ``[E, H]`` feeds a top-k / argmax selection over its E outputs
  (through softmax, sigmoid, sqrt-softplus, or a softmax of the selected logits), a sparse mixer's masked
  softmaxes (PhiMoE), or a gather of its scores at experts a fixed table lists for the token id
  (DeepSeek-V4's hash routing);
* the **experts** beside it: the nearest enclosing module that holds 3-D parameters with a leading
  dimension of E (fused experts), a container of E structurally identical expert modules, or 2-D
  parameters of width H stacking E matrices (``[E*I, H]``, DBRX). That module is the **block**; its other
  parameterised children are shared experts, and a child linear with one output is a shared-expert gate;
* a fused expert bank no such router's block holds, whose module takes the routing as arguments
  (``forward(hidden, index, weights)``: Gemma 4's and Zaya's experts, chosen by a router module beside
  them): the bank's module is a block of its own, routed outside itself (``MoEBlock.given_routing``);
* a module captured opaque (its forward branches on data, e.g. sorts tokens by expert and splits them by
  Python counts) that holds a child linear ``[E, H]`` beside E experts and nothing else with parameters:
  its routing is read from its structure (:func:`_opaque_block`), since the graph shows none.

The routing variant (scoring, renormalisation, scaling, correction bias, group-limited selection,
capacity) is read from the ops between the router and the selection; a fused bank's activation is the
subgraph between its two matmuls, extracted as a GraphModule, or, where capture keeps the experts' loop
opaque, the one parameterless module beside their weights. Detection works on structure and shapes, not
class names, and each block's reading is verified by running moefx's canonical form of it against the
original module. Other expert banks (no router read here selects them, and they do not take their routing
as arguments) are left as they are, with a warning (:func:`unread_expert_banks`). Rewrites nothing.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
import warnings
from collections import deque
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from moefx.block import (
    FusedExpertsSource,
    GivenRouting,
    ModuleExpertsSource,
    MoEBlock,
    TokenIdRouting,
    build_experts,
    first_verified,
    float32_reference,
    random_block_inputs,
)
from moefx.capture import trace
from moefx.errors import DetectionError, MoefxWarning
from moefx.experts import GATED_LAYOUTS, FusedExperts, GatedActivation, ffn_structure
from moefx.graphs import ancestors, descendants, extract_subgraph
from moefx.routing import RoutingSpec

aten = torch.ops.aten

# ops that pass a value through unchanged for the purpose of reading routing structure
_TRANSPARENT = {
    aten.to, aten._to_copy, aten.view, aten.reshape, aten.clone, aten.contiguous, aten.detach, aten.alias,
    aten.type_as, aten._assert_tensor_metadata, aten.flatten, aten.lift_fresh_copy,
}  # fmt: skip
_WEIGHT_VIEWS = _TRANSPARENT | {aten.t, aten.transpose, aten.permute, aten.squeeze, aten.unsqueeze}
_SELECTIONS = {aten.topk, aten.argmax, aten.max}
_MATMULS = {aten.linear, aten.mm, aten.bmm, aten.matmul, aten.addmm, aten.baddbmm, aten.einsum, aten._grouped_mm}
_ROUTING_DEPTH = 16


def _packet(node: fx.Node) -> Any:
    return getattr(node.target, "overloadpacket", node.target) if node.op == "call_function" else None


def _floating(node: fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else ""


def _shape(node: Any) -> tuple[int | None, ...] | None:
    """The node's static shape; symbolic (batch, sequence, data-dependent) dimensions are None."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return tuple(d if isinstance(d, int) else None for d in val.shape)
    return None


def _last_dim(node: Any) -> Any:
    shape = _shape(node)
    return shape[-1] if shape else None


def _strip(node: Any, ops: set) -> Any:
    while isinstance(node, fx.Node) and _packet(node) in ops:
        node = node.args[0]
    return node


def _reach(start: fx.Node, depth: int, through: set | None = None) -> list[fx.Node]:
    """Nodes reachable from ``start`` along users within ``depth`` hops, in BFS order.

    With ``through``, the search continues only past ops in that set (it still reports the first other op).
    """
    seen, out, queue = {start}, [], deque([(start, 0)])
    while queue:
        node, d = queue.popleft()
        if d == depth or (through is not None and node is not start and _packet(node) not in through):
            continue
        for user in node.users:
            if user not in seen:
                seen.add(user)
                out.append(user)
                queue.append((user, d + 1))
    return out


def _relative(path: str, base: str) -> str:
    return path[len(base) + 1 :] if base else path


def _inside(path: str, base: str) -> bool:
    return not base or path == base or path.startswith(base + ".")


def _with_grad_regions_inlined(gm: fx.GraphModule) -> fx.Graph:
    """A copy of ``gm``'s graph in which each grad-mode region (torch.export's record of a ``torch.no_grad()``
    block, such as LongCat-Flash's or PhiMoE's expert choice) is replaced by its body, so that detection
    follows the data through it. ``gm`` is not changed; node metadata is shared with its nodes."""
    region_op = torch.ops.higher_order.wrap_with_set_grad_enabled
    graph, env, outputs = fx.Graph(), {}, {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is region_op:
            body = gm.get_submodule(node.args[1].target).graph
            inputs = [n for n in body.nodes if n.op == "placeholder"]
            mapped = {p: env[a] for p, a in zip(inputs, node.args[2:], strict=True)}
            outputs[node] = graph.graph_copy(body, mapped)
        elif node.op == "call_function" and node.target is operator.getitem and node.args[0] in outputs:
            env[node] = outputs[node.args[0]][node.args[1]]
        else:
            env[node] = graph.node_copy(node, env.__getitem__)
    return graph


class _Graph:
    """The captured graph with the lookups detection needs."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.graph = _with_grad_regions_inlined(gm)
        self.nodes = list(self.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}

    def attr(self, node: Any, through: set = _WEIGHT_VIEWS) -> tuple[str, torch.Tensor] | None:
        node = _strip(node, through)
        if isinstance(node, fx.Node) and node.op == "get_attr":
            owner, _, name = node.target.rpartition(".")
            tensor = getattr(self.gm.get_submodule(owner), name)
            if isinstance(tensor, torch.Tensor):
                return node.target, tensor
        return None

    def attr_nodes(self, prefix: str) -> list[fx.Node]:
        return [n for n in self.nodes if n.op == "get_attr" and _inside(n.target, prefix)]


def _router_weight(graph: _Graph, node: fx.Node) -> tuple[str, torch.Tensor] | None:
    """The ``[E, H]`` weight of a linear node, if it is a parameter of the model."""
    packet = _packet(node)
    if packet is aten.linear:
        found = graph.attr(node.args[1], _TRANSPARENT)
    elif packet in (aten.matmul, aten.mm) and _packet(_strip(node.args[1], _TRANSPARENT)) in (aten.t, aten.transpose):
        found = graph.attr(node.args[1])
    else:
        return None
    if found is None or found[1].ndim != 2 or found[1].shape[0] < 2:
        return None
    return found


def _selection(graph: _Graph, linear: fx.Node, num_experts: int) -> fx.Node | None:
    """The top-k / argmax node that chooses among the E outputs of ``linear``; for a sparse mixer (PhiMoE),
    whose choices come from max ops inside a no-grad region, its first masking of the logits with -inf; for
    experts chosen by token id, the gather of their scores (:func:`_hash_table`)."""
    masking = None
    for node in _reach(linear, _ROUTING_DEPTH):
        packet = _packet(node)
        width = _last_dim(node.args[0]) if packet in (aten.topk, aten.argmax) else None
        if width == num_experts or (width is not None and _leading_columns(node, linear)):
            k = node.args[1] if packet is aten.topk else 1
            if isinstance(k, int) and k < width:
                return node
        if packet is aten.gather and _last_dim(node.args[0]) == num_experts and _hash_table(graph, node):
            return node
        if masking is None and _is_sparse_mixer_mask(node, linear):
            masking = node
    return masking


def _leading_columns(selection: fx.Node, linear: fx.Node) -> bool:
    """Whether ``selection`` chooses among leading columns of the router's outputs only (a slice of its
    logits or scores: Inkling's last columns score its shared experts)."""
    near, frontier = set(_reach(linear, 3)), [selection.args[0]]
    for _ in range(4):  # the choice is a few ops from the slice (a correction bias, a cast)
        if any(_packet(n) is aten.slice and n in near and n.args[1:3] in ((-1, 0), (1, 0)) for n in frontier):
            return True
        frontier = [a for n in frontier for a in n.all_input_nodes]
    return False


def _hash_table(graph: _Graph, gather: fx.Node) -> tuple[str, torch.Tensor, fx.Node] | None:
    """Where a gather of router scores takes its indices from a fixed integer table ``[V, k]`` indexed by
    token id (DeepSeek-V4's hash routing): the table's path, the table and the token ids' node."""
    lookup = _strip(gather.args[2], _TRANSPARENT)
    if _packet(lookup) is not aten.index or len(lookup.args[1]) != 1:
        return None
    found = graph.attr(lookup.args[0], _TRANSPARENT)
    if found is None or found[1].ndim != 2 or found[1].is_floating_point():
        return None
    return found[0], found[1], _strip(lookup.args[1][0], _TRANSPARENT)


def _is_sparse_mixer_mask(node: fx.Node, logits: fx.Node) -> bool:
    """``node`` fills the logits (or the logits with experts already taken set to -inf) with -inf where a
    comparison says, and a softmax of it is gathered at the chosen expert: one slot of a sparse mixer."""
    if _packet(node) is not aten.masked_fill or node.args[2] != float("-inf"):
        return False
    source = _strip(node.args[0], _TRANSPARENT)
    while _packet(source) is aten.scatter and source.args[-1] == float("-inf"):  # experts taken by earlier slots
        source = _strip(source.args[0], _TRANSPARENT)
    if source is not logits:
        return False
    softmaxes = [u for u in node.users if _packet(u) in (aten.softmax, aten._softmax)]
    return any(_packet(g) is aten.gather for s in softmaxes for g in s.users)


def _sparse_mixer_routing(graph: _Graph, linear: fx.Node, first: fx.Node, block: str) -> RoutingSpec:
    """The sparse mixer's k (one masked softmax per slot) and ``jitter_eps`` (half the constant the masks'
    comparison uses: ``(best - logits) / max(|logits|, best) > 2 * jitter_eps``)."""
    slots = [n for n in _reach(linear, _ROUTING_DEPTH) if _is_sparse_mixer_mask(n, linear)]
    mask = first.args[1]
    comparisons = [mask] if _packet(mask) is aten.gt else []
    constants = {float(n.args[1]) for n in comparisons if isinstance(n.args[1], (int, float))}
    if len(constants) != 1 or first not in slots:
        raise DetectionError(f"{block}: a sparse-mixer routing whose threshold moefx cannot read")
    return RoutingSpec(top_k=len(slots), scoring="sparsemixer", jitter_eps=constants.pop() / 2)


@dataclasses.dataclass
class _RoutingReading:
    """What detection reads between a router's logits and the experts: the routing; the paths of its
    correction bias and of a learned scalar folded into ``spec.scale``; a hash-routed block's table
    (:func:`_hash_table`)."""

    spec: RoutingSpec
    correction_bias: str | None = None
    scale_parameter: str | None = None
    hash_table: tuple[str, torch.Tensor, fx.Node] | None = None


def _read_routing(graph: _Graph, linear: fx.Node, selection: fx.Node, block: str) -> _RoutingReading:
    """Routing semantics between the router's logits and the selection."""
    if _packet(selection) is aten.masked_fill:
        return _RoutingReading(_sparse_mixer_routing(graph, linear, selection, block))
    num_experts = _last_dim(selection.args[0])  # the router's outputs, less any that score shared experts
    shared_columns = _last_dim(linear) - num_experts
    near = _reach(linear, 4, _TRANSPARENT)
    scoring_node = next((n for n in near if _packet(n) in (aten.softmax, aten._softmax, aten.sigmoid)), None)
    if scoring_node is None:  # sqrt(softplus(logits)) (DeepSeek-V4)
        softplus = [n for n in near if _packet(n) is aten.softplus]
        scoring_node = next((u for n in softplus for u in n.users if _packet(u) is aten.sqrt), None)
    selection_packet = _packet(selection)
    topk_of_logits = selection_packet is aten.topk and _strip(selection.args[0], _TRANSPARENT) is linear
    if scoring_node is None:  # a sigmoid of the selected logits, which Kolibri gathers and Llama 4 scatters to
        picked = [  # [T, E]: elementwise and monotone, so the sigmoid scoring
            n for n in _reach(linear, 2) if _packet(n) is aten.gather and _strip(n.args[0], _TRANSPARENT) is linear
        ] + ([selection] if topk_of_logits else [])
        through = _TRANSPARENT | {operator.getitem, aten.scatter, aten.scatter_}
        scoring_node = next((u for p in picked for u in _reach(p, 4, through) if _packet(u) is aten.sigmoid), None)
    sigmoid = scoring_node is not None and _packet(scoring_node) is aten.sigmoid
    if topk_of_logits and not sigmoid:
        scoring = "softmax_topk"
    elif sigmoid:
        scoring = "sigmoid"
    elif scoring_node is not None and _packet(scoring_node) is aten.sqrt:
        scoring = "sqrtsoftplus"
    elif scoring_node is not None:
        scoring = "softmax"
    else:
        raise DetectionError(
            f"{block}: the router's scores are not a softmax, sigmoid or sqrt-softplus of its logits, "
            "a routing variant moefx does not support yet"
        )
    hashed = _hash_table(graph, selection) if selection_packet is aten.gather else None
    top_k = selection.args[1] if selection_packet is aten.topk else hashed[1].shape[1] if hashed else 1

    between = set(_reach(scoring_node or linear, _ROUTING_DEPTH)) & ancestors(selection)
    if scoring_node is not None and scoring_node not in ancestors(selection):  # scored after choosing: the choice
        between |= set(_reach(linear, _ROUTING_DEPTH)) & ancestors(selection)  # reads the logits themselves
    correction_bias, bias_on_logits = None, False
    n_group = topk_group = group_topk = None
    for node in sorted(between, key=graph.order.get):
        packet = _packet(node)
        if packet in (aten.add, aten.add_):
            for arg in node.args:
                found = graph.attr(arg)
                # one value per expert, stored [E] or with unit leading dimensions ([1, E]: Ernie 4.5)
                if found and found[1].shape[-1:] == (num_experts,) and found[1].numel() == num_experts:
                    correction_bias = _relative(found[0], block)
                    bias_on_logits = any(_strip(a, _TRANSPARENT) is linear for a in node.args)
        shape = _shape(node)
        # experts viewed as [tokens, groups, experts per group]; one group (many families' default) limits nothing
        grouped = packet in (aten.view, aten.reshape) and shape and len(shape) == 3
        if grouped and shape[1] * shape[2] == num_experts and shape[1] > 1:
            n_group = shape[1]
        if packet is aten.topk and n_group:
            if _last_dim(node.args[0]) == num_experts // n_group and _shape(node.args[0])[-2:-1] == (n_group,):
                group_topk = node.args[1]
            elif _last_dim(node.args[0]) == n_group:
                topk_group = node.args[1]
    if n_group is not None and (topk_group is None or group_topk is None):
        raise DetectionError(f"{block}: group-limited routing whose group selection moefx cannot read")
    if n_group is not None and topk_group >= n_group:  # every group is eligible: no limit
        n_group = topk_group = group_topk = None

    capacity = None
    if selection_packet is aten.argmax:
        for node in _reach(selection, 8):
            if _packet(node) is aten.cumsum:
                for user in _reach(node, 3):
                    if _packet(user) in (aten.le, aten.lt) and isinstance(user.args[1], (int, float)):
                        capacity = int(user.args[1]) - (1 if _packet(user) is aten.lt else 0)
    weighting = _read_weight_transform(graph, selection, scoring_node, top_k + shared_columns)
    normalize, norm_eps, norm_min, scale, scale_parameter = weighting
    spec = RoutingSpec(
        top_k=top_k, scoring=scoring, normalize=normalize, norm_eps=norm_eps, norm_min=norm_min, scale=scale,
        has_correction_bias=correction_bias is not None, n_group=n_group, topk_group=topk_group,
        group_topk=group_topk, capacity=capacity, bias_on_logits=bias_on_logits, hash_routed=hashed is not None,
        shared_columns=shared_columns,
    )  # fmt: skip
    return _RoutingReading(spec, correction_bias, scale_parameter, hashed)


def _read_weight_transform(
    graph: _Graph, selection: fx.Node, scoring_node: fx.Node | None, slots: int
) -> tuple[bool, float, float, float, str | None]:
    """Renormalisation (with its epsilon and floor) and scaling applied to the selected weights (``slots``
    of them: the k chosen, and the shared experts' where the router scores them), and the path of a
    learned scalar the scaling includes."""
    starts = [selection] + ([scoring_node] if scoring_node is not None else [])
    normalize, eps, floor, scale, scale_parameter = False, 0.0, 0.0, 1.0, None
    seen = set()
    for start in starts:
        for node in _reach(start, 8):
            shape = _shape(node)
            if node in seen or not shape or shape[-1] != slots or len(shape) < 2:
                continue
            seen.add(node)
            packet = _packet(node)
            subtrahend = _strip(node.args[1], _TRANSPARENT) if packet is aten.sub else None
            if isinstance(subtrahend, fx.Node) and _packet(subtrahend) is aten.logsumexp:
                normalize = True  # exp(log s - logsumexp(log s)) = s / sum(s) (Inkling's log-sigmoids)
            elif packet in (aten.mul, aten.mul_) and _floating(node) and graph.attr(node.args[1], _TRANSPARENT):
                path, factor = graph.attr(node.args[1], _TRANSPARENT)
                if factor.numel() == 1 and scale_parameter is None:  # a learned scalar (Inkling's global scale)
                    scale, scale_parameter = scale * float(factor.detach()), path
            elif packet in (aten.div, aten.div_) and isinstance(node.args[1], fx.Node):
                divisor = _strip(node.args[1], _TRANSPARENT)
                if _packet(divisor) in (aten.clamp, aten.clamp_min) and isinstance(divisor.args[1], (int, float)):
                    floor, divisor = float(divisor.args[1]), _strip(divisor.args[0], _TRANSPARENT)  # Ernie 4.5
                if _packet(divisor) in (aten.add, aten.add_) and isinstance(divisor.args[1], (int, float)):
                    eps, divisor = float(divisor.args[1]), _strip(divisor.args[0], _TRANSPARENT)
                l1_norm = _packet(divisor) is aten.linalg_vector_norm and divisor.args[1:2] == (1,)  # DBRX
                if _packet(divisor) is aten.sum or l1_norm:
                    normalize = True
            elif packet in (aten.mul, aten.mul_) and isinstance(node.args[1], (int, float)) and _floating(node):
                scale *= float(node.args[1])  # of the weights, not of indices (LongCat-Flash spreads its own)
    return normalize, eps, floor, scale, scale_parameter


def _find_experts(
    model: nn.Module, router_owner: str, num_experts: int, hidden: int
) -> tuple[str, list[str], str | None]:
    """The block path, and inside it the fused expert tensors or the container of expert modules."""
    parts = router_owner.split(".") if router_owner else []
    for depth in range(len(parts), -1, -1):
        block = ".".join(parts[:depth])
        module = model.get_submodule(block)
        fused = [
            name
            for name, p in module.named_parameters()
            if p.ndim == 3 and p.shape[0] == num_experts and not _inside(_join(block, name), router_owner)
        ]
        owners = {name.rpartition(".")[0] for name in fused}
        if len(fused) >= 2 and len(owners) == 1:
            return block, fused, None
        for name, sub in module.named_modules():
            children = list(sub.children())
            if (
                len(children) == num_experts
                and not _inside(_join(block, name), router_owner)
                and len({type(c) for c in children}) == 1
                and sum(1 for _ in children[0].parameters()) >= 2
            ):
                return block, [], name
        flat = _flat_stacks(module, block, router_owner, num_experts, hidden)
        if len(flat) == 1:
            return block, flat[0], None
    raise LookupError


def _find_fewer_experts(
    model: nn.Module, router_owner: str, num_outputs: int, hidden: int
) -> tuple[int, tuple[str, list[str], str | None]]:
    """Fused experts fewer than the router's outputs, beside the router (its module's two nearest
    ancestors): the router's other columns choose identity experts (LongCat-Flash's zero-computation
    experts). Returns the number of experts and what :func:`_find_experts` returns for it."""
    parts = router_owner.split(".")
    for depth in range(len(parts) - 1, max(len(parts) - 3, 0), -1):
        path = ".".join(parts[:depth])
        module = model.get_submodule(path)
        sizes = {p.shape[0] for p in module.parameters() if p.ndim == 3 and 1 < p.shape[0] < num_outputs}
        for size in sorted(sizes, reverse=True):
            try:
                found = _find_experts(model, router_owner, size, hidden)
            except LookupError:
                continue
            if _inside(found[0], path):  # not a bank further out (an attention indexer's linear is no router)
                return size, found
    raise LookupError


def _flat_stacks(module: nn.Module, block: str, router_owner: str, num_experts: int, hidden: int) -> list[list[str]]:
    """The 2-D parameters of ``module`` that stack E matrices of width H along their first axis
    (``[E*rows, H]``, as DBRX stores its experts), grouped by owner; only owners with two or more."""
    by_owner: dict[str, list[str]] = {}
    for name, p in module.named_parameters():
        if (
            p.ndim == 2
            and p.shape[1] == hidden
            and p.shape[0] % num_experts == 0
            and p.shape[0] > num_experts
            and not _inside(_join(block, name), router_owner)
        ):
            by_owner.setdefault(name.rpartition(".")[0], []).append(name)
    return [names for names in by_owner.values() if len(names) >= 2]


def _join(base: str, name: str) -> str:
    return f"{base}.{name}" if base and name else base or name


def _extract_activation(graph: _Graph, in_node: fx.Node, out_node: fx.Node, in_bias: fx.Node | None) -> fx.GraphModule:
    """The subgraph between the input projection's matmul (plus bias) and the output projection's matmul."""

    def matmul_after(param: fx.Node) -> fx.Node:
        for node in sorted(descendants([param]), key=graph.order.get):
            if _packet(node) in _MATMULS or (node.op == "call_function" and "mm" in str(node.target)):
                return node
        raise DetectionError("fused experts without a matmul on their weights")

    first, second = matmul_after(in_node), matmul_after(out_node)
    start = first
    if in_bias is not None:
        bias_users = descendants([in_bias])
        start = next(
            (
                u
                for u in sorted(first.users, key=graph.order.get)
                if u in bias_users and _packet(u) in (aten.add, aten.add_)
            ),
            first,
        )
    after_start = descendants([start])
    end = next((a for a in second.all_input_nodes if a in after_start), None)  # einsum's operands are a list
    if end is None:
        raise DetectionError("fused experts whose activation feeds the output projection indirectly")
    try:
        return extract_subgraph(graph.graph, [start], end, "ExpertActivation")
    except ValueError:
        raise DetectionError("the experts' activation depends on values other than the projection output") from None


def _gated_layout(bank: FusedExperts) -> str | None:
    """How gate and up rows pair in a gated bank, found by checking which pairing permutes without effect."""
    x = torch.randn(5, bank.in_proj.shape[2], generator=torch.Generator().manual_seed(0), dtype=bank.in_proj.dtype)
    perm = torch.randperm(bank.intermediate_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = bank.expert_forward(0, x)
        for layout in GATED_LAYOUTS:
            bank.layout = layout
            permuted = bank.with_experts([bank.ffn(0).units(perm)])
            if torch.allclose(permuted.expert_forward(0, x), reference, atol=1e-5, rtol=1e-4):
                return layout
    return None


def _fused_sources(
    graph: _Graph, module: nn.Module, block: str, names: list[str], hidden: int, num_experts: int,
    router_weight: str | None = None,
) -> tuple[list[FusedExpertsSource], int, bool]:  # fmt: skip
    """Candidate readings of a fused bank (several where shapes are ambiguous), its I, and whether it is gated.

    The stacked weights (``[E, rows, cols]``, or flat ``[E*rows, cols]``) are, in the order the block first
    uses them: the input projection, the up projection where it is stored apart, the output projection.
    Where they are the block's own parameters, the router is beside them: its ``[E, H]`` weight
    (``router_weight``) is no expert bias."""
    owner = names[0].rpartition(".")[0]
    absolute = {n: _join(block, n) for n in names}
    nodes = {n.target: n for n in graph.attr_nodes(_join(block, owner)) if n.target != router_weight}

    def first_use(name: str) -> int:  # registration order for weights no captured op uses (an opaque module's)
        node = nodes.get(absolute[name])
        return min((graph.order[u] for u in node.users), default=1 << 30) if node is not None else 1 << 30

    def stacked_shape(name: str) -> tuple[int, ...]:
        shape = tuple(module.get_parameter(name).shape)
        return (num_experts, shape[0] // num_experts, shape[1]) if len(shape) == 2 else shape

    if len(names) not in (2, 3):
        raise DetectionError(f"{block}: fused experts with {len(names)} stacked weights (expected 2 or 3)")
    ordered = sorted(names, key=first_use)
    in_name, up_name, out_name = ordered[0], ordered[1] if len(ordered) == 3 else None, ordered[-1]
    in_shape, out_shape = stacked_shape(in_name), stacked_shape(out_name)
    if up_name is not None and stacked_shape(up_name) != in_shape:
        raise DetectionError(f"{block}: stacked expert weights {in_shape} and {stacked_shape(up_name)} do not form "
                             "a gate and an up projection")  # fmt: skip
    flat = module.get_parameter(in_name).ndim == 2
    pair = 2 if up_name is not None else 1  # the up projection's rows follow the gate's
    out_options = [(False, out_shape[2])] if out_shape[1] == hidden else []
    out_options += [(True, out_shape[1])] if out_shape[2] == hidden else []
    in_options = [(False, pair * in_shape[1])] if in_shape[2] == hidden else []
    in_options += [(True, pair * in_shape[2])] if in_shape[1] == hidden else []
    biases = [
        n.target
        for n in nodes.values()
        if n.target not in absolute.values() and graph.attr(n)[1].ndim == 2 and graph.attr(n)[1].shape[0] == num_experts
    ]
    norms = {t: normed for t in biases if (normed := _output_norm(nodes[t])) is not None}
    if len(norms) > 1:
        raise DetectionError(f"{block}: fused experts with {len(norms)} per-expert output norms (expected 1 at most)")
    out_norm, normed = next(iter(norms.items()), (None, None))
    norm_eps = None if normed is None else normed.args[3] if len(normed.args) > 3 else normed.kwargs.get("eps")
    biases = [t for t in biases if t not in norms]
    biases.sort(key=lambda t: min((graph.order[u] for u in nodes[t].users), default=1 << 30))
    in_bias = out_bias = None
    if len(biases) == 2:
        in_bias, out_bias = biases
    elif len(biases) == 1:
        only = graph.attr(nodes[biases[0]])[1]
        in_bias, out_bias = (None, biases[0]) if only.shape[1] == hidden else (biases[0], None)
    in_node = nodes.get(absolute[in_name])
    if in_node is not None and in_node.users:
        if up_name is not None:
            raise DetectionError(f"{block}: traced fused experts with the gate and up projections stored apart, a "
                                 "layout moefx reads only where capture keeps the experts' loop opaque")  # fmt: skip
        act = _extract_activation(graph, in_node, nodes[absolute[out_name]], nodes[in_bias] if in_bias else None)
    else:
        act = _opaque_activation(module, block, owner)
    sources = []
    for in_t, units in in_options:
        for out_t, inter in out_options:
            if units not in (inter, 2 * inter):
                continue
            gated = units == 2 * inter
            sources.append(
                FusedExpertsSource(
                    in_name, out_name, in_bias and _relative(in_bias, block), out_bias and _relative(out_bias, block),
                    in_t, out_t, GatedActivation(act) if gated and up_name is not None else act,
                    "concat" if gated else None, up_name, flat, out_norm and _relative(out_norm, block), norm_eps,
                )
            )  # fmt: skip
    if not sources:
        raise DetectionError(f"{block}: stacked expert weights {in_shape} and {out_shape} do not form an FFN")
    inter = out_shape[2] if not sources[0].out_transposed else out_shape[1]
    return sources, inter, sources[0].layout is not None


def _output_norm(weight: fx.Node) -> fx.Node | None:
    """The RMSNorm without a weight of its own that the ``[E, H]`` tensor ``weight``, indexed by expert,
    multiplies (each expert's output norm, Ergo's); None where it is something else (an output bias)."""
    for indexed in weight.users:
        if _packet(indexed) not in (aten.index, aten.select, aten.embedding):
            continue
        for user in _reach(indexed, 3, _TRANSPARENT | {aten.unsqueeze}):
            if _packet(user) not in (aten.mul, aten.mul_):
                continue
            for operand in user.args:
                normed = _strip(operand, _TRANSPARENT)
                if _packet(normed) is aten.rms_norm and len(normed.args) > 2 and normed.args[2] is None:
                    return normed
    return None


def _opaque_activation(module: nn.Module, block: str, owner: str) -> nn.Module:
    """The activation of fused experts that run inside a module capture kept opaque (its loop over experts
    cannot be traced): the one module without parameters or buffers inside the weights' owner."""
    leaves = [
        m
        for m in module.get_submodule(owner).modules()
        if not any(True for _ in m.children()) and not any(True for _ in (*m.parameters(), *m.buffers()))
    ]
    if len(leaves) != 1:
        raise DetectionError(f"{block}: fused experts whose loop moefx cannot trace, with {len(leaves)} candidate "
                             "activation modules (expected 1)")  # fmt: skip
    return leaves[0]


def _shared_children(
    graph: _Graph, model: nn.Module, block: str, skip: set[str], routed: set[fx.Node]
) -> tuple[list[str], list[str], list[str]]:
    """Parameterised children of the block used in its forward: shared experts and shared-expert gates
    (which read the block's input), and the children applied to the routed experts' output (``routed``:
    the nodes computed from it)."""
    module = model.get_submodule(block)
    used = {_owner(n) for n in graph.nodes} | {n.target for n in graph.nodes if n.op in ("get_attr", "call_module")}
    owners_after = {_owner(n) for n in routed}
    experts, gates, after = [], [], []
    for name, child in module.named_children():
        path = _join(block, name)
        if name in skip or not any(True for _ in child.parameters()):
            continue
        if not any(_inside(u, path) for u in used):
            continue
        if any(_inside(owner, path) for owner in owners_after):
            after.append(name)
        elif isinstance(child, nn.Linear) and child.out_features == 1:
            gates.append(name)
        else:
            experts.append(name)
    return experts, gates, after


def _output_scale(graph: _Graph, block: str, hidden: int, routed: set[fx.Node], shared: list[str]) -> float:
    """The constant factor the block applies to its routed experts' summed output after the experts (Beam's
    routed scaling factor), 1.0 where there is none: the product of the multiplications by a number, inside
    the block, of ``[..., H]`` values computed from the experts' output weights (``routed``) but not from a
    shared expert's. (A factor on the shared experts' output too is not this; verification rejects that reading.)"""
    shared_weights = [n for path in shared for n in graph.attr_nodes(_join(block, path))]
    scale = 1.0
    for node in sorted(routed - descendants(shared_weights), key=graph.order.get):
        if (
            _packet(node) in (aten.mul, aten.mul_)
            and isinstance(node.args[1], (int, float))
            and _last_dim(node) == hidden
            and _inside(_owner(node), block)
        ):
            scale *= float(node.args[1])
    return scale


def _region(graph: _Graph, block: str) -> list[fx.Node]:
    """The captured nodes that module ``block`` computes, in graph order."""
    calls = {"call_function": _owner, "call_module": lambda n: n.target}  # a leaf module's call is its own
    return [n for n in graph.nodes if n.op in calls and _inside(calls[n.op](n), block)]


def _region_inputs(graph: _Graph, block: str) -> list[fx.Node]:
    """The tensors module ``block`` takes from outside it (its parameters and buffers aside), in graph order."""
    region = set(_region(graph, block))
    inputs = {
        a
        for n in region
        for a in n.all_input_nodes
        if a not in region and a.op != "get_attr" and isinstance(a.meta.get("val"), torch.Tensor)
    }
    return sorted(inputs, key=graph.order.get)


def _block_input(graph: _Graph, block: str) -> fx.Node:
    inputs = [a for a in _region_inputs(graph, block) if a.meta["val"].is_floating_point()]
    if len(inputs) != 1:
        raise DetectionError(f"{block}: an MoE block must take one hidden-states tensor, found {len(inputs)} inputs")
    return inputs[0]


@dataclasses.dataclass
class _Located:
    """Where a router's experts are: the block, its fused expert tensors or container, and their number; and
    the router weight's path and ``[outputs, hidden]`` shape."""

    block: str
    fused_names: list[str]
    container: str | None
    num_experts: int
    router_path: str
    num_outputs: int
    hidden: int

    @property
    def banks(self) -> set[str]:
        """The paths of the modules holding the experts."""
        names = [n.rpartition(".")[0] for n in self.fused_names] if self.container is None else [self.container]
        return {_join(self.block, n) for n in names}


def _locate(graph: _Graph, model: nn.Module, linear: fx.Node) -> _Located | None:
    """The experts beside the router ``linear``, or None where it has none."""
    weight_path, weight = _router_weight(graph, linear)
    num_outputs, hidden = weight.shape
    router_owner = weight_path.rpartition(".")[0]
    try:
        num_experts, found = num_outputs, _find_experts(model, router_owner, num_outputs, hidden)
    except LookupError:
        try:
            num_experts, found = _find_fewer_experts(model, router_owner, num_outputs, hidden)
        except LookupError:
            return None
    return _Located(*found, num_experts, weight_path, num_outputs, hidden)


def _describe_block(
    graph: _Graph, model: nn.Module, linear: fx.Node, selection: fx.Node, at: _Located, block_input: fx.Node
) -> MoEBlock:
    weight_path, num_outputs, hidden = at.router_path, at.num_outputs, at.hidden
    block, fused_names, container, num_experts = at.block, at.fused_names, at.container, at.num_experts
    reading = _read_routing(graph, linear, selection, block or type(model).__name__)
    spec, hashed = reading.spec, reading.hash_table
    bias_arg = linear.args[2] if len(linear.args) > 2 else None
    router_bias = graph.attr(bias_arg) if bias_arg is not None else None
    module = model.get_submodule(block)
    by_id = None if hashed is None else _token_id_routing(module, block, *hashed)
    top_children = {_relative(weight_path, block).split(".")[0]}
    common = dict(
        name=block, module=module, num_experts=num_experts, hidden_size=hidden, routing=spec,
        identity_experts=num_outputs - num_experts - spec.shared_columns,
        router_weight_path=_relative(weight_path, block),
        router_bias_path=None if router_bias is None else _relative(router_bias[0], block),
        correction_bias_path=reading.correction_bias, route_on_sequence=len(_shape(linear.args[0]) or ()) >= 3,
        token_id_routing=by_id,
        scale_parameter_path=reading.scale_parameter and _relative(reading.scale_parameter, block),
    )  # fmt: skip
    sources, intermediate, gated = _expert_sources(
        graph, module, block, container, fused_names, hidden, num_experts, weight_path
    )
    if container is not None:
        top_children.add(container.split(".")[0])
        out_weight = f".{sources[0].out_linear}.weight"
        out_weights = [n for n in graph.attr_nodes(_join(block, container)) if n.target.endswith(out_weight)]
        experts_path = _join(block, container)
    else:
        top_children.add(fused_names[0].split(".")[0])
        out_weights = graph.attr_nodes(_join(block, sources[0].out_proj))
        experts_path = _join(block, sources[0].out_proj)
    # modules captured opaque (expert loops) compute the experts' output without using its weights' nodes
    holders = [n for n in graph.nodes if n.op == "call_module" and _inside(experts_path, n.target)]
    if not out_weights and not holders:
        raise DetectionError(f"{block}: moefx cannot find where the captured graph computes the experts' output")
    routed = descendants(out_weights + holders)  # everything computed from the experts' output
    shared, gates, after = _shared_children(graph, model, block, top_children, routed)
    if len(after) > 1:
        raise DetectionError(f"{block}: modules {after} are applied to the experts' output; moefx reads one at most")
    common["output_norm"] = after[0] if after else None
    scale = _output_scale(graph, block, hidden, routed, shared)
    if scale != 1.0:
        common["routing"] = dataclasses.replace(spec, scale=spec.scale * scale)
    second_outputs, form = _output_form(module, hidden, block_input, by_id)
    candidates = [  # weights scaling the experts' inputs (Llama 4) last: the usual readings are tried first
        MoEBlock(
            **common, **form, intermediate_size=intermediate, experts_source=source, gated=gated,
            shared_experts=shared, shared_expert_gates=gates, second_output=second, scales_inputs=scales_inputs,
        )
        for scales_inputs in (False, True) for second in second_outputs for source in sources
    ]  # fmt: skip
    return _verified(candidates, form["input_ndim"])


def _expert_sources(
    graph: _Graph, module: nn.Module, block: str, container: str | None, fused_names: list[str], hidden: int,
    num_experts: int, router_weight: str,
) -> tuple[list[FusedExpertsSource | ModuleExpertsSource], int, bool]:  # fmt: skip
    """Candidate readings of the block's experts (a container of expert modules, or fused weights: see
    :func:`_fused_sources`), their I, and whether they are gated."""
    if container is None:
        return _fused_sources(graph, module, block, fused_names, hidden, num_experts, router_weight)
    experts = list(module.get_submodule(container).children())
    try:
        in_linears, out_linear, act = ffn_structure(experts[0], hidden)
    except ValueError as exc:
        raise DetectionError(f"{block}: {exc}") from None
    source = ModuleExpertsSource(container, in_linears, out_linear, act)
    return [source], experts[0].get_submodule(out_linear).in_features, len(in_linears) == 2


def _output_form(
    module: nn.Module, hidden: int, block_input: fx.Node, by_id: TokenIdRouting | None = None
) -> tuple[list[str | None], dict[str, Any]]:
    """What the block returns, found by running it: the second outputs to try (a pair's second is the
    router's weights or logits), and the MoEBlock fields ``input_ndim``, ``flattens_output`` and ``mask_key``."""
    ndim = len(_shape(block_input))
    x, ids = random_block_inputs(hidden, ndim, by_id)
    with torch.no_grad():
        probe = float32_reference(module)(x, **ids)
    second_outputs = ["weights", "logits"] if isinstance(probe, tuple) and len(probe) == 2 else [None]
    placeholders = {n.target for n in ancestors(block_input) if n.op == "placeholder"}
    decoder = placeholders & {"decoder_input_ids", "decoder_inputs_embeds"}
    form = {
        "input_ndim": ndim,
        "flattens_output": ndim == 3 and (probe[0] if isinstance(probe, tuple) else probe).ndim == 2,
        "mask_key": "decoder_attention_mask" if decoder else "attention_mask",
    }  # fmt: skip
    return second_outputs, form


def _verified(candidates: list[MoEBlock], ndim: int) -> MoEBlock:
    """The first candidate reading that reproduces its block, with its gated experts' row pairing read."""
    found = first_verified(candidates, ndim)
    src = found.experts_source
    if isinstance(src, FusedExpertsSource) and src.layout is not None:
        src.layout = _gated_layout(build_experts(float32_reference(found.module), found))
        if src.layout is None:
            raise DetectionError(f"{found.name}: gated experts whose gate/up row pairing moefx cannot determine")
    return found


def _routed_outside(graph: _Graph, model: nn.Module, bank: str) -> MoEBlock | None:
    """The reading of a fused expert bank whose module takes its routing as arguments, ``forward(hidden,
    index, weights)`` with the last two in either order (Gemma 4's and Zaya's experts, chosen by a router
    module beside them), or None where the bank's module is not called so. The router stays as it is."""
    module = model.get_submodule(bank)
    parameters = list(inspect.signature(module.forward).parameters.values())
    inputs = _region_inputs(graph, bank)
    indices = [a for a in inputs if not a.meta["val"].is_floating_point()]
    floats = [a for a in inputs if a.meta["val"].is_floating_point()]
    if len(parameters) != 3 or len(indices) != 1 or len(floats) != 2 or not isinstance(_last_dim(indices[0]), int):
        return None
    hidden_states = [a for a in floats if _shape(a) != _shape(indices[0])]
    if len(hidden_states) != 1:
        return None
    hidden, ndim = _last_dim(hidden_states[0]), len(_shape(hidden_states[0]))
    names = [name for name, p in module.named_parameters(recurse=False) if p.ndim == 3]
    num_experts = module.get_parameter(names[0]).shape[0]
    sources, intermediate, gated = _fused_sources(graph, module, bank, names, hidden, num_experts)
    arguments = (parameters[1].name, parameters[2].name)
    candidates = [
        MoEBlock(
            name=bank, module=module, num_experts=num_experts, hidden_size=hidden, intermediate_size=intermediate,
            routing=RoutingSpec(_last_dim(indices[0]), scoring="given"), router_weight_path=None,
            router_bias_path=None, correction_bias_path=None, experts_source=source, gated=gated, input_ndim=ndim,
            given_routing=GivenRouting(arguments, index_first),
        )
        for index_first in (True, False) for source in sources
    ]  # fmt: skip
    return _verified(candidates, ndim)


def _token_id_routing(
    module: nn.Module, block: str, table_path: str, table: torch.Tensor, ids: fx.Node
) -> TokenIdRouting:
    """Where a hash-routed block finds its table and token ids: the model input the ids come from must reach
    the block as the argument of that name."""
    accepted = list(inspect.signature(module.forward).parameters)
    if ids.op != "placeholder" or ids.name not in accepted:
        raise DetectionError(
            f"{block}: its experts are chosen by token id, but from {ids.name!r}, which the block's forward does not "
            f"take by that name (it takes {', '.join(accepted)})"
        )
    return TokenIdRouting(_relative(table_path, block), ids.name, table.shape[0])


def rebind(block: MoEBlock, model: nn.Module) -> MoEBlock:
    """``block``, detection's reading of a block in another module of the same structure (another decoder
    layer of one model), for ``model``'s block at the same path; verified against it as detection verifies
    its own readings (raises :class:`moefx.DetectionError` when it does not reproduce the block)."""
    return first_verified([dataclasses.replace(block, module=model.get_submodule(block.name))], block.input_ndim)


_OPAQUE_ROUTINGS = [("softmax", True), ("softmax", False), ("sigmoid", True), ("sigmoid", False)]


def _opaque_block(graph: _Graph, model: nn.Module, node: fx.Node) -> MoEBlock | None:
    """The MoE block a module captured opaque is, read from its structure and verified.

    A forward that sorts tokens by expert and splits them by Python counts (DeepSeek's reference
    ``moe_infer``) cannot be captured, so no router is seen in the graph. Such a module is read as a block
    where it holds a child linear ``[E, H]`` beside E experts (a container of expert modules, or fused
    weights) and nothing else with parameters: the top-k is one of its integer attributes, the routing a
    softmax or a sigmoid, renormalised or not, and the first reading that reproduces the module is taken.
    None where the module is not so built; a :class:`DetectionError` where it is and no reading reproduces it."""
    block = node.target
    module = model.get_submodule(block)
    parameterised = {n.split(".")[0] for n, _ in module.named_parameters()}
    for name, linear in module.named_children():
        if not isinstance(linear, nn.Linear):
            continue
        num_experts, hidden = linear.weight.shape
        top_ks = sorted({v for v in vars(module).values() if type(v) is int and 0 < v < num_experts})
        if not top_ks:
            continue
        try:  # searched within the module alone: its own experts
            found, fused_names, container = _find_experts(module, name, num_experts, hidden)
        except LookupError:
            continue
        experts = [container] if container is not None else fused_names
        if found != "" or parameterised != {n.split(".")[0] for n in [name, *experts]}:
            continue
        try:  # a module that does not run on the hidden states alone is no block moefx reads
            block_input = _block_input(graph, block)
            second_outputs, form = _output_form(module, hidden, block_input)
        except Exception:
            return None
        sources, intermediate, gated = _expert_sources(
            graph, module, block, container, fused_names, hidden, num_experts, _join(block, f"{name}.weight")
        )
        candidates = [
            MoEBlock(
                name=block, module=module, num_experts=num_experts, hidden_size=hidden, intermediate_size=intermediate,
                routing=RoutingSpec(top_k=k, scoring=scoring, normalize=normalize), router_weight_path=f"{name}.weight",
                router_bias_path=None if linear.bias is None else f"{name}.bias", correction_bias_path=None,
                experts_source=source, gated=gated, second_output=second, **form,
            )
            for k in top_ks for scoring, normalize in _OPAQUE_ROUTINGS for second in second_outputs
            for source in sources
        ]  # fmt: skip
        return _verified(candidates, form["input_ndim"])
    return None


class DetectMoEBlocks(PassBase):
    """Analysis pass: finds the MoE blocks of the model that ``gm`` was captured from.

    Matches router linears feeding an expert selection, with expert weights beside them (see the module
    docstring). Rewrites nothing; the blocks are in ``self.blocks`` after the pass runs.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.blocks: list[MoEBlock] = []
        self.routers_examined = 0

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = _Graph(graph_module)
        blocks: dict[str, MoEBlock] = {}
        read: set[str] = set()
        failures: list[tuple[DetectionError, set[str], bool]] = []  # with its banks, and whether a router was read
        for node in graph.nodes:
            found = _router_weight(graph, node)
            if found is None:
                continue
            self.routers_examined += 1
            selection = _selection(graph, node, found[1].shape[0])
            located = None if selection is None else _locate(graph, self.model, node)
            if located is None:
                continue
            try:
                block_input = _block_input(graph, located.block)
            except DetectionError as exc:  # router and experts are parts of a larger module (Gemma 4's layer)
                failures.append((exc, located.banks, False))
                continue
            try:
                block = _describe_block(graph, self.model, node, selection, located, block_input)
            except DetectionError as exc:
                failures.append((exc, located.banks, True))
                continue
            read |= located.banks
            blocks.setdefault(block.name, block)
        given_read = set()
        for bank in unread_expert_banks(self.model, list(blocks)):
            try:
                block = _routed_outside(graph, self.model, bank)
            except DetectionError:  # not such experts after all: the router's failure, or the unread-bank warning
                block = None
            if block is not None:
                given_read.add(bank)
                blocks[bank] = block
        # modules captured opaque, in no block read above (torch.export's _guards_fn is a call_module of no module)
        modules, tried = dict(self.model.named_modules()), set()
        for node in graph.nodes:
            if (
                node.op == "call_module"
                and node.target in modules
                and node.target not in tried
                and not any(_inside(node.target, b) or _inside(b, node.target) for b in blocks)
            ):
                tried.add(node.target)
                block = _opaque_block(graph, self.model, node)
                if block is not None:
                    blocks[block.name] = block
        # a linear that merely feeds a top-k (Qwen4-Exp's hyper-connections) fails beside experts a router reads
        for exc, banks, unread_router in failures:
            if not banks <= read | given_read:
                raise exc
            if unread_router and banks & given_read:
                warnings.warn(f"{exc}; its experts are compressed as routed by that router, left as it is",
                              MoefxWarning, stacklevel=2)  # fmt: skip
        first_node = {name: graph.order[_region(graph, name)[0]] for name in blocks}
        self.blocks = sorted(blocks.values(), key=lambda b: first_node[b.name])
        return PassResult(graph_module, False)


def unread_expert_banks(model: nn.Module, blocks: list[str]) -> list[str]:
    """Modules outside the ``blocks`` (paths) that hold a fused expert bank (two or more 3-D parameters
    sharing a leading expert dimension) whose experts no router that detection reads selects (a routing it
    does not know). They are left as they are."""
    found = []
    for name, module in model.named_modules():
        leading = [p.shape[0] for p in module.parameters(recurse=False) if p.ndim == 3]
        if len(leading) >= 2 and len(set(leading)) == 1 and leading[0] > 1:
            if not any(_inside(name, block) for block in blocks):
                found.append(name)
    return found


def warn_unread_expert_banks(model: nn.Module, blocks: list[str], prefix: str = "") -> None:
    """A :class:`moefx.MoefxWarning` naming the expert banks of :func:`unread_expert_banks`, if any."""
    unread = [_join(prefix, name) for name in unread_expert_banks(model, blocks)]
    if unread:
        warnings.warn(
            f"{', '.join(unread)}: expert weights that no router moefx can read selects (experts chosen by "
            "token id?); left as they are",
            MoefxWarning,
            stacklevel=3,
        )


def find_moe_blocks(
    model: nn.Module, example_inputs: Any, graph_module: fx.GraphModule | None = None
) -> list[MoEBlock]:
    """The MoE blocks of ``model``, in execution order.

    ``example_inputs`` is a tensor, tuple or dict of keyword arguments that the model runs on (batch and
    sequence length of at least 2). Pass ``graph_module`` to reuse a capture from :func:`moefx.trace`.
    Raises :class:`moefx.DetectionError` when the model has no MoE block.
    """
    gm = graph_module if graph_module is not None else trace(model, example_inputs)
    detect = DetectMoEBlocks(model)
    detect(gm)
    if not detect.blocks:
        raise DetectionError(
            f"no MoE block found in {type(model).__name__}: searched {detect.routers_examined} linear layers for a "
            "router (a linear whose outputs feed a top-k or argmax expert selection) with expert weights beside it "
            "(3-D parameters with a leading expert dimension, 2-D ones stacking the experts, or a container of "
            "expert modules); "
            "moefx compresses Mixture-of-Experts models only"
        )
    warn_unread_expert_banks(model, [b.name for b in detect.blocks])
    return detect.blocks
