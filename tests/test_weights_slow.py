"""The real SmolLM2-135M-Instruct (Q4_1 GGUF) against transformers' own GGUF loader.

Needs the file in the cache (`python -m gpt fetch smollm2-135m-instruct`); fails
without it (tests/conftest.py). transformers dequantizes the GGUF to float32 itself and undoes the
Q/K row permutation in its own code, so it is an independent reference (since transformers
5, its GGUF loader needs `accelerate`, which the test extra installs).
Run with `pytest -m slow tests/test_weights_slow.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

from gpt.config import ModelConfig
from gpt.generate import generate
from gpt.tokenizer import get_tokenizer
from gpt.weights import convert_cli, load_pretrained

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWhat is 12 * 7?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]
# Max |logit difference| measured over PROMPTS: 4.8e-5 with our default sdpa attention (logits reach 36),
# exactly 0.0 with attn_impl="manual" against transformers' eager attention.
LOGIT_TOLERANCE = 1e-4
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    start = time.perf_counter()
    model = load_pretrained(smollm2_gguf)
    print(f"\ngpt.load_pretrained: {time.perf_counter() - start:.1f} s")
    return model


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, attn_implementation="eager", dtype=torch.float32
    )
    print(f"\ntransformers from_pretrained(gguf_file=...): {time.perf_counter() - start:.1f} s")
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    return get_tokenizer(str(smollm2_gguf))


def test_config_is_smollm2_135m(ours):
    assert ours.config == ModelConfig.preset("smollm2-135m")
    assert ours.num_parameters() == 134_515_008


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_transformers_gguf_loader(ours, reference, tokenizer, prompt):
    ids = torch.tensor([tokenizer.encode(prompt, allowed_special="all")])
    with torch.no_grad():
        expected = reference(ids).logits
        got = ours(ids)
    assert expected.abs().max() > 10
    assert (got - expected).abs().max().item() < LOGIT_TOLERANCE


def test_greedy_continuation_matches(ours, reference, tokenizer):
    prompt = tokenizer.encode("def fibonacci(n):\n    ")
    got = generate(ours, [prompt], max_new_tokens=30, temperature=0.0, eos_id=tokenizer.eot_id)[0]
    expected = reference.generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=30, eos_token_id=tokenizer.eot_id
    )[0].tolist()
    assert len(got) == len(prompt) + 30
    assert got == expected


def test_convert_writes_a_folder_transformers_loads(ours, tokenizer, tmp_path, smollm2_gguf):
    assert convert_cli([str(smollm2_gguf), "--out", str(tmp_path)]) == 0
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.tensor([tokenizer.encode(PROMPTS[3])])
    with torch.no_grad():
        assert (exported(ids).logits - ours(ids)).abs().max().item() < LOGIT_TOLERANCE

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = [*PROMPTS, "Numbers 1234567 and 3.14159, café naïve 🙂 日本語", "  leading spaces\n\n\ttabs  "]
    for text in texts:
        assert hf_tokenizer.encode(text) == tokenizer.encode(text, allowed_special="all")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>"
    messages = [{"role": "user", "content": "Hi"}]
    chat = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


PEAK_RSS_SCRIPT = """
import sys, torch, gguf
from gpt.weights import load_pretrained
def mib(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) / 1024
base = mib("VmRSS")
model = load_pretrained(sys.argv[1])
print(mib("VmHWM") - base, sum(p.numel() for p in model.parameters()) * 4 / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_load_peak_memory_stays_near_one_copy(smollm2_gguf):
    """Peak RSS above the after-import baseline: the float32 weights, the gguf reader's parsed metadata
    (about 160 MiB for 49k tokens and merges) and the mapped file's pages. Measured 865 MiB for 513 MiB of weights."""
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_SCRIPT, str(smollm2_gguf)], capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stderr
    peak, weights = map(float, result.stdout.split())
    print(f"\npeak RSS +{peak:.0f} MiB for {weights:.0f} MiB of float32 weights")
    assert peak < 2 * weights
