"""Tiny, randomly initialised MoE models of every supported family.

They are built from transformers config classes (nothing is downloaded) and serve the tests, the demo and
the documentation's table of supported families. ``HandWrittenMoELM`` is the kind of MoE a user writes in
plain PyTorch: a router ``nn.Linear``, experts as separate ``nn.Linear`` FFNs in an ``nn.ModuleList``, and
a loop over experts.
"""

from __future__ import annotations

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
        probs = self.router(x).softmax(dim=-1)
        weights, index = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
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
        # a trained model's correction bias is not zero; make the tests exercise it
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.05)
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
    A wider spread gives the tests routing decisions that are far from ties."""
    with torch.no_grad():
        for p in model.parameters():
            if p.shape == (NUM_EXPERTS, HIDDEN):
                p.normal_(0.0, 0.3)


def example_inputs(family: str, batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword inputs for :func:`tiny_model` (``input_ids`` and ``attention_mask``; encoder-decoder pairs too)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    if family == "hand_written":
        return {"input_ids": ids}
    inputs = {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    if family == "switch":
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, max(2, seq - 3)), generator=g)
    return inputs
