"""Tests for serve.server's scoring API: logprobs, echo, max_tokens 0, batched and
token-id prompts, the tokenizer endpoints (what lm-evaluation-harness's
`local-completions` sends), checked against serve.evaluate's per-token losses.

One in-process server on a free loopback port serves a randomly initialised micro
checkpoint (weights x3, so that the distribution is far from uniform), fp32, with
8-token prefill chunks so that prompts span several chunks.
"""

import itertools
import json

import httpx
import numpy as np
import openai
import pytest

from models.config import ModelConfig
from serve import evaluate
from serve import quantize as q
from serve import server
from tests.test_server import _serving, micro_checkpoint

CONFIG = ModelConfig(n_layers=1, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=128)
TOL = 1e-4  # float32: chunked prefill through the cache vs one forward over the window


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return micro_checkpoint(tmp_path_factory.mktemp("runs"), "scorer", CONFIG, seed=1)


@pytest.fixture(scope="module")
def service(checkpoint):
    args = server.parse_args(["--checkpoint", str(checkpoint), "--precision", "fp32", "--kv-cache", "fp32",
                              "--max-batch", "4", "--prefill-chunk", "8"])
    return server.build(args)


@pytest.fixture(scope="module")
def url(service):
    with _serving(service) as (_, address):
        yield address


@pytest.fixture(scope="module")
def reference(checkpoint):
    """Tokens -> each token's log-probability as serve.evaluate scores text (fp32)."""
    model, variables = q.prepare(q.load_run(str(checkpoint)), q.ServeSpec("fp32"))
    return lambda ids: evaluate.token_logprobs(model, variables, np.asarray([ids]))[0]


def _post(url, **body):
    response = httpx.post(f"{url}/v1/completions", json={"temperature": 0, **body}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


PROMPT = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 32, 84, 104, 105, 115, 32, 105]  # 20 ids


def test_echoed_prompt_logprobs_are_the_evaluation_losses(url, reference):
    body = _post(url, prompt=PROMPT, echo=True, logprobs=1, max_tokens=1)  # what lm-eval sends
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(PROMPT) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    served = np.asarray(lp["token_logprobs"][1:len(PROMPT)])
    expected = reference(PROMPT)
    np.testing.assert_allclose(served, expected, atol=TOL, rtol=0)
    assert np.ptp(expected) > 1.0  # the tokens differ in likelihood: an offset by one position would show
    # lm-eval's reading: a continuation's log-likelihood is the sum from the context's end
    ctxlen = 12
    assert abs(sum(lp["token_logprobs"][ctxlen:-1]) - expected[ctxlen - 1:].sum()) < TOL * len(PROMPT)
    assert body["choices"][0]["text"].startswith("Hello, world! This i")
    assert body["usage"] == {"prompt_tokens": 20, "completion_tokens": 1, "total_tokens": 21}


def test_max_tokens_0_scores_the_prompt_only(url, reference):
    body = _post(url, prompt=PROMPT, echo=True, logprobs=0, max_tokens=0)
    choice = body["choices"][0]
    assert choice["text"] == "Hello, world! This i" and choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["tokens"]) == len(PROMPT)
    np.testing.assert_allclose(choice["logprobs"]["token_logprobs"][1:], reference(PROMPT), atol=TOL, rtol=0)
    assert body["usage"]["completion_tokens"] == 0


def test_top_logprobs_are_the_most_likely_tokens(url, reference):
    body = _post(url, prompt="Hello", logprobs=5, max_tokens=6)
    lp = body["choices"][0]["logprobs"]
    raw = b"".join(map(_token_bytes, lp["tokens"]))
    assert len(raw) == 6 and raw.decode("utf-8", "replace") == body["choices"][0]["text"]
    for token, chosen, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        values = list(top.values())
        assert len(top) == 5 and values == sorted(values, reverse=True)
        assert top[token] == chosen == max(values)  # greedy: the chosen token is the most likely one
        assert 0.5 < sum(np.exp(values)) <= 1 + 1e-5
    np.testing.assert_allclose(lp["token_logprobs"], reference(list(b"Hello" + raw))[4:], atol=TOL, rtol=0)
    assert lp["text_offset"] == list(itertools.accumulate((len(t) for t in lp["tokens"][:-1]), initial=0))


def _token_bytes(token: str) -> bytes:
    """A token's bytes from OpenAI's text form ("bytes:\\xe2" for part of a character)."""
    if token.startswith("bytes:"):
        return bytes(int(h, 16) for h in token[6:].split("\\x")[1:])
    return token.encode()


def test_a_batch_of_prompts_gets_one_choice_each_in_order(url):
    prompts = [PROMPT[:5], PROMPT[:9], PROMPT[:17]]  # three lengths: one, two and three prefill chunks
    body = _post(url, prompt=prompts, echo=True, logprobs=1, max_tokens=2)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    alone = [_post(url, prompt=p, echo=True, logprobs=1, max_tokens=2)["choices"][0] for p in prompts]
    for choice, single, prompt in zip(body["choices"], alone, prompts):
        assert len(choice["logprobs"]["tokens"]) == len(prompt) + 2 and choice["text"] == single["text"]
        np.testing.assert_allclose(choice["logprobs"]["token_logprobs"][1:], single["logprobs"]["token_logprobs"][1:],
                                   atol=TOL, rtol=0)
    assert body["usage"]["prompt_tokens"] == 5 + 9 + 17
    texts = _post(url, prompt=["ab", "cd"], max_tokens=2)["choices"]
    assert [c["index"] for c in texts] == [0, 1] and all(c["logprobs"] is None for c in texts)


def test_a_streamed_batch_carries_each_choices_logprobs(url):
    body = {"prompt": [PROMPT[:6], PROMPT[:10]], "echo": True, "logprobs": 1, "max_tokens": 3, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    tokens, ends, usage = {0: [], 1: []}, {}, None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    for chunk in map(json.loads, lines[:-1]):
        if not chunk["choices"]:
            usage = chunk["usage"]
            continue
        (choice,) = chunk["choices"]
        if choice["logprobs"]:
            tokens[choice["index"]] += choice["logprobs"]["token_logprobs"]
        if choice["finish_reason"]:
            ends[choice["index"]] = choice["finish_reason"]
    whole = _post(url, prompt=[PROMPT[:6], PROMPT[:10]], echo=True, logprobs=1, max_tokens=3)["choices"]
    for index in (0, 1):
        other = whole[index]["logprobs"]["token_logprobs"]
        assert len(tokens[index]) == len(other) and tokens[index][0] is None is other[0]
        np.testing.assert_allclose(tokens[index][1:], other[1:], atol=TOL, rtol=0)  # decode rows: other roundings
    assert ends == {0: "length", 1: "length"} and usage["completion_tokens"] == 6


def test_the_official_client_reads_completion_and_chat_logprobs(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    completion = client.completions.create(model="scorer", prompt="Hi", max_tokens=3, temperature=0, logprobs=2)
    assert len(completion.choices[0].logprobs.tokens) == 3
    chat = client.chat.completions.create(model="scorer", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    joined = b"".join(bytes(t.bytes) for t in content)
    assert len(content) == 3 and joined.decode("utf-8", "replace") == chat.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == t.logprob for t in content)
    assert all(_token_bytes(t.token) == bytes(t.bytes) for t in content)


def test_the_tokenizer_endpoints_tokenize_as_the_server_does(url, service):
    info = httpx.get(f"{url}/tokenizer_info").json()
    assert info["vocab_size"] == 256 and info["model_max_length"] == 128 and "eos_token" in info
    tokens = httpx.post(f"{url}/tokenize", json={"prompt": "héllo", "add_special_tokens": False}).json()
    assert tokens["tokens"] == list("héllo".encode()) and tokens["count"] == 6
    text = httpx.post(f"{url}/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert text == {"prompt": "héllo"}


@pytest.mark.parametrize("body, param, fragment", [
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "0 only with echo"),
    ({"prompt": "x", "logprobs": 6}, "logprobs", "must be in [0, 5]; got 6"),
    ({"prompt": [1, 2, 300]}, "prompt", "must be in [0, 256)"),
    ({"prompt": [1, -2]}, "prompt", "list of token ids"),
    ({"prompt": [[1], "a"]}, "prompt", "list of such lists"),
    ({"prompt": "x", "echo": 1}, "echo", "must be a boolean"),
])
def test_bad_scoring_requests_get_400_naming_the_field(url, body, param, fragment):
    response = httpx.post(f"{url}/v1/completions", json=body)
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == param and fragment in error["message"], error


def test_bad_chat_logprobs_and_tokenize_bodies_get_400(url):
    chat = {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}
    response = httpx.post(f"{url}/v1/chat/completions", json=chat)
    assert response.status_code == 400 and "needs 'logprobs': true" in response.json()["error"]["message"]
    for path, body in (("/tokenize", {"prompt": 3}), ("/detokenize", {"tokens": ["a"]})):
        response = httpx.post(f"{url}{path}", json=body)
        assert response.status_code == 400, (path, response.text)
