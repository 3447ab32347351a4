"""Data for training: text in, token windows and batches out.

One concept per module, in the order the data flows:

    text.py            read documents (.txt, .jsonl, folders; UTF-8 checked, big files in blocks)
                       and clean them (Gutenberg header/footer, LF newlines, empties, duplicates)
    filters.py         what of a corpus to keep: exact and near duplicates, quality rules,
                       blocklist, PII scrubbing, normalizations (`DocumentFilter`); the rules
                       in quality.py, the MinHash index in near_duplicates.py
    corpus.py          tokenize, join with <|endoftext|>, split into train/val streams;
                       `load_text_corpus` does it all in memory; `dataset_stats`, `format_stats`
    token_files.py     the same for corpora of any size, streamed through tokenizer worker
                       processes into uint16/uint32 token files; `python -m gpt prepare`
    report.py          what preparing did: the filters' funnel, examples, length histograms,
                       top tokens, split sizes (data_report.md/.json, doc_lengths.png)
    loader.py          next-token windows over a stream or a token file, resumable DDP-aware
                       `BatchLoader`, fixed `iterate_eval` batches
    labeled_files.py   labelled texts from TSV, CSV or JSONL files
    classification.py  dedup, label names, stratified splits, balance, padded classification
                       datasets and loaders; the [data] section of finetune_classifier.py
    instruct.py        prompt + response sequences with the loss on the response; the [data]
                       section of finetune_instruct.py and its record split

Pretraining:

    docs = read_documents("data/botchan.txt")         # a .txt file, a .jsonl file, or a folder of them
    docs, clean_stats = clean_documents(docs)         # Gutenberg header/footer off, LF newlines, no empties/duplicates
    doc_tokens = tokenize_documents(docs, tokenizer)  # one int32 array per document
    train, val = split_documents(doc_tokens, 0.1, tokenizer.eot_id)  # token streams, <|endoftext|> after each document
    windows = SlidingWindowDataset(train, context_length=256, stride=256)
    loader = BatchLoader(windows, batch_size=8, seed=0)
    x, y = loader.next_batch()                        # (B, T) inputs and targets; resumable, DDP-aware

A corpus too big for memory goes through `prepare` instead, and `TokenFileDataset`
reads its `train.bin` and `val.bin` through a memory map; both roads give the same
tokens for the same input.

Classification: `read_splits` -> `tokenize_splits` -> `ClassificationBatchLoader`.
Instruction tuning: `split_records` -> `InstructionDataset.from_records` -> `InstructionBatchLoader`.

Every public name is importable from `gpt.data` itself.
"""

from .classification import (
    BALANCE_CHOICES,
    ClassificationBatchLoader,
    ClassificationDataConfig,
    ClassificationDataset,
    DedupStats,
    Splits,
    check_labels,
    class_weights,
    deduplicate_texts,
    describe_splits,
    downsample_classes,
    iterate_classification_eval,
    label_names,
    read_splits,
    stratified_split,
    tokenize_splits,
    trim_padding,
)
from .corpus import (
    dataset_stats,
    format_stats,
    join_documents,
    load_text_corpus,
    split_documents,
    tokenize_documents,
)
from .instruct import (
    InstructDataConfig,
    InstructionBatchLoader,
    InstructionDataset,
    InstructionStats,
    describe_dataset,
    instruction_datasets,
    split_records,
    tokenize_instruction,
    trim_instruction_batch,
)
from .labeled_files import CLASSIFICATION_FORMATS, HEADER_CHOICES, LabeledText, read_labeled_texts
from .loader import BatchLoader, SlidingWindowDataset, TokenFileDataset, iterate_eval, pretraining_windows
from .filters import DocumentFilter
from .report import DataReport, text_histogram, write_length_histogram, write_report
from .token_files import TOKEN_DTYPES, check_token_meta, prepare, prepare_cli, token_dtype
from .text import (
    DEFAULT_BLOCK_BYTES,
    DEFAULT_PIECE_CHARS,
    SOURCE_SUFFIXES,
    CleanStats,
    PathLike,
    clean_document,
    clean_documents,
    read_documents,
    source_files,
)

__all__ = [
    "BALANCE_CHOICES",
    "CLASSIFICATION_FORMATS",
    "DEFAULT_BLOCK_BYTES",
    "DEFAULT_PIECE_CHARS",
    "HEADER_CHOICES",
    "SOURCE_SUFFIXES",
    "TOKEN_DTYPES",
    "BatchLoader",
    "ClassificationBatchLoader",
    "ClassificationDataConfig",
    "ClassificationDataset",
    "CleanStats",
    "DataReport",
    "DocumentFilter",
    "DedupStats",
    "InstructDataConfig",
    "InstructionBatchLoader",
    "InstructionDataset",
    "InstructionStats",
    "LabeledText",
    "PathLike",
    "SlidingWindowDataset",
    "Splits",
    "TokenFileDataset",
    "check_labels",
    "check_token_meta",
    "class_weights",
    "clean_document",
    "clean_documents",
    "dataset_stats",
    "deduplicate_texts",
    "describe_dataset",
    "describe_splits",
    "downsample_classes",
    "format_stats",
    "instruction_datasets",
    "iterate_classification_eval",
    "iterate_eval",
    "join_documents",
    "label_names",
    "load_text_corpus",
    "prepare",
    "pretraining_windows",
    "prepare_cli",
    "read_documents",
    "read_labeled_texts",
    "read_splits",
    "source_files",
    "split_documents",
    "split_records",
    "stratified_split",
    "text_histogram",
    "token_dtype",
    "tokenize_documents",
    "tokenize_instruction",
    "tokenize_splits",
    "trim_instruction_batch",
    "trim_padding",
    "write_length_histogram",
    "write_report",
]
