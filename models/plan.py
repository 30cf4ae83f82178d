"""Per-device memory plan of a training run on a mesh, on paper (nothing is allocated).

    python -m models.plan --model deepseek_v3_671b --mesh data=8,fsdp=32,tensor=8 --policy fp8 \\
        --batch 256 --seq 4096

prints, per device, the bytes of

* params: the f32 master weights, each sharded by the reference model's rules
  (`models.sharding.PARAM_AXES`);
* optimizer state: the training optimizer's state (bf16 Adam moments shard like their
  params; counters replicated);
* gradients: one f32 gradient per parameter, sharded like its parameter;
* FP8 scale state: amax histories of delayed/static recipes (replicated);
* activations: an estimate (below);
* KV cache: (B, S, G, K) keys and values per layer in bf16 for `--batch` sequences of
  `--seq` tokens, sharded like `mpx.sharding.shard_cache` (batch on data x fsdp,
  kv heads on tensor).

Params, optimizer state, gradients and scale state come from `jax.eval_shape` of the
real initializers and the real sharding rules, so they are exact: the per-device
bytes of an initialized, sharded train state equal them (tests/test_plan.py checks
the tiny and small models).

Activation estimate: the tensors each block saves for its backward pass, per token,
in the dtypes the policy gives each layer, for the B*T / (data * fsdp) tokens of one
device (one microbatch); tensors in the tensor-parallel region (q, k, v, attention
probabilities, FFN hidden) are divided by the tensor axis size. Per block: the f32
block input and mid-block residual, the two norm outputs (as the next matmul keeps
them: its compute dtype, or under an FP8 recipe one byte, the E4M3 copy it keeps with
`fp8_residuals`, else the norm's output dtype), q, k, v, the softmax's two f32 row statistics per
query head (the probabilities are recomputed in the backward pass: one query block's f32
probabilities, their gradient and its bf16 copy, T per query per head, are live at a
time; with an FP8 recipe on QK^T or PV the f32 probabilities and their compute-dtype
copy are saved per block instead), the attention output and the FFN's gate, up (one
byte each when the down projection's recipe asks for it, `DeepSeekV3.swiglu_residuals`)
and hidden (none when the down projection recomputes it, `mpx.dot.recomputes_swiglu`;
for MoE: the router's f32 probabilities and top_k routed copies, i.e. capacity-style
dispatch). q/k norms (Qwen3, Gemma) keep q and k as projected, post-norms (Gemma) the
attention and FFN outputs; GeGLU keeps what SwiGLU does. Remat: a rematerialized block keeps only its f32 input, plus one block's
full set while it is recomputed. The final norm and the f32 logits and log-softmax
(vocabulary on tensor) are added once. It ignores XLA's fusion and buffer reuse, so
read it as an upper-bound-style estimate within a small factor, not a measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from models import config as model_config
from models import sharding, transformer
from mpx import attention
from mpx import config as config_io
from mpx import dot as dot_lib
from mpx import optim
from mpx import policy as policy_lib
from mpx import sharding as sharding_lib

MODELS_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"
ROWS = (("params", "params (f32 masters)"), ("optimizer", "optimizer state"), ("gradients", "gradients (f32)"),
        ("scale_state", "FP8 scale state"), ("activations", "activations (estimate)"), ("kv_cache", "KV cache"))


def per_device_bytes(tree: Any, mesh, dtype=None) -> int:
    """Bytes one device holds of a state tree of the reference model, sharded by its rules.

    Args:
      tree: arrays or ShapeDtypeStructs.
      mesh: a Mesh or AbstractMesh.
      dtype: count every leaf in this dtype instead of its own (e.g. f32 gradients).
    """
    return sharding_lib.per_device_bytes(tree, mesh, sharding.PARAM_AXES, dtype=dtype)


def _bytes(dtype) -> int:
    return np.dtype(dtype).itemsize


def _saved_input(precision, input_dtype) -> int:
    # An FP8 dot keeps its quantized input (one byte per element, `fp8_residuals`) or the
    # unquantized one; a plain dot keeps the cast copy.
    if precision.recipe is None:
        return _bytes(precision.compute_dtype)
    return 1 if precision.recipe.fp8_residuals else _bytes(input_dtype)


def _fused_attention(qk, pv) -> bool:
    """Whether attention runs `mpx.attention.softmax_attention` (no recipe on QK^T or PV),
    which keeps no probabilities and recomputes them one layer at a time."""
    return qk.recipe is None and pv.recipe is None


def _attention_scratch(qk, pv, heads: float, seq: int) -> float:
    """Bytes per token the fused attention's backward holds for one layer: one query
    block's recomputed f32 probabilities and their gradient, and the gradient's qk-dtype
    copy (`mpx.attention.QUERY_BLOCK` queries at a time)."""
    if not _fused_attention(qk, pv):
        return 0.0
    return heads * seq * (8 + _bytes(qk.output_dtype)) * min(attention.QUERY_BLOCK, seq) / seq


def _swiglu_input(down, input_dtype) -> int:
    # SwiGLU keeps gate and up as FP8 tiles when its down projection's recipe asks for it,
    # else as the projections return them.
    return 1 if transformer.swiglu_residual_format(down.recipe) else _bytes(input_dtype)


def _divide(count: int, n: int) -> float:
    return count / n if count % n == 0 else count


def block_bytes_per_token(config, policy, layer: int, seq: int, tensor: int, moe: bool) -> float:
    """Bytes one block saves per token for backward (see the module doc), tensor-sharded."""
    c, at = config, lambda name: policy.resolve(f"layers_{layer}/{name}")  # noqa: E731
    d, h, g, k = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
    norm_out = at("attn_norm").output_dtype
    residual = 2 * d * 4  # f32 block input and mid-block residual
    norms = _saved_input(at("attn/q_proj"), norm_out) * d
    ffn_path = "moe/experts" if moe else "mlp"
    norms += _saved_input(at(f"{ffn_path}/up"), at("mlp_norm").output_dtype) * d
    qk, pv = at("attn/qk"), at("attn/pv")
    attn = (h * k * _bytes(qk.compute_dtype) / tensor + _divide(g * k, tensor) * (_bytes(qk.compute_dtype)
            + _bytes(pv.compute_dtype)))
    if _fused_attention(qk, pv):
        attn += h * 8 / tensor  # the softmax's f32 row max and row sum
    else:
        attn += h * seq * (4 + _bytes(pv.compute_dtype)) / tensor  # probabilities, f32 and pv copy
    attn += _saved_input(at("attn/o_proj"), pv.output_dtype) * h * k / tensor
    up, down = at(f"{ffn_path}/up"), at(f"{ffn_path}/down")
    # The down projection recomputes SwiGLU's product when its recipe allows
    # (`mpx.dot.recomputes_swiglu`): no saved input.
    down_input = 0 if dot_lib.recomputes_swiglu(down.recipe) else _saved_input(down, jnp.float32)
    hidden = (2 * _swiglu_input(down, up.output_dtype) + down_input) * c.d_ff / tensor
    if moe:
        hidden = c.top_k * (hidden + d * _saved_input(up, at("mlp_norm").output_dtype)) + 2 * c.n_experts * 4
    if c.qk_norm:  # each norm keeps its input: q and k as projected
        attn += (h * k / tensor + _divide(g * k, tensor)) * _bytes(at("attn/q_proj").output_dtype)
    if c.post_norms:  # and the post-norms the attention and FFN outputs
        norms += d * (_bytes(at("attn/o_proj").output_dtype) + _bytes(down.output_dtype))
    return residual + norms + attn + hidden


def activation_bytes(config, policy, batch: int, seq: int, mesh) -> int:
    """Estimated activation bytes per device for one forward/backward (module doc).

    Args:
      config: a `models.config.ModelConfig`.
      policy: the precision policy.
      batch, seq: global batch (sequences) and sequence length.
      mesh: Mesh or AbstractMesh.
    """
    tokens = batch * seq / sharding.batch_shards(mesh)
    tensor = mesh.shape["tensor"]
    saved, live = [], 0.0
    for layer in range(config.n_layers):
        moe = config.is_moe_layer(layer)
        full = block_bytes_per_token(config, policy, layer, seq, tensor, moe)
        qk, pv = (policy.resolve(f"layers_{layer}/attn/{name}") for name in ("qk", "pv"))
        live = max(live, _attention_scratch(qk, pv, config.n_heads / tensor, seq))
        if _is_remat(config, policy, layer, moe):
            saved.append(config.d_model * 4)
            live = max(live, full)  # one block's set is live while it is recomputed
        else:
            saved.append(full)
    head = 2 * config.d_model * 4 + 2 * 4 * _divide(config.vocab_size, tensor)  # final norm, logits, log-softmax
    return int(tokens * (sum(saved) + live + head))


def _is_remat(config, policy, layer: int, moe: bool) -> bool:
    if config.remat == "full":
        return True
    if config.remat == "non_fp8":
        probe = "moe/experts/up" if moe else "mlp/up"
        return policy.resolve(f"layers_{layer}/{probe}").recipe is None
    return False


def kv_cache_bytes(config, batch: int, seq: int, mesh, dtype=jnp.bfloat16) -> int:
    """Per-device bytes of a (B, S, G, K) key and value cache per layer (`shard_cache` layout)."""
    leaf = jax.ShapeDtypeStruct((batch, seq, config.n_kv_heads, config.head_dim), dtype)
    cache = [{"k": leaf, "v": leaf} for _ in range(config.n_layers)]
    specs = jax.tree.leaves(sharding.cache_specs(cache, mesh), is_leaf=lambda x: isinstance(x, PartitionSpec))
    return sum(sharding_lib.shard_elements(leaf.shape, spec, mesh) * _bytes(dtype) for spec in specs)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of a training run (see the module doc for how each is counted).

    Attributes:
      mesh: axis sizes.
      num_params: parameters of the model.
      batch, seq: the batch (sequences) and sequence length of the activation / KV figures.
      params, optimizer, gradients, scale_state, activations, kv_cache: bytes per device.
    """

    mesh: dict
    num_params: int
    batch: int
    seq: int
    params: int
    optimizer: int
    gradients: int
    scale_state: int
    activations: int
    kv_cache: int

    @property
    def training_total(self) -> int:
        """Everything but the KV cache (a serving figure)."""
        return self.params + self.optimizer + self.gradients + self.scale_state + self.activations

    def table(self) -> str:
        """A readable table per device (GiB, or MiB for small runs)."""
        devices = math.prod(self.mesh.values())
        shards = self.mesh.get("data", 1) * self.mesh.get("fsdp", 1)
        mesh = ", ".join(f"{k}={v}" for k, v in self.mesh.items())
        unit, scale = ("GiB", 2**30) if self.training_total >= 2**30 else ("MiB", 2**20)
        lines = [f"{self.num_params:,} parameters ({self.num_params / 1e9:.2f} B) on mesh {mesh} ({devices} devices)",
                 f"batch {self.batch} x seq {self.seq}: {self.batch * self.seq / shards:,.0f} tokens per device",
                 f"{'per device':<28}{unit:>12}"]
        for key, label in ROWS:
            lines.append(f"{label:<28}{getattr(self, key) / scale:>12.3f}")
        lines.append(f"{'training total (no cache)':<28}{self.training_total / scale:>12.3f}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready dict (bytes per device), with training_total."""
        return {**dataclasses.asdict(self), "training_total": self.training_total}


def plan(config, policy, mesh, *, batch: int | None = None, seq: int | None = None, tx=None,
         moment_dtype: str = "bf16") -> MemoryPlan:
    """The per-device memory plan of training `config` under `policy` on `mesh`.

    Args:
      config: a `models.config.ModelConfig`.
      policy: a `mpx.Policy`.
      mesh: a Mesh or AbstractMesh (`sharding.abstract_mesh`: no devices needed).
      batch: global batch in sequences (default: one per batch shard).
      seq: sequence length (default config.max_seq_len).
      tx: the optax optimizer (default: the training chain of train.loop: AdamW with a
        cosine schedule, global-norm clipping, `moment_dtype` moments, decay on matrices).
      moment_dtype: Adam moment storage when tx is None.

    Returns:
      A MemoryPlan.
    """
    batch = batch or sharding.batch_shards(mesh)
    seq = seq or config.max_seq_len
    # The chain train.loop builds from configs/tiny.yaml (the schedule adds a counter).
    tx = tx or optim.build("adamw", 1e-3, schedule="cosine", warmup_steps=1, total_steps=2, clip_norm=1.0,
                           moment_dtype=moment_dtype, weight_decay=0.1, mask=optim.matrices_only)
    model = transformer.Transformer(config, policy)
    tokens = jax.ShapeDtypeStruct((1, min(seq, 16)), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
    params, scale_state = variables["params"], variables.get("fp8_state", {})
    opt_state = jax.eval_shape(tx.init, params)
    return MemoryPlan(
        mesh=dict(mesh.shape), num_params=transformer.count_params(params), batch=batch, seq=seq,
        params=per_device_bytes(params, mesh), optimizer=per_device_bytes(opt_state, mesh),
        gradients=per_device_bytes(params, mesh, dtype=jnp.float32),
        scale_state=per_device_bytes(scale_state, mesh),
        activations=activation_bytes(config, policy, batch, seq, mesh),
        kv_cache=kv_cache_bytes(config, batch, seq, mesh),
    )


# --------------------------------------------------------------------------- CLI


def load_model_config(spec: str) -> model_config.ModelConfig:
    """A ModelConfig from a preset name, a name under configs/models/, or a YAML path.

    A YAML file holds ModelConfig fields, optionally `preset: <name>` as the base and
    `extends: other.yaml`; it is read by `mpx.config` (unknown keys are errors).

    Raises:
      ValueError: an unknown name or an unknown field (naming the allowed ones).
      FileNotFoundError: a .yaml path that does not exist.
    """
    if spec in model_config.PRESETS:
        return model_config.preset(spec)
    is_path = spec.endswith((".yaml", ".yml"))
    path = Path(spec) if is_path else MODELS_DIR / f"{spec}.yaml"
    if not path.is_file():
        if is_path:
            raise FileNotFoundError(f"model config {spec!r} not found")
        known = list(model_config.PRESETS) + sorted(p.stem for p in MODELS_DIR.glob("*.yaml"))
        raise ValueError(f"unknown model {spec!r}; known: {', '.join(known)} (or a .yaml path)")
    raw, _ = config_io.read_tree(path)
    try:
        base = _preset_fields(raw.pop("preset")) if "preset" in raw else {}
        return config_io.from_dict(model_config.ModelConfig, {**base, **raw})
    except config_io.ConfigError as e:
        raise config_io.ConfigError(f"{path}: {e}", e.key) from None


def _preset_fields(name) -> dict:
    try:
        return config_io.to_dict(model_config.preset(name))
    except ValueError as e:
        raise config_io.ConfigError(f"preset: {e}", "preset") from None


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line with exit status 2 (as
    store.cli's, which models/ may not import)."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def _parse(argv) -> argparse.Namespace:
    parser = _ArgumentParser(prog="python -m models.plan", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="preset (tiny, small, 1b, ...), configs/models name or YAML")
    parser.add_argument("--mesh", default="data=1", help="axis sizes, e.g. data=8,fsdp=32,tensor=8")
    parser.add_argument("--devices", type=int, help="device count (resolves a -1 axis)")
    parser.add_argument("--policy", default="fp8", help="precision preset or policy YAML")
    parser.add_argument("--batch", type=int, help="global batch in sequences (default: one per batch shard)")
    parser.add_argument("--seq", type=int, help="sequence length (default: the model's max_seq_len)")
    parser.add_argument("--moment-dtype", default="bf16", choices=("bf16", "f32"), help="Adam moment storage")
    parser.add_argument("--remat", choices=("none", "full", "non_fp8"), help="override the model's remat")
    parser.add_argument("--json", action="store_true", help="also print the plan as one JSON line")
    return parser.parse_args(argv)


def _check_sizes(args, mesh) -> None:
    for flag, value in (("--batch", args.batch), ("--seq", args.seq), ("--devices", args.devices)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be an integer >= 1; got {value}")
    shards = sharding.batch_shards(mesh)
    if args.batch is not None and args.batch % shards:
        raise ValueError(f"--batch {args.batch} does not split over the mesh's {shards} batch shards "
                         f"({args.mesh}); use a multiple of {shards}")


def main(argv=None) -> int:
    args = _parse(argv)
    try:
        config = load_model_config(args.model)
        if args.remat:
            config = dataclasses.replace(config, remat=args.remat)
        is_file = args.policy.endswith((".yaml", ".yml"))
        pol = policy_lib.load(args.policy) if is_file else policy_lib.preset(args.policy)
        mesh = sharding.abstract_mesh(sharding.parse_mesh(args.mesh), args.devices)
        _check_sizes(args, mesh)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = plan(config, pol, mesh, batch=args.batch, seq=args.seq, moment_dtype=args.moment_dtype)
    print(f"model {args.model}, policy {pol.name}, remat {config.remat}, Adam moments {args.moment_dtype}")
    print(result.table())
    if args.json:
        print(json.dumps(result.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
