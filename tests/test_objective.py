import pytest
import torch

from moefx.errors import MoefxError
from moefx.objective import is_causal_lm, logits_of, loss_available, next_token_loss, task_loss
from moefx.zoo import example_inputs, tiny_model


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_the_causal_lm_loss_is_the_models_own(family):
    model = tiny_model(family)
    batch = example_inputs(family, batch=3, seq=9, seed=1)
    batch["attention_mask"][0, :4] = 0  # left padding: those targets do not count
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        ours = task_loss(model, model(**batch), batch)
        reference = model(**batch, labels=labels).loss
    assert torch.allclose(ours, reference, atol=1e-6)


def test_which_models_have_a_loss():
    switch, hand_written = tiny_model("switch"), tiny_model("hand_written")
    assert is_causal_lm(tiny_model("mixtral"))
    assert not is_causal_lm(switch) and not is_causal_lm(hand_written)  # encoder-decoder; not a transformers model
    batch = example_inputs("switch")
    assert not loss_available(switch, batch)
    assert loss_available(switch, {**batch, "labels": batch["input_ids"]})
    assert loss_available(hand_written, example_inputs("hand_written"), loss=lambda output, batch: output.sum())
    with torch.no_grad():
        assert task_loss(switch, switch(**batch), batch) is None


def test_the_callers_loss_comes_first():
    model = tiny_model("mixtral")
    batch = example_inputs("mixtral")
    with torch.no_grad():
        output = model(**batch)
    assert task_loss(model, output, batch, loss=lambda out, b: out.logits.sum() * 0 + 7.0) == 7.0


def test_next_token_loss_reductions():
    logits = torch.randn(2, 4, 5)
    ids = torch.randint(0, 5, (2, 4))
    per_token = next_token_loss(logits, ids, None, reduction="none")
    assert per_token.shape == (6,)
    assert torch.allclose(next_token_loss(logits, ids, None), per_token.mean())
    assert torch.allclose(next_token_loss(logits, ids, None, reduction="sum"), per_token.sum())


def test_logits_of_names_what_it_got():
    assert logits_of((torch.ones(1), 2)).shape == (1,)
    with pytest.raises(MoefxError, match="returns logits, not a str"):
        logits_of("text")
