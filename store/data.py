"""Token data for training: sources and a resumable, shuffled batch stream.

Sources: "builtin" (a fixed corpus shipped with the package, so a run works offline and
gives the same tokens on every machine), text files, JSONL files with a "text" field, a
glob of them or a directory of them. Documents are tokenized and concatenated, each
followed by the tokenizer's separator, into one int32 array. Its last `eval_fraction`
is held out for evaluation (contiguous, so no training window overlaps it).

Training windows of `seq_len + 1` tokens start every `seq_len` tokens from a per-epoch
random offset in [0, seq_len); each epoch visits them in a permutation drawn from
`numpy.random.default_rng([seed, epoch])`. The position in the stream is explicit
data, `DataState(epoch, step_in_epoch)`, and `TokenStream.batch(state)` is a pure
function of it: a resumed run sees exactly the batches an uninterrupted run would.

Example:
    >>> stream = TokenStream(np.arange(4096) % 256, seq_len=8, batch_size=4, vocab_size=256)
    >>> batch, state = stream.batch(DataState())
    >>> batch.inputs.shape, batch.targets.dtype, state
    ((4, 8), dtype('int32'), DataState(epoch=0, step_in_epoch=1))
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mpx.config import check
from store.corpus import BUILTIN_MODULES, builtin_corpus  # noqa: F401 (re-exported)
from store.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, make_tokenizer  # noqa: F401 (re-exported)

# ---------------------------------------------------------------------------
# Configuration.


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where tokens come from and how they are batched (see `build`).

    Attributes:
      source: "builtin" (Python standard library docstrings), a .txt/.jsonl file, a
        glob of them, or a directory holding them.
      tokenizer: "bytes" (UTF-8 bytes, 256 ids) or a path to a HF tokenizer.json.
      seq_len: tokens per training sequence.
      batch_size: sequences per step (global, across all devices).
      eval_fraction: fraction of the token stream held out (from its end) for eval.
      shuffle_seed: seed of the per-epoch shuffle of training windows.
    """

    source: str = "builtin"
    tokenizer: str = "bytes"
    seq_len: int = 128
    batch_size: int = 16
    eval_fraction: float = 0.05
    shuffle_seed: int = 0

    def __post_init__(self):
        check("seq_len", self.seq_len, self.seq_len >= 1, ">= 1")
        check("batch_size", self.batch_size, self.batch_size >= 1, ">= 1")
        check("eval_fraction", self.eval_fraction, 0 <= self.eval_fraction < 1, "in [0, 1)")


# ---------------------------------------------------------------------------
# Sources.


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{lineno}: expected an object with a string \"text\" "
                                 f"field; got {line.strip()[:80]!r}")
            docs.append(record["text"])
    return docs


def _read_file(path: Path) -> list[str]:
    try:
        if path.suffix == ".jsonl":
            return _read_jsonl(path)
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _expand(source: str) -> list[Path]:
    if os.path.isdir(source):
        found = [p for p in Path(source).rglob("*") if p.suffix in (".txt", ".jsonl")]
        if not found:
            raise FileNotFoundError(f"data source directory {source!r} holds no .txt or .jsonl files")
        return sorted(found)
    if glob.has_magic(source):
        found = [Path(p) for p in glob.glob(source, recursive=True) if os.path.isfile(p)]
        if not found:
            raise FileNotFoundError(f"data source glob {source!r} matches no files")
        return sorted(found)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"data source {source!r} not found (expected \"builtin\", a "
                                ".txt/.jsonl file, a glob or a directory)")
    return [Path(source)]


def load_documents(source: str) -> list[str]:
    """Documents of a data source, in a deterministic order.

    Args:
      source: "builtin"; a file (.jsonl: one JSON object with a "text" field per line;
        anything else: one UTF-8 text document); a glob (`data/**/*.txt`, sorted); or a
        directory (its .txt and .jsonl files, recursively, sorted).

    Returns:
      The documents as strings.

    Raises:
      FileNotFoundError: naming the path or glob that matches nothing.
      ValueError: a bad JSONL line (naming file and line), a non-UTF-8 file, or
        sources without any text.
    """
    if source == "builtin":
        return builtin_corpus()
    paths = _expand(source)
    docs = [doc for path in paths for doc in _read_file(path)]
    if not any(doc.strip() for doc in docs):
        where = paths[0] if len(paths) == 1 else f"{source!r} ({len(paths)} files)"
        raise ValueError(f"data source {where} holds no text (empty, or only whitespace)")
    return docs


def encode_documents(docs: list[str], tokenizer: Tokenizer) -> np.ndarray:
    """One int32 array: each document's tokens followed by `tokenizer.separator`."""
    sep = list(tokenizer.separator)
    pieces = [np.asarray(tokenizer.encode(doc) + sep, dtype=np.int32) for doc in docs]
    return np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)


# ---------------------------------------------------------------------------
# The batch stream.


@dataclasses.dataclass(frozen=True)
class DataState:
    """Position in the training stream: the next batch is `step_in_epoch` of `epoch`."""

    epoch: int = 0
    step_in_epoch: int = 0

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DataState:
        """Inverse of `to_dict`.

        Raises:
          ValueError: keys other than epoch and step_in_epoch, or non-int values.
        """
        if set(d) != {"epoch", "step_in_epoch"} or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in d.values()):
            raise ValueError(f"expected {{'epoch': int, 'step_in_epoch': int}}; got {d!r}")
        return cls(**d)


class Batch(NamedTuple):
    """A batch of next-token prediction: `targets[:, t] == inputs[:, t + 1]` in the stream.

    Attributes:
      inputs: (batch, seq_len) int32 token ids.
      targets: (batch, seq_len) int32 token ids, the inputs shifted left by one.
    """

    inputs: np.ndarray
    targets: np.ndarray


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n_windows: int, seq_len: int) -> tuple[int, np.ndarray]:
    rng = np.random.default_rng([seed, epoch])
    offset = int(rng.integers(seq_len))
    order = rng.permutation(n_windows)
    order.flags.writeable = False  # cached: shared between calls
    return offset, order


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> Batch:
    rows = tokens[starts[:, None] + np.arange(seq_len + 1)]  # (B, seq_len + 1)
    return Batch(inputs=rows[:, :-1], targets=rows[:, 1:])


class TokenStream:
    """Shuffled training batches and fixed eval batches from one token array.

    Attributes:
      train_tokens, eval_tokens: the int32 training and held-out token arrays.
      steps_per_epoch: training batches per epoch (the last partial batch is dropped).
      num_eval_batches: distinct eval batches available.
    """

    def __init__(self, tokens: Any, *, seq_len: int, batch_size: int, vocab_size: int,
                 eval_fraction: float = 0.0, seed: int = 0):
        """Splits `tokens` and checks it can make batches.

        Args:
          tokens: 1-D int token ids.
          seq_len, batch_size: batch shape (batch_size, seq_len).
          vocab_size: the model's vocabulary; every id must be below it.
          eval_fraction: fraction of tokens held out from the end, in [0, 1).
          seed: shuffle seed.

        Raises:
          ValueError: ids outside [0, vocab_size), a bad fraction, or too few training
            tokens for one batch (or held-out tokens for one eval batch), naming sizes.
        """
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be a 1-D integer array; got {tokens.dtype} {tokens.shape}")
        _check_ids(tokens, vocab_size)
        if not 0 <= eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1); got {eval_fraction}")
        n_eval = int(round(len(tokens) * eval_fraction))
        self.train_tokens = tokens[:len(tokens) - n_eval].astype(np.int32)
        self.eval_tokens = tokens[len(tokens) - n_eval:].astype(np.int32)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        # Room for any epoch offset in [0, seq_len): the last window must still fit.
        self.n_windows = max(len(self.train_tokens) - seq_len, 0) // seq_len
        self.steps_per_epoch = self.n_windows // batch_size
        self.num_eval_batches = (max(len(self.eval_tokens) - 1, 0) // seq_len) // batch_size
        self._check_sizes(n_eval)

    def _check_sizes(self, n_eval: int) -> None:
        need = (self.batch_size + 1) * self.seq_len
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"corpus too small: {len(self.train_tokens)} training tokens make "
                f"{self.n_windows} windows of seq_len={self.seq_len}, fewer than "
                f"batch_size={self.batch_size}; need at least {need} training tokens")
        if n_eval and self.num_eval_batches == 0:
            raise ValueError(
                f"held-out split too small: {n_eval} tokens, need at least "
                f"{self.batch_size * self.seq_len + 1} for one eval batch of "
                f"{self.batch_size}x{self.seq_len}; raise eval_fraction or set it to 0")

    def batch(self, state: DataState, rows: slice | None = None) -> tuple[Batch, DataState]:
        """The training batch at `state` and the state after it.

        Args:
          state: position; `step_in_epoch` in [0, steps_per_epoch).
          rows: only these rows of the global batch (a process's slice in multi-process
            training, see `mpx.sharding.process_rows`); None for all of them.

        Returns:
          (Batch of (batch_size, seq_len) int32 inputs and targets, or its `rows`, next
          state); the next state moves to the next epoch after its last step.

        Raises:
          ValueError: a state outside the stream.
        """
        if state.epoch < 0 or not 0 <= state.step_in_epoch < self.steps_per_epoch:
            raise ValueError(f"data state {state} out of range: step_in_epoch must be in "
                             f"[0, {self.steps_per_epoch}) and epoch >= 0")
        offset, order = _epoch_order(self.seed, state.epoch, self.n_windows, self.seq_len)
        step = state.step_in_epoch
        idx = order[step * self.batch_size:(step + 1) * self.batch_size][slice(None) if rows is None else rows]
        batch = _windows(self.train_tokens, offset + idx * self.seq_len, self.seq_len)
        if step + 1 == self.steps_per_epoch:
            return batch, DataState(state.epoch + 1, 0)
        return batch, DataState(state.epoch, step + 1)

    def eval_batch(self, index: int, rows: slice | None = None) -> Batch:
        """Held-out batch `index` in [0, num_eval_batches): consecutive, unshuffled windows.

        `rows` selects a slice of the batch's rows, as in `batch`.

        Raises:
          ValueError: `index` out of range (naming how many eval batches exist).
        """
        if not 0 <= index < self.num_eval_batches:
            raise ValueError(f"eval batch {index} out of range: the held-out split "
                             f"({len(self.eval_tokens)} tokens) has {self.num_eval_batches} "
                             f"batches of {self.batch_size}x{self.seq_len}")
        first = index * self.batch_size
        starts = (first + np.arange(self.batch_size))[slice(None) if rows is None else rows] * self.seq_len
        return _windows(self.eval_tokens, starts, self.seq_len)

    def eval_batches(self, count: int, rows: slice | None = None) -> list[Batch]:
        """The first `count` eval batches (the same ones at every evaluation), or their `rows`."""
        return [self.eval_batch(i, rows) for i in range(count)]


def _check_ids(tokens: np.ndarray, vocab_size: int) -> None:
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"token ids must be in [0, vocab_size={vocab_size}); found ids in "
                         f"[{tokens.min()}, {tokens.max()}]: does the tokenizer match "
                         "model.vocab_size?")


def build(cfg: Any, vocab_size: int) -> tuple[TokenStream, Tokenizer]:
    """The stream and tokenizer a `DataConfig` describes.

    Args:
      cfg: a `DataConfig` (source, tokenizer, seq_len, batch_size, eval_fraction,
        shuffle_seed).
      vocab_size: the model's vocabulary size.

    Returns:
      (TokenStream, tokenizer).

    Raises:
      FileNotFoundError, ImportError, ValueError: see `load_documents`,
        `make_tokenizer` and `TokenStream`.
    """
    tokenizer = make_tokenizer(cfg.tokenizer)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"tokenizer {cfg.tokenizer!r} has {tokenizer.vocab_size} ids but "
                         f"model.vocab_size={vocab_size}")
    tokens = encode_documents(load_documents(cfg.source), tokenizer)
    stream = TokenStream(tokens, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                         vocab_size=vocab_size, eval_fraction=cfg.eval_fraction,
                         seed=cfg.shuffle_seed)
    return stream, tokenizer
