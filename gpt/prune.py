"""Magnitude pruning of a model's projections, with an optional recovery fine-tune.

    python -m gpt prune --model smollm2-135m-instruct --sparsity 0.5 --out pruned/smol-50
    python -m gpt prune --model smollm2-135m-instruct --pattern 2:4 --out pruned/smol-2of4 \\
        --recover-steps 20 --data.path data/botchan.txt --train.lr 1e-4

What is pruned: every projection of every transformer block, the `Linear` modules of
gpt/model.py's blocks (attention q/k/v/out, MLP gate/up/down). Their biases, the
embeddings, the norms and the LM head are never pruned (the head of a tied model is the
token embedding itself).

Patterns, each a keep-mask per projection weight (out_features, in_features):

    unstructured, --scope layer    in each projection, the round(S * n) weights of smallest |w|
                                   are zeroed (ties broken by position), S = --sparsity
    unstructured, --scope global   one ranking of |w| over all projections together: the
                                   round(S * N) smallest of all N projection weights are zeroed,
                                   so layers with small weights lose more of them
    2:4                            of every 4 consecutive weights of a row (along the input
                                   dimension), the 2 of largest |w| are kept: 50% exactly

The output folder is one of our run folders, so every verb loads it with `--model DIR`:
checkpoints/best.pt (with the source model's tokenizer name, so the tokenizer comes
along) and prune.json, the recipe (source, pattern, sparsity, scope, the sparsity of each
layer, of each layer kind and overall, measured on the written weights). With
`--recover-steps N` the folder is the run folder of a short fine-tune through the ordinary
training loop (gpt.train) on `--data.path` (any `--train.*`/`--data.*` field applies):
config.json, metrics.jsonl, checkpoints/latest.pt and best.pt (the lowest validation loss,
what verbs load). The masks stay fixed during it: a gradient hook zeroes the gradient of
every pruned weight, so AdamW's moments for it stay exactly zero, its update (0 / (0 + eps))
is exactly zero, and decoupled weight decay multiplies zero by a number: a pruned weight
stays exactly 0.0 at every step (checked on the written checkpoint).

Speed: the pruned model is a dense model holding zeros. Dense matmuls (on the CPU
certainly) take as long with zeros as without, and the files are as large as before:
nothing here compresses the weights. On CUDA, 2:4 weights in fp16/bf16 can use the
sparse tensor cores through `torch.sparse.to_sparse_semi_structured`
(`semi_structured_linears`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import cli_args
from .checkpoint import load_checkpoint, resolve_checkpoint_path, save_checkpoint
from .config import DataConfig, Section, TrainConfig, build_config, parse_overrides, save_config_json
from .errors import UserError
from .files import write_json
from .model import GPT
from .runtime import pick_device, setup_runtime
from .weights import load_model_and_tokenizer

PATTERNS = ("unstructured", "2:4")
SCOPES = ("layer", "global")
RECIPE_NAME = "prune.json"

# ----------------------------------------------------------------------------
# What is pruned
# ----------------------------------------------------------------------------


def prunable_linears(model: GPT) -> dict[str, nn.Linear]:
    """The projections of every block, by module name ("blocks.3.attn.q_proj"); never the LM head."""
    return {name: module for name, module in model.blocks.named_modules(prefix="blocks")
            if isinstance(module, nn.Linear)}


def layer_kind(name: str) -> str:
    """"blocks.3.attn.q_proj" -> "q_proj"."""
    return name.rsplit(".", 1)[-1]


# ----------------------------------------------------------------------------
# Masks (True = kept)
# ----------------------------------------------------------------------------


def smallest_magnitude_mask(magnitudes: torch.Tensor, count: int) -> torch.Tensor:
    """A keep-mask of `magnitudes`' shape with its `count` smallest entries False (ties: the earlier position)."""
    flat = magnitudes.flatten()
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[torch.argsort(flat, stable=True)[:count]] = False
    return keep.view_as(magnitudes)


def unstructured_masks(weights: dict[str, torch.Tensor], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """Keep-masks zeroing round(sparsity * n) of the smallest |w|: per weight ("layer") or over all ("global")."""
    if scope == "layer":
        return {name: smallest_magnitude_mask(w.abs(), round(sparsity * w.numel()))
                for name, w in tqdm(weights.items(), desc="masks", leave=False)}
    magnitudes = torch.cat([w.abs().flatten() for w in weights.values()])  # (N,) every projection weight
    keep = smallest_magnitude_mask(magnitudes, round(sparsity * magnitudes.numel()))
    pieces = keep.split([w.numel() for w in weights.values()])
    return {name: piece.view_as(w) for (name, w), piece in zip(weights.items(), pieces)}


def check_groups_of_four(weight: torch.Tensor, name: str) -> None:
    """A UserError naming the layer unless its rows split into groups of 4 weights."""
    if weight.shape[1] % 4:
        raise UserError(f"--pattern 2:4: {name} has {weight.shape[1]} input features, not a multiple of 4")


def two_of_four_mask(weight: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """The keep-mask that keeps the 2 largest |w| of every 4 consecutive weights of each row of `weight` (out, in)."""
    check_groups_of_four(weight, name)
    rows, columns = weight.shape
    groups = weight.abs().reshape(rows, columns // 4, 4)  # (out, in/4, 4)
    kept = groups.topk(2, dim=-1).indices  # (out, in/4, 2)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, kept, True)
    return keep.reshape(rows, columns)  # (out, in)


def prune_masks(model: GPT, pattern: str, sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """The keep-mask of every projection weight of `model` for this recipe."""
    weights = {name: linear.weight.detach() for name, linear in prunable_linears(model).items()}
    if pattern == "2:4":
        for name, w in weights.items():  # every shape checked before any work
            check_groups_of_four(w, name)
        return {name: two_of_four_mask(w, name) for name, w in tqdm(weights.items(), desc="masks", leave=False)}
    return unstructured_masks(weights, sparsity, scope)


@torch.no_grad()
def apply_masks(model: GPT, masks: dict[str, torch.Tensor]) -> None:
    """Zero the weights the masks drop, in place."""
    linears = prunable_linears(model)
    for name, keep in masks.items():
        linears[name].weight.mul_(keep)


def keep_pruned_weights_at_zero(model: GPT, masks: dict[str, torch.Tensor]) -> list[Any]:
    """Gradient hooks that zero the gradient of every pruned weight (returns their handles).

    With a zero gradient from the first step, AdamW (gpt.optim) keeps that weight exactly
    zero: both moments stay 0, the update 0 / (sqrt(0) + eps) is 0, and decoupled weight
    decay scales 0 to 0. Clipping scales every gradient by one factor, 0 included.
    """
    linears = prunable_linears(model)
    handles = []
    for name, keep in masks.items():
        weight = linears[name].weight
        keep_as_float = keep.to(device=weight.device, dtype=weight.dtype)
        handles.append(weight.register_hook(lambda grad, keep=keep_as_float: grad * keep))
    return handles


# ----------------------------------------------------------------------------
# How sparse a model is
# ----------------------------------------------------------------------------


def sparsity_report(model: GPT) -> dict[str, Any]:
    """Zeros among the projection weights (the fraction that is exactly 0.0): per layer, per kind, overall,
    and over every parameter of the model (embeddings, norms and head included)."""
    layers, kinds = {}, {}
    pruned_zeros = pruned_total = 0
    for name, linear in prunable_linears(model).items():
        zeros, total = int((linear.weight == 0).sum()), linear.weight.numel()
        layers[name] = zeros / total
        kind_zeros, kind_total = kinds.get(layer_kind(name), (0, 0))
        kinds[layer_kind(name)] = (kind_zeros + zeros, kind_total + total)
        pruned_zeros, pruned_total = pruned_zeros + zeros, pruned_total + total
    model_zeros = sum(int((p == 0).sum()) for p in model.parameters())
    return {
        "layers": layers,
        "kinds": {kind: {"weights": total, "sparsity": zeros / total} for kind, (zeros, total) in kinds.items()},
        "projections": {"weights": pruned_total, "sparsity": pruned_zeros / pruned_total},
        "whole_model": {"parameters": model.num_parameters(), "sparsity": model_zeros / model.num_parameters()},
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as a small table: one line per layer kind, then all projections and the whole model."""
    lines = [f"  {kind:<10} {entry['weights']:>13,} weights  {100 * entry['sparsity']:6.2f}% zeros"
             for kind, entry in report["kinds"].items()]
    projections, whole = report["projections"], report["whole_model"]
    lines.append(f"  {'projections':<10} {projections['weights']:>13,} weights  "
                 f"{100 * projections['sparsity']:6.2f}% zeros (every pruned layer)")
    lines.append(f"  {'model':<10} {whole['parameters']:>13,} params   {100 * whole['sparsity']:6.2f}% zeros "
                 f"(embeddings, norms and LM head included, not pruned)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# 2:4 on CUDA
# ----------------------------------------------------------------------------


def is_two_of_four(weight: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive weights along each row holds at most 2 non-zeros."""
    rows, columns = weight.shape
    return columns % 4 == 0 and bool(((weight != 0).reshape(rows, columns // 4, 4).sum(-1) <= 2).all())


def semi_structured_linears(model: GPT) -> int:
    """Swap every 2:4-sparse projection weight of `model` (on CUDA, fp16 or bf16) for torch's semi-structured
    sparse tensor, which `F.linear` multiplies on the sparse tensor cores; returns how many were swapped.

    For inference only (the swapped weights do not train). torch also needs each weight's shape to suit its
    kernels (multiples of 32 or 64 rows and columns); a weight that does not raises torch's own error.
    """
    from torch.sparse import to_sparse_semi_structured

    swapped = 0
    for name, linear in prunable_linears(model).items():
        weight = linear.weight
        if weight.device.type != "cuda" or weight.dtype not in (torch.float16, torch.bfloat16):
            raise UserError(f"{name}: semi-structured sparsity needs a CUDA fp16/bf16 weight, "
                            f"not {weight.dtype} on {weight.device}")
        if not is_two_of_four(weight):
            raise UserError(f"{name}: not 2:4 sparse (prune with --pattern 2:4 first)")
        linear.weight = nn.Parameter(to_sparse_semi_structured(weight.detach()), requires_grad=False)
        swapped += 1
    return swapped


# ----------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------

# What a recovery fine-tune changes from TrainConfig's defaults (a pretraining run); --train.* overrides these.
RECOVERY_DEFAULTS: dict[str, Any] = {"lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 0, "weight_decay": 0.0,
                                     "batch_size": 4, "eval_batches": 4, "log_interval": 1}
DEFAULT_RECOVER_WINDOW = 256  # tokens per recovery training window, when the model's context is not shorter

EPILOG = f"""\
examples:
  python -m gpt prune --model smollm2-135m-instruct --sparsity 0.5 --out pruned/smol-50
  python -m gpt prune --model smollm2-135m-instruct --sparsity 0.3 --scope global --out pruned/smol-30g
  python -m gpt prune --model smollm2-135m-instruct --pattern 2:4 --out pruned/smol-2of4 \\
      --recover-steps 20 --data.path data/botchan.txt --train.lr 1e-4
  python -m gpt evaluate --model pruned/smol-50 --text data/botchan.txt --window 1024 --stride 512

what is pruned: the projections of every block (attention q/k/v/out, MLP gate/up/down); never the
embeddings, the norms, the biases or the LM head (a tied head is the token embedding).

speed and size: the output is a dense model holding zeros. Dense matmuls (on the CPU certainly) are
no faster with zeros, and the checkpoint is as large as the source's: nothing is compressed. On CUDA,
2:4 fp16/bf16 weights can run on the sparse tensor cores (gpt.prune.semi_structured_linears).

recovery (--recover-steps N): the ordinary training loop on --data.path (.txt, folder, .jsonl or a
prepared token folder) in windows of --recover-window tokens, masks fixed (pruned weights stay 0.0).
Every --train.* and --data.* field applies (see `python pretrain.py --help`), except train.max_steps
(--recover-steps) and train.out_dir (--out). Defaults that differ from pretraining:
  {", ".join(f"--train.{key} {value}" for key, value in RECOVERY_DEFAULTS.items())}; train.eval_interval
  defaults to N (one evaluation at the end, plus the one before training).
"""


def sparsity_value(text: str) -> float:
    """--sparsity: a fraction in [0, 1)."""
    value = cli_args.non_negative_float(text)
    if value >= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (a fraction of the weights to zero), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .cli import add_model_arguments  # the same --model/--checkpoint/--preset as every verb

    parser = argparse.ArgumentParser(
        prog="python -m gpt prune", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Zero the smallest-magnitude weights of every block's projections (unstructured or 2:4), "
                    "optionally fine-tune with the masks fixed, and write a folder every verb loads with --model.")
    add_model_arguments(parser)
    parser.add_argument("--pattern", choices=PATTERNS, default="unstructured",
                        help="unstructured: any weights; 2:4: 2 of every 4 along each row (default: %(default)s)")
    parser.add_argument("--sparsity", type=sparsity_value, default=None,
                        help="fraction of the projection weights to zero, in [0, 1) (unstructured: required; "
                             "2:4: 0.5 or omitted)")
    parser.add_argument("--scope", choices=SCOPES, default="layer",
                        help="unstructured: rank |w| within each layer, or over all projections at once "
                             "(default: %(default)s)")
    parser.add_argument("--out", type=cli_args.output_folder, required=True,
                        help="the output folder (new, or empty); load it with --model OUT")
    parser.add_argument("--recover-steps", type=cli_args.non_negative_int, default=0,
                        help="optimizer steps of a recovery fine-tune on --data.path, masks fixed (default: 0, none)")
    parser.add_argument("--recover-window", type=cli_args.int_at_least(2), default=None,
                        help=f"tokens per training window of the recovery, at most the model's context "
                             f"(default: {DEFAULT_RECOVER_WINDOW}, or the context when shorter)")
    return parser


def recovery_config(overrides: list[str], steps: int) -> dict[str, Section]:
    """The [train] and [data] sections of a recovery run from the --train.*/--data.* arguments."""
    parsed = parse_overrides(overrides)
    for section, fields in parsed.items():
        if section not in ("train", "data"):
            raise UserError(f"--{section}.{next(iter(fields))}: prune takes --train.* and --data.* fields only")
    if not steps:
        key = next(f"--{section}.{name}" for section, fields in parsed.items() for name in fields)
        raise UserError(f"{key}: training settings need --recover-steps N (a recovery fine-tune)")
    train_fields = parsed.get("train", {})
    for name, flag in (("max_steps", "--recover-steps"), ("out_dir", "--out")):
        if name in train_fields:
            raise UserError(f"--train.{name}: set by {flag} in prune")
    if "path" not in parsed.get("data", {}):
        raise UserError(f"--recover-steps {steps}: needs --data.path, the text to fine-tune on")
    defaults = {**RECOVERY_DEFAULTS, "max_steps": steps, "eval_interval": steps}
    return build_config({"train": TrainConfig, "data": DataConfig}, {"train": defaults}, parsed)


def check_output_folder(out: Path) -> None:
    """--out must be a new folder or an empty one: pruning never writes over anything."""
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out: {out} exists and is not empty; choose a new folder")


def check_pattern(pattern: str, sparsity: float | None) -> float:
    """The sparsity the pattern prunes to: --sparsity for unstructured (required), 0.5 for 2:4."""
    if pattern == "2:4":
        if sparsity is not None and sparsity != 0.5:
            raise UserError(f"--sparsity {sparsity:g}: --pattern 2:4 prunes exactly 0.5 (2 of every 4); "
                            "omit --sparsity or use --pattern unstructured")
        return 0.5
    if sparsity is None:
        raise UserError("--sparsity: required with --pattern unstructured (a fraction in [0, 1), e.g. 0.5)")
    return sparsity


def prune_cli(argv: list[str]) -> int:
    """`python -m gpt prune`: see `--help` and the module docstring."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    sparsity = check_pattern(args.pattern, args.sparsity)
    if args.pattern == "2:4" and args.scope != "layer":
        raise UserError("--scope global: 2:4 decides within each group of 4 weights; there is no global ranking")
    config = recovery_config(rest, args.recover_steps) if rest or args.recover_steps else {}
    check_output_folder(args.out)
    device = pick_device(args.device, "--device")

    if getattr(args, "quantize", None):  # the shared model flags may offer quantize-on-load
        raise UserError(f"--quantize {args.quantize}: prune works on full-precision weights; "
                        "quantize the pruned folder afterwards (python -m gpt quantize --model OUT ...)")

    source = args.preset or args.model or args.checkpoint
    loaded = load_model_and_tokenizer(source, seed=args.seed)
    model = loaded.model.to(device)
    if not prunable_linears(model):
        raise UserError(f"--model {source}: no full-precision projection weights to prune (a quantized model?)")
    context = model.config.context_length
    if args.recover_window and args.recover_window > context:
        raise UserError(f"--recover-window {args.recover_window} exceeds the model's context length ({context})")
    args.recover_window = args.recover_window or min(DEFAULT_RECOVER_WINDOW, context)
    masks = prune_masks(model, args.pattern, sparsity, args.scope)
    apply_masks(model, masks)
    recipe = {"source": loaded.description, "tokenizer": loaded.tokenizer_name, "pattern": args.pattern,
              "sparsity": sparsity, "scope": args.scope if args.pattern == "unstructured" else None,
              "pruned": "the Linear projections of every block; not embeddings, norms, biases or the LM head"}
    print(f"pruned {len(masks)} projections of {loaded.description} ({args.pattern}"
          f"{f', sparsity {sparsity:g}, {args.scope} scope' if args.pattern == 'unstructured' else ''}):")
    print(format_report(sparsity_report(model)))

    if config:
        recovery, exit_code = recover(model, masks, loaded.tokenizer, loaded.tokenizer_name, config, args, recipe)
        if exit_code:  # a signal stopped it: no recipe is written for an unfinished folder
            print(f"[recovery stopped at step {recovery['steps']}: {args.out} holds the unfinished run and no "
                  f"{RECIPE_NAME}; prune again into a new folder]", file=sys.stderr)
            return exit_code
        recipe["recovery"] = recovery
        checkpoint = resolve_checkpoint_path(args.out)
        model.load_state_dict(load_checkpoint(checkpoint)["model"])
        report = sparsity_report(model)
        print(f"after {args.recover_steps} recovery steps ({checkpoint}):\n{format_report(report)}")
        if any(((linear.weight != 0) & ~masks[name].to(linear.weight.device)).any()
               for name, linear in prunable_linears(model).items()):
            raise RuntimeError(f"{checkpoint}: a pruned weight moved during recovery; the masks did not hold")
    else:
        checkpoint = args.out / "checkpoints" / "best.pt"
        save_checkpoint(checkpoint, model, tokenizer=loaded.tokenizer_name, prune=recipe)
        report = sparsity_report(model)
    write_json(args.out / RECIPE_NAME, {**recipe, "checkpoint": str(checkpoint.relative_to(args.out)), **report})
    print(f"wrote {args.out} (load it with --model {args.out}); recipe in {args.out / RECIPE_NAME}")
    return 0


def recover(model: GPT, masks: dict[str, torch.Tensor], tokenizer: Any, tokenizer_name: str,
            config: dict[str, Section], args: argparse.Namespace, recipe: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Fine-tune the pruned `model` in the run folder --out with the masks fixed.

    Returns what the run did, and its exit code (non-zero when a signal stopped it)."""
    from .data import pretraining_windows
    from .tasks import pretrain_task
    from .train import train

    train_cfg, data_cfg = config["train"], config["data"]
    train_cfg = dataclasses.replace(train_cfg, out_dir=str(args.out))
    # Bad data stops here, before the run folder exists.
    train_set, val_set = pretraining_windows(data_cfg.path, args.recover_window, tokenizer, data_cfg.val_fraction,
                                             data_cfg.stride, vocab_size=model.config.vocab_size)
    run_config = {"train": train_cfg.to_dict(), "data": data_cfg.to_dict(),
                  "prune": {key: recipe[key] for key in ("source", "pattern", "sparsity", "scope")}
                  | {"recover_window": args.recover_window}}
    with setup_runtime(train_cfg, "prune") as runtime:
        save_config_json({"train": train_cfg, "data": data_cfg}, runtime.out_dir / "config.json")
        print(f"recovery: {args.recover_steps} steps on {data_cfg.path} ({len(train_set):,} training windows of "
              f"{args.recover_window} tokens, {len(val_set):,} validation windows); device {runtime.device}, "
              f"precision {runtime.autocast_dtype}")
        model.to(runtime.device)
        hooks = keep_pruned_weights_at_zero(model, masks)
        task = dataclasses.replace(pretrain_task(model, train_set, val_set, train_cfg, runtime),
                                   tokenizer=tokenizer_name, checkpoint_extra={"prune": recipe})
        result = train(task, train_cfg, runtime, run_config)
        for hook in hooks:
            hook.remove()
    summary = {"steps": result.steps, "data": data_cfg.path, "window": args.recover_window,
               "best_val_loss": result.best_val_loss, "last_val": result.last_val,
               "train": {key: getattr(train_cfg, key) for key in ("lr", "min_lr", "batch_size", "weight_decay")}}
    return summary, result.exit_code
