"""The MoE block descriptor and moefx's canonical block graph.

Detection (``moefx.passes.detect``) describes every MoE block it finds as an :class:`MoEBlock`: where the
router, experts and shared experts live inside the block module, and the routing semantics. From that
description :func:`build_block` makes the block's *canonical form*, a ``torch.fx.GraphModule`` that the
compression passes rewrite::

    hidden_states -> reshape to tokens -> router (nn.Linear, E outputs) -> select_experts -> (weights, index)
        -> experts (FusedExperts | ModuleExperts) -> [+ shared experts] -> reshape back -> output

A block routed outside itself (its module takes the weights and indices as arguments) has no router: its
selection is ``given_routing`` on those arguments. Every node is a meaningful step (the router, the
selection, the experts), so a pass can find and replace one by name. The canonical form is checked
against the original module before it is used.
"""

from __future__ import annotations

import copy
import inspect
import math
import operator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from moefx.errors import DetectionError, first_line
from moefx.experts import FusedExperts, ModuleExperts, per_slot_rows, sum_slots
from moefx.routing import RoutingSpec, given_routing, select_experts, split_identity_experts, split_shared_columns

BLOCK_TOLERANCE = 1e-5


@dataclass
class FusedExpertsSource:
    """Where a fused expert bank's tensors live, relative to the block, and how they are laid out."""

    in_proj: str
    out_proj: str
    in_bias: str | None
    out_bias: str | None
    in_transposed: bool  # stored [E, in, out] rather than nn.Linear's [E, out, in]
    out_transposed: bool
    act: nn.Module  # maps the input projection's output [n, U] to [n, I]
    layout: str | None  # "concat" / "interleaved" pairing of gate and up rows, None for a plain FFN
    up_proj: str | None = None  # the up projection where it is stored apart (after the gate's rows: "concat")
    flat: bool = False  # stored 2-D, the experts' matrices stacked along the first axis ([E*rows, cols])
    out_norm: str | None = None  # [E, H]: each expert's own RMSNorm weight, applied to its output (Ergo)
    norm_eps: float | None = None


@dataclass
class ModuleExpertsSource:
    """Where a bank of separate expert modules lives, relative to the block, and its FFN structure."""

    container: str
    in_linears: list[str]
    out_linear: str
    act: nn.Module  # the activation between the linears, one argument per input linear


@dataclass(frozen=True)
class TokenIdRouting:
    """Where a hash-routed block (experts chosen by token id) finds its table and the token ids."""

    table: str  # the [V, k] table of expert indices, relative to the block
    argument: str  # the block's forward argument that carries the token ids
    vocab_size: int  # V


@dataclass(frozen=True)
class GivenRouting:
    """How a block routed outside itself (its module takes the routing as arguments: Gemma 4's and Zaya's
    experts) is called: its forward's arguments after the hidden states, in order, and whether the first is
    the expert indices (the other is their weights)."""

    arguments: tuple[str, str]
    index_first: bool

    @property
    def index(self) -> str:
        return self.arguments[0 if self.index_first else 1]

    @property
    def weights(self) -> str:
        return self.arguments[1 if self.index_first else 0]

    def random_inputs(self, num_tokens: int, num_experts: int, top_k: int, seed: int) -> dict[str, torch.Tensor]:
        """Random routing arguments: k distinct experts per token, weights in [0, 1)."""
        g = torch.Generator().manual_seed(seed)
        index = torch.rand(num_tokens, num_experts, generator=g).argsort(dim=-1)[:, :top_k]
        return {self.index: index, self.weights: torch.rand(num_tokens, top_k, generator=g)}


@dataclass
class MoEBlock:
    """One MoE block of a model, as detection found it.

    ``name`` is the block's module path (e.g. ``model.layers.3.mlp``) and ``module`` the block itself
    (None in the copy a canonical block keeps in ``meta["moefx_block"]``). Other paths are relative to
    it. ``router_weight`` and ``experts`` give handles to the weights.
    """

    name: str
    module: nn.Module | None
    num_experts: int
    hidden_size: int
    intermediate_size: int
    routing: RoutingSpec
    router_weight_path: str | None  # None where the block is routed outside itself (``given_routing``)
    router_bias_path: str | None
    correction_bias_path: str | None
    experts_source: FusedExpertsSource | ModuleExpertsSource
    gated: bool
    shared_experts: list[str] = field(default_factory=list)
    shared_expert_gates: list[str] = field(default_factory=list)
    output_norm: str | None = None  # a module applied to the summed output (A.X-K1's post-MLP norm)
    route_on_sequence: bool = False  # the router sees [batch, seq, H] (capacity is counted per sequence)
    second_output: str | None = None  # the block returns (hidden, this): "weights" or "logits" of the router
    scales_inputs: bool = False  # the routing weights multiply each expert's input, not its output (Llama 4)
    mask_key: str = "attention_mask"  # the model input that marks this block's padding tokens
    input_ndim: int = 3  # the rank of the block's input: [batch, seq, H] or [tokens, H]
    flattens_output: bool = False  # returns [tokens, H] for a [batch, seq, H] input (Llama 4)
    identity_experts: int = 0  # router columns after the experts' that pass the token through (LongCat-Flash)
    token_id_routing: TokenIdRouting | None = None  # where ``routing.hash_routed`` looks experts up
    scale_parameter_path: str | None = None  # a learned scalar folded into ``routing.scale`` (kept as it is)
    given_routing: GivenRouting | None = None  # the block takes its weights and indices from a router outside it

    @property
    def top_k(self) -> int:
        return self.routing.top_k

    @property
    def scoring(self) -> str:
        return self.routing.scoring

    @property
    def extra_router_outputs(self) -> int:
        """The router's outputs after its experts' (identity experts', or shared experts' scores)."""
        return self.identity_experts + self.routing.shared_columns

    @property
    def experts_kind(self) -> str:
        return "fused" if isinstance(self.experts_source, FusedExpertsSource) else "modules"

    @property
    def router_weight(self) -> torch.Tensor | None:
        return None if self.router_weight_path is None else _get_tensor(self.module, self.router_weight_path)

    @property
    def experts(self) -> nn.Module:
        """The module holding the expert weights (the fused experts module or the container of experts)."""
        src = self.experts_source
        path = src.container if isinstance(src, ModuleExpertsSource) else src.in_proj.rpartition(".")[0]
        return self.module.get_submodule(path)

    @property
    def experts_bias(self) -> bool:
        src = self.experts_source
        if isinstance(src, FusedExpertsSource):
            return src.in_bias is not None
        first = next(self.module.get_submodule(src.container).children())
        linear = first.get_submodule(src.out_linear)
        return linear.bias is not None


def _get_tensor(root: nn.Module, path: str) -> torch.Tensor:
    owner, _, attr = path.rpartition(".")
    return getattr(root.get_submodule(owner), attr)


def build_experts(module: nn.Module, block: MoEBlock) -> FusedExperts | ModuleExperts:
    """The block's experts as a bank, sharing weights with ``module`` where the layout allows."""
    src = block.experts_source
    if isinstance(src, ModuleExpertsSource):
        experts = list(module.get_submodule(src.container).children())
        return ModuleExperts(experts, src.in_linears, src.out_linear, src.act)

    def linear_layout(path: str, transposed: bool) -> torch.Tensor:
        t = _get_tensor(module, path)
        t = t.view(block.num_experts, -1, t.shape[1]) if src.flat else t
        return t.transpose(1, 2).contiguous() if transposed else t

    in_proj = linear_layout(src.in_proj, src.in_transposed)
    if src.up_proj is not None:
        in_proj = torch.cat([in_proj, linear_layout(src.up_proj, src.in_transposed)], dim=1)
    return FusedExperts(
        in_proj,
        linear_layout(src.out_proj, src.out_transposed),
        src.act,
        None if src.in_bias is None else _get_tensor(module, src.in_bias),
        None if src.out_bias is None else _get_tensor(module, src.out_bias),
        src.layout,
        None if src.out_norm is None else _get_tensor(module, src.out_norm),
        src.norm_eps,
    )


def build_router(module: nn.Module, block: MoEBlock) -> nn.Linear:
    """An ``nn.Linear`` router that shares its weight (and bias) with the block's router."""
    weight = _get_tensor(module, block.router_weight_path)
    bias = None if block.router_bias_path is None else _get_tensor(module, block.router_bias_path)
    router = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    router.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
    if bias is not None:
        router.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
    return router


class BlockRoot(nn.Module):
    """Holder of a canonical block's submodules while its graph is built."""


def build_block(module: nn.Module, block: MoEBlock) -> torch.fx.GraphModule:
    """The canonical GraphModule of ``module`` (the block itself, or a copy of it) described by ``block``."""
    root = BlockRoot()
    if block.given_routing is None:
        root.router = build_router(module, block)
    root.experts = build_experts(module, block)
    if block.correction_bias_path is not None:
        root.register_buffer("correction_bias", _get_tensor(module, block.correction_bias_path).detach())
    for i, path in enumerate(block.shared_experts):
        root.add_module(f"shared_expert_{i}", module.get_submodule(path))
    for i, path in enumerate(block.shared_expert_gates):
        root.add_module(f"shared_expert_gate_{i}", module.get_submodule(path))
    if block.output_norm is not None:
        root.add_module("output_norm", module.get_submodule(block.output_norm))
    if block.token_id_routing is not None:
        root.register_buffer("hash_table", _get_tensor(module, block.token_id_routing.table))

    g = torch.fx.Graph()
    hidden_states = g.placeholder("hidden_states")
    given = block.given_routing
    if given is None:
        # accepted as the block accepts them; unused (verified) but for a hash-routed block's token ids
        optional = {name: g.placeholder(name, default_value=default) for name, default in _optional_parameters(module)}
    else:
        optional = {name: g.placeholder(name) for name in given.arguments}
    tokens = g.call_method("reshape", (hidden_states, -1, block.hidden_size))
    if given is None:
        logits = g.call_module("router", (hidden_states if block.route_on_sequence else tokens,))
        bias = g.get_attr("correction_bias") if block.correction_bias_path is not None else None
        selection_args = (logits, bias)
        if block.token_id_routing is not None:
            selection_args += (g.get_attr("hash_table"), optional[block.token_id_routing.argument])
        selection = g.call_function(select_experts, selection_args, block.routing.as_kwargs())
    else:
        logits = None
        selection = g.call_function(
            given_routing, (optional[given.weights], optional[given.index]),
            {"top_k": block.top_k, "num_experts": block.num_experts},
        )  # fmt: skip
    weights = g.call_function(operator.getitem, (selection, 0))
    index = g.call_function(operator.getitem, (selection, 1))
    selected_weights, shared_args = weights, ()
    if block.routing.shared_columns:
        split = g.call_function(split_shared_columns, (weights, index, block.routing.shared_columns))
        weights, index, gammas = (g.call_function(operator.getitem, (split, i)) for i in range(3))
        shared_args = (gammas,)
    if block.identity_experts:
        split = g.call_function(split_identity_experts, (tokens, weights, index, block.num_experts))
        weights, index, identity_out = (g.call_function(operator.getitem, (split, i)) for i in range(3))
    if block.scales_inputs:
        rows = g.call_function(per_slot_rows, (tokens, index, weights))
        row_args = tuple(g.call_function(operator.getitem, (rows, i)) for i in range(3))
        routed = g.call_function(sum_slots, (g.call_module("experts", row_args), index))
    else:
        routed = g.call_module("experts", (tokens, index, weights))
    if block.identity_experts:
        routed = g.call_function(operator.add, (routed, identity_out))
    for i in range(len(block.shared_experts)):
        shared = g.call_module(f"shared_expert_{i}", (tokens, *shared_args))
        if i < len(block.shared_expert_gates):
            gate = g.call_function(torch.sigmoid, (g.call_module(f"shared_expert_gate_{i}", (tokens,)),))
            shared = g.call_function(operator.mul, (gate, shared))
        routed = g.call_function(operator.add, (routed, shared))
    if block.output_norm is not None:
        routed = g.call_module("output_norm", (routed,))
    out = routed if block.flattens_output else g.call_method("view_as", (routed, hidden_states))
    second = {None: None, "weights": selected_weights, "logits": logits}[block.second_output]
    g.output(out if second is None else (out, second))
    gm = torch.fx.GraphModule(root, g, class_name="CanonicalMoEBlock")
    if block.scale_parameter_path is not None:  # its value is in the selection's scale; held for checkpoints
        gm.register_buffer("scale_parameter", _get_tensor(module, block.scale_parameter_path).detach())
    gm.meta["moefx_block"] = replace(block, module=None)  # the descriptor, without the original module
    return gm


def _optional_parameters(module: nn.Module) -> list[tuple[str, Any]]:
    """The block's forward parameters after the hidden states that have defaults (DeepSeek-V4's ``input_ids``,
    which only its hash-routed blocks use), and its ``**kwargs``, as (placeholder name, default)."""
    parameters = list(inspect.signature(module.forward).parameters.values())[1:]
    optional = [(p.name, p.default) for p in parameters if p.default is not inspect.Parameter.empty]
    return optional + [(f"**{p.name}", inspect.Parameter.empty) for p in parameters if p.kind is p.VAR_KEYWORD]


def block_router(graph: torch.fx.GraphModule) -> nn.Linear | None:
    """A canonical block's router, or None for a block routed outside itself (its selection is given)."""
    return getattr(graph, "router", None)


def experts_node(graph: torch.fx.Graph) -> torch.fx.Node:
    """A canonical block's call of its ``experts`` bank."""
    return next(n for n in graph.nodes if n.op == "call_module" and n.target == "experts")


def selection_nodes(graph: torch.fx.Graph) -> tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node]:
    """A canonical block's ``select_experts`` (or ``given_routing``) node and its weights and index outputs."""
    selection = next(n for n in graph.nodes if n.op == "call_function" and n.target in (select_experts, given_routing))
    outputs = {u.args[1]: u for u in selection.users if u.target is operator.getitem}
    return selection, outputs[0], outputs[1]


def _call_of(graph: torch.fx.Graph, function: Any) -> torch.fx.Node | None:
    return next((n for n in graph.nodes if n.op == "call_function" and n.target is function), None)


def runs_per_slot_rows(graph: torch.fx.Graph) -> bool:
    """Whether a canonical block's experts run on :func:`~moefx.experts.per_slot_rows` (its routing weights
    scale the experts' inputs)."""
    return _call_of(graph, per_slot_rows) is not None


def identity_split(graph: torch.fx.Graph) -> torch.fx.Node | None:
    """A canonical block's :func:`~moefx.routing.split_identity_experts` node, if its router has identity
    experts' columns."""
    return _call_of(graph, split_identity_experts)


def random_block_inputs(
    hidden_size: int, ndim: int, token_id_routing: TokenIdRouting | None = None, seed: int = 0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Random hidden states for a block (``[2, 7, H]``, or ``[14, H]`` for ``ndim`` 2), and the keyword
    arguments it needs besides them (a hash-routed block's token ids)."""
    g = torch.Generator().manual_seed(seed)
    shape = (2, 7, hidden_size) if ndim == 3 else (14, hidden_size)
    x = torch.randn(shape, generator=g)
    if token_id_routing is None:
        return x, {}
    return x, {token_id_routing.argument: torch.randint(token_id_routing.vocab_size, shape[:-1], generator=g)}


def max_block_diff(original: nn.Module, canonical: nn.Module, block: MoEBlock, ndim: int, seed: int = 0) -> float:
    """Largest output difference of two modules of ``block`` on random inputs (float32)."""
    x, kwargs = random_block_inputs(block.hidden_size, ndim, block.token_id_routing, seed)
    if block.given_routing is not None:
        num_tokens = x.reshape(-1, block.hidden_size).shape[0]
        kwargs |= block.given_routing.random_inputs(num_tokens, block.num_experts, block.top_k, seed)
    with torch.no_grad():
        ref, got = original(x, **kwargs), canonical(x, **kwargs)
    ref = ref if isinstance(ref, tuple) else (ref,)
    got = got if isinstance(got, tuple) else (got,)
    if len(ref) != len(got) or any(a.shape != b.shape for a, b in zip(ref, got, strict=False)):
        return float("inf")
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(ref, got, strict=True))


def float32_reference(module: nn.Module) -> nn.Module:
    """``module`` to run in float32 eval mode without changing it: itself when it already is (a full-size
    layer's copy is gigabytes), else a float32 eval-mode copy."""
    floating = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    if all(t.dtype == torch.float32 for t in floating) and not any(m.training for m in module.modules()):
        return module
    return copy.deepcopy(module).float().eval()


def verify_block(block: MoEBlock, ndim: int) -> float:
    """Check the canonical form of ``block`` against the original, in float32 (see
    :func:`float32_reference`); returns the diff."""
    reference = float32_reference(block.module)
    canonical = build_block(reference, block)
    return max(max_block_diff(reference, canonical, block, ndim, seed) for seed in (0, 1))


def first_verified(candidates: list[MoEBlock], ndim: int) -> MoEBlock:
    """The first candidate reading of a block whose canonical form reproduces it; raises if none does."""
    best, detail = float("inf"), ""
    for candidate in candidates:
        try:
            diff = verify_block(candidate, ndim)
        except Exception as exc:  # a wrong reading can fail to run at all (shapes disagree)
            diff, failure = float("inf"), f"error: {first_line(exc)}"
        else:
            failure = f"max output difference {diff:.3g}" if math.isfinite(diff) else "its outputs are not finite"
        if diff <= BLOCK_TOLERANCE:
            return candidate
        if diff < best or not detail:
            best, detail = diff, failure
    name = candidates[0].name
    raise DetectionError(
        f"{name} looks like an MoE block, but moefx's reading of it does not reproduce its outputs ({detail}); "
        "its routing or experts use a variant moefx does not support yet"
    )
