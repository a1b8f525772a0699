"""Tiny, randomly initialised MoE models of every supported family.

They are built from transformers config classes (nothing is downloaded) and serve the tests, the demo and
the documentation's table of supported families. :func:`transformers_moe_families` enumerates every MoE
text family the installed transformers ships and :func:`tiny_transformers_model` shrinks any of them by
rule (the family matrix in the tests). ``HandWrittenMoELM`` is the kind of MoE a user writes in
plain PyTorch: a router ``nn.Linear``, experts as separate ``nn.Linear`` FFNs in an ``nn.ModuleList``, and
a loop over experts.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "switch", "gpt_oss", "hand_written")

VOCAB = 96
HIDDEN = 32
NUM_EXPERTS = 8


class HandWrittenExpert(nn.Module):
    """A plain FFN with biases: ``w2(gelu(w1(x)))``."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, intermediate)
        self.w2 = nn.Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


def renormalised_top_k(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The hand-written models' routing: softmax over the experts, top-k, renormalised; ``(weights, index)``."""
    weights, index = logits.softmax(dim=-1).topk(top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), index


class HandWrittenMoE(nn.Module):
    """Softmax top-k routing with renormalisation over separate expert modules."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(HandWrittenExpert(hidden, intermediate) for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, index = renormalised_top_k(self.router(x), self.top_k)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(index == e)
            out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return out.reshape(shape)


class HandWrittenMoELM(nn.Module):
    """A small language model with a hand-written MoE FFN in every layer (no attention: not needed here)."""

    def __init__(
        self,
        vocab: int = VOCAB,
        hidden: int = HIDDEN,
        layers: int = 2,
        num_experts: int = 8,
        top_k: int = 2,
        intermediate: int = 48,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.moes = nn.ModuleList(HandWrittenMoE(hidden, intermediate, num_experts, top_k) for _ in range(layers))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for norm, moe in zip(self.norms, self.moes, strict=True):
            h = h + moe(norm(h))
        return self.head(h)


def tiny_model(family: str, seed: int = 0) -> nn.Module:
    """A tiny randomly initialised model of ``family`` (one of :data:`FAMILIES`, or ``"dense"``), in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    ids = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    decoder = dict(ids, hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if family == "mixtral":
        model = tf.MixtralForCausalLM(
            tf.MixtralConfig(
                **decoder, intermediate_size=48, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2
            )
        )
    elif family == "qwen2_moe":
        model = tf.Qwen2MoeForCausalLM(
            tf.Qwen2MoeConfig(
                **decoder,
                intermediate_size=64,
                moe_intermediate_size=24,
                shared_expert_intermediate_size=40,
                num_hidden_layers=2,
                num_experts=8,
                num_experts_per_tok=2,
                norm_topk_prob=False,
            )
        )
    elif family == "qwen3_moe":
        model = tf.Qwen3MoeForCausalLM(
            tf.Qwen3MoeConfig(
                **decoder,
                head_dim=8,
                intermediate_size=64,
                moe_intermediate_size=24,
                num_hidden_layers=2,
                num_experts=8,
                num_experts_per_tok=2,
                norm_topk_prob=True,
            )
        )
    elif family == "olmoe":
        model = tf.OlmoeForCausalLM(
            tf.OlmoeConfig(**decoder, intermediate_size=24, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2)
        )
    elif family == "deepseek_v3":
        model = tf.DeepseekV3ForCausalLM(
            tf.DeepseekV3Config(
                **ids,
                hidden_size=HIDDEN,
                num_attention_heads=4,
                num_key_value_heads=4,
                max_position_embeddings=128,
                intermediate_size=64,
                moe_intermediate_size=16,
                num_hidden_layers=3,
                first_k_dense_replace=1,
                n_routed_experts=8,
                num_experts_per_tok=2,
                n_group=4,
                topk_group=2,
                n_shared_experts=1,
                routed_scaling_factor=2.5,
                kv_lora_rank=16,
                q_lora_rank=16,
                qk_rope_head_dim=8,
                qk_nope_head_dim=8,
                v_head_dim=8,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            )
        )
    elif family == "gpt_oss":
        model = tf.GptOssForCausalLM(
            tf.GptOssConfig(
                **decoder,
                head_dim=8,
                intermediate_size=24,
                num_hidden_layers=2,
                num_local_experts=8,
                num_experts_per_tok=2,
                layer_types=["sliding_attention", "full_attention"],
                sliding_window=16,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            )
        )
    elif family == "switch":
        model = tf.SwitchTransformersForConditionalGeneration(
            tf.SwitchTransformersConfig(
                **ids,
                decoder_start_token_id=0,
                d_model=HIDDEN,
                d_kv=8,
                d_ff=48,
                num_layers=2,
                num_decoder_layers=2,
                num_heads=4,
                num_experts=8,
                encoder_sparse_step=1,
                decoder_sparse_step=1,
                expert_capacity=64,
            )
        )
    elif family == "hand_written":
        model = HandWrittenMoELM()
    elif family == "dense":
        model = tf.MistralForCausalLM(tf.MistralConfig(**decoder, intermediate_size=48, num_hidden_layers=2))
    else:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)} or 'dense'")
    _spread_router_weights(model)
    return model.eval()


def _spread_router_weights(model: nn.Module) -> None:
    """transformers initialises routers with std 0.02, which makes every tiny router nearly uniform.
    A wider spread gives the tests routing decisions that are far from ties. Correction biases start at
    zero, where a trained model's are not: they get a spread too, so that the tests exercise them. So do
    tables of experts by token id (``[vocab, k]`` integers: DeepSeek-V4's), which start at expert 0 for every
    token and slot: each token gets k distinct random experts."""
    with torch.no_grad():
        for p in model.parameters():
            if p.shape == (NUM_EXPERTS, HIDDEN):
                p.normal_(0.0, 0.3)
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("correction_bias") and t.shape[-1:] == (NUM_EXPERTS,):
                t.normal_(0.0, 0.05)
            if not t.is_floating_point() and t.ndim == 2 and t.shape[0] == VOCAB and t.shape[1] < NUM_EXPERTS:
                t.copy_(torch.rand(VOCAB, NUM_EXPERTS).argsort(dim=-1)[:, : t.shape[1]])


def example_inputs(family: str, batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword inputs for :func:`tiny_model` or :func:`tiny_transformers_model` (``input_ids`` and
    ``attention_mask``; encoder-decoder pairs too)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    if family == "hand_written":
        return {"input_ids": ids}
    inputs = {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    own = family in (*FAMILIES, "dense")  # the transformers families are enumerated only when asked for
    if family == "switch" or (not own and _moe_families()[family].config_class.is_encoder_decoder):
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, max(2, seq - 3)), generator=g)
    return inputs


EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "top_k_experts", "moe_k", "moe_topk", "moe_top_k")
# Sizes every family's config is shrunk to, by attribute name; a config gets those it has.
_TINY_SIZES = dict(
    vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=0,
    hidden_size=HIDDEN, d_model=HIDDEN, intermediate_size=48, ffn_dim=48, d_ff=48, ffn_hidden_size=48,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=16, moe_shared_expert_intermediate_size=16, shared_intermediate_size=16,
    num_attention_heads=4, num_heads=4, n_heads=4, encoder_attention_heads=4, decoder_attention_heads=4,
    num_key_value_heads=2, head_dim=8, d_kv=8, max_position_embeddings=128, sliding_window=16,
    kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, qk_head_dim=16, v_head_dim=8,
    linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
    linear_head_dim=8, linear_num_heads=4,
    mamba_n_heads=4, mamba_d_head=16, mamba_num_heads=4, mamba_head_dim=16, mamba_d_state=8, ssm_state_size=8,
    mamba_dt_rank=4, mamba_chunk_size=8, chunk_size=8, mamba_n_groups=1, n_groups=1,
    zero_expert_num=2, expert_ffn_hidden_size=16,
    index_n_heads=2, index_head_dim=8, index_topk=4, o_lora_rank=8, o_groups=2, hc_lowrank=8,
    router_hidden_size=16, hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB,
    swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8,
    ple_embed_dim=8, ngram_vocab_size_base=VOCAB, make_ngram_vocab_size_divisible_by=8, split_ngram_parts=2,
    first_k_dense_replace=0, num_dense_layers=0, decoder_sparse_step=1, encoder_sparse_step=1, moe_layer_freq=1,
    expert_layer_period=1, expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1, mlp_only_layers=[],
    expert_capacity=64, enable_moe_block=True,
)  # fmt: skip
_LAYER_COUNT_KEYS = (
    "num_hidden_layers",
    "num_layers",
    "n_layers",
    "num_decoder_layers",
    "encoder_layers",
    "decoder_layers",
)
_LAYER_KIND_KEYS = ("layer_types", "layers_block_type")
_FAMILY_SIZES = {  # what a family's own validation demands beyond the rules
    "dots3_note_text": dict(num_key_value_heads=4),
    "zaya": dict(num_experts_per_tok=1),
    "dbrx": dict(attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0)),  # unset ones break it
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
    "granitemoehybrid": dict(layer_types=["linear_attention", "attention"]),
    "kolibri1_1": dict(  # its layer-index lists name layers of the full depth
        layer_types=["sliding_attention", "indexed_attention"],
        index_layers=[1],
        kv_source_layers=[0, 1],
        mlp_only_layers=[],
        head_dim=16,
        index_pool_size=16,
        index_compression=4,
        index_num_heads=2,
    ),
    "qwen4_exp_text": dict(
        indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=4, indexer_compress_ratio=2
    ),
}


def transformers_moe_families() -> dict[str, type[nn.Module]]:
    """Every MoE text family of the installed transformers: model type -> its language-model class.

    A family is a config class with an expert count (:data:`EXPERT_COUNT_KEYS`, possibly unset by default)
    whose model type has a causal-LM class, or a conditional-generation class for encoder-decoder models,
    built from that config itself (not a multimodal wrapper's). Model types that only alias another
    family's classes are not repeated.
    """
    return dict(_moe_families())


@functools.cache
def _moe_families() -> dict[str, type[nn.Module]]:
    import transformers as tf
    from transformers.models.auto import configuration_auto, modeling_auto

    families = {}
    for model_type in configuration_auto.CONFIG_MAPPING_NAMES:
        name = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(
            model_type, modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.get(model_type)
        )
        if name is None or not hasattr(tf, name):
            continue
        lm_class = getattr(tf, name)
        config_class = configuration_auto.CONFIG_MAPPING[model_type]
        subs = getattr(config_class, "sub_configs", {}).values()
        parts = [c for c in subs if not getattr(c, "model_type", "x")]  # DBRX's FFN config, not a text model's
        configs = [config_class, *parts]
        if lm_class.config_class is config_class and any(hasattr(c, k) for c in configs for k in EXPERT_COUNT_KEYS):
            families[model_type] = lm_class
    return families


def _tiny_config_values(defaults: dict[str, Any]) -> dict[str, Any]:
    """The attributes of a config (given as its defaults) that shrink it to a tiny model with 8 experts,
    top-2 routing and an MoE FFN in every layer that can have one, keeping one layer of each layer kind."""
    values: dict[str, Any] = {k: v for k, v in _TINY_SIZES.items() if k in defaults}
    values |= {k: NUM_EXPERTS for k in EXPERT_COUNT_KEYS if k in defaults}
    values |= {k: 2 for k in _TOP_K_KEYS if k in defaults}
    values |= {k: 1 for k in ("n_shared_experts", "num_shared_experts") if k in defaults and defaults[k] is None}
    for groups in ("n_group", "num_expert_group"):
        if (defaults.get(groups) or 1) > 1:  # keep group-limited routing: 4 groups of 2, top-2 groups
            values |= {groups: 4, "topk_group": 2}
    if defaults.get("kv_lora_rank"):  # multi-head latent attention has as many key-value heads as heads
        values["num_key_value_heads"] = values["num_attention_heads"]
    if defaults.get("q_lora_rank"):
        values["q_lora_rank"] = 16
    depth = next((defaults[k] for k in _LAYER_COUNT_KEYS if isinstance(defaults.get(k), int)), 0)
    kinds = next((defaults[k] for k in _LAYER_KIND_KEYS if isinstance(defaults.get(k), list)), [])
    keep = sorted({kinds.index(kind) for kind in kinds})  # the first layer of each kind
    keep += [i for i in range(depth) if i not in keep][: max(0, 2 - len(keep))]
    for key, value in defaults.items():  # every per-layer list, sliced to the kept layers
        if isinstance(value, list) and len(value) == depth and key not in values:
            values[key] = [value[i] for i in keep]
    if "sparse" in defaults.get("mlp_layer_types", []):
        values["mlp_layer_types"] = ["sparse"] * len(keep)
    values |= {k: len(keep) for k in _LAYER_COUNT_KEYS if k in defaults}
    for key, sub in defaults.items():  # nested configs (DBRX's attention and FFN)
        if isinstance(sub, dict) and any(k in sub for k in (*EXPERT_COUNT_KEYS, *_TINY_SIZES)):
            values[key] = _tiny_config_values(sub)
    return values


def tiny_transformers_model(model_type: str, seed: int = 0) -> nn.Module:
    """A tiny randomly initialised model of any family :func:`transformers_moe_families` lists, in eval mode."""
    families = _moe_families()
    if model_type not in families:
        raise ValueError(f"{model_type!r} is not an MoE text family of the installed transformers")
    lm_class = families[model_type]
    values = _tiny_config_values(lm_class.config_class().to_dict()) | _FAMILY_SIZES.get(model_type, {})
    torch.manual_seed(seed)
    model = lm_class(lm_class.config_class(**values))
    _spread_router_weights(model)
    return model.eval()
