"""A model directory's tokenizer, its special tokens and chat template.

    tok = ModelTokenizer.from_dir("path/to/model")   # tokenizer.json + tokenizer_config.json
    tok.stop_ids                                     # generation_config.json's eos ids, ...
    text = render_chat(tok.chat_template, [{"role": "user", "content": "hi"}], tok.special_tokens)

`render_chat` renders a Hugging Face chat template (Jinja) the way transformers'
`apply_chat_template` does: a sandboxed environment with trim_blocks and lstrip_blocks,
the loop-controls extension, `raise_exception`, a `tojson` filter and `strftime_now`,
with `messages`, `add_generation_prompt` and the special tokens (bos_token, eos_token,
...) as variables.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import numpy as np

from store.data import HFTokenizer

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class ChatError(ValueError):
    """A chat request the checkpoint cannot serve (no chat template, a bad template)."""


def _token_text(value: Any) -> str | None:
    """A special token's text from tokenizer_config.json (a string or {"content": ...})."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


class ModelTokenizer(HFTokenizer):
    """A model directory's fast tokenizer with its special tokens, stop ids and template.

    Attributes:
      special_tokens: {"bos_token": "<s>", ...} from tokenizer_config.json.
      stop_ids: token ids that end generation: generation_config.json's eos_token_id
        (an id or a list, e.g. Llama 3's <|eot_id|> and <|end_of_text|>), else
        tokenizer_config.json's eos_token, else config.json's eos_token_id.
      chat_template: the Jinja chat template source, or None.
      separator: appended between documents (the first stop id).
    """

    def __init__(self, path: str | Path, tokenizer_config: dict | None = None, generation_config: dict | None = None,
                 model_config: dict | None = None, chat_template: str | None = None):
        """Loads tokenizer.json at `path` (see `from_dir` for a model directory)."""
        super().__init__(path)
        tokenizer_config = tokenizer_config or {}
        self.special_tokens = {k: t for k in SPECIAL_KEYS if (t := _token_text(tokenizer_config.get(k)))}
        eos = self._tok.token_to_id(self.special_tokens.get("eos_token", "")) if "eos_token" in self.special_tokens \
            else None
        self.stop_ids = (_ids((generation_config or {}).get("eos_token_id")) or _ids(eos)
                         or _ids((model_config or {}).get("eos_token_id")))
        self.chat_template = chat_template or _template(tokenizer_config.get("chat_template"))
        if self.stop_ids:
            self.separator = self.stop_ids[:1]

    @classmethod
    def from_dir(cls, directory: str | Path) -> "ModelTokenizer":
        """The tokenizer of a Hugging Face model directory.

        Raises:
          FileNotFoundError: no tokenizer.json there.
        """
        directory = Path(directory)
        jinja = directory / "chat_template.jinja"
        return cls(directory / "tokenizer.json", _read(directory / "tokenizer_config.json"),
                   _read(directory / "generation_config.json"), _read(directory / "config.json"),
                   jinja.read_text() if jinja.is_file() else None)

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt with the tokenizer's own special tokens (Llama's BOS)."""
        return self._tok.encode(text, add_special_tokens=True).ids

    def stop_strings(self) -> list[str]:
        """The stop ids as text, for stopping where only decoded text is checked."""
        return [t for t in (self._tok.id_to_token(i) for i in self.stop_ids) if t]

    def decode_clean(self, ids: Any) -> str:
        """Text of token ids without special tokens."""
        return self._tok.decode([int(i) for i in np.asarray(ids).ravel()], skip_special_tokens=True)


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _template(value: Any) -> str | None:
    """The default template of tokenizer_config.json's chat_template (a string or a list
    of {"name", "template"})."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return value if isinstance(value, str) else None


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
        raise ChatError("this checkpoint has no chat_template (tokenizer_config.json); use --prompt instead")
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


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what the ByteLevel pre-tokenizer uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer_json() -> str:
    """tokenizer.json of mpx's byte tokenizer (token id = UTF-8 byte), for export."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: b for b, c in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()
