"""How the processes of a `torchrun` launch share one model: DDP or FSDP2 (`train.parallel`).

- **ddp** (`DistributedDataParallel`): every process holds the whole model, its gradients
  and AdamW's two moments (16 bytes per parameter in fp32, before activations), and
  trains on its own slice of the global batch; after the last micro-batch of a step the
  gradients are averaged across processes (all-reduce). The fastest choice while all of
  that fits on one device.
- **fsdp** (FSDP2, `torch.distributed.fsdp.fully_shard`): every process keeps 1/N of each
  parameter, gradient and moment (sharded along the first dimension, as DTensors). A
  block's parameters are gathered from all processes (all-gather) just before it runs,
  forward and backward, and freed right after; its gradients are averaged and scattered
  back into shards (reduce-scatter). For models whose training state does not fit on one
  device; checkpoints are then sharded too (gpt.sharded_checkpoint).

The sharding units follow torchtitan's arrangement: each transformer block is a unit; the
root unit, sharded last, holds the rest: embeddings, final norm and LM head. Those stay
together because the head may be tied to the token embedding, and because the fused loss
reads the head's weight directly rather than through the head's forward. On GPUs the
gathered parameters are cast to the run's autocast precision (bf16) and gradients are
reduced in fp32.

After training, `gather_model` hands rank 0 an ordinary module holding the whole trained
model, for what a script does alone at the end (a sample, a final evaluation).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from .errors import UserError
from .model import GPT, Block
from .runtime import Runtime


def parallel_mode(requested: str, runtime: Runtime) -> str:
    """What a run does: "fsdp" when asked (with any number of processes), else "ddp" with several
    processes, "none" with one."""
    if requested == "fsdp":
        return "fsdp"
    return "ddp" if runtime.distributed else "none"


def blocks(model: nn.Module) -> list[Block]:
    """The transformer blocks of a model (a GPT, or a model built around one)."""
    return [module for module in model.modules() if isinstance(module, Block)]


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Recompute every block in the backward pass instead of keeping its activations (gpt.model.Block)."""
    for block in blocks(model):
        block.activation_checkpointing = enabled


def check_fsdp_supported(model: nn.Module, runtime: Runtime) -> None:
    """FSDP here trains every weight of a float language model, in bf16 or fp32; anything else is a UserError."""
    if runtime.autocast_dtype == torch.float16:
        raise UserError("train.parallel fsdp: float16 needs a sharded gradient scaler, which is not supported; "
                        "use train.dtype bfloat16 (or float32)")
    if not isinstance(model, GPT) or not all(p.requires_grad and p.is_floating_point() for p in model.parameters()):
        raise UserError("train.parallel fsdp: supports training every weight of a language model (pretrain.py, "
                        "finetune_instruct.py with train.trainable all, no quantized base); use ddp here")


def shard_model(model: nn.Module, runtime: Runtime) -> None:
    """Shard `model` in place over all processes with FSDP2: each block a unit, the root last (what FSDP here
    does not support is a UserError first)."""
    check_fsdp_supported(model, runtime)
    if runtime.device.type == "cuda" and runtime.autocast_dtype != torch.float32:
        precision = MixedPrecisionPolicy(param_dtype=runtime.autocast_dtype, reduce_dtype=torch.float32)
    else:
        precision = MixedPrecisionPolicy()
    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    for block in blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=precision)
    fully_shard(model, mesh=mesh, mp_policy=precision)


@contextlib.contextmanager
def gradient_sync(module: nn.Module, sync: bool) -> Iterator[None]:
    """Within the block, backward passes sync gradients across processes only if `sync`: the micro-batches
    before a step's last one just accumulate (DDP's no_sync; FSDP keeps the unsharded gradients until then)."""
    if isinstance(module, nn.parallel.DistributedDataParallel) and not sync:
        with module.no_sync():
            yield
    elif isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(sync)
        yield
    else:
        yield


def skeleton_of(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters are on the meta device (no memory; ties kept), its buffers real:
    taken before sharding, it is what `gather_model` later fills with the trained weights."""
    memo: dict[int, object] = {
        id(param): nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
        for param in model.parameters()
    }
    return copy.deepcopy(model, memo)


def gather_model(model: nn.Module, skeleton: nn.Module, runtime: Runtime) -> nn.Module | None:
    """The whole trained model as an ordinary module on rank 0 (None elsewhere). Every process must call
    it: each tensor is gathered from all of them."""
    weights = {name: value.full_tensor() if isinstance(value, DTensor) else value
               for name, value in model.state_dict().items()}
    if not runtime.is_main:
        return None
    materialized: dict[int, nn.Parameter] = {}  # a tied parameter is one object in several modules
    for module in skeleton.modules():
        for name, param in module._parameters.items():
            if param is None:
                continue
            if id(param) not in materialized:
                materialized[id(param)] = nn.Parameter(torch.empty_like(param, device=runtime.device),
                                                       requires_grad=param.requires_grad)
            module._parameters[name] = materialized[id(param)]
    skeleton.load_state_dict(weights)
    return skeleton.to(runtime.device)
