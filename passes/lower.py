"""Lower: rewrite canonical MoE blocks into ONNX Runtime's fused ``com.microsoft.MoE`` operator.

:class:`LowerToFusedMoE` matches a canonical block whose experts are dense FFNs with an activation the
operator has (relu, silu, identity, or SwiGLU ``G * sigmoid(alpha * G) * (L + beta)`` with an optional
clamp). It replaces the experts with one ``moefx::ort_moe`` call on weights stored in the operator's layout
(``(E, out, in)``, gate and up rows interleaved), which ``torch.onnx.export`` translates to
``com.microsoft.MoE``.

The operator routes by itself: a softmax over its router input's columns, top-k, optionally renormalised.
Where that is the block's routing (softmax top-k over one router output per expert, no capacity,
correction bias, group limit or scaling), the router's logits feed it directly and the block's selection
goes away. Any other routing (merged experts behind the exact router, sigmoid scores, correction biases,
group-limited selection, routed scaling, capacity) stays in the graph: its weights ``w`` per expert enter
the operator as ``log w``, whose softmax is ``w / sum(w)``, and the operator's output is multiplied back by
``sum(w)``. :func:`fused_moe_blocker` says why a block is left to the portable lowering, which is the
canonical graph itself (standard ONNX ops, each expert run once on its routed tokens).

ONNX Runtime's CPU kernel gives each thread a contiguous range of the operator's experts, and a merged
block's groups carry very unequal shares of the tokens, so one thread can end up with most of the work.
With ``width_splits=S`` each expert's hidden units are cut into S equal parts, laid out part-major as S x E
operator experts (an FFN's output is the sum of its parts' outputs, the output bias kept in part 0), and
every token picks all S parts of its experts: the router input repeated S times, ``k`` times S, and the
output multiplied by S (each part's softmax weight is ``1/S`` of its expert's). With S threads, each then
gets an equal share of every expert's work, whatever the routing.
"""

from __future__ import annotations

import contextlib
import contextvars
import operator
from collections.abc import Callable, Iterator

import onnx
import onnxscript
import torch
import torch.nn.functional as F
from onnx.defs import OpSchema
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from moefx.block import experts_node, runs_per_slot_rows, selection_nodes
from moefx.experts import FFN, FusedExperts, ModuleExperts
from moefx.routing import select_experts

# ONNX Runtime's MoE GELU is an approximation (about 1e-4 off exact GELU), so GELU experts stay portable.
_PLAIN_ACTIVATIONS = {"relu": F.relu, "silu": F.silu, "identity": lambda h: h}


def _swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, beta: float, limit: float | None) -> torch.Tensor:
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (up + beta)


def _activation(name: str, alpha: float, beta: float, limit: float | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The operator's activation ``name`` on ``fc1``'s output (SwiGLU: gate and up rows interleaved)."""
    if name == "swiglu":
        return lambda h: _swiglu(h[:, 0::2], h[:, 1::2], alpha, beta, limit)
    return _PLAIN_ACTIVATIONS[name]


def _experts_output(
    tokens: torch.Tensor,
    routing: tuple[torch.Tensor, torch.Tensor],
    fc1: tuple[torch.Tensor, torch.Tensor | None],
    fc2: tuple[torch.Tensor, torch.Tensor | None],
    act: Callable[[torch.Tensor], torch.Tensor],
    activation_block: int = 0,
) -> torch.Tensor:
    """``sum_j weights[t, j] * expert_{index[t, j]}(tokens[t])`` for ``routing = (weights, index)`` on
    ``(E, out, in)`` weights and biases, each matrix's input rounded by :func:`quantize_activations` where
    ``activation_block`` is set (and not in :func:`float_activations`)."""
    block = 0 if _FLOAT_ACTIVATIONS.get() else activation_block
    weights, index = routing

    def linear(x: torch.Tensor, e: int, matrix: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        weight, bias = matrix
        return F.linear(quantize_activations(x, block) if block else x, weight[e], None if bias is None else bias[e])

    out = torch.zeros_like(tokens)
    for e in range(fc1[0].shape[0]):
        token, slot = torch.where(index == e)
        y = linear(act(linear(tokens[token], e, fc1)), e, fc2)
        out.index_add_(0, token, (y * weights[token, slot, None]).to(out.dtype))
    return out


@torch.library.custom_op("moefx::ort_moe", mutates_args=())
def ort_moe(
    tokens: torch.Tensor,
    logits: torch.Tensor,
    fc1: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    k: int,
    normalize: bool,
    activation: str,
    alpha: float,
    beta: float,
    limit: float | None,
) -> torch.Tensor:
    """ONNX Runtime's MoE operator in PyTorch: softmax top-k routing over ``(E, out, in)`` expert weights."""
    weights, index = torch.softmax(logits.float(), dim=-1).topk(k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    act = _activation(activation, alpha, beta, limit)
    return _experts_output(tokens, (weights, index), (fc1, fc1_bias), (fc2, fc2_bias), act)


@ort_moe.register_fake
def _(tokens, logits, fc1, fc1_bias, fc2, fc2_bias, k, normalize, activation, alpha, beta, limit):
    return torch.empty_like(tokens)


UNCHOSEN_LOGIT = -1e4  # exp(-1e4 - log w) is 0 in float32 for every positive float32 w (log w > -104); fp16 holds it
QUANTIZED_BLOCK = 32  # 4-bit experts: one scale per 32 input columns where every input dimension divides by it


INT8_ACTIVATIONS_ACCURACY_LEVEL = 4  # QMoE's accuracy_level whose CPU kernel takes int8 activations
_FLOAT_ACTIVATIONS = contextvars.ContextVar("moefx_float_activations", default=False)


def matrix_inputs(ffn: FFN) -> list[int]:
    """The input columns of an expert's two QMoE matrices: fc1 (its input projections) and fc2."""
    return [ffn.in_weights[0].shape[1], ffn.out_weight.shape[1]]


def quantization_block_size(bits: int, in_features: list[int]) -> int:
    """QMoE's ``block_size`` for experts whose matrices have ``in_features`` columns: 4-bit weights get one
    scale per 32 columns where every count divides by 32, otherwise (and 8-bit weights always) one per row
    (0). ONNX Runtime's CPU kernel multiplies block-wise 8-bit weights with int8 activations whatever it is
    asked, which would no longer compute what the dequantized experts compute."""
    blockwise = bits == 4 and all(n % QUANTIZED_BLOCK == 0 for n in in_features)
    return QUANTIZED_BLOCK if blockwise else 0


def quantize_activations(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``x`` (``[..., K]``) rounded as ONNX Runtime's CPU kernel rounds a matrix's input for int8 activations
    (MLAS ``QuantizeARow_CompInt8``): per ``block_size`` columns, codes ``round(x * (127 / amax))`` (halves
    to even) for scale ``amax / 127``, computed in float32 in that order so that the codes are the kernel's."""
    blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)
    largest = blocks.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(largest > 0, 127.0 / largest, torch.zeros_like(largest))
    return ((blocks * inverse).round() * (largest / 127.0)).reshape(x.shape).to(x.dtype)


@contextlib.contextmanager
def float_activations() -> Iterator[None]:
    """Within it, lowered QMoE blocks compute on float activations even where the file takes int8 ones: what
    the model before lowering computes on the same weights, against which the lowering itself is checked."""
    token = _FLOAT_ACTIVATIONS.set(True)
    try:
        yield
    finally:
        _FLOAT_ACTIVATIONS.reset(token)


def quantize(weight: torch.Tensor, bits: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization of ``weight`` (``[..., N, K]``) in QMoE's layout: unsigned codes with zero point
    ``2^(bits-1)`` (two 4-bit codes a byte, the even column in the low nibble) and float scales, one per row
    (``block_size`` 0: ``[..., N]``) or per ``block_size`` columns (``[..., N, K / block_size]``)."""
    *lead, n, k = weight.shape
    blocks = weight.detach().float().reshape(*lead, n, k // (block_size or k), block_size or k)
    largest = 2 ** (bits - 1) - 1
    scales = (blocks.abs().amax(dim=-1) / largest).clamp(min=torch.finfo(torch.float32).tiny)
    codes = (blocks / scales[..., None]).round().clamp(-largest - 1, largest) + 2 ** (bits - 1)
    codes = codes.reshape(*lead, n, k).to(torch.uint8)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, scales[..., 0] if block_size == 0 else scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """The float32 weights that :func:`quantize`'s ``codes`` and ``scales`` stand for."""
    if bits == 4:
        codes = torch.stack([codes & 15, codes >> 4], dim=-1).flatten(-2)
    values = codes.float() - 2 ** (bits - 1)
    *lead, n, k = values.shape
    per_block = scales[..., None] if block_size == 0 else scales.repeat_interleave(block_size, dim=-1)
    return values * per_block.reshape(*lead, n, -1).expand(*lead, n, k)


def fake_quantize(weight: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """``weight`` rounded to what its QMoE codes stand for, in its own dtype."""
    return dequantize(*quantize(weight, bits, block_size), bits, block_size).to(weight.dtype)


def quantize_experts(bank: nn.Module, bits: int) -> None:
    """Round an expert bank's weights in place to what their ``bits``-bit codes stand for: the experts a
    QMoE node lowered from the bank computes (quantizing the rounded weights gives the same codes)."""
    for ffn in map(bank.ffn, range(bank.num_experts)):
        block_size = quantization_block_size(bits, matrix_inputs(ffn))
        with torch.no_grad():
            for weight in (*ffn.in_weights, ffn.out_weight):
                weight.copy_(fake_quantize(weight, bits, block_size))


@torch.library.custom_op("moefx::ort_qmoe", mutates_args=())
def ort_qmoe(
    tokens: torch.Tensor,
    logits: torch.Tensor,
    fc1: torch.Tensor,
    fc1_scales: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2: torch.Tensor,
    fc2_scales: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    k: int,
    activation: str,
    alpha: float,
    beta: float,
    limit: float | None,
    bits: int,
    block_size: int,
    int8_activations: bool,
) -> torch.Tensor:
    """ONNX Runtime's QMoE operator in PyTorch: the top k logits, a softmax over them, dequantized experts
    (with ``int8_activations``, each expert matrix's input rounded per ``block_size`` as the kernel does)."""
    fc1, fc2 = (dequantize(w, s, bits, block_size).to(tokens.dtype) for w, s in ((fc1, fc1_scales), (fc2, fc2_scales)))
    weights, index = torch.softmax(logits.float(), dim=-1).topk(k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    act, block = _activation(activation, alpha, beta, limit), block_size if int8_activations else 0
    return _experts_output(tokens, (weights, index), (fc1, fc1_bias), (fc2, fc2_bias), act, block)


@ort_qmoe.register_fake
def _(tokens, logits, fc1, fc1_scales, fc1_bias, fc2, fc2_scales, fc2_bias, k, activation, alpha, beta, limit, bits,
      block_size, int8_activations):  # fmt: skip
    return torch.empty_like(tokens)


def _register_schema(name: str) -> None:
    """Describe ``com.microsoft.MoE`` or ``QMoE`` to ``onnx.defs`` so the exporter can build the node (once)."""
    if onnx.defs.has(name, "com.microsoft"):
        return
    p, optional, attr = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional, OpSchema.AttrType
    quantized = name == "QMoE"
    inputs = [p("input", "T"), p("router_probs", "T")]
    for fc in ("fc1", "fc2", "fc3"):
        needed = {} if fc != "fc3" else {"param_option": optional}
        inputs.append(p(f"{fc}_experts_weights", "T1" if quantized else "T", **needed))
        if quantized:
            inputs.append(p(f"{fc}_scales", "T", **needed))
        inputs.append(p(f"{fc}_experts_bias", "T", param_option=optional))
    attributes = [OpSchema.Attribute(name, kind, "") for name, kind in (
        ("activation_type", attr.STRING), ("k", attr.INT), ("normalize_routing_weights", attr.INT),
        ("swiglu_fusion", attr.INT), ("activation_alpha", attr.FLOAT), ("activation_beta", attr.FLOAT),
        ("swiglu_limit", attr.FLOAT), ("use_sparse_mixer", attr.INT),
        *((("expert_weight_bits", attr.INT), ("block_size", attr.INT), ("accuracy_level", attr.INT))
          if quantized else ()),
    )]  # fmt: skip
    types = [("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")]
    if quantized:
        types.append(("T1", ["tensor(uint8)"], ""))
    onnx.defs.register_schema(
        OpSchema(
            name,
            "com.microsoft",
            1,
            inputs=inputs,
            outputs=[p("output", "T")],
            type_constraints=types,
            attributes=attributes,
        )  # fmt: skip
    )


def _activation_attributes(activation: str, alpha: float, beta: float, limit: float | None) -> dict:
    attributes = {"activation_type": activation}
    if activation == "swiglu":
        attributes |= {"swiglu_fusion": 1, "activation_alpha": alpha, "activation_beta": beta}
        if limit is not None:
            attributes["swiglu_limit"] = limit
    return attributes


def ort_moe_to_onnx(tokens, logits, fc1, fc1_bias, fc2, fc2_bias, k, normalize, activation, alpha, beta, limit):
    """The ONNX translation of :func:`ort_moe`: one ``com.microsoft.MoE`` node."""
    _register_schema("MoE")
    msft = onnxscript.values.Opset("com.microsoft", 1)
    attributes = {"k": k, "normalize_routing_weights": int(normalize)}
    attributes |= _activation_attributes(activation, alpha, beta, limit)
    return msft.MoE(tokens, logits, fc1, fc1_bias, fc2, fc2_bias, **attributes)


def ort_qmoe_to_onnx(tokens, logits, fc1, fc1_scales, fc1_bias, fc2, fc2_scales, fc2_bias, k, activation, alpha,
                     beta, limit, bits, block_size, int8_activations):  # fmt: skip
    """The ONNX translation of :func:`ort_qmoe`: one ``com.microsoft.QMoE`` node."""
    _register_schema("QMoE")
    msft = onnxscript.values.Opset("com.microsoft", 1)
    attributes = {"k": k, "normalize_routing_weights": 1, "expert_weight_bits": bits, "block_size": block_size}
    if int8_activations:
        attributes["accuracy_level"] = INT8_ACTIVATIONS_ACCURACY_LEVEL
    attributes |= _activation_attributes(activation, alpha, beta, limit)
    return msft.QMoE(tokens, logits, fc1, fc1_scales, fc1_bias, fc2, fc2_scales, fc2_bias, **attributes)


ONNX_TRANSLATIONS = {
    torch.ops.moefx.ort_moe.default: ort_moe_to_onnx,
    torch.ops.moefx.ort_qmoe.default: ort_qmoe_to_onnx,
}


def _constants(graph: fx.Graph, targets: set) -> list[float]:
    return [
        float(a)
        for n in graph.nodes
        if getattr(n.target, "overloadpacket", None) in targets
        for a in n.args[1:]
        if isinstance(a, (int, float)) and not isinstance(a, bool)
    ]


def ort_activation(bank: nn.Module) -> dict | None:
    """The MoE operator's activation settings that reproduce ``bank``'s activation, or None."""
    gen = torch.Generator().manual_seed(0)
    size = bank.intermediate_size
    gated = isinstance(bank, FusedExperts) and bank.layout is not None
    if isinstance(bank, ModuleExperts):
        gated = len(bank.in_linears) == 2
    parts = [torch.randn(64, size, generator=gen) * 3 for _ in range(2 if gated else 1)]
    with torch.no_grad():
        if isinstance(bank, FusedExperts):
            joined = torch.cat(parts, -1) if bank.layout == "concat" else torch.stack(parts, -1).flatten(-2)
            expected = bank.act(joined if gated else parts[0])
        else:
            expected = bank.act(*parts)
    if not gated:
        for name, fn in _PLAIN_ACTIVATIONS.items():
            if torch.allclose(fn(parts[0]), expected, atol=1e-5):
                return {"activation": name, "alpha": 1.0, "beta": 0.0, "limit": None}
        return None
    # a traced activation's constants are the candidate alpha, beta and limit; a module without a graph (a
    # gated activation read from an opaque experts loop) has none, so only the plain SwiGLU is tried
    graph = getattr(bank.act, "graph", fx.Graph())
    clamps = _constants(graph, {torch.ops.aten.clamp})
    limit = max(abs(c) for c in clamps if c is not None) if clamps else None
    alphas = [c for c in _constants(graph, {torch.ops.aten.mul}) if c != 1.0] or [1.0]
    betas = [c for c in _constants(graph, {torch.ops.aten.add}) if c != 0.0] or [0.0]
    for alpha in [1.0, *alphas]:
        for beta in [0.0, *betas]:
            if torch.allclose(_swiglu(parts[0], parts[1], alpha, beta, limit), expected, atol=1e-5):
                return {"activation": "swiglu", "alpha": alpha, "beta": beta, "limit": limit}
    return None


def routing_as_logits(
    weights: torch.Tensor, index: torch.Tensor, num_experts: int, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A routing (``weights``, ``index``: ``[T, k]``, index -1 with weight 0 for no expert) as the operator's
    router input: ``log w`` per expert (``[T, E]``, :data:`UNCHOSEN_LOGIT` for experts not chosen), whose
    softmax is ``w / sum(w)``, and the per-token ``sum(w)`` (``[T, 1]``) that multiplies the operator's output
    back. Both in ``like``'s dtype.

    A token whose k slots fall on fewer than k experts (merged groups) still has k picks in the operator; the
    unchosen experts' softmax weight underflows to exactly 0, and the CPU kernel skips a pick of weight 0,
    so merging behind the exact router saves those experts' FLOPs."""
    dense = torch.zeros(index.shape[0], num_experts, dtype=weights.dtype, device=weights.device)
    dense = dense.scatter_add(1, index.clamp(min=0), weights)
    total = dense.sum(dim=-1, keepdim=True)
    logits = dense.log().clamp(min=UNCHOSEN_LOGIT)  # log 0 = -inf; any positive float32 weight's log is above
    return logits.to(like.dtype), total.to(like.dtype)


def split_width(buffers: dict[str, torch.Tensor], splits: int) -> dict[str, torch.Tensor]:
    """The operator's float expert buffers (``fc1`` ``(E, rows, in)`` with its rows in hidden-unit order,
    gate and up interleaved; ``fc2`` ``(E, out, width)``; optional biases) as ``splits`` x E experts of
    ``width / splits`` hidden units each, part-major: expert ``s * E + e`` is part ``s`` of expert ``e``.
    The output bias goes to part 0 only, so the parts' outputs add up to the expert's."""
    parts = {
        name: tensor.chunk(splits, dim=-1 if name == "fc2" else 1)
        for name, tensor in buffers.items()
        if name != "fc2_bias"
    }
    split = {name: torch.cat(chunks) for name, chunks in parts.items()}
    if "fc2_bias" in buffers:
        bias = buffers["fc2_bias"]
        split["fc2_bias"] = torch.cat([bias, bias.new_zeros((splits - 1) * bias.shape[0], bias.shape[1])])
    return split


def operator_computes_routing(graph_module: fx.GraphModule) -> bool:
    """Whether the operator's own routing (softmax top-k over the router's logits) is the block's."""
    selection, _, index = selection_nodes(graph_module.graph)
    experts = experts_node(graph_module.graph)
    routing = selection.kwargs
    return (
        selection.target is select_experts  # not routed outside the block
        and routing["scoring"] in ("softmax", "softmax_topk")
        and routing.get("capacity") is None
        and routing.get("n_group") is None
        and not any(isinstance(a, fx.Node) for a in selection.args[1:])  # a correction bias, a hash table
        and routing.get("scale", 1.0) == 1.0
        and experts.args[1] is index  # not mapped to groups, split per slot or from identity experts
    )


def fused_moe_blocker(graph_module: fx.GraphModule) -> str | None:
    """Why the MoE operator cannot compute this canonical block's experts, or None if it can."""
    bank = graph_module.get_submodule("experts")
    if not isinstance(bank, (FusedExperts, ModuleExperts)):
        return f"{type(bank).__name__} experts"
    if bank.ffn(0).out_norm is not None:
        return "experts that end in their own RMSNorm, which the operator does not apply"
    if ort_activation(bank) is None:
        return "an activation the operator does not have"
    return None


class LowerToFusedMoE(PassBase):
    """Replace a canonical block's experts with one ``moefx::ort_moe`` call (``moefx::ort_qmoe`` with
    ``expert_bits``, on int8 activations with ``int8_activations``).

    Matches: a canonical block that :func:`fused_moe_blocker` accepts. Rewrites: registers ``fc1``/``fc2``
    (and bias) buffers in the operator's layout, with ``expert_bits`` as :func:`quantize` codes and their
    ``fc1_scales``/``fc2_scales``, and inserts the operator where the experts were called, then removes the
    experts module. Its router input is the router's logits where :func:`operator_computes_routing` and the
    weights are not quantized (the selection is then removed if nothing else reads it); otherwise a
    :func:`routing_as_logits` call on the selected weights and indices, with the output multiplied by their
    per-token sum (QMoE takes a softmax over the top k logits, which on log weights is their share).
    With ``width_splits`` (float experts only), each expert becomes that many operator experts (see the
    module's docstring), where it divides the experts' width; otherwise one.
    """

    def __init__(self, expert_bits: int | None = None, int8_activations: bool = False, width_splits: int = 1) -> None:
        super().__init__()
        if int8_activations and expert_bits != 4:  # the 8-bit kernel's int8 activations are not ours
            raise ValueError(f"int8 activations need 4-bit experts, not expert_bits={expert_bits}")
        if width_splits < 1:
            raise ValueError(f"width_splits must be 1 or more, not {width_splits}")
        if width_splits > 1 and expert_bits is not None:
            raise ValueError(f"width_splits applies to float experts, not to expert_bits={expert_bits}")
        self.expert_bits, self.int8_activations, self.width_splits = expert_bits, int8_activations, width_splits

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        if fused_moe_blocker(graph_module) is not None:
            return PassResult(graph_module, False)
        graph = graph_module.graph
        selection, _, _ = selection_nodes(graph)
        routing = selection.kwargs
        bank = graph_module.get_submodule("experts")
        activation = ort_activation(bank)
        ffns = [bank.ffn(e) for e in range(bank.num_experts)]
        gated = len(ffns[0].in_weights) == 2

        def fc1_rows(parts: list[torch.Tensor]) -> torch.Tensor:  # interleave gate and up rows
            return torch.stack(parts, dim=1).flatten(0, 1) if gated else parts[0]

        width = ffns[0].out_weight.shape[1]
        splits = self.width_splits if width % self.width_splits == 0 else 1
        buffers = {
            "fc1": torch.stack([fc1_rows(f.in_weights) for f in ffns]),
            "fc2": torch.stack([f.out_weight for f in ffns]),
        }
        if ffns[0].in_biases[0] is not None:
            buffers["fc1_bias"] = torch.stack([fc1_rows(f.in_biases) for f in ffns])
        if ffns[0].out_bias is not None:
            buffers["fc2_bias"] = torch.stack([f.out_bias for f in ffns])
        if splits > 1:
            buffers = split_width(buffers, splits)
        bits = self.expert_bits
        if bits is not None:
            in_features = [buffers["fc1"].shape[-1], buffers["fc2"].shape[-1]]
            block_size = quantization_block_size(bits, in_features)
            if self.int8_activations and not block_size:
                raise ValueError(f"int8 activations need inputs of a multiple of {QUANTIZED_BLOCK}, not {in_features}")
            for fc in ("fc1", "fc2"):
                buffers[fc], buffers[f"{fc}_scales"] = quantize(buffers[fc], bits, block_size)
        for name, tensor in buffers.items():
            graph_module.register_buffer(name, tensor.detach().clone())
        experts = experts_node(graph)
        tokens, index, weights = experts.args
        native = bits is None and operator_computes_routing(graph_module)
        k = splits * (1 if runs_per_slot_rows(graph) else min(routing["top_k"], bank.num_experts))
        act = (activation["activation"], activation["alpha"], activation["beta"], activation["limit"])
        with graph.inserting_before(experts):
            attrs = {name: graph.get_attr(name) for name in buffers}
            if native:
                router_input = selection.args[0]
                normalize = routing["normalize"] or routing["scoring"] == "softmax_topk"
            else:
                as_logits = graph.call_function(routing_as_logits, (weights, index, bank.num_experts, tokens))
                router_input = graph.call_function(operator.getitem, (as_logits, 0))
                normalize = False
            if splits > 1:
                router_input = graph.call_function(torch.cat, ([router_input] * splits, -1))
            if bits is None:
                fused = graph.call_function(
                    torch.ops.moefx.ort_moe.default,
                    (tokens, router_input, attrs["fc1"], attrs.get("fc1_bias"), attrs["fc2"], attrs.get("fc2_bias"), k,
                     normalize, *act),
                )  # fmt: skip
            else:
                fused = graph.call_function(
                    torch.ops.moefx.ort_qmoe.default,
                    (tokens, router_input, attrs["fc1"], attrs["fc1_scales"], attrs.get("fc1_bias"), attrs["fc2"],
                     attrs["fc2_scales"], attrs.get("fc2_bias"), k, *act, bits, block_size, self.int8_activations),
                )  # fmt: skip
            if not native:
                total = graph.call_function(operator.getitem, (as_logits, 1))
                fused = graph.call_function(operator.mul, (fused, total))
            if splits > 1:
                fused = graph.call_function(operator.mul, (fused, splits))
        experts.replace_all_uses_with(fused)
        graph.erase_node(experts)
        graph_module.delete_submodule("experts")
        graph.eliminate_dead_code()
        graph.lint()
        graph_module.recompile()
        return PassResult(graph_module, True)
