"""The three benchmark fixture models, their configurations, and saving/loading them.

* LM fixture: a small ``MixtralForCausalLM`` (16 experts, top-2, in every layer) on tinyshakespeare characters.
* Fine-grained LM fixture: a small ``Qwen3MoeForCausalLM`` (64 narrow experts, top-8, in every layer, grouped-query
  attention) on the characters of SST-2's sentences as running text.
* Classifier fixture: :class:`SwitchClassifier`, a ``SwitchTransformersEncoderModel`` (32 experts, top-1,
  every other layer, like switch-base) with masked mean pooling and a linear head, on SST-2.
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedModel,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    SwitchTransformersConfig,
    SwitchTransformersEncoderModel,
)
from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersTop1Router

from benchmarks.data import PAD_ID

FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"
MAX_FIXTURE_BYTES = 20 * 1024 * 1024


# what both character LM fixtures share: their trunk's size and no special tokens
_CHAR_LM = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=256,
    pad_token_id=None,
    bos_token_id=None,
    eos_token_id=None,
)


def lm_config(vocab_size: int) -> MixtralConfig:
    """The LM fixture's configuration for a character vocabulary of ``vocab_size``."""
    return MixtralConfig(
        vocab_size=vocab_size,
        intermediate_size=128,
        num_key_value_heads=4,
        num_local_experts=16,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.02,
        **_CHAR_LM,
    )


def build_lm(vocab_size: int) -> MixtralForCausalLM:
    """A freshly initialised LM fixture (seed torch beforehand for a reproducible initialisation)."""
    return MixtralForCausalLM(lm_config(vocab_size))


def fine_lm_config(vocab_size: int) -> Qwen3MoeConfig:
    """The fine-grained LM fixture's configuration for a character vocabulary of ``vocab_size``: Qwen3-30B-A3B's
    routing (softmax top-8 renormalised, no shared expert, Qwen3's load-balancing coefficient) with 64 experts a
    quarter of the hidden size wide."""
    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        intermediate_size=256,
        moe_intermediate_size=32,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=64,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        router_aux_loss_coef=0.001,
        tie_word_embeddings=False,
        **_CHAR_LM,
    )


def build_fine_lm(vocab_size: int) -> Qwen3MoeForCausalLM:
    """A freshly initialised fine-grained LM fixture (seed torch beforehand for a reproducible initialisation)."""
    return Qwen3MoeForCausalLM(fine_lm_config(vocab_size))


def classifier_config(vocab_size: int) -> SwitchTransformersConfig:
    """The classifier fixture's encoder configuration for a word vocabulary of ``vocab_size``."""
    return SwitchTransformersConfig(
        vocab_size=vocab_size,
        d_model=128,
        d_kv=32,
        num_heads=4,
        num_layers=4,
        d_ff=128,
        num_experts=32,
        # transformers derives encoder_sparse_step = num_layers // num_sparse_encoder_layers = 2
        num_sparse_encoder_layers=2,
        num_decoder_layers=0,
        num_sparse_decoder_layers=0,
        # a sequence holds at most 128 tokens, so no expert ever overflows and no token is dropped
        expert_capacity=128,
        dropout_rate=0.1,
        router_z_loss_coef=0.001,
        router_aux_loss_coef=0.01,
        pad_token_id=PAD_ID,
        is_encoder_decoder=False,
        use_cache=False,
    )


class SwitchClassifier(nn.Module):
    """A Switch Transformers encoder, masked mean pooling over tokens and a linear head: ``[batch, num_labels]``."""

    def __init__(self, config: SwitchTransformersConfig, num_labels: int = 2) -> None:
        super().__init__()
        self.num_labels = num_labels
        self.encoder = SwitchTransformersEncoderModel(config)
        self.head = nn.Linear(config.d_model, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self._classify(hidden, attention_mask)

    def forward_with_router_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The class logits and each MoE layer's router logits ``[batch, seq, num_experts]`` (for training)."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
        return self._classify(out.last_hidden_state, attention_mask), tuple(out.router_logits)

    def _classify(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)


def build_classifier(vocab_size: int) -> SwitchClassifier:
    """A freshly initialised classifier fixture (seed torch beforehand for a reproducible initialisation)."""
    model = SwitchClassifier(classifier_config(vocab_size))
    # transformers initialises Switch routers with std 1.0, which on RMS-normalised inputs gives logits of
    # std ~11: saturated, one-hot routing whose softmax passes almost no gradient. Logits of std ~1 can learn.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SwitchTransformersTop1Router):
                module.classifier.weight.normal_(0.0, module.classifier.in_features**-0.5)
    return model


def save_lm(model: PreTrainedModel, out_dir: Path) -> None:
    """``config.json`` and ``model.safetensors`` (float32) in ``out_dir``."""
    model.save_pretrained(out_dir)


def load_lm(fixture_dir: Path | str) -> PreTrainedModel:
    """The LM fixture (either of them) saved in ``fixture_dir``, in eval mode."""
    return AutoModelForCausalLM.from_pretrained(Path(fixture_dir), dtype=torch.float32).eval()


def save_classifier(model: SwitchClassifier, out_dir: Path) -> None:
    """``config.json`` (encoder config and head) and ``model.safetensors`` (float32) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "architecture": "SwitchClassifier",
        "pooling": "masked_mean",
        "num_labels": model.num_labels,
        "encoder": model.encoder.config.to_dict(),
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    # save_model, unlike save_file, handles the encoder's tied input embeddings
    safetensors.torch.save_model(model, str(out_dir / "model.safetensors"))


def load_classifier(fixture_dir: Path | str) -> SwitchClassifier:
    """The classifier fixture saved in ``fixture_dir``, in eval mode."""
    fixture_dir = Path(fixture_dir)
    config = json.loads((fixture_dir / "config.json").read_text(encoding="utf-8"))
    model = SwitchClassifier(SwitchTransformersConfig.from_dict(config["encoder"]), config["num_labels"])
    safetensors.torch.load_model(model, str(fixture_dir / "model.safetensors"))
    return model.eval()


def fixture_bytes(fixture_dir: Path) -> int:
    """The size of the fixture's weights file."""
    return (fixture_dir / "model.safetensors").stat().st_size
