"""8-device checks for tests/test_sharding.py, run in a subprocess with 8 CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_worker.py OUT_DIR {grads,loop}

The pytest process keeps its single CPU device (other tests assume it), so everything
that needs a multi-device mesh runs here and writes OUT_DIR/<group>.json (and
OUT_DIR/grads.npz, OUT_DIR/reshard.npz), which the parent compares. The single-device
reference of the gradient checks runs here too, under the same XLA flags.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import mpx  # noqa: E402
import mpx.sharding  # noqa: E402
from models import config as model_config  # noqa: E402
from models import plan as plan_lib  # noqa: E402
from models import sharding  # noqa: E402
from models import transformer  # noqa: E402
from store import checkpoint as ckpt  # noqa: E402
from train import config as config_lib  # noqa: E402
from train import loop  # noqa: E402
from train import step as step_lib  # noqa: E402

# Meshes whose loss and gradients must match one device: name -> (sizes, grad_comm).
MESHES = {
    "one_device": ({"data": 1}, "f32"),  # the reference (devices[:1])
    "data8": ({"data": 8}, "f32"),
    "fsdp4_tensor2": ({"fsdp": 4, "tensor": 2}, "f32"),
    "data2_tensor4": ({"data": 2, "tensor": 4}, "f32"),
}
BATCH, SEQ = 16, 64
MICRO = ["model.n_layers=1", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=128",
         "data.seq_len=32", "data.batch_size=8", "eval_every=0", "log_every=1", "checkpoint.every=2",
         "precision=bf16", f"data.source={Path(__file__).resolve()}", "data.eval_fraction=0"]
# The cross-mesh resume run: past warmup at a real learning rate, cut after step 3, and no
# clipping (a clip would normalize away a wrong gradient scale before the moments see it).
RESHARD_STEPS, RESHARD_CUT = 6, 3
RESHARD = MICRO + [f"steps={RESHARD_STEPS}", f"checkpoint.every={RESHARD_CUT}", "optimizer.learning_rate=1e-2",
                   "optimizer.warmup_steps=2", "optimizer.clip_norm=null"]


def case():
    """(model, state init fn, batch) of the gradient checks: one FP8 layer, GQA."""
    cfg = model_config.ModelConfig(d_model=128, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=256, max_seq_len=SEQ)
    tx = mpx.optim.build("adamw", 1e-3, moment_dtype="bf16")
    keys = jax.random.split(jax.random.key(7), 2)
    batch = {k: np.asarray(jax.random.randint(key, (BATCH, SEQ), 0, cfg.vocab_size), np.int32)
             for k, key in zip(("inputs", "targets"), keys)}
    return cfg, tx, batch


def initial_state():
    """The case's train state on one device (each mesh reshards it with device_put)."""
    cfg, tx, _ = case()
    model = transformer.Transformer(cfg, mpx.policy.preset("fp8"))
    example = jnp.zeros((1, 8), jnp.int32)
    init = lambda: step_lib.init_state(model, tx, mpx.optim.NoOpLossScale(), 0, example)  # noqa: E731
    return jax.jit(init)()


def loss_and_grads(state, sizes: dict, grad_comm: str = "f32", devices=None):
    """Loss, gradients (numpy by path), compiled HLO and sharded state of one gradient step."""
    cfg, _, batch = case()
    devices = jax.devices()[:math.prod(sizes.values())] if devices is None else devices
    layout = sharding.Layout(sharding.make_mesh(sizes, devices), grad_comm)
    model = transformer.Transformer(cfg, mpx.policy.preset("fp8"), constrain=layout.constrain)
    shardings = layout.shardings(state)
    state = jax.device_put(state, shardings)
    batch_sh = {k: layout.batch_sharding() for k in batch}
    compiled = jax.jit(step_lib.make_grad_fn(model, 1, layout), in_shardings=(shardings, batch_sh)).lower(
        state, batch).compile()
    aux, grads = compiled(state, jax.device_put(batch, batch_sh))
    flat = {sharding.path_str(p): np.asarray(g) for p, g in jax.tree_util.tree_leaves_with_path(grads)}
    return float(aux["metrics"]["loss"]), flat, compiled.as_text(), state


def _device0_bytes(tree) -> int:
    """Bytes device 0 holds of a tree of sharded arrays (measured from its shards)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        total += sum(s.data.nbytes for s in leaf.addressable_shards if s.device == jax.devices()[0])
    return total


def check_meshes(out: Path, results: dict) -> None:
    grads, state = {}, initial_state()
    for name, (sizes, comm) in MESHES.items():
        loss, flat, hlo, sharded = loss_and_grads(state, sizes, comm)
        grads.update({f"{name}:{k}": v for k, v in flat.items()})
        counts = sharding.collectives(hlo)
        results[name] = {"loss": loss, "collectives": {f"{op}:{d}": n for (op, d), n in counts.items()}}
        if name == "fsdp4_tensor2":
            check_sharded_state(sharded, results)
    np.savez(out / "grads.npz", **grads)


def check_sharded_state(state, results: dict) -> None:
    """Moments shard like their params; the plan's per-device bytes are the measured ones."""
    q = state.params["layers_0"]["attn"]["q_proj"]["kernel"]
    mu = state.opt_state.inner_state[0][0].mu["layers_0"]["attn"]["q_proj"]["kernel"]
    counters = [str(x.sharding.spec) for x in jax.tree.leaves(state.opt_state) if x.ndim == 0]
    cfg, tx, _ = case()
    p = plan_lib.plan(cfg, mpx.policy.preset("fp8"), q.sharding.mesh, tx=tx)
    results["sharded_state"] = {
        "q_proj": str(q.sharding.spec), "q_proj_mu": str(mu.sharding.spec), "mu_dtype": str(mu.dtype),
        "counters": sorted(set(counters)),
        "measured_params": _device0_bytes(state.params), "plan_params": p.params,
        "measured_optimizer": _device0_bytes(state.opt_state), "plan_optimizer": p.optimizer}


def check_per_tensor_amax(out: Path, results: dict) -> None:
    """Per-tensor scale of an fsdp x tensor sharded operand = the single-device one."""
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    x = jax.random.normal(jax.random.key(1), (64, 256)) * jnp.linspace(0.1, 3.0, 256)
    xs = jax.device_put(x, NamedSharding(mesh, P("fsdp", "tensor")))
    quant = jax.jit(lambda v: mpx.quantize(v, "e4m3", mpx.PerTensor()))
    ref, got = quant(x), quant(xs)
    counts = sharding.collectives(quant.lower(xs).compile().as_text())
    # Inside shard_map each shard only sees its part: the local amax differs, global_amax does not.
    local = jax.shard_map(lambda v: jnp.max(jnp.abs(v)).reshape(1, 1), mesh=mesh, in_specs=P("fsdp", "tensor"),
                          out_specs=P("fsdp", "tensor"))(xs)
    glob = jax.shard_map(lambda v: mpx.sharding.global_amax(v, ("fsdp", "tensor")).reshape(1, 1), mesh=mesh,
                         in_specs=P("fsdp", "tensor"), out_specs=P("fsdp", "tensor"))(xs)
    results["per_tensor"] = {
        "scale_equal": bool(np.array_equal(np.asarray(ref.scale), np.asarray(got.scale))),
        "data_equal": bool(np.array_equal(np.asarray(ref.data).view(np.uint8), np.asarray(got.data).view(np.uint8))),
        "reduces_across_shards": any(op == "all-reduce" for op, _ in counts),
        "local_amax_distinct": int(len(np.unique(np.asarray(local)))),
        "global_amax": np.asarray(glob).ravel().tolist(), "true_amax": float(jnp.max(jnp.abs(x))),
    }


def check_block_scales(out: Path, results: dict) -> None:
    """128x128 block scales of a sharded weight: no communication, scales live with blocks."""
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    w = jax.random.normal(jax.random.key(2), (512, 256))
    spec = sharding.spec_for("layers_0/mlp/up/kernel", w.shape, mesh)
    ws = jax.device_put(w, NamedSharding(mesh, spec))
    quant = jax.jit(lambda v: mpx.quantize(v, "e4m3", mpx.Blocks((128, 128))))
    ref, got = quant(w), quant(ws)
    scale_spec = sharding.spec_for("layers_0/mlp/up/kernel_scale", got.scale.shape, mesh)
    results["blocks"] = {
        "weight_spec": str(spec), "scale_spec_by_rule": str(scale_spec),
        "scale_sharding": str(got.scale.sharding.spec),
        "collectives": len(sharding.collectives(quant.lower(ws).compile().as_text())),
        "scale_equal": bool(np.array_equal(np.asarray(ref.scale), np.asarray(got.scale))),
        "data_equal": bool(np.array_equal(np.asarray(ref.data).view(np.uint8), np.asarray(got.data).view(np.uint8))),
    }


def check_chunked_products(out: Path, results: dict) -> None:
    """DeepSeekV3 products split into row chunks (forward, dgrad) and wgrad's column
    chunks, on a (data=4, tensor=2) mesh: the chunks move no data between devices and
    give the bits of the unchunked products."""
    mesh = sharding.make_mesh({"data": 4, "tensor": 2})
    put = lambda v, *spec: jax.device_put(v, NamedSharding(mesh, P(*spec)))  # noqa: E731
    keys = jax.random.split(jax.random.key(5), 3)
    x = put(jax.random.normal(keys[0], (4096, 256)).astype(jnp.bfloat16), "data", None)
    w = put(jax.random.normal(keys[1], (256, 1024)) * 0.05, None, "tensor")
    g = put(jax.random.normal(keys[2], (4096, 1024)).astype(jnp.bfloat16), "data", "tensor")

    def step(x, w, g, target):
        y, vjp = jax.vjp(lambda x, w: mpx.dot_general(x, w, (((1,), (0,)), ((), ())), recipe="deepseek_v3",
                                                      preferred_element_type=jnp.bfloat16, target=target), x, w)
        return (y, *vjp(g))

    runs = {}
    for name, target in (("whole", mpx.target.Target("cpu", row_chunk=1 << 30, col_chunk=1 << 30)),
                         ("chunked", mpx.target.Target("cpu"))):
        fn = jax.jit(functools.partial(step, target=target))
        moved = sharding.collectives(fn.lower(x, w, g).compile().as_text())
        runs[name] = ({f"{op} {dtype}": n for (op, dtype), n in moved.items() if op != "all-reduce"},
                      [np.asarray(v) for v in fn(x, w, g)])
    results["chunked_products"] = {
        "movement_whole": runs["whole"][0], "movement_chunked": runs["chunked"][0],
        "same_bits": all(np.array_equal(_bits(a), _bits(b)) for a, b in zip(runs["whole"][1], runs["chunked"][1])),
    }


def _explicit_mesh():
    """A 4 x 2 mesh with Explicit axes (`jax.make_mesh`'s default): shardings in types."""
    explicit = (jax.sharding.AxisType.Explicit,) * 2
    return jax.make_mesh((4, 2), ("data", "tensor"), axis_types=explicit)


def _bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.uint8 if a.dtype.itemsize == 1 else np.uint16 if a.dtype.itemsize == 2 else np.uint32)


def check_explicit_axes(out: Path, results: dict) -> None:
    """The core and the reference model on a mesh with Explicit axes, against one device:
    block quantization (sharded like its input), an FP8 dot with its gradients (sharded
    like lax.dot_general's; the mesh in context, `jax.set_mesh`), and a train step's loss
    and gradients under the fp8 preset (the mesh only in the tokens' type)."""
    mesh = _explicit_mesh()
    put = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))  # noqa: E731
    x = jax.random.normal(jax.random.key(7), (64, 512), jnp.bfloat16) * jnp.linspace(0.1, 3.0, 512).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(8), (512, 256)) * 0.05
    quant = jax.jit(lambda v: mpx.quantize(v, "e4m3", mpx.Blocks((1, 128))))
    q_ref, q = quant(x), quant(put(x, "data", "tensor"))
    dims = (((1,), (0,)), ((), ()))
    dot_loss = lambda a, b: jnp.sum(mpx.dot_general(a, b, dims, recipe="deepseek_v3",  # noqa: E731
                                                    preferred_element_type=jnp.float32) ** 2)
    dot_grads = jax.jit(jax.value_and_grad(dot_loss, argnums=(0, 1)))
    out_spec = jax.jit(lambda a, b: mpx.dot_general(a, b, dims, recipe="deepseek_v3")).lower(
        put(x, "data"), put(w, None, "tensor")).out_info.sharding.spec
    (l_ref, g_ref) = dot_grads(x, w)
    with jax.set_mesh(mesh):  # the mesh in context; the model below has it only in its types
        (l_got, g_got) = dot_grads(put(x, "data"), put(w, None, "tensor"))
    results["explicit"] = {
        "quant_data_equal": bool(np.array_equal(_bits(q_ref.data), _bits(q.data))),
        "quant_scale_equal": bool(np.array_equal(np.asarray(q_ref.scale), np.asarray(q.scale))),
        "quant_specs": [str(q.data.sharding.spec), str(q.scale.sharding.spec)],
        "dot_out_spec": str(out_spec), "dot_loss": [float(l_ref), float(l_got)],
        "dot_grad_rel": [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                         / float(jnp.max(jnp.abs(a))) for a, b in zip(g_ref, g_got)],
        "dot_grad_specs": [str(g.sharding.spec) for g in g_got],
    }
    cfg = model_config.ModelConfig(vocab_size=256, d_model=128, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=256,
                                   max_seq_len=SEQ)
    model = transformer.Transformer(cfg, mpx.policy.preset("fp8"))
    tokens = jax.random.randint(jax.random.key(9), (8, SEQ), 0, cfg.vocab_size)
    params = model.init(jax.random.key(10), tokens[:1])
    loss = lambda p, t: jnp.mean(model.apply(p, t)[0].astype(jnp.float32))  # noqa: E731
    grads = jax.jit(jax.value_and_grad(loss))
    (l_ref, g_ref) = grads(params, tokens)
    (l_typed, g_typed) = grads(params, put(tokens, "data"))  # the mesh only in the tokens' type
    rel = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) for a, b in zip(jax.tree.leaves(g_ref),
                                                                                    jax.tree.leaves(g_typed)))
    results["explicit"].update({"model_loss": [float(l_ref), float(l_typed)], "model_grad_rel": rel})


def check_mean_over_replicas(out: Path, results: dict) -> None:
    """bf16 communication, f32 accumulation: equals the f32 mean of bf16-rounded parts, rounded."""
    mesh = sharding.make_mesh({"data": 8})
    stacked = {"layers_0": {"mlp": {"up": {"kernel": jax.random.normal(jax.random.key(3), (8, 64, 32))}}}}
    stacked = jax.device_put(stacked, NamedSharding(mesh, P("data")))
    got = jax.jit(lambda s: sharding.mean_over_replicas(s, mesh, "bf16"))(stacked)
    parts = np.asarray(stacked["layers_0"]["mlp"]["up"]["kernel"]).astype(jnp.bfloat16).astype(np.float64)
    want = parts.mean(axis=0).astype(jnp.bfloat16)  # the exact mean, rounded once
    g = np.asarray(got["layers_0"]["mlp"]["up"]["kernel"])
    ulp = np.abs(np.spacing(want).astype(np.float64))  # one bf16 ulp at the result
    want = want.astype(np.float64)
    results["bf16_mean"] = {"dtype": str(g.dtype), "max_err_in_ulps": float(np.max(np.abs(g - want) / ulp)),
                            "sharding": str(got["layers_0"]["mlp"]["up"]["kernel"].sharding.spec)}


def check_cache(out: Path, results: dict) -> None:
    cfg = model_config.preset("tiny")
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    cache = transformer.init_cache(cfg, batch=8, length=32)
    sharded = sharding.shard_cache(cache, mesh)
    results["cache"] = {"spec": str(sharded[0]["k"].sharding.spec),
                        "shard_shape": list(sharded[0]["k"].addressable_shards[0].data.shape)}


def check_sharded_generation(out: Path, results: dict) -> None:
    """Greedy tokens of an FP8 model on (data=2, tensor=4) equal the unsharded ones."""
    from serve import engine as engine_lib

    cfg = model_config.ModelConfig(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256, max_seq_len=64)
    policy = mpx.policy.preset("fp8")
    model = transformer.Transformer(cfg, policy)
    variables = jax.jit(model.init)(jax.random.key(3), jnp.zeros((1, 8), jnp.int32))
    prompts = [[5, 9, 2, 7, 1], [3, 3, 8], [11, 12, 13, 14, 15, 16, 17], [42]]
    reference, _ = engine_lib.Engine(model, variables).generate(prompts, max_new_tokens=20)
    layout = sharding.Layout(sharding.make_mesh({"data": 2, "tensor": 4}))
    engine = engine_lib.Engine(model, variables, layout=layout)
    generated, _ = engine.generate(prompts, max_new_tokens=20)
    q_proj = engine.variables["params"]["layers_0"]["attn"]["q_proj"]["kernel"]
    tokens, lengths = engine._batch(prompts)
    _, _, cache, _ = engine._prefill(engine.variables, tokens, lengths, jax.random.key(0),
                                     sampler=engine_lib.sampling.Greedy())
    results["generation"] = {"cache_spec": str(cache[0]["k"].sharding.spec),
        "reference": [g.tokens for g in reference], "sharded": [g.tokens for g in generated],
        "q_proj_spec": str(q_proj.sharding.spec), "q_proj_devices": len(q_proj.sharding.device_set),
    }


def _flat_state(state) -> dict:
    """A restored train state's params and optimizer state as f32 numpy arrays by path."""
    return {jax.tree_util.keystr(p): np.asarray(v, np.float32) for p, v in jax.tree_util.tree_leaves_with_path(state)
            if jax.tree_util.keystr(p).startswith(("['params']", "['opt_state']"))}


def check_reshard_through_loop(out: Path, results: dict) -> None:
    """Train on mesh A, checkpoint after step 3, resume on mesh B: the state continues.

    Mesh A (data=8) also reduces its gradients with bf16 communication, mesh B
    (fsdp=4, tensor=2) in f32. The final states of both (params, moments, counts) go to
    OUT_DIR/reshard.npz as "straight:<path>" and "resumed:<path>".
    """
    run_dir = out / "reshard"
    base = RESHARD + [f"run_dir={run_dir}"]  # as test_sharding's single-device run
    mesh_a = ["mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=1", "mesh.grad_comm=bf16"]
    mesh_b = ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", "mesh.grad_comm=f32"]
    straight = loop.train(config_lib.load(ROOT / "configs" / "tiny.yaml", base + mesh_a), quiet=True)
    cfg_b = config_lib.load(ROOT / "configs" / "tiny.yaml", base + mesh_b)
    final = {f"straight:{k}": v for k, v in _flat_state(ckpt.restore(cfg_b.checkpoint_dir, RESHARD_STEPS)[0]).items()}
    shutil.rmtree(Path(cfg_b.checkpoint_dir) / str(RESHARD_STEPS))
    resumed = loop.train(cfg_b, resume_run=True, quiet=True)
    state, _ = ckpt.restore(cfg_b.checkpoint_dir)
    final.update({f"resumed:{k}": v for k, v in _flat_state(state).items()})
    np.savez(out / "reshard.npz", **final)
    results["reshard"] = {"straight": straight["losses"], "resumed": resumed["losses"],
                          "final_step": resumed["final_step"], "restored_step": int(state["step"]),
                          "skipped": straight["skipped_steps"] + resumed["skipped_steps"]}


GROUPS = {
    # One process each, so two cores work in parallel.
    "grads": (check_per_tensor_amax, check_block_scales, check_mean_over_replicas, check_cache, check_meshes,
              check_explicit_axes, check_chunked_products),
    "loop": (check_reshard_through_loop, check_sharded_generation),
}


def main(out_dir: str, group: str) -> None:
    out = Path(out_dir)
    results: dict = {"device_count": jax.device_count()}
    timings = {}
    for check in GROUPS[group]:
        t0 = time.perf_counter()
        check(out, results)
        timings[check.__name__] = round(time.perf_counter() - t0, 2)
    results[f"timings_{group}"] = timings
    (out / f"{group}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
