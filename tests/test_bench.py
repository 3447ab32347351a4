"""The benchmark harness on a very small config: one round, the JSON it writes, ratios from medians."""

import json
import statistics
import sys

import pytest
import torch

from gpt import runtime
from gpt.__main__ import main as gpt_main
from gpt.bench.cli import parse_args, run_bench
from gpt.bench.contenders import BENCH_CONFIGS, BenchConfig
from gpt.bench.report import pair_ratios
from gpt.errors import UserError, run_cli

# Two layers of width 32 over a 500-token vocabulary (512 padded): a training step takes milliseconds.
MICRO = BenchConfig(
    n_layer=2, n_head=2, d_model=32, context_length=24, batch_size_cpu=2, batch_size_cuda=2, vocab_size=500
)


@pytest.fixture
def micro_config(monkeypatch):
    """The micro config, benchmarked on one thread (tiny ops on two busy cores mostly wait for each other),
    with a small matmul peak, measured afresh (the peak is kept once measured)."""
    monkeypatch.setitem(BENCH_CONFIGS, "micro", MICRO)
    monkeypatch.setitem(runtime.PEAK_MATMUL, "cpu", (256, 2))
    runtime.matmul_peak_flops.cache_clear()
    threads = torch.get_num_threads()
    yield "micro"
    torch.set_num_threads(threads)  # run_bench --threads changes it for the whole process
    runtime.matmul_peak_flops.cache_clear()


@pytest.mark.slow  # a whole bench round (about 20 s): the default suite keeps to its time
def test_one_round_writes_the_report(micro_config, tmp_path):
    out = tmp_path / "bench.json"
    argv = [
        "--configs", micro_config, "--contenders", "ours,hf-gpt2", "--precisions", "fp32", "--rounds", "1",
        "--steps", "1", "--warmup", "2", "--device", "cpu", "--threads", "1", "--new-tokens", "6",
        "--prompt-length", "4", "--gen-batch-sizes", "1,2", "--out", str(out),
    ]
    returned = run_bench(argv)
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))

    meta = report["meta"]
    assert meta["command"] == "python -m gpt bench " + " ".join(argv)
    assert meta["threads"] == 1
    for key in ("date", "device", "device_name", "threads", "torch", "transformers", "memory_method"):
        assert meta[key] not in (None, "")
    assert set(report["peak_flops"]["measured"]) == {"fp32", "bf16"}
    assert all(value > 0 for value in report["peak_flops"]["measured"].values())
    assert report["peak_flops"]["published"] is None  # no table entry for a CPU

    section = report["configs"]["micro"]
    assert section["shape"]["batch_size"] == 2 and section["tokens_per_step"] == 2 * 24
    contenders = section["contenders"]
    assert contenders["ours"]["parameters"] == contenders["hf-gpt2"]["parameters"]
    assert contenders["hf-gpt2"]["optimizer"].startswith("torch.optim.AdamW(")
    # hf-gpt2 is loaded from ours' export and sees the same batch; its loss skips the last position of each row.
    assert contenders["ours"]["initial_loss"] == pytest.approx(contenders["hf-gpt2"]["initial_loss"], abs=0.05)

    train = {row["contender"]: row for row in section["train"]}
    assert set(train) == {"ours", "hf-gpt2"}
    for row in train.values():
        assert len(row["tokens_per_s_rounds"]) == 1
        assert row["tokens_per_s"] == pytest.approx(statistics.median(row["tokens_per_s_rounds"]))
        assert 0 < row["mfu"] and row["mfu_published"] is None and row["compile_s"] is None
        assert row["peak_memory_mib"] > 0 and row["built_memory_mib"] >= 0
    [ratio] = section["train_ratios"]
    assert (ratio["contender"], ratio["reference"], ratio["precision"]) == ("ours", "hf-gpt2", "fp32")
    assert ratio["tokens_per_s_ratio"] == pytest.approx(
        train["ours"]["tokens_per_s"] / train["hf-gpt2"]["tokens_per_s"])
    assert ratio["peak_memory_ratio"] == pytest.approx(
        train["ours"]["peak_memory_mib"] / train["hf-gpt2"]["peak_memory_mib"])

    generation = {(row["contender"], row["batch_size"]): row for row in section["generate"]}
    assert set(generation) == {("ours", 1), ("ours", 2), ("hf-gpt2", 1), ("hf-gpt2", 2)}  # no padded contender
    for batch_size in (1, 2):
        ours, reference = generation[("ours", batch_size)], generation[("hf-gpt2", batch_size)]
        assert ours["identical_to_reference"] and ours["matching_token_fraction"] == 1.0
        ratio = next(r for r in section["generate_ratios"] if r["batch_size"] == batch_size)
        assert ratio["tokens_per_s_ratio"] == pytest.approx(ours["tokens_per_s"] / reference["tokens_per_s"])


def test_llama_pair_and_padded_vocabulary(micro_config):
    report = run_bench([
        "--configs", micro_config, "--contenders", "ours-pad64,ours-llama,hf-llama", "--precisions", "bf16",
        "--parts", "train,generate", "--rounds", "1", "--steps", "1", "--warmup", "1", "--device", "cpu",
        "--threads", "1", "--new-tokens", "6", "--prompt-length", "4", "--gen-batch-sizes", "1",
    ])
    section = report["configs"]["micro"]
    contenders = section["contenders"]
    assert contenders["ours-pad64"]["vocab_size"] == 512
    assert contenders["ours-llama"]["initial_loss"] == pytest.approx(contenders["hf-llama"]["initial_loss"], abs=0.05)
    assert [(r["contender"], r["precision"]) for r in section["train"]] == [
        ("ours-pad64", "bf16"), ("ours-llama", "bf16"), ("hf-llama", "bf16")]
    assert "peak_memory_mib" not in section["train"][0]  # memory was not asked for
    assert [r["contender"] for r in section["train_ratios"]] == ["ours-llama"]  # ours-pad64's reference is absent
    generation = {row["contender"]: row for row in section["generate"]}
    assert set(generation) == {"ours-llama", "hf-llama"}
    assert generation["ours-llama"]["identical_to_reference"]


def test_ratios_come_from_the_medians():
    rows = [
        {"contender": "ours", "precision": "fp32", "mode": "eager", "tokens_per_s": 300.0, "peak_memory_mib": 50.0},
        {"contender": "hf-gpt2", "precision": "fp32", "mode": "eager", "tokens_per_s": 200.0, "peak_memory_mib": 100.0},
        {"contender": "hf-gpt2", "precision": "bf16", "mode": "eager", "tokens_per_s": 1.0, "peak_memory_mib": 1.0},
    ]
    expected = {
        "contender": "ours", "reference": "hf-gpt2", "precision": "fp32", "mode": "eager",
        "tokens_per_s_ratio": 1.5, "peak_memory_ratio": 0.5,
    }
    assert pair_ratios(rows, ("precision", "mode"), "tokens_per_s") == [expected]


def test_padded_vocabulary_is_a_multiple_of_64():
    assert BENCH_CONFIGS["tiny"].padded_vocab_size == 50304
    assert MICRO.padded_vocab_size == 512


@pytest.mark.parametrize("flag, value", [("--configs", "huge"), ("--precisions", "fp8")])
def test_bad_flags_name_the_flag(flag, value):
    with pytest.raises(UserError, match=flag):
        parse_args([flag, value])


def test_bad_numbers_are_argparse_errors_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as exited:
        parse_args(["--rounds", "0"])
    assert exited.value.code == 2
    assert "argument --rounds: must be at least 1, got 0" in capsys.readouterr().err


def test_without_transformers_the_bench_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an import sees when it is not installed
    with pytest.raises(SystemExit) as exited:
        run_cli(lambda: gpt_main(["bench", "--configs", "tiny", "--parts", "train"]))
    assert exited.value.code == 2
    assert capsys.readouterr().err == 'error: python -m gpt bench needs transformers: pip install -e ".[bench]"\n'


def test_the_bench_verb_reaches_the_package(capsys):
    with pytest.raises(SystemExit) as exited:
        gpt_main(["bench", "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("usage: python -m gpt bench")
