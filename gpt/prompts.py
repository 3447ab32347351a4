"""Prompt formats: a model's own chat template, and ChatML as the fallback.

A chat is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`.
`chat_prompt` turns it into the text a model was trained to continue, ending where the
assistant's next reply starts. A GGUF model brings its chat template (a Jinja string);
it is rendered with jinja2 when that is installed, and ChatML-style templates also
work without it.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from .errors import UserError

Message = dict[str, str]


def chatml(messages: list[Message], add_generation_prompt: bool = True) -> str:
    """ChatML: each turn is `<|im_start|>role\\ncontent<|im_end|>\\n`; the reply starts after `<|im_start|>assistant\\n`."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def render_jinja_template(template: str, messages: list[Message], add_generation_prompt: bool, **variables: Any) -> str:
    """Render a Hugging Face-style Jinja chat template in a sandbox (no file or attribute access)."""
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise UserError("this model's chat template needs jinja2: pip install jinja2") from None

    def raise_exception(message: str) -> None:
        raise UserError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)


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
