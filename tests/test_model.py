"""The transformer: shapes, parameter counts, causality, attention paths, GQA, RoPE, KV cache."""

import math

import pytest
import torch
import torch.nn.functional as F

from gpt.cache import KVCache, attention_mask
from gpt.config import ModelConfig
from gpt.generate import generate
from gpt.model import GPT, apply_rope, rope_tables

LLAMA_STYLE = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)


def small_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=97, context_length=32, d_model=48, n_layer=2, n_head=6)
    return ModelConfig(**{**base, **overrides})


def model_for(config: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


@pytest.mark.parametrize(
    "preset, expected",
    [("gpt2-124m", 124_439_808), ("gpt2-355m", 354_823_168), ("smollm2-135m", 134_515_008)],
)
def test_preset_parameter_counts(preset, expected):
    with torch.device("meta"):  # count without allocating
        model = GPT(ModelConfig.preset(preset))
    assert model.num_parameters() == expected


def test_untied_head_adds_vocab_times_width():
    tied = GPT(small_config()).num_parameters()
    untied = GPT(small_config(tie_embeddings=False)).num_parameters()
    assert untied - tied == 97 * 48


@pytest.mark.parametrize("style", [{}, LLAMA_STYLE])
def test_logits_shape(style):
    model = model_for(small_config(**style))
    logits = model(torch.randint(0, 97, (3, 11)))
    assert logits.shape == (3, 11, 97)


@pytest.mark.parametrize("style", [{}, LLAMA_STYLE])
@pytest.mark.parametrize("attn_impl", ["manual", "sdpa"])
def test_causality_later_tokens_do_not_change_earlier_logits(style, attn_impl):
    model = model_for(small_config(attn_impl=attn_impl, **style))
    ids = torch.randint(0, 97, (2, 16))
    changed = ids.clone()
    changed[:, 10:] = torch.randint(0, 97, (2, 6))
    a, b = model(ids), model(changed)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("style", [{}, dict(LLAMA_STYLE, n_kv_head=2)])
def test_manual_attention_equals_sdpa(style):
    manual = model_for(small_config(attn_impl="manual", **style))
    fused = model_for(small_config(attn_impl="sdpa", **style))
    fused.load_state_dict(manual.state_dict())
    ids = torch.randint(0, 97, (2, 20))
    torch.testing.assert_close(manual(ids), fused(ids), atol=1e-5, rtol=1e-5)


def test_attention_equals_torch_multihead_attention():
    """With n_kv_head == n_head our attention is plain multi-head attention: compare to torch's own module."""
    config = small_config(n_kv_head=6, attn_impl="manual", bias=True)
    attn = model_for(config).blocks[0].attn
    reference = torch.nn.MultiheadAttention(48, 6, bias=True, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        reference.in_proj_bias.copy_(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
        reference.out_proj.weight.copy_(attn.out_proj.weight)
        reference.out_proj.bias.copy_(attn.out_proj.bias)
    x = torch.randn(2, 9, 48)
    future = torch.ones(9, 9, dtype=torch.bool).triu(1)  # True = not allowed
    expected, _ = reference(x, x, x, attn_mask=future, need_weights=False)
    torch.testing.assert_close(attn(x, None, None, None), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn_impl", ["manual", "sdpa"])
def test_grouped_query_equals_multihead_with_repeated_kv_weights(attn_impl):
    """GQA with 2 kv heads == MHA whose key/value heads are copies of those 2, each repeated 3 times."""
    gqa = model_for(small_config(n_kv_head=2, attn_impl=attn_impl, **{k: v for k, v in LLAMA_STYLE.items()}))
    mha = model_for(small_config(n_kv_head=6, attn_impl=attn_impl, **LLAMA_STYLE))
    state = gqa.state_dict()
    head_dim = 8
    for name, tensor in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            heads = tensor.view(2, head_dim, 48)  # (n_kv_head, hd, D)
            state[name] = heads.repeat_interleave(3, dim=0).reshape(6 * head_dim, 48)
    mha.load_state_dict(state)
    ids = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(gqa(ids), mha(ids), atol=1e-5, rtol=1e-5)


def test_rope_score_depends_only_on_relative_distance():
    head_dim, theta = 16, 10000.0
    cos, sin = rope_tables(head_dim, 64, theta)
    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def score(query_pos: int, key_pos: int) -> torch.Tensor:
        rq = apply_rope(q.view(1, 1, 1, -1), cos[query_pos], sin[query_pos])
        rk = apply_rope(k.view(1, 1, 1, -1), cos[key_pos], sin[key_pos])
        return (rq * rk).sum()

    for distance in (0, 3, 7):
        base = score(10 + distance, 10)
        for shift in (-10, 5, 40):
            torch.testing.assert_close(score(10 + distance + shift, 10 + shift), base, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score(13, 10), score(17, 10), atol=1e-3)
    # Rotation keeps the vector's length.
    rotated = apply_rope(q.view(1, 1, 1, -1), cos[37], sin[37])
    torch.testing.assert_close(rotated.norm(), q.norm())


def test_rope_angle_matches_formula():
    cos, sin = rope_tables(8, 10, 500.0)
    position, pair = 7, 2
    angle = position * 500.0 ** (-2 * pair / 8)
    assert math.isclose(cos[position, pair].item(), math.cos(angle), rel_tol=1e-5)
    assert math.isclose(sin[position, pair + 4].item(), math.sin(angle), rel_tol=1e-5)


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
@pytest.mark.parametrize("style", [{}, dict(LLAMA_STYLE, n_kv_head=3)])
def test_kv_cache_logits_equal_full_forward(style, attn_impl):
    """Prefill, a 3-token chunk after cached keys, then one token at a time: all equal one full pass."""
    model = model_for(small_config(**style, attn_impl=attn_impl))
    ids = torch.randint(0, 97, (2, 14))
    full = model(ids)
    cache = model.new_cache(batch_size=2, max_length=14)
    pieces = [model(ids[:, :5], cache=cache), model(ids[:, 5:8], cache=cache)]
    pieces += [model(ids[:, t:t + 1], cache=cache) for t in range(8, 14)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
@pytest.mark.parametrize("style", [{}, dict(LLAMA_STYLE, n_kv_head=3)])
def test_kv_cache_under_autocast_holds_its_dtype_and_equals_full_forward(style, attn_impl):
    """Under bf16 autocast the cache holds bf16 keys and values though the weights are fp32 (outside autocast it
    holds fp32). Cached logits equal one full pass under the same autocast (to bf16 rounding), and bit for bit
    those of an fp32 cache (what new_cache gave under autocast before): the keys come out of the projections in
    bf16, so widening them loses nothing. Cached generation equals uncached, with left padding."""
    model = model_for(small_config(**style, attn_impl=attn_impl))
    ids = torch.randint(0, 97, (2, 14))
    assert model.new_cache(batch_size=2).keys.dtype == torch.float32
    runs = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(ids)
        autocast_cache = model.new_cache(batch_size=2, max_length=14)
        assert autocast_cache.keys.dtype == autocast_cache.values.dtype == torch.bfloat16
        for cache in (autocast_cache, KVCache(model.config, 2, 14, dtype=torch.float32)):
            pieces = [model(ids[:, :5], cache=cache), model(ids[:, 5:8], cache=cache)]
            pieces += [model(ids[:, t:t + 1], cache=cache) for t in range(8, 14)]
            runs.append(torch.cat(pieces, dim=1))
        prompts = [[5, 6, 7, 8, 9], [11, 12]]
        assert generate(model, prompts, 12, use_cache=True) == generate(model, prompts, 12, use_cache=False)
    torch.testing.assert_close(runs[0].float(), full.float(), atol=1e-2, rtol=2e-2)
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
def test_grouped_query_attention_equals_attention_over_repeated_key_value_heads(attn_impl):
    """6 query heads on 2 key/value heads (SDPA's enable_gqa, or the manual path's copies) equal attention
    written out here over each key/value head repeated for its 3 query heads: causal, under a padding mask,
    and one decoding step after 8 cached positions."""
    config = small_config(n_kv_head=2, attn_impl=attn_impl)
    attn = model_for(config).blocks[0].attn
    x = torch.randn(2, 9, 48)

    def reference(allowed: torch.Tensor) -> torch.Tensor:
        """x (2, 9, 48) -> (2, 9, 48); allowed (B or 1, 1, 9, 9) True where a query sees a key."""
        q = attn.q_proj(x).view(2, 9, 6, 8).transpose(1, 2)  # (B, 6, T, hd)
        k = attn.k_proj(x).view(2, 9, 2, 8).transpose(1, 2).repeat_interleave(3, dim=1)  # (B, 6, T, hd)
        v = attn.v_proj(x).view(2, 9, 2, 8).transpose(1, 2).repeat_interleave(3, dim=1)
        scores = (q @ k.transpose(-2, -1) / math.sqrt(8)).masked_fill(~allowed, float("-inf"))  # (B, 6, T, T)
        return attn.out_proj((scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(2, 9, 48))

    causal = torch.ones(9, 9, dtype=torch.bool).tril()[None, None]
    padded = attention_mask(torch.tensor([[True] * 9, [False] * 3 + [True] * 6]), 0, 9)  # (2, 1, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, None, None, None), reference(causal), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(attn(x, None, padded, None), reference(padded), atol=1e-5, rtol=1e-5)
        cache = KVCache(config, 2, 9)
        cache.begin(8)
        attn(x[:, :8], None, None, cache)
        cache.begin(1)
        torch.testing.assert_close(attn(x[:, 8:], None, None, cache), reference(causal)[:, 8:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("style", [{}, LLAMA_STYLE])
def test_left_padding_mask_gives_same_logits_as_unpadded(style):
    model = model_for(small_config(**style))
    ids = torch.randint(0, 97, (1, 7))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[False] * 3 + [True] * 7])
    torch.testing.assert_close(model(padded, padding_mask=mask)[:, 3:], model(ids), atol=1e-5, rtol=1e-5)


def test_flops_per_token_counts_matmul_weights():
    config = small_config()
    model = GPT(config)
    d, ff, V, L, T = 48, 192, 97, 2, 32
    matmul = L * (4 * d * d + 2 * d * ff) + d * V
    assert model.flops_per_token() == 6 * matmul + 12 * L * T * d


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=1000, context_length=64, d_model=256, n_layer=8, n_head=4))
    expected = 0.02 / math.sqrt(2 * 8)
    assert abs(model.blocks[0].attn.out_proj.weight.std().item() - expected) < 0.1 * expected
    assert abs(model.blocks[0].attn.q_proj.weight.std().item() - 0.02) < 0.002
    assert model.lm_head.weight is model.tok_emb.weight


def test_sequence_longer_than_context_is_rejected():
    model = model_for(small_config())
    with pytest.raises(ValueError, match="context_length"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_rmsnorm_equals_torch_rms_norm():
    model = model_for(small_config(**LLAMA_STYLE))
    norm = model.blocks[0].attn_norm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 48) * 3
    torch.testing.assert_close(norm(x), F.rms_norm(x, (48,), norm.weight, eps=1e-5))
