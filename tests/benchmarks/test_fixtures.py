"""The benchmark data helpers and the checked-in fixture models (loaded as shipped, checked against their logs)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from benchmarks.data import (
    PAD_ID,
    UNK_ID,
    VAL_FRACTION,
    CharVocab,
    DataNotFoundError,
    WordVocab,
    classification_accuracy,
    classification_batches,
    classification_loss,
    data_dir,
    data_file,
    lm_eval_batches,
    lm_train_batches,
    lm_validation_loss,
    pad_batch,
    read_sst2,
    shakespeare_splits,
    shakespeare_text,
    sst2_char_vocab,
    sst2_lm_splits,
    sst2_text,
    tokenize,
)
from benchmarks.models import FIXTURES_DIR, MAX_FIXTURE_BYTES, load_classifier, load_lm
from benchmarks.train import LM_CHECK_BATCHES, LM_SEQ_LEN, moe_layer_names

logging.getLogger("transformers").setLevel(logging.ERROR)

FIXTURE_FILES = ("config.json", "model.safetensors", "vocab.json", "train_log.json")


def _require_data() -> None:
    if not (data_dir() / "tinyshakespeare").is_dir() or not (data_dir() / "sst2").is_dir():
        pytest.skip(f"benchmark data not found at {data_dir()} (set MOEFX_DATA)")


def _require_fixture(task: str) -> Path:
    path = FIXTURES_DIR / task
    missing = [name for name in FIXTURE_FILES if not (path / name).is_file()]
    if missing:
        pytest.skip(f"fixture {path} lacks {', '.join(missing)}: train it with `python benchmarks/train.py {task}`")
    return path


def _log(path: Path) -> dict:
    return json.loads((path / "train_log.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------- data helpers


def test_data_dir_follows_env_and_missing_data_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("MOEFX_DATA", str(tmp_path))
    assert data_dir() == tmp_path
    with pytest.raises(DataNotFoundError, match="MOEFX_DATA"):
        data_file("sst2", "train.tsv")
    with pytest.raises(DataNotFoundError):
        read_sst2("train")


def test_char_vocab_round_trip(tmp_path):
    vocab = CharVocab.build("to be, or not to be\n")
    assert vocab.chars == "\n ,benort"
    text = "not to be, or to be"
    ids = vocab.encode(text)
    assert ids.dtype == torch.long and vocab.decode(ids) == text
    vocab.save(tmp_path / "vocab.json")
    assert CharVocab.load(tmp_path / "vocab.json").chars == vocab.chars


def test_shakespeare_split_boundary():
    _require_data()
    text = shakespeare_text()
    train, val = shakespeare_splits()
    boundary = int(len(text) * (1.0 - VAL_FRACTION))
    assert len(train) == boundary and len(train) + len(val) == len(text)
    vocab = CharVocab.build(text)
    assert vocab.decode(val[:200]) == text[boundary : boundary + 200]
    assert vocab.decode(train[-200:]) + vocab.decode(val[:5]) == text[boundary - 200 : boundary + 5]


def test_sst2_lm_splits_are_train_text_and_test_text_halved_at_a_line():
    _require_data()
    vocab = sst2_char_vocab()
    train, tuning, val = sst2_lm_splits(vocab)
    test_text = sst2_text("test")
    assert vocab.decode(train) == sst2_text("train")
    assert vocab.decode(tuning) + vocab.decode(val) == test_text
    longest_line = max(map(len, test_text.splitlines())) + 1
    assert vocab.decode(tuning).endswith("\n") and abs(len(tuning) - len(val)) <= 2 * longest_line
    assert sst2_text("train").count("\n") == len(read_sst2("train"))


def test_lm_eval_batches_are_fixed_non_overlapping_windows():
    ids = torch.arange(1000)
    batches = lm_eval_batches(ids, seq_len=128, batch_size=3)
    windows = torch.cat([b["input_ids"] for b in batches])
    assert windows.shape == (1000 // 128, 128)
    assert torch.equal(windows.reshape(-1), ids[: 7 * 128])
    assert all(torch.equal(b["attention_mask"], torch.ones_like(b["input_ids"])) for b in batches)
    again = lm_eval_batches(ids, seq_len=128, batch_size=3)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again, strict=True))


def test_lm_train_batches_are_seeded_contiguous_windows():
    ids = torch.arange(500)
    stream, same = lm_train_batches(ids, 16, 4, seed=3), lm_train_batches(ids, 16, 4, seed=3)
    first = [next(stream)["input_ids"] for _ in range(3)]
    second = [next(same)["input_ids"] for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    for batch in first:
        assert batch.shape == (4, 16)
        assert torch.equal(batch - batch[:, :1], torch.arange(16).expand(4, 16))
    other = next(lm_train_batches(ids, 16, 4, seed=4))["input_ids"]
    assert not torch.equal(other, first[0])


def test_tokenize_words_and_punctuation():
    assert tokenize("It's a charming, often-affecting journey. ") == [
        "it",
        "'",
        "s",
        "a",
        "charming",
        ",",
        "often",
        "-",
        "affecting",
        "journey",
        ".",
    ]


def test_word_vocab_round_trip_and_unknown_words(tmp_path):
    vocab = WordVocab.build(["a good film", "a bad film", "good grief"], min_freq=2)
    assert vocab.words == ("<pad>", "<unk>", "a", "film", "good")
    assert vocab.words[PAD_ID] == "<pad>" and vocab.words[UNK_ID] == "<unk>"
    ids = vocab.encode("A good, good film")
    assert ids == [2, 4, UNK_ID, 4, 3]
    assert vocab.decode(vocab.encode("good film a")) == "good film a"
    vocab.save(tmp_path / "vocab.json")
    assert WordVocab.load(tmp_path / "vocab.json").words == vocab.words


def test_pad_batch_right_pads_and_masks():
    batch = pad_batch([[5, 6, 7], [8], []], max_len=128)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, PAD_ID, PAD_ID], [UNK_ID, PAD_ID, PAD_ID]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 0, 0]]
    assert pad_batch([list(range(2, 12))], max_len=4)["input_ids"].tolist() == [[2, 3, 4, 5]]


def test_classification_batches_order_labels_and_shuffle():
    vocab = WordVocab.build(["a b c"] * 2)
    examples = [("a", 0), ("a b", 1), ("a b c", 0), ("c c c c", 1), ("b", 1)]
    batches = classification_batches(examples, vocab, batch_size=2)
    assert [len(labels) for _, labels in batches] == [2, 2, 1]
    assert torch.cat([labels for _, labels in batches]).tolist() == [0, 1, 0, 1, 1]
    inputs = batches[1][0]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    shuffled = classification_batches(examples, vocab, batch_size=5, seed=1)
    assert sorted(shuffled[0][1].tolist()) == [0, 0, 1, 1, 1]
    assert torch.equal(
        shuffled[0][0]["input_ids"], classification_batches(examples, vocab, 5, seed=1)[0][0]["input_ids"]
    )


def test_read_sst2_splits():
    _require_data()
    sizes = {"train": 60614, "dev": 6735, "test": 872}
    for split, size in sizes.items():
        pairs = read_sst2(split)
        assert len(pairs) == size
        assert {label for _, label in pairs} == {0, 1}
        assert all(sentence and "\t" not in sentence for sentence, _ in pairs)
    with pytest.raises(ValueError, match="unknown SST-2 split"):
        read_sst2("validation")


# ---------------------------------------------------------------- fixtures


def _check_routing_log(log: dict, layers: list[str], num_experts: int) -> None:
    assert list(log["expert_frequency"]) == layers
    for name in layers:
        frequency = log["expert_frequency"][name]
        assert len(frequency) == num_experts and sum(frequency) == pytest.approx(1.0)
        spread = log["router_spread"][name]
        # routers that tell tokens apart, not uniform ones
        assert spread["token_entropy"] < spread["uniform_entropy"]
        assert spread["top_k_mass"] > 2 * spread["uniform_top_k_mass"]


def _lm_fixture(task: str) -> tuple:
    path = _require_fixture(task)
    return path, load_lm(path), CharVocab.load(path / "vocab.json"), _log(path)


def _check_lm_fixture(fixture: tuple, experts: int, top_k: int, text: str) -> None:
    """The fixture's size, experts, logits on ``text``, MoE layers and routing log."""
    path, model, vocab, log = fixture
    config = model.config
    assert not model.training and config.vocab_size == len(vocab)
    num_experts = getattr(config, "num_local_experts", None) or config.num_experts
    assert (num_experts, config.num_experts_per_tok) == (experts, top_k)
    assert (path / "model.safetensors").stat().st_size == log["fixture_bytes"] <= MAX_FIXTURE_BYTES
    ids = vocab.encode(text)
    logits = model(input_ids=ids[None], attention_mask=torch.ones_like(ids[None])).logits
    assert logits.shape == (1, len(ids), len(vocab))
    layers = moe_layer_names(model)
    assert layers == [f"model.layers.{i}.mlp" for i in range(config.num_hidden_layers)]
    _check_routing_log(log, layers, experts)


@pytest.fixture(scope="module")
def lm_fixture():
    return _lm_fixture("lm")


def test_lm_fixture_shapes_and_vocab(lm_fixture):
    _check_lm_fixture(lm_fixture, 16, 2, "ROMEO:\nBut soft, what light")
    _require_data()
    vocab = lm_fixture[2]
    assert vocab.chars == CharVocab.build(shakespeare_text()).chars


@pytest.mark.parametrize(
    ("fixture", "validation"),
    [("lm_fixture", lambda vocab: shakespeare_splits(vocab)[1]), ("fine_lm_fixture", lambda v: sst2_lm_splits(v)[2])],
    ids=["lm", "lm-fine"],
)
def test_lm_fixtures_match_their_logs(fixture, validation, request):
    _require_data()
    _, model, vocab, log = request.getfixturevalue(fixture)
    loss = lm_validation_loss(model, lm_eval_batches(validation(vocab), LM_SEQ_LEN)[:LM_CHECK_BATCHES])
    assert loss == pytest.approx(log["check"]["val_loss"], abs=1e-3)
    assert log["final"]["val_loss"] == pytest.approx(min(p["val_loss"] for p in log["curve"]), abs=1e-4)
    # a trained char model, far below the ~3.3 nats of unigram frequencies
    assert log["final"]["val_loss"] < 2.0


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["original", "default fused", "default int4"])
def test_lm_fixture_generates_in_onnx_runtime_what_transformers_generates(lm_fixture, variant, tmp_path):
    """Greedy text from the kv-cache ONNX file equals transformers' generate, token for token (an int4 file
    against the eager model with the same rounded expert weights)."""
    import moefx
    import moefx.export
    from benchmarks.data import lm_calibration

    _require_data()
    _, model, vocab, _ = lm_fixture
    train, val = shakespeare_splits(vocab)
    if variant != "original":
        model = moefx.compile(model, lm_calibration(train, 64), experts=0.25)
    example = {"input_ids": val[None, :16], "attention_mask": torch.ones(1, 16, dtype=torch.long)}
    options = {"fused": True} if variant == "default fused" else {"expert_bits": 4} if variant == "default int4" else {}
    path = moefx.export.onnx(model, tmp_path / "lm.onnx", example, kv_cache=True, **options)
    reference = moefx.export.with_quantized_experts(model, example, 4) if variant == "default int4" else model
    prompts = torch.stack([vocab.encode("ROMEO:\nBut soft, what "), vocab.encode("KING HENRY:\nOnce more ")])
    expected = reference.generate(input_ids=prompts, max_new_tokens=16, do_sample=False)
    got = moefx.export.OnnxGenerator(path).generate(prompts, 16)
    assert torch.equal(got, expected), (vocab.decode(got[0]), vocab.decode(expected[0]))


@pytest.fixture(scope="module")
def fine_lm_fixture():
    return _lm_fixture("lm-fine")


def test_fine_lm_fixture_is_a_fine_grained_qwen3_moe_with_uneven_routing(fine_lm_fixture):
    _check_lm_fixture(fine_lm_fixture, 64, 8, "a charming and often affecting journey .")
    _, model, vocab, log = fine_lm_fixture
    assert model.config.model_type == "qwen3_moe"
    # trained with Qwen3's weak balancing coefficient: in every layer the busiest expert gets many times the
    # assignments of the least used one (9x to 770x when it was trained)
    assert all(max(f) > 5 * min(f) for f in log["expert_frequency"].values())
    _require_data()
    assert vocab.chars == sst2_char_vocab().chars


@pytest.fixture(scope="module")
def cls_fixture():
    path = _require_fixture("cls")
    return path, load_classifier(path), WordVocab.load(path / "vocab.json"), _log(path)


def test_classifier_fixture_shapes_and_vocab(cls_fixture):
    path, model, vocab, log = cls_fixture
    config = model.encoder.config
    assert not model.training
    assert config.vocab_size == len(vocab) == model.encoder.shared.num_embeddings
    assert (path / "model.safetensors").stat().st_size == log["fixture_bytes"] <= MAX_FIXTURE_BYTES
    batch = pad_batch([vocab.encode("a gripping , funny film"), vocab.encode("dull")])
    assert model(**batch).shape == (2, 2)
    layers = moe_layer_names(model)
    assert layers == [f"encoder.encoder.block.{i}.layer.1.mlp" for i in (1, 3)]
    _check_routing_log(log, layers, config.num_experts)
    _require_data()
    assert vocab.words == WordVocab.build(sentence for sentence, _ in read_sst2("train")).words


def test_classifier_fixture_matches_its_log(cls_fixture):
    _require_data()
    _, model, vocab, log = cls_fixture
    batches = classification_batches(read_sst2("test"), vocab)
    accuracy = classification_accuracy(model, batches)
    assert accuracy == pytest.approx(log["check"]["test_accuracy"], abs=1.5 / 872)
    assert classification_loss(model, batches) == pytest.approx(log["check"]["test_loss"], abs=1e-3)
    assert accuracy > 0.7
