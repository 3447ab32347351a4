"""benchmarks/gpu_check_report.py: the GPU check's summary lines from a bench report and from a run's metrics."""

from __future__ import annotations

import json

from benchmarks.gpu_check_report import bench_lines, run_line


def write_records(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_run_line_takes_the_medians_after_the_first_record_and_the_step_size_from_the_token_counts(tmp_path):
    speeds = [10.0, 100.0, 300.0, 200.0]  # the first is the compiling step, left out: median of the rest is 200
    peaks = [9000, 12000, 12345, 12345]  # each record: the peak so far
    write_records(tmp_path / "metrics.jsonl", [
        {"step": 0, "split": "val", "loss": 10.5},
        *({"step": i + 1, "split": "train", "loss": 9.0 - i, "tokens_per_s": s, "mfu": 0.1 * (i + 1),
           "tokens": 256 * (i + 1), "peak_memory_mib": peak} for i, (s, peak) in enumerate(zip(speeds, peaks))),
        {"step": 4, "split": "val", "loss": 5.25},
    ])
    line = run_line("run", tmp_path)
    assert line == ("run: 4 steps, val loss 5.2500 at step 4, train loss 6.0000, 200 tokens/s (median of steps 2-4), "
                    "1280.0 ms/step of 256 tokens, MFU 30.0% of the measured peak, peak memory 12,345 MiB")
    assert run_line("missing", tmp_path / "nowhere") == f"missing: no metrics.jsonl in {tmp_path / 'nowhere'}"


def test_bench_lines_give_each_row_and_the_padded_vocabulary_against_ours(tmp_path):
    rows = [
        dict(contender=name, precision="bf16", mode="compiled", tokens_per_s=speed, step_ms=16384e3 / speed,
             mfu=mfu, mfu_published=mfu * 0.75, compile_s=28.4)
        for name, speed, mfu in (("ours", 200_000.0, 0.2), ("ours-pad64", 220_000.0, 0.22), ("hf-gpt2", 400_000.0, 0.4))
    ]
    report = {
        "peak_flops": {"measured": {"bf16": 751.5e12}, "published": {"bf16": 989e12, "fp32": 494.7e12}},
        "configs": {"gpt2-124m": {
            "contenders": {"ours": {"vocab_size": 50257}, "ours-pad64": {"vocab_size": 50304},
                           "hf-gpt2": {"vocab_size": 50257}},
            "train": rows,
            "train_ratios": [dict(contender="ours", reference="hf-gpt2", precision="bf16", mode="compiled",
                                  tokens_per_s_ratio=0.5)],
        }},
    }
    (tmp_path / "bench.json").write_text(json.dumps(report))
    lines = bench_lines(tmp_path / "bench.json")
    assert lines[0] == "bench matmul peak bf16: measured 751.5 TFLOP/s, published 989"
    assert lines[1] == ("bench gpt2-124m ours bf16 compiled: 200,000 tokens/s, 81.9 ms/step, MFU 20.0% of the measured "
                        "peak, 15.0% of the published, compile 28 s")
    assert "bench gpt2-124m vocabulary 50,304 / 50,257 (ours-pad64 / ours) bf16 compiled: 1.100x tokens/s" in lines
    assert lines[-1] == "bench gpt2-124m ours / hf-gpt2 bf16 compiled: 0.50x tokens/s"
