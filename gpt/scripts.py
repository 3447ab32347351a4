"""What the training scripts share: their command line, what trains, and the end of a fine-tuning run.

A script is a thin command line over the library. Each one

1. parses `--config FILE`, `--model SOURCE` (fine-tuning) and `--section.field value`
   overrides into its config sections (`parse_script_args`; `--help` lists every field);
2. loads or builds the model (`load_model`) and freezes what does not train
   (`set_trainable`: head | last:N | all | lora);
3. trains with `gpt.train.train`;
4. takes the weights with the best validation loss, folds LoRA adapters into them
   (`best_weights`) and writes `checkpoints/final.pt`, which every verb loads.
"""

from __future__ import annotations

import argparse
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .checkpoint import load_checkpoint, load_model_state
from .config import ModelConfig, Section, TrainConfig, build_config, parse_overrides, read_toml
from .errors import ConfigError, UserError
from .lora import apply_lora, count_parameters, merge_lora
from .model import GPT
from .quantize import dequantize_model, is_quantized, parse_scheme, quantize_model, weight_bytes
from .runtime import pick_device
from .sharded_checkpoint import is_sharded_checkpoint
from .tokenizer import get_tokenizer
from .weights import LoadedModel, is_preset_name, load_model_and_tokenizer

# ----------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------


def config_epilog(sections: dict[str, type[Section]]) -> str:
    """The end of `--help`: every config field with its type, default and meaning."""
    return "config fields (override any with --section.field value):\n" + "\n".join(
        line for cls in sections.values() for line in cls.field_help())


def parse_script_args(
    argv: list[str], *, description: str, sections: dict[str, type[Section]], default_config: Path,
    model_default: str | None = None, model_help: str | None = None,
) -> tuple[str, dict[str, Section]]:
    """(the --model source, or "" for none; the resolved config sections) of a training script.

    Without `model_help` the script takes no `--model`. When the script has a [model]
    section, `--model` with a preset name (tiny, gpt2-124m, ...) stands for that section
    built from the preset, and `--model.*` overrides are refused for a pretrained model,
    which keeps its own shape. Every value is checked here, `train.device` against the
    devices this machine has included, so a mistake stops the script before any work.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=config_epilog(sections))
    shown = default_config.relative_to(default_config.parents[1])  # configs/NAME.toml
    parser.add_argument("--config", default=str(default_config), help=f"TOML config file (default: {shown})")
    if model_help is not None:
        parser.add_argument("--model", default=model_default or "", help=model_help)
    args, override_args = parser.parse_known_args(argv)
    toml = read_toml(args.config) if args.config else {}
    overrides = parse_overrides(override_args)
    source = getattr(args, "model", "")
    if source and "model" in sections:
        if is_preset_name(source):
            toml.pop("model", None)  # the preset replaces the config file's model; command-line overrides still apply
            overrides.setdefault("model", {})["preset"] = source
            source = ""
        elif overrides.get("model"):
            key = next(iter(overrides["model"]))
            raise UserError(f"--model.{key}: model.* settings apply to a model from scratch only; "
                            f"{source} keeps its own config")
    config = build_config(sections, toml, overrides)
    train = config.get("train")
    if isinstance(train, TrainConfig):
        pick_device(train.device)  # a device this machine lacks stops the script here, before any work
    return source, config


def load_model(source: str, model_cfg: ModelConfig | None = None, seed: int = 0) -> LoadedModel:
    """The model and tokenizer `source` names (see `load_model_and_tokenizer`); with no source, a model from
    scratch built from `model_cfg` with the GPT-2 tokenizer."""
    if source:
        return load_model_and_tokenizer(source, seed=seed)
    if model_cfg is None:
        raise UserError("no model: give --model")
    return LoadedModel(GPT(model_cfg), get_tokenizer("gpt2"), "gpt2", "from scratch (random init)")


# ----------------------------------------------------------------------------
# What trains
# ----------------------------------------------------------------------------

TRAINABLE_KINDS = ("head", "last", "all", "lora")


def parse_trainable(spec: str, kinds: tuple[str, ...] = TRAINABLE_KINDS) -> tuple[str, int]:
    """"head" | "all" | "lora" -> (spec, 0); "last:N" -> ("last", N), for the `kinds` a script allows.

    Anything else raises ConfigError naming train.trainable.
    """
    kind, colon, count = spec.partition(":")
    if kind == "last" and kind in kinds and count.isdigit() and int(count) >= 1:
        return "last", int(count)
    if kind != "last" and kind in kinds and not colon:
        return kind, 0
    choices = ", ".join("last:N (N >= 1)" if k == "last" else k for k in kinds)
    raise ConfigError(f"train.trainable: expected one of {choices}; got {spec!r}")


@dataclass
class FinetuneTrainConfig(TrainConfig):
    """The shared training fields, plus what trains."""

    kinds: typing.ClassVar[tuple[str, ...]] = TRAINABLE_KINDS

    trainable: str = field(default="all", metadata={"help": "head | last:N (last N blocks + final norm + head) | "
                                                            "all | lora (adapters, see [lora])"})
    quantize: str = field(default="none", metadata={"help": "none | int8 | int4 | int4:G: freeze the loaded model's "
                                                            "block projections in that format before training "
                                                            "(QLoRA-style: with trainable lora or head)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        kind, _ = parse_trainable(self.trainable, self.kinds)
        if self.quantize != "none":
            try:
                parse_scheme(self.quantize, "train.quantize")
            except UserError as err:
                raise ConfigError(str(err)) from None
            if kind not in ("lora", "head"):
                raise ConfigError(f"train.quantize {self.quantize}: a quantized base is frozen; train it with "
                                  f"train.trainable lora (or head), not {self.trainable}")


def quantize_base(body: GPT, spec: str) -> str | None:
    """Quantize `body`'s block projections as `spec` says (train.quantize), in place; a line saying what was done,
    or None for "none". The LM head and embeddings stay float."""
    if spec == "none":
        return None
    before = weight_bytes(body)
    scheme = parse_scheme(spec, "train.quantize")
    quantize_model(body, scheme, include_head=False)
    return f"base quantized to {scheme}: weights {before / 2**20:,.1f} MiB -> {weight_bytes(body) / 2**20:,.1f} MiB"


def set_trainable(body: GPT, spec: str, lora: dict[str, Any] | None = None, head: nn.Module | None = None) -> str:
    """Freeze everything of `body` (and `head`) but what `spec` trains; returns a short description of it.

    "head": the head alone. "last:N": the last N blocks, the final norm and the head.
    "all": every parameter. "lora": adapters on `lora["targets"]` (rank, alpha, dropout
    from `lora`), plus the head when there is one; the rest stays frozen.
    """
    kind, count = parse_trainable(spec)
    n_layer = len(body.blocks)
    if kind == "last" and count > n_layer:
        raise UserError(f"train.trainable: {spec} asks for the last {count} blocks, but the model has {n_layer}")
    if kind in ("head", "last") and head is None:
        raise UserError(f"train.trainable: {spec} needs a separate head to train")
    plus_head = " + head" if head is not None else ""
    if kind == "lora":
        if lora is None:
            raise UserError("train.trainable lora needs LoRA settings (rank, alpha, dropout, targets)")
        wrapped = apply_lora(body, **lora)  # freezes everything else
        if head is not None:
            head.requires_grad_(True)
        return f"LoRA adapters (rank {lora['rank']}) on {len(wrapped)} layers{plus_head}"
    for module in (body, head):
        if module is not None:
            module.requires_grad_(kind == "all")
    if kind == "all":
        return "all parameters"
    head.requires_grad_(True)
    if kind == "head":
        return "head"
    for block in body.blocks[n_layer - count:]:
        block.requires_grad_(True)
    body.final_norm.requires_grad_(True)
    return f"last {count} block(s) + final norm + head"


def describe_parameters(model: nn.Module) -> str:
    """"trainable 1,234 of 5,678 parameters (21.73%)"."""
    trainable, total = count_parameters(model)
    return f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)"


# ----------------------------------------------------------------------------
# The end of a run
# ----------------------------------------------------------------------------


def best_weights(model: nn.Module, out_dir: Path, device: torch.device, lora_body: GPT | None = None) -> Path:
    """Load the best checkpoint's weights (lowest validation loss) into `model` and fold any LoRA adapters of
    `lora_body` into plain weights, so the final checkpoint loads without LoRA code; a quantized base
    (train.quantize) becomes float weights too, so it loads without quantization code.

    Returns the path the final checkpoint goes to (`checkpoints/final.pt`).
    """
    best = out_dir / "checkpoints" / "best.pt"
    if not best.exists() and is_sharded_checkpoint(best.with_suffix("")):  # written by a run with FSDP
        best = best.with_suffix("")
    if best.exists():
        load_model_state(model, load_checkpoint(best, map_location=device)["model"], best)
    else:
        print(f"[{best} does not exist (no evaluation was usable): the final weights are the last ones]",
              file=sys.stderr)
    if lora_body is not None:
        merge_lora(lora_body)
    if is_quantized(model):  # a QLoRA-style run: the final checkpoint is a float model every loader reads
        dequantize_model(model)
    return out_dir / "checkpoints" / "final.pt"
