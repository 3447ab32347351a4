"""Command-line verbs for using a model (rather than training one): generate, chat, evaluate.

Each verb is a function `name_cli(argv) -> exit code`, dispatched from `python -m gpt`.
Every verb takes a model the same way (`add_model_arguments`): `--model` with a known
name (fetched on first use), a GGUF file, a Hugging Face folder, one of our checkpoints
or run folders; `--checkpoint` as a synonym for the last; or `--preset` for a random-init
model (a smoke test). generate and evaluate take `--model` two or more times for an
ensemble (`gpt.ensemble`): the mean of the models' next-token probabilities.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import cli_args
from .errors import UserError
from .evaluate import mmlu, text_metrics
from .evaluate.instruction import reference_scores
from .evaluate.multiple_choice import MultipleChoiceItem, multiple_choice_metrics, score_items
from .evaluate.task_report import write_task_report
from .ensemble import Ensemble, check_shared_tokenizer
from .fetch import cached_path
from .few_shot import FewShotPrompts, read_examples
from .files import json_lines, write_text
from .generate import generate, stream_tokens
from .model import GPT
from .prompts import chat_prompt
from .quantize import parse_scheme, quantize_model
from .runtime import enable_tf32, pick_device
from .tokenizer import Tokenizer
from .weights import load_model_and_tokenizer

# ----------------------------------------------------------------------------
# Loading a model and its tokenizer
# ----------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser, quantize: bool = True, ensemble: bool = False) -> None:
    """--model / --checkpoint / --preset, --device, --seed and (with `quantize`) --quantize. With `ensemble`,
    --model and --checkpoint may repeat: each is then a list of sources (`model_sources`)."""
    source = parser.add_mutually_exclusive_group(required=True)
    repeat = {"action": "append"} if ensemble else {}
    more = ("; give it two or more times for an ensemble: the mean of the models' next-token probabilities "
            "(they must share a tokenizer)") if ensemble else ""
    source.add_argument("--model", **repeat, help="known name (e.g. smollm2-135m-instruct), .gguf file, Hugging Face "
                                                  "folder, or a checkpoint / run folder of ours" + more)
    source.add_argument("--checkpoint", **repeat, help="a checkpoint file or run folder written by our scripts" + more)
    source.add_argument("--preset", help="a random-init model of this preset (tiny, gpt2-124m, ...): a smoke test")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: %(default)s)")
    parser.add_argument("--seed", type=cli_args.seed, default=0, help="random seed (default: %(default)s)")
    if quantize:
        parser.add_argument("--quantize", metavar="SCHEME", default=None,
                            help="quantize the weights as the model loads: int8, int4 or int4:G (G = 32, 64, 128, "
                                 "256 inputs per scale); `python -m gpt quantize` saves a quantized model instead")


def model_sources(args: argparse.Namespace) -> list[str]:
    """What --model / --checkpoint / --preset name: one source, or several where the option repeats."""
    named = args.preset or args.model or args.checkpoint
    return named if isinstance(named, list) else [named]


def model_from_args(args: argparse.Namespace) -> tuple[GPT | Ensemble, Tokenizer]:
    """The model named by --model / --checkpoint / --preset, on the requested device, in eval mode; an `Ensemble`
    of them when --model (or --checkpoint) names two or more, which must share a tokenizer.
    The device is checked first, so a machine without it costs no model loading. On CUDA the fp32 matmuls
    use TF32 tensor cores, as in training."""
    device = pick_device(args.device, "--device")
    enable_tf32(device)
    scheme = parse_scheme(args.quantize) if getattr(args, "quantize", None) else None  # a bad scheme stops before any loading
    sources = model_sources(args)
    models, tokenizers = [], []
    for source in sources:
        loaded = load_model_and_tokenizer(source, seed=args.seed)
        if tokenizers:  # another tokenizer stops the loading at the first model that has it
            check_shared_tokenizer([sources[0], source], [tokenizers[0], loaded.tokenizer])
        if args.preset:
            print(f"[random-init {args.preset}: {loaded.model.num_parameters():,} parameters; expect gibberish]",
                  file=sys.stderr)
        if scheme is not None:
            quantize_model(loaded.model, scheme)
        models.append(loaded.model.to(device).eval())
        tokenizers.append(loaded.tokenizer)
    if len(models) == 1:
        return models[0], tokenizers[0]
    ensemble = Ensemble(models, sources, tokenizers[0])
    print(f"[ensemble of {len(models)} models: the mean of their next-token probabilities; context "
          f"{ensemble.context_length} tokens, the smallest member's]", file=sys.stderr)
    return ensemble, tokenizers[0]


def context_length_of(model: GPT | Ensemble) -> int:
    """The longest sequence `model` takes (an ensemble's: its smallest member's)."""
    return model.context_length if isinstance(model, Ensemble) else model.config.context_length


def device_of(model: GPT | Ensemble) -> torch.device:
    """Where `model`'s weights are."""
    return model.device if isinstance(model, Ensemble) else model.tok_emb.weight.device


def fit_prompt(ids: list[int], max_new_tokens: int, context_length: int) -> list[int]:
    """Keep the prompt's last tokens so that prompt + reply fit in the context."""
    room = context_length - max_new_tokens
    if room < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room in the {context_length}-token context")
    if len(ids) > room:
        print(f"[prompt cut to its last {room} tokens to fit the context]", file=sys.stderr)
    return ids[-room:]


def add_sampling_arguments(parser: argparse.ArgumentParser, temperature: float) -> None:
    parser.add_argument("--max-new-tokens", type=cli_args.positive_int, default=128,
                        help="tokens to generate (default: %(default)s)")
    parser.add_argument("--temperature", type=cli_args.non_negative_float, default=temperature,
                        help="0 = greedy (default: %(default)s)")
    parser.add_argument("--top-k", type=cli_args.non_negative_int, default=50,
                        help="sample from the k most likely tokens; 0 = all")
    parser.add_argument("--top-p", type=cli_args.probability, default=None,
                        help="nucleus sampling mass in (0, 1], e.g. 0.9")


def stream_reply(model: GPT | Ensemble, tokenizer: Tokenizer, prompt_ids: list[int], args: argparse.Namespace,
                 generator: torch.Generator) -> tuple[str, int]:
    """Generate after `prompt_ids`, printing text as it comes; returns the text and the token count.
    Ctrl-C stops the reply early and keeps what was printed."""
    decoder, pieces, count = tokenizer.stream_decoder(), [], 0
    sampling = (args.max_new_tokens, args.temperature, args.top_k or None, args.top_p)
    tokens = (model.stream_tokens([prompt_ids], *sampling, eos_id=tokenizer.eot_id, generator=generator)
              if isinstance(model, Ensemble) else
              stream_tokens(model, [prompt_ids], *sampling, eos_id=tokenizer.eot_id, generator=generator))
    try:
        for token in tokens:
            token_id = int(token[0])
            count += 1
            if token_id == tokenizer.eot_id:
                break
            pieces.append(decoder.push(token_id))
            sys.stdout.write(pieces[-1])
            sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write(" [stopped]")
    pieces.append(decoder.flush())
    sys.stdout.write(pieces[-1] + "\n")
    return "".join(pieces), count


def add_few_shot_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--few-shot", type=cli_args.existing_file, default=None,
                        help="JSONL with one {'input': ..., 'output': ...} per line: each prompt becomes 'Input: "
                             "<prompt>\\nOutput:' after --shots of these examples laid out the same way, drawn "
                             "with --seed (--shots 0: the same layout without examples, zero-shot)")


def few_shot_prompts(args: argparse.Namespace) -> FewShotPrompts | None:
    """--few-shot FILE with --shots K and --seed: the builder of few-shot prompts, or None without --few-shot."""
    if args.few_shot is None:
        return None
    prompts = FewShotPrompts(read_examples(args.few_shot), args.shots, args.seed, source=str(args.few_shot))
    print(f"[few-shot: {args.shots} example(s) of {args.few_shot} before each prompt, drawn with seed {args.seed}]",
          file=sys.stderr)
    return prompts


# ----------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------


def generate_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpt generate",
        description="Continue a prompt with a model and stream the text to the terminal. With --model given two "
                    "or more times, an ensemble: tokens come from the mean of the models' next-token probabilities "
                    "(--temperature, --top-k and --top-p apply to that mean).",
    )
    add_model_arguments(parser, ensemble=True)
    parser.add_argument("--prompt", type=cli_args.non_empty_text, default="The",
                        help="text to continue (default: %(default)r)")
    add_sampling_arguments(parser, temperature=0.8)
    add_few_shot_argument(parser)
    parser.add_argument("--shots", type=cli_args.non_negative_int, default=0,
                        help="with --few-shot: examples before the prompt (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.shots and not args.few_shot:
        parser.error("--shots needs --few-shot FILE.jsonl, the examples to draw from")

    few_shot = few_shot_prompts(args)
    text = args.prompt
    if few_shot is not None:
        text, used = few_shot.build(args.prompt)
        print(f"[few-shot examples: line(s) {[e.line for e in used]} of {args.few_shot}]", file=sys.stderr)
    model, tokenizer = model_from_args(args)
    prompt_ids = fit_prompt(tokenizer.encode(text), args.max_new_tokens, context_length_of(model))
    generator = torch.Generator(device=device_of(model)).manual_seed(args.seed)
    sys.stdout.write(text)
    start = time.perf_counter()
    _, count = stream_reply(model, tokenizer, prompt_ids, args, generator)
    elapsed = time.perf_counter() - start
    print(f"[{count} tokens in {elapsed:.2f} s, {count / max(elapsed, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------
# chat
# ----------------------------------------------------------------------------


def chat_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpt chat",
        description="Talk with a model in the terminal. Its chat template formats the conversation; replies stream "
                    "as they are generated. Commands: /reset forgets the conversation, /exit (or Ctrl-D) quits; "
                    "Ctrl-C stops a reply.",
    )
    add_model_arguments(parser)
    parser.add_argument("--system", default=None, help="a system message to start the conversation with")
    add_sampling_arguments(parser, temperature=0.0)
    args = parser.parse_args(argv)

    model, tokenizer = model_from_args(args)
    generator = torch.Generator(device=model.tok_emb.weight.device).manual_seed(args.seed)
    start_messages = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start_messages)
    print("[chat: /reset forgets, /exit or Ctrl-D quits, Ctrl-C stops a reply]", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line.strip():
            continue
        if line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            messages = list(start_messages)
            print("[conversation forgotten]", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        prompt_ids = tokenizer.encode(chat_prompt(messages, tokenizer), allowed_special="all")
        while len(prompt_ids) + args.max_new_tokens > model.config.context_length and len(messages) > 1:
            messages.pop(1 if messages[0]["role"] == "system" and len(messages) > 2 else 0)  # forget the oldest turn
            prompt_ids = tokenizer.encode(chat_prompt(messages, tokenizer), allowed_special="all")
        prompt_ids = fit_prompt(prompt_ids, args.max_new_tokens, model.config.context_length)
        sys.stdout.write("bot> ")
        reply, _ = stream_reply(model, tokenizer, prompt_ids, args, generator)
        messages.append({"role": "assistant", "content": reply})


# ----------------------------------------------------------------------------
# evaluate: perplexity on a text file, or a batch of prompts -> responses
# ----------------------------------------------------------------------------


def read_prompts(path: Path) -> list[dict]:
    """JSONL records with `prompt` (plain text) or `messages` (a chat), and optionally `reference` (the expected
    answer); a bad line names the file and line."""
    records = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read prompts ({err})") from None
    for number, record in json_lines(path, text):
        where = f"{path}, line {number}"
        if not isinstance(record, dict) or not ({"prompt", "messages"} & record.keys()):
            raise UserError(f"{where}: expected an object with a 'prompt' or 'messages' field")
        if "messages" in record:
            messages = record["messages"]
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise UserError(f"{where}: 'messages' must be a non-empty list of {{'role': ..., 'content': ...}} "
                                f"objects with string values, got {json.dumps(messages)[:80]}")
        elif not isinstance(record["prompt"], str) or not record["prompt"]:
            raise UserError(f"{where}: 'prompt' must be a non-empty string, got {json.dumps(record['prompt'])[:80]}")
        if "reference" in record and not isinstance(record["reference"], str):
            raise UserError(f"{where}: 'reference' must be a string, got {json.dumps(record['reference'])[:80]}")
        records.append(record)
    if not records:
        raise UserError(f"{path}: no prompts in the file")
    return records


def evaluate_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpt evaluate",
        description="The batch test before training: loss, perplexity and bits per byte of a model on a text "
                    "file (sliding windows), responses to a JSONL file of prompts, and/or a multiple-choice task "
                    "scored by log-likelihood as lm-evaluation-harness scores it (MMLU, or any set of items). "
                    "With --model given two or more times, --text and --prompts measure an ensemble: the mean of the "
                    "models' next-token probabilities (--text adds each model's own figures).",
    )
    add_model_arguments(parser, ensemble=True)
    parser.add_argument("--text", type=cli_args.existing_file, help="a UTF-8 text file to measure loss, "
                                                                      "perplexity and bits per byte on")
    parser.add_argument("--window", type=cli_args.int_at_least(2), default=None,
                        help="tokens of context per window (default: the model's context length, at most 1024)")
    parser.add_argument("--stride", type=cli_args.positive_int, default=None,
                        help="step between windows, at most the window (default: window / 2)")
    parser.add_argument("--prompts", type=cli_args.existing_file,
                        help="JSONL with one {'prompt': ...} or {'messages': [...]} per line, optionally with "
                             "'reference' (the expected answer: exact match, BLEU and ROUGE-L are printed)")
    parser.add_argument("--out", type=cli_args.output_file, default=Path("responses.jsonl"),
                        help="where responses go (JSONL)")
    parser.add_argument("--template", choices=["auto", "chat", "none"], default="auto",
                        help="wrap plain prompts in the model's chat template: auto = when the model has one")
    parser.add_argument("--batch-size", type=cli_args.positive_int, default=8,
                        help="prompts or windows per forward pass")
    parser.add_argument("--max-new-tokens", type=cli_args.positive_int, default=128,
                        help="tokens per response (greedy)")
    parser.add_argument("--task", choices=["mmlu", "mc"], help="mmlu: the MMLU test set (`python -m gpt fetch mmlu`); "
                        "mc: the items of --data, one {'context', 'choices', 'answer'} per JSONL line")
    parser.add_argument("--data", type=cli_args.existing_file, help="the --task's items (default for mmlu: the "
                                                                    "fetched test set)")
    parser.add_argument("--shots", type=cli_args.non_negative_int, default=0,
                        help="mmlu: examples of the same subject before each question; --prompts with --few-shot: "
                             "examples of that file before each prompt")
    add_few_shot_argument(parser)
    parser.add_argument("--limit", type=cli_args.positive_int, default=None,
                        help="mmlu: the first N questions of each subject; mc: the first N items")
    parser.add_argument("--subjects", default=None, help="mmlu: comma-separated subjects (default: all 57)")
    parser.add_argument("--format", choices=["mcf", "cloze"], default="mcf",
                        help="mmlu: score the answer letters (mcf) or the answer texts (cloze)")
    parser.add_argument("--report", type=cli_args.output_folder, default=None,
                        help="--task: a folder for report.json, report.md and (mmlu) categories.png, a bar chart "
                             "of accuracy per category")
    args = parser.parse_args(argv)
    if not args.text and not args.prompts and not args.task:
        parser.error("give --text FILE, --prompts FILE.jsonl and/or --task")
    if args.task == "mc" and not args.data:
        parser.error("--task mc needs --data FILE.jsonl")
    if args.few_shot and not args.prompts:
        parser.error("--few-shot builds the prompts of --prompts FILE.jsonl")
    if args.shots and args.task != "mmlu" and not args.few_shot:
        parser.error("--shots applies to --task mmlu, and to --prompts with --few-shot FILE.jsonl")
    if args.window and args.stride and args.stride > args.window:
        parser.error(f"--stride {args.stride} exceeds --window {args.window}: the tokens between windows "
                     "would never be scored")
    inputs = [path for path in (args.text, args.prompts, args.data) if path]
    if (args.prompts or args.task) and any(args.out.resolve() == path.resolve() for path in inputs):
        parser.error(f"--out {args.out} is an input file; the responses would overwrite it")
    if args.task and len(model_sources(args)) > 1:
        parser.error(f"--task scores one model; an ensemble ({len(model_sources(args))} models) is not supported "
                     "there yet (--text and --prompts take one)")

    few_shot = few_shot_prompts(args)
    model, tokenizer = model_from_args(args)
    if args.text:
        try:
            text = args.text.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"{args.text}: cannot read the text ({err})") from None
        context = context_length_of(model)
        if args.window and args.window > context:
            raise UserError(f"--window {args.window} exceeds the model's context length ({context})")
        window = args.window or min(context, 1024)
        stride = args.stride or max(window // 2, 1)
        if stride > window:
            raise UserError(f"--stride {stride} exceeds the window ({window} tokens): the tokens between windows "
                            "would never be scored")
        start = time.perf_counter()
        if isinstance(model, Ensemble):
            metrics = model.text_metrics(text, window, stride, args.batch_size)
            members = {"members": [{"model": member.pop("model"), **rounded_figures(member)}
                                   for member in metrics.pop("members")]}
        else:
            metrics, members = text_metrics(model, tokenizer, text, window, stride, args.batch_size), {}
        print(json.dumps({"file": str(args.text), **metrics, **rounded_figures(metrics), "window": window,
                          "stride": stride, "seconds": round(time.perf_counter() - start, 1), **members}))
    if args.prompts:
        records = read_prompts(args.prompts)
        use_chat = args.template == "chat" or (args.template == "auto" and tokenizer.chat_template is not None)
        texts = []
        for index, record in enumerate(records):
            prompt = record.get("prompt")
            if few_shot is not None:
                if prompt is None:
                    raise UserError(f"{args.prompts}, prompt {index + 1}: --few-shot builds on a 'prompt', "
                                    "not on a chat ('messages')")
                prompt, used = few_shot.build(prompt)
                record["few_shot_lines"] = [example.line for example in used]  # written to --out with the response
            messages = record.get("messages") or [{"role": "user", "content": prompt}]
            texts.append(chat_prompt(messages, tokenizer) if use_chat or "messages" in record else prompt)
        prompt_ids = [fit_prompt(tokenizer.encode(t, allowed_special="all"), args.max_new_tokens,
                                 context_length_of(model)) for t in texts]
        responses = []
        for first in tqdm(range(0, len(records), args.batch_size), desc="prompts", dynamic_ncols=True):
            batch = prompt_ids[first:first + args.batch_size]
            outputs = (model.generate(batch, args.max_new_tokens, eos_id=tokenizer.eot_id)
                       if isinstance(model, Ensemble) else
                       generate(model, batch, args.max_new_tokens, temperature=0.0, eos_id=tokenizer.eot_id))
            for prompt, output in zip(batch, outputs):
                responses.append(tokenizer.decode([t for t in output[len(prompt):] if t != tokenizer.eot_id]))
        if few_shot is not None:  # the answer ends where the model would start another example
            responses = [few_shot.template.answer(response) for response in responses]
        write_text(args.out, "".join(json.dumps({**record, "response": response}, ensure_ascii=False) + "\n"
                                     for record, response in zip(records, responses)))
        print(f"wrote {len(records)} responses to {args.out}")
        referenced = [i for i, record in enumerate(records) if "reference" in record]
        if referenced:  # exact match, BLEU and ROUGE-L of the responses to the prompts that have a reference answer
            scores = reference_scores([responses[i] for i in referenced], [records[i]["reference"] for i in referenced])
            print(json.dumps({"references": len(referenced), **{k: round(v, 4) for k, v in scores.items()}}))
    if args.task:
        evaluate_task(model, tokenizer, args)
    return 0


def rounded_figures(metrics: dict) -> dict:
    """Loss, perplexity and bits per byte rounded as evaluate --text prints them."""
    return {"loss": round(metrics["loss"], 4), "perplexity": round(metrics["perplexity"], 3),
            "bits_per_byte": round(metrics["bits_per_byte"], 4)}


def evaluate_task(model: GPT, tokenizer: Tokenizer, args: argparse.Namespace) -> None:
    """--task: score the items, print the accuracies as JSON, write every item's scores to --out (JSONL)."""
    start = time.perf_counter()
    if args.task == "mmlu":
        path = args.data or cached_path("mmlu")
        if not path.is_file():
            raise UserError(f"{path}: the MMLU test set is not fetched; run `python -m gpt fetch mmlu` first")
        pool = mmlu.read_mmlu(path)
        subjects = [s.strip() for s in args.subjects.split(",")] if args.subjects else None
        questions = mmlu.select(pool, subjects, args.limit)
        items, examples = mmlu.build_items(questions, pool, args.shots, args.seed, args.format)
    else:
        items, examples = read_multiple_choice(args.data)[:args.limit], None
    with tqdm(total=len(items), desc=args.task, unit="item", dynamic_ncols=True) as progress:
        scored = score_items(model, tokenizer, items, args.batch_size, progress.update)
    summary = {"task": args.task, "model": model_sources(args)[0], "items": len(items),
               **multiple_choice_metrics(scored), "seconds": round(time.perf_counter() - start, 1)}
    if args.task == "mmlu":
        summary |= {"format": args.format, "shots": args.shots, "seed": args.seed,
                    **mmlu.accuracy_report(questions, scored)}
    else:
        summary["data"] = str(args.data)
    print(json.dumps(summary, indent=2))
    if args.report:
        written = write_task_report(args.report, summary)
        print(f"wrote {', '.join(str(path) for path in written)}", file=sys.stderr)
    rows = [{"index": i, **entry, **({"line": questions[i].line, "subject": questions[i].subject,
                                      "example_lines": examples[i]} if examples is not None else {})}
            for i, entry in enumerate(scored)]
    write_text(args.out, "".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote the scores of {len(rows)} items to {args.out}", file=sys.stderr)


def read_multiple_choice(path: Path) -> list[MultipleChoiceItem]:
    """Items of a JSONL file, one {"context": str, "choices": [str, ...], "answer": int} per line."""
    items = []
    for number, record in json_lines(path, path.read_text(encoding="utf-8")):
        context, choices, answer = (record.get(k) if isinstance(record, dict) else None
                                    for k in ("context", "choices", "answer"))
        if not (isinstance(context, str) and isinstance(choices, list) and len(choices) >= 2
                and all(isinstance(c, str) for c in choices) and isinstance(answer, int)
                and 0 <= answer < len(choices)):
            raise UserError(f"{path}, line {number}: expected {{\"context\": text, \"choices\": [two or more texts], "
                            f"\"answer\": index of the right choice}}")
        items.append(MultipleChoiceItem(context, choices, answer))
    if not items:
        raise UserError(f"{path}: no items")
    return items
