"""Generation with a key/value cache: the decoder step ``moefx.export.onnx(..., kv_cache=True)`` exports, and
greedy decoding of that file in ONNX Runtime.

The exported graph is one decoding step of a causal language model. It takes the new tokens
(``input_ids``), the attention mask over past and new positions, the new tokens' ``position_ids`` and, for
every attention layer, the cached keys and values (``past_key_values.<layer>.key`` and ``.value``,
``[batch, kv_heads, past, head_dim]``, or whatever else the model's attention caches per position, such
as multi-head latent attention's compressed latents); it returns the logits of the new tokens and the cache
with them appended (``present.<layer>.key`` and ``.value``). The first step feeds a past of length 0, so one file
serves the prompt and every next token. Sliding-window layers get their whole history, masked to the
window as the model's own mask does, so each step computes what transformers computes. Every step returns
the logits of all its new tokens, so a prompt's step holds ``batch x prompt x vocabulary`` floats.

Decoding is plain greedy. A model whose generation config changes greedy tokens (a repetition penalty,
n-gram blocking, a minimum length, suppressed or forced tokens) has those settings recorded in the file,
and :class:`OnnxGenerator` warns that it does not apply them.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from moefx.errors import ConfigError, MoefxWarning, first_line

GENERATION_KEY = "moefx.generation"  # metadata: the model's eos_token_id and pad_token_id
_PAST, _PRESENT = "past_key_values", "present"
# generation-config fields whose logits processors change greedy tokens in transformers' generate
_GREEDY_PROCESSORS = ("repetition_penalty", "no_repeat_ngram_size", "min_length", "min_new_tokens", "bad_words_ids",
                      "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id",
                      "sequence_bias", "exponential_decay_length_penalty")  # fmt: skip
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _cache_names(prefix: str, num_layers: int) -> list[str]:
    return [f"{prefix}.{layer}.{part}" for layer in range(num_layers) for part in ("key", "value")]


class CachedDecoder(nn.Module):
    """One decoding step of a causal LM, on tensors only: ``(input_ids, attention_mask[, position_ids],
    *past)`` to ``(logits, *present)``, past and present flattened as (key, value) per layer."""

    def __init__(self, model: nn.Module, num_layers: int, cache_argument: str, takes_positions: bool) -> None:
        super().__init__()
        self.model = model
        self.num_layers, self.cache_argument, self.takes_positions = num_layers, cache_argument, takes_positions
        self.first_past = 3 if takes_positions else 2  # the index of the first cache input
        positions = ["position_ids"] if takes_positions else []
        self.input_names = ["input_ids", "attention_mask", *positions, *_cache_names(_PAST, num_layers)]
        self.output_names = ["logits", *_cache_names(_PRESENT, num_layers)]

    @property
    def served(self) -> nn.Module:
        return self.model

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        past = inputs[self.first_past :]
        cache = DynamicCache()
        for layer in range(self.num_layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        positions = {"position_ids": inputs[2]} if self.takes_positions else {}
        output = self.model(input_ids=inputs[0], attention_mask=inputs[1], **positions, use_cache=True,
                            **{self.cache_argument: cache})  # fmt: skip
        return (output.logits, *(t for layer in cache.layers for t in (layer.keys, layer.values)))

    def check_inputs(self, example: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """A step unlike ``example``'s, shaped as decoding is: one more row, one new token after three more
        past positions, the first row left-padded by two."""
        ids, past = example[0], example[self.first_past :]
        rows, new, length = ids.shape[0] + 1, 1, past[0].shape[2] + 3
        g = torch.Generator().manual_seed(1234)
        new_ids = torch.randint(int(ids.min()), int(ids.max()) + 1, (rows, new), generator=g, dtype=ids.dtype)
        mask = torch.ones(rows, length + new, dtype=example[1].dtype)
        mask[0, :2] = 0
        positions = ((mask.cumsum(-1) - 1).clamp(min=0)[:, length:],) if self.takes_positions else ()
        cached = tuple(torch.randn(rows, t.shape[1], length, t.shape[3], generator=g).to(t.dtype) for t in past)
        return (new_ids, mask, *positions, *cached)

    def dynamic_shapes(self, example: tuple[torch.Tensor, ...]) -> tuple[tuple[Any, ...]]:
        """Batch and sequence axes of the token inputs; batch and past-length axes of the cache."""
        auto = torch.export.Dim.AUTO
        tokens = tuple({0: auto, 1: auto} for _ in range(self.first_past))
        return ((*tokens, *({0: auto, 2: auto} for _ in example[self.first_past :])),)

    def generation_metadata(self) -> str:
        """What greedy decoding must know of the model: its end-of-sequence and padding tokens, and the
        settings of its generation config that would change greedy tokens (which the generator does not apply)."""
        from transformers import GenerationConfig

        config = getattr(self.model, "generation_config", None)
        eos, pad = getattr(config, "eos_token_id", None), getattr(config, "pad_token_id", None)
        neutral = GenerationConfig()
        ignored = {f: getattr(config, f, None) for f in _GREEDY_PROCESSORS}
        ignored = {f: v for f, v in ignored.items() if v != getattr(neutral, f, None)}
        eos = None if eos is None else torch.as_tensor(eos).reshape(-1).tolist()
        return json.dumps({"eos_token_id": eos, "pad_token_id": pad, "ignored": ignored}, default=str)


def cached_decoder(
    model: nn.Module, names: list[str], example: tuple[torch.Tensor, ...]
) -> tuple[CachedDecoder, tuple[torch.Tensor, ...]]:
    """The decoder step of a serving copy of ``model`` and its example inputs: the example's first half of
    tokens is run to make the past, the second half is the step's new tokens. ``names`` are the example's
    input names. A model that is not a decoder with an attention key/value cache gets one error line."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    kind = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False) or "input_ids" not in names:
        raise ConfigError(f"kv_cache=True exports a decoder-only causal LM given example_inputs as a dict with "
                          f"input_ids; {kind} is not one, or was given none: export it without kv_cache")  # fmt: skip
    parameters = inspect.signature(model.forward).parameters
    cache_argument = next((a for a in ("cache", "past_key_values") if a in parameters), None)
    if cache_argument is None:
        raise ConfigError(f"{kind} takes no key/value cache (its forward has no cache or past_key_values "
                          "argument): export it without kv_cache")  # fmt: skip
    ids = example[names.index("input_ids")]
    # two rows, and two positions in each half at least: an axis of size 1 would be fixed by the export
    ids = ids.repeat(2 if ids.shape[0] < 2 else 1, 2 + 4 // ids.shape[1] if ids.shape[1] < 4 else 1)
    rows, length = ids.shape
    past_length = length // 2
    cache = DynamicCache()
    try:
        with torch.no_grad():
            model(input_ids=ids[:, :past_length], use_cache=True, **{cache_argument: cache})
    except Exception as exc:  # e.g. a recurrent layer asking the cache for a state it does not hold
        raise ConfigError(f"{kind}'s cache is not attention keys and values alone ({first_line(exc)}): "
                          "export it without kv_cache") from exc  # fmt: skip
    layers = cache.layers
    if not layers or any(type(layer) is not DynamicLayer or layer.keys is None for layer in layers):
        raise ConfigError(f"{kind}'s cache is not attention keys and values alone: export it without kv_cache")
    decoder = CachedDecoder(model, len(layers), cache_argument, "position_ids" in parameters)
    positions = (torch.arange(past_length, length).expand(rows, -1),) if decoder.takes_positions else ()
    past = tuple(t for layer in layers for t in (layer.keys, layer.values))
    mask = torch.ones(rows, length, dtype=torch.long)
    return decoder, (ids[:, past_length:], mask, *positions, *past)


class OnnxGenerator:
    """Greedy decoding, in ONNX Runtime, of a file ``moefx.export.onnx(..., kv_cache=True)`` wrote.

    :meth:`generate` runs the prompt in one step, then one token per step, feeding each step's
    ``present.*`` back as the next step's ``past_key_values.*``; tokens, padding and stopping follow
    transformers' ``generate(do_sample=False)``. :meth:`step` and :meth:`empty_cache` are the pieces, for
    other decoding loops (sampling, timing). ``threads`` and ``profile_prefix`` are
    :func:`~moefx.export.onnx.cpu_session`'s (a profiled generator's ``session.end_profiling()`` writes
    the profile).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, profile_prefix: str | None = None) -> None:
        from moefx.export.onnx import cpu_session  # onnx imports this module

        self.session = cpu_session(path, threads, profile_prefix)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.past = [i for i in self.session.get_inputs() if i.name.startswith(f"{_PAST}.")]
        if not self.past:
            raise ConfigError(f"{path} takes no key/value cache: export it with moefx.export.onnx(..., kv_cache=True)")
        # the past input each present output feeds at the next step
        self.next_past = [o.name.replace(_PRESENT, _PAST, 1) for o in self.session.get_outputs()[1:]]
        metadata = json.loads(self.session.get_modelmeta().custom_metadata_map.get(GENERATION_KEY, "{}"))
        self.eos_token_id: list[int] | None = metadata.get("eos_token_id")
        self.pad_token_id: int | None = metadata.get("pad_token_id")
        if metadata.get("ignored"):
            ignored = metadata["ignored"]
            warnings.warn(f"{path}: greedy decoding here does not apply the model's generation settings {ignored}; "
                          "transformers' generate does", MoefxWarning, stacklevel=2)  # fmt: skip

    def empty_cache(self, rows: int) -> dict[str, np.ndarray]:
        """The cache before the first step: every ``past_key_values.*`` input with a past of length 0."""
        return {i.name: np.zeros((rows, i.shape[1], 0, i.shape[3]), _NUMPY_TYPES[i.type]) for i in self.past}

    def step(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None,
        cache: dict[str, np.ndarray],
    ) -> tuple[torch.Tensor, dict[str, np.ndarray]]:  # fmt: skip
        """One decoding step: the new tokens' logits and the cache to feed the next step. Tokens, mask and
        positions (int64 tensors; positions are ignored by a file that takes none) cover the new tokens; the
        mask also covers the past."""
        feed = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        if position_ids is not None:
            feed["position_ids"] = position_ids.numpy()
        outputs = self.session.run(None, {n: feed[n] if n in feed else cache[n] for n in self.input_names})
        return torch.from_numpy(outputs[0]), dict(zip(self.next_past, outputs[1:], strict=True))

    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        attention_mask: torch.Tensor | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """``[batch, prompt + new]`` token ids: the prompt, then up to ``max_new_tokens`` greedy tokens.

        A left-padded batch takes its ``attention_mask`` (zeros on the padding); without one, as in
        transformers, the padding token marks padding unless it is also an end-of-sequence token. A row that
        produced an end-of-sequence token (the model's, unless ``eos_token_id`` is given) continues with
        padding (the end-of-sequence token where the model has no padding token), and decoding stops once
        every row has ended.
        """
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        sequences = torch.as_tensor(input_ids, dtype=torch.long)
        eos = eos_token_id if eos_token_id is not None else self.eos_token_id
        eos = torch.as_tensor(eos, dtype=torch.long).reshape(-1) if eos is not None else None
        eos = eos if eos is not None and eos.numel() else None  # an empty list: decode to max_new_tokens
        pad = pad_token_id if pad_token_id is not None else self.pad_token_id
        if eos is not None and pad is None:
            pad = int(eos[0])
        if attention_mask is not None:
            mask = torch.as_tensor(attention_mask).long()
        elif pad is not None and bool((sequences == pad).any()) and (eos is None or pad not in eos.tolist()):
            mask = (sequences != pad).long()
        else:
            mask = torch.ones_like(sequences)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        new_tokens, cache = sequences, self.empty_cache(sequences.shape[0])
        unfinished = torch.ones(sequences.shape[0], dtype=torch.bool)
        for _ in range(max_new_tokens):
            logits, cache = self.step(new_tokens, mask, positions, cache)
            token = logits[:, -1].argmax(dim=-1)
            if eos is not None:
                token = torch.where(unfinished, token, pad)
                unfinished &= ~torch.isin(token, eos)
            sequences = torch.cat([sequences, token[:, None]], dim=1)
            if not bool(unfinished.any()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            new_tokens, positions = token[:, None], positions[:, -1:] + 1
        return sequences
