"""A slot-based KV cache and its compiled steps, for continuous batching.

    slots = SlotModel(model, variables, max_batch=16, kv_cache="bf16")
    firsts = slots.prefill([3, 5], [prompt_a[0:64], prompt_b], [0, 0], params).tokens  # a token per row
    new = slots.decode(tokens, positions, params).tokens   # (max_batch, steps) ids

The cache holds `max_batch` rows ("slots") of `max_seq_len` positions each. A request
owns one slot from its first prefill chunk to its last token; every slot has its own
position, so requests of any lengths decode together in one step. The reference model
takes positions (B, T), the cache rows of the batch and the number of leading slots to
attend over (`models.transformer`), and writes keys/values at those positions:

* prefill writes prompt chunks of up to `prefill_rows` requests straight into their
  slots (the model scatters into the cache rows it is given), at positions
  start .. start + C - 1 (each row its own start); C is bucketed (powers of two from 8 up
  to `prefill_chunk`) and the rows are 1 or `prefill_rows` (spare rows repeat the first
  one: same slot, same values, so the scatter is exact).
* decode feeds one token per slot at the slot's own position and samples the next,
  `steps` times in a `lax.scan`, over the first R slots only: R is the next power of two
  above the highest slot with a decoding request (the batcher gives new requests the
  lowest free slot, so R follows the number of requests). Slots below R without a
  decoding request sit at the last position (`max_seq_len - 1`): no prompt token ever
  lives there, and whatever is written at a position is overwritten by its owner before
  any query can read it (a step writes its key/value before attending), so idle rows
  never disturb live ones.

Span. Each call attends over the first `span` positions of its rows only, the next power
of two (at least `min_span`) above the last position a live row reaches in the call, so
attention costs what the requests hold, not `max_seq_len`. Both buckets are pure
functions of the requests' slots and positions: the cache allocates powers of two (rows,
and positions, at least `min_span`) so that no bucket is ever cut at `max_batch` or
`max_seq_len`, and a request gets the same bits whatever those settings are. (What the bits do depend on is
R, the rows decoded together: XLA's CPU matrix products round a row's sums differently
for different row counts, so a greedy near-tie may resolve differently alone and in a
crowd.)

Compilations are bounded: decode once per (R, span) pair, prefill once per (rows,
length, span); `warm_up` compiles every R and prefill shape at the smallest span, and a
longer span compiles when a request first reaches it, never per token (`traces` counts
compilations; tests check it).

Sampling is per row inside the compiled step: temperature (0 = greedy), top-k (0 = off)
and top-p arrays of shape (B,), and a key per row from the request's seed folded with
the index of the token, so a request samples the same tokens whatever else runs.

Log-probabilities. Asked for (`want_logprobs`), a call also returns `Logprobs`: the
log-softmax of the model's logits (after `logit_scale`, before temperature, top-k and
top-p: the model's own distribution, as OpenAI and vLLM report it) at each token it fed,
of the token that follows (the next prompt token given in `targets`, or the one
sampled), with the `MAX_LOGPROBS` most likely tokens. They are computed in a
`lax.cond` branch of the same compiled step, so asking costs no compilation and not
asking costs nothing.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from serve import kv_cache as kv_cache_lib
from serve import sampling
from serve.engine import bucket

Array = jax.Array
MIN_CHUNK = 8
MIN_SPAN = 256  # cache positions attended at least: few spans to compile, little extra work
MAX_LOGPROBS = 5  # most likely tokens reported per position (OpenAI's limit for completions)
SAMPLED = -1  # a target meaning "the token this call samples"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowParams:
    """Per-row sampling parameters, each an array of shape (B,).

    Attributes:
      temperature: float32; 0 samples greedily.
      top_k: int32; 0 keeps every token.
      top_p: float32 in (0, 1]; 1 keeps every token.
      seed: uint32 seed of the row's random stream.
      counter: int32 index of the row's next new token (folded into its key).
    """

    temperature: Array
    top_k: Array
    top_p: Array
    seed: Array
    counter: Array

    @classmethod
    def fill(cls, rows: int) -> "RowParams":
        """Greedy parameters for `rows` rows, as numpy arrays to be set row by row."""
        return cls(np.zeros(rows, np.float32), np.zeros(rows, np.int32), np.ones(rows, np.float32),
                   np.zeros(rows, np.uint32), np.zeros(rows, np.int32))


@dataclasses.dataclass(frozen=True)
class Logprobs:
    """Log-probabilities of one call (see the module docstring), numpy arrays.

    Attributes:
      chosen: (rows, positions) float32, of each position's following token.
      top: (rows, positions, k) float32, the k most likely tokens', descending
        (k = min(MAX_LOGPROBS, vocabulary)).
      top_ids: (rows, positions, k) int32, those tokens.
    """

    chosen: np.ndarray
    top: np.ndarray
    top_ids: np.ndarray


@dataclasses.dataclass(frozen=True)
class Step:
    """What a call returns: token ids, and `Logprobs` when they were asked for."""

    tokens: np.ndarray
    logprobs: Logprobs | None = None


def logprobs_of(logits: Array, targets: Array, want: Array,
                logit_scale: float = 1.0) -> tuple[Array, Array, Array]:
    """(chosen, top, top_ids) of `targets` under log_softmax(logits * logit_scale) when
    `want`, zeros else.

    Args:
      logits: (..., V) float.
      targets: (...) int ids.
      want: a boolean scalar (traced): the branch not taken does not run.
      logit_scale: as in `SlotModel`, applied inside the branch.
    """
    k = min(MAX_LOGPROBS, logits.shape[-1])

    def compute(operands):
        logits, targets = operands
        logp = jax.nn.log_softmax(sampling.scale_logits(logits.astype(jnp.float32), logit_scale), axis=-1)
        top, ids = lax.top_k(logp, k)
        return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], top, ids.astype(jnp.int32)

    def skip(operands):
        shape = operands[1].shape
        return jnp.zeros(shape, jnp.float32), jnp.zeros((*shape, k), jnp.float32), jnp.zeros((*shape, k), jnp.int32)

    return lax.cond(want, compute, skip, (logits, targets))


def sample_rows(logits: Array, params: RowParams) -> Array:
    """One token per row under that row's own parameters.

    Args:
      logits: (B, V) float.
      params: `RowParams` of (B,) arrays.

    Returns:
      (B,) int32 ids: the argmax where temperature is 0, else a sample from
      softmax(logits / temperature) restricted to the top-k ranks, then to the smallest
      set of them whose mass reaches top-p (the most likely token always stays).
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    hot = params.temperature > 0
    scaled = logits / jnp.where(hot, params.temperature, 1.0)[:, None]
    order = jnp.argsort(-scaled, axis=-1)
    ranked = jnp.take_along_axis(scaled, order, axis=-1)  # (B, V), descending
    vocab = logits.shape[-1]
    k = jnp.where(params.top_k > 0, jnp.minimum(params.top_k, vocab), vocab)
    keep = jnp.arange(vocab)[None, :] < k[:, None]
    probs = jax.nn.softmax(jnp.where(keep, ranked, -jnp.inf), axis=-1)
    keep &= (jnp.cumsum(probs, axis=-1) - probs) < params.top_p[:, None]
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(params.seed, params.counter)
    choice = jax.vmap(jax.random.categorical)(keys, jnp.where(keep, ranked, -jnp.inf))
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(hot, sampled, greedy)


class SlotModel:
    """The serving model with a `max_batch`-slot KV cache (see the module docstring).

    Args:
      model: a `models.transformer.Transformer` (its policy: the serving precision).
      variables: {"params": ..., optional "fp8_state": ...} from `serve.quantize.prepare`.
      max_batch: slots (rows decoded together).
      max_seq_len: positions per slot (at most the model's context); None: the model's.
      kv_cache: "bf16", "fp32" or "fp8".
      prefill_chunk: the most prompt tokens one prefill call takes per row (a power of
        two >= 8).
      prefill_rows: the most requests one prefill call takes.
      steps: decode steps per compiled call.
      logit_scale: multiplies logits before sampling (FP8 temperature correction).
      min_span: the fewest cache positions a call attends over (a power of two; see the
        module docstring).
      sample: (logits (B, V), `RowParams`) -> (B,) ids, inside the compiled steps;
        `sample_rows` by default.

    Raises:
      ValueError: a bad kv_cache kind, max_batch < 1, steps < 1, prefill_rows outside
        [1, max_batch], prefill_chunk or min_span not a power of two >= 8, or max_seq_len
        outside [2, the model's context].
    """

    def __init__(self, model, variables, *, max_batch: int = 16, max_seq_len: int | None = None,
                 kv_cache: str = "bf16", prefill_chunk: int = 64, prefill_rows: int = 4, steps: int = 1,
                 logit_scale: float = 1.0, min_span: int = MIN_SPAN, sample=None):
        context = model.config.max_seq_len
        self.max_seq_len = context if max_seq_len is None else max_seq_len
        _check_sizes(max_batch, self.max_seq_len, context, prefill_chunk, steps)
        _check_power_of_two("min_span", min_span)
        if not 1 <= prefill_rows <= max_batch:
            raise ValueError(f"prefill_rows must be in [1, max_batch={max_batch}]; got {prefill_rows}")
        self.model, self.variables = model, variables
        self.max_batch, self.steps = max_batch, steps
        self.prefill_chunk, self.prefill_rows = prefill_chunk, prefill_rows
        self.logit_scale, self.min_span = logit_scale, min_span
        self.sample = sample_rows if sample is None else sample
        # Powers of two, so that no row or span bucket is cut at max_batch or max_seq_len.
        self.rows, self.length = bucket(max_batch, minimum=1), bucket(self.max_seq_len, minimum=min_span)
        self.kv_cache = kv_cache_lib.check_kind(kv_cache)
        self.cache = kv_cache_lib.init(model.config, self.rows, self.kv_cache, self.length)
        self.traces: collections.Counter = collections.Counter()
        self._prefill = jax.jit(self._prefill_fn, donate_argnums=(1,), static_argnames=("span",))
        self._decode = jax.jit(self._decode_fn, donate_argnums=(1,), static_argnames=("span",))

    @property
    def idle_position(self) -> int:
        """Where slots without a decoding request sit (see the module docstring)."""
        return self.max_seq_len - 1

    def chunk_sizes(self) -> list[int]:
        """Every prefill length bucket: 8, 16, ... prefill_chunk."""
        return [MIN_CHUNK << i for i in range((self.prefill_chunk // MIN_CHUNK).bit_length())]

    def prefill_shapes(self) -> list[tuple[int, int]]:
        """Every (rows, length) shape prefill compiles (once per span it meets)."""
        return [(rows, size) for rows in sorted({1, self.prefill_rows}) for size in self.chunk_sizes()]

    def decode_rows(self) -> list[int]:
        """Every row count R decode compiles (once per span it meets): 1, 2, 4, ..."""
        return [1 << i for i in range(self.rows.bit_length())]

    def spans(self) -> list[int]:
        """Every span a call may attend over: min_span, 2 min_span, ... (powers of two)."""
        return sorted({self.span(1 << i) for i in range(self.length.bit_length())})

    def span(self, reach: int) -> int:
        """The span of a call whose rows use positions below `reach` (a function of the
        positions only: the cache holds at least `min_span` positions)."""
        return bucket(min(reach, self.max_seq_len), minimum=self.min_span)

    # ---------------------------------------------------------------- compiled steps

    def _prefill_fn(self, variables, cache, slots, tokens, starts, lasts, params, targets, want, span):
        """tokens (P, C) at positions starts.. into `slots` (P,); samples after `lasts` (P,);
        log-probabilities of `targets` (P, C) when `want`."""
        self.traces["prefill"] += 1
        positions = jnp.minimum(starts[:, None] + jnp.arange(tokens.shape[1]), self.idle_position)  # (P, C)
        logits, aux = self.model.apply(variables, tokens, positions, cache, cache_len=span, cache_rows=slots)
        last = jnp.take_along_axis(logits, lasts[:, None, None], axis=1)[:, 0]  # (P, V)
        new = self.sample(sampling.scale_logits(last, self.logit_scale), params)
        targets = jnp.where(targets == SAMPLED, new[:, None], targets)
        logprobs = logprobs_of(logits, targets, want, self.logit_scale)  # every position only when wanted
        return new, logprobs, aux["cache"]

    def _decode_fn(self, variables, cache, tokens, positions, params, want, span):
        """`steps` tokens for each of the first R slots: feeds tokens (R,) at positions
        (R,), samples the next (and its log-probabilities when `want`); attends over the
        first `span` positions."""
        self.traces["decode"] += 1

        def step(carry, i):
            cache, tokens = carry
            pos = jnp.minimum(positions + i, self.idle_position)[:, None]
            logits, aux = self.model.apply(variables, tokens[:, None], pos, cache, cache_len=span)
            logits = sampling.scale_logits(logits[:, 0], self.logit_scale)
            new = self.sample(logits, dataclasses.replace(params, counter=params.counter + i))
            return (aux["cache"], new), (new, logprobs_of(logits, new, want))  # logits already scaled

        (cache, _), (out, logprobs) = lax.scan(step, (cache, tokens), jnp.arange(self.steps))
        return out.T, jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), logprobs), cache  # (R, steps, ...)

    # ---------------------------------------------------------------- host calls

    def prefill(self, slots: Sequence[int], chunks: Sequence[Sequence[int]], starts: Sequence[int],
                params: RowParams, targets: Sequence[Sequence[int]] | None = None) -> Step:
        """Runs one prompt chunk of each of up to `prefill_rows` requests into its slot.

        Args:
          slots: the requests' slots (distinct).
          chunks: per request 1 .. prefill_chunk prompt ids, for positions start, start + 1, ...
          starts: per request the position of its chunk's first token.
          params: `RowParams` with one row per request.
          targets: per request and chunk token, the token whose log-probability is
            wanted after it (the next prompt token, or `SAMPLED`); None: no
            log-probabilities.

        Returns:
          A `Step`: per request the id sampled after its chunk's last token (its first
          new token when the chunk ends its prompt), and with `targets` `Logprobs` of
          shape (requests, C) (C >= the longest chunk; positions past a chunk are padding).
        """
        count = len(slots)
        assert 1 <= count <= self.prefill_rows and len(chunks) == len(starts) == count
        rows = 1 if count == 1 else self.prefill_rows
        size = min(max(MIN_CHUNK, 1 << (max(map(len, chunks)) - 1).bit_length()), self.prefill_chunk)
        order = list(range(count)) + [0] * (rows - count)  # spare rows repeat the first
        tokens = np.zeros((rows, size), np.int32)
        for row, i in enumerate(order):
            tokens[row, :len(chunks[i])] = chunks[i]
        wanted = np.zeros((rows, size), np.int32)
        for row, i in enumerate(order if targets is not None else ()):
            wanted[row, :len(targets[i])] = targets[i]
        pick = lambda values, dtype: np.asarray([values[i] for i in order], dtype)  # noqa: E731
        params = jax.tree.map(lambda x: x[np.asarray(order)], params)
        span = self.span(max(start + len(chunk) for start, chunk in zip(starts, chunks)))
        new, logprobs, self.cache = self._prefill(
            self.variables, self.cache, pick(slots, np.int32), tokens, pick(starts, np.int32),
            pick([len(c) - 1 for c in chunks], np.int32), params, wanted, np.bool_(targets is not None), span=span)
        return _step(new, logprobs, count, targets is not None)

    def decode(self, tokens: np.ndarray, positions: np.ndarray, params: RowParams,
               want_logprobs: bool = False) -> Step:
        """`steps` new tokens for every slot.

        Args:
          tokens: (max_batch,) int32, each slot's latest token.
          positions: (max_batch,) int32, where that token goes (`idle_position` for
            slots without a decoding request).
          params: `RowParams` of max_batch rows; counter: the index of each row's next token.
          want_logprobs: also return the new tokens' `Logprobs`.

        Returns:
          A `Step`: (max_batch, steps) int32 new ids (zeros for slots without a decoding
          request), and `Logprobs` of shape (max_batch, steps) when asked for.
        """
        live = np.flatnonzero(np.asarray(positions) != self.idle_position)
        rows = bucket(int(live.max()) + 1 if live.size else 1, minimum=1)
        span = self.span(int(np.max(positions[live])) + self.steps if live.size else 1)
        pad = lambda x, fill: np.concatenate([x, np.full(self.rows - len(x), fill, x.dtype)])[:rows]  # noqa: E731
        fills = RowParams.fill(1)
        params = jax.tree.map(lambda x, f: pad(np.asarray(x), f[0]), params, fills)
        new, logprobs, self.cache = self._decode(
            self.variables, self.cache, pad(np.asarray(tokens, np.int32), 0),
            pad(np.asarray(positions, np.int32), self.idle_position), params, np.bool_(want_logprobs), span=span)
        return _step(new, logprobs, self.max_batch, want_logprobs)

    def recover(self) -> None:
        """A fresh, empty cache if a failed call consumed (donated) this one."""
        if any(x.is_deleted() for x in jax.tree.leaves(self.cache)):
            self.cache = kv_cache_lib.init(self.model.config, self.rows, self.kv_cache, self.length)

    def warm_up(self) -> None:
        """Compiles every prefill shape and every decode row count at the smallest span,
        so short requests never compile."""
        for rows, size in self.prefill_shapes():
            count = min(rows, 2)  # 1 row, or 2 requests padded to prefill_rows
            self.prefill(list(range(count)), [np.zeros(size, np.int32)] * count, [0] * count, RowParams.fill(count))
        for rows in self.decode_rows():
            positions = np.full(self.max_batch, self.idle_position, np.int32)
            positions[min(rows, self.max_batch) - 1] = 0  # the highest live slot decides R
            self.decode(np.zeros(self.max_batch, np.int32), positions, RowParams.fill(self.max_batch))


def _step(tokens: Array, logprobs: tuple[Array, Array, Array], rows: int, want: bool) -> Step:
    """A `Step` of `rows` rows: the call's rows cut there, or padded with zeros up to it."""
    def fit(x):
        x = np.asarray(x)[:rows]
        return np.concatenate([x, np.zeros((rows - len(x), *x.shape[1:]), x.dtype)]) if len(x) < rows else x

    return Step(fit(tokens), Logprobs(*map(fit, logprobs)) if want else None)


def _check_sizes(max_batch: int, max_seq_len: int, context: int, prefill_chunk: int, steps: int) -> None:
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1; got {max_batch}")
    if steps < 1:
        raise ValueError(f"decode steps per call must be >= 1; got {steps}")
    if not 2 <= max_seq_len <= context:
        raise ValueError(f"max_seq_len must be in [2, {context}] (the model's context); got {max_seq_len}")
    _check_power_of_two("prefill_chunk", prefill_chunk)


def _check_power_of_two(name: str, value: int) -> None:
    if value < MIN_CHUNK or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {MIN_CHUNK}; got {value}")
