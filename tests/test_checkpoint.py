"""Tests of store/checkpoint.py: bit-exact round trips, retention, integrity, compatibility."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from store import checkpoint as ckpt
from store.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parent.parent


class Moments(NamedTuple):
    mu: dict
    count: jax.Array


def all_bit_patterns(dtype, shape) -> np.ndarray:
    """Every bit pattern of a 1-byte dtype (NaNs included), or random bits for wider ones."""
    itemsize = np.dtype(dtype).itemsize
    uint = {1: np.uint8, 2: np.uint16, 4: np.uint32}[itemsize]
    n = int(np.prod(shape))
    bits = np.arange(n, dtype=np.uint64) % (1 << (8 * itemsize)) if itemsize == 1 else \
        np.random.default_rng(itemsize).integers(0, 1 << (8 * itemsize), n, dtype=np.uint64)
    return bits.astype(uint).view(dtype).reshape(shape)


def make_state():
    return {
        "params": {"w": jnp.asarray(all_bit_patterns(np.float32, (4, 64))),
                   "emb": jnp.asarray(all_bit_patterns(ml_dtypes.bfloat16, (8, 32)))},
        "fp8": {"w": jnp.asarray(all_bit_patterns(ml_dtypes.float8_e4m3fn, (16, 16))),
                "scale": jnp.float32(0.25)},
        "opt": (Moments(mu={"w": jnp.ones((4, 64), jnp.bfloat16)}, count=jnp.int32(7)),),
        "rng": jax.random.key(42),
        "data": {"epoch": jnp.int32(1), "step_in_epoch": jnp.int32(-3)},
    }


def bits(x) -> np.ndarray:
    x = jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
    x = np.asarray(x)
    return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def assert_bit_exact(a, b):
    leaves_a, leaves_b = ckpt.leaves_by_path(a), ckpt.leaves_by_path(b)
    assert leaves_a.keys() == leaves_b.keys()
    for name in leaves_a:
        x, y = leaves_a[name], leaves_b[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(bits(x), bits(y), err_msg=name)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One checkpoint directory with steps 10 and 20, shared by the read-only tests."""
    directory = tmp_path_factory.mktemp("ckpt")
    state = make_state()
    for step in (10, 20):
        ckpt.save(directory, step, state, {"model": {"d_model": 128, "n_layers": 2}, "step": step})
    return directory, state


def test_round_trip_is_bit_exact_with_a_target(saved):
    directory, state = saved
    restored, meta = ckpt.restore(directory, target=jax.eval_shape(lambda: state))
    assert meta == {"model": {"d_model": 128, "n_layers": 2}, "step": 20}
    assert jax.tree.structure(restored) == jax.tree.structure(state)  # NamedTuple, key kept
    assert isinstance(restored["opt"][0], Moments)
    assert jax.dtypes.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
    assert str(jax.random.key_impl(restored["rng"])) == str(jax.random.key_impl(state["rng"]))
    assert_bit_exact(restored, state)


def test_round_trip_without_a_target(saved):
    directory, state = saved
    restored, _ = ckpt.restore(directory, step=10)
    assert_bit_exact(restored, state)  # NamedTuples come back as dicts with the same paths
    np.testing.assert_array_equal(
        jax.random.key_data(jax.random.split(restored["rng"])),
        jax.random.key_data(jax.random.split(state["rng"])))


def test_steps_latest_and_metadata(saved, tmp_path):
    directory, _ = saved
    assert ckpt.all_steps(directory) == [10, 20]
    assert ckpt.latest_step(directory) == 20
    assert ckpt.read_metadata(directory, 10) == (10, {"model": {"d_model": 128, "n_layers": 2}, "step": 10})
    assert ckpt.latest_step(tmp_path / "nothing") is None


def test_keep_retains_the_newest_steps(tmp_path):
    state = {"x": jnp.arange(3)}
    for step in range(1, 6):
        ckpt.save(tmp_path, step, state, keep=2)
    assert ckpt.all_steps(tmp_path) == [4, 5]
    restored, _ = ckpt.restore(tmp_path)
    np.testing.assert_array_equal(restored["x"], state["x"])


def test_steps_must_increase(tmp_path):
    ckpt.save(tmp_path, 5, {"x": jnp.zeros(2)})
    with pytest.raises(CheckpointError, match="cannot save step 5 .* steps up to 5"):
        ckpt.save(tmp_path, 5, {"x": jnp.zeros(2)})
    with pytest.raises(CheckpointError, match="cannot save step 3"):
        ckpt.save(tmp_path, 3, {"x": jnp.zeros(2)})


def test_metadata_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="JSON-serializable"):
        ckpt.save(tmp_path, 1, {"x": jnp.zeros(2)}, {"bad": object()})


def test_incompatible_metadata_names_the_keys(saved):
    directory, _ = saved
    expect = {"model": {"d_model": 256, "n_layers": 2}, "tokenizer": "bytes"}
    with pytest.raises(CheckpointError, match=r"incompatible: model\.d_model: expected 256, "
                                              r"checkpoint has 128; tokenizer: expected 'bytes'"):
        ckpt.restore(directory, expect=expect)
    _, meta = ckpt.restore(directory, expect={"model": {"n_layers": 2}, "step": 20})
    assert meta["step"] == 20


def test_target_with_other_dtypes_or_structure_is_refused(saved):
    directory, state = saved
    wrong_dtype = jax.eval_shape(lambda: state)
    wrong_dtype["params"]["emb"] = jax.ShapeDtypeStruct((8, 32), jnp.float32)  # orbax would cast
    with pytest.raises(CheckpointError, match=r"params/emb was saved as bfloat16\[8, 32\]"):
        ckpt.restore(directory, target=wrong_dtype)
    with pytest.raises(CheckpointError, match=r"only in the target: \[extra\]"):
        ckpt.restore(directory, target={**state, "extra": jnp.zeros(1)})


def test_missing_directory_and_missing_checkpoints(tmp_path, saved):
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.restore(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="no complete checkpoint .* it is empty"):
        ckpt.restore(tmp_path)
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 15 .* steps: \[10, 20\]"):
        ckpt.restore(saved[0], step=15)


# ---------------------------------------------------------------------------
# Integrity: every damage is a CheckpointError naming the step directory and the file.


@pytest.fixture
def fresh(tmp_path):
    state = make_state()
    ckpt.save(tmp_path, 1, state, {"note": "fresh"})
    return tmp_path, tmp_path / "1", state


def largest_data_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def test_flipped_byte_is_detected(fresh):
    directory, step_dir, _ = fresh
    path = largest_data_file(step_dir)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    name = str(path.relative_to(step_dir))
    with pytest.raises(CheckpointError, match=f"{step_dir}: file {name} is corrupt"):
        ckpt.restore(directory)


def test_truncated_file_is_detected(fresh):
    directory, step_dir, _ = fresh
    path = largest_data_file(step_dir)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CheckpointError, match=f"{step_dir}: file .* is truncated"):
        ckpt.restore(directory)


def test_flipped_byte_in_metadata_is_detected(fresh):
    directory, step_dir, _ = fresh
    path = step_dir / "meta" / "metadata"
    path.write_text(path.read_text().replace("fresh", "frash"))
    with pytest.raises(CheckpointError, match="meta/metadata is corrupt"):
        ckpt.read_metadata(directory)


def test_missing_and_unexpected_files_are_detected(fresh):
    directory, step_dir, _ = fresh
    (step_dir / "state" / "stray").write_text("x")
    with pytest.raises(CheckpointError, match="unexpected file state/stray"):
        ckpt.restore(directory)
    (step_dir / "state" / "stray").unlink()
    victim = largest_data_file(step_dir)
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"file {victim.relative_to(step_dir)} is missing"):
        ckpt.restore(directory)


def test_a_step_without_manifest_is_incomplete(fresh):
    directory, step_dir, state = fresh
    ckpt.save(directory, 2, state)
    (directory / "2" / ckpt.MANIFEST).unlink()  # as if the save died before the manifest
    for load in (ckpt.latest_step, ckpt.read_metadata, ckpt.restore):  # never a silent fallback
        with pytest.raises(CheckpointError, match=f"{directory / '2'} is incomplete .* use step 1"):
            load(directory)
    assert ckpt.latest_step(directory, skip_incomplete=True) == 1
    assert ckpt.read_metadata(directory, skip_incomplete=True) == (1, {"note": "fresh"})
    with pytest.raises(CheckpointError, match=f"{directory / '2'} is incomplete"):
        ckpt.restore(directory, step=2)
    moved = ckpt.set_aside(directory, 2)
    assert moved.name == "2.incomplete" and ckpt.all_steps(directory) == [1]
    assert ckpt.latest_step(directory) == 1
    ckpt.save(directory, 2, state)  # the resumed run can save its step again
    assert ckpt.latest_step(directory) == 2
    with pytest.raises(CheckpointError, match="is complete"):
        ckpt.set_aside(directory, 2)
    (step_dir / ckpt.MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest.json is corrupt"):
        ckpt.restore(directory, step=1)


def test_manifest_lists_every_file_with_its_hash(fresh):
    _, step_dir, _ = fresh
    manifest = json.loads((step_dir / ckpt.MANIFEST).read_text())["files"]
    on_disk = {str(p.relative_to(step_dir)) for p in step_dir.rglob("*")
               if p.is_file() and p.name != ckpt.MANIFEST}
    assert set(manifest) == on_disk
    assert all(len(e["sha256"]) == 64 and e["size"] >= 0 for e in manifest.values())


# ---------------------------------------------------------------------------
# Shardings: restore onto a target's shardings; across meshes with 8 CPU devices.


def test_restore_onto_target_shardings(tmp_path):
    devices = np.array(jax.devices())
    mesh = jax.sharding.Mesh(devices, ("x",))
    n = len(devices)
    x = jax.device_put(jnp.arange(8 * n * 4, dtype=jnp.float32).reshape(8 * n, 4),
                       NamedSharding(mesh, P("x", None)))
    ckpt.save(tmp_path, 1, {"x": x})
    replicated = NamedSharding(mesh, P())
    target = {"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)}
    restored, _ = ckpt.restore(tmp_path, target=target)
    assert restored["x"].sharding == replicated
    np.testing.assert_array_equal(restored["x"], x)


_RESHARD_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from store import checkpoint as ckpt
    directory = sys.argv[1]
    devices = np.array(jax.devices())
    assert devices.size == 8, devices
    save_mesh = Mesh(devices, ("data",))
    w = jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8).astype(jnp.bfloat16)
    key = jax.random.key(3)
    state = {"w": jax.device_put(w, NamedSharding(save_mesh, P("data", None))),
             "key": jax.device_put(key, NamedSharding(save_mesh, P()))}
    ckpt.save(directory, 1, state)
    load_mesh = Mesh(devices.reshape(2, 4), ("fsdp", "tensor"))
    sharding = NamedSharding(load_mesh, P("fsdp", "tensor"))
    target = {"w": jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=sharding),
              "key": jax.ShapeDtypeStruct((), key.dtype, sharding=NamedSharding(load_mesh, P()))}
    out, _ = ckpt.restore(directory, target=target)
    assert out["w"].sharding == sharding, out["w"].sharding
    assert out["w"].addressable_shards[0].data.shape == (8, 2)
    np.testing.assert_array_equal(np.asarray(out["w"]).view(np.uint16), np.asarray(w).view(np.uint16))
    np.testing.assert_array_equal(jax.random.key_data(out["key"]), jax.random.key_data(key))
    print("RESHARD_OK")
""")


def test_checkpoint_saved_on_one_mesh_restores_onto_another(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", _RESHARD_SCRIPT, str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert "RESHARD_OK" in result.stdout, result.stderr[-3000:]


def test_target_decides_between_typed_keys_and_raw_key_data(tmp_path):
    key = jax.random.key(5)
    ckpt.save(tmp_path / "typed", 1, {"rng": key})
    raw_target = {"rng": jax.ShapeDtypeStruct(jax.random.key_data(key).shape, jnp.uint32)}
    out, _ = ckpt.restore(tmp_path / "typed", target=raw_target)
    np.testing.assert_array_equal(out["rng"], jax.random.key_data(key))
    ckpt.save(tmp_path / "raw", 1, {"rng": jax.random.key_data(key)})
    with pytest.raises(CheckpointError, match=r"asks for PRNG keys at \['rng'\], saved as raw"):
        ckpt.restore(tmp_path / "raw", target={"rng": key})


def test_a_corrupt_newest_step_says_what_to_do_and_can_be_skipped(fresh):
    directory, _, state = fresh
    ckpt.save(directory, 2, {**state, "data": {**state["data"], "epoch": jnp.int32(2)}})
    path = largest_data_file(directory / "2")
    path.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 1]))  # manifest intact, data not
    for load in (ckpt.read_metadata, ckpt.restore):
        with pytest.raises(CheckpointError, match=r"2: file .* is corrupt.*delete it .*--skip-incomplete to use step 1"
                           ):
            load(directory)
    assert ckpt.read_metadata(directory, skip_incomplete=True) == (1, {"note": "fresh"})
    restored, _ = ckpt.restore(directory, skip_incomplete=True)
    assert int(restored["data"]["epoch"]) == 1
    assert ckpt.newest_usable(directory, skip_incomplete=True) == (1, [2])
    assert ckpt.set_aside(directory, 2).name == "2.corrupt" and ckpt.all_steps(directory) == [1]
