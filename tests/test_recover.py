import copy
import itertools
import warnings

import pytest
import torch

import moefx
from moefx.losparse import LoSparseLinear
from moefx.recover import cubic_keep, distillation_loss
from moefx.zoo import example_inputs, tiny_model


def _batches(n, seed=0, labels=False):
    batches = [example_inputs("mixtral", batch=4, seq=16, seed=seed + s) for s in range(n)]
    for b in batches:
        if labels:
            b["labels"] = b["input_ids"].clone()
    return batches


def _teacher():
    """A tiny model with confident predictions, so that compression visibly changes them."""
    model = tiny_model("mixtral")
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model


def _kl(student, teacher, batches):
    with torch.no_grad():
        return sum(
            distillation_loss(student(**b).logits, teacher(**b).logits, 1.0, b["attention_mask"]).item()
            for b in batches
        ) / len(batches)


def _student(teacher, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return moefx.compile(teacher, _batches(2), experts=0.25, method="mc-smoe", rank=4, **options)


def test_distillation_brings_the_student_closer_to_the_teacher():
    teacher = _teacher()
    student = _student(teacher, sparse_keep=0.2)
    held_out = _batches(2, seed=50)
    before = _kl(student, teacher, held_out)
    pure_distillation = lambda output, batch: 0.0  # noqa: E731 - the random tokens' own loss is noise
    history = moefx.recover(
        student, teacher, _batches(8), steps=40, lr=1e-4, alpha=1.0, temperature=1.0, task_loss=pure_distillation
    )
    assert len(history) == 40 and not student.training
    assert _kl(student, teacher, held_out) < 0.7 * before


def test_gradual_pruning_reaches_the_target_keep_share():
    teacher = _teacher()
    student = _student(teacher, sparse_keep=0.6)
    layers = [m for m in student.modules() if isinstance(m, LoSparseLinear)]
    total = sum(m.in_features for m in layers)
    moefx.recover(
        student, teacher, _batches(2, labels=True), steps=20, lr=1e-3, sparse_keep=0.1, prune_start=0.2, prune_end=0.6
    )
    assert all(m.mask is None for m in layers)
    assert sum(m.index.numel() for m in layers) == round(0.1 * total)
    assert sum(m.sparse.shape[1] for m in layers) == round(0.1 * total)
    with torch.no_grad():
        assert student(**_batches(1)[0]).logits.isfinite().all()


def test_cubic_schedule():
    assert cubic_keep(0, 100, 0.1, 0.7, 1.0, 0.1) == 1.0
    assert cubic_keep(10, 100, 0.1, 0.7, 1.0, 0.1) == 1.0
    assert cubic_keep(40, 100, 0.1, 0.7, 1.0, 0.1) == pytest.approx(0.1 + 0.9 * 0.5**3)
    assert cubic_keep(70, 100, 0.1, 0.7, 1.0, 0.1) == 0.1
    values = [cubic_keep(s, 100, 0.1, 0.7, 1.0, 0.1) for s in range(101)]
    assert all(a >= b for a, b in itertools.pairwise(values))  # never grows back


def test_distillation_loss_is_zero_only_for_identical_logits():
    logits = torch.randn(2, 5, 11)
    mask = torch.ones(2, 5)
    assert distillation_loss(logits, logits, 2.0, mask).abs() < 1e-6
    assert distillation_loss(logits + torch.randn(2, 5, 11), logits, 2.0, mask) > 0


def test_recover_rejects_bad_arguments():
    teacher, student = tiny_model("mixtral"), copy.deepcopy(tiny_model("mixtral"))
    with pytest.raises(moefx.CalibrationError, match="no batches"):
        moefx.recover(student, teacher, [], steps=1)
    with pytest.raises(moefx.ConfigError, match="LoSparse"):
        moefx.recover(student, teacher, _batches(1), steps=1, sparse_keep=0.1)
    with pytest.raises(moefx.ConfigError, match="steps >= 1"):
        moefx.recover(student, teacher, _batches(1), steps=0)
