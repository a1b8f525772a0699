"""Expert banks: the experts of one MoE block, held as real weights and run as one module.

Both banks take ``(tokens [T, H], index [T, k], weights [T, k])`` and return ``[T, H]``: the sum over a
token's k slots of ``weight * expert(token)``, where index ``-1`` contributes nothing. Each expert is run
once on the tokens routed to it (a static loop over experts with a data-dependent gather, which eager
PyTorch, torch.export and ONNX all handle).

* :class:`FusedExperts` holds stacked weights ``in_proj [E, U, H]`` and ``out_proj [E, H, I]`` in
  ``nn.Linear`` layout (out, in), optional biases, and the activation that maps ``[n, U]`` to ``[n, I]``
  as a small module (for gated experts ``U = 2I``, with the gate and up rows paired as ``layout`` says).
* :class:`ModuleExperts` holds E expert modules of the user's own class.

Both expose each expert as an :class:`FFN`, the view that alignment and merging work on.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from moefx.graphs import extract_subgraph

GATED_LAYOUTS = ("concat", "interleaved")


@dataclass
class FFN:
    """One expert's weights, in ``nn.Linear`` layout.

    ``in_weights`` are the matrices applied to the token (``[I, H]`` each: gate and up for a gated FFN, one
    for a plain FFN), ``in_biases`` their biases (or None), ``out_weight`` is ``[H, I]``. ``out_norm``, where
    the expert ends in its own RMSNorm (Ergo's), is that norm's ``[H]`` weight, and ``norm_eps`` its epsilon.
    The hidden units (the I dimension) can be permuted without changing the function: rows of every input
    matrix and bias, columns of the output matrix.
    """

    in_weights: list[torch.Tensor]
    in_biases: list[torch.Tensor | None]
    out_weight: torch.Tensor
    out_bias: torch.Tensor | None
    out_norm: torch.Tensor | None = None
    norm_eps: float | None = None

    @property
    def hidden_units(self) -> int:
        return self.out_weight.shape[1]

    def units(self, index: torch.Tensor) -> FFN:
        """The FFN of the hidden units ``index`` (a permutation of all of them computes the same function)."""
        return dataclasses.replace(
            self,
            in_weights=[w[index] for w in self.in_weights],
            in_biases=[None if b is None else b[index] for b in self.in_biases],
            out_weight=self.out_weight[:, index],
        )

    @staticmethod
    def concatenated(ffns: list[FFN]) -> FFN:
        """One FFN with every hidden unit of ``ffns``, in order; its output bias and norm are the first's."""
        return dataclasses.replace(
            ffns[0],
            in_weights=[torch.cat(parts) for parts in zip(*(f.in_weights for f in ffns), strict=True)],
            in_biases=[
                None if parts[0] is None else torch.cat(parts)
                for parts in zip(*(f.in_biases for f in ffns), strict=True)
            ],
            out_weight=torch.cat([f.out_weight for f in ffns], dim=1),
        )

    def tensors(self) -> list[torch.Tensor | None]:
        return [*self.in_weights, *self.in_biases, self.out_weight, self.out_bias, self.out_norm]

    @staticmethod
    def weighted_sum(ffns: list[FFN], coefficients: list[float]) -> FFN:
        """``sum_i c_i * ffn_i``, tensor by tensor (the merge of aligned experts)."""

        def combine(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
            if parts[0] is None:
                return None
            acc = torch.zeros_like(parts[0], dtype=torch.float32)
            for c, p in zip(coefficients, parts, strict=True):
                acc += c * p.float()
            return acc.to(parts[0].dtype)

        n_in = len(ffns[0].in_weights)
        columns = list(zip(*(f.tensors() for f in ffns), strict=True))
        merged = [combine(list(col)) for col in columns]
        return FFN(merged[:n_in], merged[n_in : 2 * n_in], *merged[2 * n_in :], norm_eps=ffns[0].norm_eps)


def rms_normed(y: torch.Tensor, weight: torch.Tensor | None, eps: float | None) -> torch.Tensor:
    """``y`` through an RMSNorm of ``weight`` (computed in float32, as transformers' norms are), or ``y`` itself
    where ``weight`` is None."""
    if weight is None:
        return y
    return (F.rms_norm(y.float(), (y.shape[-1],), eps=eps) * weight.float()).to(y.dtype)


def dispatch(
    expert_forward: Callable[[int, torch.Tensor], torch.Tensor],
    num_experts: int,
    tokens: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
    observe: Callable[..., None] | None = None,
) -> torch.Tensor:
    """``out[t] = sum_j weights[t, j] * expert_{index[t, j]}(tokens[t])``, each expert run once on its tokens.

    ``observe(e, token, slot, x, y)``, if given, sees each expert's routed tokens, inputs and outputs.
    """
    out = torch.zeros_like(tokens)
    for e in range(num_experts):
        token, slot = torch.where(index == e)
        x = tokens[token]
        y = expert_forward(e, x)
        if observe is not None:
            observe(e, token, slot, x, y)
        out.index_add_(0, token, (y * weights[token, slot, None]).to(out.dtype))
    return out


def per_slot_rows(
    tokens: torch.Tensor, index: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Experts whose inputs the routing weights scale (Llama 4's), posed as a bank whose outputs they scale:
    one row ``weights[t, j] * tokens[t]`` per (token, slot), routed to that slot's expert with weight 1.
    Returns ``(rows [T*k, H], index [T*k, 1], weights [T*k, 1])``; :func:`sum_slots` undoes the rows."""
    rows = (tokens.unsqueeze(1) * weights.unsqueeze(-1).to(tokens.dtype)).flatten(0, 1)
    return rows, index.reshape(-1, 1), torch.ones_like(weights).reshape(-1, 1)


def sum_slots(row_outputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``[T*k, H]`` outputs of :func:`per_slot_rows`' rows summed to ``[T, H]`` (``index``: the ``[T, k]``
    selection the rows were made from)."""
    return row_outputs.unflatten(0, index.shape).sum(dim=1)


class FusedExperts(nn.Module):
    """E FFN experts stored as stacked tensors: ``act(x @ in_proj[e].T + in_bias[e]) @ out_proj[e].T + out_bias[e]``,
    through an RMSNorm of weight ``out_norm[e]`` where the experts have their own output norms."""

    def __init__(
        self,
        in_proj: torch.Tensor,
        out_proj: torch.Tensor,
        act: nn.Module,
        in_bias: torch.Tensor | None = None,
        out_bias: torch.Tensor | None = None,
        layout: str | None = None,
        out_norm: torch.Tensor | None = None,
        norm_eps: float | None = None,
    ) -> None:
        super().__init__()
        if layout is not None and layout not in GATED_LAYOUTS:
            raise ValueError(f"layout must be one of {GATED_LAYOUTS} or None, not {layout!r}")
        self.in_proj = _as_parameter(in_proj)
        self.out_proj = _as_parameter(out_proj)
        self.in_bias = None if in_bias is None else _as_parameter(in_bias)
        self.out_bias = None if out_bias is None else _as_parameter(out_bias)
        self.out_norm = None if out_norm is None else _as_parameter(out_norm)
        self.norm_eps = norm_eps
        self.act = act
        self.layout = layout

    @property
    def num_experts(self) -> int:
        return self.in_proj.shape[0]

    @property
    def intermediate_size(self) -> int:
        return self.out_proj.shape[2]

    def expert_hidden(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e``'s hidden activation (the output projection's input)."""
        return self.act(F.linear(x, self.in_proj[e], None if self.in_bias is None else self.in_bias[e]))

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self.expert_hidden(e, x), self.out_proj[e], None if self.out_bias is None else self.out_bias[e])
        return rms_normed(y, None if self.out_norm is None else self.out_norm[e], self.norm_eps)

    def forward(self, tokens: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return dispatch(self.expert_forward, self.num_experts, tokens, index, weights)

    def expert_flops(self, e: int) -> int:
        """FLOPs (2 per multiply-accumulate) of expert ``e`` for one token, matmuls only."""
        return 2 * (self.in_proj[e].numel() + self.out_proj[e].numel())

    def _in_rows(self) -> list[slice]:
        """The rows of ``in_proj`` belonging to each input matrix (gate, up), in hidden-unit order (slices, so
        that an expert's :class:`FFN` is a view of the bank, not a copy)."""
        size = self.intermediate_size
        if self.layout == "concat":
            return [slice(0, size), slice(size, 2 * size)]
        if self.layout == "interleaved":
            return [slice(0, None, 2), slice(1, None, 2)]
        return [slice(None)]

    def ffn(self, e: int) -> FFN:
        rows = self._in_rows()
        return FFN(
            [self.in_proj[e][r] for r in rows],
            [None if self.in_bias is None else self.in_bias[e][r] for r in rows],
            self.out_proj[e],
            None if self.out_bias is None else self.out_bias[e],
            None if self.out_norm is None else self.out_norm[e],
            self.norm_eps,
        )

    def with_experts(self, ffns: list[FFN], templates: list[int] | None = None) -> FusedExperts:
        """A new bank of the same kind holding ``ffns`` (shares the activation module; ``templates`` unused)."""
        rows = self._in_rows()
        in_size = self.in_proj.shape[1]

        def stack_in(parts: list[list[torch.Tensor]]) -> torch.Tensor:
            first = parts[0][0]
            stacked = first.new_empty((len(parts), in_size, *first.shape[1:]))  # filled in place: no second copy
            for g, per_matrix in enumerate(parts):
                for r, part in zip(rows, per_matrix, strict=True):
                    stacked[g, r] = part.detach()
            return stacked

        has_in_bias = self.in_bias is not None
        return FusedExperts(
            stack_in([f.in_weights for f in ffns]),
            torch.stack([f.out_weight for f in ffns]),
            self.act,
            stack_in([f.in_biases for f in ffns]) if has_in_bias else None,
            torch.stack([f.out_bias for f in ffns]) if self.out_bias is not None else None,
            self.layout,
            torch.stack([f.out_norm for f in ffns]) if self.out_norm is not None else None,
            self.norm_eps,
        )

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden={self.out_proj.shape[1]}, "
            f"intermediate={self.intermediate_size}, layout={self.layout}, bias={self.in_bias is not None}, "
            f"out_norm={self.out_norm is not None}"
        )


class ModuleExperts(nn.Module):
    """E expert modules of the model's own class, each run on the tokens routed to it."""

    def __init__(self, experts: list[nn.Module], in_linears: list[str], out_linear: str, act: nn.Module) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.in_linears = list(in_linears)
        self.out_linear = out_linear
        self.act = act  # the activation between the linears (one argument per input linear), for analysis

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def intermediate_size(self) -> int:
        return self.experts[0].get_submodule(self.out_linear).in_features

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.experts[e](x)

    def expert_hidden(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e``'s hidden activation (the output linear's input), through the extracted activation."""
        expert = self.experts[e]
        return self.act(*[expert.get_submodule(name)(x) for name in self.in_linears])

    def forward(self, tokens: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return dispatch(self.expert_forward, self.num_experts, tokens, index, weights)

    def expert_flops(self, e: int) -> int:
        """FLOPs (2 per multiply-accumulate) of expert ``e`` for one token, matmuls only."""
        return 2 * sum(w.numel() for w in (*self.ffn(e).in_weights, self.ffn(e).out_weight))

    def ffn(self, e: int) -> FFN:
        expert = self.experts[e]
        ins = [expert.get_submodule(name) for name in self.in_linears]
        out = expert.get_submodule(self.out_linear)
        return FFN([m.weight for m in ins], [m.bias for m in ins], out.weight, out.bias)

    def with_experts(self, ffns: list[FFN], templates: list[int] | None = None) -> ModuleExperts:
        """A new bank of copies of expert ``templates[i]`` (default: expert i) carrying ``ffns[i]``'s weights."""
        experts = []
        for i, f in enumerate(ffns):
            expert = copy.deepcopy(self.experts[i if templates is None else templates[i]])
            for name, w, b in zip(self.in_linears, f.in_weights, f.in_biases, strict=True):
                _set_linear(expert.get_submodule(name), w, b)
            _set_linear(expert.get_submodule(self.out_linear), f.out_weight, f.out_bias)
            experts.append(expert)
        return ModuleExperts(experts, self.in_linears, self.out_linear, self.act)


class GatedActivation(nn.Module):
    """``act(gate) * up`` on ``[n, 2I]`` holding the gate's I columns, then the up projection's: the activation
    of a fused bank read from experts that store their gate and up projections apart."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.act = act

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate, up = hidden.chunk(2, dim=-1)
        return self.act(gate) * up


def _as_parameter(t: torch.Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t.detach(), requires_grad=t.requires_grad)


def _set_linear(linear: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    linear.weight = _as_parameter(weight.detach().clone())
    if bias is not None:
        linear.bias = _as_parameter(bias.detach().clone())
    if hasattr(linear, "in_features"):
        linear.in_features, linear.out_features = weight.shape[1], weight.shape[0]


def ffn_structure(expert: nn.Module, hidden: int) -> tuple[list[str], str, fx.GraphModule]:
    """An expert module's input linears (applied to the token), output linear, and activation between them.

    The expert is captured with torch.export on a ``[n, hidden]`` input: linears fed by the input are input
    linears, the linear whose result is returned is the output linear, and the activation is the
    subgraph from the input linears' outputs to the output linear's input (one argument per input linear).
    Raises ``ValueError`` when the expert is not such an FFN.
    """
    name = type(expert).__name__
    try:
        sample = torch.randn(3, hidden, dtype=next(expert.parameters()).dtype)
        graph = torch.export.export(copy.deepcopy(expert).eval(), (sample,), strict=False).module().graph
    except Exception as exc:
        raise ValueError(f"cannot capture expert {name}: {str(exc).splitlines()[0]}") from None
    linear_of = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.linear.default:
            weight = node.args[1]
            owner = weight.target.rpartition(".")[0] if weight.op == "get_attr" else None
            if owner is not None and isinstance(expert.get_submodule(owner), nn.Linear):
                linear_of[node] = owner
    placeholder = next(n for n in graph.nodes if n.op == "placeholder")
    output = next(n for n in graph.nodes if n.op == "output")

    def reaches(start: fx.Node, goal: fx.Node) -> bool:
        stack, seen = [start], set()
        while stack:
            n = stack.pop()
            if n is goal:
                return True
            if n in seen or (n is not start and n in linear_of):
                continue
            seen.add(n)
            stack.extend(n.users)
        return False

    ins = [n for n in linear_of if reaches(placeholder, n)]
    outs = [n for n in linear_of if reaches(n, output)]
    if len(outs) != 1 or not 1 <= len(ins) <= 2 or outs[0] in ins:
        raise ValueError(f"expert {name} is not a one- or two-input-linear FFN")
    in_names, out_name = [linear_of[n] for n in ins], linear_of[outs[0]]
    if {expert.get_submodule(n).out_features for n in in_names} != {expert.get_submodule(out_name).in_features}:
        raise ValueError(f"expert {name}: input and output linears disagree on the hidden width")
    act = extract_subgraph(graph, ins, outs[0].args[0], "ExpertActivation")
    return in_names, out_name, act
