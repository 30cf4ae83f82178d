"""Tests of mpx.sharding and models.sharding: rules on one device, and 8-device meshes in a subprocess.

The 8-device checks run once, in tests/sharding_worker.py with 8 simulated CPU devices
(this pytest process keeps its single device); the tests compare its results.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from models import sharding as model_sharding
from mpx import sharding
from train import config as config_lib
from train import loop

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "sharding_worker.py"
# bf16's machine epsilon: gradients pass through bf16 compute copies, and a reordered f32
# sum on a mesh can flip a bf16 (or E4M3) rounding of a few elements.
BF16_EPS = float(jnp.finfo(jnp.bfloat16).eps)


def _loop_overrides(run_dir: Path) -> list[str]:
    spec = importlib.util.spec_from_file_location("sharding_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RESHARD + [f"run_dir={run_dir}"]


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """Runs the 8-device worker once and loads its results."""
    out = tmp_path_factory.mktemp("sharding_worker")
    # Backend optimization level 0: the same HLO (and collectives), less LLVM compile time.
    # No excess precision: by default XLA may keep a bf16 intermediate in f32 in one
    # compilation and not in another, which alone moves the q/k gradients by ~1% here
    # (softmax-backward cancellation); without it the meshes differ only by sum order.
    flags = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
             "--xla_allow_excess_precision=false")
    env = {**os.environ, "XLA_FLAGS": flags}
    procs = {group: subprocess.Popen([sys.executable, str(WORKER), str(out), group], env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for group in ("grads", "loop")}
    # Meanwhile, the single-device reference of the worker's train-loop run, here.
    single = loop.train(config_lib.load(ROOT / "configs" / "tiny.yaml", _loop_overrides(out / "single")), quiet=True)
    results = {"single_losses": single["losses"], "single_dir": str(out / "single" / "checkpoints")}
    for group, proc in procs.items():
        log, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, log[-4000:]
        results.update(json.loads((out / f"{group}.json").read_text()))
    with np.load(out / "grads.npz") as f:
        grads = {k: f[k] for k in f.files}
    with np.load(out / "reshard.npz") as f:
        reshard = {k: f[k] for k in f.files}
    return {"results": results, "grads": grads, "reshard": reshard}


# --------------------------------------------------------------------------- rules (one device)


def test_resolve_sizes_fills_the_rest_and_rejects_bad_meshes():
    assert sharding.resolve_sizes({"data": -1, "tensor": 2}, 8) == {"data": 4, "fsdp": 1, "tensor": 2}
    assert sharding.resolve_sizes(config_lib.MeshConfig(data=2, fsdp=-1), 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(ValueError, match="needs 6 devices; there are 8"):
        sharding.resolve_sizes({"data": 3, "tensor": 2}, 8)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.resolve_sizes({"pipeline": 2}, 2)
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.resolve_sizes({"data": -1, "fsdp": -1}, 8)
    assert sharding.parse_mesh("data=2, fsdp=4,tensor=1") == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(ValueError, match="expected axis=size"):
        sharding.parse_mesh("data:2")


def test_make_mesh_uses_auto_axes_in_order():
    mesh = sharding.make_mesh({"data": -1})
    assert mesh.axis_names == sharding.MESH_AXES and dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    if hasattr(jax.sharding, "AxisType"):
        assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_param_rules_fsdp_on_inputs_tensor_on_outputs():
    mesh = sharding.abstract_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    spec = lambda path, shape: model_sharding.spec_for(path, shape, mesh)  # noqa: E731
    assert spec("layers_0/attn/q_proj/kernel", (128, 4, 32)) == P("fsdp", "tensor", None)
    assert spec("layers_0/attn/o_proj/kernel", (4, 32, 128)) == P("tensor", None, "fsdp")
    assert spec("layers_3/mlp/gate/kernel", (128, 384)) == P("fsdp", "tensor")
    assert spec("layers_3/mlp/down/kernel", (384, 128)) == P("tensor", "fsdp")
    assert spec("embed/embedding", (256, 128)) == P("tensor", "fsdp")
    assert spec("layers_0/attn_norm/scale", (128,)) == P(None)
    # Moments mirror their params through the embedded path; counters and FP8 histories replicate.
    assert spec("opt_state/inner_state/0/1/0/mu/layers_3/mlp/gate/kernel", (128, 384)) == P("fsdp", "tensor")
    assert spec("opt_state/inner_state/0/1/0/count", ()) == P()
    assert spec("fp8_state/layers_0/mlp/up/kernel/lhs/history", (16,)) == P(None)
    # A pre-quantized kernel's data and block scales follow the kernel.
    assert spec("layers_3/mlp/gate/kernel/scale", (1, 3)) == P(None, None)  # 1 block row: not divisible
    assert spec("layers_3/mlp/gate/kernel_scale", (2, 4)) == P("fsdp", "tensor")


def test_prequantized_weights_shard_data_and_block_scales_together():
    import mpx

    mesh = sharding.abstract_mesh({"data": 1, "fsdp": 2, "tensor": 2})
    # serve/quantize.py: an o_proj kernel in its 2-D (H*K, D) view, 128x128 block scales.
    q = mpx.quantize(jnp.ones((256, 256)), "e4m3", mpx.Blocks((128, 128)))
    specs = model_sharding.tree_specs({"layers_0": {"attn": {"o_proj": {"kernel": q}}}}, mesh)["layers_0"]["attn"]
    assert specs["o_proj"]["kernel"].data == P("tensor", "fsdp")  # like the 3-D o_proj rule
    assert specs["o_proj"]["kernel"].scale == P("tensor", "fsdp")  # 2 x 2 blocks: one per shard
    small = mpx.quantize(jnp.ones((128, 256)), "e4m3", mpx.Blocks((128, 128)))  # 1 x 2 blocks
    spec = model_sharding.tree_specs({"mlp": {"up": {"kernel": small}}}, mesh)["mlp"]["up"]["kernel"]
    assert spec.data == P("fsdp", "tensor") and spec.scale == P(None, "tensor")  # 1 block row: replicated


def test_rules_drop_axes_that_do_not_divide_or_are_taken():
    mesh = sharding.abstract_mesh({"data": 1, "fsdp": 4, "tensor": 4})
    # 2 kv heads cannot be split 4 ways: replicated along tensor.
    assert model_sharding.spec_for("layers_0/attn/k_proj/kernel", (64, 2, 16), mesh) == P("fsdp", None, None)
    # Experts on fsdp (expert parallelism); the embed dim then skips the taken fsdp axis.
    assert model_sharding.spec_for("layers_0/moe/experts/up/kernel", (8, 64, 128), mesh) == P("fsdp", None, "tensor")
    # 6 experts do not divide by 4: the embed dim takes fsdp instead.
    assert model_sharding.spec_for("layers_0/moe/experts/up/kernel", (6, 64, 128), mesh) == P(None, "fsdp", "tensor")
    assert sharding.logical_to_spec(("batch", "seq", "act_embed"), (8, 16, 64), mesh) == P("fsdp", None, None)
    with pytest.raises(ValueError, match="do not match shape"):
        sharding.logical_to_spec(("batch",), (8, 16), mesh)


def test_layout_rejects_unknown_grad_comm():
    with pytest.raises(ValueError, match="grad_comm must be one of 'f32', 'bf16'; got 'fp8'"):
        model_sharding.Layout(sharding.make_mesh(), "fp8")


def test_mpx_layout_needs_a_model_table_and_mpx_imports_no_model():
    with pytest.raises(TypeError, match="param_axes"):
        sharding.Layout(sharding.make_mesh())
    table = (("*/kernel", ("embed", "mlp")),)
    mesh = sharding.abstract_mesh({"fsdp": 2, "tensor": 2})
    assert sharding.spec_for("a/kernel", (8, 8), mesh, table) == P("fsdp", "tensor")
    assert sharding.spec_for("a/kernel", (8, 8), mesh, ()) == P(None, None)
    imports = [f"{path}: {line.strip()}" for path in sorted((ROOT / "mpx").rglob("*.py"))
               for line in path.read_text().splitlines()
               if line.lstrip().startswith(("import ", "from ")) and line.split()[1].split(".")[0]
               in ("models", "store", "train", "serve")]
    assert imports == []


def test_batch_rows_of_a_single_process_are_the_whole_batch():
    sh = sharding.batch_sharding(sharding.make_mesh())
    assert sharding.process_rows(sh, (8, 16)) == slice(0, 8)
    batch = sharding.global_batch({"x": np.arange(16).reshape(8, 2)}, sharding.make_mesh(), 8)
    np.testing.assert_array_equal(np.asarray(batch["x"]), np.arange(16).reshape(8, 2))


def test_collectives_parses_compiled_hlo():
    text = ("%a = f32[4]{0} all-reduce(%x), replica_groups={}\n"
            "%b = (bf16[2]{0}, f32[2]{0}) all-gather-start(%y)\n%c = f32[] add(%d, %e)")
    assert sharding.collectives(text) == {("all-reduce", "f32"): 1, ("all-gather", "bf16"): 1,
                                          ("all-gather", "f32"): 1}


# --------------------------------------------------------------------------- 8 devices


def _rel_l2(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["data8", "fsdp4_tensor2", "data2_tensor4"])
def test_loss_and_gradients_match_one_device(worker, mesh):
    res, grads = worker["results"], worker["grads"]
    assert res["device_count"] == 8
    ref_loss = res["one_device"]["loss"]
    assert abs(res[mesh]["loss"] - ref_loss) <= BF16_EPS * abs(ref_loss)
    paths = [k.split(":", 1)[1] for k in grads if k.startswith("one_device:")]
    assert len(paths) == 11  # embed, 3 norms, q/k/v/o, gate/up/down
    for path in paths:
        ref, got = grads[f"one_device:{path}"], grads[f"{mesh}:{path}"]
        assert got.shape == ref.shape and got.dtype == np.float32
        assert _rel_l2(got, ref) <= BF16_EPS, (mesh, path, _rel_l2(got, ref))


@pytest.mark.slow
def test_gradient_reductions_are_f32(worker):
    for mesh in ("data8", "fsdp4_tensor2", "data2_tensor4"):
        counts = worker["results"][mesh]["collectives"]
        assert any(k.startswith(("all-reduce", "reduce-scatter")) for k in counts), counts
        # Integer collectives are indices and maxima: the amax of a bf16 tile reduces as
        # its uint16 bit patterns (`mpx.scales.compute_amax`), exactly.
        float_types = {k.split(":")[1] for k in counts} - {"s32", "u32", "u16", "pred"}
        assert float_types == {"f32"}, (mesh, counts)


@pytest.mark.slow
def test_bf16_communication_accumulates_in_f32(worker):
    # The f32 mean of the bf16-rounded replica gradients, rounded once to bf16: at most
    # one bf16 ulp off (the f32 sum order, then the final rounding).
    mean = worker["results"]["bf16_mean"]
    assert mean["dtype"] == "float32" and mean["max_err_in_ulps"] <= 1.0


@pytest.mark.slow
def test_per_tensor_amax_is_reduced_across_shards(worker):
    res = worker["results"]["per_tensor"]
    assert res["reduces_across_shards"] and res["scale_equal"] and res["data_equal"]
    assert res["local_amax_distinct"] > 1  # shards really hold different maxima
    assert res["global_amax"] == [res["true_amax"]] * 8


@pytest.mark.slow
def test_block_scales_need_no_communication_and_live_with_their_blocks(worker):
    res = worker["results"]["blocks"]
    assert res["collectives"] == 0 and res["scale_equal"] and res["data_equal"]
    assert res["weight_spec"] == res["scale_sharding"] == res["scale_spec_by_rule"] == "P('fsdp', 'tensor')"


@pytest.mark.slow
def test_chunked_fp8_products_move_no_data_between_devices(worker):
    """Row and column chunks interleave rows and columns, so on a mesh that shards them
    in contiguous blocks each device computes its own share of every chunk."""
    res = worker["results"]["chunked_products"]
    assert res["movement_chunked"] == res["movement_whole"] and res["same_bits"]


@pytest.mark.slow
def test_core_and_model_run_on_meshes_with_explicit_axes(worker):
    res = worker["results"]["explicit"]
    # Quantization is per row: sharded rows give the same bits, sharded like the input.
    assert res["quant_data_equal"] and res["quant_scale_equal"]
    assert res["quant_specs"] == ["P('data', 'tensor')"] * 2
    # The FP8 dot is typed as lax.dot_general's, and so are its gradients (as their inputs).
    assert res["dot_out_spec"] == "P('data', 'tensor')"
    assert res["dot_grad_specs"] == ["P('data', None)", "P(None, 'tensor')"]
    assert res["dot_loss"][0] == res["dot_loss"][1]
    assert max(res["dot_grad_rel"]) < 1e-6  # wgrad's token sum is split across shards: f32 order only
    # A train step's loss and gradients under the fp8 preset, the mesh only in the types.
    ref, typed = res["model_loss"]
    assert abs(typed - ref) <= 1e-6 * abs(ref)
    assert res["model_grad_rel"] < BF16_EPS  # a reordered sum may flip a bf16 / E4M3 rounding


def test_scales_are_sharded_like_their_data_where_shards_hold_whole_blocks():
    from mpx.sharding import explicit

    mesh = sharding.abstract_mesh({"data": 4, "tensor": 2})
    assert explicit.fitted(P("data", "tensor"), (64, 4), mesh) == P("data", "tensor")
    assert explicit.fitted(P("data", "tensor"), (64, 3), mesh) == P("data", None)
    assert explicit.fitted(P(("data", "tensor"), None), (8, 5), mesh) == P(("data", "tensor"), None)
    assert explicit.fitted(P(("data", "tensor"), None), (4, 5), mesh) == P("data", None)  # the prefix that divides
    assert explicit.fitted(P(("tensor", "data"), None), (6, 5), mesh) == P("tensor", None)
    assert explicit.fitted(P("data", "tensor"), (2, 3), mesh) == P(None, None)
    assert explicit.fitted(P("data"), (8, 2), mesh) == P("data", None)  # short specs pad with None


@pytest.mark.slow
def test_state_is_sharded_consistently_and_planned_exactly(worker):
    res = worker["results"]["sharded_state"]
    assert res["q_proj"] == res["q_proj_mu"] == "P('fsdp', 'tensor', None)" and res["mu_dtype"] == "bfloat16"
    assert res["counters"] == ["P()"]
    assert res["measured_params"] == res["plan_params"]
    assert res["measured_optimizer"] == res["plan_optimizer"]


@pytest.mark.slow
def test_shard_cache_splits_batch_and_kv_heads(worker):
    res = worker["results"]["cache"]
    assert res["spec"] == "P(('data', 'fsdp'), None, 'tensor', None)"
    assert res["shard_shape"] == [2, 32, 1, 32]  # (8 / 4, 32, 2 / 2, 32)


@pytest.mark.slow
def _flat_state(state) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v, np.float32) for p, v in jax.tree_util.tree_leaves_with_path(state)
            if jax.tree_util.keystr(p).startswith(("['params']", "['opt_state']"))}


def _norm(tree: dict, prefix: str) -> float:
    return float(np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for k, v in tree.items() if k.startswith(prefix))))


def _diff(a: dict, b: dict, prefix: str) -> float:
    return float(np.sqrt(sum(np.sum(np.square(a[k] - b[k], dtype=np.float64)) for k in a if k.startswith(prefix))))


# Bound of the cross-mesh state difference, relative: the meshes differ in reduction
# order (f32, a few f32 ulps per gradient) and mesh A communicates gradients in bf16 (one
# bf16 rounding, eps/2 relative, per element per step); the bf16 moments and compute copies
# round again each step. Each step adds at most ~eps_bf16 of relative error, so after
# STEPS steps the relative L2 difference stays under STEPS * eps_bf16 (~0.047 for 6).
# What it must catch is far larger: a gradient scaled x2 (or not averaged over 2 replicas)
# doubles mu and quadruples nu (relative error 1 and 3, no clip normalizes it away); a
# moment reset at the cut leaves mu with 1 - 0.9**3 = 27% and nu with 1 - 0.95**3 = 14% of
# their mass and restarts bias correction, which changes the update of each resumed step by
# O(1) (Adam's first step moves every weight by ~lr), i.e. tens of percent of the motion.
def test_checkpoint_from_one_mesh_resumes_on_another(worker):
    # Saved under (data=8, bf16 gradient communication), resumed under (fsdp=4, tensor=2, f32).
    from store import checkpoint as ckpt

    res, single = worker["results"]["reshard"], worker["results"]["single_losses"]
    steps = len(single)
    assert res["final_step"] == res["restored_step"] == steps == 6 and len(res["resumed"]) == 3
    assert res["skipped"] == 0
    tol = steps * BF16_EPS
    np.testing.assert_allclose(res["resumed"], res["straight"][3:], rtol=tol)
    np.testing.assert_allclose(res["straight"], single, rtol=tol)
    ref = _flat_state(ckpt.restore(worker["results"]["single_dir"], steps)[0])
    cut = _flat_state(ckpt.restore(worker["results"]["single_dir"], 3)[0])
    # The resumed steps (lr at its 1e-2 peak) moved the params by far more than the bound.
    motion = _diff(ref, cut, "['params']")
    assert motion > 0.02 * _norm(ref, "['params']"), motion
    for run in ("straight", "resumed"):
        got = {k.split(":", 1)[1]: v for k, v in worker["reshard"].items() if k.startswith(run + ":")}
        assert got.keys() == ref.keys()
        rel = {"params": _diff(got, ref, "['params']") / motion}  # relative to the resumed steps' motion
        for moment in ("mu", "nu"):
            prefix = "['opt_state']['inner_state'][0][0]['" + moment + "']"
            assert _norm(ref, prefix) > 0, prefix
            rel[moment] = _diff(got, ref, prefix) / _norm(ref, prefix)
        assert all(r <= tol for r in rel.values()), (run, rel, tol)
        counts = [int(v) for k, v in got.items() if k.endswith("['count']")]
        assert counts and all(c == steps for c in counts), counts


def test_sharded_generation_produces_the_same_tokens(worker):
    gen = worker["results"]["generation"]
    assert gen["q_proj_devices"] == 8 and "tensor" in gen["q_proj_spec"]
    assert "data" in gen["cache_spec"]  # batch rows of the KV cache split across replicas
    assert gen["sharded"] == gen["reference"]
    assert all(len(tokens) == 20 for tokens in gen["reference"])
