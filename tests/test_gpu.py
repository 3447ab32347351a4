"""The CUDA path (`python -m pytest -m gpu` on a machine with a GPU; every test skips without one).

Each test guards a finding of a code review of the CUDA path, named in its first line:
resume on a GPU (random state), the fused loss (values, speed, no host syncs, its bf16
gradient scale), flash attention in training, generation with padding, the KV cache's dtype
under autocast and grouped-query attention on the fused kernels, bf16 selection, AdamW's
multi-tensor path, peak memory and MFU reporting, the fp16 gradient scaler, evaluation
memory, compile, the LM head at GPT-2's and the padded vocabulary, the bench's memory probes,
TF32 in the command-line verbs; FSDP in one process and activation checkpointing (issue 20);
and 2:4-pruned weights on the sparse tensor cores (gpt.prune, issue 17).
The whole file takes about two minutes on one H100/H200.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pretrain
from gpt.bench import memory as bench_memory
from gpt.bench.contenders import BENCH_CONFIGS
from gpt.checkpoint import load_checkpoint, save_checkpoint
from gpt.cli import generate_cli
from gpt.config import ModelConfig
from gpt.data import BatchLoader
from gpt.fused_loss import linear_cross_entropy
from gpt.generate import generate
from gpt.model import GPT
from gpt.optim import AdamW
from gpt.prune import apply_masks, prune_masks, semi_structured_linears, two_of_four_mask
from gpt.resume import rng_state, set_rng_state
from gpt.runtime import matmul_peak_flops, peak_memory_mib, pick_autocast_dtype, published_peak_flops
from gpt.train import move_to

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")
LLAMA_STYLE = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2)
SMALL_RUN = [
    "--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2", "--model.context_length", "32",
    "--train.batch_size", "4", "--train.eval_batches", "2", "--train.log_interval", "1",
    "--train.warmup_steps", "2", "--train.device", "cuda", "--sample.max_new_tokens", "3",
]


@pytest.fixture
def no_tf32():
    """fp32 compared with fp32, not TF32 (a training run switches TF32 on for the process)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def run(out_dir: Path, corpus: Path, *extra: str, exit_code: int = 0) -> None:
    assert pretrain.main([*SMALL_RUN, "--data.path", str(corpus), "--train.out_dir", str(out_dir), *extra]) == exit_code


def train_losses(out_dir: Path) -> list[float]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["split"] == "train"]


def record(test: str, **figures: object) -> None:
    """Measured figures, printed, and appended to the JSON-lines file GPT_TEST_FIGURES names (if set)."""
    print(f"\n{test}: {figures}")
    if os.environ.get("GPT_TEST_FIGURES"):
        with open(os.environ["GPT_TEST_FIGURES"], "a") as out:
            out.write(json.dumps({"test": test, "device": torch.cuda.get_device_name(), **figures}) + "\n")


def median_ms(work, repeats: int = 5) -> float:
    work()  # warm-up
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        work()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# ---------------------------------------------------------------- resume on a GPU


def test_f1_f2_rng_state_survives_a_checkpoint_loaded_onto_the_gpu(tmp_path):
    """F1/F2: the run's own CUDA generator state, loaded onto the GPU, restores (also from the old list format)."""
    model = GPT(ModelConfig(vocab_size=50, context_length=8, d_model=16, n_layer=1, n_head=2))
    torch.manual_seed(3)
    save_checkpoint(tmp_path / "c.pt", model, rng=rng_state(CUDA))
    expected = (torch.rand(3), torch.rand(3, device=CUDA))
    state = load_checkpoint(tmp_path / "c.pt", map_location=CUDA)
    set_rng_state(state["rng"], CUDA)
    assert torch.equal(torch.rand(3), expected[0]) and torch.equal(torch.rand(3, device=CUDA), expected[1])
    older = dict(state["rng"], cuda=[state["rng"]["cuda"]] * (torch.cuda.device_count() + 1))  # one GPU more
    set_rng_state(older, CUDA)
    assert torch.equal(torch.rand(3, device=CUDA), expected[1])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_f1_f8_interrupted_gpu_run_resumes_bit_for_bit(tmp_path, corpus, monkeypatch, dtype):
    """F1/F8: interrupted at step 3 on the GPU and resumed, the run logs the straight run's losses; with fp16
    the gradient scaler's state is checkpointed and restored. Manual attention and dropout: exact and random."""
    common = ["--train.max_steps", "6", "--train.eval_interval", "2", "--train.dtype", dtype,
              "--model.attn_impl", "manual", "--model.dropout", "0.1"]
    run(tmp_path / "straight", corpus, *common)
    original, calls = BatchLoader.next_batch, {"n": 0}

    def next_batch_with_interrupt(self):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    monkeypatch.setattr(BatchLoader, "next_batch", next_batch_with_interrupt)
    run(tmp_path / "resumed", corpus, *common, exit_code=128 + signal.SIGINT)
    monkeypatch.setattr(BatchLoader, "next_batch", original)
    run(tmp_path / "resumed", corpus, *common, "--train.resume", "auto")
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "straight")
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "latest.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "latest.pt")
    assert ("scaler" in straight) == (dtype == "float16") and straight.get("scaler") == resumed.get("scaler")


# ---------------------------------------------------------------- the fused loss on CUDA


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("sizes", [dict(chunk_rows=16, block_rows=5), {}], ids=["small-blocks", "default"])
def test_fused_loss_equals_cross_entropy_on_gpu(precision, sizes, no_tf32):
    """`_softmax.out` and the in-place block updates on CUDA: the loss and gradients of F.cross_entropy."""
    torch.manual_seed(0)
    hidden = torch.randn(61, 24, device=CUDA, requires_grad=True)
    weight = torch.randn(97, 24, device=CUDA, requires_grad=True)
    targets = torch.randint(0, 97, (61,), device=CUDA)
    targets[::5] = -100
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast:
        reference = F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=-100)
    expected = torch.autograd.grad(reference, (hidden, weight))
    with autocast:
        fused = linear_cross_entropy(hidden, weight, targets, **sizes)
    got = torch.autograd.grad(fused, (hidden, weight))
    tolerance = dict(atol=1e-5, rtol=1e-4) if precision == "fp32" else dict(atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(fused, reference, **tolerance)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **tolerance)


def test_f10_bf16_gradients_are_scaled_in_float32_on_gpu():
    """F10: backward divides the kept bf16 gradients by the count of targets in float32, rounding once (1/1020 in
    bf16 is 0.39% off). The same 1024 rows with the last 4 targets ignored (n = 1020) and all counted (n = 1024, a
    power of two, so exact): the n = 1020 gradient must be bf16(float32(unscaled) / 1020) exactly."""
    torch.manual_seed(0)
    hidden = torch.randn(1024, 64, device=CUDA, requires_grad=True)
    weight = torch.randn(300, 64, device=CUDA)
    all_counted = torch.randint(0, 300, (1024,), device=CUDA)
    last_ignored = all_counted.clone()
    last_ignored[1020:] = -100
    grads = []
    for targets in (last_ignored, all_counted):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = linear_cross_entropy(hidden, weight, targets)
        grads.append(torch.autograd.grad(loss, hidden)[0][:1020])
    unscaled = grads[1] * 1024
    assert torch.equal(grads[0], (unscaled * (torch.tensor(1.0, device=CUDA) / 1020)).to(torch.bfloat16).float())


def test_f4_a_micro_step_never_waits_for_the_gpu():
    """F4: no hidden host-device sync in move_to + forward + fused loss + backward."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50257, context_length=256, d_model=256, n_layer=2, n_head=4)).to(CUDA)
    x, y = torch.randint(0, 50257, (8, 256)), torch.randint(0, 50257, (8, 256))

    def micro_step():
        batch = move_to((x, y), CUDA)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(batch[0], targets=batch[1])
        loss.backward()

    micro_step()
    model.zero_grad(set_to_none=True)
    torch.cuda.set_sync_debug_mode("error")  # any host-device sync now raises
    try:
        micro_step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(p.grad is not None for p in model.parameters())  # the whole step ran


def test_an_evaluation_pass_needs_less_memory_than_a_training_step():
    """Evaluation through the fused loss at GPT-2 124M's shapes (16 x 1024, bf16): no (B, T, V) logits, so its
    peak stays under a training step's and under the plain evaluation's."""
    config = ModelConfig.preset("gpt2-124m")
    x = torch.randint(0, config.vocab_size, (16, 1024), device=CUDA)
    y = torch.randint(0, config.vocab_size, (16, 1024), device=CUDA)
    model = GPT(config).to(CUDA)
    optimizer = AdamW(model.parameters(), lr=1e-4)
    peaks = {}
    for name in ("train", "eval", "eval-plain"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16), torch.set_grad_enabled(name == "train"):
            if name == "eval-plain":
                F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
            else:
                loss = model(x, targets=y)
        if name == "train":
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del loss
        torch.cuda.synchronize()
        peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
    record("eval_memory", **{f"{name}_peak_mib": round(peak) for name, peak in peaks.items()},
           shape="gpt2-124m, 16 x 1024, bf16; MiB over the weights and optimizer state already allocated")
    assert peaks["eval"] < peaks["train"] and peaks["eval"] < peaks["eval-plain"]


# ---------------------------------------------------------------- attention kernels and generation


@pytest.mark.parametrize("style", [{}, LLAMA_STYLE], ids=["gpt2", "llama"])
def test_training_attention_runs_on_flash(style):
    """Training (no mask, is_causal) is eligible for flash attention in bf16; fails loudly if it is not."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = GPT(ModelConfig(vocab_size=1000, context_length=128, d_model=256, n_layer=2, n_head=4, **style)).to(CUDA)
    x, y = torch.randint(0, 1000, (4, 128), device=CUDA), torch.randint(0, 1000, (4, 128), device=CUDA)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model.train()(x, targets=y)
    loss.backward()


@pytest.mark.parametrize("style", [{}, LLAMA_STYLE], ids=["gpt2", "llama"])
def test_generation_on_gpu_cache_equals_no_cache_with_left_padding(style, no_tf32):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=300, context_length=64, d_model=64, n_layer=2, n_head=4, **style)).to(CUDA)
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    assert generate(model, prompts, 12, use_cache=True) == generate(model, prompts, 12, use_cache=False)


@pytest.mark.parametrize("kernel", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION"])
def test_f11_bf16_cache_and_grouped_query_attention_on_the_fused_kernels(kernel, no_tf32):
    """F11: under bf16 autocast the KV cache is bf16, and grouped-query attention (4 query heads on 2 key/value
    heads) runs on each fused kernel alone, the math fallback off: flash (a prefill and decoding steps without
    masks) reads the grouped heads itself (enable_gqa), memory-efficient (also left padding) gets them repeated.
    The cached logits equal the float32 manual-attention model's (to bf16 rounding)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    config = ModelConfig(vocab_size=300, context_length=64, d_model=256, n_layer=2, n_head=4, **LLAMA_STYLE)
    torch.manual_seed(0)
    model = GPT(config).to(CUDA).eval()
    reference = GPT(dataclasses.replace(config, attn_impl="manual")).to(CUDA).eval()
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 300, (2, 20), device=CUDA)
    padding = None
    if kernel == "EFFICIENT_ATTENTION":  # flash takes no mask
        padding = torch.ones(2, 20, dtype=torch.bool, device=CUDA)
        padding[1, :4] = False
    with torch.no_grad():
        expected = reference(ids, padding_mask=padding)  # (2, 20, V) float32
        with sdpa_kernel(getattr(SDPBackend, kernel)), torch.autocast("cuda", dtype=torch.bfloat16):
            cache = model.new_cache(2, 20)
            pieces = [model(ids[:, :8], cache=cache, padding_mask=None if padding is None else padding[:, :8])]
            pieces += [model(ids[:, t:t + 1], cache=cache) for t in range(8, 20)]
    assert cache.keys.dtype == cache.values.dtype == torch.bfloat16
    torch.testing.assert_close(torch.cat(pieces, dim=1).float(), expected, atol=2e-2, rtol=5e-2)


# ---------------------------------------------------------------- precision, optimizer, reports


def test_f5_auto_precision_is_bf16_only_where_it_is_native():
    """F5: on sm < 80 bf16 is only emulated; auto must pick fp16 there."""
    expected = torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16
    assert pick_autocast_dtype("auto", CUDA) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_multi_tensor_path_on_gpu_equals_the_loop_and_torch(dtype):
    """Multi-tensor path on CUDA = per-parameter loop = torch.optim.AdamW (closely).

    In bfloat16 the two paths agree bit for bit. In float32 they may differ in the last bits: CUDA's
    multi-tensor kernels compute with fused multiply-adds where the per-tensor ops round each step
    (measured on an H200: 135 of 5,100 elements, at most 2.4e-7 apart), so float32 is compared within
    float32 rounding, which still catches any wrong term of the update."""
    shapes = [(300, 17), (17,), (64, 64), (5,)]
    runs = {}
    for name in ("foreach", "loop", "torch"):
        torch.manual_seed(0)
        params = [torch.randn(s, device=CUDA, dtype=dtype, requires_grad=True) for s in shapes]
        kwargs = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        opt = (AdamW(params, **kwargs, foreach=name == "foreach") if name != "torch"
               else torch.optim.AdamW(params, **kwargs, foreach=False))
        for step in range(3):
            generator = torch.Generator(device=CUDA).manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, device=CUDA, dtype=dtype, generator=generator)
            opt.step()
        runs[name] = [p.detach().clone() for p in params]
    for a, b, c in zip(runs["foreach"], runs["loop"], runs["torch"]):
        exact = dict(rtol=0, atol=0) if dtype == torch.bfloat16 else dict(rtol=4e-6, atol=1e-6)
        torch.testing.assert_close(a, b, **exact)
        torch.testing.assert_close(a, c)


def test_f6_reported_peak_memory_covers_gpu_memory():
    """F6: the reported peak memory is the GPU's when the run is on a GPU."""
    block = torch.empty(2 << 30, dtype=torch.uint8, device=CUDA)
    assert peak_memory_mib(CUDA) >= torch.cuda.max_memory_allocated(CUDA) / 2**20 >= 2048
    del block


def test_f7_measured_peak_is_below_the_published_peak():
    """F7: the one measured matmul peak (training MFU and the bench share it) is a real peak: within the
    published dense figure, and at least half of it."""
    measured = matmul_peak_flops(CUDA, torch.bfloat16)
    published = published_peak_flops(CUDA)
    record("matmul_peak", measured_bf16_tflops=round(measured / 1e12, 1),
           published_bf16_tflops=published["bf16"] / 1e12 if published else None)
    if published is not None:
        assert 0.5 * published["bf16"] <= measured <= 1.05 * published["bf16"]


def test_f13_compiled_training_on_gpu_matches_eager(tmp_path, corpus):
    """F13: a compiled run on CUDA trains, and its losses track the eager run's."""
    common = ["--train.max_steps", "3", "--train.eval_interval", "3", "--train.dtype", "bfloat16"]
    run(tmp_path / "eager", corpus, *common)
    run(tmp_path / "compiled", corpus, *common, "--train.compile", "true")
    for a, b in zip(train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")):
        assert math.isclose(a, b, rel_tol=2e-2)


# ---------------------------------------------------------------- FSDP and activation checkpointing (issue 20)


def test_fsdp_on_one_gpu_gathers_in_bf16_and_resumes_bit_for_bit(tmp_path, corpus):
    """FSDP in one process on the GPU (NCCL, weights gathered in bf16, gradients reduced in fp32) tracks the
    plain bf16 run, writes sharded checkpoints, and a run stopped at step 2 continues as the straight one."""
    common = ["--train.eval_interval", "2", "--train.dtype", "bfloat16", "--train.schedule", "constant",
              "--model.attn_impl", "manual"]  # manual attention: no atomics in its backward, so exact repeats
    run(tmp_path / "plain", corpus, *common, "--train.max_steps", "4")
    run(tmp_path / "fsdp", corpus, *common, "--train.max_steps", "4", "--train.parallel", "fsdp")
    for a, b in zip(train_losses(tmp_path / "plain"), train_losses(tmp_path / "fsdp"), strict=True):
        assert math.isclose(a, b, rel_tol=2e-2)
    assert (tmp_path / "fsdp" / "checkpoints" / "latest" / ".metadata").is_file()
    run(tmp_path / "resumed", corpus, *common, "--train.max_steps", "2", "--train.parallel", "fsdp")
    run(tmp_path / "resumed", corpus, *common, "--train.max_steps", "4", "--train.parallel", "fsdp",
        "--train.resume", "auto")
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "fsdp")


def test_activation_checkpointing_lowers_peak_gpu_memory():
    """GPT-2 124M shapes, batch 8 x 1,024 in bf16: recomputing each block in the backward pass keeps less
    activation memory at the peak, and the same gradients (to the attention kernel's summation order)."""
    config = ModelConfig.preset("gpt2-124m")
    ids = torch.randint(0, config.vocab_size, (8, 1025), device=CUDA)
    peaks, grads = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = GPT(config).to(CUDA)
        for block in model.blocks:
            block.activation_checkpointing = checkpointing
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids[:, :-1], targets=ids[:, 1:])
        loss.backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() / 2**20)
        grads.append(model.blocks[0].attn.q_proj.weight.grad.float())
        del model, loss
        torch.cuda.empty_cache()
    record("activation_checkpointing", peak_mib_off=round(peaks[0]), peak_mib_on=round(peaks[1]))
    assert peaks[1] < 0.8 * peaks[0]
    # The same computation, but SDPA's fused backward may sum in another order from one call to the next.
    assert (grads[0] - grads[1]).norm() <= 1e-2 * grads[0].norm()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP over NCCL needs two GPUs")
def test_f14_two_gpu_ddp_matches_one_gpu_and_stops_early_together(tmp_path, corpus):
    """F14: NCCL DDP (device_id given, buffers not broadcast) on two GPUs trains as one GPU with the doubled
    batch; with patience 1 and a learning rate that makes validation worse, both ranks stop at the same step."""
    import subprocess
    import sys

    common = ["--train.max_steps", "6", "--train.eval_interval", "1", "--train.dtype", "float32",
              "--train.patience", "1", "--train.lr", "0.5", "--train.warmup_steps", "0"]
    run(tmp_path / "single", corpus, *common, "--train.batch_size", "8")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29544",
               str(REPO / "pretrain.py"), *SMALL_RUN, "--data.path", str(corpus), *common, "--train.batch_size", "4",
               "--train.out_dir", str(tmp_path / "ddp")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    single, ddp = train_losses(tmp_path / "single"), train_losses(tmp_path / "ddp")
    assert len(single) == len(ddp) < 6  # stopped early, at the same step
    for a, b in zip(single, ddp):
        assert math.isclose(a, b, rel_tol=1e-3)  # TF32 is on in both


def test_f3_fused_loss_is_not_slower_than_plain_cross_entropy():
    """F3: at GPT-2 124M's micro-batch (16 x 1024, bf16) the fused loss runs whole-chunk softmax blocks on a
    GPU: no slower than 1.5x the plain loss (it does the same matmuls without the logits tensor)."""
    torch.manual_seed(0)
    n, d, v = 16 * 1024, 768, 50257
    hidden = torch.randn(n, d, device=CUDA, requires_grad=True)
    weight = (0.02 * torch.randn(v, d, device=CUDA)).requires_grad_()
    targets = torch.randint(0, v, (n,), device=CUDA)

    def step(loss_of) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_of()
        loss.backward()

    fused_ms = median_ms(lambda: step(lambda: linear_cross_entropy(hidden, weight, targets)))
    plain_ms = median_ms(lambda: step(lambda: F.cross_entropy(F.linear(hidden, weight).float(), targets)))
    record("fused_loss_speed", fused_ms=round(fused_ms, 2), plain_ms=round(plain_ms, 2),
           shape="16 x 1024 rows, d 768, vocab 50257, bf16, forward + backward")
    assert fused_ms <= 1.5 * plain_ms, f"fused {fused_ms:.1f} ms vs plain {plain_ms:.1f} ms"


def test_f12_lm_head_speed_at_the_gpt2_and_the_padded_vocabulary():
    """F12: the LM head at GPT-2 124M's micro-batch (16 x 1024 rows, d 768, bf16) with GPT-2's vocabulary (50,257:
    odd, its bf16 rows not 16-byte aligned) and padded to 50,304 (a multiple of 64): the logits product alone, and
    the fused loss forward + backward. Recorded for configs/gpt2-124m.toml; padding adds 0.09% of the work, so it
    must not cost 10% more."""
    torch.manual_seed(0)
    n, d = 16 * 1024, 768
    hidden = torch.randn(n, d, device=CUDA, requires_grad=True)
    figures = {}
    for vocab in (50257, 50304):
        weight = (0.02 * torch.randn(vocab, d, device=CUDA)).requires_grad_()
        targets = torch.randint(0, 50257, (n,), device=CUDA)
        hidden_bf16, weight_bf16 = hidden.detach().bfloat16(), weight.detach().bfloat16()

        def loss_step() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = linear_cross_entropy(hidden, weight, targets)
            loss.backward()

        figures[f"logits_matmul_ms_{vocab}"] = round(median_ms(lambda: F.linear(hidden_bf16, weight_bf16)), 3)
        figures[f"fused_loss_ms_{vocab}"] = round(median_ms(loss_step), 2)
        hidden.grad = None
    record("lm_head_vocab_padding", **figures, shape="16 x 1024 rows, d 768, bf16")
    assert figures["fused_loss_ms_50304"] <= 1.1 * figures["fused_loss_ms_50257"]


def test_f15_the_bench_hands_cached_gpu_memory_back_before_its_memory_probes(monkeypatch):
    """F15: the spawned memory probes get the device's memory: when the first probe starts, the bench process holds
    no freed blocks in torch's cache (2 GiB were just allocated and freed here)."""
    held_at_probe = []

    def probe_in_place(function, probe):  # instead of spawning: what this process holds when a probe would start
        torch.cuda.synchronize()
        held_at_probe.append(torch.cuda.memory_reserved() - torch.cuda.memory_allocated())
        return {"peak_memory_mib": 0.0, "built_memory_mib": 0.0}

    monkeypatch.setattr(bench_memory, "in_fresh_process", probe_in_place)
    block = torch.empty(2 << 30, dtype=torch.uint8, device=CUDA)
    del block
    assert torch.cuda.memory_reserved() - torch.cuda.memory_allocated() >= 2 << 30  # cached, not yet handed back
    args = argparse.Namespace(contenders=["ours"], precisions=["bf16"], modes=["eager"], warmup=1, seed=0)
    rows = bench_memory.add_memory([], BENCH_CONFIGS["tiny"], args, CUDA, 2, {})
    assert len(rows) == 1 and held_at_probe and held_at_probe[0] < 2 << 30


@pytest.fixture
def tf32_off():
    """TF32 switched off for the test, and restored after (F16 checks who switches it on)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_f16_generate_on_cuda_switches_tf32_on(tf32_off, capsys):
    """F16: `python -m gpt generate --device cuda` runs its float32 matmuls on TF32 tensor cores, as training does."""
    assert generate_cli(["--preset", "tiny", "--device", "cuda", "--prompt", "Hello", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("Hello")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


# ---------------------------------------------------------------- 2:4 sparsity (gpt.prune)

SPARSE_CORES = pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 8,
                                  reason="2:4 sparse tensor cores need compute capability 8.0 or later")


def max_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return (value.float() - reference).abs().max().item()


@SPARSE_CORES
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_two_of_four_weight_on_sparse_cores_equals_the_dense_masked_product(dtype):
    """Pruning: a 2:4-pruned weight as torch's semi-structured sparse tensor multiplies like the dense masked
    weight: its error against an fp32 product is no larger than the dense half-precision kernel's (twice, plus
    one rounding step of the output), and the model-level swap (semi_structured_linears) keeps the logits."""
    from torch.sparse import to_sparse_semi_structured

    torch.manual_seed(0)
    weight = torch.randn(256, 512, device=CUDA, dtype=dtype)
    masked = weight * two_of_four_mask(weight)  # (256, 512), 2 of every 4 along each row kept
    inputs = torch.randn(64, 512, device=CUDA, dtype=dtype)
    exact = inputs.float() @ masked.float().T  # (64, 256)
    dense = F.linear(inputs, masked)
    sparse = F.linear(inputs, to_sparse_semi_structured(masked))
    rounding = exact.abs().max().item() * torch.finfo(dtype).eps
    assert max_error(sparse, exact) <= 2 * max_error(dense, exact) + rounding

    model = GPT(ModelConfig(vocab_size=512, context_length=64, d_model=128, n_layer=2, n_head=4, d_ff=256,
                            **LLAMA_STYLE)).eval()
    apply_masks(model, prune_masks(model, "2:4", 0.5, "layer"))
    ids = torch.randint(0, 512, (2, 32), device=CUDA)
    with torch.no_grad():
        exact_logits = model.to(CUDA)(ids)  # float32
        model.to(dtype)
        dense_logits = model(ids)
        assert semi_structured_linears(model) == 2 * 7
        sparse_logits = model(ids)
    rounding = exact_logits.abs().max().item() * torch.finfo(dtype).eps
    assert max_error(sparse_logits, exact_logits) <= 2 * max_error(dense_logits, exact_logits) + 4 * rounding


@SPARSE_CORES
def test_two_of_four_matmul_speed_on_sparse_cores():
    """Pruning: the time of an 8192 x 8192 fp16 projection of 8192 rows, dense and 2:4 sparse (recorded, for
    BENCHMARKS.md; 2:4 halves the multiplications, the speed-up is the hardware's to give)."""
    from torch.sparse import to_sparse_semi_structured

    torch.manual_seed(0)
    weight = torch.randn(8192, 8192, device=CUDA, dtype=torch.float16)
    masked = weight * two_of_four_mask(weight)
    sparse = to_sparse_semi_structured(masked)
    inputs = torch.randn(8192, 8192, device=CUDA, dtype=torch.float16)
    with torch.no_grad():
        dense_ms = median_ms(lambda: F.linear(inputs, masked))
        sparse_ms = median_ms(lambda: F.linear(inputs, sparse))
    record("two_of_four_linear_speed", dense_ms=round(dense_ms, 3), sparse_ms=round(sparse_ms, 3),
           speedup=round(dense_ms / sparse_ms, 2), shape="8192 rows x 8192 in x 8192 out, fp16")
    assert sparse_ms > 0
