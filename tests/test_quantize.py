"""Weight-only quantization (gpt/quantize): the formats against torch's own quantizers and kernels, the fast
path against the reference, whole models of both families, the folder every verb loads, and LoRA on a
quantized base against LoRA on the same weights held in float."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.__main__ import main as gpt_main
from gpt.checkpoint import save_checkpoint
from gpt.config import ModelConfig
from gpt.errors import ConfigError, UserError
from gpt.lora import apply_lora, merge_lora
from gpt.model import GPT
from gpt.quantize import (Int4Linear, Int8Linear, QuantizedLinear, QuantScheme, dequantize_model, is_quantized,
                          parse_scheme, quantize_model, weight_bytes)
from gpt.quantize import cpu_kernels, formats
from gpt.quantize.folder import load_quantized
from gpt.scripts import FinetuneTrainConfig
from gpt.weights import load_model_and_tokenizer

FAMILIES = {
    "gpt2": dict(),
    "llama": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2, tie_embeddings=False),
}


def small_model(family: str, seed: int = 0, vocab_size: int = 96) -> GPT:
    """Two blocks of width 64; vocab_size=50257 for the verbs, which load the GPT-2 tokenizer."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab_size, context_length=32, d_model=64, n_layer=2, n_head=4, d_ff=128,
                         **FAMILIES[family])
    model = GPT(config).eval()
    with torch.no_grad():  # weights of a trained model's size rather than the init's 0.02
        for param in model.parameters():
            param.normal_(0, 0.3) if param.dim() == 2 else param.uniform_(0.5, 1.5)
    return model


def ids(batch: int = 2, length: int = 12, vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- the formats


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")  # deprecated, still the reference
def test_int8_codes_are_torchs_per_channel_quantization():
    weight = torch.randn(40, 72) * torch.linspace(0.1, 3, 40)[:, None]
    q, scales = formats.quantize_int8(weight)
    reference = torch.quantize_per_channel(weight, scales.double(), torch.zeros(40, dtype=torch.long), 0,
                                           torch.qint8)
    assert torch.equal(q, reference.int_repr())
    assert torch.allclose(formats.dequantize_int8(q, scales), reference.dequantize(), atol=1e-6)
    assert q.abs().amax(dim=1).eq(127).all()  # each row's largest weight uses the full range


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", formats.INT4_GROUP_SIZES)
def test_int4_round_trip_error_is_at_most_half_a_step(group_size, symmetric):
    weight = torch.randn(16, 512) * 2
    codes, scales, zeros = formats.quantize_int4(weight, group_size, symmetric)
    assert codes.shape == (16, 256) and codes.dtype == torch.uint8
    assert scales.shape == zeros.shape == (16, 512 // group_size)
    error = (formats.dequantize_int4(codes, scales, zeros) - weight).reshape(16, -1, group_size).abs()
    assert (error <= scales[..., None] / 2 * (1 + 1e-5)).all()
    if not symmetric:  # each group's smallest weight is exactly a level (code 0)
        lowest = weight.reshape(16, -1, group_size).amin(-1)
        assert torch.allclose(zeros - 8 * scales, lowest, atol=1e-5)


def test_int4_nibble_order():
    q = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert formats.pack_int4(q).tolist() == [[1 | 2 << 4, 15]]
    assert torch.equal(formats.unpack_int4(formats.pack_int4(q)), q)


def test_int8_reference_product_equals_torchs_int8_kernel():
    layer = Int8Linear.from_linear(nn.Linear(96, 48))
    x = torch.randn(5, 96)
    expected = torch.ops.aten._weight_int8pack_mm(x, layer.qweight, layer.scales)
    assert torch.allclose(layer.reference_product(x), expected, atol=1e-4)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_reference_product_equals_torchs_int4_kernel(group_size):
    """torch's int4 CPU kernel reads (codes, scales, zeros) the way formats.py defines them."""
    layer = Int4Linear.from_linear(nn.Linear(256, 48, bias=False), group_size)
    x = torch.randn(3, 256)
    codes = formats.unpack_int4(layer.codes).to(torch.int32)  # (N, K)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    scales_and_zeros = torch.stack([layer.scales, layer.zeros], dim=-1).transpose(0, 1).contiguous()  # (K/G, N, 2)
    expected = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)
    assert torch.allclose(layer.reference_product(x), expected, atol=1e-4)


def test_parse_scheme():
    assert parse_scheme("int8") == QuantScheme("int8")
    assert parse_scheme("int4") == QuantScheme("int4", 32)
    assert parse_scheme("INT4:128") == QuantScheme("int4", 128)
    assert parse_scheme("int4:64:symmetric") == QuantScheme("int4", 64, symmetric=True)
    for bad in ("int2", "int4:48", "int4:", "int8:32", "fp8"):
        with pytest.raises(UserError, match="--quantize"):
            parse_scheme(bad)


# ----------------------------------------------------------------------------- the fast path


@pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels did not build here")
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("fmt", ["int8", "int4:32", "int4:128"])
def test_fast_path_equals_reference(fmt, rows):
    linear = nn.Linear(384, 80)
    layer = quantize_model_layer(linear, parse_scheme(fmt))
    x = torch.randn(rows, 384)
    with torch.no_grad():
        fast = layer(x)
        layer.use_fast_path = False
        reference = layer(x)
    assert torch.allclose(fast, reference, atol=1e-4, rtol=1e-5)


def test_the_fast_path_is_taken_on_this_machine():
    """CI's machine builds the kernels: without them the speed figures of BENCHMARKS.md do not hold."""
    assert cpu_kernels.available(), cpu_kernels.why_unavailable()


def quantize_model_layer(linear: nn.Linear, scheme: QuantScheme) -> QuantizedLinear:
    if scheme.format == "int8":
        return Int8Linear.from_linear(linear)
    return Int4Linear.from_linear(linear, scheme.group_size, scheme.symmetric)


# ----------------------------------------------------------------------------- whole models


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", ["int8", "int4:32"])
def test_quantized_model_computes_with_its_dequantized_weights(family, spec):
    """The quantized model (fast paths included) equals a float model holding the dequantized weights."""
    model, x = small_model(family), ids(batch=1, length=1)  # one token: the decoding shape, the fast path
    with torch.no_grad():
        quantize_model(model, parse_scheme(spec))
        quantized = model(x)
    replaced = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(replaced) == 2 * (7 if family == "llama" else 6) + 1  # every projection and the head
    assert isinstance(model.tok_emb, nn.Embedding)
    reference = dequantize_model(quantize_model(small_model(family), parse_scheme(spec)))  # same seed, same weights
    with torch.no_grad():
        assert torch.allclose(quantized, reference(x), atol=1e-4)


def test_int4_layers_take_the_largest_group_size_that_divides_their_inputs():
    model = quantize_model(small_model("gpt2"), parse_scheme("int4:256"))  # inputs: 64 (d_model), 128 (d_ff)
    assert model.blocks[0].attn.q_proj.group_size == 64 and model.blocks[0].mlp.down_proj.group_size == 128
    assert formats.layer_group_size(576, 128) == 64 and formats.layer_group_size(1536, 128) == 128
    with pytest.raises(ValueError, match="no int4 group size up to 256 divides the layer's 48 inputs"):
        formats.layer_group_size(48, 256)
    odd = GPT(ModelConfig(vocab_size=96, context_length=8, d_model=48, n_layer=1, n_head=4))
    with pytest.raises(UserError, match="int4 needs layers whose inputs are a multiple of 32"):
        quantize_model(odd, parse_scheme("int4"))
    assert not is_quantized(odd)  # checked before any layer was replaced


def test_weight_bytes_follow_the_formats():
    model = small_model("llama")
    projections = sum(m.weight.numel() for n, m in model.named_modules()
                      if isinstance(m, nn.Linear) and n != "lm_head")
    head, float_bytes = model.lm_head.weight.numel(), weight_bytes(model)
    quantize_model(model, parse_scheme("int8"))
    saved = (projections + head) * (4 - 1)  # 4 bytes each become 1 ...
    rows = sum(m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))
    assert weight_bytes(model) == float_bytes - saved + 4 * rows  # ... plus a float32 scale per row


# ----------------------------------------------------------------------------- the folder and the verbs


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_verb_writes_a_folder_every_verb_loads(family, tmp_path, capsys):
    save_checkpoint(tmp_path / "float.pt", small_model(family, vocab_size=50257), tokenizer="gpt2")
    out = tmp_path / "q4"
    assert gpt_main(["quantize", "--model", str(tmp_path / "float.pt"), "--to", "int4", "--group-size", "128",
                     "--out", str(out)]) == 0  # groups of 128 where the inputs (128) allow, else 64
    manifest = json.loads((out / "quantization.json").read_text())
    assert manifest["scheme"] == {"format": "int4", "group_size": 128, "symmetric": False}
    loaded, tokenizer = load_quantized(out)
    in_memory = quantize_model(small_model(family, vocab_size=50257), parse_scheme("int4:128"))
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x), in_memory(x))
    assert load_model_and_tokenizer(str(out)).tokenizer_name == "gpt2" == tokenizer
    capsys.readouterr()
    assert gpt_main(["generate", "--model", str(out), "--prompt", "ab", "--max-new-tokens", "3",
                     "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("ab")


def test_quantize_at_load_time_equals_the_saved_folder(tmp_path, capsys):
    save_checkpoint(tmp_path / "float.pt", small_model("llama", vocab_size=50257), tokenizer="gpt2")
    gpt_main(["quantize", "--model", str(tmp_path / "float.pt"), "--to", "int8", "--out", str(tmp_path / "q8")])
    outputs = []
    for model_args in (["--model", str(tmp_path / "q8")], ["--model", str(tmp_path / "float.pt"), "--quantize", "int8"]):
        capsys.readouterr()
        assert gpt_main(["generate", *model_args, "--prompt", "hello", "--max-new-tokens", "6",
                         "--temperature", "0"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]


def test_quantize_verb_refuses_bad_input_and_leaves_nothing(tmp_path):
    save_checkpoint(tmp_path / "float.pt", small_model("gpt2", vocab_size=50257), tokenizer="gpt2")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(UserError, match="not an empty folder"):
        gpt_main(["quantize", "--model", str(tmp_path / "float.pt"), "--to", "int8", "--out", str(tmp_path / "taken")])
    with pytest.raises(UserError, match="--group-size and --symmetric apply to --to int4 only"):
        gpt_main(["quantize", "--model", str(tmp_path / "float.pt"), "--to", "int8", "--group-size", "64",
                  "--out", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()
    with pytest.raises(UserError, match="--quantize"):
        gpt_main(["generate", "--model", str(tmp_path / "float.pt"), "--quantize", "int3", "--prompt", "a"])


def test_a_damaged_manifest_is_named(tmp_path):
    save_checkpoint(tmp_path / "float.pt", small_model("gpt2", vocab_size=50257), tokenizer="gpt2")
    gpt_main(["quantize", "--model", str(tmp_path / "float.pt"), "--to", "int8", "--out", str(tmp_path / "q")])
    (tmp_path / "q" / "quantization.json").write_text('{"format": "gpt-quantized", "version": 1}')
    with pytest.raises(UserError, match="quantization.json: missing key 'scheme'"):
        load_model_and_tokenizer(str(tmp_path / "q"))


# ----------------------------------------------------------------------------- LoRA on a quantized base


@pytest.mark.parametrize("spec", ["int8", "int4:32"])
def test_lora_on_a_quantized_base_trains_like_lora_on_its_float_weights(spec):
    """Same loss and same adapter gradients as LoRA on a float model holding the dequantized weights."""
    scheme = parse_scheme(spec)
    quantized = quantize_model(small_model("llama"), scheme, include_head=False)
    as_float = dequantize_model(quantize_model(small_model("llama"), scheme, include_head=False))
    x, targets = ids(), ids().roll(1, dims=1)
    grads = []
    for model in (quantized, as_float):
        torch.manual_seed(5)  # the same random A matrices
        apply_lora(model, rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("lora_B"):
                    param.normal_(0, 0.1)  # B = 0 would make every gradient of A zero
        model.train()
        loss = F.cross_entropy(model(x).flatten(0, 1), targets.flatten())
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 3 * 2
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4), name


def test_training_through_a_quantized_layer_keeps_no_float_weight():
    """The autograd graph saves the codes, never the (N, K) float weight (QLoRA's memory saving)."""
    layer = Int8Linear.from_linear(nn.Linear(256, 512))
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        x = torch.randn(4, 256, requires_grad=True)
        layer(x).sum().backward()
    assert not any(t.shape == (512, 256) and t.is_floating_point() for t in saved)
    expected = layer.dequantize().sum(dim=0).expand(4, -1)  # d(sum(x W^T))/dx = the column sums of W
    assert torch.allclose(x.grad, expected, atol=1e-5)


def test_merge_lora_on_a_quantized_base_gives_a_float_model():
    model = quantize_model(small_model("gpt2"), parse_scheme("int8"), include_head=False)
    apply_lora(model, rank=4, alpha=8.0, targets=("q_proj",))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0, 0.1)
        before = model(ids())
        merge_lora(model)
        dequantize_model(model)
        after = model(ids())
    assert not is_quantized(model)
    assert torch.allclose(before, after, atol=1e-4)
    GPT(model.config).load_state_dict(model.state_dict())  # an ordinary float model's keys


def test_train_quantize_needs_a_frozen_base():
    with pytest.raises(ConfigError, match="train.quantize int8: a quantized base is frozen"):
        FinetuneTrainConfig(trainable="all", quantize="int8")
    with pytest.raises(ConfigError, match="train.quantize"):
        FinetuneTrainConfig(trainable="lora", quantize="int5")
    assert FinetuneTrainConfig(trainable="lora", quantize="int4:64").quantize == "int4:64"


@pytest.mark.parametrize("spec", ["int8", "int4:32"])
def test_the_fused_loss_reads_a_quantized_head(spec):
    """model(x, targets) with a quantized head equals the cross-entropy of its logits, and trains through it."""
    model = quantize_model(small_model("gpt2"), parse_scheme(spec))
    assert model.config.loss_impl == "fused"
    x, targets = ids(), ids().roll(1, dims=1)
    with torch.no_grad():
        expected = F.cross_entropy(model(x).flatten(0, 1), targets.flatten())
    apply_lora(model, rank=2, alpha=4.0, targets=("q_proj",))
    loss = model(x, targets=targets)
    assert torch.allclose(loss, expected, atol=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
