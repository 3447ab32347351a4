"""Sharded checkpoints: a folder each process writes its own shards into (runs with `train.parallel fsdp`).

Under FSDP no process holds the whole model, so a checkpoint is a folder written by
`torch.distributed.checkpoint` (DCP) rather than one `torch.save`d file:

    checkpoints/latest/
        __0_0.distcp, __1_0.distcp, ...   the shards, one file per process
        .metadata                         DCP's index: where each tensor's shards lie (written last)
        meta.pt                           the rest, as in an ordinary checkpoint (gpt.checkpoint):
                                          format, model_config, tokenizer, step, rng, data position,
                                          counters, train config, and each parameter's AdamW step count

The tensors are "model.<name>" (the model's state dict) and "optimizer.<name>.exp_avg" /
".exp_avg_sq" (AdamW's moments), named by parameter, so they do not depend on how many
processes wrote them: DCP reshards on load, and a run may resume on another number of
processes (or in one process, or under DDP).

Atomic at the folder level: the processes write into checkpoints/.latest.partial, and
rank 0 renames it into place once DCP's metadata and meta.pt are complete (the previous
folder set aside as .latest.previous first, then removed; a run stopped between the two
renames resumes from it). A folder without both files is never used; a full disk is a
one-line error, and the previous checkpoint stays.

`consolidate` turns a sharded checkpoint into an ordinary checkpoint dict (what every verb
loads; `gpt.checkpoint.load_checkpoint` does it on the fly) and `write_sharded` an ordinary
one into a sharded folder: `python -m gpt consolidate` runs either way.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.fsdp import FSDPModule

from .checkpoint import FORMAT, load_checkpoint, tensor_bytes
from .config import ModelConfig
from .errors import ConfigError, UserError
from .files import atomic_write, disk_full_error, is_disk_full
from .model import GPT
from .optim import AdamW, param_groups

META_FILE = "meta.pt"
DCP_METADATA_FILE = ".metadata"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a complete sharded checkpoint folder."""
    path = Path(path)
    return (path / META_FILE).is_file() and (path / DCP_METADATA_FILE).is_file()


# ----------------------------------------------------------------------------
# Writing and reading, from a run's processes
# ----------------------------------------------------------------------------


def named_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The model's parameters as its optimizer holds them. Under FSDP those are the shards, which a forward
    pass without gradients (an evaluation) leaves swapped for gathered copies in the root unit: resharded first."""
    if isinstance(model, FSDPModule):
        model.reshard()
    return list(model.named_parameters())


def moments_by_name(model: torch.nn.Module, optimizer: AdamW) -> dict[str, dict[str, torch.Tensor]]:
    """AdamW's moments named by parameter (a tied parameter under its first name), for those that have some."""
    moments = {}
    for name, param in named_parameters(model):
        state = optimizer.state.get(param)
        if state:
            moments[name] = {"exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}
    return moments


def save_sharded(folder: Path, model: torch.nn.Module, optimizer: AdamW, meta: dict[str, Any], is_main: bool) -> None:
    """Write model, optimizer and `meta` (everything else an ordinary checkpoint holds, model_config included)
    into the sharded checkpoint `folder`. Every process calls it: each writes its own shards."""
    steps = {name: optimizer.state[param]["step"] for name, param in named_parameters(model)
             if optimizer.state.get(param)}
    tensors = {"model": model.state_dict(), "optimizer": moments_by_name(model, optimizer)}
    _write(folder, tensors, {**meta, "optimizer_steps": steps}, is_main, distributed=dist.is_initialized())


def _write(folder: Path, tensors: dict[str, Any], meta: dict[str, Any], is_main: bool, distributed: bool) -> None:
    partial = folder.with_name(f".{folder.name}.partial")
    if is_main:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run that died while writing
        partial.mkdir(parents=True)
    if distributed:
        dist.barrier()  # nobody writes into the folder before it is fresh
    try:
        with _quiet_if(not distributed):
            dcp.save(tensors, checkpoint_id=partial, no_dist=not distributed)  # returns once .metadata is written
    except Exception as err:
        if is_disk_full(err):  # the previous checkpoint under `folder` is untouched
            raise disk_full_error(partial, err, tensor_bytes(tensors)) from None
        raise
    if is_main:
        atomic_write(partial / META_FILE, lambda f: torch.save(meta, f))
        _swap_into_place(partial, folder)
    if distributed:
        dist.barrier()  # the next checkpoint may start only once this one is in place


@contextlib.contextmanager
def _quiet_if(single_process: bool) -> Iterator[None]:
    """Without a process group DCP warns that it assumes one process, which is what is meant here."""
    with warnings.catch_warnings():
        if single_process:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _swap_into_place(partial: Path, folder: Path) -> None:
    """Rename the complete `partial` folder to `folder`, replacing a previous one."""
    previous = folder.with_name(f".{folder.name}.previous")
    shutil.rmtree(previous, ignore_errors=True)
    if folder.exists():
        os.replace(folder, previous)
    os.replace(partial, folder)
    shutil.rmtree(previous, ignore_errors=True)


def read_meta(folder: str | Path) -> dict[str, Any]:
    """meta.pt of a sharded checkpoint (format checked); a damaged or foreign one names the folder."""
    folder = Path(folder)
    if not is_sharded_checkpoint(folder):
        raise UserError(f"{folder}: not a complete sharded checkpoint (it needs {META_FILE} and "
                        f"{DCP_METADATA_FILE})")
    try:
        meta = torch.load(folder / META_FILE, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{folder / META_FILE}: not readable ({type(err).__name__}: {err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{folder / META_FILE}: not a gpt checkpoint (no '{FORMAT}' format marker)")
    return meta


def load_sharded(folder: Path, model: torch.nn.Module, optimizer: AdamW) -> dict[str, Any]:
    """Load a sharded checkpoint into `model` and `optimizer` (sharded or not: DCP reads the part each process
    holds) and return its meta. Every process calls it."""
    meta = read_meta(folder)
    steps = meta["optimizer_steps"]
    for name, param in named_parameters(model):  # moments to load into, where the checkpoint has some
        if name in steps and not optimizer.state.get(param):
            optimizer.state[param] = {"step": 0, "exp_avg": torch.zeros_like(param),
                                      "exp_avg_sq": torch.zeros_like(param)}
    tensors = {"model": model.state_dict(), "optimizer": moments_by_name(model, optimizer)}
    try:
        with _quiet_if(not dist.is_initialized()):
            dcp.load(tensors, checkpoint_id=folder, no_dist=not dist.is_initialized())
    except Exception as err:  # a missing key or a shape that does not fit comes back wrapped by DCP
        raise UserError(f"{folder}: does not load into this run's model and optimizer ({err})") from None
    model.load_state_dict(tensors["model"])
    for name, param in named_parameters(model):
        if name in steps:
            optimizer.state[param]["step"] = steps[name]
    return meta


# ----------------------------------------------------------------------------
# Converting, in one process: sharded <-> ordinary
# ----------------------------------------------------------------------------


def _model_and_optimizer(meta: dict[str, Any], where: Path) -> tuple[GPT, AdamW]:
    """The run's model (on the meta device: shapes and names only) and an optimizer grouped as the run's."""
    try:
        config = ModelConfig.from_dict(meta["model_config"])
    except (ConfigError, KeyError) as err:
        raise UserError(f"{where}: bad model_config: {err}") from None
    with torch.device("meta"):
        model = GPT(config)
    train = meta.get("train_config", {})
    optimizer = AdamW(param_groups(model, train.get("weight_decay", 0.0)), lr=train.get("lr", 1e-3),
                      betas=(train.get("beta1", 0.9), train.get("beta2", 0.999)), eps=train.get("eps", 1e-8))
    return model, optimizer


def consolidate(folder: str | Path) -> dict[str, Any]:
    """A sharded checkpoint as an ordinary checkpoint dict: whole tensors, the optimizer's state in
    `torch.optim` form; it resumes a single-process or DDP run exactly as the sharded one would."""
    folder = Path(folder)
    meta = read_meta(folder)
    index = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    tensors = {key: torch.empty(item.size, dtype=item.properties.dtype)
               for key, item in index.items() if isinstance(item, TensorStorageMetadata)}
    with _quiet_if(True):
        dcp.load(tensors, checkpoint_id=folder, no_dist=True)
    steps = meta.pop("optimizer_steps")
    state = {**meta, "model": {key.removeprefix("model."): value for key, value in tensors.items()
                               if key.startswith("model.")}}
    model, optimizer = _model_and_optimizer(meta, folder)
    for name, param in model.named_parameters():
        if name in steps:
            optimizer.state[param] = {"step": steps[name], "exp_avg": tensors[f"optimizer.{name}.exp_avg"],
                                      "exp_avg_sq": tensors[f"optimizer.{name}.exp_avg_sq"]}
    state["optimizer"] = optimizer.state_dict()
    return state


def write_sharded(state: dict[str, Any], folder: str | Path, where: Path) -> None:
    """Write the ordinary checkpoint dict `state` (read from `where`) as the sharded checkpoint `folder`,
    which a run with `train.parallel fsdp` can resume on any number of processes."""
    folder = Path(folder)
    model, optimizer = _model_and_optimizer(state, where)
    if set(state["model"]) != set(model.state_dict()):
        raise UserError(f"{where}: only a language model's checkpoint (pretrain.py, finetune_instruct.py without "
                        "LoRA) can be sharded; this one holds other weights")
    meta = {key: value for key, value in state.items() if key not in ("model", "optimizer")}
    moments, steps = {}, {}
    if "optimizer" in state:
        params = [param for group in optimizer.param_groups for param in group["params"]]
        names = {id(param): name for name, param in model.named_parameters()}
        if len(state["optimizer"]["state"]) > len(params):
            raise UserError(f"{where}: its optimizer state does not fit the model it holds")
        for index, saved in state["optimizer"]["state"].items():
            name = names[id(params[int(index)])]
            moments[name] = {"exp_avg": saved["exp_avg"], "exp_avg_sq": saved["exp_avg_sq"]}
            steps[name] = int(saved["step"])
    _write(folder, {"model": state["model"], "optimizer": moments}, {**meta, "optimizer_steps": steps},
           is_main=True, distributed=False)


# ----------------------------------------------------------------------------
# python -m gpt consolidate
# ----------------------------------------------------------------------------


def consolidate_cli(argv: list[str]) -> int:
    """`python -m gpt consolidate SOURCE --out OUT`: sharded folder -> checkpoint file, or file -> sharded folder."""
    parser = argparse.ArgumentParser(
        prog="python -m gpt consolidate",
        description="Turn a sharded checkpoint folder (written by a run with --train.parallel fsdp) into one "
                    "ordinary checkpoint file, which every verb loads and a single-process or DDP run resumes from; "
                    "or an ordinary checkpoint file into a sharded folder, which a run with FSDP resumes from on "
                    "any number of processes. Verbs also read sharded folders directly; the file is for sharing.",
        epilog="examples:\n  python -m gpt consolidate runs/big/checkpoints/latest --out big.pt\n"
               "  python -m gpt consolidate big.pt --out runs/big/checkpoints/latest   # and back",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a sharded checkpoint folder, or a checkpoint file (.pt)")
    parser.add_argument("--out", type=Path, required=True,
                        help="the checkpoint file to write (from a folder) or the sharded folder (from a file); "
                             "must not exist yet")
    args = parser.parse_args(argv)
    if args.out.exists():
        raise UserError(f"--out {args.out}: exists already; choose a new path (nothing is overwritten)")
    if is_sharded_checkpoint(args.source):
        state = consolidate(args.source)
        atomic_write(args.out, lambda f: torch.save(state, f), size_hint=tensor_bytes(state))
        print(f"wrote {args.out}: the checkpoint at step {state.get('step', '?')}, whole, from {args.source}")
    elif args.source.is_file():
        state = load_checkpoint(args.source)
        write_sharded(state, args.out, args.source)
        print(f"wrote {args.out}: the checkpoint at step {state.get('step', '?')}, as a sharded folder")
    else:
        raise UserError(f"{args.source}: neither a checkpoint file nor a complete sharded checkpoint folder")
    return 0
