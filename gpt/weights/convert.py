"""`python -m gpt convert SRC --out DIR`: any model we can load, written as a Hugging Face folder.

SRC is one of our checkpoints (file or run folder), a GGUF file, a Hugging Face
folder or a known model name. The folder gets `config.json` + `model.safetensors`
from `save_pretrained`, and the tokenizer:

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
from .hf import HF_CLASS, read_hf_config
from .hf_export import hf_family, save_pretrained
from .load import load_pretrained, source_kind
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

The result loads with transformers:
  AutoModelForCausalLM.from_pretrained("exported/"); AutoTokenizer.from_pretrained("exported/")
GPT-2-style models become GPT2LMHeadModel, Llama-style ones LlamaForCausalLM; other
field combinations have no transformers equivalent and are refused.
"""


def convert_cli(argv: list[str]) -> int:
    """Parse `argv`, convert, print what was written; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m gpt convert",
        description="Write a model as a Hugging Face folder (config.json, model.safetensors, tokenizer files).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "src", metavar="SRC",
        help="our checkpoint (.pt file or run folder), a GGUF file (llama architecture), "
        "a Hugging Face folder (GPT-2 or Llama) or a known model name such as smollm2-135m-instruct",
    )  # fmt: skip
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write (created if needed)")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
        help="precision of the stored weights (default: %(default)s; quantized GGUF weights are dequantized)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    kind, src = source_kind(args.src)
    out_dir = Path(args.out)
    if kind == "hf" and out_dir.resolve() == src.resolve():
        raise UserError(f"--out {out_dir} is the source folder; write the converted model somewhere else")
    refuse_run_folder(out_dir, "--out")  # its config.json is the run's, not a Hugging Face one

    model, tokenizer_source = _load_with_tokenizer_source(kind, src)
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


def _gguf_of_tokenizer_name(name: str | None) -> Path | None:
    """The GGUF file a checkpoint's tokenizer name points to (a path or a known model name), if any."""
    if name is None:
        return None
    try:
        kind, path = source_kind(name)
    except UserError:
        return None
    return path if kind == "gguf" else None
