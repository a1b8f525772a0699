"""Routing semantics of an MoE block, as moefx's block graphs compute them.

A router maps each token's logits over E experts to ``top_k`` (weight, expert index) pairs. The variants
that real families use are all parameters of one function, :func:`select_experts`; the detection pass
reads them off the captured graph into a :class:`RoutingSpec`, and the canonical block is checked against
the original module numerically, so a variant outside this set is reported rather than approximated.

Index ``-1`` means "routed nowhere" (a token dropped by a capacity-limited router); its weight is 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

SCORINGS = ("softmax", "sigmoid", "sqrtsoftplus", "softmax_topk", "sparsemixer")
# scorings that score each expert on its own logit (no normalisation across experts)
INDEPENDENT_SCORINGS = ("sigmoid", "sqrtsoftplus")


@dataclass(frozen=True)
class RoutingSpec:
    """How a block turns router logits into (weights, indices).

    * ``scoring``: ``"softmax"`` (softmax over all experts, then top-k), ``"sigmoid"`` (independent
      sigmoid scores, DeepSeek-V3), ``"sqrtsoftplus"`` (independent ``sqrt(softplus(logit))`` scores,
      DeepSeek-V4), or ``"softmax_topk"`` (top-k of the logits, then softmax over the k,
      GPT-OSS), or ``"sparsemixer"`` (PhiMoE's sparse mixer, as in eval mode: each of the k slots takes the
      best expert not yet taken, weighted by a softmax over the experts not yet taken whose logits are
      within a relative ``2 * jitter_eps`` of its own), or ``"given"`` (the block takes its weights and
      indices as arguments from a router outside it, which moefx leaves as it is: :func:`given_routing`).
    * ``normalize``: divide the k weights by their sum (plus ``norm_eps``, and at least ``norm_min`` when it
      is set); ``scale``: multiply them after.
    * ``has_correction_bias``: a per-expert bias added to the scores for choosing only (DeepSeek-V3), or to
      the logits with ``bias_on_logits`` (Kolibri).
    * ``n_group`` / ``topk_group`` / ``group_topk``: group-limited selection: experts are split into
      ``n_group`` groups, each group scored by the sum of its ``group_topk`` best scores, and only the best
      ``topk_group`` groups are eligible.
    * ``capacity``: top-1 routing where each expert takes at most ``capacity`` tokens per sequence, in
      order; later tokens are dropped (SwitchTransformers).
    * ``hash_routed``: the k experts of a token are row ``token id`` of a fixed ``[V, k]`` table, not a
      choice by score; the scores only weight them (DeepSeek-V4's first layers).
    * ``shared_columns``: the router's last S columns score the block's S shared experts, which every token
      takes: their scores join the k chosen ones' (as slots ``E .. E+S-1``) before renormalisation and
      scaling, and :func:`split_shared_columns` gives them to the shared experts (Inkling).
    """

    top_k: int
    scoring: str = "softmax"
    normalize: bool = False
    norm_eps: float = 0.0
    norm_min: float = 0.0
    scale: float = 1.0
    has_correction_bias: bool = False
    n_group: int | None = None
    topk_group: int | None = None
    group_topk: int | None = None
    capacity: int | None = None
    jitter_eps: float = 0.0
    bias_on_logits: bool = False
    hash_routed: bool = False
    shared_columns: int = 0

    def as_kwargs(self) -> dict:
        kwargs = asdict(self)
        kwargs.pop("has_correction_bias")
        kwargs.pop("hash_routed")  # the table and the token ids are arguments
        return kwargs


def select_experts(
    logits: torch.Tensor,
    correction_bias: torch.Tensor | None = None,
    hash_table: torch.Tensor | None = None,
    token_ids: torch.Tensor | None = None,
    *,
    top_k: int,
    scoring: str = "softmax",
    normalize: bool = False,
    norm_eps: float = 0.0,
    norm_min: float = 0.0,
    scale: float = 1.0,
    n_group: int | None = None,
    topk_group: int | None = None,
    group_topk: int | None = None,
    capacity: int | None = None,
    jitter_eps: float = 0.0,
    bias_on_logits: bool = False,
    shared_columns: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route tokens: ``logits [..., E]`` to ``(weights [T, k] float32, index [T, k] int64)``.

    Leading dimensions are flattened to tokens after routing; capacity counts along dimension -2 (the
    sequence when logits are ``[batch, seq, E]``). With a ``hash_table`` (``[V, k]`` expert indices), each
    token's experts are its row, looked up by ``token_ids`` (in the logits' token order), and weighted by
    their scores.
    """
    if capacity is not None:
        return _top1_with_capacity(logits, capacity)
    flat = logits.reshape(-1, logits.shape[-1]).float()
    flat, shared = flat.split([flat.shape[-1] - shared_columns, shared_columns], dim=-1)
    num_experts = flat.shape[-1]
    if scoring == "softmax_topk":
        values, index = torch.topk(flat, top_k, dim=-1)
        weights = torch.softmax(values, dim=-1)
    elif scoring == "sparsemixer":
        weights, index = _sparse_mixer(flat, top_k, jitter_eps)
    elif hash_table is not None:
        index = hash_table[token_ids.reshape(-1)].long()
        weights = _scores(flat, scoring).gather(1, index)
    else:
        scores = _scores(flat, scoring)
        choice = scores if correction_bias is None else (flat if bias_on_logits else scores) + correction_bias
        if n_group is not None:
            grouped = choice.view(-1, n_group, num_experts // n_group)
            group_scores = grouped.topk(group_topk or 1, dim=-1)[0].sum(dim=-1)
            best_groups = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
            keep = torch.zeros_like(group_scores).scatter_(1, best_groups, 1.0)
            keep = keep.unsqueeze(-1).expand(-1, n_group, num_experts // n_group).reshape(-1, num_experts)
            choice = choice.masked_fill(keep == 0, float("-inf"))
        if correction_bias is None and n_group is None:
            weights, index = torch.topk(scores, top_k, dim=-1)
        else:
            index = torch.topk(choice, top_k, dim=-1, sorted=False)[1]
            weights = scores.gather(1, index)
    if shared_columns:
        weights = torch.cat([weights, _scores(shared, scoring)], dim=-1)
        every = torch.arange(num_experts, num_experts + shared_columns, device=index.device).expand(len(index), -1)
        index = torch.cat([index, every], dim=-1)
    if normalize:
        total = weights.sum(dim=-1, keepdim=True) + norm_eps
        weights = weights / (total.clamp(min=norm_min) if norm_min > 0 else total)
    if scale != 1.0:
        weights = weights * scale
    return weights, index


def _scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    if scoring == "softmax":
        return torch.softmax(logits, dim=-1)
    if scoring == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    return torch.sigmoid(logits)


def _sparse_mixer(logits: torch.Tensor, top_k: int, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's ``sparsemixer`` without its training-time sampling: slot by slot, the best remaining expert,
    weighted by the softmax of the remaining logits less than ``2 * jitter_eps`` (relative) below its own."""
    remaining, weights, index = logits, [], []
    for _ in range(top_k):
        best, chosen = remaining.max(dim=-1, keepdim=True)
        far = (best - logits) / logits.abs().clamp(min=best) > 2 * jitter_eps
        weights.append(torch.softmax(remaining.masked_fill(far, float("-inf")), dim=-1).gather(-1, chosen))
        index.append(chosen)
        remaining = remaining.scatter(-1, chosen, float("-inf"))
    return torch.cat(weights, dim=-1), torch.cat(index, dim=-1)


def _top1_with_capacity(logits: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    num_experts = logits.shape[-1]
    probs = torch.softmax(logits.float(), dim=-1)
    weights, index = probs.max(dim=-1)
    position = torch.cumsum(F.one_hot(index, num_experts), dim=-2).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    kept = position <= capacity
    index = torch.where(kept, index, torch.full_like(index, -1))
    weights = torch.where(kept, weights, torch.zeros_like(weights))
    return weights.reshape(-1, 1), index.reshape(-1, 1)


def given_routing(
    weights: torch.Tensor, index: torch.Tensor, *, top_k: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection of a block whose routing is computed outside it (Gemma 4's and Zaya's expert modules
    take their weights and indices as arguments): the given ones as ``[T, k]`` float32 and int64, with a
    slot outside the experts or of weight 0 (a skip slot: Zaya's names expert 0 with weight 0) routed nowhere
    (-1, weight 0), so that statistics do not count it."""
    index, weights = index.reshape(-1, top_k).long(), weights.reshape(-1, top_k).float()
    outside = (index < 0) | (index >= num_experts) | (weights == 0)
    return weights.masked_fill(outside, 0.0), index.masked_fill(outside, -1)


def split_shared_columns(
    weights: torch.Tensor, index: torch.Tensor, shared_columns: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Take the shared experts' slots (the last ``shared_columns``, see ``RoutingSpec.shared_columns``) out
    of a selection: the routed experts' weights and indices ``[T, k]``, and the shared experts' weights
    ``[T, S]``."""
    k = weights.shape[-1] - shared_columns
    return weights[:, :k], index[:, :k], weights[:, k:]


def split_identity_experts(
    tokens: torch.Tensor, weights: torch.Tensor, index: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Take the identity experts (router columns from ``num_experts`` on: LongCat-Flash's zero-computation
    experts) out of a selection. Returns the real experts' weights and indices (an identity slot becomes
    ``-1`` with weight 0) and the identity experts' output: each token times its identity slots' summed
    weight."""
    identity = index >= num_experts
    identity_out = tokens * weights.masked_fill(~identity, 0.0).sum(dim=-1, keepdim=True).to(tokens.dtype)
    return weights.masked_fill(identity, 0.0), index.masked_fill(identity, -1), identity_out


def combine_by_group(
    weights: torch.Tensor, index: torch.Tensor, expert_to_group: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map expert indices to group indices through a static ``E -> G`` table, once per group per token.

    When several of a token's k experts fall in the same group, their weights are summed into the first
    slot of that group and the other slots become ``-1`` with weight 0, so each token evaluates each distinct
    group once. Index ``-1`` stays ``-1``.
    """
    group = torch.where(index >= 0, expert_to_group[index.clamp(min=0)], index)
    same = (group.unsqueeze(-1) == group.unsqueeze(-2)) & (group.unsqueeze(-1) >= 0)  # [T, k, k]
    k = group.shape[-1]
    earlier = torch.ones(k, k, dtype=torch.bool, device=group.device).tril(-1)  # slot j < slot i
    duplicate = (same & earlier).any(dim=-1)
    summed = (same.to(weights.dtype) * weights.unsqueeze(-2)).sum(dim=-1)
    weights = torch.where(duplicate, torch.zeros_like(summed), summed)
    group = torch.where(duplicate, torch.full_like(group, -1), group)
    return weights, group


def group_logit_targets(logits: torch.Tensor, expert_to_group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Per token, each group's pooled logit ``logsumexp`` over its members, centred over groups."""
    logits = logits.double()
    pooled = torch.stack([torch.logsumexp(logits[:, expert_to_group == g], dim=-1) for g in range(num_groups)], dim=-1)
    return pooled - pooled.mean(dim=-1, keepdim=True)
