"""Tokenizers: UTF-8 bytes, or a Hugging Face tokenizer.json.

`make_tokenizer("bytes")` needs nothing installed; any other spec is a path to a
tokenizer.json read with the `tokenizers` package. Both kinds expose `vocab_size`,
`separator` (the ids appended after every document), `encode` and `decode`.

`ModelTokenizer.from_dir` reads a Hugging Face model directory's tokenizer.json with
its special tokens (tokenizer_config.json), stop ids (generation_config.json's
eos_token_id) and chat template; `byte_tokenizer_json` writes `ByteTokenizer` as a
tokenizer.json (for exports of byte-level models).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class Tokenizer(Protocol):
    """What the stream and the generator need from a tokenizer."""

    vocab_size: int
    separator: list[int]  # appended after every document

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Any) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: 256 ids, any language, no training, no unknown tokens."""

    vocab_size = 256
    separator = [ord("\n"), ord("\n")]  # documents read as paragraphs

    def encode(self, text: str) -> list[int]:
        """Token ids (0..255) of `text`'s UTF-8 bytes."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Any) -> str:
        """Text of byte ids; an incomplete or invalid UTF-8 sequence becomes U+FFFD.

        Raises:
          ValueError: an id outside [0, 256).
        """
        ids = np.asarray(ids, dtype=np.int64).ravel()
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise ValueError(f"byte token ids must be in [0, 256); got {bad[:8].tolist()}")
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The one byte a token stands for."""
        return bytes([token_id])


# Special tokens that commonly end a document, in order of preference.
_EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer loaded from a tokenizer.json file."""

    def __init__(self, path):
        """Loads `path` (or takes a built `tokenizers.Tokenizer`, e.g. a GGUF file's).

        Raises:
          ImportError: the `tokenizers` package is not installed.
          FileNotFoundError: `path` does not exist.
        """
        try:
            import tokenizers
        except ImportError:
            raise ImportError(f"tokenizer {str(path)!r} needs the Hugging Face tokenizers "
                              "package: pip install tokenizers (or use tokenizer: bytes)") from None
        if isinstance(path, tokenizers.Tokenizer):
            self._tok = path
        elif not Path(path).is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} not found")
        else:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eos = [self._tok.token_to_id(t) for t in _EOS_TOKENS]
        eos = [i for i in eos if i is not None]
        self.separator = eos[:1] or self.encode("\n\n")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without added special tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Any) -> str:
        """Text of token ids (special tokens kept)."""
        return self._tok.decode([int(i) for i in np.asarray(ids).ravel()],
                                skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes one token stands for, also when they are part of a character:
        a byte-fallback piece ("<0xE2>") is its byte, a byte-level BPE piece (GPT-2's
        printable characters) its bytes; other tokens their decoded text."""
        text = self.decode([token_id])
        piece = self._tok.id_to_token(int(token_id)) or ""
        if "\ufffd" not in text or not piece:
            return text.encode("utf-8")
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            return bytes([int(piece[3:5], 16)])
        inverse = _unicode_to_bytes()
        if all(c in inverse for c in piece):
            return bytes(inverse[c] for c in piece)
        return text.encode("utf-8")


def make_tokenizer(spec: str) -> Tokenizer:
    """`ByteTokenizer()` for "bytes", a `ModelTokenizer` for a model directory or a GGUF
    file, else an `HFTokenizer` of the tokenizer.json `spec`."""
    if spec == "bytes":
        return ByteTokenizer()
    if Path(spec).is_dir():
        return ModelTokenizer.from_dir(spec)
    from store import gguf

    if gguf.is_gguf(spec):  # the tokenizer in a GGUF file's metadata
        return gguf.tokenizer.model_tokenizer(spec)
    return HFTokenizer(spec)


# Files of a model directory that describe its tokenizer (what `ModelTokenizer.from_dir` reads).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "tokenizer.model")
# Where a training run keeps a copy of its tokenizer's files (`carry_tokenizer`).
RUN_TOKENIZER = "tokenizer"


def tokenizer_files(directory: str | Path) -> dict[str, bytes]:
    """{name: bytes} of the tokenizer and generation files present in a model directory
    (for a GGUF file, the ones its metadata describes)."""
    from store import gguf

    if gguf.is_gguf(directory):
        return gguf.tokenizer.tokenizer_files(directory)
    directory = Path(directory)
    return {n: (directory / n).read_bytes() for n in TOKENIZER_FILES if (directory / n).is_file()}


def carry_tokenizer(spec: str, run_dir: str | Path) -> Path | None:
    """Copies the tokenizer of data spec `spec` into `<run_dir>/tokenizer/`, so the run's
    checkpoints serve with its special tokens, stop ids and chat template wherever the
    source directory goes (None for "bytes", which needs no files).

    `spec` is a model directory or a tokenizer.json; beside a tokenizer.json, the
    directory's tokenizer_config.json, generation_config.json, ... describe it.
    """
    if spec == "bytes":
        return None
    source = Path(spec)
    from store import gguf

    whole = source.is_dir() or gguf.is_gguf(source)  # a GGUF file describes its tokenizer in full
    files = tokenizer_files(source if whole else source.parent)
    if not whole:
        files["tokenizer.json"] = source.read_bytes()
    out = Path(run_dir) / RUN_TOKENIZER
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    return out


# A model directory's tokenizer: special tokens, stop ids, chat template.

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


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
        return cls(directory / "tokenizer.json", _read_json(directory / "tokenizer_config.json"),
                   _read_json(directory / "generation_config.json"), _read_json(directory / "config.json"),
                   jinja.read_text() if jinja.is_file() else None)

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt with the tokenizer's own special tokens (Llama's BOS)."""
        return self._tok.encode(text, add_special_tokens=True).ids

    @property
    def eos_ids(self) -> list[int]:
        """`stop_ids`, under the name serve.server asks a tokenizer for."""
        return self.stop_ids

    def stop_strings(self) -> list[str]:
        """The stop ids as decoded text ("<|eot_id|>"), for stops checked on text."""
        return [t for t in (self.decode([i]) for i in self.stop_ids) if t]

    def decode_clean(self, ids: Any) -> str:
        """Text of token ids without special tokens."""
        return self._tok.decode([int(i) for i in np.asarray(ids).ravel()], skip_special_tokens=True)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _template(value: Any) -> str | None:
    """The default template of tokenizer_config.json's chat_template (a string or a list
    of {"name", "template"})."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return value if isinstance(value, str) else None


@functools.cache
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes of one token under any tokenizer (its own `token_bytes`, else its text)."""
    own = getattr(tokenizer, "token_bytes", None)
    return own(token_id) if own else tokenizer.decode([token_id]).encode("utf-8")


def bytes_to_unicode() -> dict[int, str]:
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
    import tokenizers

    vocab = {c: b for b, c in bytes_to_unicode().items()}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    return tok.to_str()
