"""What each training job hands the one training loop (`gpt.train.TrainTask`).

    pretrain_task     next-token loss on token windows; validation loss, perplexity and bits per byte
    classifier_task   cross-entropy of the class logits (optionally class-weighted);
                      validation loss, accuracy and macro F1
    instruct_task     next-token loss on the response tokens (the prompt masked or not);
                      validation loss of the responses

Each takes the model, the data already split and tokenized, and the run's settings;
the scripts stay a thin command line around these.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .classifier import GPTClassifier, decide, predict
from .config import TrainConfig
from .data import (
    BatchLoader,
    ClassificationBatchLoader,
    ClassificationDataset,
    InstructionBatchLoader,
    InstructionDataset,
    iterate_classification_eval,
    iterate_eval,
    trim_instruction_batch,
)
from .evaluate import classification_report, language_model_metrics, next_token_loss
from .model import GPT
from .runtime import Runtime
from .train import TrainTask


def pretrain_task(model: GPT, train_set: Any, val_set: Any, cfg: TrainConfig, runtime: Runtime,
                  tokenizer: str = "gpt2", target_bytes: Callable[[torch.Tensor], int] | None = None) -> TrainTask:
    """Next-token prediction on windows (`SlidingWindowDataset` or `TokenFileDataset`) of tokens from the
    tokenizer named `tokenizer` (what the checkpoints record); windows may be shorter than the model's context.

    With `target_bytes` (the bytes a tensor of target ids stands for), validation also reports bits per byte:
    the summed loss in bits over the bytes of the scored targets, comparable across tokenizers."""
    @functools.cache
    def scored_bytes() -> int:  # the validation batches are fixed: their bytes are counted once
        assert target_bytes is not None
        return sum(target_bytes(targets) for _, targets in iterate_eval(val_set, cfg.batch_size,
                                                                        max_batches=cfg.eval_batches))

    def evaluate(model: nn.Module) -> dict[str, float]:
        metrics = language_model_metrics(
            model, iterate_eval(val_set, cfg.batch_size, max_batches=cfg.eval_batches), runtime.device)
        if target_bytes is not None:
            metrics["bits_per_byte"] = metrics["loss"] * metrics["tokens"] / (math.log(2) * scored_bytes())
        return metrics

    return TrainTask(
        model=model,
        train_batches=BatchLoader(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed, rank=runtime.rank,
                                  world_size=runtime.world_size),
        loss=next_token_loss,
        evaluate=evaluate,
        batch_tokens=lambda batch: batch[1].numel(),
        sequence_length=lambda batch: batch[0].shape[1],
        tokenizer=tokenizer,
    )


def classifier_task(
    model: GPTClassifier, datasets: dict[str, ClassificationDataset], labels: list[str], cfg: TrainConfig,
    runtime: Runtime, *, class_weight: torch.Tensor | None, group_by_length: bool, info: dict[str, Any],
    tokenizer: str,
) -> TrainTask:
    """The class head's cross-entropy on labelled texts; `info` is the checkpoint's "classifier" entry.

    Validation batches are twice the training batch (no gradients to hold).
    """
    weight = class_weight.to(runtime.device) if class_weight is not None else None
    eval_batch_size = 2 * cfg.batch_size

    def loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        ids, lengths, targets = batch
        logits = model(ids, lengths)  # (B, num_classes)
        return F.cross_entropy(logits.float(), targets, weight=weight)

    def evaluate(model: nn.Module) -> dict[str, float]:
        batches = iterate_classification_eval(datasets["val"], eval_batch_size, max_batches=cfg.eval_batches)
        probabilities, true, val_loss = predict(model, batches, runtime.device, class_weight=weight)
        metrics = classification_report(true, decide(probabilities), labels)
        return {"loss": val_loss, "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}

    return TrainTask(
        model=model,
        train_batches=ClassificationBatchLoader(datasets["train"], cfg.batch_size, shuffle=True, seed=cfg.seed,
                                                rank=runtime.rank, world_size=runtime.world_size,
                                                group_by_length=group_by_length),
        loss=loss,
        evaluate=evaluate,
        batch_tokens=lambda batch: int(batch[1].sum()),
        sequence_length=lambda batch: batch[0].shape[1],
        checkpoint_extra={"classifier": info},
        tokenizer=tokenizer,
    )


def instruct_task(model: GPT, datasets: dict[str, InstructionDataset], cfg: TrainConfig, runtime: Runtime,
                  tokenizer: str) -> TrainTask:
    """The language-model loss on instruction sequences; every record is seen (the last batch is completed)."""
    return TrainTask(
        model=model,
        train_batches=InstructionBatchLoader(datasets["train"], cfg.batch_size, shuffle=True, seed=cfg.seed,
                                             rank=runtime.rank, world_size=runtime.world_size, drop_last=False),
        loss=lambda m, batch: m(batch[0], targets=batch[1]),
        evaluate=lambda m: language_model_metrics(
            m, (trim_instruction_batch(b)[:2] for b in iterate_eval(datasets["val"], cfg.batch_size,
                                                                       max_batches=cfg.eval_batches)),
            runtime.device),
        batch_tokens=lambda batch: batch[0].numel(),  # every position is computed, padding included
        sequence_length=lambda batch: batch[0].shape[1],
        tokenizer=tokenizer,
    )
