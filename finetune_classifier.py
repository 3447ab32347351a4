"""Fine-tune a GPT as a text classifier: swap the LM head for a class head, train, report.

    python finetune_classifier.py                        # from scratch on the bundled SMS data, a few CPU minutes
    python finetune_classifier.py --model smollm2-135m-instruct --train.trainable last:2
    python finetune_classifier.py --model smollm2-135m-instruct --train.trainable lora --lora.rank 8
    python finetune_classifier.py --model runs/pretrain-.../ --data.path reviews.jsonl
    python -m gpt classify --checkpoint runs/classifier-... "Claim your free prize now!"

`--model` takes our own pretraining checkpoint or run folder, a Hugging Face folder, a GGUF
file, a known name such as smollm2-135m-instruct (fetched on first use), or a preset
name (tiny, gpt2-124m, ...) for a model from scratch; without it, the [model] section
of the config describes a model from scratch. `--train.trainable` picks what trains:
head, last:N (the last N blocks, the final norm and the head), all, or lora ([lora]
section: rank, alpha, dropout, targets).

The data (TSV, CSV or JSONL; see `gpt.data.read_labeled_texts`) is deduplicated, then
split by class into train/val/test with `--data.seed` (or val/test come from their own
files). The test split is classified before and after training; the run folder gets
report.json (`before` and `after`: accuracy, macro F1, per-class precision/recall/F1,
confusion matrix, ROC AUC and the threshold tuned on validation for two classes),
report.md (the two side by side), and checkpoints/final.pt: the best checkpoint's
weights with any LoRA adapters merged in, which `python -m gpt classify` loads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gpt.checkpoint import atomic_write, load_checkpoint, load_model_state, save_checkpoint
from gpt.classifier import (
    POOLINGS,
    GPTClassifier,
    classifier_info,
    decide,
    describe_parameters,
    parse_trainable,
    predict,
    set_trainable,
)
from gpt.config import (
    PRESETS,
    LoRAConfig,
    ModelConfig,
    Section,
    TrainConfig,
    build_config,
    parse_overrides,
    read_toml,
    save_config_json,
)
from gpt.data import (
    CLASSIFICATION_FORMATS,
    ClassificationBatchLoader,
    ClassificationDataset,
    LabeledText,
    class_weights,
    deduplicate_texts,
    downsample_classes,
    iterate_classification_eval,
    label_names,
    read_labeled_texts,
    stratified_split,
)
from gpt.errors import ConfigError, UserError, run_cli
from gpt.evaluate import classification_report, format_report_markdown, tune_threshold
from gpt.fetch import KNOWN_MODELS
from gpt.lora import count_parameters, merge_lora
from gpt.model import GPT
from gpt.tokenizer import Tokenizer, get_tokenizer
from gpt.train import Runtime, TrainTask, peak_memory_mib, setup_runtime, train
from gpt.weights import LoadedModel, load_model_and_tokenizer

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "classifier.toml"

# ----------------------------------------------------------------------------
# Config sections of this script
# ----------------------------------------------------------------------------


@dataclass
class ClassifierTrainConfig(TrainConfig):
    """The shared training fields, plus what trains."""

    trainable: str = field(default="all", metadata={"help": "head | last:N (last N blocks + final norm + head) | "
                                                            "all | lora (see [lora])"})

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_trainable(self.trainable)


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

    def __post_init__(self) -> None:
        self._check_types()
        if self.format not in CLASSIFICATION_FORMATS:
            raise ConfigError(f"data.format: must be one of {', '.join(CLASSIFICATION_FORMATS)}; got {self.format!r}")
        if self.header not in ("auto", "true", "false"):
            raise ConfigError(f"data.header: must be auto, true or false; got {self.header!r}")
        if self.balance not in ("none", "downsample", "weight"):
            raise ConfigError(f"data.balance: must be none, downsample or weight; got {self.balance!r}")
        split_off = [fraction for fraction, path in ((self.val_fraction, self.val_path),
                                                     (self.test_fraction, self.test_path)) if not path]
        if any(fraction <= 0 for fraction in split_off) or sum(split_off) >= 1:
            raise ConfigError(f"data.val_fraction ({self.val_fraction}) and data.test_fraction ({self.test_fraction}) "
                              "must be positive and sum to less than 1 (a fraction whose split comes from "
                              "data.val_path or data.test_path is ignored)")


@dataclass
class ClassifierConfig(Section):
    """The class head and its input."""

    section_name: typing.ClassVar[str] = "classifier"

    pooling: str = field(default="last",
                         metadata={"help": "last (the last real token's state) | mean (of the real tokens')"})
    max_length: int = field(default=0, metadata={"help": "texts are cut to this many tokens; 0 = the model's "
                                                         "context length, at most 512"})

    def __post_init__(self) -> None:
        self._check_types()
        if self.pooling not in POOLINGS:
            raise ConfigError(f"classifier.pooling: must be one of {', '.join(POOLINGS)}; got {self.pooling!r}")
        if self.max_length < 0:
            raise ConfigError(f"classifier.max_length: must not be negative, got {self.max_length}")


SECTIONS: dict[str, type[Section]] = {"model": ModelConfig, "train": ClassifierTrainConfig,
                                      "data": ClassificationDataConfig, "classifier": ClassifierConfig,
                                      "lora": LoRAConfig}


def parse_args(argv: list[str]) -> tuple[str, dict[str, Section]]:
    """(the --model source, or "" for the [model] section; the resolved config sections)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config fields (override any with --section.field value):\n"
        + "\n".join(line for cls in SECTIONS.values() for line in cls.field_help()),
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="TOML config file (default: configs/classifier.toml)")
    parser.add_argument("--model", default="", help="checkpoint or run folder, Hugging Face folder, .gguf file, known "
                                                    "name (smollm2-135m-instruct) or preset (tiny); default: [model]")
    args, override_args = parser.parse_known_args(argv)
    toml = read_toml(args.config) if args.config else {}
    overrides = parse_overrides(override_args)
    source = args.model
    if source and _is_preset(source):
        toml.pop("model", None)  # the preset replaces the config file's model, command-line overrides still apply
        overrides.setdefault("model", {})["preset"] = source
        source = ""
    elif source and overrides.get("model"):
        key = next(iter(overrides["model"]))
        raise UserError(f"--model.{key}: model.* settings apply to a model from scratch only; "
                        f"{source} keeps its own config")
    return source, build_config(SECTIONS, toml, overrides)


def _is_preset(source: str) -> bool:
    return source in PRESETS and source not in KNOWN_MODELS and not Path(source).expanduser().exists()


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------


def load_backbone(source: str, model_cfg: ModelConfig) -> LoadedModel:
    """The model and tokenizer `--model` names, or a model from scratch (the [model] section) without it."""
    if not source:
        return LoadedModel(GPT(model_cfg), get_tokenizer("gpt2"), "gpt2", "from scratch (random init)")
    return load_model_and_tokenizer(source)


# ----------------------------------------------------------------------------
# Evaluation and the report
# ----------------------------------------------------------------------------

REPORT_KEYS = ("accuracy", "macro_f1", "per_class", "confusion_matrix")


def evaluate_model(model: GPTClassifier, datasets: dict[str, ClassificationDataset], labels: list[str],
                   runtime: Runtime, batch_size: int) -> dict[str, Any]:
    """Metrics on the test split (most likely class), and for two classes ROC AUC and the threshold
    tuned on validation with the test metrics at that threshold."""
    model.eval()

    def run(split: str) -> tuple[np.ndarray, np.ndarray, float]:
        batches = iterate_classification_eval(datasets[split], batch_size)
        return predict(model, batches, runtime.device, runtime.autocast(), progress=True)

    test_probs, test_true, test_loss = run("test")
    binary = len(labels) == 2
    report = classification_report(test_true, decide(test_probs), labels,
                                   y_score=test_probs[:, 1] if binary else None)
    report["loss"] = test_loss
    report["examples"] = len(test_true)
    if binary:
        val_probs, val_true, _ = run("val")
        if val_true.any():
            threshold, val_f1 = tune_threshold(val_true, val_probs[:, 1])
            at_threshold = classification_report(test_true, decide(test_probs, threshold), labels)
            report["tuned_threshold"] = {"positive_label": labels[1], "threshold": threshold, "val_f1": val_f1,
                                         "test": {key: at_threshold[key] for key in REPORT_KEYS}}
    return report


def write_reports(out_dir: Path, report: dict[str, Any], labels: list[str]) -> None:
    """report.json always; report.md once there is an `after` to set beside `before`. Both atomic."""
    atomic_write(out_dir / "report.json", lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
    if "after" not in report:
        return
    run, before, after = report["run"], report["before"], report["after"]
    lines = [
        "# Classifier fine-tuning report", "",
        f"- model: {run['model']}",
        f"- trains: {run['trains']}; {run['trainable_parameters']:,} of {run['total_parameters']:,} parameters",
        f"- data: {run['split_sizes']['train']:,} train / {run['split_sizes']['val']:,} validation / "
        f"{run['split_sizes']['test']:,} test texts; labels {', '.join(labels)}",
        f"- training: {run['steps']} steps in {run['train_seconds']:.0f} s"
        + (" (stopped early)" if run["stopped_early"] else "")
        + f"; whole run {run['wall_seconds']:.0f} s; peak memory {run['peak_memory_mib']:,.0f} MiB",
        "",
        "## Test split, before and after training (the most likely class)", "",
        format_report_markdown(before, after, labels),
    ]
    if "tuned_threshold" in before and "tuned_threshold" in after:
        tb, ta = before["tuned_threshold"], after["tuned_threshold"]
        lines += [
            "## Test split with the decision threshold tuned on validation", "",
            f"Predict {labels[1]!r} when its probability is at least the threshold that maximizes its F1 on the "
            f"validation split: {tb['threshold']:.4f} before training, {ta['threshold']:.4f} after "
            "(`python -m gpt classify --threshold tuned` applies the latter).", "",
            format_report_markdown(tb["test"], ta["test"], labels),
        ]
    atomic_write(out_dir / "report.md", lambda f: f.write("\n".join(lines).encode()))


def summary_line(name: str, report: dict[str, Any], labels: list[str]) -> str:
    text = f"{name}: accuracy {report['accuracy']:.4f}, macro F1 {report['macro_f1']:.4f}"
    if len(labels) == 2:
        text += f", {labels[1]} F1 {report['per_class'][labels[1]]['f1']:.4f}"
        if report.get("roc_auc") is not None:
            text += f", ROC AUC {report['roc_auc']:.4f}"
        if "tuned_threshold" in report:
            tuned = report["tuned_threshold"]
            text += (f"; at the threshold {tuned['threshold']:.3f} tuned on validation: {labels[1]} F1 "
                     f"{tuned['test']['per_class'][labels[1]]['f1']:.4f}")
    return text


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    source, config = parse_args(sys.argv[1:] if argv is None else argv)
    model_cfg, train_cfg, data_cfg, classifier_cfg, lora_cfg = (
        config[k] for k in ("model", "train", "data", "classifier", "lora"))
    splits = read_splits(data_cfg)  # bad data stops here, before a run folder or a model exists
    runtime = setup_runtime(train_cfg, "classifier")

    loaded = load_backbone(source, model_cfg)
    gpt, tokenizer, tokenizer_name = loaded.model, loaded.tokenizer, loaded.tokenizer_name
    max_length = classifier_cfg.max_length or min(gpt.config.context_length, 512)
    model = GPTClassifier(gpt, len(splits.labels), classifier_cfg.pooling, max_length)
    lora = lora_cfg.settings() if train_cfg.trainable == "lora" else None
    trains = set_trainable(model, train_cfg.trainable, lora)
    trainable_parameters, total_parameters = count_parameters(model)
    model.to(runtime.device)

    pad_id = tokenizer.padding_id
    datasets = tokenize_splits(splits, tokenizer, max_length, pad_id)
    weights = class_weights(splits.ids(splits.train), len(splits.labels)) if data_cfg.balance == "weight" else None
    config["model"] = gpt.config
    if runtime.is_main:
        save_config_json(config, runtime.out_dir / "config.json")
        print(f"model: {loaded.description}; {gpt.config.n_layer} blocks, d_model {gpt.config.d_model}; "
              f"tokenizer {tokenizer_name}")
        print(f"trains: {trains}; {describe_parameters(model)}")
        print("\n".join(splits.notes))
        shown = ", ".join(f"{label} ({i})" for i, label in enumerate(splits.labels[:20]))
        print(f"labels: {shown}" + (f", ... ({len(splits.labels):,} in all)" if len(splits.labels) > 20 else "")
              + (f"; class weights {[round(w, 3) for w in weights.tolist()]}" if weights is not None else ""))
        print(describe_splits(splits, datasets))
        print(f"device {runtime.device}, precision {runtime.autocast_dtype}; run folder {runtime.out_dir}")

    eval_batch_size = 2 * train_cfg.batch_size
    report: dict[str, Any] = {"labels": splits.labels}
    if runtime.is_main:
        report["before"] = evaluate_model(model, datasets, splits.labels, runtime, eval_batch_size)
        print(summary_line("before training (test split)", report["before"], splits.labels))
        write_reports(runtime.out_dir, report, splits.labels)

    weights_on_device = weights.to(runtime.device) if weights is not None else None

    def loss(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        ids, lengths, labels = batch
        logits = model(ids, lengths)  # (B, num_classes)
        return F.cross_entropy(logits.float(), labels, weight=weights_on_device)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        batches = iterate_classification_eval(datasets["val"], eval_batch_size, max_batches=train_cfg.eval_batches)
        probs, true, val_loss = predict(model, batches, runtime.device, class_weight=weights_on_device)
        metrics = classification_report(true, decide(probs), splits.labels)
        return {"loss": val_loss, "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}

    info = classifier_info(splits.labels, classifier_cfg.pooling, max_length, pad_id, lora)
    task = TrainTask(
        model=model,
        train_batches=ClassificationBatchLoader(datasets["train"], train_cfg.batch_size, shuffle=True,
                                                seed=train_cfg.seed, rank=runtime.rank,
                                                world_size=runtime.world_size,
                                                group_by_length=data_cfg.group_by_length),
        loss=loss,
        evaluate=evaluate,
        batch_tokens=lambda batch: int(batch[1].sum()),
        sequence_length=lambda batch: batch[0].shape[1],
        checkpoint_extra={"classifier": info},
        tokenizer=tokenizer_name,
    )
    result = train(task, train_cfg, runtime, {name: s.to_dict() for name, s in config.items()})
    if not runtime.is_main or result.interrupted:  # an interrupted run has said how to resume
        return 0

    best = runtime.out_dir / "checkpoints" / "best.pt"
    if best.exists():  # the weights with the lowest validation loss
        load_model_state(model, load_checkpoint(best, map_location=runtime.device)["model"], best)
    if lora is not None:
        merge_lora(model.gpt)  # plain Linear layers again: the final checkpoint loads without LoRA code
    after = evaluate_model(model, datasets, splits.labels, runtime, eval_batch_size)
    report["after"] = after
    threshold = after["tuned_threshold"]["threshold"] if "tuned_threshold" in after else None
    save_checkpoint(runtime.out_dir / "checkpoints" / "final.pt", model, tokenizer=tokenizer_name,
                    classifier=classifier_info(splits.labels, classifier_cfg.pooling, max_length, pad_id,
                                               threshold=threshold),
                    step=result.steps, train_config=train_cfg.to_dict())
    report["run"] = {
        "model": loaded.description, "trains": trains, "trainable": train_cfg.trainable,
        "trainable_parameters": trainable_parameters, "total_parameters": total_parameters,
        "split_sizes": {name: len(d) for name, d in datasets.items()}, "max_length": max_length,
        "steps": result.steps, "stopped_early": result.stopped_early, "train_seconds": result.train_seconds,
        "wall_seconds": time.perf_counter() - started, "peak_memory_mib": peak_memory_mib(),
    }
    write_reports(runtime.out_dir, report, splits.labels)
    print(summary_line("after training (test split)", after, splits.labels))
    print(f"{result.steps} steps, {result.train_seconds:.0f} s of training, {report['run']['wall_seconds']:.0f} s "
          f"in all; peak memory {report['run']['peak_memory_mib']:,.0f} MiB; wrote {runtime.out_dir / 'report.md'} "
          f"and {runtime.out_dir / 'checkpoints' / 'final.pt'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
