"""Expert-parallel checks for tests/test_moe.py, run in a subprocess with 4 CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/expert_parallel_worker.py OUT.json

The MoE block of the deepseek_v3_tiny preset with its 8 experts split over a 4-device
mesh axis (2 per device) against the same block on one device: forward output and
gradients, in fp32 and under the fp8 preset, and whether the compiled program
communicates by all-gather and reduce-scatter.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import mpx  # noqa: E402
from models import config as model_config  # noqa: E402
from models import moe  # noqa: E402


def _rel(a, b) -> float:
    return float(jnp.abs(a - b).max() / (jnp.abs(a).max() + 1e-30))


def check(policy_name: str, ep: moe.ExpertParallel) -> dict:
    cfg, policy = model_config.preset("deepseek_v3_tiny"), mpx.policy.preset(policy_name)
    single, split = moe.MoE(cfg, policy), moe.MoE(cfg, policy, expert_parallel=ep)
    x = jax.random.normal(jax.random.key(0), (4, 16, cfg.d_model))
    variables = single.init(jax.random.key(1), x)
    same_params = jax.tree.structure(variables) == jax.tree.structure(split.init(jax.random.key(1), x))
    forward = [jax.jit(lambda v, x, m=m: m.apply(v, x)[0])(variables, x) for m in (single, split)]
    grads = [jax.jit(jax.grad(lambda v, x, m=m: jnp.sum(m.apply(v, x)[0] ** 2)))(variables, x)
             for m in (single, split)]
    text = jax.jit(lambda v, x: split.apply(v, x)[0]).lower(variables, x).compile().as_text()
    return {"same_params": same_params, "forward": _rel(*forward),
            "grads": max(_rel(a, b) for a, b in zip(*map(jax.tree.leaves, grads))),
            "expert_grad_nonzero": float(jnp.abs(grads[1]["params"]["experts"]["gate"]["kernel"]).max()) > 0,
            "all_gather": "all-gather" in text, "reduce_scatter": "reduce-scatter" in text}


def train_steps(ep: moe.ExpertParallel, steps: int = 2) -> dict:
    """Losses of a few fp8 train steps of the whole model, experts split or not."""
    from models import transformer
    from train import step as step_lib
    cfg, policy = model_config.preset("deepseek_v3_tiny"), mpx.policy.preset("fp8")
    tokens = jax.random.randint(jax.random.key(2), (4, 32), 0, cfg.vocab_size)
    losses = {}
    for name, split in (("single", None), ("split", ep)):
        model = transformer.Transformer(cfg, policy, expert_parallel=split)
        tx = mpx.optim.build("adamw", 1e-3, moment_dtype="bf16")
        state = step_lib.init_state(model, tx, mpx.optim.NoOpLossScale(), 0, tokens)
        step = jax.jit(step_lib.make_train_step(model, tx, moe_bias_rate=1e-3))
        losses[name] = []
        for _ in range(steps):
            state, metrics = step(state, {"inputs": tokens, "targets": tokens})
            losses[name].append(float(metrics["loss"]))
    return losses


def main(out: str) -> None:
    ep = moe.ExpertParallel(Mesh(np.array(jax.devices()[:4]), ("data",)), "data")
    result = {name: check(name, ep) for name in ("fp32", "fp8")}
    result["train_losses"] = train_steps(ep)
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
