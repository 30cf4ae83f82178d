"""Tests of train.distributed: settings from flags/env, and 2 local processes over gloo."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from store import checkpoint as ckpt
from train import config as config_lib
from train import distributed
from train import loop

ROOT = Path(__file__).resolve().parents[1]
BF16_EPS = float(jnp.finfo(jnp.bfloat16).eps)
# A micro model on a small local text (this file) so each process starts in seconds.
OVERRIDES = ["model.n_layers=1", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=128",
             "data.seq_len=32", "data.batch_size=8", "precision=bf16", f"data.source={Path(__file__).resolve()}",
             "data.eval_fraction=0", "eval_every=0", "log_every=1", "checkpoint.every=3", "steps=6",
             # Past warmup at a real learning rate; no clip, which would normalize away a wrong
             # gradient scale (e.g. a sum over the 2 processes instead of a mean) before Adam sees it.
             "optimizer.learning_rate=1e-2", "optimizer.warmup_steps=2", "optimizer.clip_norm=null"]
STEPS = 6
# Bound of the relative difference between the 2-process and the 1-process state. They
# differ only in how the f32 gradient sum is split and ordered (two half batches, then an
# all-reduce), a few f32 ulps, which the bf16 compute copies and bf16 moments can turn into
# at most one bf16 rounding (eps/2 relative) per element per step: under STEPS * eps_bf16
# (~0.047) after STEPS steps. A gradient off by x2 (summed, not averaged, over the 2
# processes) doubles mu and quadruples nu (relative error 1 and 3); a moment dropped or
# reset changes them by O(1) and the params' motion by tens of percent.
TOL = STEPS * BF16_EPS


def test_flags_win_over_environment():
    env = {"MPX_COORDINATOR": "10.0.0.1:1234", "MPX_NUM_PROCESSES": "4", "MPX_PROCESS_ID": "3"}
    assert distributed.resolve(env=env) == distributed.DistributedConfig("10.0.0.1:1234", 4, 3)
    cfg = distributed.resolve("127.0.0.1:99", 2, 1, env=env)
    assert (cfg.coordinator, cfg.num_processes, cfg.process_id, cfg.enabled) == ("127.0.0.1:99", 2, 1, True)
    assert not distributed.resolve(env={}).enabled
    assert distributed.resolve(env={"MPX_DISTRIBUTED": "1"}) == distributed.DistributedConfig(auto=True)


@pytest.mark.parametrize("kwargs, env, message", [
    ({"coordinator": "h:1"}, {}, "needs all of coordinator, num_processes and process_id"),
    ({"num_processes": 2, "process_id": 0}, {}, "needs all of"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, {},
     "process_id=2 must be in \\[0, num_processes=2\\)"),
    ({}, {"MPX_COORDINATOR": "h:1", "MPX_NUM_PROCESSES": "two", "MPX_PROCESS_ID": "0"}, "MPX_NUM_PROCESSES='two'"),
])
def test_incomplete_settings_are_errors(kwargs, env, message):
    with pytest.raises(ValueError, match=message):
        distributed.resolve(**kwargs, env=env)


def test_initialize_passes_settings_or_auto_detects(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args: calls.append(args))
    monkeypatch.setattr(jax.config, "update", lambda *args: calls.append(("config",) + args))
    assert not distributed.initialize(distributed.DistributedConfig())
    assert calls == []
    assert distributed.initialize(distributed.DistributedConfig("h:1", 2, 1))
    assert distributed.initialize(distributed.DistributedConfig(auto=True))
    assert calls == [("config", "jax_cpu_collectives_implementation", "gloo"), ("h:1", 2, 1),
                     ("config", "jax_cpu_collectives_implementation", "gloo"), ()]


def test_cli_rejects_half_a_coordinator_setting(capsys):
    from train import run
    assert run.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--coordinator", "h:1"]) == 2
    assert "needs all of coordinator" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(run_dir: Path, port: int, process_id: int) -> subprocess.Popen:
    """Process 0 gets flags, process 1 the MPX_* environment: both ways work."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device each
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "train.run", "--config", str(ROOT / "configs" / "tiny.yaml")]
    cmd += [arg for item in OVERRIDES + [f"run_dir={run_dir}"] for arg in ("--set", item)]
    if process_id == 0:
        cmd += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "0"]
    else:
        env.update(MPX_COORDINATOR=f"127.0.0.1:{port}", MPX_NUM_PROCESSES="2", MPX_PROCESS_ID="1")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    multi_dir = tmp_path / "multi"
    port = _free_port()
    procs = [_launch(multi_dir, port, i) for i in range(2)]
    try:
        # The single-process reference trains here while the two processes run.
        single = loop.train(config_lib.load(ROOT / "configs" / "tiny.yaml",
                                            OVERRIDES + [f"run_dir={tmp_path / 'single'}"]), quiet=True)
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    assert "2 process(es), mesh {'data': 2, 'fsdp': 1, 'tensor': 1}" in logs[0]
    assert f"step {STEPS}/{STEPS}" not in logs[1]  # only process 0 reports
    records = [json.loads(line) for line in (multi_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # written once, by process 0
    multi = [r["loss"] for r in records]
    np.testing.assert_allclose(multi, single["losses"], rtol=TOL)
    step, meta = ckpt.read_metadata(multi_dir / "checkpoints")  # saved jointly, verified file by file
    assert step == STEPS and meta["data_state"] == {"epoch": 0, "step_in_epoch": STEPS}
    _assert_same_state(multi_dir / "checkpoints", tmp_path / "single" / "checkpoints")


def _flat_state(directory: Path, step: int, target=None) -> dict:
    """Params and optimizer state of checkpoint `step` (onto `target`) as f32 numpy arrays by path."""
    state, _ = ckpt.restore(directory, step, target=target)
    return {jax.tree_util.keystr(p): np.asarray(v, np.float32) for p, v in jax.tree_util.tree_leaves_with_path(state)
            if jax.tree_util.keystr(p).startswith(("['params']", "['opt_state']"))}


def _norm(tree: dict, prefix: str, minus: dict | None = None) -> float:
    """L2 norm over the leaves under `prefix` (of tree - minus when given)."""
    return float(np.sqrt(sum(np.sum(np.square(v - (0 if minus is None else minus[k]), dtype=np.float64))
                             for k, v in tree.items() if k.startswith(prefix))))


def _assert_same_state(multi_dir: Path, single_dir: Path) -> None:
    # The 2-process checkpoint restores onto this process's one device via a target like it.
    got = _flat_state(multi_dir, STEPS, target=ckpt.restore(single_dir, STEPS)[0])
    ref, cut = _flat_state(single_dir, STEPS), _flat_state(single_dir, 3)
    assert got.keys() == ref.keys()
    # Steps 4..6 (lr at its peak) moved the params far beyond the bound: a learning rate of
    # 1e-12 would fail here, and the comparison below is relative to this motion.
    motion = _norm(ref, "['params']", cut)
    assert motion > 0.02 * _norm(ref, "['params']"), motion
    rel = {"params": _norm(got, "['params']", ref) / motion}
    for moment in ("mu", "nu"):
        prefix = f"['opt_state']['inner_state'][0][0]['{moment}']"
        assert _norm(ref, prefix) > 0, prefix
        rel[moment] = _norm(got, prefix, ref) / _norm(ref, prefix)
    assert all(r <= TOL for r in rel.values()), (rel, TOL)
    counts = [int(v) for k, v in got.items() if k.endswith("['count']")]
    assert counts and all(c == STEPS for c in counts), counts
