"""`python -m gpt bench`: our GPT against transformers' GPT-2 and Llama, measured the same way.

This docstring is also the documentation of how we measure; each number the bench prints
is defined here. The bench is a developer tool and needs transformers
(`pip install -e ".[bench]"`). Its parts:

    contenders.py   the configs and contenders; building each model, optimizer and loss
    timing.py       training steps timed in interleaved rounds; generation timing
    memory.py       peak training memory, each variant alone in a fresh process
    report.py       rows, ratios, the terminal tables
    cli.py          the command line: arguments, the run's metadata, one config end to end, the JSON

Contenders (per config, e.g. `tiny` = 4 layers, 4 heads, d_model 256, context 256, batch 8):

    ours         our `GPT`, GPT-2 architecture, our AdamW, loss = `model(x, targets=y)`
                 (the fused chunked LM-head cross-entropy)
    ours-pad64   the same with the vocabulary padded from 50257 to 50304 (a multiple of 64)
    hf-gpt2      transformers' `GPT2LMHeadModel` (attn_implementation="sdpa"), loss from
                 `labels=x` (its own shift-by-one cross-entropy), torch.optim.AdamW
                 (fused=True when the device supports it; the JSON records which)
    ours-llama   our `GPT` with the Llama choices: RoPE, RMSNorm, SwiGLU, no biases, same d_ff
    hf-llama     transformers' `LlamaForCausalLM` with the same shapes

Every transformers model is loaded from our model's export (`save_pretrained`), so each
pair starts from the same weights. All optimizers use the same param groups
(`param_groups`: decay on matrices only) and lr 3e-4, betas (0.9, 0.95), eps 1e-8,
weight decay 0.1. No gradient clipping, no accumulation.

Training speed. One step = forward with the loss, backward, optimizer step, zero_grad.
Each variant (contender x precision x mode) is warmed up first; then, round by round,
every variant runs `--steps` steps on the same random token batches (A, B, C, A, B, C,
...), so a slow moment on a shared machine hits all of them alike. tokens/s =
batch x context x steps / seconds, its median over rounds is what we report, and every
ratio is ours' median over the reference's median. Precisions: fp32, and bf16 autocast
(weights and optimizer state stay fp32). Modes: eager, and with `--compile` also
`torch.compile(model)` (the loss is inside `forward` for every contender, so it is
compiled together with the model); compile time = first step - median step.

MFU. Achieved FLOP/s = tokens/s x FLOPs per token, where FLOPs per token is our
`GPT.flops_per_token` of the unpadded config (6 x matmul weights + the attention
matmuls), the same count for both members of a pair. Divided by the matmul peak the
bench measures in the same run (`gpt.runtime.matmul_peak_flops`: the best of several
square matmuls in that precision, as large as the device needs up to 8192 on CUDA and
2048 on CPU, each size warmed up first; the same figure the trainer's MFU divides by)
and, on CUDA, by the device's published dense peak
(`gpt.runtime.published_peak_flops`; fp32 means TF32 there, since TF32 is switched on).

Peak training memory. Each variant runs again, alone, in a fresh process (spawned,
nothing else in it): warm-up steps plus one. On CUDA: `torch.cuda.max_memory_allocated`
during the steps, minus what was allocated before the model was built. On CPU: the peak
resident set (VmHWM, reset through /proc/self/clear_refs once the model is built, so a
loader's transient peak does not count) minus the resident set before the model was
built. Both include weights, gradients, optimizer state, activations and temporaries;
the CPU figure also includes what the allocator keeps (and, when compiled, the
compiler's own memory). The JSON also has the memory right after building
(`built_memory_mib`); transformers maps its weights from the safetensors file and reads
them in lazily, so on CPU that figure is small for it, while the peak counts them.

Generation. Greedy, a random 16-token prompt, exactly 128 new tokens, batch 1 and 8,
fp32, eager: ours = `generate` with the KV cache; transformers =
`model.generate(do_sample=False, max_new_tokens=128, min_new_tokens=128)`, both from
the same weights; tokens/s = batch x 128 / seconds (the prompt's prefill included). The
new tokens of each pair are compared and the bench reports whether they are identical.

A CPU shared with other jobs distorts all of this unevenly: with torch's default of one
thread per core, every parallel op waits until the scheduler gives both threads back, so
an implementation that issues many small ops loses far more than one that issues few.
Measure on a quiet machine (the header records threads, allocator and versions), or pass
`--threads 1` on a busy one and say so.

    python -m gpt bench                                   # all configs, fp32 and bf16, eager
    python -m gpt bench --configs tiny --rounds 2 --out bench.json
    python -m gpt bench --compile --device cuda
"""

from .cli import bench_cli

__all__ = ["bench_cli"]
