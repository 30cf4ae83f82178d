"""Chat prompts: a model's chat template rendered over a conversation.

    tok = store.tokenizer.ModelTokenizer.from_dir("path/to/model")
    messages = conversation(["hi"], [], system="Be brief.")
    text = render_chat(tok.chat_template, messages, tok.special_tokens)

`render_chat` renders a Hugging Face chat template (Jinja) the way transformers'
`apply_chat_template` does: a sandboxed environment with trim_blocks and lstrip_blocks,
the loop-controls extension, `raise_exception`, a `tojson` filter and `strftime_now`,
with `messages`, `add_generation_prompt` and the special tokens (bos_token, eos_token,
...) as variables.
"""

from __future__ import annotations

import datetime
import json

class ChatError(ValueError):
    """A chat request the checkpoint cannot serve (no chat template, a bad template)."""


def _raise(message: str):
    raise ChatError(f"chat template: {message}")


def render_chat(template: str | None, messages: list[dict], special_tokens: dict[str, str] | None = None,
                add_generation_prompt: bool = True) -> str:
    """The prompt text of `messages` under a Hugging Face chat template.

    Args:
      template: Jinja source (tokenizer_config.json's chat_template).
      messages: [{"role": "system"|"user"|"assistant", "content": str}, ...].
      special_tokens: bos_token, eos_token, ... as template variables.
      add_generation_prompt: end with the header that opens the assistant's turn.

    Raises:
      ChatError: no template, or the template fails or raises.
    """
    if not template:
        raise ChatError("this checkpoint's tokenizer has no chat_template (tokenizer_config.json); pass "
                        "--tokenizer DIR (a model directory whose tokenizer_config.json has one), or use --prompt")
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent, ensure_ascii=False)
    env.globals.update(raise_exception=_raise,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **(special_tokens or {}))
    except jinja2.TemplateError as err:
        raise ChatError(f"chat template: {err}") from None


def conversation(turns: list[str], replies: list[str], system: str | None = None) -> list[dict]:
    """Messages of a chat: an optional system message, then user turns with the replies
    given so far between them."""
    messages = [{"role": "system", "content": system}] if system else []
    for i, turn in enumerate(turns):
        messages.append({"role": "user", "content": turn})
        if i < len(replies):
            messages.append({"role": "assistant", "content": replies[i]})
    return messages
