"""Ollama Modelfiles for an exported GGUF file: `python -m gpt convert M --to gguf --ollama`.

A Modelfile tells Ollama how to run a model (`ollama create NAME -f Modelfile`):

    FROM ./model.gguf                      the weights, relative to the Modelfile
    SYSTEM \"\"\"...\"\"\"                       the default system message (when the chat template has one)
    TEMPLATE \"\"\"...\"\"\"                     how a conversation becomes the prompt, in Go's text/template syntax
    PARAMETER stop "<|im_end|>"            text that ends a reply (one line per end-of-turn token)
    PARAMETER temperature 0.8

Hugging Face chat templates are Jinja programs; Ollama's are Go templates over
`.Messages` (each with `.Role` and `.Content`). There is no general translation,
so `ollama_template` recognizes the one family this project's models use,
ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n` per message, then
`<|im_start|>assistant\\n`), by *rendering* the Jinja template on probe
conversations and comparing with ChatML, rather than by reading its source. A
default system message that the template adds when the conversation has none
(SmolLM2's "You are a helpful AI assistant named SmolLM...") becomes the
Modelfile's SYSTEM line: Ollama puts it first exactly when the conversation
brings no system message of its own, which is what the Jinja template does.
Any other template raises `TemplateNotTranslatable`; the caller then writes a
Modelfile without TEMPLATE and says so (Ollama then guesses a template from the
GGUF file's `tokenizer.chat_template`). A model without a chat template (GPT-2)
gets the plain completion template `{{ .Prompt }}`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..prompts import chatml, render_jinja_template

# Go template equivalent of ChatML with the generation prompt: every message as a turn, then the reply's start.
CHATML_GO_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)
COMPLETION_GO_TEMPLATE = "{{ .Prompt }}"
CHATML_END_OF_TURN = "<|im_end|>"

# Probe message contents: unlikely text, so that finding them in a rendering places each message.
PROBE_SYSTEM, PROBE_USER, PROBE_ASSISTANT, PROBE_USER_2 = "«system-1»", "«user-1»", "«assistant-1»", "«user-2»"


class TemplateNotTranslatable(Exception):
    """The chat template does not render as ChatML; the message says where it differs."""


@dataclass
class OllamaTemplate:
    """A chat template in Ollama's terms: the Go TEMPLATE, a default SYSTEM message (or None), and stop strings."""

    template: str
    system: str | None
    stops: list[str]


def ollama_template(chat_template: str | None, special_tokens: dict[str, str]) -> OllamaTemplate:
    """The Ollama equivalent of a Hugging Face chat template (None: plain completion).

    `special_tokens` maps the template variables `bos_token`/`eos_token` to their text. Raises
    `TemplateNotTranslatable` for a template that does not render as ChatML.
    """
    if chat_template is None:
        return OllamaTemplate(COMPLETION_GO_TEMPLATE, None, [])

    def render(messages: list[dict[str, str]]) -> str:
        try:
            return render_jinja_template(chat_template, messages, add_generation_prompt=True, **special_tokens)
        except Exception as err:  # a template may raise anything on a conversation it does not expect
            raise TemplateNotTranslatable(f"rendering it on a probe conversation failed ({err})") from None

    conversation = [{"role": "system", "content": PROBE_SYSTEM}, {"role": "user", "content": PROBE_USER},
                    {"role": "assistant", "content": PROBE_ASSISTANT}, {"role": "user", "content": PROBE_USER_2}]
    rendered, expected = render(conversation), chatml(conversation)
    if rendered != expected:
        raise TemplateNotTranslatable(
            f"it is not ChatML: a system/user/assistant/user conversation renders as {rendered!r}, "
            f"ChatML would give {expected!r}"
        )
    without_system = render(conversation[1:])
    prefix, found, _ = without_system.partition(chatml(conversation[1:]))
    if not found or without_system != prefix + chatml(conversation[1:]):
        raise TemplateNotTranslatable(f"without a system message it renders as {without_system!r}")
    system = _default_system(prefix)
    if system is not None and '"""' in system:
        raise TemplateNotTranslatable('its default system message holds """, which a Modelfile cannot quote')
    return OllamaTemplate(CHATML_GO_TEMPLATE, system, [CHATML_END_OF_TURN])


def _default_system(prefix: str) -> str | None:
    """The system message a template adds on its own: `prefix` is what it renders before the first message."""
    if not prefix:
        return None
    start, end = "<|im_start|>system\n", "<|im_end|>\n"
    if not (prefix.startswith(start) and prefix.endswith(end)):
        raise TemplateNotTranslatable(f"it adds {prefix!r} before a conversation without system message, "
                                      "which is not one ChatML system turn")
    return prefix[len(start) : -len(end)]


def modelfile_text(gguf_name: str, template: OllamaTemplate | None, stops: list[str], temperature: float) -> str:
    """The Modelfile for `./gguf_name`; `template` None leaves TEMPLATE to Ollama; `stops` are end-of-turn texts."""
    lines = [f"FROM ./{gguf_name}", ""]
    if template is None:
        lines += ["# The model's chat template could not be translated to Ollama's syntax: Ollama picks a template",
                  "# from the GGUF file's tokenizer.chat_template. Add a TEMPLATE here if replies look wrong.", ""]
    else:
        if template.system is not None:
            lines += [f'SYSTEM """{template.system}"""', ""]
        lines += [f'TEMPLATE """{template.template}"""', ""]
    all_stops = list(dict.fromkeys([*(template.stops if template else []), *stops]))  # in order, once each
    lines += [f"PARAMETER stop {_quoted(stop)}" for stop in all_stops]
    lines.append(f"PARAMETER temperature {temperature:g}")
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    """A Modelfile parameter value in double quotes (backslashes and quotes escaped)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
