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
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any, Callable

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


@dataclasses.dataclass(frozen=True)
class Params:
    """A checked request: the prompt text and how to generate from it."""

    prompt: str
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    model: str | None


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


def _sampling(body: dict) -> dict:
    max_tokens = _get(body, "max_tokens", (int,), DEFAULT_MAX_TOKENS, "an integer")
    max_tokens = _get(body, "max_completion_tokens", (int,), max_tokens, "an integer")
    if max_tokens <= 0:
        raise ApiError(f"'max_tokens' must be >= 1; got {max_tokens}", "max_tokens")
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


def parse_completion(body: Any) -> Params:
    """Checks a /v1/completions body.

    Raises:
      ApiError: naming the first bad field, its value and what is allowed.
    """
    body = _object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(f"'prompt' must be a string (or a list of one string); got {json_type(prompt)}", "prompt",
                       code="invalid_type")
    stream, usage = _stream(body)
    return Params(prompt, stop=_stop(body), stream=stream, include_usage=usage,
                  model=_get(body, "model", (str,), None, "a string"), **_sampling(body))


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
    return Params(render(messages), stop=stop, stream=stream, include_usage=usage,
                  model=_get(body, "model", (str,), None, "a string"), **_sampling(body))


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


def completion_body(rid: str, model: str, text: str, reason: str, use: dict) -> dict:
    """A whole /v1/completions response."""
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": _finish_reason(reason)}],
            "usage": use}


def chat_body(rid: str, model: str, text: str, reason: str, use: dict) -> dict:
    """A whole /v1/chat/completions response."""
    message = {"role": "assistant", "content": text}
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": _finish_reason(reason)}], "usage": use}


def completion_chunk(rid: str, model: str, text: str, reason: str | None = None, use: dict | None = None) -> dict:
    """One streamed /v1/completions chunk (usage-only chunks have no choices)."""
    choices = [] if use else [{"index": 0, "text": text, "logprobs": None, "finish_reason": _finish_reason(reason)}]
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}


def chat_chunk(rid: str, model: str, delta: dict, reason: str | None = None, use: dict | None = None) -> dict:
    """One streamed /v1/chat/completions chunk (usage-only chunks have no choices)."""
    choices = [] if use else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": _finish_reason(reason)}]
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}
