"""Tests for serving: FP8 weights in memory, fidelity, the KV cache, the engine, the CLIs.

One micro model is trained for a few steps (module fixture) and served in every test.
"""

import dataclasses
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import jax.numpy as jnp
import pytest

import mpx
from models import transformer
from models.config import preset
from serve import calibration
from serve import engine as engine_lib
from serve import evaluate
from serve import generate
from serve import kv_cache
from serve import quantize as q
from serve import sampling
from train import config as config_lib
from train import loop

ROOT = Path(__file__).resolve().parents[1]
MICRO = ["model.n_layers=1", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=128",
         "model.max_seq_len=64", "data.seq_len=32", "data.batch_size=8", "eval_batches=1", "precision=fp32"]
E4M3 = mpx.formats.get("e4m3")
BF16 = mpx.formats.get("bf16")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("micro")
    cfg = config_lib.load(ROOT / "configs" / "tiny.yaml",
                          MICRO + [f"run_dir={run_dir}", "steps=60", "eval_every=0", "checkpoint.every=0"])
    loop.train(cfg, quiet=True)
    return q.load_run(cfg.checkpoint_dir)


@pytest.fixture(scope="module")
def fp32(ckpt):
    return q.prepare(ckpt, q.ServeSpec("fp32"))


def _tokens(ckpt, rows=2, length=32):
    stream, _ = calibration.token_stream(ckpt, rows, length)
    return jnp.asarray(stream.eval_batch(0).inputs)


# --------------------------------------------------------------------------- weights


def test_fp8_weights_are_fp8_in_memory_and_at_most_27_percent_of_fp32():
    config = preset("tiny")  # shapes and dtypes only: the bytes do not depend on the values
    params = jax.eval_shape(transformer.Transformer(config).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    params = params["params"]
    served = jax.eval_shape(lambda p: q.quantize_params(p, config, q.ServeSpec("fp8")), params)
    kernels = [x for x in jax.tree_util.tree_leaves(served, is_leaf=lambda x: isinstance(x, mpx.ScaledArray))
               if isinstance(x, mpx.ScaledArray)]
    assert len(kernels) == 7 * config.n_layers  # q, k, v, o, gate, up, down
    assert all(k.data.dtype == jnp.float8_e4m3fn and k.scale.dtype == jnp.float32 for k in kernels)
    assert served["embed"]["embedding"].dtype == jnp.bfloat16  # and so the tied LM head
    fp32_bytes = q.weight_bytes(params)
    assert q.weight_bytes(served) <= 0.27 * fp32_bytes
    bf16 = jax.eval_shape(lambda p: q.quantize_params(p, config, q.ServeSpec("bf16")), params)
    assert q.weight_bytes(bf16) == fp32_bytes // 2
    report = q.memory_report(served)
    assert report["fp8"] == sum(k.data.size for k in kernels) and report["total"] == q.weight_bytes(served)


@pytest.mark.parametrize("spec", [q.ServeSpec("fp8"), q.ServeSpec("fp8", weights="channel", activations="static",
                                                                 calibration="kl"),
                                  q.ServeSpec("fp8", activations="none")], ids=lambda s: s.label)
def test_fp8_serving_logits_are_close_to_fp32(ckpt, fp32, spec):
    tokens = _tokens(ckpt)
    ref = fp32[0].apply(fp32[1], tokens)[0]
    model, variables = q.prepare(ckpt, spec, calibration_count=2)
    got = jax.jit(model.apply)(variables, tokens)[0]
    # Each FP8 operand carries at most half an E4M3 ulp of relative error.
    assert float(mpx.metrics.relative_error(got, ref)) < E4M3.half_ulp
    assert float(mpx.metrics.top1_agreement(got, ref)) > 1 - E4M3.half_ulp


def test_checkpoint_of_another_model_is_rejected(ckpt):
    with pytest.raises(q.ServeError, match="another model: d_model=64 .expected 128."):
        q.load_run(ckpt.path, expect_model=preset("tiny"))
    bad = dict(ckpt.params, extra={"kernel": jnp.zeros((2, 2))})
    with pytest.raises(q.ServeError, match="not in the model"):
        q.check_params(ckpt.config, bad)


# --------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("kind, bound", [("bf16", BF16.eps), ("fp8", E4M3.half_ulp)])
def test_kv_cache_decode_equals_the_no_cache_forward(ckpt, fp32, kind, bound):
    model, variables = fp32
    tokens = _tokens(ckpt, rows=2, length=24)
    full = model.apply(variables, tokens)[0]
    cache = kv_cache.init(ckpt.config, 2, kind)
    prefill = 16
    positions = jnp.broadcast_to(jnp.arange(24), (2, 24))
    apply = jax.jit(model.apply)
    logits, aux = apply(variables, tokens[:, :prefill], positions[:, :prefill], cache)
    steps = [logits]
    for t in range(prefill, 24):  # one token at a time, through the cache
        logits, aux = apply(variables, tokens[:, t:t + 1], positions[:, t:t + 1], aux["cache"])
        steps.append(logits)
    cached = jnp.concatenate(steps, axis=1)
    # Keys and values rounded once to the cache format: at most that format's relative error.
    assert float(mpx.metrics.relative_error(cached, full)) < bound
    if kind == "fp8":
        slot = aux["cache"][0]["k"]
        # E4M3 values held as their bit patterns (see serve/kv_cache.py)
        assert slot.data.dtype == jnp.uint8 and slot.fmt.dtype == jnp.float8_e4m3fn
        assert slot.scale.shape == (2, 64, 2, 1)
        slots = 2 * ckpt.config.max_seq_len
        assert kv_cache.nbytes(aux["cache"]) == kv_cache.bytes_per_token(ckpt.config, "fp8") * slots
        assert kv_cache.bytes_per_token(ckpt.config, "fp8") < kv_cache.bytes_per_token(ckpt.config, "bf16")


# --------------------------------------------------------------------------- engine


@pytest.fixture(scope="module")
def engine(fp32):
    return engine_lib.Engine(*fp32, chunk=4)


def test_decoding_never_recompiles_per_token(engine):
    engine.traces.clear()
    engine.generate([[5, 6, 7]], max_new_tokens=21)  # 1 prefill token + 5 decode calls over spans 8, 16, 32
    assert dict(engine.traces) == {"prefill": 1, "decode": 3}
    engine.generate([[1, 2, 3, 4, 5, 6]], max_new_tokens=13)  # same buckets: nothing new
    assert dict(engine.traces) == {"prefill": 1, "decode": 3}
    engine.generate([[5, 6, 7]], max_new_tokens=60)  # the whole context: one more span (64), at most log2(64 / 8) + 1
    assert dict(engine.traces) == {"prefill": 1, "decode": 4}


@dataclasses.dataclass(frozen=True)
class _Fingerprint:
    """A "sampler" whose token is a checksum of every logit's bits: a difference in the
    last bit of any logit changes the token, and so every later step."""

    def __call__(self, logits, key):
        return (jnp.sum(jax.lax.bitcast_convert_type(logits, jnp.int32), axis=-1) % logits.shape[-1]).astype(jnp.int32)


@pytest.mark.parametrize("kind", ["bf16", "fp8"])
def test_generation_is_bit_identical_whatever_the_cache_capacity(fp32, kind):
    """A decode call attends over the filled part of the cache only, so a 4096-slot cache
    gives the bits of a 64-slot one (attending over all 4096 slots changes the f32 sums)."""
    model, variables = fp32
    prompts = [[5, 6, 7, 8, 9], [3, 1]]
    outputs = []
    for capacity in (64, 4096):
        big = model.clone(config=dataclasses.replace(model.config, max_seq_len=capacity))
        eng = engine_lib.Engine(big, variables, kv_cache=kind, chunk=16)
        outputs.append([o.tokens for o in eng.generate(prompts, max_new_tokens=40, sampler=_Fingerprint())[0]])
        assert dict(eng.traces) == {"prefill": 1, "decode": 2}  # spans 32 and 64 at either capacity
    assert outputs[0] == outputs[1] and len(set(outputs[0][0])) > 10


def test_decode_calls_run_chunk_steps_or_the_wanted_tokens_rounded_up(fp32):
    """Every call of one generate runs the same steps: the chunk, or (fewer tokens
    wanted) their count rounded up to a power of two, at least 16; warm_up compiles
    exactly what the real call then runs."""
    assert engine_lib.Engine(*fp32).chunk == 64
    engine = engine_lib.Engine(*fp32, chunk=32)  # the test model's context is 64 tokens
    cases = {60: 32 * 2, 20: 32, 10: 16, 3: 16}  # max_new_tokens -> decode steps
    for wanted, steps in cases.items():
        engine.traces.clear()
        engine.warm_up([[5, 6, 7]], wanted)
        out, stats = engine.generate([[5, 6, 7]], max_new_tokens=wanted)
        assert len(out[0].tokens) == wanted and stats.decode_steps == steps
        assert engine.traces["decode"] <= 1  # compiled by warm_up at most, never by generate
    engine.traces.clear()
    for wanted in cases:
        engine.generate([[5, 6, 7]], max_new_tokens=wanted)
    assert not engine.traces  # every step count was compiled once


def test_cached_generation_equals_recomputing_the_whole_sequence(ckpt, engine):
    prompts = [_tokens(ckpt, 1, 12)[0].tolist()]
    cached, _ = engine.generate(prompts, max_new_tokens=10)
    recomputed, _ = engine.generate(prompts, max_new_tokens=10, use_cache=False)
    assert cached[0].tokens == recomputed[0].tokens and len(cached[0].tokens) == 10


def test_batched_prompts_of_different_lengths_equal_one_by_one(ckpt, engine):
    rows = _tokens(ckpt, 3, 20)
    prompts = [rows[0, :20].tolist(), rows[1, :5].tolist(), rows[2, :11].tolist()]
    batched, _ = engine.generate(prompts, max_new_tokens=9)
    for prompt, out in zip(prompts, batched):
        alone, _ = engine.generate([prompt], max_new_tokens=9)
        assert out.tokens == alone[0].tokens


def test_sampling_is_reproducible_under_a_seed(engine):
    draw = lambda seed: engine.generate([[3, 4, 5]], max_new_tokens=9, sampler=sampling.TopK(5), seed=seed)[0][0]
    assert draw(1).tokens == draw(1).tokens
    assert any(draw(1).tokens != draw(s).tokens for s in (2, 3, 4))


def test_max_tokens_and_context_limits(ckpt, engine):
    out, stats = engine.generate([[1, 2, 3]], max_new_tokens=6)
    assert len(out[0].tokens) == 6 and out[0].finish == "length" and stats.new_tokens == 6
    context = ckpt.config.max_seq_len
    out, _ = engine.generate([[1] * (context - 3)], max_new_tokens=10)
    assert len(out[0].tokens) == 3 and out[0].finish == "context"


@pytest.mark.parametrize("use_cache", [True, False])
def test_every_row_done_after_the_first_token(engine, use_cache):
    """max_new_tokens=1, or every row stopping on its first token, ends the run."""
    out, stats = engine.generate([[1, 2, 3], [4, 5]], max_new_tokens=1, use_cache=use_cache)
    assert [len(o.tokens) for o in out] == [1, 1] and stats.new_tokens == 2
    out, _ = engine.generate([[1, 2, 3]], max_new_tokens=8, use_cache=use_cache, should_stop=lambda row, t: True)
    assert out[0].finish == "stop" and len(out[0].tokens) == (1 if use_cache else engine.chunk)  # checked per chunk


def test_stop_strings_end_a_row_and_streaming_matches_the_text(ckpt, engine):
    tokenizer = q.load_tokenizer("bytes")
    prompt = tokenizer.decode(_tokens(ckpt, 1, 16)[0])
    texts, _, _ = engine_lib.generate_text(engine, tokenizer, [prompt], max_new_tokens=24)
    stop = texts[0][10:12]
    pieces = []
    texts_stopped, outs, _ = engine_lib.generate_text(engine, tokenizer, [prompt], max_new_tokens=24, stop=[stop],
                                                      stream=pieces.append)
    assert texts_stopped[0] == texts[0][:texts[0].index(stop)]
    assert outs[0].finish == "stop"
    assert "".join(pieces) == texts_stopped[0]


def test_bad_prompts_raise_clear_errors(ckpt, engine):
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.generate([[]], max_new_tokens=4)
    with pytest.raises(ValueError, match=f"context is {ckpt.config.max_seq_len} tokens"):
        engine.generate([[1] * ckpt.config.max_seq_len], max_new_tokens=4)


# --------------------------------------------------------------------------- CLIs


def _cli(capsys, *argv):
    try:
        code = generate.main(list(argv))
    except SystemExit as exit_:  # argparse rejected the command line
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("extra, message", [
    (["--prompt", ""], "prompt 0 is empty"),
    (["--prompt", "x" * 100], "context is 64 tokens"),
    (["--prompt", "hi", "--precision", "fp4"], "argument --precision: invalid choice: 'fp4'"),
    (["--prompt", "hi", "--kv-cache", "int8"], "argument --kv-cache: invalid choice: 'int8'"),
    (["--prompt", "hi", "--config", str(ROOT / "configs" / "tiny.yaml")], "another model"),
    (["--prompt", "hi", "--tokenizer", "/nonexistent/tokenizer.json"], "tokenizer"),
    (["--prompt", "hi", "--policy", "nosuch.yaml"], "--policy nosuch.yaml: no such file"),
    (["--prompt", "hi", "--policy", "nosuch.yaml", "--weights", "channel"], "--weights does not apply with --policy"),
])
def test_generate_cli_user_mistakes_exit_2_with_one_line(capsys, ckpt, extra, message):
    code, out, err = _cli(capsys, "--checkpoint", str(ckpt.path), *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_generate_cli_without_a_checkpoint_names_the_train_command(capsys, tmp_path):
    code, _, err = _cli(capsys, "--checkpoint", str(tmp_path / "none"), "--prompt", "hi")
    assert code == 2 and q.TRAIN_COMMAND in err and q.TRAIN_CHECKPOINTS in err


def test_generate_cli_streams_and_reports_speed_and_memory(capsys, ckpt):
    code, out, err = _cli(capsys, "--checkpoint", str(ckpt.path), "--prompt", "The ", "--max-tokens", "8",
                          "--precision", "fp8", "--kv-cache", "fp8")
    assert code == 0 and out.startswith("The ")
    assert "tok/s" in err and "weight memory" in err


def test_generate_cli_counts_the_reply_up_to_its_stop_not_the_rest_of_the_chunk(capsys, ckpt):
    argv = ["--checkpoint", str(ckpt.path), "--prompt", "The ", "--max-tokens", "24", "--precision", "fp32"]
    code, out, err = _cli(capsys, *argv)
    assert code == 0 and "24 new tokens" in err
    reply = out[len("The "):].rstrip("\n")
    stop = reply[2]  # bytes tokenizer: one token per character of this reply
    code, out, err = _cli(capsys, *argv, "--stop", stop)
    assert code == 0 and f"] {reply.index(stop) + 1} new tokens" in err, (reply, err)


def test_generate_cli_as_a_program_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "serve.generate", "--checkpoint", str(tmp_path), "--prompt", "x"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert q.TRAIN_COMMAND in result.stderr


def test_evaluate_writes_a_measured_report(ckpt, tmp_path):
    data = evaluate.held_out(ckpt, batches=1, prompts=2, prompt_len=8, new_tokens=8)
    variants = [evaluate.Variant(q.ServeSpec("fp32")), evaluate.Variant(q.ServeSpec("fp8"), kv_cache="fp8")]
    rows, extra = evaluate.evaluate(ckpt, variants, data, log=lambda s: None)
    assert rows[0]["ppl_change"] == 0.0 and rows[0]["kl"] < E4M3.half_ulp**2
    assert rows[1]["memory"] < 0.5 and abs(rows[1]["ppl_change"]) < E4M3.half_ulp
    report = evaluate.to_markdown(rows, extra, ckpt, data)
    assert "| fp8 (block w, token act) + fp8 KV |" in report and "logit temperature" in report
    evaluate.plot(rows, tmp_path / "report.png")
    assert (tmp_path / "report.png").stat().st_size > 0


# --------------------------------------------------------------------------- per-layer policies

POLICY = """name: mlp-block-q-tensor
base: bf16
rules:
  - match: mlp/*
    recipe: {name: deepseek_v3, scale_format: ue8m0}
  - match: attn/q_proj
    recipe: current
"""


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy") / "policy.yaml"
    path.write_text(POLICY)
    return str(path)


def test_a_policy_decides_per_layer_which_weights_are_fp8_and_how(ckpt, policy_file):
    spec = q.policy_spec(policy_file)
    params = q.quantize_params(ckpt.params, ckpt.config, spec)["layers_0"]
    fp8 = q.quantize_params(ckpt.params, ckpt.config, q.ServeSpec("fp8"))["layers_0"]
    pow2 = lambda w: bool(jnp.all(jnp.frexp(w.scale)[0] == 0.5))  # noqa: E731
    for name in ("gate", "up", "down"):  # DeepSeekV3 with ue8m0: 128x128 blocks, power-of-two scales
        w = params["mlp"][name]["kernel"]
        assert isinstance(w, mpx.ScaledArray) and w.fmt == E4M3 and w.block == fp8["mlp"][name]["kernel"].block
        assert pow2(w) and not pow2(fp8["mlp"][name]["kernel"])
    q_proj = params["attn"]["q_proj"]["kernel"]  # CurrentScaling: one float scale per tensor
    assert isinstance(q_proj, mpx.ScaledArray) and q_proj.block == q_proj.shape and q_proj.fmt == E4M3
    assert not pow2(q_proj)
    for name in ("k_proj", "v_proj", "o_proj"):  # no recipe: the compute dtype of bf16
        assert params["attn"][name]["kernel"].dtype == jnp.bfloat16
    model, variables = q.prepare(ckpt, spec)
    assert model.policy.name == "mlp-block-q-tensor"
    tokens = _tokens(ckpt, 1, 16)
    logits = model.apply(variables, tokens)[0]
    bf16_logits = q.prepare(ckpt, q.ServeSpec("bf16"))[0].apply(q.prepare(ckpt, q.ServeSpec("bf16"))[1], tokens)[0]
    assert jnp.isfinite(logits).all() and 0 < float(jnp.max(jnp.abs(logits - bf16_logits)))


def test_a_policy_that_needs_training_state_is_refused(ckpt, tmp_path):
    path = tmp_path / "delayed.yaml"
    path.write_text("base: bf16\nrules:\n  - match: mlp/*\n    recipe: delayed\n")
    with pytest.raises(q.ServeError, match="'delayed' at layers_0/mlp/.*deepseek_v3 or current"):
        q.quantize_params(ckpt.params, ckpt.config, q.policy_spec(str(path)))
    with pytest.raises(q.ServeError, match="--policy .*nosuch.yaml"):
        q.policy_spec(str(tmp_path / "nosuch.yaml"))


def test_evaluate_policy_variant_weighs_between_bf16_and_fp8(ckpt, policy_file):
    data = evaluate.held_out(ckpt, batches=1, prompts=1, prompt_len=8, new_tokens=4)
    from serve import evaluate_text
    variants = [v for _, v in evaluate_text.parse_variants("bf16,fp8,policy", policy_file)]
    rows, _ = evaluate.evaluate(ckpt, variants, data, log=lambda s: None)
    sizes = {row["label"]: row["bytes"] for row in rows}
    assert sizes["fp8 (block w, token act)"] < sizes["policy mlp-block-q-tensor"] < sizes["bf16"]
    with pytest.raises(q.ServeError, match="needs --policy"):
        evaluate_text.parse_variants("policy")


@pytest.mark.parametrize("fixture, spec", [("llama3", q.ServeSpec("fp8")), ("deepseek_v3_fp8", q.ServeSpec("fp8")),
                                           ("qwen2", q.ServeSpec("bf16"))])
def test_a_checkpoint_tensor_is_converted_once_on_its_way_to_serving(fixture, spec, monkeypatch):
    """A Hugging Face checkpoint's tensors are converted to their serving form as they load;
    `prepare` then leaves them alone, and the layers' forms are worked out once."""
    from serve import sources

    conversions, forms = [], []
    convert_leaf, fp8_forms = q.convert_leaf, q.fp8_forms
    monkeypatch.setattr(q, "convert_leaf", lambda module, name, *a, **k: conversions.append(f"{module}/{name}")
                        or convert_leaf(module, name, *a, **k))
    monkeypatch.setattr(q, "fp8_forms", lambda *a, **k: forms.append(1) or fp8_forms(*a, **k))
    _, variables, _, ckpt = sources.load_for_serving(ROOT / "tests" / "fixtures" / "hf" / fixture, spec)
    leaves = ["/".join(q.key_name(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(
        variables["params"], is_leaf=lambda x: isinstance(x, mpx.ScaledArray))[0]]
    assert sorted(conversions) == sorted(leaves) and len(set(conversions)) == len(conversions)
    assert len(forms) == 1 and ckpt.serving == spec
    assert any(isinstance(x, mpx.ScaledArray) for x in jax.tree_util.tree_leaves(
        variables, is_leaf=lambda x: isinstance(x, mpx.ScaledArray))) == (spec.precision == "fp8")


def test_text_batches_shrink_so_one_batchs_logits_stay_under_a_gib():
    from serve import evaluate_text

    windows = np.zeros((16, 257), np.int32)
    assert [len(b) for b in evaluate_text._batches(windows, 256)] == [8, 8]
    assert [len(b) for b in evaluate_text._batches(windows, 262_144)] == [4] * 4  # Gemma 3: 268 MB a window
    assert [len(b) for b in evaluate_text._batches(windows[:3], 1 << 22)] == [1, 1, 1]  # never fewer than one


def test_text_metrics_summed_batch_by_batch_equal_the_whole_arrays():
    """evaluate_text runs each batch through every variant and sums per batch: its KL, top-1,
    cosine and perplexity equal those of all windows' logits at once."""
    from benchmarks import kv_capacity
    from serve import evaluate_text

    ckpt = kv_capacity.random_checkpoint(preset("tiny"))
    windows = np.asarray(jax.random.randint(jax.random.key(3), (11, 33), 0, ckpt.config.vocab_size), np.int32)
    variants = evaluate_text.parse_variants("fp32,bf16")
    rows = evaluate_text.evaluate_text(ckpt, variants, windows, log=lambda _: None)
    logits = []
    for _, variant in variants:  # all 11 windows at once (evaluate_text: batches of 8 and 3)
        model, variables = q.prepare(ckpt, variant.spec)
        logits.append(evaluate._forward(model, variant.kv_cache)(variables, jnp.asarray(windows[:, :-1])))
    a, b = (x.reshape(-1, x.shape[-1]) for x in (logits[1], logits[0]))
    assert rows[0]["kl"] == 0.0 and rows[0]["top1_agreement"] == 1.0
    np.testing.assert_allclose(rows[1]["kl"], float(mpx.metrics.kl_divergence(a, b)), rtol=1e-4)
    np.testing.assert_allclose(rows[1]["top1_agreement"], float(mpx.metrics.top1_agreement(a, b)), rtol=1e-6)
    np.testing.assert_allclose(rows[1]["logits_cos"], float(mpx.metrics.cosine_similarity(a, b)), rtol=1e-5)
    nll = -float(jnp.sum(evaluate._target_logprobs(logits[1], windows[:, 1:])))
    np.testing.assert_allclose(rows[1]["ppl"], np.exp(nll / a.shape[0]), rtol=1e-5)
    assert rows[1]["kl"] > 0  # bf16 differs, or the comparison above could not fail
