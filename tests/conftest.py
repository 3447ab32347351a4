"""Shared test fixtures: the fetched SmolLM2 model that the slow tests need.

No test downloads anything. The slow tests (`python -m pytest -m slow`) need
SmolLM2-135M-Instruct fetched first (`python -m gpt fetch smollm2-135m-instruct`, which
CI runs); without it they fail with that instruction, rather than skip and prove nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gpt.fetch import cached_path

SMOLLM2 = "smollm2-135m-instruct"


def smollm2_path() -> Path:
    """The cached SmolLM2 GGUF file; fails the calling test when it has not been fetched."""
    path = cached_path(SMOLLM2)
    if not path.is_file():
        pytest.fail(f"{path} is not cached: run `python -m gpt fetch {SMOLLM2}` before `python -m pytest -m slow`",
                    pytrace=False)
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return smollm2_path()
