"""Observe: calibration observers for canonical MoE blocks (prepare / calibrate / convert, as torch.ao does).

:class:`InsertObservers` matches a canonical block's selection (``select_experts``, or ``given_routing``
for a block routed outside itself) and its ``experts`` module.
It inserts a :class:`RoutingObserver` after the selection (the routing weights pass through it unchanged)
and replaces the experts module with :class:`ObservedExperts`, which runs the same bank and records
per-expert statistics. :class:`RemoveObservers` undoes both. The observed block computes exactly what the
block computed before.

All statistics are sums and Gram matrices, so their size does not depend on how many tokens are seen.
Padding tokens are excluded: a forward pre-hook on the model (:func:`install_mask_hook`) publishes the
batch's attention masks, and each observer applies the one for its block's token stream. Tokens that a
capacity-limited router drops (index -1) count as routed nowhere.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.utils.hooks import RemovableHandle

from moefx.block import experts_node, runs_per_slot_rows, selection_nodes
from moefx.errors import ConfigError
from moefx.experts import dispatch
from moefx.routing import group_logit_targets, select_experts

_ACTIVE_MASKS: dict[str, torch.Tensor] = {}


def _token_mask(key: str, num_tokens: int, device: torch.device) -> torch.Tensor:
    mask = _ACTIVE_MASKS.get(key)
    if mask is None or mask.numel() != num_tokens:
        return torch.ones(num_tokens, dtype=torch.bool, device=device)
    return mask.reshape(-1).to(device=device, dtype=torch.bool)


def install_mask_hook(model: nn.Module) -> tuple[RemovableHandle, RemovableHandle]:
    """Hooks on ``model`` that publish every ``*attention_mask`` argument of a call while it runs."""
    signature = inspect.signature(model.forward)

    def publish(module: nn.Module, args: tuple, kwargs: dict) -> None:
        try:
            bound = signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = kwargs
        _ACTIVE_MASKS.clear()
        _ACTIVE_MASKS.update(
            {k: v for k, v in bound.items() if k.endswith("attention_mask") and isinstance(v, torch.Tensor)}
        )

    def withdraw(*_: object) -> None:
        _ACTIVE_MASKS.clear()

    return model.register_forward_pre_hook(publish, with_kwargs=True), model.register_forward_hook(withdraw)


@dataclass(frozen=True)
class CalibrationNeeds:
    """Which optional statistics to collect (each costs memory or compute)."""

    all_token_outputs: bool = False  # every expert on every token: HC-SMoE, expert-output similarity
    expert_input_moments: bool = False  # per-expert sums of x x^T and h h^T over routed tokens (LoSparse)
    router_input_moments: bool = False  # sum of x x^T over all tokens of the router input
    weighted_input_moments: bool = False  # per-expert sum of w x x^T (w: routing weight): least-squares merging
    substitution_errors: bool = False  # every expert on every token, against each routed one: error selection


class RoutingObserver(nn.Module):
    """Records routing statistics; returns the routing weights unchanged.

    Buffers (float64): ``tokens`` (valid tokens), ``dropped`` (valid tokens routed to no expert:
    dropped by a capacity, or routed only to identity experts), ``counts[E]``
    (how often each expert is in a token's top-k), ``logit_gram[E, E]`` (for cosine similarity of
    router-logit columns; None for a block routed outside itself, which sees no logits), and with
    ``router_input_moments`` ``router_input_gram[H, H]`` and ``router_input_sum[H]``.
    """

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        mask_key: str,
        router_input_moments: bool = False,
        observes_logits: bool = True,
    ) -> None:
        super().__init__()
        self.mask_key = mask_key
        f64 = dict(dtype=torch.float64)
        self.register_buffer("tokens", torch.zeros((), **f64))
        self.register_buffer("dropped", torch.zeros((), **f64))
        self.register_buffer("counts", torch.zeros(num_experts, **f64))
        self.register_buffer("logit_gram", torch.zeros(num_experts, num_experts, **f64) if observes_logits else None)
        for name in ("router_input_gram", "router_input_sum", "expert_to_group", "group_cross", "group_target_sums"):
            self.register_buffer(name, None)
        if router_input_moments:
            self.router_input_gram = torch.zeros(hidden, hidden, **f64)
            self.router_input_sum = torch.zeros(hidden, **f64)

    def fit_groups(self, expert_to_group: list[int]) -> None:
        """Switch to a second calibration pass that only collects the pruned-router fit for these groups:
        ``group_cross[H, G]`` (sum of router input times centred pooled group logit) and
        ``group_target_sums[G]``."""
        if self.router_input_sum is None:
            raise ValueError("the pruned-router fit needs the router input moments of the first pass")
        table = torch.tensor(expert_to_group, dtype=torch.long)
        num_groups = int(table.max()) + 1
        self.expert_to_group = table
        self.group_cross = torch.zeros(self.router_input_sum.shape[0], num_groups, dtype=torch.float64)
        self.group_target_sums = torch.zeros(num_groups, dtype=torch.float64)

    @torch.no_grad()
    def observe(
        self,
        weights: torch.Tensor,
        index: torch.Tensor,
        logits: torch.Tensor | None = None,
        router_input: torch.Tensor | None = None,
    ) -> None:
        num_tokens, num_experts = index.shape[0], self.counts.shape[0]
        valid = _token_mask(self.mask_key, num_tokens, index.device)
        if self.expert_to_group is not None:
            x = router_input.reshape(num_tokens, -1)[valid].double()
            logits = logits.reshape(num_tokens, -1)[:, :num_experts]  # without identity experts' columns
            targets = group_logit_targets(logits[valid], self.expert_to_group, self.group_cross.shape[1])
            self.group_cross += x.T @ targets
            self.group_target_sums += targets.sum(dim=0)
            return
        index, weights = index[valid], weights[valid].double()
        self.tokens += valid.sum()
        routed = (index >= 0) & (index < num_experts)
        self.dropped += (~routed).all(dim=-1).sum()
        self.counts += torch.bincount(index[routed], minlength=num_experts).double()
        if self.logit_gram is not None:
            logits = logits.reshape(num_tokens, -1)[valid, :num_experts].double()
            self.logit_gram += logits.T @ logits
        if self.router_input_gram is not None:
            x = router_input.reshape(num_tokens, -1)[valid].double()
            self.router_input_gram += x.T @ x
            self.router_input_sum += x.sum(dim=0)

    def forward(
        self,
        weights: torch.Tensor,
        index: torch.Tensor,
        logits: torch.Tensor | None = None,
        router_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.observe(weights, index, logits, router_input)
        return weights


class ObservedExperts(nn.Module):
    """Runs an expert bank exactly as it runs, recording per-expert statistics over routed tokens.

    Buffers (float64 unless noted): ``routed[E]`` (routed token-slots) and ``weighted_output_norm_sums[E]``
    (sum of routing weight times output norm, REAP's saliency numerator); with ``all_token_outputs``
    ``all_output_sums[E, H]`` and ``all_tokens`` (each expert applied to every valid token); with
    ``expert_input_moments`` ``input_grams[E, H, H]`` and ``hidden_grams[E, I, I]`` (float32; token and
    hidden-activation second moments); with ``weighted_input_moments`` ``weighted_input_grams[E, H, H]``
    (float32; routing-weighted); with ``substitution_errors`` ``substitution_errors[E, E]``: ``[e, d]`` sums
    ``w^2 ||y_d(x) - y_e(x)||^2`` over the tokens ``x`` routed to ``e`` with weight ``w``, the block's output
    error where expert ``d`` stands in for ``e``.
    """

    TOKEN_CHUNK_ELEMENTS = 2**24  # every expert's outputs on a chunk of tokens: 128 MiB in float64

    def __init__(
        self, bank: nn.Module, hidden: int, mask_key: str, needs: CalibrationNeeds, rows_per_token: int = 1
    ) -> None:
        super().__init__()
        self.bank = bank
        self.mask_key = mask_key
        self.rows_per_token = rows_per_token  # top-k for per-slot rows (weights scaling the inputs), else 1
        self.hidden = hidden
        self.needs = needs
        num_experts = bank.num_experts
        f64 = dict(dtype=torch.float64)
        self.register_buffer("routed", torch.zeros(num_experts, **f64))
        self.register_buffer("weighted_output_norm_sums", torch.zeros(num_experts, **f64))
        names = ("all_tokens", "all_output_sums", "input_grams", "hidden_grams", "weighted_input_grams",
                 "substitution_errors", "expert_to_slot", "refit_groups", "refit_widths", "refit_grams",
                 "refit_cross")  # fmt: skip
        for name in names:
            self.register_buffer(name, None)
        self.merged: nn.Module | None = None  # the merged bank, during a refit pass
        self.refit_candidates: list[list[int]] = []  # the original experts whose units join each refit's pool
        self.input_bias = bank.ffn(0).in_biases[0] is not None
        if needs.all_token_outputs:
            self.all_tokens = torch.zeros((), **f64)
            self.all_output_sums = torch.zeros(num_experts, hidden, **f64)
        if needs.substitution_errors:
            self.substitution_errors = torch.zeros(num_experts, num_experts, **f64)
        if needs.expert_input_moments:
            self.input_grams = torch.zeros(num_experts, hidden, hidden)
            self.hidden_grams = torch.zeros(num_experts, bank.intermediate_size, bank.intermediate_size)
        if needs.weighted_input_moments:  # with a constant-1 column when the experts have input biases
            size = hidden + int(self.input_bias)
            self.weighted_input_grams = torch.zeros(num_experts, size, size)  # float32: E x H^2 is gigabytes

    def start_refit(
        self,
        expert_to_group: list[int],
        merged: nn.Module,
        groups: list[int] | None = None,
        candidates: list[list[int]] | None = None,
    ) -> None:
        """Switch to a refit pass for the merged bank's experts ``groups`` (default: all): for each token
        routed to expert ``e`` with weight ``w`` whose group ``g`` is the ``r``-th of ``groups``, accumulate
        ``w h h^T`` and ``w y h^T`` (read them with :func:`refit_system`), where ``y`` is expert ``e``'s output
        and ``h`` the merged expert's hidden activation, followed by those of the original experts
        ``candidates[r]`` when given (the pool :func:`~moefx.passes.refit.least_squares_units` chooses
        from), and a constant 1 when the experts have output biases. Nothing else is recorded in this pass.
        The sums are float32, like the other Gram matrices: a full-size layer's are gigabytes, and the
        solves that use them are ridge-damped. They are held flat (``refit_grams``, ``refit_cross [H, n]``),
        as their widths ``refit_widths`` differ from group to group."""
        groups = list(range(merged.num_experts)) if groups is None else groups
        candidates = candidates or [[] for _ in groups]
        bias = int(merged.ffn(0).out_bias is not None)
        widths = [merged.intermediate_size + self.bank.intermediate_size * len(c) + bias for c in candidates]
        needed, available = 4 * sum(w * w + self.hidden * w for w in widths), available_memory_bytes()
        if available is not None and needed > available:  # refused before the observer changes its mode
            fix = "use refit='in+out'" if any(candidates) else "use refit='none', or keep more experts (smaller groups)"
            raise ConfigError(f"the refit of {len(groups)} merged experts needs {needed / 1e9:.1f} GB of statistics, "
                              f"more than the {available / 1e9:.1f} GB of memory available: {fix}")  # fmt: skip
        slot_of_group = {g: r for r, g in enumerate(groups)}
        self.merged = merged
        self.refit_candidates = candidates
        self.expert_to_slot = torch.tensor([slot_of_group.get(g, -1) for g in expert_to_group], dtype=torch.long)
        self.refit_groups = torch.tensor(groups, dtype=torch.long)
        self.refit_widths = torch.tensor(widths, dtype=torch.long)
        self.refit_grams = torch.zeros(sum(w * w for w in widths))
        self.refit_cross = torch.zeros(self.hidden, sum(widths))

    @property
    def num_experts(self) -> int:
        return self.bank.num_experts

    def forward(self, tokens: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        rows = self.rows_per_token
        valid = _token_mask(self.mask_key, tokens.shape[0] // rows, tokens.device).repeat_interleave(rows)

        @torch.no_grad()
        def record(e: int, token: torch.Tensor, slot: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
            keep = valid[token]
            x, y = x[keep], y[keep].double()
            w = weights[token[keep], slot[keep]].double()
            if self.merged is not None:
                self._record_refit(e, x, y, w)
                return
            norms = y.norm(dim=-1)
            self.routed[e] += keep.sum()
            self.weighted_output_norm_sums[e] += (w * norms).sum()
            if self.weighted_input_grams is not None:
                xa = x.float()
                if self.input_bias:
                    xa = torch.cat([xa, torch.ones(len(xa), 1, dtype=xa.dtype)], dim=1)
                self.weighted_input_grams[e] += (xa * w.float()[:, None]).T @ xa
            if self.needs.expert_input_moments:
                xf = x.float()
                hf = self.bank.expert_hidden(e, x).float()
                self.input_grams[e] += xf.T @ xf
                self.hidden_grams[e] += hf.T @ hf

        out = dispatch(self.bank.expert_forward, self.num_experts, tokens, index, weights, record)
        if (self.needs.all_token_outputs or self.needs.substitution_errors) and self.merged is None:
            self._record_every_expert(tokens[valid], index[valid], weights[valid])
        return out

    @torch.no_grad()
    def _record_every_expert(self, tokens: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> None:
        """The statistics of every expert applied to every valid token, a chunk of tokens at a time."""
        num_experts, hidden = self.num_experts, tokens.shape[-1]
        if self.all_output_sums is not None:
            self.all_tokens += tokens.shape[0]
        chunk = max(1, self.TOKEN_CHUNK_ELEMENTS // (num_experts * hidden))
        for start in range(0, tokens.shape[0], chunk):
            x = tokens[start : start + chunk]
            outputs = torch.stack([self.bank.expert_forward(e, x).double() for e in range(num_experts)], dim=1)
            if self.all_output_sums is not None:
                self.all_output_sums += outputs.sum(dim=0)
            if self.substitution_errors is not None:
                self._record_substitution_errors(
                    outputs, index[start : start + chunk], weights[start : start + chunk].double()
                )

    def _record_substitution_errors(self, outputs: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> None:
        # outputs [N, E, H]; ||y_d - y_e||^2 = |y_d|^2 + |y_e|^2 - 2 y_d.y_e, one routing slot at a time
        squares = outputs.square().sum(dim=-1)  # [N, E]
        for slot in range(index.shape[1]):
            chosen = index[:, slot]
            routed = chosen >= 0
            mine = outputs[routed, chosen[routed]]  # [R, H]
            inner = torch.einsum("rh,reh->re", mine, outputs[routed])
            errors = squares[routed] + mine.square().sum(dim=-1, keepdim=True) - 2 * inner
            errors = errors.clamp(min=0.0) * weights[routed, slot, None].square()
            self.substitution_errors.index_add_(0, chosen[routed], errors)

    def _record_refit(self, e: int, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> None:
        slot = int(self.expert_to_slot[e])
        if slot < 0:
            return
        parts = [self.merged.expert_hidden(int(self.refit_groups[slot]), x)]
        parts += [self.bank.expert_hidden(c, x) for c in self.refit_candidates[slot]]
        h = torch.cat([p.float() for p in parts], dim=1)
        gram, cross = refit_system(self.refit_grams, self.refit_cross, self.refit_widths, slot)
        if gram.shape[0] > h.shape[1]:
            h = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], dim=1)
        weighted = h * w.float()[:, None]
        gram += weighted.T @ h
        cross += y.float().T @ weighted


def available_memory_bytes() -> int | None:
    """Memory available to new allocations now, page cache included (Linux's ``MemAvailable``; None where
    the system does not say)."""
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def refit_system(
    grams: torch.Tensor, cross: torch.Tensor, widths: torch.Tensor, slot: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the ``slot``-th refit's ``gram [n, n]`` and ``cross [H, n]`` in the flat sums of
    :meth:`ObservedExperts.start_refit` (``widths``: every refit's ``n``)."""
    sizes = widths.tolist()
    n = sizes[slot]
    start = sum(w * w for w in sizes[:slot])
    column = sum(sizes[:slot])
    return grams[start : start + n * n].view(n, n), cross[:, column : column + n]


class InsertObservers(PassBase):
    """Insert calibration observers into a canonical MoE block.

    Matches: the ``select_experts`` (or ``given_routing``) call and the ``experts`` call_module of a canonical
    block. Rewrites: adds a ``routing_observer`` call_module (weights, index, logits, router input -> weights;
    the weights and index alone for a block routed outside itself, whose selection is ``given_routing``)
    after the selection, re-points the consumers of the weights at it, and wraps the experts module in
    :class:`ObservedExperts`. Outputs are unchanged.
    """

    def __init__(self, hidden: int, mask_key: str, needs: CalibrationNeeds | None = None) -> None:
        super().__init__()
        self.hidden, self.mask_key, self.needs = hidden, mask_key, needs or CalibrationNeeds()

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        selection, weights, index = selection_nodes(graph)
        logits = selection.args[0] if selection.target is select_experts else None
        experts = experts_node(graph)
        bank = graph_module.get_submodule("experts")
        graph_module.add_submodule(
            "routing_observer",
            RoutingObserver(
                bank.num_experts,  # the router's columns after the experts' choose identity or shared experts
                self.hidden,
                self.mask_key,
                self.needs.router_input_moments and logits is not None,
                observes_logits=logits is not None,
            ),
        )
        rows_per_token = selection.kwargs["top_k"] if runs_per_slot_rows(graph) else 1
        graph_module.add_submodule(
            "observed_experts", ObservedExperts(bank, self.hidden, self.mask_key, self.needs, rows_per_token)
        )
        with graph.inserting_after(max(weights, index, key=lambda n: list(graph.nodes).index(n))):
            routing = (weights, index) if logits is None else (weights, index, logits, logits.args[0])
            observed = graph.call_module("routing_observer", routing)
        weights.replace_all_uses_with(observed, delete_user_cb=lambda user: user is not observed)
        experts.target = "observed_experts"
        graph_module.delete_submodule("experts")
        graph.lint()
        graph_module.recompile()
        return PassResult(graph_module, True)


class RemoveObservers(PassBase):
    """Remove the observers :class:`InsertObservers` added.

    Matches: the ``routing_observer`` call_module and the ``observed_experts`` call_module.
    Rewrites: the observer node is replaced by the weights it passed through, and the experts node calls
    the plain bank again (as ``experts``). The observer modules are deleted.
    """

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        modified = False
        for node in list(graph.nodes):
            if node.op == "call_module" and node.target == "routing_observer":
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
                graph_module.delete_submodule("routing_observer")
                modified = True
            elif node.op == "call_module" and node.target == "observed_experts":
                graph_module.add_submodule("experts", graph_module.get_submodule("observed_experts").bank)
                node.target = "experts"
                graph_module.delete_submodule("observed_experts")
                modified = True
        if modified:
            graph.lint()
            graph_module.recompile()
        return PassResult(graph_module, modified)


@dataclass
class BlockStats:
    """A block's calibration statistics (see the observers for what each sum is)."""

    tokens: float
    dropped: float
    counts: torch.Tensor
    logit_gram: torch.Tensor | None  # None for a block routed outside itself
    routed: torch.Tensor
    weighted_output_norm_sums: torch.Tensor
    all_output_sums: torch.Tensor | None = None
    all_tokens: float = 0.0
    substitution_errors: torch.Tensor | None = None
    input_grams: torch.Tensor | None = None
    hidden_grams: torch.Tensor | None = None
    router_input_gram: torch.Tensor | None = None
    router_input_sum: torch.Tensor | None = None
    group_cross: torch.Tensor | None = None
    group_target_sums: torch.Tensor | None = None
    weighted_input_grams: torch.Tensor | None = None
    refit_groups: torch.Tensor | None = None  # the merged experts the refit sums belong to, in order
    refit_widths: torch.Tensor | None = None
    refit_grams: torch.Tensor | None = None
    refit_cross: torch.Tensor | None = None

    @property
    def frequency(self) -> torch.Tensor:
        """Fraction of valid tokens that have each expert among their top-k."""
        return self.counts / max(self.tokens, 1.0)

    @property
    def reap_saliency(self) -> torch.Tensor:
        """REAP: mean over an expert's routed tokens of routing weight times output norm."""
        return self.weighted_output_norm_sums / self.routed.clamp(min=1.0)

    @property
    def contribution(self) -> torch.Tensor:
        """Frequency times REAP saliency: an expert's total routed output norm per token."""
        return self.weighted_output_norm_sums / max(self.tokens, 1.0)

    def refit_system(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``slot``-th refit's ``gram`` and ``cross`` (see :meth:`ObservedExperts.start_refit`)."""
        return refit_system(self.refit_grams, self.refit_cross, self.refit_widths, slot)

    @property
    def mean_outputs(self) -> torch.Tensor:
        """Each expert's mean output over every calibration token (needs ``all_token_outputs``)."""
        if self.all_output_sums is None:
            raise ValueError("mean outputs over all tokens were not collected (CalibrationNeeds.all_token_outputs)")
        return self.all_output_sums / max(self.all_tokens, 1.0)


def collect_statistics(graph_module: fx.GraphModule) -> BlockStats:
    """The statistics gathered by the observers of an observed canonical block.

    The optional moments are the observers' own tensors, not copies (refit Gram matrices of a full-size
    layer take gigabytes): further calibration through the same observers keeps adding to them.
    """
    routing = graph_module.get_submodule("routing_observer")
    experts = graph_module.get_submodule("observed_experts")
    optional = {
        name: getattr(module, name, None)
        for module, names in (
            (
                experts,
                (
                    "all_output_sums",
                    "substitution_errors",
                    "input_grams",
                    "hidden_grams",
                    "weighted_input_grams",
                    "refit_groups",
                    "refit_widths",
                    "refit_grams",
                    "refit_cross",
                ),
            ),
            (routing, ("router_input_gram", "router_input_sum", "group_cross", "group_target_sums")),
        )
        for name in names
    }
    all_tokens = getattr(experts, "all_tokens", None)
    return BlockStats(
        tokens=routing.tokens.item(),
        dropped=routing.dropped.item(),
        counts=routing.counts.clone(),
        logit_gram=None if routing.logit_gram is None else routing.logit_gram.clone(),
        routed=experts.routed.clone(),
        weighted_output_norm_sums=experts.weighted_output_norm_sums.clone(),
        all_tokens=0.0 if all_tokens is None else all_tokens.item(),
        **optional,
    )
