"""The OpenAI wire format of `serve.server`: request checking, response and chunk bodies.

Pure functions on plain dicts, no HTTP: `parse_completion` / `parse_chat` turn a request
body into `Params` or raise `ApiError` (HTTP 400 with OpenAI's error body
{"error": {"message", "type", "param", "code"}}); the `*_body` and `*_chunk` functions
build what the server sends.

Chat prompts. A checkpoint's chat template turns messages into prompt text; one without
(mpx's own byte-level runs have none) gets `plain_chat_prompt`:

    System: <system content>
    User: <user content>
    Assistant: <assistant content>
    ...
    Assistant:

and its turn markers ("\\nUser:", "\\nSystem:") also end the reply, so a model that goes
on to write the next user turn stops there.

Completions take one prompt or a batch: a string, a list of strings, a list of token ids
or a list of such lists (one choice per prompt, `index` in order). `logprobs: k` (0 ..
`MAX_LOGPROBS`) reports each token's log-probability and the k most likely tokens in
OpenAI's completions form ({"tokens", "token_logprobs", "top_logprobs",
"text_offset"}); `echo: true` puts the prompt before the completion, in the text and,
with logprobs, in those lists (the first prompt token's log-probability is null);
`max_tokens: 0` with echo scores the prompt without generating (what
lm-evaluation-harness's loglikelihood tasks send). Chat takes `logprobs: true` with
`top_logprobs: k` and answers in the chat form ({"content": [{"token", "logprob",
"bytes", "top_logprobs"}]}).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any, Callable, Sequence

from serve.slots import MAX_LOGPROBS

ROLES = ("system", "user", "assistant", "tool", "developer")
PLAIN_CHAT_STOPS = ("\nUser:", "\nSystem:")
DEFAULT_MAX_TOKENS = 128
MAX_STOPS = 4  # OpenAI's limit on stop strings


class ApiError(ValueError):
    """A bad request: HTTP `status` with OpenAI's error body."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind
        self.code = code or ("invalid_value" if status == 400 else None)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


Prompt = str | tuple[int, ...]  # text, or token ids


@dataclasses.dataclass(frozen=True)
class Params:
    """A checked request: its prompts (text or token ids; chat has one) and how to
    generate from them."""

    prompts: tuple[Prompt, ...]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    model: str | None
    logprobs: int | None = None  # alternatives per token; None: no log-probabilities
    echo: bool = False


def _get(body: dict, name: str, types: tuple, default: Any, what: str) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    # bool is an int in Python; JSON true is never a number here.
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise ApiError(f"'{name}' must be {what}; got {json_type(value)} {value!r}", name, code="invalid_type")
    return value


def json_type(value: Any) -> str:
    """The JSON name of a Python value's type ("string", "number", ...)."""
    for kind, name in ((bool, "boolean"), (str, "string"), ((int, float), "number"), (list, "array"),
                       (dict, "object")):
        if isinstance(value, kind):
            return name
    return "null"


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(f"'stop' must be a string or a list of strings; got {stop!r}", "stop", code="invalid_type")
    if len(stop) > MAX_STOPS:
        raise ApiError(f"'stop' takes at most {MAX_STOPS} strings; got {len(stop)}", "stop")
    return tuple(s for s in stop if s)


def _sampling(body: dict, echo: bool = False) -> dict:
    max_tokens = _get(body, "max_tokens", (int,), DEFAULT_MAX_TOKENS, "an integer")
    max_tokens = _get(body, "max_completion_tokens", (int,), max_tokens, "an integer")
    if max_tokens < (0 if echo else 1):
        allowed = ">= 0 with echo" if echo else ">= 1 (0 only with echo: true, to score the prompt)"
        raise ApiError(f"'max_tokens' must be {allowed}; got {max_tokens}", "max_tokens")
    temperature = float(_get(body, "temperature", (int, float), 1.0, "a number"))
    if not 0 <= temperature <= 2:
        raise ApiError(f"'temperature' must be in [0, 2]; got {temperature}", "temperature")
    top_p = float(_get(body, "top_p", (int, float), 1.0, "a number"))
    if not 0 < top_p <= 1:
        raise ApiError(f"'top_p' must be in (0, 1]; got {top_p}", "top_p")
    top_k = _get(body, "top_k", (int,), 0, "an integer")
    if top_k < 0:
        raise ApiError(f"'top_k' must be >= 0 (0 keeps every token); got {top_k}", "top_k")
    seed = _get(body, "seed", (int,), None, "an integer")
    n = _get(body, "n", (int,), 1, "an integer")
    if n != 1:
        raise ApiError(f"only 'n' = 1 is supported; got {n}", "n")
    return dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)


def _stream(body: dict) -> tuple[bool, bool]:
    stream = _get(body, "stream", (bool,), False, "a boolean")
    options = _get(body, "stream_options", (dict,), {}, "an object")
    return stream, bool(_get(options, "include_usage", (bool,), False, "a boolean"))


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object; got {json_type(body)}", None, code="invalid_type")
    return body


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)


def _prompts(body: dict) -> tuple[Prompt, ...]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return (prompt,)
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return tuple(prompt)
        if _is_ids(prompt):
            return (tuple(prompt),)
        if all(_is_ids(p) for p in prompt):
            return tuple(tuple(p) for p in prompt)
    raise ApiError("'prompt' must be a string, a list of strings, a list of token ids (integers >= 0) or a list "
                   f"of such lists; got {json_type(prompt)} {str(prompt)[:80]}", "prompt", code="invalid_type")


def _logprobs(body: dict, name: str = "logprobs") -> int | None:
    count = _get(body, name, (int,), None, "an integer")
    if count is not None and not 0 <= count <= MAX_LOGPROBS:
        raise ApiError(f"'{name}' must be in [0, {MAX_LOGPROBS}]; got {count}", name)
    return count


def parse_completion(body: Any) -> Params:
    """Checks a /v1/completions body.

    Raises:
      ApiError: naming the first bad field, its value and what is allowed.
    """
    body = _object(body)
    prompts = _prompts(body)
    stream, usage = _stream(body)
    echo = _get(body, "echo", (bool,), False, "a boolean")
    return Params(prompts, stop=_stop(body), stream=stream, include_usage=usage,
                  model=_get(body, "model", (str,), None, "a string"), logprobs=_logprobs(body), echo=echo,
                  **_sampling(body, echo))


def parse_tokenize(body: Any) -> dict:
    """Checks a /tokenize body: {"prompt": text, "add_special_tokens": bool (default true)}."""
    body = _object(body)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise ApiError(f"'prompt' must be a string; got {json_type(prompt)}", "prompt", code="invalid_type")
    return {"prompt": prompt, "add_special_tokens": _get(body, "add_special_tokens", (bool,), True, "a boolean")}


def parse_detokenize(body: Any) -> list[int]:
    """Checks a /detokenize body: {"tokens": [ids]}."""
    tokens = _object(body).get("tokens")
    if not (tokens == [] or _is_ids(tokens)):
        raise ApiError(f"'tokens' must be a list of token ids (integers >= 0); got {str(tokens)[:80]}", "tokens",
                       code="invalid_type")
    return tokens


def check_messages(messages: Any) -> list[dict]:
    """Returns chat messages as [{"role", "content"}] with string content.

    Raises:
      ApiError: not a non-empty list of messages with a known role and text content.
    """
    if not isinstance(messages, list) or not messages:
        raise ApiError("'messages' must be a non-empty list of {role, content} objects", "messages",
                       code="invalid_type")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ApiError(f"messages[{i}] needs a 'role' among {', '.join(ROLES)}", f"messages[{i}].role")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text parts are served
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(f"messages[{i}].content must be a string; got {json_type(content)}",
                           f"messages[{i}].content", code="invalid_type")
        out.append({"role": message["role"], "content": content})
    return out


def parse_chat(body: Any, render: Callable[[list[dict]], str], template_stops: tuple[str, ...] = ()) -> Params:
    """Checks a /v1/chat/completions body and renders its messages into a prompt.

    Args:
      body: the decoded JSON body.
      render: messages -> prompt text (the checkpoint's chat template).
      template_stops: stop strings the template adds to the request's own.

    Raises:
      ApiError: naming the first bad field.
    """
    body = _object(body)
    messages = check_messages(body.get("messages"))
    stream, usage = _stream(body)
    stop = _stop(body)
    stop += tuple(s for s in template_stops if s not in stop)
    wanted = _get(body, "logprobs", (bool,), False, "a boolean")
    top = _logprobs(body, "top_logprobs")
    if top is not None and not wanted:
        raise ApiError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return Params((render(messages),), stop=stop, stream=stream, include_usage=usage,
                  model=_get(body, "model", (str,), None, "a string"), logprobs=(top or 0) if wanted else None,
                  **_sampling(body))


def plain_chat_prompt(messages: list[dict]) -> str:
    """The fallback chat template (see the module docstring)."""
    turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(turns + ["Assistant:"])


# --------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _finish_reason(reason: str | None) -> str | None:
    """OpenAI's finish_reason: "length" for a reply cut short (max_tokens, the context, a
    server drain ending it: "shutdown"), "stop" otherwise."""
    return None if reason is None else ("length" if reason in ("length", "shutdown") else "stop")


def completion_choice(index: int, text: str, reason: str | None, logprobs: dict | None = None) -> dict:
    """One /v1/completions choice (whole, or a streamed piece)."""
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": _finish_reason(reason)}


def completion_body(rid: str, model: str, choices: list[dict], use: dict) -> dict:
    """A whole /v1/completions response."""
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}


def chat_body(rid: str, model: str, text: str, reason: str, use: dict, logprobs: dict | None = None) -> dict:
    """A whole /v1/chat/completions response."""
    message = {"role": "assistant", "content": text}
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": logprobs,
                         "finish_reason": _finish_reason(reason)}], "usage": use}


def completion_chunk(rid: str, model: str, choice: dict | None = None, use: dict | None = None) -> dict:
    """One streamed /v1/completions chunk: a choice's piece, or the usage alone."""
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [] if choice is None else [choice], "usage": use}


def chat_chunk(rid: str, model: str, delta: dict, reason: str | None = None, use: dict | None = None,
               logprobs: dict | None = None) -> dict:
    """One streamed /v1/chat/completions chunk (usage-only chunks have no choices)."""
    choices = [] if use else [{"index": 0, "delta": delta, "logprobs": logprobs,
                               "finish_reason": _finish_reason(reason)}]
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}


# --------------------------------------------------------------------------- log-probabilities


@dataclasses.dataclass(frozen=True)
class Scored:
    """A token as the log-probability answers show it: its bytes, its log-probability
    (None for a prompt's first token) and the alternatives' (bytes, log-probability)."""

    raw: bytes
    logprob: float | None
    top: tuple[tuple[bytes, float], ...] = ()

    @property
    def text(self) -> str:
        return token_text(self.raw)


def token_text(raw: bytes) -> str:
    """A token's text as OpenAI shows it: its UTF-8 text, or "bytes:\\xe2\\x80" for bytes
    that are only part of a character."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def completion_logprobs(tokens: Sequence[Scored], offset: int = 0) -> dict:
    """OpenAI's completions logprobs object; `text_offset` counts characters from `offset`
    (where these tokens' text starts in the choice's text)."""
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [None if t.logprob is None else {token_text(x): lp for x, lp in t.top} for t in tokens],
            "text_offset": offsets}


def chat_logprobs(tokens: Sequence[Scored]) -> dict:
    """OpenAI's chat logprobs object ({"content": [...]}, with each token's UTF-8 bytes)."""
    def entry(raw: bytes, logprob: float) -> dict:
        return {"token": token_text(raw), "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**entry(t.raw, t.logprob), "top_logprobs": [entry(x, lp) for x, lp in t.top]}
                        for t in tokens]}
