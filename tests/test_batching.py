"""Tests for continuous batching: per-row sampling, the slot KV cache and the engine loop.

The model is a randomly initialised micro transformer with its weights scaled up (x3), so
that greedy continuations depend on every earlier token: a token written at a wrong
position or into a wrong slot changes the output.
"""

import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mpx
from models import transformer
from models.config import ModelConfig
from serve import batching
from serve import engine as engine_lib
from serve import evaluate
from serve import slots as slots_lib
from store import data as data_lib

CONFIG = ModelConfig(n_layers=1, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64)
PROMPTS = [b"hello world", b"The quick brown fox jumps over the lazy dog, twice over.", b"abc", b"x",
           b"ROMEO: what light", b"0123456789"]
CHUNK = 16  # the second prompt (56 tokens) is prefilled in 4 chunks


@pytest.fixture(scope="module")
def model_and_variables():
    model = transformer.Transformer(CONFIG, mpx.policy.preset("fp32"))
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    return model, jax.tree.map(lambda x: 3 * x, variables)


@pytest.fixture(scope="module")
def slots(model_and_variables):
    model, variables = model_and_variables
    slots = slots_lib.SlotModel(model, variables, max_batch=4, kv_cache="fp32", prefill_chunk=CHUNK,
                                prefill_rows=2, steps=2)
    slots.warm_up()
    return slots


@pytest.fixture(scope="module")
def reference(model_and_variables):
    """Greedy tokens of each prompt from serve.engine (a padded batch, no slots)."""
    engine = engine_lib.Engine(*model_and_variables, kv_cache="fp32")
    return [out.tokens for out in engine.generate([list(p) for p in PROMPTS], max_new_tokens=12)[0]]


class _Collect:
    """Gathers one request's events (they arrive on the engine thread)."""

    def __init__(self):
        self.deltas, self.end, self.done = [], None, threading.Event()

    def __call__(self, event):
        if isinstance(event, batching.Finished):
            self.end = event
            self.done.set()
        else:
            self.deltas.append(event)

    @property
    def ids(self):
        return [i for d in self.deltas if isinstance(d, batching.TextDelta) for i in d.ids]

    @property
    def text(self):
        return "".join(d.text for d in self.deltas if isinstance(d, batching.TextDelta))


def _run(batcher, prompts, **kwargs):
    outs = [_Collect() for _ in prompts]
    for prompt, out in zip(prompts, outs):
        batcher.submit(batching.Request(list(prompt), on_event=out, **{"max_tokens": 12, **kwargs}))
    assert all(out.done.wait(60) for out in outs)
    return outs


@pytest.fixture
def batcher(slots):
    batcher = batching.Batcher(slots, data_lib.ByteTokenizer(), max_queue=8)
    batcher.start()
    yield batcher
    batcher.stop()


# --------------------------------------------------------------------------- sampling

sample_rows = jax.jit(slots_lib.sample_rows)


def _params(rows, **fields):
    params = slots_lib.RowParams.fill(rows)
    for name, values in fields.items():
        getattr(params, name)[:] = values
    return params


def test_rows_sample_under_their_own_parameters_in_one_call():
    logits = jnp.tile(jnp.log(jnp.array([[0.05, 0.4, 0.1, 0.3, 0.15]])), (4, 1))
    params = _params(4, temperature=[0.0, 1.0, 1.0, 1.0], top_k=[0, 1, 0, 0], top_p=[1.0, 1.0, 0.01, 1.0])
    draws = np.stack([np.asarray(sample_rows(logits, _params(4, **{
        **{k: getattr(params, k) for k in ("temperature", "top_k", "top_p")}, "seed": s}))) for s in range(200)])
    assert (draws[:, :3] == 1).all()  # greedy, top-k 1 and a tiny top-p all take the argmax
    assert set(np.unique(draws[:, 3])) == {0, 1, 2, 3, 4}  # full sampling reaches every token


def test_top_k_and_top_p_restrict_the_support_and_seeds_repeat():
    logits = jnp.tile(jnp.log(jnp.array([[0.05, 0.4, 0.1, 0.3, 0.15]])), (2, 1))
    support = {0: set(), 1: set()}
    for seed in range(300):
        out = np.asarray(sample_rows(logits, _params(2, temperature=1.0, top_k=[2, 0], top_p=[1.0, 0.75],
                                                               seed=seed)))
        support[0].add(int(out[0]))
        support[1].add(int(out[1]))
    assert support == {0: {1, 3}, 1: {1, 3, 4}}  # top-2; mass before token 4 is 0.7 < 0.75
    again = _params(2, temperature=1.0, seed=[7, 7], counter=[3, 3])
    a, b = sample_rows(logits, again), sample_rows(logits, again)
    assert int(a[0]) == int(a[1]) and np.array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------- engine loop


def test_batched_requests_get_the_tokens_each_gets_alone(slots, batcher, reference):
    traces = dict(slots.traces)
    outs = _run(batcher, PROMPTS, temperature=0.0)  # 6 requests, 4 slots: two join mid-way
    for prompt, out, want in zip(PROMPTS, outs, reference):
        assert out.ids == want
        assert out.end == batching.Finished("length", len(prompt), min(12, CONFIG.max_seq_len - len(prompt)))
    assert batcher.steps_run["prefill_chunks"] == sum(-(-len(p) // CHUNK) for p in PROMPTS)  # chunked prefill
    assert batcher.steps_run["prefill"] < batcher.steps_run["prefill_chunks"]  # several requests per call
    assert dict(slots.traces) == traces == {"prefill": len(slots.prefill_shapes()), "decode": len(slots.decode_rows())}


def test_sampled_requests_repeat_under_a_seed_whatever_runs_beside_them(batcher):
    alone = _run(batcher, PROMPTS[:1], temperature=1.0, top_k=20, seed=5)[0].ids
    crowd = _run(batcher, PROMPTS[:3], temperature=1.0, top_k=20, seed=5)[0].ids
    other = _run(batcher, PROMPTS[:1], temperature=1.0, top_k=20, seed=6)[0].ids
    assert alone == crowd and alone != other


def test_a_stop_string_ends_the_text_before_it(batcher):
    full = _run(batcher, PROMPTS[:1], temperature=0.0)[0].text
    start = next(i for i in range(3, len(full) - 1) if "\ufffd" not in full[i:i + 2])
    stop = full[start:start + 2]  # two characters of the greedy reply
    out = _run(batcher, PROMPTS[:1], temperature=0.0, stop=["never there", stop])[0]
    assert out.end.reason == "stop" and out.text == full[:full.find(stop)]


def test_the_context_bounds_max_tokens(batcher, slots):
    prompt = bytes(range(65, 65 + slots.max_seq_len - 3))
    out = _run(batcher, [prompt], max_tokens=50)[0]
    assert out.end == batching.Finished("length", len(prompt), 3)


def test_a_cancelled_request_frees_its_slot(batcher):
    out = _Collect()
    request = batcher.submit(batching.Request(list(b"long one"), max_tokens=50, on_event=out))
    while not out.deltas:
        threading.Event().wait(0.01)
    request.cancel()
    assert out.done.wait(10) and out.end.reason == "cancelled" and len(out.ids) < 50
    assert batching.wait_idle(batcher, 5)


def test_logprobs_come_with_every_token_and_the_prompt(batcher, slots, model_and_variables, reference):
    prompt = PROMPTS[1]  # 56 tokens: 4 prefill chunks; decode runs 2 steps per call
    out = _run(batcher, [prompt], logprobs=3, prompt_logprobs=True)[0]
    (scored,) = [d for d in out.deltas if isinstance(d, batching.PromptLogprobs)]
    assert out.deltas[0] is scored and scored.entries[0] is None and len(scored.entries) == len(prompt)
    assert [e.id for e in scored.entries[1:]] == list(prompt[1:])
    expected = evaluate.token_logprobs(*model_and_variables, np.asarray([list(prompt)]))[0]
    np.testing.assert_allclose([e.logprob for e in scored.entries[1:]], expected, atol=1e-4, rtol=0)
    tokens = [t for d in out.deltas if isinstance(d, batching.TextDelta) for t in d.logprobs]
    assert [t.id for t in tokens] == out.ids == reference[1]
    for token in tokens:  # greedy: each token is its position's most likely one
        assert len(token.top) == 3 and token.top[0] == (token.id, token.logprob)
    scoring = _run(batcher, [prompt], max_tokens=0, logprobs=0, prompt_logprobs=True)[0]
    assert scoring.end == batching.Finished("length", len(prompt), 0) and scoring.ids == []


def test_the_end_of_sequence_token_that_ends_a_request_is_scored(slots, reference):
    batcher = batching.Batcher(slots, data_lib.ByteTokenizer(), stop_ids=[reference[1][0]])
    batcher.start()
    try:  # lm-eval reads the prompt's scores up to the last token but one: one new token must follow
        out = _run(batcher, [PROMPTS[1]], max_tokens=1, logprobs=0, prompt_logprobs=True)[0]
    finally:
        batcher.stop()
    assert out.end.reason == "stop" and out.ids == []
    assert [t.id for d in out.deltas if isinstance(d, batching.TextDelta) for t in d.logprobs] == [reference[1][0]]


def test_prompt_logprobs_follow_the_logit_scale(model_and_variables):
    model, variables = model_and_variables
    slots = slots_lib.SlotModel(model, variables, max_batch=1, max_seq_len=32, kv_cache="fp32", min_span=16,
                                prefill_rows=1, logit_scale=0.5)
    prompt = list(PROMPTS[0])
    step = slots.prefill([0], [prompt], [0], slots_lib.RowParams.fill(1), [prompt[1:] + [slots_lib.SAMPLED]])
    logits = model.apply(variables, jnp.asarray([prompt]), jnp.arange(len(prompt))[None])[0][0]
    expected = jnp.take_along_axis(jax.nn.log_softmax(0.5 * logits[:-1]), jnp.asarray(prompt[1:])[:, None], 1)[:, 0]
    np.testing.assert_allclose(step.logprobs.chosen[0, :len(prompt) - 1], expected, atol=1e-5, rtol=0)


def test_a_cache_a_failed_call_consumed_is_replaced(model_and_variables):
    slots = slots_lib.SlotModel(*model_and_variables, max_batch=1, max_seq_len=32, kv_cache="fp32", min_span=16,
                                prefill_rows=1)
    first = slots.prefill([0], [[1, 2, 3]], [0], slots_lib.RowParams.fill(1)).tokens
    jax.tree.map(lambda x: x.delete(), slots.cache)  # what a donated call that raised leaves
    slots.recover()
    np.testing.assert_array_equal(slots.prefill([0], [[1, 2, 3]], [0], slots_lib.RowParams.fill(1)).tokens, first)


def test_a_full_queue_refuses_and_bad_requests_are_value_errors(slots):
    batcher = batching.Batcher(slots, data_lib.ByteTokenizer(), max_queue=1)  # not started: nothing leaves
    for _ in range(slots.max_batch + 1):  # as many as there are free slots, and one more
        batcher.submit(batching.Request([1, 2], 4, on_event=lambda e: None))
    with pytest.raises(batching.QueueFull, match="1 requests are waiting"):
        batcher.submit(batching.Request([1, 2], 4, on_event=lambda e: None))
    with pytest.raises(ValueError, match="context is 64"):
        batcher.check([1] * 64, 4)
    with pytest.raises(ValueError, match="max_tokens must be >= 1; got 0"):
        batcher.check([1], 0)
    with pytest.raises(ValueError, match="empty"):
        batcher.check([], 4)
    batcher.check([1], 0, scoring=True)  # scoring the prompt needs no new token
    for fields, match in ((dict(logprobs=6), r"logprobs must be in \[0, 5\]"),
                          (dict(prompt_logprobs=True), "needs logprobs")):
        with pytest.raises(ValueError, match=match):
            batching.Batcher(slots, data_lib.ByteTokenizer()).submit(
                batching.Request([1, 2], 4, on_event=lambda e: None, **fields))


def _fingerprint(logits, params):
    """A "sampler" whose token is a checksum of every logit's bits: a difference in the
    last bit of any logit changes the token, and so every later step."""
    return jnp.sum(jax.lax.bitcast_convert_type(logits, jnp.int32), axis=-1) % logits.shape[-1]


def test_a_request_gets_the_same_bits_whatever_max_batch_and_max_seq_len(model_and_variables):
    """Decode runs the slots that hold requests and attends over the positions they fill,
    so --max-batch and --max-seq-len (here 1 x 48 and 6 x 4096) change no bit; steps
    compile per (rows, span) bucket, never per token."""
    model, variables = model_and_variables
    big = model.clone(config=dataclasses.replace(CONFIG, max_seq_len=4096))
    outs = []
    for max_batch, max_seq_len in ((1, 48), (6, 4096)):
        slots = slots_lib.SlotModel(big, variables, max_batch=max_batch, max_seq_len=max_seq_len, kv_cache="fp32",
                                    prefill_chunk=8, prefill_rows=1, min_span=16, sample=_fingerprint)
        batcher = batching.Batcher(slots, data_lib.ByteTokenizer())
        batcher.start()
        try:
            outs.append(_run(batcher, [PROMPTS[0]], max_tokens=24)[0].ids)
        finally:
            batcher.stop()
        assert dict(slots.traces) == {"prefill": 1, "decode": 3}  # both chunks at span 16; decode at 16, 32, 64
    assert outs[0] == outs[1] and len(set(outs[0])) > 10


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_batch=0), "max_batch"), (dict(prefill_chunk=12), "power of two"),
    (dict(max_seq_len=65), r"\[2, 64\]"), (dict(steps=0), "steps"), (dict(kv_cache="int4"), "int4"),
    (dict(max_batch=2, prefill_rows=3), "prefill_rows")])
def test_slot_model_rejects_bad_sizes(model_and_variables, kwargs, match):
    with pytest.raises(ValueError, match=match):
        slots_lib.SlotModel(*model_and_variables, **kwargs)
