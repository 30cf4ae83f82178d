"""Continuous batching: one thread owns the model; requests join and leave between steps.

    batcher = Batcher(slot_model, tokenizer, max_queue=64)
    batcher.start()
    request = batcher.submit(Request(prompt_ids, max_tokens=32, on_event=callback))
    ...                                 # callback gets TextDelta(...), then Finished(...)
    request.cancel()                    # e.g. the client went away: frees its slot
    batcher.stop()

The loop, one iteration at a time:

1. admit waiting requests into free slots (first come, first served);
2. run one prefill call: a chunk (at most `prefill_chunk` tokens) of each of the oldest
   requests still prefilling (at most `prefill_rows` of them), so a long prompt never
   stalls the running streams for more than one chunk; a prompt's last chunk samples
   the request's first token;
3. run one decode call for all slots (`steps` tokens each), hand each running request
   its new tokens, and free the slots of requests that are finished or cancelled.

Log-probabilities. A request with `logprobs` set gets, with each new token, its
log-probability and the `logprobs` most likely alternatives (`TokenLogprob`); with
`prompt_logprobs` also those of every prompt token after the first, in one
`PromptLogprobs` event before its first text (`serve.slots` computes them in the same
compiled steps). Such a request may have max_tokens 0: it scores its prompt only.

A request finishes at `max_tokens` ("length"), at the end of its slot's context
("length"), at an end-of-sequence id or a stop string ("stop"), or when a drain's grace
runs out ("shutdown": `drain` refuses new requests, lets those in flight run for its
grace, then ends them with their text so far). Text is produced on this
thread as UTF-8-safe deltas that never include (part of) a stop string, so callers only
forward them. Callbacks run on this thread: they must be quick and thread-safe (the
HTTP server's hands each event to its asyncio loop).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import sys
import threading
import time
from typing import Callable, Sequence

import numpy as np

from serve import slots as slots_lib


class QueueFull(RuntimeError):
    """Raised by `Batcher.submit` when `max_queue` requests are already waiting."""


class Draining(RuntimeError):
    """Raised by `Batcher.submit` once `Batcher.drain` was called (the server is stopping)."""


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model, and the most likely tokens' at its
    position ((id, log-probability) pairs, descending)."""

    id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class TextDelta:
    """New text of a request and the new token ids behind it (with their
    `TokenLogprob`s when the request asked for them, and then also the end-of-sequence
    token's that ended it, as OpenAI and vLLM report it). The text may be empty while a
    multi-byte character or a possible stop string is held back, and the ids empty when
    held-back text is released at the end."""

    text: str
    ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclasses.dataclass(frozen=True)
class PromptLogprobs:
    """The prompt's log-probabilities: None for its first token (nothing precedes it),
    then one `TokenLogprob` per prompt token."""

    entries: tuple[TokenLogprob | None, ...]


@dataclasses.dataclass(frozen=True)
class Finished:
    """The end of a request: reason "stop", "length", "cancelled", "shutdown" or "error"
    (a step failed: `error` says how); token counts."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


@dataclasses.dataclass
class Request:
    """One generation request.

    Attributes:
      prompt: token ids (1 .. max_seq_len - 1 of them).
      max_tokens: the most new tokens (>= 1).
      on_event: called with `TextDelta`s and one final `Finished` (on the engine thread).
      temperature, top_k, top_p: sampling (temperature 0 is greedy; top_k 0 is off).
      seed: the random stream's seed.
      stop: strings that end the text (excluded from it).
      stop_ids: token ids that end the generation (excluded from the text).
      logprobs: alternatives reported with each token's log-probability (0 ..
        `serve.slots.MAX_LOGPROBS`); None: no log-probabilities.
      prompt_logprobs: also report the prompt tokens' (needs `logprobs`).
    """

    prompt: Sequence[int]
    max_tokens: int
    on_event: Callable[[TextDelta | Finished], None]
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: Sequence[str] = ()
    stop_ids: Sequence[int] = ()
    logprobs: int | None = None
    prompt_logprobs: bool = False
    cancelled: bool = False

    def cancel(self) -> None:
        """Asks the engine to drop the request at its next step (thread-safe)."""
        self.cancelled = True


class _Text:
    """A request's growing text; emits what is safe: no incomplete UTF-8 tail (U+FFFD),
    nothing that may begin a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.tokens: list[int] = []
        self.emitted = 0

    def push(self, new: list[int]) -> tuple[str, bool]:
        """(new safe text, whether a stop string appeared) after appending `new`."""
        self.tokens += new
        text = self.tokenizer.decode(self.tokens)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            return self._take(text, min(hits)), True
        return self._take(text, max(len(text.rstrip("\ufffd")) - self.holdback, 0)), False

    def flush(self) -> str:
        """The held-back rest at the end (no stop string was found)."""
        text = self.tokenizer.decode(self.tokens)
        return self._take(text, len(text))

    def _take(self, text: str, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        piece, self.emitted = text[self.emitted:upto], upto
        return piece


class _Running:
    """A request in a slot: its progress through prefill and decode."""

    def __init__(self, request: Request, slot: int, tokenizer, context: int, order: int):
        self.request, self.slot = request, slot
        self.text = _Text(tokenizer, request.stop)
        self.prefilled = 0  # prompt tokens already in the cache
        self.generated = 0
        self.limit = min(request.max_tokens, context - len(request.prompt))
        self.last = 0  # the latest new token, fed to the next decode step
        self.order = order  # admission order: the oldest prefills first
        self.prompt_logprobs: list[TokenLogprob | None] = [None]

    @property
    def wants_logprobs(self) -> bool:
        return self.request.logprobs is not None

    def targets(self, start: int, size: int) -> list[int]:
        """Per chunk token, the token whose log-probability is wanted after it."""
        prompt = self.request.prompt
        return [prompt[i + 1] if i + 1 < len(prompt) else slots_lib.SAMPLED for i in range(start, start + size)]

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.request.prompt)

    @property
    def position(self) -> int:
        """Where `last` goes in the cache."""
        return len(self.request.prompt) + self.generated - 1


class Batcher:
    """The engine loop (see the module docstring).

    Args:
      slots: a `serve.slots.SlotModel` (warmed up or not).
      tokenizer: encode / decode.
      max_queue: the most requests waiting while every slot is taken; more are refused
        (`QueueFull`).
      stop_ids: end-of-sequence ids that finish every request.
    """

    def __init__(self, slots: slots_lib.SlotModel, tokenizer, *, max_queue: int = 64, stop_ids: Sequence[int] = ()):
        self.slots, self.tokenizer, self.max_queue = slots, tokenizer, max_queue
        self.stop_ids = tuple(stop_ids)
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: dict[int, _Running] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._deadline: float | None = None  # set by drain: when requests in flight are ended
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self.steps_run = collections.Counter()  # "prefill" / "decode" calls, for tests and logs
        self.finished = collections.Counter()  # requests by finish reason
        self.errors: list[str] = []  # steps that failed (their requests finished with "error")

    # ---------------------------------------------------------------- caller side

    def submit(self, request: Request) -> Request:
        """Queues a request for the next free slot.

        Raises:
          Draining: `drain` was called.
          QueueFull: every slot is taken and `max_queue` requests are already waiting.
          ValueError: an empty prompt, one that leaves no room in the context,
            max_tokens < 1 (0 when it scores its prompt), or logprobs out of range.
        """
        self.check(request.prompt, request.max_tokens, request.prompt_logprobs)
        if request.logprobs is not None and not 0 <= request.logprobs <= slots_lib.MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {slots_lib.MAX_LOGPROBS}]; got {request.logprobs}")
        if request.prompt_logprobs and request.logprobs is None:
            raise ValueError("prompt_logprobs needs logprobs (how many alternatives per token)")
        if self._deadline is not None:
            raise Draining("the server is shutting down; retry on another server")
        with self._lock:
            free = self.slots.max_batch - len(self._running)
            if len(self._waiting) >= self.max_queue + free:
                raise QueueFull(f"all {self.slots.max_batch} slots are busy and {self.max_queue} requests are "
                                "waiting; retry later")
            self._waiting.append(request)
        self._wake.set()
        return request

    def check(self, prompt: Sequence[int], max_tokens: int, scoring: bool = False) -> None:
        """Raises ValueError if a request with this prompt and max_tokens cannot run
        (`scoring`: it reports its prompt's log-probabilities, so max_tokens may be 0)."""
        context = self.slots.max_seq_len
        if len(prompt) == 0:
            raise ValueError("the prompt is empty; give at least one token of text")
        if len(prompt) >= context:
            raise ValueError(f"the prompt has {len(prompt)} tokens but the context is {context} tokens; "
                             f"shorten it to at most {context - 1}")
        if max_tokens < (0 if scoring else 1):
            raise ValueError(f"max_tokens must be >= {0 if scoring else 1}; got {max_tokens}")

    def busy(self) -> int:
        """Requests waiting or running."""
        with self._lock:
            return len(self._waiting) + len(self._running)

    def alive(self) -> bool:
        """Whether the engine thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Starts the engine thread."""
        self._thread = threading.Thread(target=self._loop, name="mpx-engine", daemon=True)
        self._thread.start()

    def drain(self, grace: float) -> None:
        """Refuses new requests from now on; those in flight (running or waiting) may run
        for `grace` seconds more, then finish with reason "shutdown" (thread-safe; a
        later call keeps the first deadline)."""
        if self._deadline is None:
            self._deadline = time.monotonic() + grace
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancels what is left and joins the engine thread (at most `timeout` s)."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---------------------------------------------------------------- engine thread

    def _loop(self) -> None:
        while not self._stopping:
            if self._deadline is not None and time.monotonic() >= self._deadline:
                self._end_all("shutdown")
            self._admit()
            self._drop_cancelled()
            if not self._running:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                self._prefill_some()
                self._decode_all()
            except Exception as err:  # noqa: BLE001 - a failed step ends its requests, not the engine
                self._fail(err)
        self._end_all("cancelled")

    def _fail(self, err: Exception) -> None:
        """Ends the running requests with reason "error" (the error is kept in `errors`
        and printed) and gives the slots a fresh cache if the failed call consumed it."""
        self.errors.append(f"{type(err).__name__}: {err}")
        print(f"mpx engine: a step failed, its requests end with an error: {self.errors[-1]}", file=sys.stderr)
        for run in list(self._running.values()):
            self._finish(run, "error", flush=False, error=self.errors[-1])
        self.slots.recover()

    def _end_all(self, reason: str) -> None:
        """Finishes every running and waiting request with `reason`."""
        for run in list(self._running.values()):
            self._finish(run, reason)
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for request in waiting:
            self.finished[reason] += 1
            request.on_event(Finished(reason, len(request.prompt), 0))

    def _admit(self) -> None:
        free = [s for s in range(self.slots.max_batch) if s not in self._running]
        with self._lock:
            while free and self._waiting:
                request = self._waiting.popleft()
                slot = free.pop(0)
                self._running[slot] = _Running(request, slot, self.tokenizer, self.slots.max_seq_len, next(self._ids))

    def _drop_cancelled(self) -> None:
        for run in list(self._running.values()):
            if run.request.cancelled:
                self._finish(run, "cancelled")

    def _prefill_some(self) -> None:
        """One prompt chunk of each of the oldest requests still prefilling."""
        pending = sorted((r for r in self._running.values() if not r.decoding), key=lambda r: r.order)
        batch = pending[:self.slots.prefill_rows]
        if not batch:
            return
        chunks = [r.request.prompt[r.prefilled:r.prefilled + self.slots.prefill_chunk] for r in batch]
        starts = [r.prefilled for r in batch]
        targets = [r.targets(start, len(chunk)) for r, start, chunk in zip(batch, starts, chunks)] \
            if any(r.wants_logprobs for r in batch) else None
        step = self.slots.prefill([r.slot for r in batch], chunks, starts, self._params(batch), targets)
        self.steps_run["prefill"] += 1
        self.steps_run["prefill_chunks"] += len(batch)
        for i, (run, chunk) in enumerate(zip(batch, chunks)):
            run.prefilled += len(chunk)
            first = int(step.tokens[i])
            entries = _entries(step.logprobs, i, [first if t == slots_lib.SAMPLED else t for t in targets[i]],
                               run.request.logprobs) if run.wants_logprobs else []
            if run.request.prompt_logprobs:
                run.prompt_logprobs += entries[:len(run.request.prompt) - len(run.prompt_logprobs)]
            if run.decoding:
                if run.request.prompt_logprobs:
                    run.request.on_event(PromptLogprobs(tuple(run.prompt_logprobs)))
                self._accept(run, [first], entries[-1:])

    def _decode_all(self) -> None:
        live = [r for r in self._running.values() if r.decoding]
        if not live:
            return
        size = self.slots.max_batch
        tokens, positions = np.zeros(size, np.int32), np.full(size, self.slots.idle_position, np.int32)
        for run in live:
            tokens[run.slot], positions[run.slot] = run.last, run.position
        step = self.slots.decode(tokens, positions, self._params(live, rows=size),
                                 want_logprobs=any(r.wants_logprobs for r in live))
        self.steps_run["decode"] += 1
        for run in live:
            new = [int(t) for t in step.tokens[run.slot]]
            entries = _entries(step.logprobs, run.slot, new, run.request.logprobs) if run.wants_logprobs else []
            self._accept(run, new, entries)

    def _params(self, runs: list[_Running], rows: int | None = None) -> slots_lib.RowParams:
        """Sampling parameters: one row per run, or `rows` rows indexed by slot."""
        params = slots_lib.RowParams.fill(rows or len(runs))
        for i, run in enumerate(runs):
            row, req = (run.slot if rows else i), run.request
            params.temperature[row], params.top_k[row], params.top_p[row] = req.temperature, req.top_k, req.top_p
            params.seed[row], params.counter[row] = req.seed & 0xFFFFFFFF, run.generated
        return params

    def _accept(self, run: _Running, new: list[int], logprobs: Sequence[TokenLogprob] = ()) -> None:
        """Hands a run its new tokens (as many as it may take) and their log-probabilities;
        finishes it if done."""
        new = new[:run.limit - run.generated]
        stop_ids = set(self.stop_ids) | set(run.request.stop_ids)
        ended = next((i for i, t in enumerate(new) if t in stop_ids), None)
        if ended is not None:
            new = new[:ended]
        run.generated += len(new)
        if new:
            run.last = new[-1]
        text, stopped = run.text.push(new)
        scored = tuple(logprobs[:len(new) + (ended is not None)])  # an end-of-sequence token is scored too
        if text or new or scored:
            run.request.on_event(TextDelta(text, tuple(new), scored))
        if stopped:
            self._finish(run, "stop", flush=False)  # the text ends before the stop string
        elif ended is not None:
            self._finish(run, "stop")
        elif run.generated >= run.limit:
            self._finish(run, "length")

    def _finish(self, run: _Running, reason: str, flush: bool = True, error: str | None = None) -> None:
        if flush and reason != "cancelled":
            rest = run.text.flush()
            if rest:
                run.request.on_event(TextDelta(rest, ()))
        with self._lock:
            self._running.pop(run.slot, None)
        self.finished[reason] += 1
        run.request.on_event(Finished(reason, len(run.request.prompt), run.generated, error))


def _entries(logprobs: slots_lib.Logprobs, row: int, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """`TokenLogprob`s of row `row`'s first len(tokens) positions, `top` alternatives each."""
    count = len(tokens)
    chosen, ids, values = (np.asarray(x[row, :count]).tolist()
                           for x in (logprobs.chosen, logprobs.top_ids, logprobs.top))
    return [TokenLogprob(t, c, tuple(zip(i[:top], v[:top]))) for t, c, i, v in zip(tokens, chosen, ids, values)]


def wait_idle(batcher: Batcher, timeout: float) -> bool:
    """Polls until no request waits or runs; returns whether that happened in time."""
    deadline = time.monotonic() + timeout
    while batcher.busy():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
