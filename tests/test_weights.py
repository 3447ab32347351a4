"""Weights in and out: Hugging Face GPT-2 / Llama folders, GGUF files, our checkpoints, `python -m gpt convert`.

Every parity test builds a random-init `transformers` model locally (all weights
randomized, norms and biases included, so a mix-up cannot hide behind ones and
zeros), runs both models in float32 eval mode on the same ids and compares logits.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gpt.checkpoint import save_checkpoint
from gpt.config import ModelConfig
from gpt.errors import UserError
from gpt.model import GPT
from gpt.weights import convert_cli, load_pretrained, save_pretrained
from gpt.weights.gguf import unpermute_rotary_rows

import gguf  # noqa: E402  (the test extra installs these; a missing one should fail, not skip)
import safetensors.torch as safetensors_torch  # noqa: E402
import transformers  # noqa: E402

TIGHT = 1e-4  # float32 parity, the same computation in a different order
ATTN = "eager"


# ----------------------------------------------------------------------------- helpers


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.08) -> None:
    """Fill every parameter with noise, biases larger, norm gains around 1: logits reach a few units."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            is_norm_gain = ("norm" in name or ".ln_" in name) and name.endswith("weight")
            param.copy_(1.0 + noise if is_norm_gain else noise * (8 if param.dim() == 1 else 1))


def make_ids(vocab_size: int, batch: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def our_logits(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def hf_model(config) -> torch.nn.Module:
    """A randomized transformers model in eval mode (dropout off) with plain attention."""
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=ATTN)
    assert model.config._attn_implementation == ATTN
    randomize_(model)
    return model.eval()


def save_hf(model, folder, weights: str) -> None:
    """Save as model.safetensors, sharded safetensors with an index, or pytorch_model.bin."""
    if weights == "bin":
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    elif weights == "sharded":
        model.save_pretrained(folder, max_shard_size="40KB")
        assert (folder / "model.safetensors.index.json").is_file()
        assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    else:
        model.save_pretrained(folder)


def load_back(folder) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation=ATTN).eval()


# ----------------------------------------------------------------------------- Hugging Face -> gpt


GPT2_CASES = {
    "tied-safetensors": dict(n_embd=64, n_layer=2, n_head=4, n_positions=32, tie_word_embeddings=True),
    "untied-bin": dict(n_embd=48, n_layer=3, n_head=3, n_positions=24, n_inner=80, tie_word_embeddings=False,
                       layer_norm_epsilon=1e-6),
}  # fmt: skip
GPT2_WEIGHTS = {"tied-safetensors": "safetensors", "untied-bin": "bin"}


@pytest.mark.parametrize("case", GPT2_CASES)
def test_hf_gpt2_loads_with_same_logits_and_exports_back(case, tmp_path):
    hf_config = transformers.GPT2Config(vocab_size=101, bos_token_id=0, eos_token_id=0, **GPT2_CASES[case])
    reference = hf_model(hf_config)
    save_hf(reference, tmp_path / "hf", GPT2_WEIGHTS[case])
    ids = make_ids(101)
    expected = hf_logits(reference, ids)
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero numbers

    ours = load_pretrained(tmp_path / "hf")
    assert ours.config.tie_embeddings == hf_config.tie_word_embeddings
    assert ours.config.d_ff == (hf_config.n_inner or 4 * hf_config.n_embd)
    assert max_diff(our_logits(ours, ids), expected) < TIGHT

    save_pretrained(ours, tmp_path / "back")
    assert max_diff(hf_logits(load_back(tmp_path / "back"), ids), expected) < TIGHT


LLAMA_CASES = {
    "mha-tied-safetensors": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96,
                                 rope_theta=10000.0, tie_word_embeddings=True),
    "gqa-untied-attnbias-sharded": dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                                        intermediate_size=128, rope_theta=500000.0, tie_word_embeddings=False,
                                        attention_bias=True),
    "gqa-tied-allbias-bin": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, intermediate_size=160,
                                 rope_theta=1000.0, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                                 rms_norm_eps=1e-5),
    "mqa-untied-mlpbias-safetensors": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=1,
                                           intermediate_size=64, rope_theta=50000.0, tie_word_embeddings=False,
                                           mlp_bias=True),
}  # fmt: skip


@pytest.mark.parametrize("case", LLAMA_CASES)
def test_hf_llama_loads_with_same_logits_and_exports_back(case, tmp_path):
    hf_config = transformers.LlamaConfig(vocab_size=97, num_hidden_layers=2, max_position_embeddings=64,
                                         bos_token_id=1, eos_token_id=2, **LLAMA_CASES[case])  # fmt: skip
    reference = hf_model(hf_config)
    save_hf(reference, tmp_path / "hf", case.rsplit("-", 1)[1])
    ids = make_ids(97)
    expected = hf_logits(reference, ids)
    assert expected.abs().max() > 1.0

    ours = load_pretrained(tmp_path / "hf")
    cfg = ours.config
    assert (cfg.n_head, cfg.n_kv_head, cfg.rope_theta) == (
        hf_config.num_attention_heads, hf_config.num_key_value_heads, LLAMA_CASES[case]["rope_theta"]
    )
    assert max_diff(our_logits(ours, ids), expected) < TIGHT

    # Exported with one `bias` switch: a model with biases in only one part gets zeros in the other.
    save_pretrained(ours, tmp_path / "back")
    assert max_diff(hf_logits(load_back(tmp_path / "back"), ids), expected) < TIGHT


# ----------------------------------------------------------------------------- gpt -> Hugging Face


OUR_EXPORT_CASES = {
    "gpt2-tied": dict(),
    "gpt2-untied-nobias": dict(tie_embeddings=False, bias=False, d_ff=72),  # written with zero biases
    "llama-gqa-tied": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2, rope_theta=2e4),
    "llama-untied-bias": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=True, tie_embeddings=False),
}


@pytest.mark.parametrize("case", OUR_EXPORT_CASES)
def test_our_model_exports_to_transformers_with_same_logits(case, tmp_path):
    config = ModelConfig(vocab_size=89, context_length=32, d_model=48, n_layer=2, n_head=4, **OUR_EXPORT_CASES[case])
    ours = GPT(config).eval()
    randomize_(ours, seed=3)
    ids = make_ids(89)
    expected = our_logits(ours, ids)
    assert expected.abs().max() > 1.0

    save_pretrained(ours, tmp_path / "out")
    hf_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf_config["architectures"] == ["GPT2LMHeadModel" if case.startswith("gpt2") else "LlamaForCausalLM"]
    assert max_diff(hf_logits(load_back(tmp_path / "out"), ids), expected) < TIGHT
    assert max_diff(our_logits(load_pretrained(tmp_path / "out"), ids), expected) < TIGHT


def test_export_in_bfloat16_stores_bfloat16(tmp_path):
    ours = GPT(ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layer=1, n_head=2)).eval()
    save_pretrained(ours, tmp_path, dtype="bfloat16")
    with safetensors_torch.safe_open(tmp_path / "model.safetensors", "pt") as f:
        dtypes = {f.get_tensor(key).dtype for key in f.keys()}
    assert dtypes == {torch.bfloat16}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = load_pretrained(tmp_path)
    assert torch.equal(reloaded.tok_emb.weight, ours.tok_emb.weight.to(torch.bfloat16).float())


@pytest.mark.parametrize(
    "fields, named",
    [
        (dict(pos_emb="rope"), "pos_emb=rope"),
        (dict(norm="rmsnorm", mlp="swiglu"), "pos_emb=learned"),
        (dict(n_kv_head=2), "n_kv_head"),
    ],
)
def test_export_without_transformers_equivalent_names_the_fields(fields, named, tmp_path):
    ours = GPT(ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layer=1, n_head=4, **fields))
    with pytest.raises(UserError, match=named):
        save_pretrained(ours, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_failed_export_leaves_no_half_written_weights(tmp_path, monkeypatch):
    ours = GPT(ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layer=1, n_head=2)).eval()
    save_pretrained(ours, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def write_half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_torch, "save_file", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(GPT(ours.config), tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before  # the previous export is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp left


# ----------------------------------------------------------------------------- GGUF


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """The row order llama.cpp's converter gives Q and K: per head, rows (half, i) -> (i, half)."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape
    )


GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}  # fmt: skip


def write_gguf(path, reference, quant, tokens=None, token_types=None, merges=None, eos_id=None, extra=None) -> None:
    """A llama GGUF file of `reference` (a HF LlamaForCausalLM) as llama.cpp's converter lays it out.

    2-D weights are stored as `quant` (F32 or Q8_0), norms as F32; Q and K rows are permuted;
    a tied model has no output.weight.
    """
    c = reference.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens or [f"t{i}" for i in range(c.vocab_size)])
    if token_types is not None:
        writer.add_token_types(token_types)
    if merges is not None:
        writer.add_token_merges(merges)
    if eos_id is not None:
        writer.add_eos_token_id(eos_id)
    for key, value in (extra or {}).items():
        writer.add_string(key, value)
    qtype = getattr(gguf.GGMLQuantizationType, quant)
    for name, tensor in reference.state_dict().items():
        array = tensor.numpy()
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            if c.tie_word_embeddings:
                continue
            gguf_name = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            module, leaf = rest.rsplit(".", 1)
            gguf_name = f"blk.{layer}.{GGUF_NAMES[module]}.{leaf}"
            if module == "self_attn.q_proj":
                array = llama_cpp_permute(array, c.num_attention_heads)
            elif module == "self_attn.k_proj":
                array = llama_cpp_permute(array, c.num_key_value_heads)
        if array.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def small_hf_llama(tie: bool, vocab_size: int = 96):
    """Widths that are multiples of 32, as Q8_0 blocks need."""
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=20000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    return hf_model(config)


# Max |logit difference| against the float model, measured with these shapes (logits up to 2.4-2.9) over
# seeds 0-2, tied and untied: F16 1.3e-3 to 2.5e-3, Q8_0 0.043 to 0.056, Q4_1 0.70 to 0.84 (4-bit
# random Gaussian weights). Against the same model holding the dequantized weights: at most 1.7e-6.
GGUF_TOLERANCES = {"F32": TIGHT, "F16": 4e-3, "Q8_0": 0.075, "Q4_1": 1.2}


def quantize_weights_(model, qtype) -> None:
    """Round-trip every matrix of `model` through the GGUF quantization `qtype` in place."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                packed = gguf.quants.quantize(param.numpy(), qtype)
                param.copy_(torch.from_numpy(gguf.quants.dequantize(packed, qtype)))


@pytest.mark.parametrize("quant, tie", [("F32", True), ("F16", False), ("Q8_0", False), ("Q4_1", True)])
def test_gguf_loads_with_logits_of_the_hf_model(quant, tie, tmp_path):
    reference = small_hf_llama(tie)
    write_gguf(tmp_path / "model.gguf", reference, quant)
    ids = make_ids(96)
    expected = hf_logits(reference, ids)
    assert expected.abs().max() > 1.0

    ours = load_pretrained(tmp_path / "model.gguf")
    assert ours.config.tie_embeddings == tie
    assert (ours.config.n_kv_head, ours.config.rope_theta, ours.config.vocab_size) == (2, 20000.0, 96)
    logits = our_logits(ours, ids)
    difference = max_diff(logits, expected)
    assert difference < GGUF_TOLERANCES[quant], f"{quant}: max |diff| {difference:.2e}"
    if quant != "F32":
        assert difference > 1e-4  # the weights really were quantized ...
        quantize_weights_(reference, getattr(gguf.GGMLQuantizationType, quant))
        assert max_diff(logits, hf_logits(reference, ids)) < TIGHT  # ... and nothing else differs


def test_unpermute_inverts_llama_cpp_row_order():
    weight = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    permuted = torch.from_numpy(llama_cpp_permute(weight, n_heads=3))
    assert not torch.equal(permuted, torch.from_numpy(weight))
    assert torch.equal(unpermute_rotary_rows(permuted, n_heads=3), torch.from_numpy(weight))


def test_gguf_unsupported_settings_name_the_key(tmp_path):
    reference = small_hf_llama(tie=True)
    write_gguf(tmp_path / "scaled.gguf", reference, "F32", extra={"llama.rope.scaling.type": "linear"})
    with pytest.raises(UserError, match=r"llama\.rope\.scaling\.type = 'linear'"):
        load_pretrained(tmp_path / "scaled.gguf")

    writer = gguf.GGUFWriter(tmp_path / "q8_1.gguf", "llama")
    for add, value in ((writer.add_block_count, 1), (writer.add_context_length, 8), (writer.add_embedding_length, 64),
                       (writer.add_feed_forward_length, 64), (writer.add_head_count, 2),
                       (writer.add_layer_norm_rms_eps, 1e-5)):  # fmt: skip
        add(value)
    writer.add_token_list([f"t{i}" for i in range(4)])
    q8_1 = gguf.GGMLQuantizationType.Q8_1  # a type the gguf package cannot dequantize
    values_per_block, bytes_per_block = gguf.GGML_QUANT_SIZES[q8_1]
    packed_row = np.zeros((4, 64 // values_per_block * bytes_per_block), dtype=np.uint8)
    writer.add_tensor("token_embd.weight", packed_row, raw_dtype=q8_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="token_embd.weight is stored as Q8_1"):
        load_pretrained(tmp_path / "q8_1.gguf")


def test_missing_gguf_package_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + bytes(20))
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)
    with pytest.raises(UserError, match=r"pip install 'gpt\[gguf\]'"):
        load_pretrained(tmp_path / "model.gguf")


# ----------------------------------------------------------------------------- our checkpoints


def test_our_checkpoint_and_run_folder_load(tmp_path):
    model = GPT(ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layer=2, n_head=2)).eval()
    randomize_(model)
    save_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", model)
    ids = make_ids(64)
    for source in (tmp_path / "run", tmp_path / "run" / "checkpoints" / "best.pt"):
        assert torch.equal(our_logits(load_pretrained(source), ids), our_logits(model, ids))


# ----------------------------------------------------------------------------- bad input


def test_folder_without_config_json(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_pretrained(tmp_path)


@pytest.fixture
def small_llama_folder(tmp_path):
    reference = hf_model(transformers.LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        bos_token_id=None, eos_token_id=None,
    ))  # fmt: skip
    reference.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def edit_config(folder, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_unknown_model_type(small_llama_folder):
    edit_config(small_llama_folder, model_type="bert")
    with pytest.raises(UserError, match="model_type 'bert' is not supported"):
        load_pretrained(small_llama_folder)


def test_rope_scaling_is_refused(small_llama_folder):
    edit_config(small_llama_folder, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(UserError, match=r"rope_parameters\.rope_type = \"linear\""):
        load_pretrained(small_llama_folder)


def test_missing_config_key(small_llama_folder):
    path = small_llama_folder / "config.json"
    hf_config = json.loads(path.read_text())
    del hf_config["hidden_size"]
    path.write_text(json.dumps(hf_config))
    with pytest.raises(UserError, match="'hidden_size' is missing"):
        load_pretrained(small_llama_folder)


def test_tensor_of_wrong_shape_is_named(small_llama_folder):
    weights_path = small_llama_folder / "model.safetensors"
    tensors = safetensors_torch.load_file(weights_path)
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:40]
    safetensors_torch.save_file(tensors, weights_path, metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"model\.layers\.0\.mlp\.up_proj\.weight has shape \(40, 32\).*\(48, 32\)"):
        load_pretrained(small_llama_folder)


def test_missing_tensor_is_named(small_llama_folder):
    weights_path = small_llama_folder / "model.safetensors"
    tensors = safetensors_torch.load_file(weights_path)
    del tensors["model.norm.weight"]
    safetensors_torch.save_file(tensors, weights_path, metadata={"format": "pt"})
    with pytest.raises(UserError, match="missing for final_norm.weight"):
        load_pretrained(small_llama_folder)


def test_unknown_tensor_is_named(small_llama_folder):
    weights_path = small_llama_folder / "model.safetensors"
    tensors = safetensors_torch.load_file(weights_path)
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    safetensors_torch.save_file(tensors, weights_path, metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"model\.layers\.0\.self_attn\.q_norm\.weight is not part"):
        load_pretrained(small_llama_folder)


# ----------------------------------------------------------------------------- python -m gpt convert


def test_convert_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert_cli(["--help"])
    assert exit_info.value.code == 0
    assert "--dtype" in capsys.readouterr().out


def test_convert_checkpoint_writes_model_and_gpt2_tokenizer(tmp_path):
    from gpt.tokenizer import get_tokenizer

    model = GPT(ModelConfig(vocab_size=50257, context_length=16, d_model=32, n_layer=1, n_head=2)).eval()
    randomize_(model)
    save_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt", model, tokenizer="gpt2")
    assert convert_cli([str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0

    ids = make_ids(50257)
    assert max_diff(hf_logits(load_back(tmp_path / "hf"), ids), our_logits(model, ids)) < TIGHT
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Hello, world! Tokenizers  split   spaces,\tdigits 12345 and café ünïcödé 🙂.<|endoftext|>"
    assert hf_tokenizer.encode(text) == get_tokenizer("gpt2").encode(text, allowed_special="all")


def test_convert_gguf_writes_model_and_its_tokenizer(tmp_path):
    from gpt.tokenizer import get_tokenizer
    from gpt.weights.tokenizer_files import char_of_byte

    # A small byte-level BPE vocabulary: the 256 byte characters, a few merges, one control token.
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "Ġa n", "Ġan d", "e r"]
    tokens = [*char_of_byte(), *("".join(m.split()) for m in merges), "<|end|>"]
    reference = small_hf_llama(tie=True, vocab_size=len(tokens))
    token_types = [1] * (len(tokens) - 1) + [3]  # 1 normal, 3 control
    write_gguf(tmp_path / "model.gguf", reference, "F32", tokens=tokens, token_types=token_types, merges=merges,
               eos_id=len(tokens) - 1)

    assert convert_cli([str(tmp_path / "model.gguf"), "--out", str(tmp_path / "hf")]) == 0
    ids = make_ids(len(tokens))
    assert max_diff(hf_logits(load_back(tmp_path / "hf"), ids), hf_logits(reference, ids)) < TIGHT
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = get_tokenizer(str(tmp_path / "model.gguf"))
    text = "the cat and the hen, in there<|end|> and then"
    assert hf_tokenizer.encode(text) == ours.encode(text, allowed_special="all")
    assert ours.encode(" the and") == [tokens.index("Ġthe"), tokens.index("Ġand")]  # the merges really apply



def test_convert_hf_folder_copies_tokenizer_files_and_casts(small_llama_folder, tmp_path):
    (small_llama_folder / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    out = tmp_path / "bf16"
    assert convert_cli([str(small_llama_folder), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert (out / "tokenizer_config.json").read_text() == '{"tokenizer_class": "PreTrainedTokenizerFast"}'
    with safetensors_torch.safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    ids = make_ids(32)
    reference = load_back(small_llama_folder)
    converted = load_back(out)
    assert converted.dtype == torch.bfloat16
    # bfloat16 weights, float32 compute: measured max |diff| 0.008 (logits up to 1.5)
    assert max_diff(hf_logits(converted.float(), ids), hf_logits(reference, ids)) < 0.03

    with pytest.raises(UserError, match="is the source folder"):
        convert_cli([str(small_llama_folder), "--out", str(small_llama_folder)])
