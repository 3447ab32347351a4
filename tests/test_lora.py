"""Tests for gpt/lora.py: exact start, what trains, merging, parameter counts, target validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt.config import ModelConfig
from gpt.errors import UserError
from gpt.lora import LoRALinear, apply_lora, count_parameters, lora_state_dict, merge_lora
from gpt.model import GPT
from gpt.optim import AdamW, param_groups

VOCAB = 61
LLAMA_STYLE = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2)


def tiny_model(seed: int = 0, **overrides) -> GPT:
    """d_model 48, 6 heads of 8: q_proj and out_proj are 48 x 48, k/v_proj 48 x 16 with n_kv_head 2."""
    config = ModelConfig(**{**dict(vocab_size=VOCAB, context_length=16, d_model=48, n_layer=2, n_head=6), **overrides})
    torch.manual_seed(seed)
    return GPT(config).eval()


def random_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model: GPT) -> None:
    """Give every lora_B nonzero values, as training would, so merging has something to fold in."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("style", [{}, LLAMA_STYLE])
def test_wrapped_model_equals_base_model_at_init(style):
    model = tiny_model(**style)
    ids = random_ids()
    before = model(ids)
    targets = ("q_proj", "k_proj", "v_proj", "out_proj", "up_proj", "down_proj")
    apply_lora(model, rank=4, alpha=8.0, targets=targets)
    assert torch.equal(model(ids), before)


def test_lora_linear_computes_base_plus_scaled_low_rank_update():
    torch.manual_seed(0)
    base = torch.nn.Linear(10, 6)
    layer = LoRALinear(base, rank=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 5, 10)  # (B, T, in)
    expected = F.linear(x, base.weight, base.bias) + 2.0 * (x @ layer.lora_A.t() @ layer.lora_B.t())
    torch.testing.assert_close(layer(x), expected)
    assert layer.lora_A.shape == (3, 10) and layer.lora_B.shape == (6, 3)
    assert not base.weight.requires_grad and not base.bias.requires_grad


def test_dropout_only_touches_the_adapter_path():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(10, 6), rank=2, alpha=2.0, dropout=0.5).train()
    x = torch.randn(8, 10)
    assert torch.equal(layer(x), layer.base(x))  # B = 0: dropped or not, the update is zero
    with torch.no_grad():
        layer.lora_B.normal_()
    assert not torch.allclose(layer(x), layer(x))  # train mode: a fresh dropout mask each call
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base(x) + x @ layer.lora_A.t() @ layer.lora_B.t())


def test_training_changes_only_adapters_and_what_the_test_unfroze():
    model = tiny_model(tie_embeddings=False).train()
    names = apply_lora(model, rank=4, alpha=8.0)
    assert names == ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj", "blocks.1.attn.q_proj", "blocks.1.attn.v_proj"]
    model.final_norm.requires_grad_(True)  # the caller keeps one more module trainable
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in names for ab in "AB"} | {"final_norm.weight", "final_norm.bias"}

    optimizer = AdamW(param_groups(model, weight_decay=0.1), lr=1e-2)
    ids = random_ids()
    for _ in range(3):
        logits = model(ids[:, :-1])  # (B, T-1, V)
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for name, param in model.named_parameters():
        if name in trainable:
            assert not torch.equal(param, start[name]), f"{name} did not train"
        else:
            assert torch.equal(param, start[name]), f"frozen {name} changed"
            assert param.grad is None


@pytest.mark.parametrize("style", [{}, LLAMA_STYLE])
def test_merge_equals_unmerged_and_restores_state_dict_keys(style):
    model = tiny_model(**style)
    original_keys = list(model.state_dict())
    original_q_proj = model.blocks[0].attn.q_proj
    targets = ("q_proj", "v_proj", "down_proj", "gate_proj") if style else ("q_proj", "v_proj", "down_proj")
    apply_lora(model, rank=4, alpha=8.0, targets=targets)
    assert "blocks.0.attn.q_proj.base.weight" in model.state_dict()
    randomize_adapters(model)
    ids = random_ids()
    unmerged = model(ids)
    expected_q = model.blocks[1].attn.q_proj.merged_weight()

    merge_lora(model)

    assert list(model.state_dict()) == original_keys
    assert model.blocks[0].attn.q_proj is original_q_proj  # the layer itself is back, not a copy
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.equal(model.blocks[1].attn.q_proj.weight, expected_q)
    torch.testing.assert_close(model(ids), unmerged, atol=1e-5, rtol=1e-5)
    # A fresh model loads the merged weights with no LoRA code and computes the same logits.
    fresh = tiny_model(seed=123, **style)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(ids), unmerged, atol=1e-5, rtol=1e-5)


def test_merged_weight_is_base_plus_scaled_product():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(5, 7, bias=False), rank=2, alpha=3.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = layer.base.weight + 1.5 * layer.lora_B @ layer.lora_A  # (out, in)
    torch.testing.assert_close(layer.merged_weight(), expected)


@pytest.mark.parametrize(
    "style, targets, adapters_per_layer",
    [
        # r * (in + out) per target: q_proj 48 -> 48, v_proj 48 -> 48 (MHA) or 48 -> 16 (2 kv heads of 8).
        ({}, ("q_proj", "v_proj"), 4 * (48 + 48) + 4 * (48 + 48)),
        (LLAMA_STYLE, ("q_proj", "v_proj"), 4 * (48 + 48) + 4 * (48 + 16)),
        # d_ff defaults to 4 * d_model = 192: up_proj 48 -> 192, down_proj 192 -> 48.
        ({}, ("up_proj", "down_proj"), 4 * (48 + 192) + 4 * (192 + 48)),
    ],
)
def test_trainable_count_matches_hand_computed(style, targets, adapters_per_layer):
    model = tiny_model(**style)
    _, base_total = count_parameters(model)
    assert count_parameters(model) == (base_total, base_total)
    apply_lora(model, rank=4, targets=targets)
    n_layer = 2
    assert count_parameters(model) == (n_layer * adapters_per_layer, base_total + n_layer * adapters_per_layer)


def test_lora_state_dict_holds_only_adapters():
    model = tiny_model()
    names = apply_lora(model, rank=2, targets=("k_proj",))
    adapters = lora_state_dict(model)
    assert list(adapters) == [f"{n}.lora_{ab}" for n in names for ab in "AB"]
    assert adapters["blocks.1.attn.k_proj.lora_A"].shape == (2, 48)
    assert adapters["blocks.1.attn.k_proj.lora_B"].shape == (48, 2)


def test_tied_head_counts_once():
    """The tied head shares the embedding's (61, 48) matrix: counted by hand from the shapes, it appears once."""
    d, ff, vocab, context, layers = 48, 4 * 48, VOCAB, 16, 2
    per_block = (2 * d) + 4 * (d * d + d) + (2 * d) + (d * ff + ff) + (ff * d + d)  # norms, attention, MLP
    expected = vocab * d + context * d + layers * per_block + 2 * d  # embeddings, blocks, final norm
    assert count_parameters(tiny_model()) == (expected, expected)  # tie_embeddings defaults to True
    assert count_parameters(tiny_model(tie_embeddings=False)) == (expected + vocab * d, expected + vocab * d)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(targets=("q_proj", "qkv")),
            "'qkv'; valid: q_proj, k_proj, v_proj, out_proj, gate_proj, up_proj, down_proj",
        ),
        (dict(targets=("lm_head",)), "'lm_head'.*valid:"),
        (dict(targets=()), "empty"),
        (dict(targets=("gate_proj",)), "'gate_proj' match no linear layer"),  # a GELU model has no gate
        (dict(rank=0), "rank.*0"),
        (dict(rank=2.5), "rank.*2.5"),
        (dict(alpha=-1.0), "alpha.*-1.0"),
        (dict(dropout=1.0), "dropout.*1.0"),
    ],
)
def test_bad_arguments_raise_user_error(kwargs, message):
    model = tiny_model()
    with pytest.raises(UserError, match=message):
        apply_lora(model, **kwargs)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing was changed
    assert all(p.requires_grad for p in model.parameters())


def test_single_string_target_is_one_target():
    assert apply_lora(tiny_model(), targets="out_proj") == ["blocks.0.attn.out_proj", "blocks.1.attn.out_proj"]


def test_applying_twice_or_merging_nothing_raises():
    model = tiny_model()
    with pytest.raises(UserError, match="no LoRA adapters"):
        merge_lora(model)
    apply_lora(model)
    with pytest.raises(UserError, match="already has LoRA adapters"):
        apply_lora(model)
