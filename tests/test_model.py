"""The transformer: shapes, parameter counts, causality, attention paths, GQA, RoPE, KV cache."""

import math

import pytest
import torch
import torch.nn.functional as F

from gpt.config import ModelConfig
from gpt.model import GPT, Linear, apply_rope, linear_cross_entropy, rope_tables

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


@pytest.mark.parametrize("tie", [True, False])
def test_fused_loss_equals_cross_entropy_of_logits_with_gradients(tie):
    model = model_for(small_config(tie_embeddings=tie)).train()
    ids, targets = torch.randint(0, 97, (3, 20)), torch.randint(0, 97, (3, 20))
    targets[0, :7] = -100  # ignored positions (e.g. a masked prompt)
    reference = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten(), ignore_index=-100)
    reference.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    fused = model(ids, targets=targets)
    fused.backward()
    torch.testing.assert_close(fused, reference, atol=1e-6, rtol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_linear_cross_entropy_in_chunks_and_blocks_equals_cross_entropy(precision):
    """Several matmul chunks and softmax blocks, both with a short last piece, and ignored rows."""
    torch.manual_seed(0)
    hidden = torch.randn(61, 24, requires_grad=True)
    weight = torch.randn(97, 24, requires_grad=True)
    targets = torch.randint(0, 97, (61,))
    targets[::5] = -100
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast:
        reference = F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=-100)
    expected = torch.autograd.grad(reference, (hidden, weight))
    with autocast:
        fused = linear_cross_entropy(hidden, weight, targets, chunk_rows=16, block_rows=5)
    got = torch.autograd.grad(fused, (hidden, weight))
    tolerance = dict(atol=1e-6, rtol=1e-5) if precision == "fp32" else dict(atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(fused, reference, **tolerance)
    for name, g, e in zip(("hidden", "weight"), got, expected):
        torch.testing.assert_close(g, e, **tolerance, msg=name)


def test_linear_cross_entropy_reuses_its_buffers_across_sizes_and_dtypes():
    """The CPU workspace grows and shrinks with the call: results match a fresh reference every time."""
    torch.manual_seed(1)
    weight = torch.randn(53, 16, requires_grad=True)
    for rows, precision in [(40, "fp32"), (7, "bf16"), (90, "bf16"), (3, "fp32"), (90, "fp32")]:
        hidden = torch.randn(rows, 16, requires_grad=True)
        targets = torch.randint(0, 53, (rows,))
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        with autocast:
            reference = F.cross_entropy((hidden @ weight.T).float(), targets)
            fused = linear_cross_entropy(hidden, weight, targets, chunk_rows=32, block_rows=6)
        tolerance = dict(atol=1e-6, rtol=1e-5) if precision == "fp32" else dict(atol=2e-3, rtol=2e-2)
        torch.testing.assert_close(fused, reference, **tolerance)
        expected = torch.autograd.grad(reference, (hidden, weight))
        got = torch.autograd.grad(fused, (hidden, weight))
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, **tolerance)


def test_linear_cross_entropy_backward_twice_is_an_error():
    """Backward scales the kept gradients in place, so a second pass would silently double-scale them."""
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.randint(0, 11, (5,)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


@pytest.mark.parametrize("bias", [True, False])
def test_linear_one_row_without_grad_equals_nn_linear(bias):
    """A decoding step's one-row product takes the row-blocked path; it must equal F.linear, bias included."""
    torch.manual_seed(0)
    layer = Linear(32, 101, bias=bias)
    x = torch.randn(1, 1, 32)
    expected = F.linear(x, layer.weight, layer.bias)
    with torch.no_grad():
        out = layer(x)
    assert out.shape == (1, 1, 101)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out_with_grad = layer(x)  # autograd on: nn.Linear's own path, gradients flow
    out_with_grad.sum().backward()
    assert layer.weight.grad is not None
