"""Few-shot prompts: K worked examples, then the query, laid out by one template.

A prompt is a header, each example filled into the template and followed by the
separator, and the query filled into the template up to where its output would go:

    template = FewShotTemplate(example="Q: {input}\\nA: {output}", header="Answer briefly.\\n\\n")
    template.prompt([Example("2 + 2?", "4"), Example("3 + 5?", "8")], "7 + 1?")
    # 'Answer briefly.\\n\\nQ: 2 + 2?\\nA: 4\\n\\nQ: 3 + 5?\\nA: 8\\n\\nQ: 7 + 1?\\nA:'

The query's line ends without the spaces that come before `{output}` in the template:
a prompt that ends in a space tokenizes unlike the text the model saw, and the answer's
own first token carries its space. With no examples, the same template gives the
zero-shot prompt, so zero-shot and few-shot differ only in the examples.

Examples are drawn without replacement from a pool with a seeded `random.Random`
(`draw_examples`), never the query itself. `read_examples` reads a pool from a JSONL
file with one `{"input": ..., "output": ...}` per line; `FewShotPrompts` draws a fresh
set for each query of a run, which is what `python -m gpt generate --few-shot` and
`evaluate --prompts --few-shot` use. The MMLU task (gpt.evaluate.mmlu) builds its
prompts with the same pieces.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .errors import UserError
from .files import json_lines

T = TypeVar("T")
FIELD = re.compile(r"\{(input|output)\}")


@dataclass(frozen=True)
class Example:
    input: str
    output: str
    line: int = 0  # in the file it came from (from 1), to say which examples a prompt used; 0 = not from a file


@dataclass(frozen=True)
class FewShotTemplate:
    """How a prompt is laid out: `header`, then each example as `example` + `separator`, then the query.

    `example` holds `{input}` once and `{output}` once after it; the query is `example` filled
    with its input and cut where `{output}` starts, without the spaces before it.
    """

    example: str = "Input: {input}\nOutput: {output}"
    header: str = ""
    separator: str = "\n\n"

    def __post_init__(self) -> None:
        fields = FIELD.findall(self.example)
        if fields != ["input", "output"]:
            raise UserError(f"few-shot template {self.example!r}: needs {{input}} once and then {{output}} once")

    def render_example(self, example: Example) -> str:
        """One worked example: the template filled with its input and output."""
        values = {"input": example.input, "output": example.output}
        return FIELD.sub(lambda match: values[match.group(1)], self.example)

    def render_query(self, query: str) -> str:
        """The query: the template up to `{output}` (its trailing spaces removed), filled with `query`."""
        before_output = self.example[:self.example.index("{output}")].rstrip(" ")
        return before_output.replace("{input}", query, 1)  # `{input}` is the only field left in this part

    def prompt(self, examples: Sequence[Example], query: str) -> str:
        """The whole prompt: header, every example followed by the separator, the query."""
        return self.header + "".join(self.render_example(e) + self.separator for e in examples) + \
            self.render_query(query)

    def answer(self, generated: str) -> str:
        """What a model generated after the prompt, up to the separator (where it would start another example),
        without surrounding whitespace."""
        return generated.lstrip().split(self.separator, 1)[0].rstrip() if self.separator else generated.strip()


def draw_examples(pool: Sequence[T], k: int, rng: random.Random, is_query: Callable[[T], bool], *,
                  where: str, unit: str = "examples") -> list[T]:
    """`k` examples of `pool` drawn without replacement by `rng`, never one that `is_query` says is the query.

    Too few candidates is a UserError: "--shots K: <where> has only N other <unit>".
    """
    candidates = [example for example in pool if not is_query(example)]
    if len(candidates) < k:
        raise UserError(f"--shots {k}: {where} has only {len(candidates)} other {unit}")
    return rng.sample(candidates, k)


def read_examples(path: Path) -> list[Example]:
    """The examples of a JSONL file, one {"input": text, "output": text} per line; a bad line is a UserError
    naming the file and the line."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read few-shot examples ({err})") from None
    examples = []
    for number, record in json_lines(path, text):
        values = [record.get(key) if isinstance(record, dict) else None for key in ("input", "output")]
        if not all(isinstance(value, str) for value in values):
            raise UserError(f'{path}, line {number}: expected {{"input": text, "output": text}}, '
                            f"got {str(record)[:80]}")
        examples.append(Example(values[0], values[1], number))
    if not examples:
        raise UserError(f"{path}: no few-shot examples in the file")
    return examples


class FewShotPrompts:
    """Few-shot prompts for a run's queries: each query gets `shots` examples of its own, drawn from `examples`
    by one generator seeded with `seed` (so a run is repeatable), never an example whose input is the query."""

    def __init__(self, examples: Sequence[Example], shots: int, seed: int,
                 template: FewShotTemplate = FewShotTemplate(), source: str = "the example pool") -> None:
        if shots > len(examples):
            raise UserError(f"--shots {shots}: {source} holds only {len(examples)} examples")
        self.examples, self.shots, self.template, self.source = list(examples), shots, template, source
        self.rng = random.Random(seed)

    def build(self, query: str) -> tuple[str, list[Example]]:
        """(the prompt for `query`, the examples it shows)."""
        chosen = draw_examples(self.examples, self.shots, self.rng, lambda e: e.input.strip() == query.strip(),
                               where=self.source)
        return self.template.prompt(chosen, query), chosen
