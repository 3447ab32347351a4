"""Shared test fixtures: a small training corpus, and the fetched SmolLM2 model that the slow tests need.

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


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A slice of Botchan: enough windows for a few training steps, small enough to be quick."""
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    text = (Path(__file__).resolve().parents[1] / "data" / "botchan.txt").read_text(encoding="utf-8-sig")
    path.write_text(text[20_000:40_000], encoding="utf-8")
    return path
