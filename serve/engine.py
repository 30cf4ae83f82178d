"""Generation with a KV cache: prefill and decode compiled once per shape bucket.

    engine = Engine(model, variables, kv_cache="fp8")
    outputs, stats = engine.generate([[72, 105], [84]], max_new_tokens=32, sampler=Greedy())

Shapes. A batch of prompts is right-padded to a bucket: rows to the next power of two,
length to the next power of two (at least 8, at most the context). Every row keeps its
own positions: row b's prompt fills positions 0 .. L_b - 1, its first new token goes
to position L_b, and the causal mask (keys at or before the query's position) never lets
a real token see a pad; a pad slot in the cache is overwritten before any query can
reach it. So the prefill compiles once per (rows, length) bucket and the decode step
once per (rows, steps, span) bucket, never per token.

Span. The cache holds `max_seq_len` slots per row, but a call attends only over its first
`span` slots: the prefill over its padded prompt length, each decode call over the next
power of two (at least 8, at most the context) above the last position any unfinished
row reaches in the call, chosen on the host. So attention costs what the sequence holds,
not the cache's capacity, a sequence compiles at most log2(context / 8) spans, and the
same sequence gives the same tokens in a cache of any capacity: the span depends on
the positions only (slots past a query's position are masked anyway).

Decode runs up to `chunk` tokens per call in a `lax.scan` (one compiled program, no host
round trip per token); the host then checks limits and stop conditions, and streams.
Every call of one `generate` runs the same number of steps: `chunk`, or fewer when fewer
tokens are wanted (rounded up to a power of two, at least 16), so a short generation
does not pay for a whole chunk and few step counts are ever compiled. Rows that finish
inside a call are trimmed on the host. The new token j of every row is sampled with the
key `fold_in(key(seed), j)`, so results do not depend on `chunk`.

Why 64 by default: a call has a fixed cost besides its steps (dispatch; and on CPU
without the decode kernel, XLA dequantizes FP8 or bf16 weights to f32 once per call,
hoisted out of the token loop, so every token then reads 4 bytes per weight). With the
kernel (`mpx.kernels`, built at install) each step reads FP8 weights as 1 byte and bf16
as 2, and nothing is dequantized per call. Streaming prints in pieces of up to 64 tokens.

`traces` counts how often each step function was traced (compiled): tests use it to
prove that decoding never recompiles per token.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mpx import sharding as sharding_lib
from serve import kv_cache as kv_cache_lib
from serve import sampling

MIN_BUCKET = 8
MIN_STEPS = 16  # the fewest decode steps a call runs, unless `chunk` is smaller


def bucket(n: int, limit: int | None = None, minimum: int = MIN_BUCKET) -> int:
    """The next power of two >= n (at least `minimum`, at most `limit`)."""
    size = max(minimum, 1 << max(n - 1, 0).bit_length())
    return size if limit is None else min(size, limit)


@dataclasses.dataclass
class Generation:
    """One row's output.

    Attributes:
      tokens: the new token ids.
      finish: "length" (max_new_tokens), "stop" (a stop condition) or "context" (the
        context is full).
    """

    tokens: list[int]
    finish: str = "length"


@dataclasses.dataclass
class Stats:
    """Timing of one `generate` call (rows of the batch together)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0  # tokens per row produced by decode calls (excludes prefill's)
    rows: int = 0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / max(self.prefill_s, 1e-9)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of the decode steps, all rows together."""
        return self.rows * self.decode_steps / max(self.decode_s, 1e-9)


class Engine:
    """Prefill + decode over a serving model (see the module docstring).

    Args:
      model: a `models.transformer.Transformer` (its policy: the serving precision).
      variables: {"params": ..., optional "fp8_state": ...} from `serve.quantize.prepare`.
      kv_cache: "bf16", "fp32" or "fp8".
      chunk: the most decode steps per compiled call (see the module docstring).
      logit_scale: multiplies logits before sampling (FP8 temperature correction).
      layout: an `mpx.sharding.Layout` to serve sharded: params (FP8 weights and their
        block scales included) are placed by its rules, the model pins its activations,
        and prefill/decode constrain the KV cache to (batch on data x fsdp, kv heads on
        tensor). None serves on the default device.
    """

    def __init__(self, model, variables, *, kv_cache: str = "bf16", chunk: int = 64, logit_scale: float = 1.0,
                 layout: sharding_lib.Layout | None = None):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1; got {chunk}")
        if layout is not None:
            model = model.clone(constrain=layout.constrain)
            variables = jax.device_put(variables, layout.shardings(variables))
        self.layout = layout
        self.model, self.variables, self.config = model, variables, model.config
        self.kv_cache, self.chunk, self.logit_scale = kv_cache_lib.check_kind(kv_cache), chunk, logit_scale
        self.traces: collections.Counter = collections.Counter()
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("sampler",))
        self._decode = jax.jit(self._decode_fn, static_argnames=("sampler", "steps", "span"), donate_argnums=(1,))
        self._recompute = jax.jit(self._recompute_fn, static_argnames=("sampler", "steps"))

    # ---------------------------------------------------------------- compiled steps

    def _pin_cache(self, cache):
        return kv_cache_lib.constrain(cache, self.layout)

    def _sample(self, sampler, logits, key, index):
        return sampler(sampling.scale_logits(logits, self.logit_scale), jax.random.fold_in(key, index))

    def _prefill_fn(self, variables, tokens, lengths, key, sampler):
        """Prompts (B, T) -> (first new tokens (B,), their positions (B,), cache, last
        prompt logits (B, V)). Returning the positions too gives every decode input the
        placement of a jit output, so the first decode call matches the later ones."""
        self.traces["prefill"] += 1
        b, t = tokens.shape
        cache = kv_cache_lib.init(self.config, b, self.kv_cache)
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        logits, aux = self.model.apply(variables, tokens, positions, self._pin_cache(cache), cache_len=t)
        last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # (B, V)
        return self._sample(sampler, last, key, 0), lengths + 0, self._pin_cache(aux["cache"]), last

    def _decode_fn(self, variables, cache, tokens, positions, key, start, sampler, steps, span):
        """`steps` tokens per row: feeds tokens (B,) at positions (B,), samples the next;
        attends over the first `span` cache slots (see the module docstring)."""
        self.traces["decode"] += 1
        last_slot = self.config.max_seq_len - 1

        def step(carry, i):
            cache, tokens, positions = carry
            pos = jnp.minimum(positions, last_slot)[:, None]  # past the end: outputs are discarded
            logits, aux = self.model.apply(variables, tokens[:, None], pos, cache, cache_len=span)
            new = self._sample(sampler, logits[:, 0], key, start + i)
            return (self._pin_cache(aux["cache"]), new, positions + 1), new

        (cache, tokens, positions), out = lax.scan(step, (cache, tokens, positions), jnp.arange(steps))
        return out.T, cache, tokens, positions  # (B, steps)

    def _recompute_fn(self, variables, buffer, ends, key, start, sampler, steps):
        """Without a cache: each step runs the whole (B, S) buffer, appends at `ends`."""
        self.traces["recompute"] += 1
        rows = jnp.arange(buffer.shape[0])
        last_slot = buffer.shape[1] - 1

        def step(carry, i):
            buffer, ends = carry
            logits, _ = self.model.apply(variables, buffer)
            last = jnp.take_along_axis(logits, (ends - 1)[:, None, None], axis=1)[:, 0]
            new = self._sample(sampler, last, key, start + i)
            return (buffer.at[rows, jnp.minimum(ends, last_slot)].set(new), ends + 1), new

        (buffer, ends), out = lax.scan(step, (buffer, ends), jnp.arange(steps))
        return out.T, buffer, ends

    # ---------------------------------------------------------------- host loop

    def check_prompts(self, prompts: Sequence[Sequence[int]]) -> None:
        """Raises ValueError for no prompts, an empty prompt or one that fills the context."""
        if not len(prompts):
            raise ValueError("no prompts given")
        context = self.config.max_seq_len
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty; give at least one token of text")
            if len(prompt) >= context:
                raise ValueError(f"prompt {i} has {len(prompt)} tokens but the model's context is {context} "
                                 f"tokens; shorten it to at most {context - 1} to leave room for new tokens")

    def _batch(self, prompts) -> tuple[np.ndarray, np.ndarray]:
        rows = bucket(len(prompts), minimum=1)
        lengths = np.ones((rows,), np.int32)
        lengths[:len(prompts)] = [len(p) for p in prompts]
        tokens = np.zeros((rows, bucket(int(lengths.max()), self.config.max_seq_len)), np.int32)
        for i, prompt in enumerate(prompts):
            tokens[i, :len(prompt)] = prompt
        return tokens, lengths

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 sampler: sampling.Sampler = sampling.Greedy(), seed: int = 0, use_cache: bool = True,
                 should_stop: Callable[[int, list[int]], bool] | None = None,
                 on_tokens: Callable[[int, list[int]], None] | None = None) -> tuple[list[Generation], Stats]:
        """Generates up to `max_new_tokens` per prompt.

        Args:
          prompts: token id lists, 1 to max_seq_len - 1 tokens each.
          max_new_tokens: per row; also bounded by the context (finish "context").
          sampler: a `serve.sampling` strategy.
          seed: sampling seed.
          use_cache: False recomputes the whole sequence per token (for comparison).
          should_stop: (row, tokens so far) -> True to finish the row ("stop").
          on_tokens: (row, new tokens) after each chunk, for streaming.

        Returns:
          ([Generation per prompt], Stats).

        Raises:
          ValueError: see `check_prompts`; max_new_tokens < 1.
        """
        self.check_prompts(prompts)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
        tokens, lengths = self._batch(prompts)
        run = _Run(self, prompts, lengths, max_new_tokens, should_stop, on_tokens)
        key = jax.random.key(seed)
        if use_cache:
            self._run_cached(run, tokens, lengths, key, sampler)
        else:
            self._run_recompute(run, tokens, lengths, key, sampler)
        return run.outputs, run.stats

    def warm_up(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                sampler: sampling.Sampler = sampling.Greedy(), use_cache: bool = True, **kwargs) -> None:
        """Compiles what `generate(prompts, max_new_tokens=..., ...)` runs (its prefill
        shape and every decode span it reaches when no row stops early), so that timings
        of the real call are of warm steps.

        It generates the fewest tokens that compile the prefill and the first decode
        call, then runs one decode call on that cache at each later span."""
        self.generate(prompts, max_new_tokens=min(max_new_tokens, self.chunk + 1), sampler=sampler,
                      use_cache=use_cache, **kwargs)
        if not use_cache:
            return
        self.check_prompts(prompts)
        tokens, lengths = self._batch(prompts)
        run = _Run(self, prompts, lengths, max_new_tokens, None, None)
        spans = sorted(set(self._spans(run, lengths)))[1:]
        if not spans:
            return
        key = jax.random.key(0)
        current, positions, cache, _ = self._prefill(self.variables, tokens, lengths, key, sampler=sampler)
        for span in spans:
            _, cache, current, positions = self._decode(self.variables, cache, current, positions, key, 1,
                                                        sampler=sampler, steps=self._steps(run), span=span)

    def _steps(self, run: "_Run") -> int:
        """Steps per decode call: `chunk`, or the tokens still wanted rounded up."""
        return min(self.chunk, bucket(run.remaining(), minimum=MIN_STEPS))

    def _span(self, run: "_Run", lengths: np.ndarray, done: Sequence[bool], produced: int, steps: int) -> int:
        """Cache slots a decode call attends over: above the last position an unfinished
        row feeds in the call for a token it keeps (from length + produced - 1 on, `steps`
        tokens, the last kept one sampled after position length + limit - 2)."""
        reach = max(min(int(n) + produced - 1 + steps, int(n) + limit - 1)
                    for n, limit, d in zip(lengths, run.limits, done) if not d)
        return bucket(reach, self.config.max_seq_len)

    def _spans(self, run: "_Run", lengths: np.ndarray) -> list[int]:
        """The span of every decode call of a run in which no row stops early."""
        steps, produced, spans = self._steps(run), 1, []
        longest = max(run.limits)
        while produced < longest:
            done = [produced >= limit for limit in run.limits]
            spans.append(self._span(run, lengths, done, produced, steps))
            produced += steps
        return spans

    def _run_cached(self, run: "_Run", tokens, lengths, key, sampler) -> None:
        t0 = time.perf_counter()
        current, positions, cache, _ = self._prefill(self.variables, tokens, lengths, key, sampler=sampler)
        run.add(np.asarray(current)[:, None])
        run.stats.prefill_s = time.perf_counter() - t0
        produced = 1
        t0 = time.perf_counter()
        steps = self._steps(run)
        while not run.finished():
            span = self._span(run, lengths, run.done, produced, steps)
            new, cache, current, positions = self._decode(self.variables, cache, current, positions, key, produced,
                                                          sampler=sampler, steps=steps, span=span)
            run.add(np.asarray(new))
            produced += steps
            run.stats.decode_steps += steps
        run.stats.decode_s = time.perf_counter() - t0

    def _run_recompute(self, run: "_Run", tokens, lengths, key, sampler) -> None:
        buffer = np.zeros((tokens.shape[0], self.config.max_seq_len), np.int32)
        buffer[:, :tokens.shape[1]] = tokens
        buffer, ends = _as_outputs((buffer, lengths))  # placed like the step's own outputs
        produced = 0
        t0 = time.perf_counter()
        steps = self._steps(run)
        while not run.finished():
            new, buffer, ends = self._recompute(self.variables, buffer, ends, key, produced,
                                                sampler=sampler, steps=steps)
            run.add(np.asarray(new))
            produced += steps
            run.stats.decode_steps += steps
        run.stats.decode_s = time.perf_counter() - t0


@jax.jit
def _as_outputs(tree):
    """The arrays of `tree` as outputs of a jitted computation (see `Engine._prefill_fn`)."""
    return jax.tree.map(lambda x: x + 0, tree)


class _Run:
    """Host-side bookkeeping of one generate call: limits, stops, streaming, counts."""

    def __init__(self, engine: Engine, prompts, lengths, max_new_tokens: int, should_stop, on_tokens):
        context = engine.config.max_seq_len
        self.limits = [min(max_new_tokens, context - int(n)) for n in lengths[:len(prompts)]]
        self.context_bound = [context - int(n) < max_new_tokens for n in lengths[:len(prompts)]]
        self.outputs = [Generation([]) for _ in prompts]
        self.done = [False] * len(prompts)
        self.should_stop, self.on_tokens = should_stop, on_tokens
        self.stats = Stats(prompt_tokens=int(sum(len(p) for p in prompts)), rows=len(prompts))

    def finished(self) -> bool:
        return all(self.done)

    def remaining(self) -> int:
        """The most new tokens an unfinished row may still get (0 once every row is done)."""
        return max((limit - len(out.tokens) for limit, out, done in zip(self.limits, self.outputs, self.done)
                    if not done), default=0)

    def add(self, new: np.ndarray) -> None:
        """Appends a (rows, n) block of new tokens to the unfinished rows."""
        for row, out in enumerate(self.outputs):
            if self.done[row]:
                continue
            take = [int(t) for t in new[row, :self.limits[row] - len(out.tokens)]]
            out.tokens += take
            self.stats.new_tokens += len(take)
            if self.on_tokens is not None and take:
                self.on_tokens(row, take)
            if self.should_stop is not None and self.should_stop(row, out.tokens):
                out.finish, self.done[row] = "stop", True
            elif len(out.tokens) >= self.limits[row]:
                out.finish = "context" if self.context_bound[row] else "length"
                self.done[row] = True


# --------------------------------------------------------------------------- text


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """text before the earliest stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


class _TextStream:
    """Turns a row's growing token list into text deltas that are safe to print: held
    back are an incomplete UTF-8 tail (U+FFFD) and anything that may start a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str], write: Callable[[str], None]):
        self.tokenizer, self.stop, self.write = tokenizer, [s for s in stop if s], write
        self.tokens: list[int] = []
        self.emitted = 0
        self.holdback = max((len(s) for s in self.stop), default=1) - 1

    def push(self, new: list[int]) -> None:
        self.tokens += new
        text, stopped = _cut_at_stop(self.tokenizer.decode(self.tokens), self.stop)
        safe = len(text) if stopped else max(len(text.rstrip("\ufffd")) - self.holdback, 0)
        self._emit(text, safe)

    def close(self) -> None:
        text, _ = _cut_at_stop(self.tokenizer.decode(self.tokens), self.stop)
        self._emit(text, len(text))

    def _emit(self, text: str, upto: int) -> None:
        if upto > self.emitted:
            self.write(text[self.emitted:upto])
            self.emitted = upto


def generate_text(engine: Engine, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
                  sampler: sampling.Sampler = sampling.Greedy(), seed: int = 0, stop: Sequence[str] = (),
                  stream: Callable[[str], None] | None = None) -> tuple[list[str], list[Generation], Stats]:
    """Generates text for text prompts; stops each row at the first stop string.

    Args:
      engine: the `Engine`.
      tokenizer: encode / decode (store.data tokenizers).
      prompts: non-empty strings.
      max_new_tokens, sampler, seed: as in `Engine.generate`.
      stop: strings that end a row; the returned text excludes them.
      stream: called with each new piece of the first row's text as it is generated
        (only when there is one prompt).

    Returns:
      (texts, generations, stats): texts cut at the stop string.

    Raises:
      ValueError: an empty prompt, one longer than the context, bad max_new_tokens.
    """
    ids = [tokenizer.encode(p) for p in prompts]
    stop = tuple(s for s in stop if s)
    should_stop = (lambda row, toks: _cut_at_stop(tokenizer.decode(toks), stop)[1]) if stop else None
    streamer = _TextStream(tokenizer, stop, stream) if stream is not None and len(prompts) == 1 else None
    on_tokens = (lambda row, new: streamer.push(new)) if streamer is not None else None
    outputs, stats = engine.generate(ids, max_new_tokens=max_new_tokens, sampler=sampler, seed=seed,
                                     should_stop=should_stop, on_tokens=on_tokens)
    if streamer is not None:
        streamer.close()
    texts = [_cut_at_stop(tokenizer.decode(out.tokens), stop)[0] for out in outputs]
    return texts, outputs, stats
