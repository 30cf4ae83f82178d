"""End-to-end tests of training: learning, bit-exact resume, microbatches, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mpx
from models import config as model_config
from models import transformer
from store import checkpoint as ckpt
from train import config as config_lib
from train import loop
from train import run as run_cli
from train import step as step_lib

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = str(ROOT / "configs" / "tiny.yaml")
# A smaller-than-tiny model so each test trains in seconds on 2 cores.
MICRO = ["model.n_layers=1", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=128",
         "data.seq_len=32", "data.batch_size=8", "log_every=5", "eval_batches=2"]


def _cfg(tmp_path, *overrides):
    return config_lib.load(TINY_YAML, MICRO + [f"run_dir={tmp_path}"] + list(overrides))


def test_loss_decreases_on_tiny_config(tmp_path):
    cfg = _cfg(tmp_path, "steps=40", "eval_every=40", "checkpoint.every=0")
    summary = loop.train(cfg, quiet=True)
    losses = summary["losses"]
    assert len(losses) == 40 and summary["final_step"] == 40
    assert np.mean(losses[-5:]) < losses[0] - 1.0, losses
    assert summary["eval"]["eval_loss"] < losses[0] - 1.0
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "config.yaml").exists()


def test_resume_is_bit_exact(tmp_path):
    straight = loop.train(_cfg(tmp_path / "a", "steps=8", "checkpoint.every=4", "eval_every=0"), quiet=True)
    cfg_b = _cfg(tmp_path / "b", "steps=8", "checkpoint.every=4", "eval_every=0")
    loop.train(cfg_b, quiet=True)
    # Pretend the run died after step 4: drop the final checkpoint and resume.
    shutil.rmtree(Path(cfg_b.checkpoint_dir) / "8")
    assert ckpt.latest_step(cfg_b.checkpoint_dir) == 4
    resumed = loop.train(cfg_b, resume_run=True, quiet=True)
    assert resumed["losses"] == straight["losses"][4:]  # exact float equality, step by step
    a = ckpt.restore(_cfg(tmp_path / "a").checkpoint_dir)[0]
    b = ckpt.restore(cfg_b.checkpoint_dir)[0]
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_checkpoint_holds_scale_state_loss_scale_rng_and_data_position(tmp_path):
    cfg = _cfg(tmp_path, "steps=3", "checkpoint.every=3", "eval_every=0", "precision=fp8_delayed",
               "optimizer.loss_scale=dynamic")
    loop.train(cfg, quiet=True)
    state, meta = ckpt.restore(cfg.checkpoint_dir)
    assert meta["data_state"] == {"epoch": 0, "step_in_epoch": 3}
    assert meta["config"]["precision"]["preset"] == "fp8_delayed"
    histories = jax.tree_util.tree_leaves(state["fp8_state"])
    assert histories and all(float(jnp.max(h)) > 0 for h in histories)
    assert "loss_scale" in state["loss_scale"] and state["rng"].dtype == np.uint32


def _micro_setup(policy_name, microbatches):
    cfg = model_config.ModelConfig(n_layers=1, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=32)
    model = transformer.Transformer(cfg, mpx.policy.preset(policy_name))
    tx = mpx.optim.build("adamw", 1e-3, moment_dtype="bf16")
    state = step_lib.init_state(model, tx, mpx.optim.NoOpLossScale(), 0, jnp.zeros((1, 16), jnp.int32))
    return model, state, jax.jit(step_lib.make_train_step(model, tx, microbatches))


def test_microbatches_merge_amax_with_max_and_average_gradients():
    model, state, step2 = _micro_setup("fp8_delayed", 2)
    tokens = jax.random.randint(jax.random.key(1), (4, 17), 0, 256)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    new_state, metrics = step2(state, batch)
    # The embedding output feeding layers_0's q_proj differs per microbatch: recompute
    # each microbatch's amax of the q_proj input and check history[0] is their max.
    params = state.params
    observed = []
    for half in (batch["inputs"][:2], batch["inputs"][2:]):
        _, updated = model.apply({"params": params, "fp8_state": state.fp8_state}, half, mutable=["fp8_state"])
        observed.append(float(updated["fp8_state"]["layers_0"]["attn"]["q_proj"]["kernel"].lhs.history[0]))
    merged = float(new_state.fp8_state["layers_0"]["attn"]["q_proj"]["kernel"].lhs.history[0])
    assert observed[0] != observed[1]
    assert merged == max(observed) and merged != sum(observed)
    # Gradient accumulation: one step on 2 microbatches == one step on the full batch.
    _, _, step1 = _micro_setup("fp32", 1)
    _, state32, step2_32 = _micro_setup("fp32", 2)
    s1, m1 = step1(state32, batch)
    s2, m2 = step2_32(state32, batch)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    # Adam's first update is ~lr * sign(g): where |g| ~ eps the f32 summation order of the
    # microbatches shows up, bounded by a small fraction of the learning rate (1e-3).
    for a, b in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s2.params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_nonfinite_step_is_skipped_without_touching_state():
    _, state, step = _micro_setup("fp8_delayed", 1)
    params = jax.tree.map(lambda x: x, state.params)
    params["layers_0"]["mlp"]["up"]["kernel"] = params["layers_0"]["mlp"]["up"]["kernel"].at[0, 0].set(jnp.inf)
    poisoned = step_lib.TrainState(state.step, params, state.opt_state, state.fp8_state, state.loss_scale, state.rng)
    before = jax.tree.map(np.asarray, (poisoned.params, poisoned.opt_state, poisoned.fp8_state))
    tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, 256)
    new, metrics = step(poisoned, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    assert bool(metrics["skipped"])
    after = (new.params, new.opt_state, new.fp8_state)
    for x, y in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
        if np.asarray(y).dtype.kind == "f":  # counters and flags move; values must not
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert int(new.opt_state.skipped) == 1


def test_fp8_eval_loss_within_2_percent_of_fp32(tmp_path):
    results = {}
    for precision in ("fp32", "fp8"):
        cfg = _cfg(tmp_path / precision, "steps=60", "eval_every=60", "checkpoint.every=0", f"precision={precision}")
        results[precision] = loop.train(cfg, quiet=True)["eval"]["eval_loss"]
    rel = abs(results["fp8"] - results["fp32"]) / results["fp32"]
    print(f"eval loss fp32 {results['fp32']:.4f} fp8 {results['fp8']:.4f} relative difference {rel:.4%}")
    assert rel < 0.02


def test_cli_rejects_unknown_key_with_suggestion(tmp_path, capsys):
    code = run_cli.main(["--config", TINY_YAML, "--set", f"run_dir={tmp_path}", "--set", "optimizer.learning_rat=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "optimizer.learning_rat" in err and "learning_rate" in err and "Traceback" not in err


def test_cli_missing_config_file(capsys):
    assert run_cli.main(["--config", "configs/nope.yaml"]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_resume_from_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys):
    cfg = _cfg(tmp_path, "steps=2", "checkpoint.every=2", "eval_every=0")
    loop.train(cfg, quiet=True)
    step_dir = Path(cfg.checkpoint_dir) / "2"
    data_files = [p for p in step_dir.rglob("*") if p.is_file() and p.name != ckpt.MANIFEST and p.stat().st_size > 64]
    victim = max(data_files, key=lambda p: p.stat().st_size)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    args = ["--config", TINY_YAML, "--resume", "--quiet"] + sum([["--set", o] for o in MICRO], [])
    code = run_cli.main(args + ["--set", f"run_dir={tmp_path}", "--set", "steps=4"])
    err = capsys.readouterr().err
    assert code == 2 and victim.name in err and "Traceback" not in err


def test_resume_with_different_model_is_refused(tmp_path):
    loop.train(_cfg(tmp_path, "steps=2", "checkpoint.every=2", "eval_every=0"), quiet=True)
    other = _cfg(tmp_path, "steps=4", "eval_every=0", "model.n_layers=3")
    with pytest.raises(ckpt.CheckpointError, match="n_layers"):
        loop.train(other, resume_run=True, quiet=True)


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_then_resume_finishes(tmp_path):
    overrides = MICRO + [f"run_dir={tmp_path}", "steps=400", "eval_every=0", "checkpoint.every=0", "log_every=1"]
    cmd = [sys.executable, "-m", "train.run", "--config", TINY_YAML] + sum([["--set", o] for o in overrides], [])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    deadline = time.time() + 240
    seen = ""
    while "step 3/" not in seen and time.time() < deadline:
        seen += proc.stdout.read(1)
    proc.send_signal(signal.SIGINT)
    out = seen + proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGINT, out
    step = ckpt.latest_step(tmp_path / "checkpoints")
    assert step is not None and 3 <= step < 400, out
    assert "--resume" in out


def _train_records(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)]


def test_a_fresh_run_never_writes_over_another_and_a_resume_logs_each_step_once(tmp_path, capsys):
    cfg = _cfg(tmp_path, "steps=4", "checkpoint.every=2", "eval_every=0", "log_every=1")
    loop.train(cfg, quiet=True)
    with pytest.raises(config_lib.ConfigError, match=r"already holds a run \(checkpoints up to step 4.*--resume"):
        loop.train(cfg, quiet=True)
    shutil.rmtree(Path(cfg.checkpoint_dir) / "4")  # died after logging steps 3-4, before saving 4
    assert _train_records(tmp_path) == [1, 2, 3, 4]
    loop.train(cfg, resume_run=True)
    assert "resumed from step 2 of" in capsys.readouterr().out
    assert _train_records(tmp_path) == [1, 2, 3, 4]  # 3 and 4 once, from the resumed run
    with pytest.raises(config_lib.ConfigError, match="step 4 .* is past steps=3"):
        loop.train(_cfg(tmp_path, "steps=3", "eval_every=0"), resume_run=True, quiet=True)


def test_resume_past_an_incomplete_step_only_when_asked(tmp_path, capsys):
    cfg = _cfg(tmp_path, "steps=4", "checkpoint.every=2", "eval_every=0")
    loop.train(cfg, quiet=True)
    (Path(cfg.checkpoint_dir) / "4" / ckpt.MANIFEST).unlink()
    with pytest.raises(ckpt.CheckpointError, match="4 is incomplete .*--skip-incomplete to use step 2"):
        loop.train(cfg, resume_run=True, quiet=True)
    summary = loop.train(cfg, resume_run=True, skip_incomplete=True)
    out = capsys.readouterr().out
    assert "set aside incomplete checkpoint step 4" in out and "resumed from step 2" in out
    assert summary["final_step"] == 4 and ckpt.latest_step(cfg.checkpoint_dir) == 4


def test_a_dropped_update_is_reported_as_skipped():
    model, state, _ = _micro_setup("bf16", 1)
    tx = mpx.optim.build("adamw", jnp.inf, moment_dtype="bf16")  # finite grads, non-finite update
    state = step_lib.init_state(model, tx, mpx.optim.NoOpLossScale(), 0, jnp.zeros((1, 16), jnp.int32))
    tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, 256)
    new, metrics = jax.jit(step_lib.make_train_step(model, tx))(state, {"inputs": tokens[:, :-1],
                                                                       "targets": tokens[:, 1:]})
    assert np.isfinite(float(metrics["grad_norm"])) and bool(metrics["skipped"])
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(new.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_run_whose_every_step_was_skipped_fails(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(step_lib, "_update_applied", lambda opt_state: jnp.asarray(False))
    args = ["--config", TINY_YAML, "--quiet"] + sum([["--set", o] for o in MICRO], [])
    code = run_cli.main(args + ["--set", f"run_dir={tmp_path}", "--set", "steps=2", "--set", "eval_every=0"])
    err = capsys.readouterr().err
    assert code == 1 and "all 2 steps were skipped" in err and "learning_rate" in err


def test_signal_handlers_are_restored_after_training(tmp_path):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    loop.train(_cfg(tmp_path, "steps=1", "eval_every=0"), quiet=True)
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_a_run_starts_from_a_hugging_face_directory(tmp_path):
    from store import hf

    directory = ROOT / "tests" / "fixtures" / "hf" / "qwen3"
    yaml_path = tmp_path / "from_hf.yaml"
    yaml_path.write_text(f"model: {{init_from: {directory}, max_seq_len: 64}}\nprecision: fp8\n"
                         f"data: {{source: builtin, tokenizer: {directory / 'tokenizer.json'}, seq_len: 32, "
                         f"batch_size: 4}}\nsteps: 3\neval_every: 0\neval_batches: 1\ncheckpoint: {{every: 0}}\n"
                         f"run_dir: {tmp_path / 'run'}\n")
    cfg = config_lib.load(yaml_path)
    assert cfg.model == hf.resolve_init_from(cfg.model) and cfg.model.d_model == 32 and cfg.model.n_layers == 2
    run = loop.build(cfg)
    state = loop.initial_state(run)
    expected = hf.init_params(cfg.model)
    assert jax.tree.structure(state.params) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected)):
        assert got.dtype == jnp.float32 and np.array_equal(np.asarray(got), np.asarray(want))
    summary = loop.train(cfg, quiet=True)
    assert summary["final_step"] == 3 and np.all(np.isfinite(summary["losses"]))
    from store.tokenizer import ModelTokenizer  # the tokenizer's files, chat template included, carried into the run
    carried = ModelTokenizer.from_dir(tmp_path / "run" / "tokenizer")
    assert carried.chat_template and carried.chat_template == ModelTokenizer.from_dir(directory).chat_template
    yaml_path.write_text(yaml_path.read_text().replace(str(directory), str(tmp_path / "nowhere")))
    with pytest.raises(config_lib.ConfigError, match="model.init_from"):
        config_lib.load(yaml_path)
