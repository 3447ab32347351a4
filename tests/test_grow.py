"""Growing a model (`gpt.grow`): the grown model against the untouched small one.

The reference for function preservation is the small model's own logits, computed before
growing; parameter counts are checked against arithmetic written here from the ModelConfig
and against a model gpt.model builds for the grown config. The small models are random,
with every parameter (norm gains and biases too) moved off its initial value, so a norm
tiled wrongly or a bias left out would show.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import gpt.grow as grow
from gpt.config import ModelConfig
from gpt.errors import ConfigError, UserError
from gpt.grow import describe_growth, grow_model, parse_grow_spec, short_count
from gpt.lora import apply_lora
from gpt.model import GPT
from gpt.optim import AdamW

VOCAB = 101
GPT2_STYLE = dict(norm="layernorm", pos_emb="learned", mlp="gelu", bias=True)
LLAMA_STYLE = dict(norm="rmsnorm", pos_emb="rope", mlp="swiglu", bias=False, n_kv_head=2)
FAMILIES = {
    "gpt2-tied": dict(GPT2_STYLE, tie_embeddings=True),
    "gpt2-untied": dict(GPT2_STYLE, tie_embeddings=False),
    "llama-gqa-tied": dict(LLAMA_STYLE, tie_embeddings=True),
    "llama-gqa-untied": dict(LLAMA_STYLE, tie_embeddings=False),
}
GROWTHS = {
    "depth": dict(n_layer=5),
    "width": dict(d_model=64),
    "depth+width": dict(n_layer=3, d_model=96),
    "d_ff": dict(d_ff=61),
    "width+d_ff": dict(d_model=64, d_ff=100),
}


def small_model(family: str, seed: int = 0) -> GPT:
    """A 2-block model of d_model 32 (4 heads of 8), its parameters random like a trained model's."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=VOCAB, context_length=32, d_model=32, n_layer=2, n_head=4, d_ff=48,
                         attn_impl="manual", loss_impl="plain", **FAMILIES[family])
    model = GPT(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def token_ids(seed: int = 1, length: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def expected_parameters(config: ModelConfig) -> int:
    """The parameter count of `config` written out per family, independently of gpt.grow."""
    D, F, V, L = config.d_model, config.d_ff, config.vocab_size, config.n_layer
    kv = config.n_kv_head * config.head_dim
    if config.mlp == "gelu":  # GPT-2: biases everywhere, LayerNorm with bias, learned positions
        block = 2 * 2 * D + (D * D + D) + 2 * (D * kv + kv) + (D * D + D) + (D * F + F) + (F * D + D)
        total = V * D + config.context_length * D + L * block + 2 * D
    else:  # Llama: no biases, RMSNorm, SwiGLU, RoPE
        block = 2 * D + D * D + 2 * D * kv + D * D + 3 * D * F
        total = V * D + L * block + D
    return total + (0 if config.tie_embeddings else V * D)


# ----------------------------------------------------------------------------
# The same function
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("growth", GROWTHS)
@pytest.mark.parametrize("family", FAMILIES)
def test_grown_model_computes_the_small_models_logits(family, growth):
    small = small_model(family)
    ids = token_ids()
    with torch.no_grad():
        reference = small(ids)  # (B, T, V)
        grown = grow_model(small, **GROWTHS[growth])
        logits = grown(ids)
    assert logits.shape == reference.shape
    assert torch.allclose(logits, reference, rtol=0, atol=1e-5), (logits - reference).abs().max()
    for name, size in GROWTHS[growth].items():
        assert getattr(grown.config, name) == size


@pytest.mark.parametrize("family", FAMILIES)
def test_grown_config_and_parameter_count(family):
    small = small_model(family)
    grown = grow_model(small, n_layer=4, d_model=64)
    kv_heads = small.config.n_kv_head * 2
    assert grown.config == dataclasses.replace(small.config, n_layer=4, d_model=64, n_head=8, n_kv_head=kv_heads,
                                               d_ff=96)
    assert grown.config.head_dim == small.config.head_dim
    assert grown.num_parameters() == expected_parameters(grown.config) == GPT(grown.config).num_parameters()
    assert small.num_parameters() == expected_parameters(small.config)


def test_describe_growth_names_every_changed_size_and_the_counts():
    small = small_model("llama-gqa-untied")
    grown = grow_model(small, n_layer=4, d_model=64, context_length=64)
    before, after = short_count(small.num_parameters()), short_count(grown.num_parameters())
    assert describe_growth(small.config, grown.config) == (
        f"grown 2 -> 4 layers, d_model 32 -> 64 (n_head 4 -> 8, n_kv_head 2 -> 4, d_ff 48 -> 96), "
        f"context_length 32 -> 64: {before} -> {after} parameters")
    assert describe_growth(small.config, grow_model(small, d_ff=50).config).startswith("grown d_ff 48 -> 50: ")
    assert short_count(1_234_567) == "1.2M" and short_count(45_678) == "45.7K"


def test_depth_copies_follow_their_blocks_and_add_nothing():
    small = small_model("gpt2-untied")
    small = grow_model(small, n_layer=4)  # 4 trained-looking blocks: copy 2 of them
    deep = grow_model(small, n_layer=6)
    sources = [0, 1, 1, 2, 3, 3]  # blocks 1 and 3 (evenly spaced), each copy right after its block
    for index, source in enumerate(sources):
        new, old = deep.blocks[index].state_dict(), small.blocks[source].state_dict()
        is_copy = index > 0 and sources[index - 1] == source
        for name, tensor in old.items():
            if is_copy and name.startswith(("attn.out_proj", "mlp.down_proj")):
                assert not new[name].any(), f"block {index} {name} should be zero"
            else:
                assert torch.equal(new[name], tensor), f"block {index} {name}"


def test_context_length_grows_for_rope_models():
    small = small_model("llama-gqa-tied")
    ids = token_ids(length=32)
    with torch.no_grad():
        reference = small(ids)
        longer = grow_model(small, context_length=64)
        assert torch.allclose(longer(ids), reference, rtol=0, atol=1e-5)
        assert longer(token_ids(length=64)).shape == (2, 64, VOCAB)


# ----------------------------------------------------------------------------
# Training after growing
# ----------------------------------------------------------------------------


def train_three_steps(model: GPT) -> list[float]:
    """The losses of 3 AdamW steps on one random batch, and the loss after them."""
    ids = token_ids(seed=5, length=32)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    optimizer = AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(model(inputs, targets).item())
    return losses


def copy_spread(model: GPT, k: int) -> float:
    """The largest difference between the k copies of the final hidden states (0 when they are identical)."""
    with torch.no_grad():
        copies = model.eval().hidden_states(token_ids()).chunk(k, dim=-1)  # k x (B, T, D / k)
    return max((copy - copies[0]).abs().max().item() for copy in copies[1:])


@pytest.mark.parametrize("family", ["gpt2-tied", "llama-gqa-untied"])
def test_training_a_grown_model_lowers_the_loss_and_breaks_the_copies_symmetry(family):
    small = small_model(family)
    grown = grow_model(small, n_layer=3, d_model=64)
    assert copy_spread(grown, 2) < 1e-5  # the residual stream starts as 2 copies
    losses = train_three_steps(grown)
    assert losses[-1] < losses[0] - 0.01, losses
    assert copy_spread(grown, 2) > 1e-3  # the copies have learned different things
    copy = grown.blocks[2].attn.out_proj.weight  # the copy of block 1: it started at zero and moved
    assert copy.abs().max() > 1e-4


def test_equal_splits_would_keep_the_copies_identical(monkeypatch):
    """The reason for random splits: with W / k in every block the copies get equal updates forever."""
    monkeypatch.setattr(grow, "SPLIT_NOISE", 0.0)
    grown = grow_model(small_model("llama-gqa-untied"), d_model=64)
    losses = train_three_steps(grown)
    assert losses[-1] < losses[0]
    assert copy_spread(grown, 2) < 1e-5


def test_splits_follow_the_seed():
    small = small_model("gpt2-tied")
    first, again, other = (grow_model(small, d_model=64, seed=seed) for seed in (0, 0, 1))
    weight = "blocks.0.attn.q_proj.weight"
    assert torch.equal(first.state_dict()[weight], again.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], other.state_dict()[weight])


def test_grow_model_leaves_the_input_model_and_the_global_random_state_alone():
    small = small_model("gpt2-tied")
    before = {name: tensor.clone() for name, tensor in small.state_dict().items()}
    rng_before = torch.get_rng_state()
    grown = grow_model(small, n_layer=3, d_model=64, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before)
    with torch.no_grad():
        for param in grown.parameters():
            param.add_(1.0)  # the grown model shares no storage with the small one
    after = small.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    assert small.config.n_layer == 2 and small.config.d_model == 32
    assert grown.training == small.training


# ----------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------


def test_parse_grow_spec():
    assert parse_grow_spec("n_layer=8,d_model=256") == {"n_layer": 8, "d_model": 256}
    assert parse_grow_spec(" d_ff = 100 , context_length=2048 ") == {"d_ff": 100, "context_length": 2048}


@pytest.mark.parametrize("spec, culprit", [
    ("", "empty"),
    ("n_layer", "'n_layer'"),
    ("=8", "'=8'"),
    ("n_layer=8,", "''"),
    ("n_layer=8.0", "'8.0'"),
    ("n_layer=-2", "'-2'"),
    ("n_layer=", "n_layer"),
    ("n_layer=0", "n_layer"),
    ("n_layer=8,n_layer=9", "n_layer is given twice"),
    ("depth=8", "'depth'"),
    ("n_head=8", "follows d_model"),
    ("n_kv_head=4", "follows d_model"),
    ("vocab_size=60000", "tokenizer"),
])
def test_bad_grow_specs_name_the_key_and_the_culprit(spec, culprit):
    with pytest.raises(ConfigError) as error:
        parse_grow_spec(spec, key="init.grow")
    assert str(error.value).startswith("init.grow: ") and culprit in str(error.value), str(error.value)
    with pytest.raises(ConfigError, match="^other.key: "):
        parse_grow_spec(spec, key="other.key")


@pytest.mark.parametrize("family, sizes, culprits", [
    ("gpt2-tied", dict(n_layer=1), ("n_layer=1", "smaller", "(2)")),
    ("gpt2-tied", dict(d_model=16), ("d_model=16", "smaller")),
    ("gpt2-tied", dict(d_model=48), ("d_model=48", "multiple", "64, 96")),
    ("gpt2-tied", dict(d_ff=40), ("d_ff=40", "smaller")),
    ("gpt2-tied", dict(d_model=64, d_ff=64), ("d_ff=64", "96", "factor 2")),
    ("gpt2-tied", dict(context_length=64), ("context_length=64", "learned", "RoPE")),
    ("llama-gqa-tied", dict(context_length=16), ("context_length=16", "smaller")),
    ("llama-gqa-tied", dict(n_head=8), ("n_head", "follows d_model")),
    ("llama-gqa-tied", dict(vocab_size=200), ("vocab_size", "tokenizer")),
    ("llama-gqa-tied", dict(width=64), ("'width'",)),
    ("llama-gqa-tied", dict(n_layer=4.0), ("n_layer", "integer")),
])
def test_sizes_that_cannot_be_grown_to_name_the_field(family, sizes, culprits):
    small = small_model(family)
    with pytest.raises(UserError) as error:
        grow_model(small, **sizes)
    for culprit in culprits:
        assert culprit in str(error.value), str(error.value)


def test_a_model_with_lora_adapters_is_refused():
    small = small_model("llama-gqa-tied")
    apply_lora(small)
    with pytest.raises(UserError, match=r"blocks\.0\.attn\.q_proj\..*merge LoRA adapters"):
        grow_model(small, n_layer=3)
