"""gpt.runtime: device and precision choice, the Runtime context manager, the machine's peak figures."""

import math
import random
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt import runtime as runtime_module
from gpt.config import TrainConfig
from gpt.errors import UserError
from gpt.runtime import (
    Runtime, matmul_peak_flops, peak_memory_mib, pick_autocast_dtype, pick_device, published_peak_tflops,
    setup_runtime,
)


@pytest.fixture
def small_peak_matmul(monkeypatch):
    """A 64x64 peak measurement, measured afresh (the function keeps one result per device and dtype)."""
    monkeypatch.setitem(runtime_module.PEAK_MATMUL, "cpu", (64, 3))
    matmul_peak_flops.cache_clear()
    yield
    matmul_peak_flops.cache_clear()


def global_rng_draws() -> tuple:
    return torch.rand(4).tolist(), random.random(), np.random.rand()


def test_matmul_peak_is_positive_and_leaves_the_global_rng_alone(small_peak_matmul):
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    expected = global_rng_draws()
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    for dtype in (torch.float32, torch.bfloat16):
        peak = matmul_peak_flops(torch.device("cpu"), dtype)
        assert 0 < peak < math.inf
    assert global_rng_draws() == expected


def test_matmul_peak_is_measured_once_per_device_and_dtype(small_peak_matmul, monkeypatch):
    first = matmul_peak_flops(torch.device("cpu"), torch.float32)
    monkeypatch.setattr(runtime_module.torch, "randn", None)  # a second measurement would fail
    assert matmul_peak_flops(torch.device("cpu"), torch.float32) == first


@pytest.mark.parametrize("name, peaks", [
    ("NVIDIA H100 80GB HBM3", (989.0, 494.7)),
    ("NVIDIA H100 PCIe", (756.0, 378.0)),
    ("NVIDIA H100 NVL", (835.0, 418.0)),
    ("NVIDIA H200", (989.0, 494.7)),
    ("NVIDIA H200 NVL", (835.0, 418.0)),
    ("NVIDIA GH200 480GB", (989.0, 494.7)),
    ("NVIDIA A100-SXM4-80GB", (312.0, 156.0)),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_published_peaks_match_the_device_name(name, peaks):
    assert published_peak_tflops(name) == peaks


def test_published_peak_is_none_off_cuda():
    assert runtime_module.published_peak_flops(torch.device("cpu")) is None


def test_peak_memory_on_cpu_is_the_peak_resident_set():
    reported = peak_memory_mib(torch.device("cpu"))
    assert reported == pytest.approx(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rel=0.01)
    assert reported > 10  # MiB: a Python process with torch loaded


def test_device_and_precision_choice():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cuda", "mps", "cpu")
    with pytest.raises(UserError, match="train.device: unknown device 'gpu'; available here: cpu"):
        pick_device("gpu")
    with pytest.raises(UserError, match=r"--device: 'cuda:99' (is not available|does not exist)"):
        pick_device("cuda:99", "--device")  # beyond the visible GPUs, or no CUDA at all
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"train\.device: 'cuda' is not available \(.*\); available here: cpu"):
            pick_device("cuda")
    with pytest.raises(UserError, match="train.device: unknown device 'meta'"):
        pick_device("meta")  # a device torch knows, but no place to train
    assert pick_autocast_dtype("float16", torch.device("cpu")) == torch.float16
    assert pick_autocast_dtype("auto", torch.device("cpu")) in (torch.bfloat16, torch.float32)
    assert pick_autocast_dtype("auto", torch.device("meta")) == torch.float32


class FakeProcessGroup:
    """Stands in for torch.distributed in Runtime.close: records barrier and destroy calls."""

    def __init__(self):
        self.calls = []

    def is_initialized(self):
        return "destroy" not in self.calls

    def barrier(self):
        self.calls.append("barrier")

    def destroy_process_group(self):
        self.calls.append("destroy")


@pytest.fixture
def fake_dist(monkeypatch):
    fake = FakeProcessGroup()
    monkeypatch.setattr(runtime_module, "dist", fake)
    return fake


def test_runtime_leaves_the_process_group_together_when_its_block_ends(fake_dist, tmp_path):
    with Runtime(torch.device("cpu"), torch.float32, tmp_path, rank=1, world_size=2) as runtime:
        assert runtime.distributed and not runtime.is_main
        assert fake_dist.calls == []
    assert fake_dist.calls == ["barrier", "destroy"]


def test_runtime_leaves_at_once_after_an_error(fake_dist, tmp_path):
    """The other processes may never reach a barrier; waiting for them would hang."""
    with pytest.raises(RuntimeError, match="boom"):
        with Runtime(torch.device("cpu"), torch.float32, tmp_path, world_size=2):
            raise RuntimeError("boom")
    assert fake_dist.calls == ["destroy"]


def test_single_process_runtime_has_no_process_group_to_leave(fake_dist, tmp_path):
    with Runtime(torch.device("cpu"), torch.float32, tmp_path):
        pass
    assert fake_dist.calls == []


def test_setup_runtime_makes_the_run_folder_seeds_and_says_when_it_keeps_freed_memory(tmp_path, capsys):
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), device="cpu", dtype="float32", seed=7)
    with setup_runtime(cfg, "test") as runtime:
        assert (runtime.device, runtime.autocast_dtype, runtime.out_dir) == (torch.device("cpu"), torch.float32,
                                                                             tmp_path / "run")
        assert (tmp_path / "run" / "checkpoints").is_dir()
        drawn = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(drawn, torch.rand(3))
    said = [line for line in capsys.readouterr().err.splitlines() if "keep_freed_memory" in line]
    if sys.platform.startswith("linux"):  # glibc's mallopt
        assert said == ["[train.keep_freed_memory: glibc's malloc keeps freed memory for reuse]"]


def test_torchrun_without_an_out_dir_is_refused_before_joining(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(runtime_module.dist, "init_process_group", None)  # joining would fail differently
    with pytest.raises(UserError, match="train.out_dir: set it explicitly"):
        setup_runtime(TrainConfig(device="cpu"), "test")


FAULTS_OF_A_REUSED_BLOCK = """
import resource, sys, torch
from gpt.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults_of_64_mb_blocks(count):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(count):
        torch.ones(16 * 2**20)  # 64 MB, written, then freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_64_mb_blocks(4)  # the kept heap settles within a few blocks
print(faults_of_64_mb_blocks(4))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_spares_the_page_faults_of_reused_blocks():
    """glibc maps and unmaps each 64 MB block (16K page faults apiece); kept, the memory is reused."""
    def faults(setting: str) -> int:
        run = subprocess.run([sys.executable, "-c", FAULTS_OF_A_REUSED_BLOCK, setting], capture_output=True,
                             text=True, check=True, cwd=Path(__file__).resolve().parents[1])
        return int(run.stdout.split()[-1])

    assert faults("default") > 4 * 15_000  # 4 blocks of 16,384 pages of 4 KiB
    assert faults("keep") < 1_000
