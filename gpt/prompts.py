"""Prompt formats: chat templates, and instruction templates for fine-tuning.

A chat is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`.
`chat_prompt` turns it into the text a model was trained to continue, ending where the
assistant's next reply starts. A GGUF model brings its chat template (a Jinja string);
it is rendered with jinja2 when that is installed, and ChatML-style templates also
work without it.

Instruction fine-tuning reads records of two shapes (`read_instruction_records`):

    {"instruction": ..., "input": ... (optional), "output": ...}        Alpaca-style
    {"messages": [{"role": ..., "content": ...}, ..., {"role": "assistant", ...}]}

and lays them out with one of `TEMPLATES` (alpaca, chatml, phi3, or "model": the
chat template the model brings). `format_example` returns the prompt and the full
text, prompt + response + the template's end-of-turn marker, so the response
starts exactly at `len(prompt)`: the training loss counts only what comes after.

    prompt, full = format_example({"instruction": "Add 2 and 3.", "output": "5"}, "chatml")
    prompt  # '<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n'
    full    # prompt + '5<|im_end|>'
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .files import json_lines

Message = dict[str, str]


def chatml(messages: list[Message], add_generation_prompt: bool = True) -> str:
    """ChatML: each turn is `<|im_start|>role\\ncontent<|im_end|>\\n`; the reply starts after `<|im_start|>assistant\\n`."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def render_jinja_template(template: str, messages: list[Message], add_generation_prompt: bool, **variables: Any) -> str:
    """Render a Hugging Face-style Jinja chat template in a sandbox (no file or attribute access)."""
    return _compiled_jinja_template(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **variables
    )


@functools.lru_cache(maxsize=8)
def _compiled_jinja_template(template: str) -> Any:
    """Compile a chat template once: formatting a data set renders the same template thousands of times."""
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise UserError("this model's chat template needs jinja2: pip install jinja2") from None

    def raise_exception(message: str) -> None:
        raise UserError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def chat_prompt(messages: list[Message], tokenizer: Any, add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages` in the format `tokenizer`'s model expects.

    The model's own template when it has one; ChatML when the vocabulary has ChatML's
    markers; otherwise plain "User: ... / Assistant:" lines.
    """
    template = getattr(tokenizer, "chat_template", None)
    specials = getattr(tokenizer, "special_tokens", {})
    if template and (importlib.util.find_spec("jinja2") is not None or "<|im_start|>" not in template):
        return render_jinja_template(template, messages, add_generation_prompt,
                                     bos_token=_token_text(tokenizer, "bos_id"),
                                     eos_token=_token_text(tokenizer, "eot_id"))
    if "<|im_start|>" in specials or (template and "<|im_start|>" in template):
        return chatml(messages, add_generation_prompt)
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + ("\nAssistant:" if add_generation_prompt else "")


def _token_text(tokenizer: Any, attribute: str) -> str:
    token_id = getattr(tokenizer, attribute, None)
    return tokenizer.decode([token_id]) if token_id is not None else ""


# ----------------------------------------------------------------------------
# instruction templates
# ----------------------------------------------------------------------------

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
GPT2_END_OF_TEXT = "<|endoftext|>"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class InstructionExample:
    """A record taken apart: the conversation before the reply, and the reply.

    `instruction` and `input` are the Alpaca fields; a chat record has them only
    when it is a single user message (that message is the instruction).
    """

    messages: list[Message]
    response: str
    instruction: str | None
    input: str


def _alpaca(example: InstructionExample, tokenizer: Any) -> tuple[str, str]:
    if example.instruction is None:
        raise UserError(
            f"the alpaca template takes one user message before the reply; this chat has "
            f"{len(example.messages)} messages ({', '.join(m['role'] for m in example.messages)}): "
            "use chatml, phi3 or model"
        )
    if example.input:
        prompt = (f"{ALPACA_PREAMBLE_WITH_INPUT}\n\n### Instruction:\n{example.instruction}\n\n"
                  f"### Input:\n{example.input}\n\n### Response:\n")
    else:
        prompt = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{example.instruction}\n\n### Response:\n"
    end = _token_text(tokenizer, "eot_id") if tokenizer is not None else GPT2_END_OF_TEXT
    return prompt, end


def _chatml(example: InstructionExample, tokenizer: Any) -> tuple[str, str]:
    return chatml(example.messages), "<|im_end|>"


def _phi3(example: InstructionExample, tokenizer: Any) -> tuple[str, str]:
    turns = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in example.messages)
    return turns + "<|assistant|>\n", "<|end|>"


def _model(example: InstructionExample, tokenizer: Any) -> tuple[str, str]:
    if tokenizer is None:
        raise UserError("the 'model' template needs the model's tokenizer, which carries its chat template")
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{tokenizer.name} has no chat template: choose one of alpaca, chatml, phi3")
    prompt = chat_prompt(example.messages, tokenizer)
    reply = {"role": "assistant", "content": example.response}
    rendered = chat_prompt(example.messages + [reply], tokenizer, add_generation_prompt=False)
    if not rendered.startswith(prompt + example.response):
        raise UserError(
            f"the chat template of {tokenizer.name} does not write the reply right after its generation prompt, "
            "so the response cannot be masked: choose one of alpaca, chatml, phi3"
        )
    # The end marker is what the template writes after the reply, up to and including the
    # end-of-turn token (a template may add a newline or the next turn's opening after it).
    tail = rendered[len(prompt) + len(example.response):]
    eot = _token_text(tokenizer, "eot_id")
    return prompt, tail[:tail.index(eot) + len(eot)] if eot and eot in tail else eot


@dataclass(frozen=True)
class PromptTemplate:
    """An instruction layout: `render(example, tokenizer)` gives (prompt, end-of-turn marker)."""

    description: str
    render: Callable[[InstructionExample, Any], tuple[str, str]]


TEMPLATES: dict[str, PromptTemplate] = {
    "alpaca": PromptTemplate(
        "Stanford Alpaca: a preamble, '### Instruction:', '### Input:' (only when the input is not empty) and "
        "'### Response:' sections. Alpaca has no end-of-turn marker of its own: the response ends with the "
        f"tokenizer's end-of-text token (its eot_id as text), or GPT-2's {GPT2_END_OF_TEXT} without a tokenizer.",
        _alpaca,
    ),
    "chatml": PromptTemplate(
        "ChatML: '<|im_start|>role\\ncontent<|im_end|>\\n' turns; the response ends with <|im_end|>.", _chatml
    ),
    "phi3": PromptTemplate(
        "Phi-3: '<|role|>\\ncontent<|end|>\\n' turns; the response ends with <|end|>.", _phi3
    ),
    "model": PromptTemplate(
        "the chat template the model brings (GGUF metadata), rendered by chat_prompt; the response ends with "
        "what the template writes after a reply, up to its end-of-turn token.",
        _model,
    ),
}


def parse_record(record: dict[str, Any]) -> InstructionExample:
    """Take a record apart; a missing or mistyped field raises UserError naming it (the caller adds where)."""
    if not isinstance(record, dict):
        raise UserError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return _chat_example(record["messages"])
    for field in ("instruction", "output"):
        if field not in record:
            raise UserError(f"missing field {field!r} (a record needs 'instruction' and 'output', or 'messages')")
    for field in ("instruction", "input", "output"):
        value = record.get(field)
        if not isinstance(value, str) and not (field == "input" and value is None):  # no input: missing or null
            raise UserError(f"field {field!r} must be a string, got {type(value).__name__}")
    instruction, given = record["instruction"], record.get("input") or ""
    content = f"{instruction}\n\n{given}" if given else instruction
    return InstructionExample([{"role": "user", "content": content}], record["output"], instruction, given)


def _chat_example(messages: Any) -> InstructionExample:
    if not isinstance(messages, list) or len(messages) < 2:
        raise UserError("field 'messages' must be a list of at least two messages, the last one the assistant's")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise UserError(f"messages[{index}] needs a 'role' of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise UserError(f"messages[{index}] needs a string 'content'")
    if messages[-1]["role"] != "assistant":
        raise UserError(f"the last message (messages[{len(messages) - 1}]) must be the assistant's reply, "
                        f"not the {messages[-1]['role']}'s")
    before = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
    single_user = len(before) == 1 and before[0]["role"] == "user"
    return InstructionExample(before, messages[-1]["content"], before[0]["content"] if single_user else None, "")


def get_template(name: str) -> PromptTemplate:
    """The template called `name`; an unknown name raises UserError listing the known ones."""
    if name not in TEMPLATES:
        raise UserError(f"unknown prompt template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def format_prompt(record: dict[str, Any], template: str, tokenizer: Any = None) -> str:
    """The text of `record` laid out with `template`, up to where the response starts."""
    return get_template(template).render(parse_record(record), tokenizer)[0]


def format_example(record: dict[str, Any], template: str, tokenizer: Any = None) -> tuple[str, str]:
    """(prompt, full text): full = prompt + response + the template's end-of-turn marker.

    The response starts exactly at `len(prompt)`. `tokenizer` is needed for "model",
    and picks Alpaca's end marker.
    """
    example = parse_record(record)
    prompt, end = get_template(template).render(example, tokenizer)
    return prompt, prompt + example.response + end


def expected_response(record: dict[str, Any]) -> str:
    """The response a record teaches: its `output`, or the content of its last (assistant) message."""
    return parse_record(record).response


def read_instruction_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Records from a JSON file (a list of objects) or a JSONL file (one object a line).

    The format is told by the content: a file whose text starts with '[' is JSON.
    Each record is checked (`parse_record`); a bad one raises UserError naming the file
    and the line (JSONL, from 1) or the record index (JSON, from 0).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read instruction data ({err})") from None
    located: list[tuple[str, Any]] = []
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}, line {err.lineno}, column {err.colno}: not valid JSON ({err.msg})") from None
        located = [(f"record {index}", record) for index, record in enumerate(records)]
    else:
        located = [(f"line {number}", record) for number, record in json_lines(path, text)]
    if not located:
        raise UserError(f"{path}: no instruction records in the file")
    for where, record in located:
        try:
            parse_record(record)
        except UserError as err:
            raise UserError(f"{path}, {where}: {err}") from None
    return [record for _, record in located]
