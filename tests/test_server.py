"""Tests for serve.server: the OpenAI HTTP API on a free loopback port, through the official
`openai` client and raw httpx.

One server (in-process uvicorn on a thread, stopped in teardown) serves a randomly
initialised micro checkpoint whose weights are scaled up (x3) so that greedy replies
depend on the whole prompt.
"""

import concurrent.futures
import contextlib
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import httpx
import jax
import jax.numpy as jnp
import openai
import pytest
import uvicorn

import mpx
from models import transformer
from models.config import ModelConfig
from mpx import config as config_lib
from serve import batching
from serve import server
from store import checkpoint as ckpt_lib

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ModelConfig(n_layers=1, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=512)
MAX_BATCH = 8
MAX_QUEUE = 2


def micro_checkpoint(root: Path, name: str, config: ModelConfig, seed: int = 0) -> Path:
    """A random checkpoint of `config` (weights x3) at root/name/checkpoints, served as `name`."""
    params = transformer.Transformer(config).init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"]
    path = root / name / "checkpoints"
    ckpt_lib.save(path, 1, {"params": jax.tree.map(lambda x: 3 * x, params)},
                  {"config": {"model": config_lib.to_dict(config)}})
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return micro_checkpoint(tmp_path_factory.mktemp("runs"), "micro", CONFIG)


@pytest.fixture(scope="module")
def service(checkpoint):
    args = server.parse_args(["--checkpoint", str(checkpoint), "--precision", "fp32", "--kv-cache", "fp32",
                              "--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE), "--prefill-chunk", "8"])
    return server.build(args)


@contextlib.contextmanager
def _serving(service, grace=20.0):
    """(uvicorn server, its URL): in-process on a free loopback port, stopped on exit."""
    uv = server.make_server(service, "127.0.0.1", 0, grace)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert uv.started, "the server did not start"
    yield uv, f"http://127.0.0.1:{uv.servers[0].sockets[0].getsockname()[1]}"
    uv.should_exit = True
    thread.join(30)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def running(service):
    with _serving(service) as served:
        yield served


@pytest.fixture(scope="module")
def url(running):
    return running[1]


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def _chat(client, content, **kwargs):
    return client.chat.completions.create(model="micro", messages=[{"role": "user", "content": content}],
                                          **{"max_tokens": 16, "temperature": 0, **kwargs})


def _stream_text(client, content, **kwargs):
    chunks = list(_chat(client, content, stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


# --------------------------------------------------------------------------- the API


def test_models_and_health(client, url, service):
    assert [m.id for m in client.models.list().data] == [service.model_name]
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["max_batch"] == MAX_BATCH and health["precision"] == "fp32"


def test_chat_completion_with_usage(client):
    reply = _chat(client, "Hello there")
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("length", "stop")
    prompt = server.api.plain_chat_prompt([{"role": "user", "content": "Hello there"}])
    assert reply.usage.prompt_tokens == len(prompt.encode())
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert 1 <= reply.usage.completion_tokens <= 16


def test_streamed_chat_matches_the_whole_reply(client):
    text, chunks = _stream_text(client, "Hello there", stream_options={"include_usage": True})
    assert text == _chat(client, "Hello there").choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].usage.completion_tokens >= 1 and not chunks[-1].choices


def test_completions_stream_and_whole_agree_and_end_with_done(client, url):
    whole = client.completions.create(model="micro", prompt="ROMEO:", max_tokens=24, temperature=0)
    assert whole.usage.prompt_tokens == 6 and whole.choices[0].finish_reason == "length"
    body = {"prompt": "ROMEO:", "max_tokens": 24, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole.choices[0].text


def test_eight_simultaneous_streams_get_their_greedy_replies_alone(client):
    prompts = [f"Request {i}: {'abcdefgh'[:i + 1]}" for i in range(8)]
    alone = [_stream_text(client, p, max_tokens=24)[0] for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: _stream_text(client, p, max_tokens=24)[0], prompts))
    assert together == alone
    assert len(set(alone)) > 1  # the replies depend on the prompt


def test_seeded_sampling_repeats(client):
    a, b = (_chat(client, "Hi", temperature=0.9, top_p=0.9, seed=3).choices[0].message.content for _ in range(2))
    assert a == b


def test_stop_string_is_honoured(client):
    full = client.completions.create(model="micro", prompt="ROMEO:", max_tokens=24, temperature=0).choices[0].text
    stop = next(full[i:i + 2] for i in range(3, len(full) - 1) if "\ufffd" not in full[i:i + 2])
    cut = client.completions.create(model="micro", prompt="ROMEO:", max_tokens=24, temperature=0, stop=stop)
    assert cut.choices[0].text == full[:full.find(stop)] and cut.choices[0].finish_reason == "stop"


# --------------------------------------------------------------------------- bad input


BAD = [
    (b"{not json", None),
    (b"[1, 2]", None),
    (json.dumps({"prompt": 5}).encode(), "prompt"),
    (json.dumps({"prompt": "x", "max_tokens": "ten"}).encode(), "max_tokens"),
    (json.dumps({"prompt": "x", "max_tokens": 0}).encode(), "max_tokens"),
    (json.dumps({"prompt": "x", "max_tokens": -3}).encode(), "max_tokens"),
    (json.dumps({"prompt": "x", "temperature": -0.5}).encode(), "temperature"),
    (json.dumps({"prompt": "x", "top_p": 0}).encode(), "top_p"),
    (json.dumps({"prompt": "x", "top_p": 1.5}).encode(), "top_p"),
    (json.dumps({"prompt": "x", "stream": "yes"}).encode(), "stream"),
    (json.dumps({"prompt": "x", "stop": 3}).encode(), "stop"),
    (json.dumps({"prompt": "x", "n": 2}).encode(), "n"),
    (json.dumps({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}).encode(), "stop"),
    (json.dumps({"prompt": "x", "max_tokens": True}).encode(), "max_tokens"),
    (json.dumps({"prompt": ""}).encode(), "prompt"),
    (json.dumps({"prompt": "x", "top_k": -1}).encode(), "top_k"),
    (json.dumps({"prompt": "x" * CONFIG.max_seq_len}).encode(), "prompt"),
]


@pytest.mark.parametrize("body, param", BAD)
def test_bad_requests_get_400_with_an_openai_error_body(url, body, param):
    response = httpx.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and error["message"]


def test_chat_fallback_template_and_its_stops():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    params = server.api.parse_chat({"messages": messages, "stop": "\n\n", "max_tokens": 3},
                                   server.api.plain_chat_prompt, server.api.PLAIN_CHAT_STOPS)
    assert params.prompts == ("System: Be brief.\nUser: Hi\nAssistant:",)
    assert params.stop == ("\n\n", "\nUser:", "\nSystem:") and params.max_tokens == 3


def test_a_model_directory_brings_its_chat_template_and_stop_ids():
    tokenizer = server.q.load_tokenizer(str(ROOT / "tests" / "fixtures" / "hf" / "llama3"))
    render, stops = server.chat_renderer(tokenizer)
    text = render([{"role": "user", "content": "Hi"}])
    assert text.startswith(tokenizer.special_tokens["bos_token"]) and "Hi" in text and not stops
    assert server._eos_ids(tokenizer) == tuple(tokenizer.stop_ids) and tokenizer.stop_ids
    strict = types.SimpleNamespace(chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(server.api.ApiError, match="roles must alternate") as err:
        server.chat_renderer(strict)[0]([{"role": "user", "content": "x"}])
    assert err.value.status == 400 and err.value.param == "messages"


def test_a_hugging_face_directory_serves_chat_with_its_template_and_stop_ids():
    directory = ROOT / "tests" / "fixtures" / "hf" / "llama3"
    policy = ROOT / "configs" / "policies" / "fp8_ffn_only.yaml"
    service = server.build(server.parse_args(["--checkpoint", str(directory), "--policy", str(policy), "--max-batch",
                                              "2", "--prefill-chunk", "8", "--prefill-rows", "1"]))
    assert service.info["precision"] == "policy fp8_ffn_only"
    weights = service.batcher.slots.variables["params"]["layers_0"]
    assert isinstance(weights["mlp"]["up"]["kernel"], mpx.ScaledArray)
    assert weights["attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    assert service.batcher.stop_ids and service.batcher.stop_ids == tuple(service.tokenizer.stop_ids)
    with _serving(service) as (_, url):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model=service.model_name, max_tokens=4, temperature=0,
                                               messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 4
    expected = service.render_chat([{"role": "user", "content": "Hi"}])
    assert reply.usage.prompt_tokens == len(service.tokenizer.encode(expected))


def test_bad_chat_messages_get_400(url):
    for messages in ([], "hi", [{"role": "wizard", "content": "x"}], [{"role": "user", "content": 4}]):
        response = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages})
        assert response.status_code == 400 and response.json()["error"]["param"].startswith("messages")


def test_an_unknown_model_gets_404_model_not_found(url, service):
    assert service.model_name == "micro"
    for path, body in (("completions", {"prompt": "x"}), ("chat/completions", {"messages": [{"role": "user",
                                                                                               "content": "x"}]})):
        response = httpx.post(f"{url}/v1/{path}", json={**body, "model": "gpt-4o", "max_tokens": 2})
        error = response.json()["error"]
        assert response.status_code == 404 and "gpt-4o" in error["message"] and "micro" in error["message"]
        assert {k: v for k, v in error.items() if k != "message"} == {
            "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "model": "micro", "max_tokens": 2})
    assert ok.status_code == 200


def test_a_port_in_use_fails_in_one_line_before_loading(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()  # the checkpoint does not exist: the port is checked first
        assert server.main(["--checkpoint", str(tmp_path / "nothing"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and len(err.strip().splitlines()) == 1, err
    assert time.monotonic() - start < 2


def test_default_slots_follow_the_memory_the_machine_has():
    per_slot = server.kv_cache_lib.bytes_per_token(CONFIG, "bf16") * CONFIG.max_seq_len
    assert server.default_max_batch(CONFIG, "bf16", 512, available=10**12) == server.DEFAULT_MAX_BATCH
    assert server.default_max_batch(CONFIG, "bf16", 512, available=int(3 * per_slot / server.MEMORY_SHARE)) == 3
    assert server.default_max_batch(CONFIG, "bf16", 300, available=int(3 * per_slot / server.MEMORY_SHARE)) == 3
    assert server.default_max_batch(CONFIG, "bf16", 512, available=0) == 1
    assert server.default_max_batch(CONFIG, "fp32", 512, available=int(3 * per_slot / server.MEMORY_SHARE)) == 1


def test_the_server_survives_a_burst_of_bad_requests(url, client):
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: httpx.post(f"{url}/v1/completions", content=BAD[i % len(BAD)][0]).status_code,
                              range(24)))
    assert set(codes) == {400}
    assert client.completions.create(model="micro", prompt="ok", max_tokens=4).usage.completion_tokens == 4


def _hold(batcher, count):
    """Submits `count` long requests, waiting for room whenever the queue is full."""
    held = []
    while len(held) < count:
        try:
            held.append(batcher.submit(batching.Request([65] * 8, 480, lambda event: None)))
        except batching.QueueFull:
            time.sleep(0.005)
    return held


def test_a_full_queue_gets_429(url, service):
    held = _hold(service.batcher, MAX_BATCH + MAX_QUEUE)  # every slot busy, the queue full
    try:
        response = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert response.status_code == 429 and response.json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        for request in held:
            request.cancel()
    assert batching.wait_idle(service.batcher, 30)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(url, service, monkeypatch):
    slots = service.batcher.slots
    decode = slots.decode

    def slow_decode(*args, **kwargs):  # 480 steps take seconds however fast the machine decodes
        time.sleep(0.02)
        return decode(*args, **kwargs)

    monkeypatch.setattr(slots, "decode", slow_decode)
    cancelled = service.batcher.finished["cancelled"]
    body = {"prompt": "a long story", "max_tokens": 480, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        next(line for line in response.iter_lines() if line.startswith("data: {"))
        assert service.batcher.busy() == 1
    assert batching.wait_idle(service.batcher, 30), "the slot stays busy after the client went away"
    finished = dict(service.batcher.finished)
    assert finished.get("cancelled", 0) == cancelled + 1, f"dropped, not run to max_tokens: {finished}"


def test_a_failed_engine_step_fails_its_request_not_the_server(url, service, monkeypatch):
    decode = service.batcher.slots.decode

    def broken(*args, **kwargs):
        raise ValueError("token id 300 is not in the vocabulary")

    monkeypatch.setattr(service.batcher.slots, "decode", broken)
    response = httpx.post(f"{url}/v1/completions", json={"prompt": "ab", "max_tokens": 4}, timeout=60)
    error = response.json()["error"]
    assert response.status_code == 500 and error["code"] == "engine_error" and "token id 300" in error["message"]
    with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "ab", "max_tokens": 4, "stream": True},
                      timeout=60) as streamed:
        lines = [line for line in streamed.iter_lines() if line.startswith("data: ")]
    assert "engine_error" in lines[-2] and lines[-1] == "data: [DONE]"
    monkeypatch.setattr(service.batcher.slots, "decode", decode)
    assert service.batcher.alive()
    after = httpx.post(f"{url}/v1/completions", json={"prompt": "ab", "max_tokens": 4, "temperature": 0}, timeout=60)
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 4


def test_nothing_compiles_after_warm_up(service, client):
    client.completions.create(model="micro", prompt="y" * 40, max_tokens=3)  # a chunked prefill
    slots = service.batcher.slots
    assert dict(slots.traces) == {"prefill": len(slots.prefill_shapes()), "decode": len(slots.decode_rows())}


def test_cli_mistakes_exit_2_with_one_line(checkpoint, tmp_path, capsys):
    assert server.main(["--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert server.main(["--checkpoint", str(checkpoint), "--max-seq-len", "600"]) == 2
    assert "max_seq_len must be in [2, 512]" in capsys.readouterr().err
    for argv, fragment in ((["--precision", "fp7"], "argument --precision"), (["--max-batch", "0"], "--max-batch")):
        with pytest.raises(SystemExit) as exit_info:
            server.main(["--checkpoint", str(checkpoint), *argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and fragment in err and len(err.strip().splitlines()) == 1


class _Errors(logging.Handler):
    """Keeps the records uvicorn logs at ERROR or above."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_sigterm_drains_a_stream_in_flight_with_a_final_chunk_and_done(running, service):
    """Last in this file: it stops the module's server, as SIGTERM does (`Server.handle_exit`).
    The stream outlives the grace: the engine ends it ("length", [DONE]) before uvicorn's
    deadline, so nothing is cut and nothing is logged as an error."""
    uv, url = running
    uv.grace = 0.2
    errors = _Errors()
    logging.getLogger("uvicorn.error").addHandler(errors)
    body = {"prompt": "a long story", "max_tokens": 480, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: {"))
            uv.handle_exit(signal.SIGTERM, None)
            rest = [line for line in lines if line]
    finally:
        logging.getLogger("uvicorn.error").removeHandler(errors)
    chunks = [json.loads(line[len("data: "):]) for line in [first] + rest[:-1]]
    assert rest[-1] == "data: [DONE]" and chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] < 480  # ended by the drain, not by max_tokens
    assert service.batcher.finished["shutdown"] == 1 and not errors.records
    deadline = time.monotonic() + 30
    while service.batcher.alive() and time.monotonic() < deadline:  # the lifespan stops the engine
        time.sleep(0.05)
    assert not service.batcher.alive()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=5)


@pytest.mark.slow
def test_the_command_prints_its_url_and_sigterm_ends_a_stream_properly(checkpoint):
    cmd = [sys.executable, "-m", "serve.server", "--checkpoint", str(checkpoint), "--precision", "fp32", "--port", "0",
           "--max-batch", "2", "--prefill-chunk", "8", "--prefill-rows", "1", "--grace", "0.5"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving on http://127.0.0.1:"), line + proc.stderr.read()
        body = {"prompt": "a long story", "max_tokens": 480, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{line.split()[-1]}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][len("data: "):])["choices"][0]["finish_reason"]
        # uvicorn re-raises the signal once it has shut down: a terminated process's status
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "ERROR" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_deepseek_v3_decodes_over_its_latent_cache_as_transformers_does():
    # MLA serves from a latent KV cache in the absorbed form; the greedy reply through the
    # server to fixed prompt ids is transformers' greedy continuation (expanded form).
    import numpy as np
    directory = ROOT / "tests" / "fixtures" / "hf" / "deepseek_v3"
    reference = np.load(directory / "reference.npz")
    service = server.build(server.parse_args(["--checkpoint", str(directory), "--precision", "fp32", "--kv-cache",
                                              "fp32", "--max-batch", "2", "--prefill-chunk", "8"]))
    assert set(service.batcher.slots.cache[0]) == {"latent", "k_rope"}
    with _serving(service) as (_, url):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        for ids, greedy in zip(reference["tokens"].tolist(), reference["greedy"].tolist()):
            reply = client.completions.create(model=service.model_name, prompt=ids, max_tokens=len(greedy),
                                              temperature=0)
            assert reply.choices[0].text == service.tokenizer.decode(greedy)
