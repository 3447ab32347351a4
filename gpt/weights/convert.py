"""`python -m gpt convert SRC --out DIR`: any model we can load, written as a Hugging Face folder
(`--to hf`, the default) or as one GGUF file for llama.cpp and Ollama (`--to gguf`).

SRC is one of our checkpoints (file or run folder), a GGUF file, a Hugging Face
folder or a known model name. With `--to gguf --type f32|f16|q8_0|q4_0 --out model.gguf`
the model and its tokenizer go into one file (`gguf_export.py`); `--ollama` adds a
`Modelfile` beside it (`modelfile.py`). With `--to hf` the folder gets `config.json` +
`model.safetensors` from `save_pretrained`, and the tokenizer:

    our checkpoint, GPT-2 tokenizer   tokenizer.json + tokenizer_config.json built from the bundled ranks
    our checkpoint, GGUF tokenizer    the same files built from that GGUF file's metadata
    GGUF file                         the same files built from its metadata (incl. the chat template)
    Hugging Face folder               its tokenizer files copied as they are
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from ..checkpoint import load_checkpoint, model_from_checkpoint
from ..errors import UserError
from ..model import GPT
from ..run_folder import refuse_run_folder
from ..files import write_text
from .gguf_export import GGUF_TYPES, MetadataEntry, check_gguf_type, gguf_architecture, gguf_tokenizer_metadata
from .gguf_export import gpt2_tokenizer_metadata, write_gguf
from .hf import HF_CLASS, read_hf_config
from .hf_export import hf_family, save_pretrained
from .load import LoadedModel, load_model_and_tokenizer, load_pretrained, source_kind
from .modelfile import TemplateNotTranslatable, modelfile_text, ollama_template
from .tokenizer_files import write_gguf_tokenizer, write_gpt2_tokenizer

# Files of a Hugging Face folder that describe the tokenizer or generation defaults, copied as they are.
HF_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)  # fmt: skip

EPILOG = """\
examples:
  python -m gpt convert runs/pretrain-20250101-120000 --out exported/
  python -m gpt convert SmolLM2-135M-Instruct.Q4_1.gguf --out smollm2-hf --dtype bfloat16
  python -m gpt convert smollm2-135m-instruct --out smollm2-hf
  python -m gpt convert smollm2-135m-instruct --to gguf --type q8_0 --out smollm2.q8_0.gguf --ollama
  python -m gpt convert runs/pretrain-20250101-120000 --to gguf --type f16 --out mygpt.f16.gguf

A Hugging Face folder loads with transformers:
  AutoModelForCausalLM.from_pretrained("exported/"); AutoTokenizer.from_pretrained("exported/")
GPT-2-style models become GPT2LMHeadModel, Llama-style ones LlamaForCausalLM; other
field combinations have no transformers equivalent and are refused.

A GGUF file (architecture gpt2 or llama) runs with llama.cpp, and with Ollama:
  llama-cli -m smollm2.q8_0.gguf -p "Once upon a time"
  ollama create smollm2 -f Modelfile && ollama run smollm2     (--ollama wrote Modelfile beside the .gguf)
q8_0 and q4_0 quantize the 2-D weights in blocks of 32 (norms and biases stay f32).
"""


def convert_cli(argv: list[str]) -> int:
    """Parse `argv`, convert, print what was written; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m gpt convert",
        description="Write a model as a Hugging Face folder (config.json, model.safetensors, tokenizer files), "
        "or as a GGUF file for llama.cpp and Ollama.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "src", metavar="SRC",
        help="our checkpoint (.pt file or run folder), a GGUF file (llama or gpt2 architecture), "
        "a Hugging Face folder (GPT-2 or Llama) or a known model name such as smollm2-135m-instruct",
    )  # fmt: skip
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="--to hf: the folder to write (created if needed); --to gguf: the .gguf file to write")
    parser.add_argument("--to", choices=("hf", "gguf"), default="hf",
                        help="hf: a Hugging Face folder (default); gguf: one GGUF file for llama.cpp / Ollama")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default=None,
        help="--to hf: precision of the stored weights (default: float32; quantized GGUF weights are dequantized)",
    )  # fmt: skip
    parser.add_argument("--type", dest="gguf_type", metavar="TYPE", default=None,
                        help=f"--to gguf: {' | '.join(GGUF_TYPES)} (default: f16)")
    parser.add_argument("--ollama", action="store_true",
                        help="--to gguf: also write an Ollama Modelfile beside the .gguf file")
    parser.add_argument("--temperature", type=float, default=None,
                        help="--ollama: the Modelfile's sampling temperature "
                        "(default: 0.8, as `python -m gpt generate`)")
    args = parser.parse_args(argv)
    if args.to == "gguf":
        return _convert_to_gguf(args)
    for given, option in ((args.gguf_type, "--type"), (args.ollama or None, "--ollama"),
                          (args.temperature, "--temperature")):  # fmt: skip
        if given is not None:
            raise UserError(f"{option} applies to --to gguf; a Hugging Face folder (--to hf) has no {option}")
    args.dtype = args.dtype or "float32"

    kind, src = source_kind(args.src)
    out_dir = Path(args.out)
    if kind == "hf" and out_dir.resolve() == src.resolve():
        raise UserError(f"--out {out_dir} is the source folder; write the converted model somewhere else")
    refuse_run_folder(out_dir, "--out")  # its config.json is the run's, not a Hugging Face one

    model, tokenizer_source = _load_with_tokenizer_source(kind, src)
    _refuse_unexportable_tokenizer(tokenizer_source, "a Hugging Face folder")
    architecture = HF_CLASS[hf_family(model.config)]  # refuses a model transformers has no class for, before writing
    out_dir.mkdir(parents=True, exist_ok=True)
    bos_id, eos_id, tokenizer_note = _write_tokenizer(kind, src, tokenizer_source, model, out_dir)
    save_pretrained(model, out_dir, dtype=args.dtype, bos_token_id=bos_id, eos_token_id=eos_id)
    if kind == "hf" and (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", out_dir / "generation_config.json")

    print(f"wrote {out_dir}: {architecture}, {model.num_parameters():,} parameters, {args.dtype}", file=sys.stderr)
    print(f"tokenizer: {tokenizer_note}", file=sys.stderr)
    print(out_dir)
    return 0


def _load_with_tokenizer_source(kind: str, src: Path) -> tuple[GPT, str | None]:
    """The model, and for our checkpoints the tokenizer they were trained with ("gpt2" or a GGUF path)."""
    if kind != "checkpoint":
        return load_pretrained(src), None
    state = load_checkpoint(src)
    model = model_from_checkpoint(state, src).eval()
    return model, state.get("tokenizer", "gpt2")


def _write_tokenizer(
    kind: str, src: Path, tokenizer_source: str | None, model: GPT, out_dir: Path
) -> tuple[int | None, int | None, str]:
    """Write (or copy) the tokenizer files; returns (bos id, eos id, a line saying what was done)."""
    context = model.config.context_length
    if kind == "hf":
        copied = [name for name in HF_TOKENIZER_FILES if (src / name).is_file()]
        for name in copied:
            shutil.copyfile(src / name, out_dir / name)
        hf_config = read_hf_config(src)
        note = f"copied {', '.join(copied)}" if copied else f"none found in {src}; add the tokenizer files by hand"
        return hf_config.get("bos_token_id"), hf_config.get("eos_token_id"), note
    if kind == "checkpoint" and tokenizer_source == "gpt2":
        written = write_gpt2_tokenizer(out_dir, context)
        note = f"GPT-2's, written as {', '.join(written.files)}"
    else:
        gguf_path = src if kind == "gguf" else _gguf_of_tokenizer_name(tokenizer_source)
        if gguf_path is None:
            return None, None, f"{tokenizer_source!r} (named in the checkpoint) is not a GGUF file here; not written"
        written = write_gguf_tokenizer(gguf_path, out_dir, context)
        note = f"from {gguf_path.name}'s metadata, written as {', '.join(written.files)}"
    return written.bos_id, written.eos_id, note


def _refuse_unexportable_tokenizer(tokenizer_name: str | None, target: str) -> None:
    """The byte tokenizer and trained tokenizer folders have no exporter yet: say so before writing anything."""
    if tokenizer_name is not None and (tokenizer_name == "bytes" or Path(tokenizer_name).is_dir()):
        raise UserError(f"exporting a model with the tokenizer {tokenizer_name!r} as {target} is not supported yet; "
                        "only GPT-2's tokenizer and GGUF tokenizers can be written")


def _gguf_of_tokenizer_name(name: str | None) -> Path | None:
    """The GGUF file a checkpoint's tokenizer name points to (a path or a known model name), if any."""
    if name is None:
        return None
    try:
        kind, path = source_kind(name)
    except UserError:
        return None
    return path if kind == "gguf" else None


def _convert_to_gguf(args: argparse.Namespace) -> int:
    """`--to gguf`: write the GGUF file (and the Modelfile with --ollama); returns the exit code."""
    if args.dtype is not None:
        raise UserError(f"--dtype {args.dtype} applies to --to hf; for GGUF choose the storage with --type "
                        f"({', '.join(GGUF_TYPES)})")
    if args.temperature is not None and not args.ollama:
        raise UserError("--temperature sets the Modelfile's temperature; it needs --ollama")
    if args.temperature is not None and args.temperature < 0:
        raise UserError(f"--temperature {args.temperature} must be >= 0")
    gguf_type = check_gguf_type(args.gguf_type or "f16")
    out_path = Path(args.out)
    if out_path.is_dir():
        raise UserError(
            f"--out {out_path} is a folder; --to gguf writes one file, e.g. --out {out_path / 'model.gguf'}"
        )
    if out_path.suffix.lower() != ".gguf":
        raise UserError(f"--out {out_path}: a GGUF file's name should end in .gguf (llama.cpp and Ollama expect it)")

    loaded = load_model_and_tokenizer(args.src)
    _refuse_unexportable_tokenizer(loaded.tokenizer_name, "GGUF")
    model = loaded.model.eval()
    gguf_architecture(model.config)  # refuses a model llama.cpp cannot run, before the tokenizer work
    tokenizer = _tokenizer_metadata(loaded, model.config.vocab_size)
    modelfile = _modelfile(loaded, out_path, args.temperature) if args.ollama else None

    name = Path(args.src).stem if Path(args.src).exists() else args.src
    exported = write_gguf(model, out_path, gguf_type, tokenizer, name=name)
    if modelfile is not None:
        write_text(out_path.parent / "Modelfile", modelfile)
    types = ", ".join(f"{count} {qtype}" for qtype, count in sorted(exported.tensor_types.items()))
    print(f"wrote {out_path}: architecture {exported.architecture}, {model.num_parameters():,} parameters, "
          f"{exported.size_bytes / 2**20:,.1f} MiB; tensors: {types}", file=sys.stderr)
    print(f"tokenizer: {loaded.tokenizer_name}", file=sys.stderr)
    if modelfile is not None:
        print(f"wrote {out_path.parent / 'Modelfile'}: ollama create NAME -f {out_path.parent / 'Modelfile'}",
              file=sys.stderr)
    print(out_path)
    return 0


def _tokenizer_metadata(loaded: LoadedModel, vocab_size: int) -> list[MetadataEntry]:
    """The `tokenizer.*` entries: GPT-2's built from the bundled ranks, any other copied from its GGUF file."""
    if loaded.tokenizer_name == "gpt2":
        return gpt2_tokenizer_metadata(vocab_size)
    kind, path = source_kind(loaded.tokenizer_name)
    if kind != "gguf":
        raise UserError(f"tokenizer {loaded.tokenizer_name!r} is not a GGUF file; cannot write its metadata")
    return gguf_tokenizer_metadata(path, vocab_size)


def _modelfile(loaded: LoadedModel, out_path: Path, temperature: float | None) -> str:
    """The Modelfile text; an untranslatable chat template is a warning, and the Modelfile goes without TEMPLATE."""
    tokenizer = loaded.tokenizer
    token_text = {"bos_token": tokenizer.decode([tokenizer.bos_id]) if tokenizer.bos_id is not None else "",
                  "eos_token": tokenizer.decode([tokenizer.eot_id])}  # fmt: skip
    try:
        template = ollama_template(tokenizer.chat_template, token_text)
    except TemplateNotTranslatable as err:
        print(f"warning: the chat template of {loaded.tokenizer_name} cannot be translated to Ollama's template "
              f"syntax: {err}. The Modelfile is written without TEMPLATE; Ollama will guess one from the GGUF "
              "file's tokenizer.chat_template.", file=sys.stderr)
        template = None
    stops = [token_text["eos_token"]]
    return modelfile_text(out_path.name, template, stops, 0.8 if temperature is None else temperature)
