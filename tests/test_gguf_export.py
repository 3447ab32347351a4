"""GGUF export (`python -m gpt convert M --to gguf`): checked against references that are not our exporter.

For both families (GPT-2 -> GGUF `gpt2`, Llama -> `llama`) and every --type, a small random
model (all weights randomized, norms and biases included) is exported, and:

* our loader reads it back: logits equal the model's for f32, and for f16/q8_0/q4_0 equal
  those of the model whose weights went through the `gguf` package's own quantize and
  dequantize (an independent implementation of the block formats);
* the `gguf` package's `GGUFReader` finds every expected key and tensor, with the shape and
  storage type llama.cpp's convention gives (written out here, not taken from the exporter);
* transformers' `from_pretrained(folder, gguf_file=...)` gives the same logits;
* the Ollama Modelfile matches one written by hand, and its template renders conversations
  as the Jinja chat template does;
* bad input fails with a UserError naming the value and leaves no file behind.

`@pytest.mark.llama_cpp` tests run the exported files in llama.cpp itself (llama-cpp-python,
built from source; excluded by default, run with `-m llama_cpp`).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt.checkpoint import save_checkpoint
from gpt.config import ModelConfig
from gpt.errors import UserError
from gpt.model import GPT
from gpt.tokenizer import get_tokenizer
from gpt.weights import convert_cli, load_model_and_tokenizer, load_pretrained
from gpt.weights.gguf_export import gguf_tokenizer_metadata, gpt2_tokenizer_metadata, write_gguf
from gpt.weights.tokenizer_files import char_of_byte
from tests.test_weights import make_ids, randomize_

import gguf  # noqa: E402  (the test extra installs these; a missing one should fail, not skip)
import jinja2  # noqa: E402
import transformers  # noqa: E402

TYPES = ("f32", "f16", "q8_0", "q4_0")
GGML = gguf.GGMLQuantizationType

# SmolLM2's chat template: ChatML with a default system message.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA2_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] "
                   "+ ' [/INST]' }}{% else %}{{ message['content'] }}{% endif %}{% endfor %}")  # fmt: skip

# A byte-level BPE vocabulary: the 256 byte characters, a few merges, three special tokens.
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "Ġa n", "Ġan d", "e r"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SMALL_TOKENS = [*char_of_byte(), *("".join(m.split()) for m in MERGES), *SPECIALS]
SMALL_VOCAB = len(SMALL_TOKENS) + 5  # five embedding rows beyond the tokenizer: exported as [PAD{id}] tokens
PRE_TOKENIZER = {"gpt2": "gpt-2", "llama": "smollm"}


def gpt2_model(vocab_size: int = SMALL_VOCAB, **overrides) -> GPT:
    """GPT-2 family. transformers reads neither the context length nor d_ff of a gpt2 GGUF file into its config
    (it sets n_ctx, not n_positions, and ignores feed_forward_length), so these are GPT-2's 1024 and 4 * d_model."""
    fields = dict(vocab_size=vocab_size, context_length=1024, d_model=64, n_layer=2, n_head=4, d_ff=256, **overrides)
    model = GPT(ModelConfig(**fields)).eval()
    randomize_(model, seed=3)
    return model


def llama_model(**overrides) -> GPT:
    """Llama family with grouped-query attention, untied head, widths in whole 32-value blocks."""
    fields = dict(vocab_size=SMALL_VOCAB, context_length=32, d_model=64, n_layer=2, n_head=4, n_kv_head=2, d_ff=128,
                  norm="rmsnorm", pos_emb="rope", rope_theta=20000.0, mlp="swiglu", bias=False, tie_embeddings=False)
    model = GPT(ModelConfig(**{**fields, **overrides})).eval()
    randomize_(model, seed=4)
    return model


def write_tokenizer_gguf(path: Path, pre: str = "smollm") -> Path:
    """A GGUF file holding only a tokenizer (split by `pre`): the tokenizer a checkpoint names."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(SMALL_TOKENS)
    writer.add_token_types([1] * (len(SMALL_TOKENS) - len(SPECIALS)) + [3] * len(SPECIALS))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(SMALL_TOKENS.index("<|im_start|>"))
    writer.add_eos_token_id(SMALL_TOKENS.index("<|im_end|>"))
    writer.add_pad_token_id(SMALL_TOKENS.index("<|endoftext|>"))
    writer.add_chat_template(CHATML_TEMPLATE)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# llama.cpp's convention, written out independently of the exporter: 1-D tensors and position_embd stay F32;
# the other 2-D weights take the file's type, but under q4_0 the LM head (output, or token_embd when tied)
# is kept at Q8_0 (llama-quantize uses Q6_K there, which the gguf package cannot write).
def expected_type(gguf_name: str, ndim: int, gguf_type: str, tied: bool) -> GGML:
    if ndim == 1 or gguf_name == "position_embd.weight":
        return GGML.F32
    if gguf_type == "q4_0" and (gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")):
        return GGML.Q8_0
    return getattr(GGML, gguf_type.upper())


def quantized_reference(model: GPT, gguf_type: str) -> GPT:
    """A copy of `model` whose weights went through the gguf package's quantize + dequantize, per that convention.

    Quantization blocks run along a weight's rows, so the row reorderings of the export (Q/K permutation, the
    fused qkv of gpt2) do not change which values share a block.
    """
    reference = GPT(model.config).eval()
    reference.load_state_dict(model.state_dict())
    head_of = {"tok_emb.weight": "token_embd.weight", "lm_head.weight": "output.weight", "pos_emb.weight":
               "position_embd.weight"}  # fmt: skip
    with torch.no_grad():
        for name, param in reference.named_parameters():
            qtype = expected_type(head_of.get(name, name), param.dim(), gguf_type, model.config.tie_embeddings)
            packed = gguf.quants.quantize(param.numpy(), qtype)
            param.copy_(torch.from_numpy(gguf.quants.dequantize(packed, qtype).reshape(param.shape)))
    return reference


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[tuple[str, str], tuple[GPT, Path]]:
    """(family, type) -> (the model, its GGUF file), each in a folder of its own (transformers wants a folder).

    Both carry the small tokenizer (GPT-2's 50257 tokens and 50000 merges take the gguf package's reader
    seconds to parse per open: the GPT-2 tokenizer has a test of its own)."""
    root = tmp_path_factory.mktemp("gguf")
    files = {}
    for family, model in (("gpt2", gpt2_model()), ("llama", llama_model())):
        tokenizer_gguf = write_tokenizer_gguf(root / f"tokenizer-{family}.gguf", PRE_TOKENIZER[family])
        tokenizer = gguf_tokenizer_metadata(tokenizer_gguf, SMALL_VOCAB)
        for gguf_type in TYPES:
            path = root / f"{family}-{gguf_type}" / "model.gguf"
            write_gguf(model, path, gguf_type, tokenizer, name=f"test-{family}")
            files[family, gguf_type] = (model, path)
    return files


# ----------------------------------------------------------------------------- (a) our loader reads it back

# Against the quantize-dequantized reference the weights are identical, so only float32 summation order differs
# (as for f32: 1e-5 on logits of a few units). Against the float model the error is the type's: a weight moves by
# up to half a step of its grid, relative to its block's largest value h = 2^-11 for f16, 1/254 for q8_0
# (127 levels a side), 1/16 for q4_0 (8 levels a side). Random-sign errors in a dot product grow like the
# product itself, so each matmul adds a relative error of about (block max / std) * h / sqrt(3) ~ 1.3 h; about
# ten matmuls in a row (two layers and the head) and the largest of 2 * 16 * V logits against max |logit| give a
# few to ten times h * max |logit|. Measured over both families and all three types: 0.5 to 7.6 times; the
# bound is 16 times. The lower bound shows the weights really were rounded.
HALF_STEP = {"f32": 0.0, "f16": 2.0**-11, "q8_0": 1 / 254, "q4_0": 1 / 16}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("gguf_type", TYPES)
def test_our_loader_reads_the_export_back(exported, family, gguf_type):
    model, path = exported[family, gguf_type]
    loaded = load_pretrained(path)
    assert loaded.config == model.config
    ids = make_ids(model.config.vocab_size)
    expected = logits(model, ids)
    got = logits(loaded, ids)
    if gguf_type == "f32":
        assert max_diff(got, expected) < 1e-5
        return
    assert max_diff(got, logits(quantized_reference(model, gguf_type), ids)) < 1e-5
    difference = max_diff(got, expected)
    assert 1e-6 < difference < 16 * HALF_STEP[gguf_type] * expected.abs().max().item(), f"{difference:.2e}"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_export_carries_the_source_tokenizer(exported, family):
    _, path = exported[family, "f32"]
    tokenizer = load_model_and_tokenizer(str(path)).tokenizer
    assert tokenizer.chat_template == CHATML_TEMPLATE
    assert tokenizer.encode(" the and") == [SMALL_TOKENS.index("Ġthe"), SMALL_TOKENS.index("Ġand")]
    assert tokenizer.eot_id == SMALL_TOKENS.index("<|im_end|>")


# ----------------------------------------------------------------------------- (b) the gguf package's reader


def expected_tensors(family: str, config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> torch-order shape, as llama.cpp's loader asks for them."""
    D, F, V, kv = config.d_model, config.d_ff, config.vocab_size, config.n_kv_head * config.head_dim
    if family == "gpt2":
        top = {"token_embd.weight": (V, D), "position_embd.weight": (config.context_length, D),
               "output_norm.weight": (D,), "output_norm.bias": (D,)}
        layer = {"attn_norm.weight": (D,), "attn_norm.bias": (D,), "attn_qkv.weight": (3 * D, D),
                 "attn_qkv.bias": (3 * D,), "attn_output.weight": (D, D), "attn_output.bias": (D,),
                 "ffn_norm.weight": (D,), "ffn_norm.bias": (D,), "ffn_up.weight": (F, D), "ffn_up.bias": (F,),
                 "ffn_down.weight": (D, F), "ffn_down.bias": (D,)}
    else:
        top = {"token_embd.weight": (V, D), "output_norm.weight": (D,)}
        layer = {"attn_norm.weight": (D,), "attn_q.weight": (D, D), "attn_k.weight": (kv, D),
                 "attn_v.weight": (kv, D), "attn_output.weight": (D, D), "ffn_norm.weight": (D,),
                 "ffn_gate.weight": (F, D), "ffn_up.weight": (F, D), "ffn_down.weight": (D, F)}
    if not config.tie_embeddings:
        top["output.weight"] = (V, D)
    return {**top, **{f"blk.{i}.{name}": shape for i in range(config.n_layer) for name, shape in layer.items()}}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("gguf_type", TYPES)
def test_gguf_reader_sees_every_key_and_tensor(exported, family, gguf_type):
    model, path = exported[family, gguf_type]
    config = model.config
    reader = gguf.GGUFReader(path)

    def value(key):
        assert key in reader.fields, f"{key} missing"
        return reader.fields[key].contents()

    assert value("general.architecture") == family
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[gguf_type]
    assert value("general.file_type") == file_type
    hyper = {"context_length": config.context_length, "embedding_length": config.d_model,
             "block_count": config.n_layer, "feed_forward_length": config.d_ff, "attention.head_count": config.n_head}
    if family == "gpt2":
        hyper["attention.layer_norm_epsilon"] = pytest.approx(config.norm_eps)
    else:
        hyper.update({"attention.head_count_kv": config.n_kv_head, "rope.dimension_count": config.head_dim,
                      "rope.freq_base": config.rope_theta, "attention.layer_norm_rms_epsilon": pytest.approx(1e-5)})
    assert {key: value(f"{family}.{key}") for key in hyper} == hyper

    tokens = value("tokenizer.ggml.tokens")
    assert len(tokens) == config.vocab_size == len(value("tokenizer.ggml.token_type"))
    assert value("tokenizer.ggml.model") == "gpt2"
    assert value("tokenizer.ggml.pre") == PRE_TOKENIZER[family]
    assert value("tokenizer.ggml.merges") == MERGES
    assert value("tokenizer.chat_template") == CHATML_TEMPLATE
    assert value("tokenizer.ggml.bos_token_id") == SMALL_TOKENS.index("<|im_start|>")
    assert value("tokenizer.ggml.eos_token_id") == SMALL_TOKENS.index("<|im_end|>")
    assert value("tokenizer.ggml.padding_token_id") == SMALL_TOKENS.index("<|endoftext|>")
    assert tokens[-5:] == [f"[PAD{i}]" for i in range(len(SMALL_TOKENS), SMALL_VOCAB)]
    assert value("tokenizer.ggml.token_type")[-5:] == [5] * 5  # unused

    stored = {t.name: t for t in reader.tensors}
    expected = expected_tensors(family, config)
    assert set(stored) == set(expected)
    for name, shape in expected.items():
        assert tuple(int(n) for n in reversed(stored[name].shape)) == shape, name  # GGUF lists dims innermost first
        assert stored[name].tensor_type == expected_type(name, len(shape), gguf_type, config.tie_embeddings), name


def test_llama_q_and_k_rows_are_in_llama_cpp_order(exported):
    """Row 2i + half of a head in the file is row i + half * head_dim/2 of ours (llama.cpp rotates adjacent pairs)."""
    model, path = exported["llama", "f32"]
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    attn = model.blocks[0].attn
    for name, ours, heads in (("attn_q", attn.q_proj.weight, 4), ("attn_k", attn.k_proj.weight, 2)):
        rows = np.asarray(stored[f"blk.0.{name}.weight"].data).reshape(ours.shape)
        head_dim = ours.shape[0] // heads
        for head in range(heads):
            for i in range(head_dim // 2):
                for half in range(2):
                    np.testing.assert_array_equal(rows[head * head_dim + 2 * i + half],
                                                  ours[head * head_dim + i + half * head_dim // 2].detach().numpy())


# ----------------------------------------------------------------------------- (c) transformers reads it


@pytest.mark.parametrize("family, gguf_type", [("gpt2", "f32"), ("gpt2", "q8_0"), ("llama", "f32"), ("llama", "q4_0")])
def test_transformers_reads_the_export_with_the_same_logits(exported, family, gguf_type):
    model, path = exported[family, gguf_type]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           attn_implementation="eager")
    ids = make_ids(model.config.vocab_size)
    reference = model if gguf_type == "f32" else quantized_reference(model, gguf_type)  # transformers dequantizes
    assert max_diff(logits(hf.eval(), ids), logits(reference, ids)) < 1e-4


# ----------------------------------------------------------------------------- (d) the Ollama Modelfile

MODELFILE_BY_HAND = '''FROM ./smol.q8_0.gguf

SYSTEM """You are a helpful assistant."""

TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""

PARAMETER stop "<|im_end|>"
PARAMETER temperature 0.3
'''


def render_go_messages_template(template: str, messages: list[dict[str, str]]) -> str:
    """Ollama's rendering of a template of the form `prefix {{- range .Messages }} body {{ end }} suffix`, where
    the body uses only {{ .Role }} and {{ .Content }} (Go's `{{-` trims the whitespace before it)."""
    match = re.fullmatch(r"(.*?)\s*\{\{- range \.Messages \}\}(.*?)\{\{ end \}\}(.*)", template, re.DOTALL)
    assert match, template
    prefix, body, suffix = match.groups()
    rendered = [body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"]) for m in messages]
    return prefix + "".join(rendered) + suffix


def ollama_messages(system: str | None, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Ollama puts the Modelfile's SYSTEM first when the conversation brings no system message."""
    if system is not None and messages[0]["role"] != "system":
        return [{"role": "system", "content": system}, *messages]
    return messages


def test_modelfile_for_a_chatml_template(tmp_path):
    tokenizer_gguf = write_tokenizer_gguf(tmp_path / "tokenizer.gguf")
    save_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt", llama_model(), tokenizer=str(tokenizer_gguf))
    out = tmp_path / "export" / "smol.q8_0.gguf"
    assert convert_cli([str(tmp_path / "run"), "--to", "gguf", "--type", "q8_0", "--out", str(out), "--ollama",
                        "--temperature", "0.3"]) == 0
    text = (out.parent / "Modelfile").read_text()
    assert text == MODELFILE_BY_HAND

    system = re.search(r'SYSTEM """(.*?)"""', text, re.DOTALL).group(1)
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.DOTALL).group(1)
    jinja = jinja2.Environment().from_string(CHATML_TEMPLATE)
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
         {"role": "user", "content": "and 3+3?"}],
    ]  # fmt: skip
    for messages in conversations:
        expected = jinja.render(messages=messages, add_generation_prompt=True)
        assert render_go_messages_template(template, ollama_messages(system, messages)) == expected


def test_untranslatable_template_warns_and_leaves_template_to_ollama(tmp_path, capsys):
    source = tmp_path / "tokenizer.gguf"
    writer = gguf.GGUFWriter(source, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(SMALL_TOKENS)
    writer.add_token_types([1] * (len(SMALL_TOKENS) - len(SPECIALS)) + [3] * len(SPECIALS))
    writer.add_token_merges(MERGES)
    writer.add_eos_token_id(SMALL_TOKENS.index("<|endoftext|>"))
    writer.add_chat_template(LLAMA2_TEMPLATE)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    save_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt", llama_model(), tokenizer=str(source))
    out = tmp_path / "model.gguf"
    assert convert_cli([str(tmp_path / "run"), "--to", "gguf", "--type", "f16", "--out", str(out), "--ollama"]) == 0
    assert "cannot be translated to Ollama's template syntax: it is not ChatML" in capsys.readouterr().err
    text = (tmp_path / "Modelfile").read_text()
    assert not any(line.startswith("TEMPLATE") for line in text.splitlines())
    assert text.startswith("FROM ./model.gguf\n") and 'PARAMETER stop "<|endoftext|>"' in text


def test_gpt2_without_biases_is_written_with_zero_biases(tmp_path):
    """llama.cpp's gpt2 architecture requires every bias: a model trained without them gets zeros."""
    model = gpt2_model(bias=False, tie_embeddings=False)
    tokenizer = gguf_tokenizer_metadata(write_tokenizer_gguf(tmp_path / "tokenizer.gguf", "gpt-2"), SMALL_VOCAB)
    write_gguf(model, tmp_path / "model.gguf", "f32", tokenizer, name="no-bias")
    stored = {t.name for t in gguf.GGUFReader(tmp_path / "model.gguf").tensors}
    assert set(stored) == set(expected_tensors("gpt2", model.config))
    ids = make_ids(SMALL_VOCAB)
    assert max_diff(logits(load_pretrained(tmp_path / "model.gguf"), ids), logits(model, ids)) < 1e-5


def test_gpt2_tokenizer_metadata_is_gpt2s():
    """GPT-2's tokenizer from the bundled ranks, as llama.cpp's converter writes it (checked in memory: the gguf
    package's reader takes seconds on a file with 100k strings; the slow test below reads a file back)."""
    entries = {entry.key: entry.value for entry in gpt2_tokenizer_metadata(50260)}
    assert entries["tokenizer.ggml.model"] == "gpt2"
    assert entries["tokenizer.ggml.pre"] == "gpt-2"  # the name llama.cpp's vocabulary loader knows
    tokens, token_types = entries["tokenizer.ggml.tokens"], entries["tokenizer.ggml.token_type"]
    assert tokens[:3] == ["!", '"', "#"] and tokens[198] == "Ċ" and tokens[262] == "Ġthe"  # ids 0, 1, 2, "\n", " the"
    assert tokens[50256:] == ["<|endoftext|>", "[PAD50257]", "[PAD50258]", "[PAD50259]"]
    assert token_types[50255:] == [1, 3, 5, 5, 5]  # normal, control, unused padding rows
    assert entries["tokenizer.ggml.bos_token_id"] == entries["tokenizer.ggml.eos_token_id"] == 50256
    assert entries["tokenizer.ggml.add_bos_token"] is False
    merges = entries["tokenizer.ggml.merges"]
    assert len(merges) == 50000 and merges[:3] == ["Ġ t", "Ġ a", "h e"]  # GPT-2's merges.txt starts so
    assert "tokenizer.chat_template" not in entries


def test_gpt2_checkpoint_through_the_command_line_writes_a_completion_modelfile(tmp_path):
    model = gpt2_model(vocab_size=50257)
    save_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt", model, tokenizer="gpt2")
    out = tmp_path / "gpt2.gguf"
    assert convert_cli([str(tmp_path / "run"), "--to", "gguf", "--type", "q8_0", "--out", str(out), "--ollama"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"
    assert (tmp_path / "Modelfile").read_text() == (
        'FROM ./gpt2.gguf\n\nTEMPLATE """{{ .Prompt }}"""\n\n'
        'PARAMETER stop "<|endoftext|>"\nPARAMETER temperature 0.8\n'
    )


@pytest.mark.slow
def test_gpt2_tokenizer_round_trip(tmp_path):
    """The exported GPT-2 file loads with --model in every verb, tokenizer included, splitting text as GPT-2
    does; transformers' GGUF tokenizer conversion reads the same tokens from the file. (Slow: each read of
    GPT-2's 100k tokenizer strings takes the gguf package's reader 5-10 s.)"""
    model = gpt2_model(vocab_size=50257)
    save_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt", model, tokenizer="gpt2")
    out = tmp_path / "gpt2.gguf"
    assert convert_cli([str(tmp_path / "run"), "--to", "gguf", "--type", "f32", "--out", str(out)]) == 0
    loaded = load_model_and_tokenizer(str(out))
    ids = make_ids(50257)
    assert max_diff(logits(loaded.model, ids), logits(model, ids)) < 1e-5
    text = "Hello, world! Tokenizers  split   spaces,\tdigits 12345 and café ünïcödé 🙂.<|endoftext|>"
    expected = get_tokenizer("gpt2").encode(text, allowed_special="all")
    assert loaded.tokenizer.encode(text, allowed_special="all") == expected
    assert loaded.tokenizer.eot_id == 50256 and loaded.tokenizer.bos_id == 50256
    assert transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name).encode(text) == expected


# ----------------------------------------------------------------------------- (e) bad input


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run / "checkpoints" / "latest.pt", gpt2_model(vocab_size=50257), tokenizer="gpt2")
    return run


@pytest.mark.parametrize("args, message", [
    (["--to", "gguf", "--type", "q5_k"], r"--type 'q5_k' is not a GGUF type .* f32, f16, q8_0, q4_0"),
    (["--to", "hf", "--type", "q8_0"], r"--type applies to --to gguf"),
    (["--ollama"], r"--ollama applies to --to gguf"),
    (["--to", "gguf", "--dtype", "bfloat16"], r"--dtype bfloat16 applies to --to hf"),
    (["--to", "gguf", "--temperature", "0.5"], r"--temperature .* needs --ollama"),
])  # fmt: skip
def test_bad_options_name_the_value_and_write_nothing(small_run, tmp_path, args, message):
    out = tmp_path / "out" / "model.gguf"
    with pytest.raises(UserError, match=message):
        convert_cli([str(small_run), "--out", str(out), *args])
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("fields, named", [
    (dict(pos_emb="rope", norm="layernorm", mlp="gelu"), r"no GGUF architecture .*pos_emb=rope \(needs learned\)"),
    (dict(n_kv_head=2), r"model.n_kv_head = 2 .* gpt2"),
])  # fmt: skip
def test_model_llama_cpp_cannot_take_is_refused(tmp_path, fields, named):
    model = GPT(ModelConfig(vocab_size=50257, context_length=16, d_model=64, n_layer=1, n_head=4, **fields))
    save_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt", model, tokenizer="gpt2")
    with pytest.raises(UserError, match=named):
        convert_cli([str(tmp_path / "run"), "--to", "gguf", "--type", "f16", "--out", str(tmp_path / "m.gguf")])
    assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".m.gguf*"))


def test_failed_write_leaves_no_truncated_file(small_run, tmp_path, monkeypatch):
    def write_half_then_fail(self, *, progress=False):
        self.fout[0].write(b"\0" * 1000)
        raise OSError("disk went away")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", write_half_then_fail)
    with pytest.raises(OSError, match="disk went away"):
        convert_cli([str(small_run), "--to", "gguf", "--type", "q8_0", "--out", str(tmp_path / "m.gguf")])
    assert list(tmp_path.iterdir()) == []


def test_command_line_error_exits_nonzero_with_the_message(small_run, tmp_path):
    result = subprocess.run([sys.executable, "-m", "gpt", "convert", str(small_run), "--to", "gguf", "--type", "q3",
                             "--out", str(tmp_path / "m.gguf")], capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: --type 'q3' is not a GGUF type this exporter writes; "
                                     "use one of f32, f16, q8_0, q4_0")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- llama.cpp itself


@pytest.mark.llama_cpp
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_llama_cpp_gives_our_logits(exported, family):
    """llama.cpp (llama-cpp-python, built from source) runs the f32 export with the logits of our model."""
    try:
        import llama_cpp
    except ImportError:
        pytest.fail("-m llama_cpp needs llama-cpp-python: CMAKE_ARGS=-DGGML_NATIVE=OFF "
                    "pip install --no-binary llama-cpp-python llama-cpp-python", pytrace=False)
    model, path = exported[family, "f32"]
    llm = llama_cpp.Llama(str(path), n_ctx=model.config.context_length, n_threads=2, logits_all=True, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)  # its default cache is f16
    ids = make_ids(model.config.vocab_size, batch=1, length=16)[0].tolist()
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))  # (T, V)
    ours = logits(model, torch.tensor([ids]))[0]
    assert max_diff(theirs, ours) < 1e-3  # float32 throughout; ggml's own summation order and GELU/exp kernels
