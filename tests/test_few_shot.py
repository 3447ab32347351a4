"""Few-shot prompts: the template, seeded draws that never show the query, the example file, and the
`generate --few-shot` / `evaluate --prompts --few-shot` flags."""

import json
import random

import pytest
import torch

from gpt.checkpoint import save_checkpoint
from gpt.cli import evaluate_cli, generate_cli
from gpt.config import ModelConfig
from gpt.errors import UserError
from gpt.few_shot import Example, FewShotPrompts, FewShotTemplate, draw_examples, read_examples
from gpt.model import GPT
from gpt.tokenizer import get_tokenizer


def test_the_prompt_is_header_examples_and_query():
    template = FewShotTemplate(example="Q: {input}\nA: {output}", header="Answer briefly.\n\n", separator="\n\n")
    examples = [Example("2 + 2?", "4"), Example("3 + 5?", "8")]
    assert template.prompt(examples, "7 + 1?") == "Answer briefly.\n\nQ: 2 + 2?\nA: 4\n\nQ: 3 + 5?\nA: 8\n\nQ: 7 + 1?\nA:"
    assert template.prompt([], "7 + 1?") == "Answer briefly.\n\nQ: 7 + 1?\nA:"  # zero-shot: the same layout
    default = FewShotTemplate()
    assert default.prompt([Example("one", "1")], "two") == "Input: one\nOutput: 1\n\nInput: two\nOutput:"
    # Braces inside the texts are text, not fields.
    tricky = [Example("{output} and {input}", "{x}")]
    assert default.prompt(tricky, "{input}") == "Input: {output} and {input}\nOutput: {x}\n\nInput: {input}\nOutput:"


def test_a_template_needs_input_then_output():
    for bad in ("{input} only", "{output} {input}", "{input} {input} {output}", "plain"):
        with pytest.raises(UserError, match="needs {input} once and then {output} once"):
            FewShotTemplate(example=bad)


def test_the_answer_ends_at_the_separator():
    template = FewShotTemplate()
    assert template.answer(" 42\n\nInput: next one\nOutput: 7") == "42"
    assert template.answer("\n\n 42 \n") == "42"  # leading whitespace is not an empty answer
    assert template.answer(" no separator at all ") == "no separator at all"


def test_draws_are_seeded_and_never_the_query():
    pool = list(range(10))
    drawn = [draw_examples(pool, 3, random.Random(5), lambda x: x == 4, where="the pool") for _ in range(2)]
    assert drawn[0] == drawn[1] and len(set(drawn[0])) == 3 and 4 not in drawn[0]
    everything = draw_examples(pool, 9, random.Random(0), lambda x: x == 4, where="the pool")
    assert sorted(everything) == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    with pytest.raises(UserError, match=r"--shots 10: the pool has only 9 other examples"):
        draw_examples(pool, 10, random.Random(0), lambda x: x == 4, where="the pool")


def test_each_query_gets_its_own_draw_without_itself():
    examples = [Example(word, str(n), n) for n, word in enumerate(["one", "two", "three", "four"], start=1)]
    prompts = FewShotPrompts(examples, 3, seed=0)
    for query in ["two", " three ", "five"]:
        text, used = prompts.build(query)
        assert len(used) == 3 and query.strip() not in [e.input for e in used]
        assert text.endswith(f"Input: {query}\nOutput:")
        assert all(f"Input: {e.input}\nOutput: {e.output}\n\n" in text for e in used)
    with pytest.raises(UserError, match=r"--shots 5: ex.jsonl holds only 4 examples"):
        FewShotPrompts(examples, 5, seed=0, source="ex.jsonl")


@pytest.mark.parametrize("content, message", [
    ('{"input": "a", "output": "b"}\n{"input": "c"}\n', r"ex\.jsonl, line 2: expected \{\"input\": text"),
    ('{"input": "a", "output": 1}\n', r"ex\.jsonl, line 1: expected"),
    ('["a", "b"]\n', r"ex\.jsonl, line 1: expected"),
    ('{"input": "a", "output": "b"}\n\n{"input": \n', r"ex\.jsonl, line 3, column \d+: not valid JSON"),
    ("\n", r"ex\.jsonl: no few-shot examples"),
])
def test_a_bad_example_file_names_the_line(tmp_path, content, message):
    path = tmp_path / "ex.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        read_examples(path)


# ----------------------------------------------------------------------------
# The verbs, on a tiny random model
# ----------------------------------------------------------------------------

WORDS = {1: ("one", "1"), 2: ("two", "2"), 3: ("four", "4")}  # line -> (input, output) of the example file


@pytest.fixture
def files(tmp_path):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50257, context_length=128, d_model=32, n_layer=1, n_head=2))
    save_checkpoint(tmp_path / "m.pt", model, tokenizer="gpt2")
    examples = tmp_path / "examples.jsonl"
    examples.write_text("".join(json.dumps({"input": i, "output": o}) + "\n" for i, o in WORDS.values()))
    return model.eval(), tmp_path / "m.pt", examples


def greedy(model: GPT, text: str, steps: int) -> str:
    """The greedy continuation of `text`, one full forward per token, up to the end-of-text token."""
    tokenizer = get_tokenizer("gpt2")
    ids = tokenizer.encode(text)
    start = len(ids)
    with torch.no_grad():
        for _ in range(steps):
            next_id = int(model(torch.tensor([ids]))[0, -1].argmax())
            if next_id == tokenizer.eot_id:
                break
            ids.append(next_id)
    return tokenizer.decode(ids[start:])


def test_generate_with_few_shot_prints_the_prompt_and_the_examples(files, capsys):
    model, checkpoint, examples = files
    assert generate_cli(["--checkpoint", str(checkpoint), "--few-shot", str(examples), "--shots", "2",
                         "--prompt", "two", "--temperature", "0", "--max-new-tokens", "5", "--seed", "3"]) == 0
    out, err = capsys.readouterr()
    # "two" is never its own example, so the two shots are lines 1 and 3, in the drawn order.
    order = [1, 3] if "line(s) [1, 3]" in err else [3, 1]
    assert f"line(s) {order} of {examples}" in err and "drawn with seed 3" in err
    prompt = "".join(f"Input: {WORDS[n][0]}\nOutput: {WORDS[n][1]}\n\n" for n in order) + "Input: two\nOutput:"
    assert out == prompt + greedy(model, prompt, 5) + "\n"


def test_evaluate_zero_and_few_shot_on_the_same_prompts(files, tmp_path, capsys):
    model, checkpoint, examples = files
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "two", "reference": "2"}\n{"prompt": "three", "reference": "3"}\n')
    for shots in (0, 2):
        out = tmp_path / f"shots{shots}.jsonl"
        assert evaluate_cli(["--checkpoint", str(checkpoint), "--prompts", str(prompts), "--few-shot", str(examples),
                             "--shots", str(shots), "--max-new-tokens", "6", "--out", str(out)]) == 0
        summary = json.loads(capsys.readouterr().out.splitlines()[-1])
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        hits = []
        for row in rows:
            assert len(row["few_shot_lines"]) == shots
            assert row["prompt"] != "two" or 2 not in row["few_shot_lines"]  # "two" (line 2) never shows itself
            prompt = "".join(f"Input: {WORDS[n][0]}\nOutput: {WORDS[n][1]}\n\n" for n in row["few_shot_lines"]) + \
                f"Input: {row['prompt']}\nOutput:"
            answer = greedy(model, prompt, 6).lstrip().split("\n\n")[0].rstrip()  # cut where another example starts
            assert row["response"] == answer
            hits.append(" ".join(answer.lower().split()) == row["reference"])
        assert summary["references"] == 2 and summary["exact_match"] == sum(hits) / 2


def test_few_shot_flag_errors(files, tmp_path):
    _, checkpoint, examples = files
    with pytest.raises(UserError, match=r"--shots 4: .*examples\.jsonl holds only 3 examples"):
        generate_cli(["--checkpoint", str(checkpoint), "--few-shot", str(examples), "--shots", "4"])
    with pytest.raises(SystemExit):
        generate_cli(["--checkpoint", str(checkpoint), "--shots", "2"])  # --shots needs --few-shot
    with pytest.raises(SystemExit):
        evaluate_cli(["--checkpoint", str(checkpoint), "--text", str(examples), "--few-shot", str(examples)])
    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(UserError, match=r"chat\.jsonl, prompt 1: --few-shot builds on a 'prompt'"):
        evaluate_cli(["--checkpoint", str(checkpoint), "--prompts", str(chat), "--few-shot", str(examples),
                      "--out", str(tmp_path / "o.jsonl")])
