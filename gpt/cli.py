"""Command-line verbs that are about using a model rather than training one: generate (later chat, evaluate).

Each verb is a function `name_cli(argv) -> exit code`, dispatched from `python -m gpt`.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .errors import UserError


def pick_device(name: str = "auto") -> torch.device:
    """`auto` -> cuda if available, else mps, else cpu; anything else as given."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def load_for_inference(args: argparse.Namespace):
    """The model and tokenizer named by --checkpoint or --preset."""
    from .checkpoint import load_checkpoint, model_from_checkpoint
    from .config import ModelConfig
    from .model import GPT
    from .tokenizer import get_tokenizer

    if args.checkpoint:
        state = load_checkpoint(args.checkpoint)
        model = model_from_checkpoint(state, args.checkpoint)
        tokenizer = get_tokenizer(state.get("tokenizer", "gpt2"))
    else:
        torch.manual_seed(args.seed)
        model = GPT(ModelConfig.preset(args.preset))
        tokenizer = get_tokenizer("gpt2")
        print(f"[random-init {args.preset}: {model.num_parameters():,} parameters; expect gibberish]", file=sys.stderr)
    if tokenizer.n_vocab > model.config.vocab_size:
        raise UserError(
            f"the tokenizer has {tokenizer.n_vocab} tokens but the model only {model.config.vocab_size}; "
            "load this model with its own tokenizer"
        )
    return model, tokenizer


def generate_cli(argv: list[str]) -> int:
    from .generate import stream_tokens

    parser = argparse.ArgumentParser(
        prog="python -m gpt generate",
        description="Continue a prompt with a model and stream the text to the terminal.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint file or run folder written by pretrain.py")
    source.add_argument("--preset", help="a random-init model of this preset (tiny, gpt2-124m, ...): a smoke test")
    parser.add_argument("--prompt", default="The", help="text to continue (default: %(default)r)")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens; 0 = all")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, e.g. 0.9")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default: %(default)s)")
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    model, tokenizer = load_for_inference(args)
    model.to(device)
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise UserError("--prompt is empty: give at least one character of text")
    room = model.config.context_length - args.max_new_tokens
    if room < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} leaves no room in the {model.config.context_length}-token context")
    if len(prompt_ids) > room:
        print(f"[prompt cut to its last {room} tokens to fit the context]", file=sys.stderr)
        prompt_ids = prompt_ids[-room:]

    generator = torch.Generator(device=device).manual_seed(args.seed)
    decoder = tokenizer.stream_decoder()
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    start, count = time.perf_counter(), 0
    for token in stream_tokens(model, [prompt_ids], args.max_new_tokens, args.temperature, args.top_k or None,
                               args.top_p, eos_id=tokenizer.eot_id, generator=generator):
        count += 1
        sys.stdout.write(decoder.push(int(token[0])))
        sys.stdout.flush()
    sys.stdout.write(decoder.flush() + "\n")
    elapsed = time.perf_counter() - start
    print(f"[{count} tokens in {elapsed:.2f} s, {count / max(elapsed, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0


