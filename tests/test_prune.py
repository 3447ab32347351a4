"""Pruning (`gpt.prune`, `python -m gpt prune`): masks against independent computations, the output folder, recovery.

The masks are checked against references written here without gpt.prune's code: numpy
sorts for the unstructured thresholds (per layer and global) and a plain Python loop over
every group of 4 weights for 2:4. The output folder is loaded the way every verb loads a
model, and recovery runs the ordinary training loop for a few steps on a slice of Botchan.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt.checkpoint import load_checkpoint, save_checkpoint
from gpt.config import ModelConfig
from gpt.generate import generate
from gpt.model import GPT
from gpt.errors import UserError
from gpt.prune import (
    apply_masks, is_two_of_four, prunable_linears, prune_cli, prune_masks, semi_structured_linears,
)
from gpt.tokenizer import get_tokenizer
from gpt.weights import load_model_and_tokenizer
from test_bad_inputs import assert_clear_error, command

REPO = Path(__file__).resolve().parents[1]
LLAMA_STYLE = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj", "gate_proj", "up_proj", "down_proj")


def small_model(seed: int = 0, **overrides) -> GPT:
    """A two-block Llama-style model (grouped-query attention, SwiGLU): seven projection kinds of five shapes."""
    torch.manual_seed(seed)
    config = dict(vocab_size=50257, context_length=64, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=48,
                  **LLAMA_STYLE)
    return GPT(ModelConfig(**{**config, **overrides})).eval()


def projection_weights(model: GPT) -> dict[str, np.ndarray]:
    """name -> weight as numpy, found by walking the modules independently of gpt.prune."""
    return {f"{name}": module.weight.detach().numpy().copy() for name, module in model.named_modules()
            if name.startswith("blocks.") and name.rsplit(".", 1)[-1] in PROJECTIONS}


def keep_above_kth_smallest(magnitudes: np.ndarray, count: int) -> np.ndarray:
    """The reference keep-mask: |w| above the count-th smallest of `magnitudes` (there must be no tie there)."""
    ordered = np.sort(magnitudes.ravel())
    if count == 0:
        return np.ones(magnitudes.shape, dtype=bool)
    threshold = ordered[count - 1]
    assert count == ordered.size or ordered[count] > threshold, "a tie at the threshold: the test needs another seed"
    return magnitudes > threshold


# ----------------------------------------------------------------------------- masks


def test_projections_are_the_blocks_linears_and_never_the_head():
    model = small_model()
    names = set(prunable_linears(model))
    assert names == set(projection_weights(model))
    assert len(names) == 2 * 7
    assert not any("lm_head" in name or "emb" in name for name in names)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.37, 0.5, 0.9])
def test_layer_scope_zeroes_the_smallest_of_each_layer(sparsity):
    model = small_model()
    masks = prune_masks(model, "unstructured", sparsity, "layer")
    for name, weight in projection_weights(model).items():
        count = round(sparsity * weight.size)
        expected = keep_above_kth_smallest(np.abs(weight), count)
        np.testing.assert_array_equal(masks[name].numpy(), expected, err_msg=name)
        assert (~masks[name]).sum().item() == count  # the sparsity is exact


def test_global_scope_uses_one_threshold_over_all_projections():
    model = small_model()
    sparsity = 0.5
    weights = projection_weights(model)
    everything = np.concatenate([np.abs(w).ravel() for w in weights.values()])
    count = round(sparsity * everything.size)
    threshold = np.sort(everything)[count - 1]
    masks = prune_masks(model, "unstructured", sparsity, "global")
    for name, weight in weights.items():
        np.testing.assert_array_equal(masks[name].numpy(), np.abs(weight) > threshold, err_msg=name)
    assert sum(int((~m).sum()) for m in masks.values()) == count  # exact overall

    # The output projections start smaller (GPT-2's residual scaling), so one global threshold takes more of
    # them than of the others, while per-layer scope takes the same share of every layer.
    global_share = {name: (~m).float().mean().item() for name, m in masks.items()}
    assert global_share["blocks.0.attn.out_proj"] > global_share["blocks.0.attn.q_proj"] + 0.2
    layer_masks = prune_masks(model, "unstructured", sparsity, "layer")
    assert all(abs((~m).float().mean().item() - sparsity) < 1e-3 for m in layer_masks.values())
    assert any(not torch.equal(layer_masks[name], masks[name]) for name in masks)


def test_two_of_four_keeps_the_two_largest_of_every_group_by_brute_force():
    model = small_model()
    masks = prune_masks(model, "2:4", 0.5, "layer")
    for name, weight in projection_weights(model).items():
        rows, columns = weight.shape
        expected = np.zeros(weight.shape, dtype=bool)
        for row in range(rows):
            for start in range(0, columns, 4):
                group = [abs(float(weight[row, start + i])) for i in range(4)]
                largest_two = sorted(range(4), key=lambda i: group[i], reverse=True)[:2]
                for i in largest_two:
                    expected[row, start + i] = True
        np.testing.assert_array_equal(masks[name].numpy(), expected, err_msg=name)
        assert (~masks[name]).sum().item() == weight.size // 2


def test_pruning_touches_only_the_projection_weights():
    model = small_model()
    with torch.no_grad():
        for name, param in model.named_parameters():  # norms away from 1, so an accidental change would show
            param.add_(0.01 * torch.randn_like(param))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    masks = prune_masks(model, "unstructured", 0.5, "layer")
    apply_masks(model, masks)
    after = model.state_dict()
    pruned = {f"{name}.weight" for name in masks}
    for name, tensor in before.items():
        if name in pruned:
            keep = masks[name.removesuffix(".weight")]
            assert torch.equal(after[name][keep], tensor[keep]) and bool((after[name][~keep] == 0).all()), name
        else:
            assert torch.equal(after[name], tensor), f"{name} changed"


def test_is_two_of_four_detects_a_third_nonzero():
    weight = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 3.0, 0.0, 4.0]])
    assert is_two_of_four(weight)
    weight[0, 1] = 5.0
    assert not is_two_of_four(weight)


# ----------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A small Llama-style model as our checkpoint, with the GPT-2 tokenizer recorded."""
    path = tmp_path_factory.mktemp("source") / "model.pt"
    save_checkpoint(path, small_model(seed=3), tokenizer="gpt2", step=0)
    return path


def in_memory_pruned(source: Path, pattern: str, sparsity: float, scope: str) -> GPT:
    model = load_model_and_tokenizer(str(source)).model
    apply_masks(model, prune_masks(model, pattern, sparsity, scope))
    return model.eval()


@pytest.mark.parametrize("pattern, flags", [("unstructured", ["--sparsity", "0.3", "--scope", "global"]),
                                            ("2:4", [])])
def test_output_folder_loads_with_the_pruned_weights_and_the_tokenizer(source, tmp_path, pattern, flags):
    out = tmp_path / "pruned"
    assert prune_cli(["--model", str(source), "--pattern", pattern, *flags, "--out", str(out)]) == 0
    sparsity = 0.3 if pattern == "unstructured" else 0.5
    expected = in_memory_pruned(source, pattern, sparsity, "global" if flags else "layer")

    loaded = load_model_and_tokenizer(str(out))
    assert loaded.tokenizer_name == "gpt2"
    ids = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(ids), expected(ids))

    recipe = json.loads((out / "prune.json").read_text())
    assert (recipe["pattern"], recipe["sparsity"], recipe["checkpoint"]) == (pattern, sparsity, "checkpoints/best.pt")
    total = sum(linear.weight.numel() for linear in prunable_linears(expected).values())
    zeros = sum(int((linear.weight == 0).sum()) for linear in prunable_linears(expected).values())
    assert recipe["projections"]["sparsity"] == zeros / total
    assert zeros == round(sparsity * total)
    for name, linear in prunable_linears(expected).items():
        assert recipe["layers"][name] == int((linear.weight == 0).sum()) / linear.weight.numel()


def test_generate_verb_continues_like_the_in_memory_pruned_model(source, tmp_path):
    out = tmp_path / "pruned"
    assert prune_cli(["--model", str(source), "--sparsity", "0.5", "--out", str(out)]) == 0
    expected_model = in_memory_pruned(source, "unstructured", 0.5, "layer")
    tokenizer = get_tokenizer("gpt2")
    prompt = "The cat"
    ids = generate(expected_model, torch.tensor(tokenizer.encode(prompt)), max_new_tokens=8, temperature=0.0)
    expected_text = tokenizer.decode(ids.tolist())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "gpt", "generate", "--model", str(out), "--prompt", prompt,
                             "--max-new-tokens", "8", "--temperature", "0"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == expected_text


def test_recovery_keeps_pruned_weights_at_zero_and_lowers_the_loss(source, tmp_path, corpus):
    out = tmp_path / "recovered"
    steps = 6
    assert prune_cli(["--model", str(source), "--sparsity", "0.5", "--out", str(out), "--recover-steps", str(steps),
                      "--recover-window", "32", "--data.path", str(corpus), "--train.lr", "3e-3",
                      "--train.weight_decay", "0.1", "--train.batch_size", "4", "--train.eval_batches", "2"]) == 0
    pruned = in_memory_pruned(source, "unstructured", 0.5, "layer")
    masks = {name: linear.weight != 0 for name, linear in prunable_linears(pruned).items()}
    for checkpoint in ("best", "latest"):
        state = load_checkpoint(out / "checkpoints" / f"{checkpoint}.pt")
        assert state["tokenizer"] == "gpt2" and state["step"] == steps
        for name, keep in masks.items():
            weight = state["model"][f"{name}.weight"]
            assert bool((weight[~keep] == 0).all()), f"{checkpoint}.pt: a pruned weight of {name} moved"
            assert not torch.equal(weight[keep], prunable_linears(pruned)[name].weight[keep]), "nothing trained"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["loss"] for r in records if r.get("split") == "val"]
    assert val[-1] < val[0]
    recipe = json.loads((out / "prune.json").read_text())
    assert recipe["recovery"]["steps"] == steps and recipe["projections"]["sparsity"] == 0.5
    assert load_model_and_tokenizer(str(out)).tokenizer_name == "gpt2"


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def odd_width(tmp_path_factory) -> Path:
    """A GPT-2-shaped model whose d_model (30) is no multiple of 4."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("odd") / "odd.pt"
    save_checkpoint(path, GPT(ModelConfig(vocab_size=50257, context_length=64, d_model=30, n_layer=1, n_head=2)))
    return path


@pytest.mark.parametrize("line, culprits", [
    ("gpt prune --model {ckpt} --sparsity 1 --out out", ("--sparsity", "1")),
    ("gpt prune --model {ckpt} --sparsity -0.1 --out out", ("--sparsity", "-0.1")),
    ("gpt prune --model {ckpt} --sparsity nan --out out", ("--sparsity", "nan")),
    ("gpt prune --model {ckpt} --out out", ("--sparsity", "required")),
    ("gpt prune --model {ckpt} --pattern 2:4 --sparsity 0.3 --out out", ("--sparsity 0.3", "2:4")),
    ("gpt prune --model {ckpt} --pattern 2:4 --scope global --out out", ("--scope global", "2:4")),
    ("gpt prune --model {ckpt} --pattern 3:4 --out out", ("--pattern", "'3:4'")),
    ("gpt prune --model {ckpt} --sparsity 0.5 --out out --recover-steps 3", ("--recover-steps 3", "--data.path")),
    ("gpt prune --model {ckpt} --sparsity 0.5 --out out --train.lr 1e-3", ("--train.lr", "--recover-steps")),
    ("gpt prune --model {ckpt} --sparsity 0.5 --out out --recover-steps 2 --data.path text.txt --train.lr nan",
     ("train.lr", "nan")),
    ("gpt prune --model {ckpt} --sparsity 0.5 --out out --recover-steps 2 --data.path text.txt "
     "--train.max_steps 5", ("--train.max_steps", "--recover-steps")),
    ("gpt prune --model {ckpt} --sparsity 0.5 --out out --recover-steps 2 --data.path missing.txt",
     ("missing.txt",)),
    ("gpt prune --model {ckpt} --sparsity 0.5 --out out --recover-steps 2 --data.path text.txt "
     "--recover-window 65", ("--recover-window 65", "context length (64)")),
    ("gpt prune --model {ckpt} --sparsity 0.5 --out out --model.n_layer 2", ("--model.n_layer",)),
    ("gpt prune --model {ckpt} --sparsity 0.5 --out not_empty", ("--out", "not_empty", "not empty")),
    ("gpt prune --model {ckpt} --sparsity 0.5 --out a_file", ("--out", "a_file")),
    ("gpt prune --model missing.pt --sparsity 0.5 --out out", ("missing.pt",)),
    ("gpt prune --model {ckpt} --sparsity 0.5 --out out --quantize int8", ("--quantize int8",)),
    ("gpt prune --model {odd} --pattern 2:4 --out out", ("2:4", "blocks.0.attn.q_proj", "30 input features")),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(line, culprits, source, odd_width, tmp_path):
    (tmp_path / "a_file").write_text("a plain file\n")
    (tmp_path / "not_empty").mkdir()
    (tmp_path / "not_empty" / "keep.txt").write_text("mine\n")
    (tmp_path / "text.txt").write_text("It was a bright cold day in April, and the clocks were striking thirteen.\n" * 40)
    cmd = [word.replace("{odd}", str(odd_width)) for word in command(line, source)]
    assert_clear_error(cmd, *culprits, cwd=tmp_path)
    assert not (tmp_path / "out").exists()


def test_semi_structured_swap_refuses_what_the_sparse_kernels_cannot_take():
    model = small_model()
    with pytest.raises(UserError, match=r"blocks\.0\.attn\.q_proj: semi-structured sparsity needs a CUDA"):
        semi_structured_linears(model)  # float32 on the CPU (the CUDA swap itself: tests/test_gpu.py)
