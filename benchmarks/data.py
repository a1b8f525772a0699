"""Benchmark data: character-level tinyshakespeare and word-level SST-2, plus evaluation helpers.

The data directory is ``$MOEFX_DATA`` if set, else ``<repo root>/../shared/data``; nothing is downloaded.
Every batch a model sees is a dict of keyword tensors (``input_ids``, ``attention_mask``) because the
compiler calls ``model(**batch)``; classification batches pair such a dict with its labels.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moefx.objective import mean_next_token_loss

REPO_ROOT = Path(__file__).resolve().parent.parent
VAL_FRACTION = 0.1
SST2_SPLITS = ("train", "dev", "test")
PAD_ID = 0
UNK_ID = 1

Batch = dict[str, torch.Tensor]
LabeledBatch = tuple[Batch, torch.Tensor]


class DataNotFoundError(FileNotFoundError):
    """A benchmark data file is missing."""


def data_dir() -> Path:
    """The benchmark data directory: ``$MOEFX_DATA``, else ``<repo root>/../shared/data``."""
    env = os.environ.get("MOEFX_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def data_file(*parts: str) -> Path:
    """The path of a data file under :func:`data_dir`; raises :class:`DataNotFoundError` if it is missing."""
    path = data_dir().joinpath(*parts)
    if not path.is_file():
        raise DataNotFoundError(
            f"benchmark data not found: {path} (set MOEFX_DATA to the directory holding tinyshakespeare/ and sst2/)"
        )
    return path


# ---------------------------------------------------------------- tinyshakespeare (character level)


class CharVocab:
    """A character vocabulary: id ``i`` is ``chars[i]``."""

    def __init__(self, chars: str) -> None:
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def build(cls, text: str) -> CharVocab:
        """The sorted set of characters of ``text``."""
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """The ids of ``text`` as a 1-D int64 tensor (raises ``KeyError`` on an unknown character)."""
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """The text of ``ids``."""
        return "".join(self.chars[int(i)] for i in ids)

    def save(self, path: Path) -> None:
        path.write_text(
            json.dumps({"type": "char", "chars": self.chars}, ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
        )

    @classmethod
    def load(cls, path: Path) -> CharVocab:
        return cls(json.loads(path.read_text(encoding="utf-8"))["chars"])


def shakespeare_text() -> str:
    """The full tinyshakespeare text."""
    return data_file("tinyshakespeare", "input.txt").read_text(encoding="utf-8")


def shakespeare_splits(vocab: CharVocab | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_ids, val_ids)``: the text encoded with ``vocab`` (default: built from the full text),
    the last :data:`VAL_FRACTION` of it held out as validation."""
    text = shakespeare_text()
    ids = (vocab or CharVocab.build(text)).encode(text)
    split = int(len(ids) * (1.0 - VAL_FRACTION))
    return ids[:split], ids[split:]


def sst2_text(split: str) -> str:
    """The sentences of an SST-2 split as running text, one a line."""
    return "".join(sentence + "\n" for sentence, _ in read_sst2(split))


def sst2_char_vocab() -> CharVocab:
    """The characters of SST-2's training and test sentences."""
    return CharVocab.build(sst2_text("train") + sst2_text("test"))


def sst2_lm_splits(vocab: CharVocab) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train_ids, tuning_ids, val_ids)`` of the fine-grained LM fixture, encoded with ``vocab``: train.tsv as
    running text, and test.tsv cut at the line nearest its middle into a tuning half and a validation half.
    test.tsv holds whole sentences of other reviews; dev.tsv does not serve, as two thirds of its phrases are
    substrings of train.tsv."""
    text = sst2_text("test")
    middle = text.index("\n", len(text) // 2) + 1
    return vocab.encode(sst2_text("train")), vocab.encode(text[:middle]), vocab.encode(text[middle:])


def lm_batch(windows: torch.Tensor) -> Batch:
    """A causal LM batch of equal-length windows ``[batch, seq]`` (no padding)."""
    return {"input_ids": windows, "attention_mask": torch.ones_like(windows)}


def lm_train_batches(ids: torch.Tensor, seq_len: int, batch_size: int, seed: int) -> Iterator[Batch]:
    """An endless stream of batches of random windows of ``ids``; the same ``seed`` gives the same stream."""
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len)
    while True:
        starts = torch.randint(0, len(ids) - seq_len + 1, (batch_size, 1), generator=generator)
        yield lm_batch(ids[starts + offsets])


def lm_calibration(ids: torch.Tensor, sequences: int, seed: int = 1234) -> list[Batch]:
    """The benchmark's LM calibration data: ``sequences`` random 128-token windows of ``ids``, 32 a batch (another
    ``seed``: another draw)."""
    return list(itertools.islice(lm_train_batches(ids, 128, 32, seed=seed), sequences // 32))


def lm_eval_batches(ids: torch.Tensor, seq_len: int = 128, batch_size: int = 32) -> list[Batch]:
    """Consecutive non-overlapping windows of ``ids`` (a short tail is dropped), in order, in batches."""
    count = len(ids) // seq_len
    windows = ids[: count * seq_len].view(count, seq_len)
    return [lm_batch(chunk) for chunk in windows.split(batch_size)]


lm_validation_loss = mean_next_token_loss  # the name the fixtures' train logs record


# ---------------------------------------------------------------- SST-2 (word level)

_WORD = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lowercased words and single punctuation characters."""
    return _WORD.findall(text.lower())


class WordVocab:
    """A word vocabulary with ``<pad>`` = 0 and ``<unk>`` = 1."""

    def __init__(self, words: Sequence[str]) -> None:
        self.words = tuple(words)
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, sentences: Iterable[str], min_freq: int = 2) -> WordVocab:
        """Words seen at least ``min_freq`` times, most frequent first (ties alphabetical)."""
        counts = Counter(word for sentence in sentences for word in tokenize(sentence))
        kept = sorted((w for w, n in counts.items() if n >= min_freq), key=lambda w: (-counts[w], w))
        return cls(("<pad>", "<unk>", *kept))

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        """The ids of the words of ``text`` (``<unk>`` for an unknown word)."""
        return [self.index.get(word, UNK_ID) for word in tokenize(text)]

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """The words of ``ids`` joined by spaces, padding left out."""
        return " ".join(self.words[int(i)] for i in ids if int(i) != PAD_ID)

    def save(self, path: Path) -> None:
        payload = {"type": "word", "pad_id": PAD_ID, "unk_id": UNK_ID, "words": list(self.words)}
        path.write_text(json.dumps(payload, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> WordVocab:
        return cls(json.loads(path.read_text(encoding="utf-8"))["words"])


def read_sst2(split: str) -> list[tuple[str, int]]:
    """``(sentence, label)`` pairs of an SST-2 split: ``train``, ``dev`` or ``test`` (GLUE's labelled dev set)."""
    if split not in SST2_SPLITS:
        raise ValueError(f"unknown SST-2 split {split!r}; choose from {', '.join(SST2_SPLITS)}")
    lines = data_file("sst2", f"{split}.tsv").read_text(encoding="utf-8").splitlines()
    if lines[0].split("\t") != ["sentence", "label"]:
        raise ValueError(f"unexpected SST-2 header in {split}.tsv: {lines[0]!r}")
    pairs = []
    for line in lines[1:]:
        sentence, label = line.rsplit("\t", 1)
        pairs.append((sentence.strip(), int(label)))
    return pairs


def pad_batch(sequences: Sequence[Sequence[int]], max_len: int = 128) -> Batch:
    """Right-padded ``input_ids`` (pad id 0) and ``attention_mask``; sequences are cut to ``max_len``
    and an empty one becomes a single ``<unk>`` so that every row has a token to pool."""
    rows = [list(s[:max_len]) or [UNK_ID] for s in sequences]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def classification_batches(
    examples: Sequence[tuple[str, int]],
    vocab: WordVocab,
    batch_size: int = 64,
    max_len: int = 128,
    seed: int | None = None,
) -> list[LabeledBatch]:
    """``(inputs, labels)`` batches of ``examples``, in order, or shuffled by ``seed`` when it is given."""
    order = list(range(len(examples)))
    if seed is not None:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        inputs = pad_batch([vocab.encode(sentence) for sentence, _ in chunk], max_len)
        batches.append((inputs, torch.tensor([label for _, label in chunk])))
    return batches


def labelled_calibration(
    batches: Sequence[LabeledBatch],
) -> tuple[list[Batch], Callable[[torch.Tensor, Batch], torch.Tensor]]:
    """The inputs of ``batches`` as calibration (or training) batches, and the cross-entropy of a model's logits
    on one of them. Its labels are found by the batch's ``input_ids`` tensor itself, which ``moefx.compile``
    and ``moefx.recover`` hand back to the loss (a batch moved to the device it is on keeps its tensors)."""
    labels = {id(inputs["input_ids"]): y for inputs, y in batches}
    return [inputs for inputs, _ in batches], lambda logits, batch: F.cross_entropy(
        logits, labels[id(batch["input_ids"])]
    )


@torch.no_grad()
def classification_accuracy(model: nn.Module, batches: Sequence[LabeledBatch]) -> float:
    """The fraction of examples whose argmax logit is the label (eval mode, restored after)."""
    was_training = model.training
    model.eval()
    correct, count = 0, 0
    for inputs, labels in batches:
        correct += (model(**inputs).argmax(dim=-1) == labels).sum().item()
        count += len(labels)
    model.train(was_training)
    return correct / count


@torch.no_grad()
def classification_loss(model: nn.Module, batches: Sequence[LabeledBatch]) -> float:
    """Mean cross-entropy (nats) over the examples of ``batches`` (eval mode, restored after)."""
    was_training = model.training
    model.eval()
    total = sum(F.cross_entropy(model(**inputs), labels, reduction="sum").item() for inputs, labels in batches)
    model.train(was_training)
    return total / sum(len(labels) for _, labels in batches)
