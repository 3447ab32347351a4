"""`python -m gpt quantize --model M --to int8|int4 [--group-size G] --out DIR`."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from .. import cli_args
from ..classifier import classifier_checkpoint
from ..errors import UserError
from ..weights import load_model_and_tokenizer
from .folder import save_quantized
from .formats import INT4_GROUP_SIZES
from .model import DEFAULT_GROUP_SIZE, QuantScheme, quantize_model, weight_bytes

EPILOG = f"""\
examples:
  python -m gpt quantize --model smollm2-135m-instruct --to int8 --out smollm2-int8
  python -m gpt quantize --model runs/pretrain-20250101-120000 --to int4 --group-size 128 --out mygpt-int4
  python -m gpt generate --model smollm2-int8 --prompt "The capital of France is"

What is quantized: every attention and MLP projection, and the LM head (unless
--keep-head-float); the embeddings stay float. int8 keeps one scale per output row;
int4 one scale and zero point per group of G inputs (G in {', '.join(map(str, INT4_GROUP_SIZES))}; smaller
groups are more accurate and slightly larger; a layer whose inputs G does not divide takes
the largest smaller size that does). The folder (quantization.json +
model.safetensors) loads with --model DIR in generate, chat, evaluate and serve; any
other model can also be quantized as it loads, with --quantize int8|int4[:G].
"""


def quantize_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpt quantize",
        description="Quantize a model's weights to int8 or int4 (weight-only) and write it as a folder "
                    "every verb loads with --model.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="known name (e.g. smollm2-135m-instruct), .gguf file, Hugging Face folder, "
                             "or a checkpoint / run folder of ours")
    parser.add_argument("--to", required=True, choices=("int8", "int4"), help="the weight format")
    parser.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, choices=INT4_GROUP_SIZES,
                        help="int4: inputs per scale and zero point (default: %(default)s)")
    parser.add_argument("--symmetric", action="store_true",
                        help="int4 without zero points (each group symmetric around 0), for comparison")
    parser.add_argument("--keep-head-float", action="store_true", help="leave the LM head in float")
    parser.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    parser.add_argument("--seed", type=cli_args.seed, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty folder; choose a new one")
    if args.to == "int8" and (args.group_size != DEFAULT_GROUP_SIZE or args.symmetric):
        raise UserError("--group-size and --symmetric apply to --to int4 only")
    scheme = QuantScheme("int8") if args.to == "int8" else QuantScheme("int4", args.group_size, args.symmetric)
    if classifier_checkpoint(args.model) is not None:
        raise UserError(f"{args.model}: a classifier; quantize it as it loads with "
                        "`python -m gpt classify --checkpoint RUN --quantize int8|int4 ...`")
    loaded = load_model_and_tokenizer(args.model, seed=args.seed)
    model = loaded.model.float()
    before = weight_bytes(model)
    quantize_model(model, scheme, include_head=not args.keep_head_float)
    after = weight_bytes(model)
    created = not out.exists()
    try:
        save_quantized(model, out, scheme, loaded.tokenizer_name, loaded.description)
    except BaseException:
        if created:  # nothing half-written stays behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    print(f"{loaded.description}: {scheme} weights, {before / 2**20:,.1f} MiB -> {after / 2**20:,.1f} MiB "
          f"({after / before:.0%} of the float size); wrote {out}", file=sys.stderr)
    return 0
