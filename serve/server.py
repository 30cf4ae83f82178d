"""`python -m serve.server --checkpoint DIR`: an OpenAI-compatible HTTP server.

    python -m serve.server --checkpoint runs/tiny --precision fp8 --port 8000
    curl -s 127.0.0.1:8000/v1/completions -d '{"prompt": "ROMEO:", "max_tokens": 32}'

Endpoints: POST /v1/completions, POST /v1/chat/completions (the tokenizer's Hugging Face
chat template via `store.chat`, or the plain fallback of `serve.server_api`), GET
/v1/models, GET /health, and vLLM's tokenizer endpoints (POST /tokenize, POST
/detokenize, GET /tokenizer_info: what lm-evaluation-harness's `local-completions`
uses to tokenize as the server does). With "stream": true the reply is server-sent
events in OpenAI's chunk format ending with `data: [DONE]`; without it, one JSON object
with usage. Parameters: max_tokens, temperature, top_p, top_k (an extension; 0 = off),
seed, stop (string or list), n = 1; for completions also a batch of prompts (text or
token ids), logprobs, echo and max_tokens 0 (scoring the prompt), for chat logprobs and
top_logprobs (`serve.server_api`). max_tokens past the context is capped there
(finish_reason "length"). Requests and responses: `serve.responses`.

FastAPI routes on uvicorn; one engine thread (`serve.batching.Batcher`) owns the model
and batches requests continuously (`serve.slots`); each request's events reach its
handler through the asyncio loop. Bad requests get HTTP 400 with OpenAI's error body,
a model name other than the one served 404 (`model_not_found`), a full queue 429. A
client that goes away mid-stream frees its slot at the next step. Ctrl-C or SIGTERM
stops accepting and lets requests in flight finish for up to `--grace` seconds; then
the engine ends what is left (finish_reason "length", the final chunk and `[DONE]`),
so every stream ends properly, and the server exits.

Sizes. `--max-seq-len` defaults to the model's context and `--max-batch` to 16 slots, or
fewer when 16 slots of that context would take more than a quarter of the machine's
available memory (`default_max_batch`). Both cost memory only: a decode step runs the
slots that hold requests and attends over the positions they fill (`serve.slots`). The
port is taken before the model loads, so a port in use fails at once.

`--checkpoint` is an mpx run or a Hugging Face model directory (its tokenizer, chat
template and stop ids come along); `--policy FILE` decides per layer which weights are
FP8 and how, instead of `--precision`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import socket
import sys
import threading
import time
from typing import Callable

import fastapi
import uvicorn
from absl import logging as absl_logging
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from mpx import config as config_io
from mpx import kernels
from mpx import target as target_lib
from serve import flags
from serve import batching
from serve import kv_cache as kv_cache_lib
from serve import quantize as q
from serve import responses
from serve import server_api as api
from serve import slots as slots_lib
from serve import sources
from store import chat as chat_lib
from store import cli
from store import tokenizer as tokenizer_lib

DEFAULT_MAX_BATCH = 16
MEMORY_SHARE = 0.25  # of the available memory, the most the default slots' KV cache takes
DRAIN_MARGIN_S = 5.0  # uvicorn waits this much longer than --grace: the engine ends the streams first


@dataclasses.dataclass
class Service:
    """What the HTTP side needs: the engine loop, the tokenizer and the chat template.

    Attributes:
      batcher: the engine loop (started and stopped with the app).
      tokenizer: encode / decode.
      model_name: the id /v1/models lists.
      render_chat: messages -> prompt text.
      chat_stops: stop strings the chat template adds.
      info: extra fields for /health (precision, KV cache, slots).
    """

    batcher: batching.Batcher
    tokenizer: object
    model_name: str
    render_chat: Callable[[list[dict]], str] = api.plain_chat_prompt
    chat_stops: tuple[str, ...] = api.PLAIN_CHAT_STOPS
    info: dict = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------- app


def create_app(service: Service) -> fastapi.FastAPI:
    """The ASGI app; its lifespan starts and stops `service.batcher`."""

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        service.batcher.start()
        yield
        service.batcher.stop()

    app = fastapi.FastAPI(title="mpx", lifespan=lifespan)
    app.add_exception_handler(api.ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.model_name, "busy": service.batcher.busy(),
                "finished": dict(service.batcher.finished), **service.info}

    @app.get("/v1/models")
    async def models():
        card = {"id": service.model_name, "object": "model", "created": 0, "owned_by": "mpx"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: fastapi.Request):
        params = api.parse_completion(await _json(request))
        return await _respond(service, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: fastapi.Request):
        params = api.parse_chat(await _json(request), service.render_chat, service.chat_stops)
        return await _respond(service, params, chat=True)

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return tokenizer_card(service)

    @app.post("/tokenize")
    async def tokenize(request: fastapi.Request):
        body = api.parse_tokenize(await _json(request))
        text, special = body["prompt"], body["add_special_tokens"]
        tok = service.tokenizer
        ids = getattr(tok, "encode_prompt", tok.encode)(text) if special else tok.encode(text)
        return {"count": len(ids), "max_model_len": service.batcher.slots.max_seq_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: fastapi.Request):
        ids = api.parse_detokenize(await _json(request))
        return {"prompt": service.tokenizer.decode(responses.prompt_ids(service, tuple(ids), chat=False))}

    return app


async def _api_error(_request, err: api.ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


async def _http_error(_request, err: HTTPException) -> JSONResponse:
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    return JSONResponse(api.ApiError(str(err.detail), status=err.status_code, kind=kind).body(),
                        status_code=err.status_code)


async def _json(request: fastapi.Request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise api.ApiError(f"the request body is not valid JSON: {err}", None, code="invalid_json") from None


def tokenizer_card(service: Service) -> dict:
    """What GET /tokenizer_info says (vLLM's fields that lm-evaluation-harness's remote
    tokenizer reads: the end and start tokens as text, the chat template)."""
    tok = service.tokenizer
    specials = dict(getattr(tok, "special_tokens", {}))
    stops = _eos_ids(tok)  # the ids that end every request
    eos = tok.decode(stops[:1]) if stops else specials.get("eos_token")
    return {"tokenizer_class": type(tok).__name__, "vocab_size": tok.vocab_size, "eos_token": eos,
            "bos_token": specials.get("bos_token"), "pad_token": specials.get("pad_token"),
            "chat_template": getattr(tok, "chat_template", None), "model_max_length": service.batcher.slots.max_seq_len}


def check_model(service: Service, name: str | None) -> None:
    """Raises ApiError (HTTP 404, OpenAI's `model_not_found`) unless `name` is None or
    the model this server serves."""
    if name is not None and name != service.model_name:
        raise api.ApiError(f"the model {name!r} does not exist; this server serves {service.model_name!r} "
                           "(GET /v1/models)", "model", status=404, code="model_not_found")


async def _respond(service: Service, params: api.Params, chat: bool):
    check_model(service, params.model)
    rid = api.new_id("chatcmpl" if chat else "cmpl")
    if params.stream:
        return responses.stream(service, params, chat, rid)
    return await responses.whole(service, params, chat, rid)


# --------------------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (see the module docstring); a bad value exits 2 with one line."""
    p = cli.ArgumentParser(prog="python -m serve.server", description=__doc__.splitlines()[0])
    flags.checkpoint(p)
    flags.precision(p)
    p.add_argument("--activations", default="token", choices=q.ACTIVATIONS, help="FP8 activations (default token)")
    flags.policy(p, "which layers are FP8 and how (instead of --precision)")
    flags.kv_cache(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=cli.non_negative_int, default=8000, help="0 picks a free port")
    p.add_argument("--max-batch", type=cli.positive_int,
                   help=f"slots: the most requests decoded together (default {DEFAULT_MAX_BATCH}, fewer if their KV "
                   f"cache would take over {MEMORY_SHARE * 100:.0f}%% of the available memory)")
    p.add_argument("--max-seq-len", type=cli.positive_int, help="positions per slot (default: the model's context)")
    p.add_argument("--max-queue", type=cli.non_negative_int, default=64,
                   help="requests waiting while every slot is busy, before 429")
    p.add_argument("--prefill-chunk", type=cli.positive_int, default=64, help="most prompt tokens per prefill row")
    p.add_argument("--prefill-rows", type=cli.positive_int, default=4,
                   help="most requests one prefill call takes (at most --max-batch)")
    p.add_argument("--decode-steps", type=cli.positive_int, default=1, help="decode steps per compiled call")
    p.add_argument("--grace", type=cli.non_negative_float, default=10.0,
                   help="seconds requests in flight may run after Ctrl-C / SIGTERM before they are ended")
    flags.tokenizer(p)
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> Service:
    """The service a command line describes: checkpoint loaded, quantized, compiled.

    Raises:
      ServeError, ConfigError, ValueError, FileNotFoundError: user mistakes (a missing
        checkpoint, a bad policy file, sizes that do not fit the model).
    """
    spec = q.policy_spec(args.policy) if args.policy else q.ServeSpec(args.precision, activations=args.activations)
    model, variables, tokenizer, ckpt = sources.load_for_serving(args.checkpoint, spec, tokenizer=args.tokenizer,
                                                                 skip_incomplete=args.skip_incomplete)
    max_seq_len = args.max_seq_len or model.config.max_seq_len
    max_batch = args.max_batch or default_max_batch(model.config, args.kv_cache, max_seq_len)
    slots = slots_lib.SlotModel(model, variables, max_batch=max_batch, max_seq_len=max_seq_len,
                                kv_cache=args.kv_cache, prefill_chunk=args.prefill_chunk,
                                prefill_rows=min(args.prefill_rows, max_batch), steps=args.decode_steps)
    slots.warm_up()
    batcher = batching.Batcher(slots, tokenizer, max_queue=args.max_queue, stop_ids=_eos_ids(tokenizer))
    info = {"precision": spec.label, "policy": args.policy, "kv_cache": args.kv_cache, "max_batch": max_batch,
            "max_seq_len": slots.max_seq_len, "context": model.config.max_seq_len,
            "decode_kernel": kernels.status() if target_lib.current().is_cpu else None}
    render, stops = chat_renderer(tokenizer)
    return Service(batcher, tokenizer, ckpt.name, render, stops, info)


def default_max_batch(config, kv_cache: str, max_seq_len: int, available: int | None = None) -> int:
    """`DEFAULT_MAX_BATCH` slots, or as many as fit in `MEMORY_SHARE` of the available memory.

    Args:
      config: the model's shape.
      kv_cache: the cache kind.
      max_seq_len: positions per slot (the cache allocates the next power of two).
      available: bytes of memory available (default: what the machine reports free).

    Returns:
      A slot count in [1, DEFAULT_MAX_BATCH].
    """
    available = _available_memory() if available is None else available
    per_slot = kv_cache_lib.bytes_per_token(config, kv_cache) * slots_lib.bucket(max_seq_len, minimum=1)
    if available is None:
        return DEFAULT_MAX_BATCH
    return int(max(1, min(DEFAULT_MAX_BATCH, MEMORY_SHARE * available // per_slot)))


def _available_memory() -> int | None:
    """Bytes of physical memory available now (None where the OS does not say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def chat_renderer(tokenizer) -> tuple[Callable[[list[dict]], str], tuple[str, ...]]:
    """(messages -> prompt text, stop strings the template adds) for a tokenizer.

    The tokenizer's Hugging Face chat template (`store.chat.render_chat`, its turn ends
    are stop ids already) when it has one, else the plain fallback of `serve.server_api`.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return api.plain_chat_prompt, api.PLAIN_CHAT_STOPS
    specials = dict(getattr(tokenizer, "special_tokens", {}))

    def render(messages: list[dict]) -> str:
        try:
            return chat_lib.render_chat(template, messages, specials)
        except chat_lib.ChatError as err:
            raise api.ApiError(str(err), "messages") from None

    return render, ()


def _eos_ids(tokenizer) -> tuple[int, ...]:
    """End-of-sequence ids that finish every request ("stop").

    A model tokenizer's `stop_ids` (generation_config.json's eos_token_id, ...) if it
    has them; else a subword tokenizer's one-token
    document separator when that is a special token (`store.tokenizer.HFTokenizer` uses
    the end-of-text token when it finds one, else the text "\\n\\n", which is not an
    end). Byte-level text has none.
    """
    if getattr(tokenizer, "stop_ids", None):
        return tuple(tokenizer.stop_ids)
    separator = list(getattr(tokenizer, "separator", []))
    if isinstance(tokenizer, tokenizer_lib.HFTokenizer) and len(separator) == 1 \
            and tokenizer.decode(separator) != "\n\n":
        return tuple(separator)
    return ()


class Server(uvicorn.Server):
    """uvicorn's server whose Ctrl-C / SIGTERM also starts the engine's drain: requests
    in flight run for up to `grace` seconds, then the engine ends them, so each stream
    gets its final chunk and `[DONE]` before uvicorn's own deadline (`DRAIN_MARGIN_S`
    later) would cut it."""

    def __init__(self, config: uvicorn.Config, service: Service, grace: float):
        super().__init__(config)
        self.service, self.grace = service, grace

    def handle_exit(self, sig, frame) -> None:
        self.service.batcher.drain(self.grace)
        super().handle_exit(sig, frame)


def make_server(service: Service, host: str, port: int, grace: float) -> Server:
    """The uvicorn server of `service` (quiet: warnings and errors only)."""
    config = uvicorn.Config(create_app(service), host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=grace + DRAIN_MARGIN_S)
    return Server(config, service, grace)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), as uvicorn binds it.

    Raises:
      OSError: the port is in use or the address is not this machine's (one line).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}; stop what uses it or pick another "
                      "--port (0 picks a free one)") from None
    sock.set_inheritable(True)
    return sock


def _announce(server: uvicorn.Server, host: str) -> None:
    """Prints the URL once uvicorn listens (the real port when --port 0)."""
    while not server.started and not server.should_exit:
        time.sleep(0.05)
    if server.started:
        port = server.servers[0].sockets[0].getsockname()[1]
        print(f"serving on http://{host}:{port}", flush=True)


def main(argv=None) -> int:
    """Builds the service, serves until Ctrl-C / SIGTERM; returns the exit status."""
    args = parse_args(argv)
    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax logs read-only restores as warnings
    try:
        sock = listen(args.host, args.port)  # before loading: a port in use fails at once
    except OSError as err:
        return cli.fail(err)
    try:
        service = build(args)
    except (q.ServeError, config_io.ConfigError, ValueError, FileNotFoundError) as err:
        sock.close()
        return cli.fail(err)
    server = make_server(service, args.host, args.port, args.grace)
    threading.Thread(target=_announce, args=(server, args.host), daemon=True).start()
    server.run(sockets=[sock])  # Ctrl-C / SIGTERM: stops accepting, drains (Server.handle_exit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
