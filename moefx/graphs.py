"""Small helpers over ``torch.fx`` graphs shared by the passes."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import fx, nn

_DTYPE_CASTS = (torch.ops.aten.to, torch.ops.aten._to_copy)


def descendants(starts: Iterable[fx.Node]) -> set[fx.Node]:
    """Every node that (transitively) uses one of ``starts``."""
    seen, stack = set(), list(starts)
    while stack:
        for user in stack.pop().users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return seen


def ancestors(node: fx.Node) -> set[fx.Node]:
    """Every node that ``node`` (transitively) reads."""
    seen, stack = set(), [node]
    while stack:
        for arg in stack.pop().all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                stack.append(arg)
    return seen


def extract_subgraph(graph: fx.Graph, inputs: list[fx.Node], output: fx.Node, class_name: str) -> fx.GraphModule:
    """The computation from ``inputs`` to ``output`` as a GraphModule with one placeholder per input.

    Dtype casts are dropped (the caller computes in its weights' dtype). Raises ``ValueError`` when the
    region reads any value other than the inputs (a parameter, say).
    """
    after = descendants(inputs)
    before = ancestors(output)
    region = [n for n in graph.nodes if n in after and (n is output or n in before)]
    g = fx.Graph()
    env = {node: g.placeholder(f"x{i}") for i, node in enumerate(inputs)}
    for node in region:
        if node in env:
            continue
        if any(a not in env for a in node.all_input_nodes):
            raise ValueError(f"{class_name}: the computation reads values other than its inputs")
        target = getattr(node.target, "overloadpacket", None)
        if target in _DTYPE_CASTS and len(node.all_input_nodes) == 1:
            env[node] = env[node.all_input_nodes[0]]
            continue
        env[node] = g.node_copy(node, env.__getitem__)
    g.output(env[output])
    return fx.GraphModule(nn.Module(), g, class_name=class_name)
