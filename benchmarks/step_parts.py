"""Where a training step spends its time: forward + backward eager and compiled, with the fused chunked loss
and with the plain one, and the optimizer step (our AdamW's multi-tensor path against torch's own).

`dynamo.explain` first counts the graphs and graph breaks of the compiled forward with its loss. Each timing is
the mean of `--steps` steps after `--warmup` steps, under bf16 autocast on CUDA (float32 on the CPU), with the
device synchronized around the timed loop.

    python -m benchmarks.step_parts                                   # GPT-2 124M, batch 16 x 1,024, on CUDA
    python -m benchmarks.step_parts --device cpu --preset tiny --batch 2 --context 64 --steps 2
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch._dynamo as dynamo

from gpt import GPT, ModelConfig
from gpt.optim import AdamW


def mean_ms(step: Callable[[], object], device: torch.device, steps: int, warmup: int) -> float:
    """Mean milliseconds of `step` over `steps` calls after `warmup` untimed ones."""
    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    return (time.perf_counter() - started) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)

    def build(loss_impl: str) -> GPT:
        return GPT(ModelConfig.preset(args.preset, context_length=args.context, loss_impl=loss_impl)).to(device)

    model = build("fused")
    x = torch.randint(0, model.config.vocab_size, (args.batch, args.context), device=device)  # (B, T)

    def forward_backward(m: torch.nn.Module) -> Callable[[], None]:
        def step() -> None:
            with torch.autocast(device.type, autocast_dtype, enabled=autocast_dtype != torch.float32):
                loss = m(x, targets=x)
            loss.backward()
        return step

    explained = dynamo.explain(model)(x, targets=x)
    print(f"dynamo: {explained.graph_count} graph(s), {explained.graph_break_count} graph break(s)")
    for reason in explained.break_reasons:
        print(f"  break: {str(reason.reason).splitlines()[0][:200]}")
    dynamo.reset()

    timing = {"steps": args.steps, "warmup": args.warmup}
    print(f"{args.preset}, batch {args.batch} x {args.context}, {device}, autocast {autocast_dtype}")
    print(f"forward+backward eager,    fused loss: {mean_ms(forward_backward(model), device, **timing):8.1f} ms")
    print(f"forward+backward compiled, fused loss: "
          f"{mean_ms(forward_backward(torch.compile(model)), device, **timing):8.1f} ms")
    plain = build("plain")
    print(f"forward+backward eager,    plain loss: {mean_ms(forward_backward(plain), device, **timing):8.1f} ms")
    print(f"forward+backward compiled, plain loss: "
          f"{mean_ms(forward_backward(torch.compile(plain)), device, **timing):8.1f} ms")
    del plain

    params = list(model.parameters())  # their .grad is set by the steps above
    ours = AdamW(params, lr=1e-4, weight_decay=0.1)
    theirs = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1,
                               **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    print(f"optimizer step, our AdamW (multi-tensor): {mean_ms(ours.step, device, **timing):8.2f} ms")
    print(f"optimizer step, torch AdamW ({'fused' if device.type == 'cuda' else 'foreach'}): "
          f"{mean_ms(theirs.step, device, **timing):8.2f} ms")


if __name__ == "__main__":
    main()
