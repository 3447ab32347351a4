"""Labelled texts in, class-balanced splits and padded classification batches out.

    cfg = ClassificationDataConfig(path="data/sms_spam_collection.tsv")   # the [data] section of the script
    splits = read_splits(cfg)         # read (gpt.data.labeled_files), deduplicate, label names, split by class
    datasets = tokenize_splits(splits, tokenizer, max_length=128, pad_id=tokenizer.padding_id)
    print(describe_splits(splits, datasets))
    loader = ClassificationBatchLoader(datasets["train"], batch_size=16, seed=0)
    ids, lengths, labels = loader.next_batch()   # (B, T) right-padded to the batch's longest text, (B,), (B,)

The steps `read_splits` takes are usable alone: `deduplicate_texts` (the first copy
of each text stays), `check_labels` (labels that look like typos: too rare, or
differing from another only in case or spacing), `label_names` (class ids are positions in it),
`stratified_split` (per class, seeded), `downsample_classes` and `class_weights`
(for `balance`). `ClassificationDataset` tokenizes and right-pads; the loaders trim
each batch to its longest text (`trim_padding`).

Texts are right-padded, so under causal attention no real token ever sees a
padding token: a classifier reading the last real token (or the mean over real
tokens) gives the same answer however much padding a batch adds.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import Section, check_choice, check_seed
from ..errors import ConfigError, UserError
from ..tokenizer import Tokenizer

from .labeled_files import CLASSIFICATION_FORMATS, HEADER_CHOICES, LabeledText, read_labeled_texts
from .loader import BatchLoader, iterate_eval

BALANCE_CHOICES = ("none", "downsample", "weight")

# ----------------------------------------------------------------------------
# Deduplication, label names, splits, balance
# ----------------------------------------------------------------------------


@dataclass
class DedupStats:
    """Texts read, copies dropped, and how many of those copies carried another label than the first."""

    read: int = 0
    duplicates: int = 0
    conflicting_labels: int = 0


def deduplicate_texts(examples: Iterable[LabeledText]) -> tuple[list[LabeledText], DedupStats]:
    """Keep the first example of each distinct text (after stripping), in order."""
    stats = DedupStats()
    label_of: dict[str, str] = {}
    kept: list[LabeledText] = []
    for example in examples:
        stats.read += 1
        if example.text in label_of:
            stats.duplicates += 1
            stats.conflicting_labels += label_of[example.text] != example.label
            continue
        label_of[example.text] = example.label
        kept.append(example)
    return kept, stats


def label_names(labels: Iterable[str], source: str = "the data") -> list[str]:
    """The distinct labels in a fixed order, the class ids being their positions.

    Integer labels sort by value ("2" before "10"), others alphabetically. A
    classifier needs at least two classes: one alone raises UserError.
    """
    distinct = set(labels)
    if all(_is_integer_text(label) for label in distinct):
        names = sorted(distinct, key=int)
    else:
        names = sorted(distinct)
    if len(names) < 2:
        found = f"every example has the label {names[0]!r}" if names else "there are no examples"
        raise UserError(f"{source}: {found}; a classifier needs at least two classes")
    return names


def _is_integer_text(text: str) -> bool:
    return text.lstrip("-").isdigit()


def check_labels(examples: Sequence[LabeledText], min_count: int = 2, allow_variants: bool = False,
                 source: str = "the data") -> None:
    """Refuse labels that look like mistakes, before they become classes of their own.

    Labels that differ only in case or spacing ("Ham" and "ham") are a UserError unless
    `allow_variants`; so is a label with fewer than `min_count` examples (a typo such as
    "spma" occurs once). The message names the labels and the lines they are on, and the
    setting that accepts them.
    """
    lines: dict[str, list[str]] = {}
    for example in examples:
        lines.setdefault(example.label, []).append(example.source.rsplit(", ", 1)[-1])  # "line 7"

    def where(label: str) -> str:
        shown = lines[label][:3]
        more = f" and {len(lines[label]) - len(shown)} more" if len(lines[label]) > len(shown) else ""
        return f"{label!r} ({len(lines[label])}x: {', '.join(shown)}{more})"

    if not allow_variants:
        groups: dict[str, list[str]] = {}
        for label in lines:
            groups.setdefault(" ".join(label.split()).casefold(), []).append(label)
        for variants in groups.values():
            if len(variants) > 1:
                variants.sort(key=lambda label: -len(lines[label]))  # the most common first
                raise UserError(f"{source}: labels {', '.join(map(where, variants))} differ only in case or "
                                "spacing; fix the file, or keep them as separate classes with "
                                "--data.allow_label_variants true")
    rare = sorted((label for label in lines if len(lines[label]) < min_count), key=lambda label: len(lines[label]))
    if rare:
        shown = ", ".join(map(where, rare[:5])) + (f" and {len(rare) - 5} more" if len(rare) > 5 else "")
        raise UserError(f"{source}: label{'s' if len(rare) > 1 else ''} {shown} occur{'' if len(rare) > 1 else 's'} "
                        f"fewer than data.min_label_count ({min_count}) times: a typo? Fix the file, or accept rare "
                        "labels with --data.min_label_count 1")


def stratified_split(
    labels: Sequence[int] | np.ndarray, val_fraction: float, test_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of the training, validation and test examples (each sorted), class by class.

    Each class's examples are shuffled (numpy generator seeded with `seed`);
    round(n * test_fraction) go to test, round(n * val_fraction) to validation,
    the rest to training, which always keeps at least one example of each class
    (test gives way first). A fraction of 0 leaves that split empty.
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise UserError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be at least 0 "
                        "and sum to less than 1")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    parts: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n = len(members)
        n_val = min(round(n * val_fraction), n - 1)
        n_test = min(round(n * test_fraction), n - 1 - n_val)
        parts[2].append(members[:n_test])
        parts[1].append(members[n_test:n_test + n_val])
        parts[0].append(members[n_test + n_val:])
    train, val, test = (np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts)
    return train, val, test


def downsample_classes(labels: Sequence[int] | np.ndarray, seed: int = 0) -> np.ndarray:
    """Indices (sorted) of a class-balanced subset: every class cut at random to the smallest class's size."""
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    keep = [rng.permutation(np.flatnonzero(labels == c))[: counts.min()] for c in classes]
    return np.sort(np.concatenate(keep))


def class_weights(labels: Sequence[int] | np.ndarray, num_classes: int) -> torch.Tensor:
    """Cross-entropy weights n / (K * n_c) (K classes, n_c examples of class c): every class weighs
    the same in total. A class without examples gets weight 0. float32, shape (K,)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    weights = np.divide(counts.sum(), num_classes * counts, out=np.zeros(num_classes), where=counts > 0)
    return torch.tensor(weights, dtype=torch.float32)


# ----------------------------------------------------------------------------
# Tokenized datasets and batches
# ----------------------------------------------------------------------------


class ClassificationDataset(Dataset):
    """Tokenized labelled texts, each cut to `max_length` tokens (its start is kept) and right-padded.

    Item i is (ids (max_length,), length (), label ()), all int64; `ClassificationBatchLoader`
    and `iterate_classification_eval` trim a batch's padding to its longest text.
    """

    def __init__(self, token_ids: Sequence[Sequence[int]], labels: Sequence[int], max_length: int,
                 pad_id: int = 0) -> None:
        if max_length < 1:
            raise UserError(f"max_length must be at least 1, got {max_length}")
        if len(token_ids) != len(labels):
            raise ValueError(f"{len(token_ids)} token lists but {len(labels)} labels")
        self.max_length = max_length
        full_lengths = np.array([len(ids) for ids in token_ids], dtype=np.int64)
        if (full_lengths == 0).any():
            raise UserError(f"text {int(np.argmin(full_lengths))} has no tokens")
        self.num_truncated = int((full_lengths > max_length).sum())
        self.lengths = torch.from_numpy(np.minimum(full_lengths, max_length))  # (N,)
        self.ids = torch.full((len(token_ids), max_length), pad_id, dtype=torch.int64)  # (N, max_length)
        for row, ids in enumerate(token_ids):
            kept = ids[:max_length]
            self.ids[row, :len(kept)] = torch.as_tensor(kept, dtype=torch.int64)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))  # (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.ids[index], self.lengths[index], self.labels[index]


def trim_padding(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """(ids (B, max_length), lengths, labels) -> ids cut to the batch's longest text (B, T), lengths, labels."""
    ids, lengths, labels = batch
    return ids[:, :int(lengths.max())], lengths, labels


class ClassificationBatchLoader(BatchLoader):
    """`BatchLoader` over a ClassificationDataset, each batch trimmed to its longest text.

    With `group_by_length`, batches hold texts of similar length, so they carry little
    padding: each epoch's shuffled order is cut into windows of `LENGTH_WINDOW_BATCHES`
    global batches, each window is sorted by text length and cut into batches, and the
    batches of the epoch are shuffled. The order stays a pure function of (seed, epoch),
    so `state_dict` and exact resume work as before.
    """

    LENGTH_WINDOW_BATCHES = 64

    def __init__(self, dataset: ClassificationDataset, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True, group_by_length: bool = False) -> None:
        super().__init__(dataset, batch_size, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                         drop_last=drop_last)
        self.group_by_length = group_by_length
        self._grouped_order = self._order
        self._grouped_epoch: int | None = None  # the epoch `_grouped_order` belongs to

    def _epoch_order(self) -> torch.Tensor:
        order = super()._epoch_order()
        if not self.group_by_length:
            return order
        if self._grouped_epoch != self._epoch:
            self._grouped_order, self._grouped_epoch = self._grouped_by_length(order), self._epoch
        return self._grouped_order

    def _grouped_by_length(self, order: torch.Tensor) -> torch.Tensor:
        lengths = self.dataset.lengths
        window = self.global_batch_size * self.LENGTH_WINDOW_BATCHES
        chunks = [order[start:start + window] for start in range(0, len(order), window)]
        order = torch.cat([chunk[torch.argsort(lengths[chunk], stable=True)] for chunk in chunks])
        whole = len(order) // self.global_batch_size * self.global_batch_size
        batches = order[:whole].view(-1, self.global_batch_size)  # (batches, global batch)
        generator = torch.Generator().manual_seed(self.seed + self._epoch)
        shuffled = batches[torch.randperm(len(batches), generator=generator)]
        return torch.cat([shuffled.flatten(), order[whole:]])

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """(ids (B, T), lengths (B,), labels (B,)): this rank's next batch."""
        return trim_padding(super().next_batch())


def iterate_classification_eval(
    dataset: ClassificationDataset, batch_size: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, ...]]:
    """`iterate_eval` over a ClassificationDataset, each batch trimmed to its longest text."""
    for batch in iterate_eval(dataset, batch_size, max_batches):
        yield trim_padding(batch)


# ----------------------------------------------------------------------------
# The [data] section of finetune_classifier.py, and the splits it describes
# ----------------------------------------------------------------------------


@dataclass
class ClassificationDataConfig(Section):
    """Where the labelled texts come from, how they are read, split and balanced."""

    section_name: typing.ClassVar[str] = "data"

    path: str = field(default="data/sms_spam_collection.tsv",
                      metadata={"help": "TSV, CSV or JSONL of texts and labels"})
    format: str = field(default="auto", metadata={"help": "auto (from the suffix) | tsv | csv | jsonl"})
    text_column: str = field(default="", metadata={"help": "header name, JSON key or 0-based index; '' = text / 1"})
    label_column: str = field(default="", metadata={"help": "header name, JSON key or 0-based index; '' = label / 0"})
    header: str = field(default="auto", metadata={"help": "TSV/CSV: does line 1 name the columns? auto | true | false"})
    val_path: str = field(default="", metadata={"help": "validation examples from this file instead of a split"})
    test_path: str = field(default="", metadata={"help": "test examples from this file instead of a split"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of each class for validation"})
    test_fraction: float = field(default=0.1, metadata={"help": "share of each class for test"})
    seed: int = field(default=0, metadata={"help": "seed of the split and of downsampling"})
    balance: str = field(default="none", metadata={"help": "none | downsample (training classes cut to the "
                                                           "smallest) | weight (class-weighted loss)"})
    group_by_length: bool = field(default=False, metadata={"help": "training batches of texts of similar length "
                                                                   "(less padding, faster)"})
    min_label_count: int = field(default=2, metadata={"help": "a label with fewer examples in data.path is an error "
                                                              "(a typo such as 'spma'?); 1 accepts any"})
    allow_label_variants: bool = field(default=False, metadata={"help": "accept labels that differ only in case or "
                                                                        "spacing (Ham, ham) as separate classes"})

    def __post_init__(self) -> None:
        self._check_types()
        check_choice("data.format", self.format, CLASSIFICATION_FORMATS)
        check_choice("data.header", self.header, HEADER_CHOICES)
        check_choice("data.balance", self.balance, BALANCE_CHOICES)
        check_seed("data.seed", self.seed)
        if self.min_label_count < 1:
            raise ConfigError(f"data.min_label_count: must be at least 1, got {self.min_label_count}")
        split_off = [fraction for fraction, path in ((self.val_fraction, self.val_path),
                                                     (self.test_fraction, self.test_path)) if not path]
        if any(fraction <= 0 for fraction in split_off) or sum(split_off) >= 1:
            raise ConfigError(f"data.val_fraction ({self.val_fraction}) and data.test_fraction ({self.test_fraction}) "
                              "must be positive and sum to less than 1 (a fraction whose split comes from "
                              "data.val_path or data.test_path is ignored)")


@dataclass
class Splits:
    """Labelled texts by split, the label names (class id = position), and what happened on the way."""

    labels: list[str]
    train: list[LabeledText]
    val: list[LabeledText]
    test: list[LabeledText]
    notes: list[str]

    def ids(self, split: list[LabeledText]) -> list[int]:
        index = {label: i for i, label in enumerate(self.labels)}
        return [index[example.label] for example in split]


def read_splits(cfg: ClassificationDataConfig) -> Splits:
    """Read, deduplicate and split the data (or read the given val/test files); check every label."""
    def read(path: str) -> tuple[list[LabeledText], str]:
        examples = read_labeled_texts(path, file_format=cfg.format, text_column=cfg.text_column,
                                      label_column=cfg.label_column, header=cfg.header)
        kept, stats = deduplicate_texts(examples)
        note = (f"{path}: {stats.read:,} examples, {stats.duplicates:,} duplicate texts dropped"
                + (f" ({stats.conflicting_labels:,} of them with another label than the first copy)"
                   if stats.conflicting_labels else ""))
        return kept, note

    examples, note = read(cfg.path)
    notes = [note]
    check_labels(examples, cfg.min_label_count, cfg.allow_label_variants, cfg.path)
    labels = label_names((e.label for e in examples), cfg.path)
    separate = {name: path for name, path in (("val", cfg.val_path), ("test", cfg.test_path)) if path}
    val_fraction = 0.0 if "val" in separate else cfg.val_fraction
    test_fraction = 0.0 if "test" in separate else cfg.test_fraction
    index = {label: i for i, label in enumerate(labels)}
    train_idx, val_idx, test_idx = stratified_split([index[e.label] for e in examples], val_fraction, test_fraction,
                                                    cfg.seed)
    splits = {"train": [examples[i] for i in train_idx], "val": [examples[i] for i in val_idx],
              "test": [examples[i] for i in test_idx]}
    train_texts = {e.text for e in splits["train"]}
    for name, path in separate.items():
        examples, note = read(path)
        for example in examples:
            if example.label not in index:
                raise UserError(f"{example.source}: label {example.label!r} never appears in the training data "
                                f"(training labels: {', '.join(labels)})")
        kept = [e for e in examples if e.text not in train_texts]
        notes.append(note + (f", {len(examples) - len(kept):,} also in training dropped" if len(kept) < len(examples)
                             else ""))
        splits[name] = kept
    for name, split in splits.items():
        if not split:
            raise UserError(f"{separate.get(name, cfg.path)}: the {name} split is empty: too few examples")
    if cfg.balance == "downsample":
        before = len(splits["train"])
        keep = downsample_classes([index[e.label] for e in splits["train"]], cfg.seed)
        splits["train"] = [splits["train"][i] for i in keep]
        notes.append(f"training split downsampled to the smallest class: {before:,} -> {len(keep):,} examples")
    return Splits(labels, splits["train"], splits["val"], splits["test"], notes)


def tokenize_splits(splits: Splits, tokenizer: Tokenizer, max_length: int,
                    pad_id: int) -> dict[str, ClassificationDataset]:
    """The three splits as datasets. Validation and test go shortest text first, so evaluation batches
    carry little padding (predictions do not depend on batch neighbours)."""
    datasets = {}
    for name, split in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        token_ids, labels = tokenizer.encode_batch([e.text for e in split]), splits.ids(split)
        if name != "train":
            order = np.argsort([len(ids) for ids in token_ids], kind="stable")
            token_ids, labels = [token_ids[i] for i in order], [labels[i] for i in order]
        datasets[name] = ClassificationDataset(token_ids, labels, max_length, pad_id)
    return datasets


def describe_splits(splits: Splits, datasets: dict[str, ClassificationDataset]) -> str:
    """A table of examples per class and split, and token-length statistics."""
    width = max(len(label) for label in splits.labels + ["examples"])
    lines = ["split  " + "".join(f"{name:>{width + 2}}" for name in ["examples", *splits.labels])]
    for name, split in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        counts = np.bincount(splits.ids(split), minlength=len(splits.labels))
        lines.append(f"{name:<5}  " + "".join(f"{n:>{width + 2},}" for n in [len(split), *counts]))
    lengths = np.concatenate([d.lengths.numpy() for d in datasets.values()])
    truncated = sum(d.num_truncated for d in datasets.values())
    max_length = next(iter(datasets.values())).max_length
    lines.append(f"tokens per text (all splits, after cutting): min {lengths.min()}, median {np.median(lengths):.0f}, "
                 f"mean {lengths.mean():.1f}, p95 {np.percentile(lengths, 95):.0f}, max {lengths.max()}; "
                 f"{truncated:,} texts cut to max_length {max_length}")
    return "\n".join(lines)
