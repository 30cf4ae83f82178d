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
             "data.eval_fraction=0", "eval_every=0", "log_every=1", "checkpoint.every=0", "steps=3"]


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
    assert "step 3/3" not in logs[1]  # only process 0 reports
    records = [json.loads(line) for line in (multi_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]  # written once, by process 0
    multi = [r["loss"] for r in records]
    np.testing.assert_allclose(multi, single["losses"], rtol=BF16_EPS)
    step, meta = ckpt.read_metadata(multi_dir / "checkpoints")  # saved jointly, verified file by file
    assert step == 3 and meta["data_state"] == {"epoch": 0, "step_in_epoch": 3}
