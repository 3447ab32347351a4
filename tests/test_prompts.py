"""Prompt templates: exact layouts, where the response starts, token prefixes for loss
masking, chat records, the model's own template, and reading instruction files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpt.errors import UserError
from gpt.prompts import (
    TEMPLATES,
    chat_prompt,
    expected_response,
    format_example,
    format_prompt,
    read_instruction_records,
)
from gpt.tokenizer import get_tokenizer

DATA_PATH = Path(__file__).resolve().parents[1] / "data" / "instructions.json"
CHATML_JINJA = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
WITH_INPUT = {"instruction": "Sort these words.", "input": "pear, fig", "output": "fig, pear"}
NO_INPUT = {"instruction": "Say hi.", "output": "hi"}
CHAT = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6"},
]}


class FakeTokenizer:
    """Just what the templates read from a tokenizer: a name, a chat template and token texts."""

    def __init__(self, chat_template: str | None, eot: str = "<|im_end|>") -> None:
        self.name = "fake"
        self.chat_template = chat_template
        self.special_tokens = {"<s>": 0, eot: 1}
        self.bos_id, self.eot_id = 0, 1
        self._texts = {0: "<s>", 1: eot}

    def decode(self, ids: list[int]) -> str:
        return "".join(self._texts[i] for i in ids)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """SmolLM2's tokenizer (slow tests only: the model must be fetched)."""
    return get_tokenizer(str(smollm2_gguf))


def test_alpaca_layout_with_and_without_input():
    prompt, full = format_example(WITH_INPUT, "alpaca")
    assert prompt == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSort these words.\n\n### Input:\npear, fig\n\n### Response:\n"
    )
    assert full == prompt + "fig, pear<|endoftext|>"
    prompt = format_prompt(NO_INPUT, "alpaca")
    assert prompt == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    )
    # An empty or null input is no input: no "### Input:" section.
    assert format_prompt({**NO_INPUT, "input": ""}, "alpaca") == prompt
    assert format_prompt({**NO_INPUT, "input": None}, "alpaca") == prompt


def test_chatml_and_phi3_layouts():
    assert format_example(WITH_INPUT, "chatml") == (
        "<|im_start|>user\nSort these words.\n\npear, fig<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nSort these words.\n\npear, fig<|im_end|>\n<|im_start|>assistant\nfig, pear<|im_end|>",
    )
    assert format_example(NO_INPUT, "phi3") == (
        "<|user|>\nSay hi.<|end|>\n<|assistant|>\n",
        "<|user|>\nSay hi.<|end|>\n<|assistant|>\nhi<|end|>",
    )


def test_chat_record_last_assistant_message_is_the_response():
    assert expected_response(CHAT) == "6"
    prompt, full = format_example(CHAT, "phi3")
    assert prompt == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\n2+2?<|end|>\n<|assistant|>\n4<|end|>\n"
        "<|user|>\nAnd 3+3?<|end|>\n<|assistant|>\n"
    )
    assert full == prompt + "6<|end|>"
    assert format_prompt(CHAT, "chatml").endswith("<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n")
    # A chat of one user message is an Alpaca instruction without input.
    single = {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]}
    assert format_example(single, "alpaca") == format_example(NO_INPUT, "alpaca")
    with pytest.raises(UserError, match="alpaca template takes one user message.*4 messages"):
        format_prompt(CHAT, "alpaca")


@pytest.mark.parametrize("template, record", [
    pytest.param(template, record, id=f"{template}-{kind}")
    for template in ("alpaca", "chatml", "phi3", "model")
    for kind, record in (("input", WITH_INPUT), ("no-input", NO_INPUT), ("chat", CHAT))
    if (template, kind) != ("alpaca", "chat")  # alpaca takes one user turn
])
def test_response_starts_at_len_prompt(template, record):
    tokenizer = FakeTokenizer(CHATML_JINJA)
    prompt, full = format_example(record, template, tokenizer)
    end = {"alpaca": "<|im_end|>", "chatml": "<|im_end|>", "phi3": "<|end|>", "model": "<|im_end|>"}[template]
    assert format_prompt(record, template, tokenizer) == prompt
    assert full.startswith(prompt)
    assert full[len(prompt):] == expected_response(record) + end


def test_alpaca_end_marker_is_the_tokenizers_end_of_text():
    assert format_example(NO_INPUT, "alpaca", get_tokenizer("gpt2"))[1].endswith("\nhi<|endoftext|>")
    assert format_example(NO_INPUT, "alpaca", FakeTokenizer(None, eot="</s>"))[1].endswith("\nhi</s>")


def test_model_template_end_marker_and_errors():
    # The model's template writes "<|im_end|>\n" after a reply; the end marker stops at the end-of-turn token.
    prompt, full = format_example(NO_INPUT, "model", FakeTokenizer(CHATML_JINJA))
    assert prompt == "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    assert full == prompt + "hi<|im_end|>"
    # A template that writes nothing after the reply gets the end-of-turn token.
    bare = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}" \
           "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    assert format_example(NO_INPUT, "model", FakeTokenizer(bare, eot="</s>"))[1] == "user: Say hi.\nassistant: hi</s>"
    with pytest.raises(UserError, match="needs the model's tokenizer"):
        format_prompt(NO_INPUT, "model")
    with pytest.raises(UserError, match="has no chat template: choose one of alpaca, chatml, phi3"):
        format_prompt(NO_INPUT, "model", get_tokenizer("gpt2"))
    trimming = CHATML_JINJA.replace("m['content']", "m['content'] | trim")
    with pytest.raises(UserError, match="does not write the reply right after"):
        format_example({**NO_INPUT, "output": " hi"}, "model", FakeTokenizer(trimming))


def test_unknown_template_and_bad_records():
    with pytest.raises(UserError, match=r"unknown prompt template 'vicuna'; known: alpaca, chatml, phi3, model"):
        format_prompt(NO_INPUT, "vicuna")
    assert list(TEMPLATES) == ["alpaca", "chatml", "phi3", "model"]
    with pytest.raises(UserError, match="missing field 'instruction'"):
        format_prompt({"output": "x"}, "chatml")
    with pytest.raises(UserError, match="missing field 'output'"):
        format_example({"instruction": "x"}, "chatml")
    with pytest.raises(UserError, match="field 'instruction' must be a string, got NoneType"):
        format_prompt({"instruction": None, "output": "y"}, "chatml")
    with pytest.raises(UserError, match="field 'input' must be a string, got int"):
        format_prompt({"instruction": "x", "input": 3, "output": "y"}, "chatml")
    with pytest.raises(UserError, match=r"the last message \(messages\[1\]\) must be the assistant's reply"):
        format_prompt({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}, "chatml")
    with pytest.raises(UserError, match=r"messages\[1\] needs a 'role' of system, user, assistant"):
        format_prompt({"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}, "chatml")


@pytest.mark.slow
def test_model_template_on_smollm2_equals_chat_prompt(smollm2):
    user_message = [{"role": "user", "content": "Sort these words.\n\npear, fig"}]
    prompt, full = format_example(WITH_INPUT, "model", smollm2)
    assert prompt == chat_prompt(user_message, smollm2)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert full == prompt + "fig, pear<|im_end|>"


def _token_prefix_failures(records, template, tokenizer):
    failures = []
    for index, record in enumerate(records):
        prompt, full = format_example(record, template, tokenizer)
        prompt_ids = tokenizer.encode(prompt, allowed_special="all")
        full_ids = tokenizer.encode(full, allowed_special="all")
        if full_ids[:len(prompt_ids)] != prompt_ids:
            failures.append(index)
    return failures


@pytest.mark.slow
@pytest.mark.parametrize("template", ["chatml", "model", "alpaca", "phi3"])
def test_prompt_tokens_are_a_prefix_of_full_tokens_smollm2(smollm2, template):
    records = read_instruction_records(DATA_PATH)
    assert _token_prefix_failures(records, template, smollm2) == []


@pytest.mark.parametrize("template", ["chatml", "alpaca", "phi3"])
def test_prompt_tokens_are_a_prefix_of_full_tokens_gpt2(template):
    records = read_instruction_records(DATA_PATH)
    assert _token_prefix_failures(records, template, get_tokenizer("gpt2")) == []


@pytest.mark.slow
def test_token_prefix_can_break_when_the_response_starts_with_whitespace(smollm2):
    # Every prompt ends in "\n". A response that starts with a word, a digit, or one space or newline
    # before a word keeps the prompt's tokens a prefix. Whitespace that the pre-tokenizer joins to
    # that "\n" breaks it: two or more whitespace characters, or (SmolLM2 splits digits) any
    # whitespace before a digit. Encoding the prompt and the rest separately avoids this.
    outputs = ["hi", "1", " hi", "\nhi", "\n\nhi", "  hi", " 1", "\n1"]
    records = [{**NO_INPUT, "output": output} for output in outputs]
    for template in ("chatml", "alpaca"):
        assert _token_prefix_failures(records, template, smollm2) == [4, 5, 6, 7]


def test_read_json_and_jsonl(tmp_path):
    records = [WITH_INPUT, NO_INPUT, CHAT]
    as_json = tmp_path / "data.json"
    as_json.write_text(json.dumps(records, indent=2))
    as_jsonl = tmp_path / "data.jsonl"
    as_jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert read_instruction_records(as_json) == records
    assert read_instruction_records(as_jsonl) == records
    assert len(read_instruction_records(DATA_PATH)) == 1500


@pytest.mark.parametrize("name, text, message", [
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n',
     r"bad.jsonl, line 2, column \d+: not valid JSON"),
    ("missing.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "a"}\n',
     r"missing.jsonl, line 3: missing field 'output'"),
    ("list.jsonl", '["instruction", "output"]\n', r"list.jsonl, record 0: expected a JSON object, got str"),
    ("bad.json", '[{"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}]',
     r"bad.json, line 2, column \d+: not valid JSON"),
    ("index.json", '[{"instruction": "a", "output": "b"}, {"instruction": "a", "output": "b"}, {"input": "c"}]',
     r"index.json, record 2: missing field 'instruction'"),
    ("notobject.json", '[{"instruction": "a", "output": "b"}, 7]', r"notobject.json, record 1: expected a JSON object"),
    ("empty.json", "[]", r"empty.json: no instruction records"),
    ("empty.jsonl", "\n\n", r"empty.jsonl: no instruction records"),
])
def test_read_errors_name_file_and_line_or_record(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        read_instruction_records(path)


def test_read_missing_file(tmp_path):
    with pytest.raises(UserError, match="nothing.json: cannot read instruction data"):
        read_instruction_records(tmp_path / "nothing.json")
