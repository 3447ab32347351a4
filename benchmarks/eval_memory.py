"""Peak memory of an evaluation pass against a training step, on GPT-2 124M's shapes (configs/gpt2-124m.toml).

Evaluation goes through the model's own loss (`model(x, targets=y)` under no_grad), which
with the fused head never builds the (B, T, vocab) logits. This measures three passes on
the same model and batch, each alone in a freshly spawned process:

    train       one training step: forward + fused loss, backward, our AdamW step
    eval        an evaluation pass: `model(x, targets=y)` under torch.no_grad()
    eval-plain  the evaluation as it was done before: full logits, then F.cross_entropy

Memory is counted as `python -m gpt bench` counts it (gpt.bench.memory): on CUDA the
peak allocated bytes, on CPU the peak resident set, both over what the process held
before the model was built (so the weights are in every figure). Precision is bf16
autocast where the device computes it (the config's `dtype = "auto"`), else float32.

    python -m benchmarks.eval_memory                      # batch 4 on CPU, 16 (the config's) on CUDA
    python -m benchmarks.eval_memory --batch-size 2 --device cpu
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json

import torch
import torch.nn.functional as F

from gpt.bench.memory import in_fresh_process, memory_now, memory_peak, reset_memory_peak
from gpt.config import ModelConfig
from gpt.model import GPT
from gpt.optim import AdamW, param_groups
from gpt.runtime import MiB, pick_autocast_dtype, pick_device, synchronize

PASSES = ("train", "eval", "eval-plain")


def measure(settings: tuple[str, str, int, int]) -> float:
    """MiB over the pre-model baseline at the peak of one pass (run in a fresh process)."""
    name, device_name, batch_size, threads = settings
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    dtype = pick_autocast_dtype("auto", device)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    generator = torch.Generator().manual_seed(0)
    config = ModelConfig.preset("gpt2-124m")
    tokens = torch.randint(0, config.vocab_size, (batch_size, config.context_length + 1), generator=generator)
    x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    gc.collect()
    baseline = memory_now(device)
    model = GPT(config).to(device)
    optimizer = AdamW(param_groups(model, 0.1), lr=1e-4) if name == "train" else None
    reset_memory_peak(device)
    if name == "train":
        for _ in range(2):  # the second step holds the optimizer state too
            with autocast:
                loss = model(x, targets=y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        model.eval()
        with torch.no_grad(), autocast:
            if name == "eval":
                model(x, targets=y)
            else:
                F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
    synchronize(device)
    return (memory_peak(device) - baseline) / MiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=0, help="sequences of 1024 tokens; 0 = 16 on CUDA, 4 on CPU")
    args = parser.parse_args()
    device = pick_device(args.device)
    batch_size = args.batch_size or (16 if device.type == "cuda" else 4)
    results = {"device": str(device), "batch_size": batch_size, "context_length": 1024,
               "precision": str(pick_autocast_dtype("auto", device)).removeprefix("torch.")}
    for name in PASSES:
        results[f"{name}_peak_mib"] = in_fresh_process(measure, (name, str(device), batch_size,
                                                                  torch.get_num_threads()))
        print(f"{name:<10} peak {results[f'{name}_peak_mib']:>9,.0f} MiB", flush=True)
    results["eval_over_train"] = results["eval_peak_mib"] / results["train_peak_mib"]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
