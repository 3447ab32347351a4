"""`python -m gpt <verb>`: the command-line front door.

Each verb lives in the module that does the work; this file only dispatches,
importing a verb's module when it is used so `--help` stays fast.
"""

from __future__ import annotations

import importlib
import sys

from .errors import UserError, run_cli

# verb -> ("module:function", one-line description); each function takes argv and returns an exit code
VERBS: dict[str, tuple[str, str]] = {
    "generate": ("gpt.cli:generate_cli", "continue a prompt with a model (streams to the terminal)"),
    "chat": ("gpt.cli:chat_cli", "talk with a model in the terminal (its chat template, streamed replies)"),
    "evaluate": ("gpt.cli:evaluate_cli", "loss/perplexity on a text file, or responses to a batch of prompts"),
    "convert": ("gpt.weights:convert_cli", "export a model as a Hugging Face folder, or as a GGUF file for llama.cpp/Ollama"),
    "quantize": ("gpt.quantize.cli:quantize_cli", "int8/int4 weight-only quantization, written as a folder every verb loads"),
    "prune": ("gpt.prune:prune_cli", "magnitude pruning (unstructured or 2:4), with an optional recovery fine-tune"),
    "consolidate": ("gpt.sharded_checkpoint:consolidate_cli", "a sharded (FSDP) checkpoint folder as one checkpoint file, or back"),
    "prepare": ("gpt.data.token_files:prepare_cli", "filter and tokenize a corpus into token files, with a data report"),
    "train-tokenizer": ("gpt.train_tokenizer:train_tokenizer_cli", "train a byte-level BPE vocabulary on your own text"),
    "fetch": ("gpt.fetch:fetch_cli", "download a known pretrained model into the local cache (explicit, once)"),
    "classify": ("gpt.classifier:classify_cli", "label texts with a classifier from finetune_classifier.py"),
    "serve": ("gpt.serve.cli:serve_cli", "serve a model over HTTP: OpenAI-compatible API and a chat page"),
    "bench": ("gpt.bench:bench_cli", "training/generation speed, MFU and peak memory against transformers"),
    "lm-eval": ("gpt.evaluate.harness:lm_eval_cli", "lm-evaluation-harness with our model as --model gpt (eval extra)"),
    "compare": ("gpt.compare:compare_cli", "side-by-side table of run folders' config differences, metrics and curves"),
    "ladder": ("gpt.ladder:ladder_cli", "the improvement loop: rungs of growing data and model, each grown from the last"),
    "sweep": ("gpt.sweep:sweep_cli", "hyperparameter search over any script's config fields with Optuna (sweep extra)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m gpt <verb> [options]   (python -m gpt <verb> --help for details)\n\nverbs:")
        width = max(map(len, VERBS))
        for verb, (_, description) in VERBS.items():
            print(f"  {verb:<{width}} {description}")
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        raise UserError(f"unknown verb {verb!r}; known verbs: {', '.join(VERBS)}")
    module_name, function_name = VERBS[verb][0].split(":")
    return importlib.import_module(module_name).__dict__[function_name](rest)


if __name__ == "__main__":
    run_cli(main)
