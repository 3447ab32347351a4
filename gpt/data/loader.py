"""Token streams in, next-token windows and resumable batches out.

    windows = SlidingWindowDataset(train, context_length=256, stride=256)   # or TokenFileDataset("train.bin", 256)
    loader = BatchLoader(windows, batch_size=8, seed=0)
    x, y = loader.next_batch()                # (B, T) inputs and targets; resumable, DDP-aware
    for x, y in iterate_eval(val_windows, 8, max_batches=20): ...           # the same batches on every call

A token stream comes from `load_text_corpus` (`gpt.data.corpus`) or, through a
memory map, from a file written by `prepare` (`gpt.data.token_files`). `BatchLoader`
and `iterate_eval` batch any map-style dataset whose items are tuples of tensors;
the classification and instruction loaders (`gpt.data.classification`,
`gpt.data.instruct`) build on them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import FilterConfig
from ..errors import UserError
from ..tokenizer import Tokenizer
from .corpus import load_text_corpus
from .text import PathLike
from .token_files import check_token_meta

# ----------------------------------------------------------------------------
# Next-token windows
# ----------------------------------------------------------------------------


class SlidingWindowDataset(Dataset):
    """Windows over one token stream for next-token prediction.

    Window `i` covers `tokens[i*stride : i*stride + context_length + 1]`; it yields
    `(input, target)`, two int64 tensors of shape (context_length,), the target
    being the input shifted left by one token. Only full windows count, so the
    last `(len(tokens) - context_length - 1) % stride` tokens are not used.
    `tokens` may be any 1-D integer array, a `numpy.memmap` included: a window is
    copied out only when asked for.
    """

    def __init__(self, tokens: np.ndarray | Sequence[int] | torch.Tensor, context_length: int, stride: int,
                 *, name: str = "the corpus") -> None:
        if context_length < 1 or stride < 1:
            raise UserError(f"context_length and stride must be at least 1, got {context_length} and {stride}")
        self.tokens = np.asarray(tokens)
        if self.tokens.ndim != 1:
            raise UserError(f"{name}: expected a 1-D token stream, got shape {self.tokens.shape}")
        self.context_length = context_length
        self.stride = stride
        window_tokens = context_length + 1  # inputs, plus the token that follows the last one
        if len(self.tokens) < window_tokens:
            raise UserError(
                f"{name} has {len(self.tokens):,} tokens; one window of context_length {context_length} "
                f"needs {window_tokens:,} (the inputs plus one next token)"
            )
        self.num_windows = (len(self.tokens) - window_tokens) // stride + 1

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.num_windows:
            raise IndexError(f"window {index} is out of range (0..{self.num_windows - 1})")
        start = index * self.stride
        window = torch.from_numpy(self.tokens[start : start + self.context_length + 1].astype(np.int64))  # (T + 1,)
        return window[:-1], window[1:]  # (T,), (T,)


class TokenFileDataset(SlidingWindowDataset):
    """Windows over a token file written by `prepare` (uint16 ids, or `dtype`), read through a memory map.

    Windows sit `stride` tokens apart, `context_length` by default: each token is
    an input once (windows overlap only by the one target token). The windows are
    fixed, so shuffling and exact resume are left to `BatchLoader`, whose state is
    two integers.
    """

    def __init__(self, path: PathLike, context_length: int, stride: int | None = None, *,
                 max_tokens: int = 0, dtype: str = "uint16") -> None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such token file (write one with `python -m gpt prepare`)")
        size = path.stat().st_size
        itemsize = np.dtype(dtype).itemsize
        if size % itemsize:
            raise UserError(f"{path}: {size} bytes is not a whole number of {dtype} tokens")
        tokens = np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype)
        super().__init__(first_tokens(tokens, max_tokens, str(path)), context_length, stride or context_length,
                         name=str(path))
        self.path = path


def first_tokens(tokens: np.ndarray, count: int, name: str) -> np.ndarray:
    """The first `count` tokens of a stream (0: all of it); more than it holds is a UserError naming `name`."""
    if count > len(tokens):
        raise UserError(f"data.train_tokens: {count:,} is more than {name} holds ({len(tokens):,} tokens)")
    return tokens[:count] if count else tokens


def pretraining_windows(path: PathLike, context_length: int, tokenizer: Tokenizer, val_fraction: float,
                        stride: int = 0, vocab_size: int | None = None, train_tokens: int = 0,
                        filters: FilterConfig | None = None, verbose: bool = False,
                        ) -> tuple[SlidingWindowDataset, SlidingWindowDataset]:
    """Training and validation windows for pretraining: from the token files of a prepared folder
    (train.bin, val.bin), or from text read and split in memory (`load_text_corpus`).

    Each window holds `context_length` input tokens (the model's context, or fewer).
    Training windows start `stride` tokens apart (0: `context_length`, no overlap) and
    come from the first `train_tokens` tokens of the training split (0: all of them);
    validation windows never overlap, so each validation token is scored once. A prepared
    folder's meta.json must name `tokenizer` and ids below `vocab_size`, the model's
    vocabulary (default: the tokenizer's). Text goes through `filters` (`gpt.data.filters`; default:
    exact duplicates only; `verbose` prints what they removed); a prepared folder was filtered when
    `prepare` wrote it (its data_report.md says how).
    """
    path = Path(path)
    if path.is_dir() and (path / "train.bin").exists():
        meta = check_token_meta(path, tokenizer.name, vocab_size or tokenizer.n_vocab)
        if verbose and filters is not None and filters != FilterConfig():
            print(f"note: the data.* filters apply to text; {path} holds tokens, filtered when `prepare` wrote them "
                  f"(its data_report.md says how)")
        return (TokenFileDataset(path / "train.bin", context_length, max_tokens=train_tokens, dtype=meta["dtype"]),
                TokenFileDataset(path / "val.bin", context_length, dtype=meta["dtype"]))
    train_split, val_split, summary = load_text_corpus(path, tokenizer, val_fraction, filters=filters)
    if verbose:
        print(summary["report"].removed_line())
    train_split = first_tokens(train_split, train_tokens, "the training split")
    return (SlidingWindowDataset(train_split, context_length, stride or context_length, name="the training split"),
            SlidingWindowDataset(val_split, context_length, context_length, name="the validation split"))


# ----------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------


def _collate(dataset: Dataset, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """Stack the items at `indices` field by field: (x, y) pairs become (B, T) tensors."""
    items = [dataset[i] for i in indices]
    return tuple(torch.stack(field) for field in zip(*items))


class BatchLoader:
    """Training batches in an order that is a pure function of (seed, epoch).

    Epoch `e` visits the dataset's items in the permutation drawn by a
    `torch.Generator` seeded with `seed + e` (or in index order without shuffle).
    Each step takes the next global batch of `batch_size * world_size` items from
    that order; rank `r` gets the `r`-th block of `batch_size` of them, so the ranks'
    batches are disjoint and together are the global batch. With `drop_last` an
    epoch has `len(dataset) // (batch_size * world_size)` batches; without, the last
    batch is completed with items from the start of the same epoch's order, so every
    item is seen and every batch has the same shape.

    `state_dict()` is two integers (epoch, batches taken in it); a new loader
    given it continues with exactly the batches the old one would have produced.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True) -> None:
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside 0..{world_size - 1} (world_size {world_size})")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.global_batch_size = batch_size * world_size
        self.num_items = len(dataset)
        if self.num_items == 0 or (drop_last and self.num_items < self.global_batch_size):
            raise UserError(
                f"the data set has {self.num_items:,} windows; one batch needs {self.global_batch_size:,} "
                f"({batch_size} per rank x {world_size} ranks)"
            )
        if drop_last:
            self.batches_per_epoch = self.num_items // self.global_batch_size
        else:
            self.batches_per_epoch = math.ceil(self.num_items / self.global_batch_size)
        self._epoch = 0
        self._position = 0  # batches already taken from this epoch
        self._order = torch.arange(self.num_items)
        self._order_epoch: int | None = None  # the epoch `_order` belongs to

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from (counting from 0)."""
        return self._epoch if self._position < self.batches_per_epoch else self._epoch + 1

    def _epoch_order(self) -> torch.Tensor:
        if self._order_epoch != self._epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + self._epoch)
                self._order = torch.randperm(self.num_items, generator=generator)
            self._order_epoch = self._epoch
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next batch: inputs and targets, each (batch_size, context_length) int64."""
        if self._position == self.batches_per_epoch:
            self._epoch, self._position = self._epoch + 1, 0
        first = self._position * self.global_batch_size + self.rank * self.batch_size
        slots = torch.arange(first, first + self.batch_size) % self.num_items
        self._position += 1
        return _collate(self.dataset, self._epoch_order()[slots].tolist())  # (B, T), (B, T)

    def state_dict(self) -> dict[str, int]:
        """Where the loader stands: plain integers, for a checkpoint."""
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state_dict()` of a loader with the same data, seed and batch size."""
        epoch, position = state.get("epoch"), state.get("position")
        if not isinstance(epoch, int) or not isinstance(position, int) or epoch < 0 or position < 0:
            raise UserError(f"data loader state must hold non-negative integers epoch and position, got {state}")
        if position > self.batches_per_epoch:
            raise UserError(
                f"data loader state is at batch {position} of epoch {epoch}, but an epoch here has only "
                f"{self.batches_per_epoch} batches: the data set or batch size changed since it was saved"
            )
        self._epoch, self._position = epoch, position


def iterate_eval(dataset: Dataset, batch_size: int, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
    """Fixed evaluation batches, the same on every call.

    All windows in index order (the last batch may be smaller), or, when
    `max_batches * batch_size` is fewer than there are, that many windows spread
    evenly over the data set so that a capped evaluation still sees all of it.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    n = len(dataset)
    count = n if max_batches is None else min(n, max_batches * batch_size)
    indices = np.arange(count) * n // max(count, 1)
    for start in range(0, count, batch_size):
        yield _collate(dataset, indices[start : start + batch_size].tolist())
