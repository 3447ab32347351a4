"""Our model as an lm-evaluation-harness backend, `--model gpt` (the `eval` extra installs the harness).

The harness builds a task's prompts and computes its metrics; a backend answers three kinds of request:

    loglikelihood(context, continuation)   the continuation's summed log-probability after the context, and
                                           whether greedy decoding would have produced it (multiple choice)
    loglikelihood_rolling(text)            the whole text's log-probability, in windows of `max_length` tokens
                                           that predict every token exactly once (perplexity tasks)
    generate_until(context, gen_kwargs)    greedy text after the context, cut at the first `until` string,
                                           at most `max_gen_toks` tokens (generative tasks)

Log-likelihoods use `gpt.evaluate.multiple_choice`: the harness' context/continuation token split
(`encode_pair`) and batched scoring (`continuation_loglikelihoods`). Rolling windows are the harness'
own (`get_rolling_token_windows`, `make_disjoint_window`), each scored as a (context, continuation)
pair. An empty context, and the start of a rolling text, is the harness' prefix token: the vocabulary's
beginning-of-text token if it has one (GPT-2's is its end-of-text), else end-of-text. Generation is
`gpt.generate.stream_tokens`: a batch of left-padded prompts, decoding stopped once every row has
reached end-of-text or one of its stop strings.

Model arguments (`--model_args model=M,batch_size=8,...`):

    model         anything `python -m gpt ... --model` takes: a known name, a .gguf file, a Hugging Face
                  folder, one of our checkpoints or run folders
    device        auto | cpu | cuda | cuda:N | mps (default auto); on the command line, the harness'
                  `--device` gives it (whose default, cuda:0, is an error on a machine without a GPU)
    batch_size    requests per forward pass (default 1); on the command line, the harness' `--batch_size`
    max_length    tokens of context per forward pass (default: the model's context length)
    max_gen_toks  tokens a generation may add when the task does not say (default 256)
    seed          seed of a random-init preset model (default 0)

The harness finds a backend in its registry, which lm-eval 0.4.x fills only with its own backends
and with those of modules imported before it runs: it has no plugin entry point for other packages.
Importing this module registers `gpt`; `python -m gpt lm-eval ARGS` imports it and then runs the
harness' command line (`lm_eval ARGS`) unchanged; from Python, import this module and call
`lm_eval.simple_evaluate(model="gpt", ...)`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from contextlib import closing

import torch
from tqdm.auto import tqdm

from ..errors import UserError
from ..generate import stream_tokens
from ..runtime import enable_tf32, pick_device
from ..weights import load_model_and_tokenizer
from .multiple_choice import continuation_loglikelihoods, encode_pair, prefix_token

try:
    # The harness' own backends register first: its registry loads them only while it is empty.
    import lm_eval.models  # noqa: F401
    from lm_eval.__main__ import cli_evaluate
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import normalize_gen_kwargs
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as err:
    raise UserError(f'the lm-evaluation-harness backend needs lm-eval ({err}): pip install -e ".[eval]"') from None


@register_model("gpt")
class HarnessModel(LM):
    """A model of ours answering the harness' requests (module docstring)."""

    def __init__(self, model: str | None = None, device: str = "auto", batch_size: int | str = 1,
                 max_length: int | None = None, max_gen_toks: int = 256, seed: int = 0, **unknown: object) -> None:
        super().__init__()
        if unknown:
            raise UserError(f"lm-eval --model gpt: unknown model_args {', '.join(sorted(unknown))}; known: model, "
                            "device, batch_size, max_length, max_gen_toks, seed")
        if not model:
            raise UserError("lm-eval --model gpt needs --model_args model=M (a known name, a .gguf file, a Hugging "
                            "Face folder, or one of our checkpoints or run folders)")
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")
        self._device = pick_device(str(device), "--device")
        enable_tf32(self._device)  # float32 matmuls on a GPU's tensor cores, as the other verbs run them
        loaded = load_model_and_tokenizer(str(model), seed=int(seed))
        self.model, self.tokenizer = loaded.model.to(self._device).eval(), loaded.tokenizer
        self.prefix_id = prefix_token(self.tokenizer)  # the harness' `prefix_token_id`: an empty context
        context_length = self.model.config.context_length
        self.max_length = context_length if max_length is None else _positive_int(max_length, "max_length")
        if self.max_length > context_length:
            raise UserError(f"lm-eval --model gpt: max_length={self.max_length} exceeds the model's context "
                            f"length ({context_length})")

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(summed log-probability, is greedy) of each request's continuation after its context."""
        pairs = [encode_pair(self.tokenizer, *request.args) for request in requests]
        return [(total, greedy) for total, _, greedy in self._score(pairs, "loglikelihood", disable_tqdm)]

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Each request's whole text scored after the prefix token, in the harness' disjoint rolling windows."""
        windows: list[tuple[list[int], list[int]]] = []
        owners: list[int] = []  # the request each window belongs to
        for index, request in enumerate(requests):
            ids = self.tokenizer.encode(request.args[0])
            for window in get_rolling_token_windows(ids, self.prefix_id, self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (total, _, _) in zip(owners, self._score(windows, "loglikelihood_rolling", disable_tqdm)):
            totals[owner] += total
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations; requests with the same generation settings are decoded in batches,
        longest prompt first."""
        groups: dict[str, list[int]] = {}  # generation settings (as JSON) -> the requests that use them
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        results: list[str] = [""] * len(requests)
        with tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm, file=sys.stderr) as progress:
            for indices in groups.values():
                until, max_gen_toks = self._generation_settings(requests[indices[0]].args[1])
                room = self.max_length - max_gen_toks  # prompt tokens that leave room for the generation
                if room < 1:
                    raise UserError(f"lm-eval --model gpt: max_gen_toks={max_gen_toks} leaves no room for a prompt "
                                    f"in max_length={self.max_length}")
                prompts = {index: self.tokenizer.encode(requests[index].args[0])[-room:] or [self.prefix_id]
                           for index in indices}
                order = sorted(indices, key=lambda index: -len(prompts[index]))
                for start in range(0, len(order), self.batch_size):
                    batch = order[start:start + self.batch_size]
                    texts = self._generate([prompts[index] for index in batch], until, max_gen_toks)
                    for index, text in zip(batch, texts):
                        results[index] = text
                    progress.update(len(batch))
        return results

    def get_model_info(self) -> dict:
        """What the harness records about the model in its results."""
        return {"model_num_parameters": self.model.num_parameters(),
                "model_dtype": str(self.model.tok_emb.weight.dtype)}

    def _score(self, pairs: Sequence[tuple[list[int], list[int]]], desc: str,
               disable_tqdm: bool) -> list[tuple[float, int, bool]]:
        """`continuation_loglikelihoods` of (context ids, continuation ids) pairs, each context cut from the
        left to fit `max_length` as the harness cuts it."""
        fitted = [self._fit(context, continuation) for context, continuation in pairs]
        with tqdm(total=len(fitted), desc=desc, disable=disable_tqdm, file=sys.stderr) as progress:
            return continuation_loglikelihoods(self.model, fitted, self.batch_size,
                                               on_scored=lambda indices: progress.update(len(indices)))

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """The pair with its context's last tokens only, so that context + continuation minus the last
        token (the model's input) is at most `max_length` tokens, as the harness cuts it."""
        room = self.max_length + 1 - len(continuation)  # the last token is never an input
        if room < 1:
            raise UserError(f"lm-eval --model gpt: a continuation of {len(continuation)} tokens does not fit in "
                            f"max_length={self.max_length}")
        return context[-room:], continuation

    def _generation_settings(self, gen_kwargs: dict) -> tuple[list[str], int]:
        """The stop strings and the token budget of a request's generation settings; sampling is refused."""
        settings = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        if settings["do_sample"]:
            raise UserError(f"lm-eval --model gpt decodes greedily, but the task asks for sampling ({gen_kwargs}); "
                            "set do_sample=false (e.g. --gen_kwargs do_sample=false)")
        until = [stop for stop in settings["until"] if stop]
        # The harness also stops at the end-of-text token's text, which a model can spell out token by token.
        return until + [self.tokenizer.decode([self.tokenizer.eot_id])], settings["max_gen_toks"]

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], until: list[str], max_gen_toks: int) -> list[str]:
        """Greedy text after each prompt, up to end-of-text, cut before the first stop string. Decoding
        stops once every row is done."""
        eot = self.tokenizer.eot_id
        new: list[list[int]] = [[] for _ in prompts]  # each row's generated tokens, end-of-text excluded
        done = [False] * len(prompts)
        with closing(stream_tokens(self.model, prompts, max_gen_toks, eos_id=eot)) as steps:
            for step in steps:  # (B,) the next token of every row
                for row, token in enumerate(step.tolist()):
                    if done[row]:
                        continue
                    if token == eot:
                        done[row] = True
                        continue
                    new[row].append(token)
                    done[row] = any(stop in self.tokenizer.decode(new[row]) for stop in until)
                if all(done):
                    break
        return [_cut(self.tokenizer.decode(tokens), until) for tokens in new]


def _cut(text: str, stops: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any stop string."""
    return text[:min((text.find(stop) for stop in stops if stop in text), default=len(text))]


def _positive_int(value: object, name: str) -> int:
    """A model argument that must be a whole number of at least 1 (the harness passes numbers or strings)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, str) and value.strip().isdigit() and int(value) >= 1:
        return int(value)
    hint = " (this backend has no automatic batch size)" if str(value).startswith("auto") else ""
    raise UserError(f"lm-eval --model gpt: {name} must be a whole number of at least 1, got {value!r}{hint}")


def lm_eval_cli(argv: list[str]) -> int:
    """`python -m gpt lm-eval ARGS`: the harness' own command line (`lm_eval ARGS`), with `--model gpt`
    registered (this module is imported)."""
    saved = sys.argv
    sys.argv = ["lm_eval", *argv]  # the harness' command line reads sys.argv itself
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
