"""Tokenizers: UTF-8 bytes, or a Hugging Face tokenizer.json.

`make_tokenizer("bytes")` needs nothing installed; any other spec is a path to a
tokenizer.json read with the `tokenizers` package. Both kinds expose `vocab_size`,
`separator` (the ids appended after every document), `encode` and `decode`.
"""

from __future__ import annotations

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


# Special tokens that commonly end a document, in order of preference.
_EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer loaded from a tokenizer.json file."""

    def __init__(self, path: str | Path):
        """Loads `path`.

        Raises:
          ImportError: the `tokenizers` package is not installed.
          FileNotFoundError: `path` does not exist.
        """
        try:
            import tokenizers
        except ImportError:
            raise ImportError(f"tokenizer {str(path)!r} needs the Hugging Face tokenizers "
                              "package: pip install tokenizers (or use tokenizer: bytes)") from None
        if not Path(path).is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} not found")
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


def make_tokenizer(spec: str) -> Tokenizer:
    """`ByteTokenizer()` for "bytes", else an `HFTokenizer` of the tokenizer.json `spec`."""
    if spec == "bytes":
        return ByteTokenizer()
    return HFTokenizer(spec)
