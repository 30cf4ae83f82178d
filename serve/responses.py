"""From a checked request to OpenAI's answer: queueing each prompt, gathering the
engine's events, whole responses and server-sent events (`serve.server` routes here).

A completion request with several prompts queues one `serve.batching.Request` per prompt
(they batch with everything else in flight) and answers with one choice per prompt, in
prompt order; a stream interleaves their chunks, each with its choice's `index`, and
ends with `[DONE]` once every choice has finished. Token ids a client sends are checked
against the tokenizer's vocabulary here, before they reach the model.

Log-probabilities arrive from the engine as `TokenLogprob`s (ids); here each id becomes
its bytes (`store.tokenizer.token_bytes`: a byte token that is part of a character
keeps its byte) for OpenAI's forms in `serve.server_api`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets

from starlette.responses import StreamingResponse

from serve import batching
from serve import server_api as api
from store import tokenizer as tokenizer_lib


@dataclasses.dataclass
class Choice:
    """One prompt of a request: its engine request and what came back so far."""

    index: int
    request: batching.Request
    echo: str = ""  # the prompt's text, shown before the completion when echo is asked
    text: list[str] = dataclasses.field(default_factory=list)
    scored: list[api.Scored] = dataclasses.field(default_factory=list)
    end: batching.Finished | None = None


def prompt_ids(service, prompt: api.Prompt, chat: bool) -> list[int]:
    """A prompt's token ids: text encoded (a raw completion prompt gets the tokenizer's
    BOS; a chat template writes its own), ids checked against the vocabulary.

    Raises:
      ApiError: an id outside the tokenizer's vocabulary.
    """
    tok = service.tokenizer
    if isinstance(prompt, str):
        return tok.encode(prompt) if chat else getattr(tok, "encode_prompt", tok.encode)(prompt)
    bad = [i for i in prompt if i >= tok.vocab_size]
    if bad:
        raise api.ApiError(f"token ids must be in [0, {tok.vocab_size}) (the tokenizer's vocabulary); got {bad[:8]}",
                           "prompt")
    return list(prompt)


def _request(params: api.Params, ids: list[int], on_event) -> batching.Request:
    scoring = params.echo and (params.logprobs is not None or params.max_tokens == 0)
    logprobs = params.logprobs if params.logprobs is not None else (0 if scoring else None)
    seed = secrets.randbits(32) if params.seed is None else params.seed
    return batching.Request(ids, params.max_tokens, on_event, temperature=params.temperature, top_k=params.top_k,
                            top_p=params.top_p, seed=seed, stop=params.stop, logprobs=logprobs,
                            prompt_logprobs=scoring)


def submit(service, params: api.Params, chat: bool) -> tuple[list[Choice], asyncio.Queue]:
    """Queues every prompt; (index, event) pairs arrive on the returned asyncio queue.

    Raises:
      ApiError: 503 while draining, 429 when the queue is full (nothing stays queued),
        400 for a prompt that cannot run.
    """
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def listener(index: int):
        def on_event(event):
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
                loop.call_soon_threadsafe(events.put_nowait, (index, event))
        return on_event

    choices = []
    try:
        for index, prompt in enumerate(params.prompts):
            ids = prompt_ids(service, prompt, chat)
            request = _request(params, ids, listener(index))
            shown = prompt if isinstance(prompt, str) else service.tokenizer.decode(ids)
            choices.append(Choice(index, request, shown if params.echo else ""))
            _queue(service, request, chat)
    except api.ApiError:
        for choice in choices:
            choice.request.cancel()
        raise
    return choices, events


def _queue(service, request: batching.Request, chat: bool) -> None:
    try:
        service.batcher.submit(request)
    except batching.Draining as err:
        raise api.ApiError(str(err), None, status=503, kind="server_error", code="shutting_down") from None
    except batching.QueueFull as err:
        raise api.ApiError(str(err), None, status=429, kind="rate_limit_error", code="rate_limit_exceeded") from None
    except ValueError as err:  # an empty prompt or one that fills the context
        code = "context_length_exceeded" if request.prompt else "invalid_value"
        raise api.ApiError(str(err), "messages" if chat else "prompt", code=code) from None


def scored(tokenizer, entries) -> list[api.Scored]:
    """`TokenLogprob`s with each token's bytes."""
    raw = lambda i: tokenizer_lib.token_bytes(tokenizer, i)  # noqa: E731
    return [api.Scored(raw(e.id), e.logprob, tuple((raw(i), lp) for i, lp in e.top)) for e in entries]


def _take(service, choice: Choice, event) -> None:
    """Adds one engine event to a choice."""
    if isinstance(event, batching.PromptLogprobs):
        first = api.Scored(tokenizer_lib.token_bytes(service.tokenizer, choice.request.prompt[0]), None)
        choice.scored += [first] + scored(service.tokenizer, event.entries[1:])
    elif isinstance(event, batching.TextDelta):
        choice.text.append(event.text)
        choice.scored += scored(service.tokenizer, event.logprobs)
    else:
        choice.end = event


def _usage(choices: list[Choice]) -> dict:
    return api.usage(sum(c.end.prompt_tokens for c in choices), sum(c.end.completion_tokens for c in choices))


async def whole(service, params: api.Params, chat: bool, rid: str) -> dict:
    """The whole response, once every choice has finished."""
    choices, events = submit(service, params, chat)
    try:
        while any(c.end is None for c in choices):
            index, event = await events.get()
            _take(service, choices[index], event)
    finally:
        for choice in choices:
            choice.request.cancel()  # a no-op once finished; frees the slot if this handler was cancelled
    failed = next((c.end for c in choices if c.end.reason == "error"), None)
    if failed:
        raise engine_error(failed)
    if chat:
        (c,) = choices
        lp = api.chat_logprobs(c.scored) if params.logprobs is not None else None
        return api.chat_body(rid, service.model_name, "".join(c.text), c.end.reason, _usage(choices), lp)
    wanted = params.logprobs is not None
    body = [api.completion_choice(c.index, c.echo + "".join(c.text), c.end.reason,
                                  api.completion_logprobs(c.scored) if wanted else None) for c in choices]
    return api.completion_body(rid, service.model_name, body, _usage(choices))


def engine_error(end: batching.Finished) -> api.ApiError:
    """HTTP 500 for a request whose engine step failed."""
    return api.ApiError(f"the engine failed on this request: {end.error}", None, status=500, kind="server_error",
                        code="engine_error")


class EventStream(StreamingResponse):
    """Server-sent events that cancel their requests however the response ends.

    When the client goes away, the ASGI server's next send fails and Starlette stops
    iterating the stream without closing it; the generator's own `finally` then runs
    only when it is garbage-collected, so the slots are freed here instead.
    """

    def __init__(self, content, choices: list[Choice]):
        super().__init__(content, media_type="text/event-stream")
        self.choices = choices

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for choice in self.choices:
                choice.request.cancel()


def sse_line(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def stream(service, params: api.Params, chat: bool, rid: str) -> EventStream:
    """The streamed response (queued now, so a full queue is still an HTTP error)."""
    choices, events = submit(service, params, chat)
    return EventStream(_events(service, params, chat, rid, choices, events), choices)


async def _events(service, params: api.Params, chat: bool, rid: str, choices: list[Choice], events: asyncio.Queue):
    name, wanted = service.model_name, params.logprobs is not None
    piece = _Pieces(service, params, chat, rid)
    if chat:
        yield sse_line(api.chat_chunk(rid, name, {"role": "assistant", "content": ""}))
    for choice in choices:
        if choice.echo and not choice.request.prompt_logprobs:
            yield piece.text(choice, choice.echo, [])
    while any(c.end is None for c in choices):
        index, event = await events.get()
        choice = choices[index]
        if isinstance(event, batching.PromptLogprobs):
            _take(service, choice, event)
            yield piece.text(choice, choice.echo, choice.scored)
        elif isinstance(event, batching.TextDelta):
            tokens = scored(service.tokenizer, event.logprobs) if wanted else []
            if event.text or tokens:
                yield piece.text(choice, event.text, tokens)
        elif event.reason == "error":
            yield sse_line(engine_error(event).body())
            yield "data: [DONE]\n\n"
            return
        else:
            choice.end = event
            yield piece.end(choice)
    if params.include_usage:
        chunk = api.chat_chunk(rid, name, {}, use=_usage(choices)) if chat else \
            api.completion_chunk(rid, name, use=_usage(choices))
        yield sse_line(chunk)
    yield "data: [DONE]\n\n"


class _Pieces:
    """The chunks of one stream; `text_offset` runs on per choice across chunks."""

    def __init__(self, service, params: api.Params, chat: bool, rid: str):
        self.name, self.chat, self.rid, self.wanted = service.model_name, chat, rid, params.logprobs is not None
        self.offsets: dict[int, int] = {}

    def text(self, choice: Choice, text: str, tokens: list[api.Scored]) -> str:
        if self.chat:
            lp = api.chat_logprobs(tokens) if self.wanted else None
            return sse_line(api.chat_chunk(self.rid, self.name, {"content": text}, logprobs=lp))
        lp = None
        if self.wanted:
            offset = self.offsets.get(choice.index, 0)
            lp = api.completion_logprobs(tokens, offset)
            self.offsets[choice.index] = offset + sum(len(t.text) for t in tokens)
        return sse_line(api.completion_chunk(self.rid, self.name, api.completion_choice(choice.index, text, None, lp)))

    def end(self, choice: Choice) -> str:
        if self.chat:
            return sse_line(api.chat_chunk(self.rid, self.name, {}, choice.end.reason))
        return sse_line(api.completion_chunk(self.rid, self.name,
                                             api.completion_choice(choice.index, "", choice.end.reason)))
