"""Complex views: rewrite data-movement ops on complex tensors as the same ops on their real pairs.

``torch.onnx`` represents a complex tensor as a real one with a trailing axis of 2 (real, imaginary) and
translates complex multiplication, ``view_as_real`` and the common views (permute, transpose, slice, …),
but not ``unsqueeze``, ``select``, ``expand`` or ``index_select`` of a complex tensor. Complex RoPE
(DeepSeek-V2's ``freqs_cis.unsqueeze(1)``) needs one of them. Each such op only moves elements, so it
equals the op on ``view_as_real(x)``, with its dimension counted past the pair axis, viewed back as complex.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

_aten = torch.ops.aten


def _shift_dim(args: tuple, ndim: int) -> tuple:
    """args[1] is a dimension of the complex tensor: as a dimension of its real view."""
    dim = args[1] if args[1] >= 0 else args[1] + ndim
    return (args[0], dim, *args[2:])


def _pair_size(args: tuple, ndim: int) -> tuple:
    """args[1] is a size list of the complex result: the real view's size list ends in the pair axis."""
    return (args[0], [*args[1], 2], *args[2:])


# op -> its arguments on the real view, given the rank a negative dim counts from (the result's for
# unsqueeze, which adds an axis, otherwise the input's)
_REAL_ARGS = {
    _aten.unsqueeze.default: _shift_dim,
    _aten.select.int: _shift_dim,
    _aten.index_select.default: _shift_dim,
    _aten.expand.default: _pair_size,
}


def _value(node: fx.Node) -> object:
    return node.meta["val"]


def _is_complex(value: object) -> bool:
    known = isinstance(value, fx.Node) and isinstance(value.meta.get("val"), torch.Tensor)
    return known and value.meta["val"].is_complex()


class ComplexViewsAsReal(PassBase):
    """Matches ``unsqueeze``, ``select``, ``expand`` and ``index_select`` calls on a complex tensor (in an
    exported program's ATen graph). Rewrites each as ``view_as_complex(op(view_as_real(x), args'))``, the
    arguments counted on the real view, so that ``torch.onnx`` can translate it. Node metadata (``val``)
    is computed for every new node."""

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        matched = [n for n in graph.nodes if n.target in _REAL_ARGS and _is_complex(n.args[0])]
        for node in matched:
            source = node.args[0]
            ndim = node.meta["val"].ndim if node.target is _aten.unsqueeze.default else source.meta["val"].ndim
            real_args = _REAL_ARGS[node.target](node.args, ndim)
            with graph.inserting_before(node):
                pairs = graph.call_function(_aten.view_as_real.default, (source,))
                moved = graph.call_function(node.target, (pairs, *real_args[1:]), dict(node.kwargs))
                back = graph.call_function(_aten.view_as_complex.default, (moved,))
            pairs.meta["val"] = _aten.view_as_real.default(source.meta["val"])
            moved.meta["val"] = node.target(pairs.meta["val"], *fx.node.map_arg(real_args[1:], _value), **node.kwargs)
            back.meta["val"] = _aten.view_as_complex.default(moved.meta["val"])
            for new in (pairs, moved, back):
                new.meta["stack_trace"] = node.meta.get("stack_trace")
            node.replace_all_uses_with(back)
            graph.erase_node(node)
        if matched:
            graph.lint()
            graph_module.recompile()
        return PassResult(graph_module, bool(matched))
