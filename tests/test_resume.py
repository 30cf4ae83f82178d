"""Single-process resume: the whole train state continues bit for bit, past warmup.

A run with FP8 delayed scaling (amax histories) and a dynamic loss scale trains 6
steps with a real learning rate (warmup 2); a second run is cut after step 3 and
resumed. Every leaf of the final states (f32 params, bf16 Adam moments, step counts,
loss scale and counter, amax histories, RNG) must be identical, and the resumed steps
must have moved the params far beyond any rounding, so a resume that drops or resets
a piece of state (or a step that barely updates) cannot pass.
"""

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from store import checkpoint as ckpt
from train import config as config_lib
from train import loop

ROOT = Path(__file__).resolve().parents[1]
STEPS, CUT, WARMUP, LR = 6, 3, 2, 1e-2
# A micro model on this file's text; no clipping, so the gradient scale reaches the moments.
OVERRIDES = ["model.n_layers=1", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=128",
             "data.seq_len=32", "data.batch_size=8", f"data.source={Path(__file__).resolve()}",
             "data.eval_fraction=0", "eval_every=0", "log_every=1", "precision=fp8_delayed",
             "optimizer.loss_scale=dynamic", f"optimizer.learning_rate={LR}", f"optimizer.warmup_steps={WARMUP}",
             "optimizer.clip_norm=null", f"steps={STEPS}", f"checkpoint.every={CUT}", "checkpoint.keep=3"]


def _flat(state) -> dict:
    """Leaves of a restored state by their path string."""
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state)}


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(straight summary, resumed summary, straight dir, resumed dir)."""
    base = tmp_path_factory.mktemp("resume")
    cfg_a = config_lib.load(ROOT / "configs" / "tiny.yaml", OVERRIDES + [f"run_dir={base / 'a'}"])
    straight = loop.train(cfg_a, quiet=True)
    # The interrupted run: the same run with its final checkpoint gone, then resumed.
    shutil.copytree(base / "a", base / "b")
    cfg_b = config_lib.load(ROOT / "configs" / "tiny.yaml", OVERRIDES + [f"run_dir={base / 'b'}"])
    shutil.rmtree(Path(cfg_b.checkpoint_dir) / str(STEPS))
    assert ckpt.latest_step(cfg_b.checkpoint_dir) == CUT
    resumed = loop.train(cfg_b, resume_run=True, quiet=True)
    return straight, resumed, Path(cfg_a.checkpoint_dir), Path(cfg_b.checkpoint_dir)


def test_resumed_state_equals_uninterrupted_bit_for_bit(runs):
    straight, resumed, dir_a, dir_b = runs
    assert straight["skipped_steps"] == resumed["skipped_steps"] == 0
    assert resumed["steps_run"] == STEPS - CUT and resumed["losses"] == straight["losses"][CUT:]
    a, b = _flat(ckpt.restore(dir_a, STEPS)[0]), _flat(ckpt.restore(dir_b, STEPS)[0])
    assert a.keys() == b.keys()
    for key in a:  # every leaf, each bit (NaN-safe through the raw bytes)
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert a[key].tobytes() == b[key].tobytes(), f"{key} differs after resume"


def test_the_compared_state_is_all_there_and_past_warmup(runs):
    """Guards the comparison above from being vacuous: each piece exists and has evolved."""
    _, _, dir_a, _ = runs
    a, cut = _flat(ckpt.restore(dir_a, STEPS)[0]), _flat(ckpt.restore(dir_a, CUT)[0])
    moments = {k: v for k, v in a.items() if ".mu" in k or ".nu" in k or "'mu'" in k or "'nu'" in k}
    assert moments and all(v.dtype == jnp.bfloat16 for v in moments.values()), sorted(a)
    counts = [int(v) for k, v in a.items() if "count" in k and v.ndim == 0]
    assert counts and all(c == STEPS for c in counts), counts
    histories = {k: v for k, v in a.items() if k.startswith("['fp8_state']") and k.endswith("['history']")}
    assert histories, sorted(a)
    # Each history holds one observation per step so far: the 3 before the cut survive.
    assert all(np.count_nonzero(v.reshape(v.shape[0], -1).any(axis=1)) == STEPS for v in histories.values())
    scale = {k: v for k, v in a.items() if "loss_scale" in k}
    assert any("counter" in k and int(v) == STEPS for k, v in scale.items()), scale
    # The resumed steps (4..6, learning rate at its peak) moved the params by percents
    # (~9% measured), far beyond any rounding: at a learning rate of 1e-12 they would stay
    # within f32 ulps, and a resume that loses state would have much to get wrong.
    params = [k for k in a if k.startswith("['params']")]
    moved = _rel(np.concatenate([a[k].ravel() for k in params]), np.concatenate([cut[k].ravel() for k in params]))
    assert moved > 0.02, moved
