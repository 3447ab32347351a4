"""gpt.resume: the random state a checkpoint saves comes back exactly, and only the run's own device's."""

import io
import random

import numpy as np
import pytest
import torch

from gpt.errors import UserError
from gpt.resume import _own_device_state, find_resume_checkpoint, rng_state, set_rng_state

CPU = torch.device("cpu")


def draws() -> tuple:
    return torch.rand(3).tolist(), torch.randn(2).tolist(), random.random(), np.random.rand(2).tolist()


def through_a_checkpoint(state: dict) -> dict:
    """What train() gets back: torch.save, then torch.load(weights_only=True), as checkpoints are loaded."""
    buffer = io.BytesIO()
    torch.save({"rng": state}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)["rng"]


def test_rng_state_round_trips_through_a_checkpoint():
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    np.random.randn()  # numpy caches the second gaussian of a pair: that is part of the state too
    saved = through_a_checkpoint(rng_state(CPU))
    expected = draws()
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    set_rng_state(saved, CPU)
    assert draws() == expected


def test_a_cpu_run_saves_no_cuda_state():
    """Only the run's own device: a CPU run has none, whatever GPUs the machine has."""
    assert set(rng_state(CPU)) == {"torch", "python", "numpy"}


def test_restored_states_may_come_from_another_device(monkeypatch):
    """A checkpoint loaded with map_location=<GPU> hands back non-CPU tensors; generators take CPU tensors only."""
    state = rng_state(CPU)
    moved = []

    class Elsewhere(torch.Tensor):
        """A CPU tensor that records being brought to the CPU, as a CUDA tensor would need."""

        def cpu(self, *args, **kwargs):
            moved.append(self)
            return torch.Tensor.cpu(self)

    state["torch"] = state["torch"].as_subclass(Elsewhere)
    state["numpy"]["keys"] = state["numpy"]["keys"].as_subclass(Elsewhere)
    set_rng_state(state, CPU)
    assert len(moved) == 2


def test_the_own_device_state_of_old_and_new_checkpoints():
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]
    assert _own_device_state(states[2], torch.device("cuda", 0)) is states[2]  # one state: this run's device
    # Older checkpoints kept one state per GPU the saving process saw; a resume may see fewer.
    assert _own_device_state(states, torch.device("cuda", 3)) is states[3]
    assert _own_device_state(states[:2], torch.device("cuda", 3)) is None


def test_find_resume_checkpoint(tmp_path):
    assert find_resume_checkpoint("", tmp_path) is None
    assert find_resume_checkpoint("auto", tmp_path) is None  # nothing yet: a fresh start
    latest = tmp_path / "checkpoints" / "latest.pt"
    latest.parent.mkdir()
    latest.write_bytes(b"")
    assert find_resume_checkpoint("auto", tmp_path) == latest
    assert find_resume_checkpoint(str(tmp_path), tmp_path / "elsewhere") == latest
    with pytest.raises(UserError, match="train.resume: checkpoint .*nope.pt not found"):
        find_resume_checkpoint(str(tmp_path / "nope.pt"), tmp_path)
