"""Flax Linen layers that take their precision from a `Policy`, by their own module path.

Every layer has a `policy` attribute (a frozen `mpx.policy.Policy`; None means fp32) and
resolves its `Precision` from its path (`layers_3/attn/v_proj`), so the same model code
runs in fp32, bf16 or FP8 and `policy.explain` shows what each layer gets. No layer reads
a global setting.

* `Dense` / `DenseGeneral`: matmuls through `mpx.dot.dot_general`, FP8 when the
  precision has a recipe. Stateful recipes (delayed, static scaling) keep their amax
  histories in the `fp8_state` collection: apply with `mutable=["fp8_state"]` to get the
  updated histories back (and merge microbatches with `mpx.recipes.merge_amax_trees`).
* `Embed`: token embedding with `attend()` for a tied LM head.
* `RMSNorm`, `LayerNorm`: always computed in float32.
* `grouped_attention`: QK^T and PV contractions resolved at `<block>/qk` and
  `<block>/pv`, so a policy puts each in bf16 or FP8 (the fp8 presets: QK^T bf16, PV
  FP8); softmax in f32.

Serving: a `DenseGeneral` or `ExpertDense` whose params hold a `ScaledArray` kernel (FP8
data + f32 scales, see serve/quantize.py) runs the forward-only
`mpx.dot.prequantized_matmul` on it: activations quantized per the layer's recipe,
weight-only without one. A DenseGeneral kernel is stored in its 2-D (K, N) view (in
features flattened, out features flattened), an ExpertDense kernel as (E, K, F); it is
stored unpadded, so `pad_to` does not apply to it.

Alignment (seed, 128-byte rule): FP8 GEMMs want matmul dimensions that are multiples of
16. A layer under an FP8 recipe warns once, naming itself, when one is not; set
`pad_to=16` to zero-pad the contraction dimension instead.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mpx import activations
from mpx import attention as attention_lib
from mpx import dot as dot_lib
from mpx.dot import ragged as ragged_lib
from mpx import recipes as recipes_lib
from mpx.policy import Policy, Precision, preset
from mpx.scaled import ScaledArray
from mpx.scales import pad_axis_to
from mpx.sharding import explicit

__all__ = [
    "FP8_ALIGNMENT", "default_kernel_init", "module_path", "resolve_precision", "warn_misaligned", "contract",
    "contract_prequantized", "DenseGeneral", "Dense", "SwiGLUDense", "EXPERT_DIMS", "ExpertDense",
    "ExpertKernel", "grouped_matmul", "ExpertSwiGLUDense", "is_grouped_call", "LINEAR_TYPES", "linear_input",
    "Embed", "RMSNorm", "LayerNorm", "causal_mask", "attention_weights", "grouped_attention"
]

Array = jax.Array
FP8_ALIGNMENT = 16
_WARNED: set[str] = set()

default_kernel_init = nn.initializers.lecun_normal()


def module_path(module: nn.Module, *extra: str) -> str:
    """The policy path of a module: its Linen path joined with '/' (plus `extra`).

    A top-level module (empty path) is named by its `name`, else its class name.
    """
    parts = tuple(str(p) for p in module.path) or (module.name or type(module).__name__,)
    return "/".join(parts + extra)


def resolve_precision(module: nn.Module, policy: Policy | None, *extra: str, role: str | None = None) -> Precision:
    """The `Precision` the policy gives this module (fp32 preset when policy is None):
    its path (plus `extra`) of its role (`role`, else the module's own `role` attribute,
    else none; `mpx.policy.ROLES`)."""
    role = getattr(module, "role", None) if role is None else role
    return (policy or preset("fp32")).resolve(module_path(module, *extra), role)


def warn_misaligned(path: str, dims: dict[str, int]) -> None:
    """Warns once per layer when a matmul dimension is not a multiple of 16 under FP8."""
    bad = {k: v for k, v in dims.items() if v % FP8_ALIGNMENT}
    if bad and path not in _WARNED:
        _WARNED.add(path)
        warnings.warn(
            f"{path}: FP8 matmul dimension(s) {bad} are not multiples of {FP8_ALIGNMENT}; "
            f"FP8 GEMMs need 16-element (128-bit) alignment. Pass pad_to=16 to pad, or "
            f"choose aligned sizes.",
            stacklevel=3,
        )


def _pad_axis(x: Array, axis: int, multiple: int) -> Array:
    return pad_axis_to(x, axis, -(-x.shape[axis] // multiple) * multiple)


def contract(module: nn.Module, name: str, lhs: Array, rhs: Array, dimension_numbers,
             precision: Precision, *, rhs_kind: str = "weight") -> Array:
    """dot_general under `precision`, with the recipe's scale state kept in `fp8_state`.

    Returns the result in `precision.output_dtype`.
    """
    recipe = precision.recipe
    if recipe is None:
        # The result is rounded to output_dtype, so when that is the compute dtype the
        # gradient holds compute-dtype values and the backward GEMMs run in it too.
        exact = jnp.dtype(precision.output_dtype) == jnp.dtype(precision.compute_dtype)
        out = dot_lib.rounded_dot(lhs, rhs, dimension_numbers, precision.compute_dtype, precision.accum_dtype,
                                  cotangent_dtype=precision.compute_dtype if exact else None)
        return out.astype(precision.output_dtype)
    kwargs = dict(recipe=recipe, preferred_element_type=_quantized_result_dtype(precision), rhs_kind=rhs_kind)
    if not recipes_lib.is_stateful(recipe):
        out = dot_lib.dot_general(lhs, rhs, dimension_numbers, **kwargs)
        return out.astype(precision.output_dtype)
    state = module.variable("fp8_state", name, dot_lib.init_state, recipe)
    out, new_state = dot_lib.dot_general(lhs, rhs, dimension_numbers, state=state.value, **kwargs)
    if module.is_mutable_collection("fp8_state") and not module.is_initializing():
        state.value = new_state
    return out.astype(precision.output_dtype)


def _quantized_result_dtype(precision: Precision):
    """The dtype a quantized dot returns. It accumulates in f32 whatever it returns:
    asking for the output dtype rounds once, as casting its f32 result would, and the
    gradient then arrives in it (bf16: the backward pass quantizes it without a float32
    copy)."""
    f32_accum = jnp.dtype(precision.accum_dtype) == jnp.float32
    return precision.output_dtype if f32_accum else precision.accum_dtype


def contract_prequantized(module: nn.Module, name: str, lhs: Array, rhs: ScaledArray,
                          precision: Precision) -> Array:
    """lhs (..., K) or (E, M, K) times a pre-quantized weight, forward only (serving).

    Stateful recipes (static scaling) read their calibrated amax from `fp8_state`; it is
    never updated. Returns the result in `precision.output_dtype`.
    """
    recipe, state = precision.recipe, None
    if recipes_lib.is_stateful(recipe):
        state = module.variable("fp8_state", name, dot_lib.init_state, recipe).value
    out = dot_lib.prequantized_matmul(lhs, rhs, recipe=recipe, state=state, compute_dtype=precision.compute_dtype,
                                      preferred_element_type=precision.accum_dtype)
    return out.astype(precision.output_dtype)


def _kernel(module: nn.Module, init: Callable, shape: tuple[int, ...], dtype) -> Array | ScaledArray:
    """The "kernel" param, or the pre-quantized ScaledArray stored in its place (returned
    as is: its 2-D view would fail `self.param`'s shape check against `shape`)."""
    if module.has_variable("params", "kernel"):
        stored = module.get_variable("params", "kernel")
        if isinstance(stored, ScaledArray):
            return stored
    return module.param("kernel", init, shape, dtype)


def _stored_kernel(module: nn.Module) -> bool:
    """Whether the module's kernel is stored pre-quantized (serving)."""
    return module.has_variable("params", "kernel") and isinstance(module.get_variable("params", "kernel"), ScaledArray)


def _fp8_inputs(x: Array, precision: Precision) -> Array:
    # FP8 operands are quantized from the activations as they arrive (f32 or bf16);
    # without a recipe they are cast to the compute dtype.
    return x if precision.recipe is not None else x.astype(precision.compute_dtype)


class DenseGeneral(nn.Module):
    """A linear map over `axis` of the input to `features` (int or tuple).

    Attributes:
      features: output feature shape.
      axis: input axes contracted (default the last).
      use_bias: add a bias (kept in param dtype, added in f32).
      policy: precision policy; None means fp32.
      kernel_init: initializer of the (in..., out...) kernel.
      pad_to: zero-pad the contraction dimension to a multiple of this (0: no padding).
      role: its part in the precision map (`mpx.policy.ROLES`): "linear", or "router"
        (MoE gating) and "head" (an untied LM head), which the presets keep wide.
    """

    features: int | Sequence[int]
    axis: int | Sequence[int] = -1
    use_bias: bool = False
    policy: Policy | None = None
    kernel_init: Callable = default_kernel_init
    pad_to: int = 0
    role: str = "linear"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return self._dense(x)

    def _dense(self, x: Array) -> Array:
        precision = resolve_precision(self, self.policy)
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        axes = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        axes = tuple(a % x.ndim for a in axes)
        in_shape = tuple(x.shape[a] for a in axes)
        kernel = _kernel(self, self.kernel_init, in_shape + features, precision.param_dtype)
        # Contract over flattened input axes against a (K, N) view of the kernel.
        batch_axes = tuple(a for a in range(x.ndim) if a not in axes)
        x2 = jnp.transpose(x, batch_axes + axes).reshape(tuple(x.shape[a] for a in batch_axes) + (-1,))
        if isinstance(kernel, ScaledArray):  # serving: stored in its (K, N) view
            y = contract_prequantized(self, "kernel", x2, kernel, precision)
            return self._finish(y.reshape(y.shape[:-1] + features), features, precision)
        k2 = kernel.reshape(math.prod(in_shape), math.prod(features))
        if precision.recipe is not None:
            warn_misaligned(module_path(self), {"in": k2.shape[0], "out": k2.shape[1]})
            if self.pad_to:
                x2, k2 = _pad_axis(x2, -1, self.pad_to), _pad_axis(k2, 0, self.pad_to)
        dims = (((x2.ndim - 1,), (0,)), ((), ()))
        y = contract(self, "kernel", _fp8_inputs(x2, precision), k2, dims, precision)
        return self._finish(y.reshape(y.shape[:-1] + features), features, precision)

    def _finish(self, y: Array, features: tuple[int, ...], precision: Precision) -> Array:
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, features, precision.param_dtype)
            y = (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(precision.output_dtype)
        return y


class Dense(DenseGeneral):
    """A linear map of the last axis to `features` (see `DenseGeneral`)."""


class SwiGLUDense(Dense):
    """`Dense(features)(mpx.activations.swiglu(gate, up))`: an FFN's down projection
    applied to the SwiGLU of its gate and up projections (same params and path as the
    Dense it replaces). Under `DeepSeekV3` (`fp8_residuals`, `recompute_swiglu`) the backward pass
    recomputes the SwiGLU product from what SwiGLU keeps instead of keeping an FP8 copy
    of it (`mpx.dot.swiglu_dot_general`, DeepSeek-V3 report 3.3).

    With `activation="gelu_tanh"` it is the down projection of a GeGLU FFN (Gemma),
    fused and recomputed the same way.

    Attributes:
      residual_format: SwiGLU's residuals, as in `mpx.activations.swiglu`.
      activation: the gate's activation, as in `mpx.activations.glu`.
    """

    residual_format: str | None = None
    activation: str = "silu"

    @nn.compact
    def __call__(self, gate: Array, up: Array) -> Array:
        precision = resolve_precision(self, self.policy)
        last_axis = isinstance(self.features, int) and self.axis in (-1, gate.ndim - 1)
        if not (last_axis and _fuses_swiglu(self, precision)):
            return self._dense(activations.glu(gate, up, self.residual_format, self.activation))
        kernel = _kernel(self, self.kernel_init, (gate.shape[-1], self.features), precision.param_dtype)
        warn_misaligned(module_path(self), {"in": kernel.shape[0], "out": kernel.shape[1]})
        if self.pad_to:  # act(0) * 0 == 0: padded gate and up give a zero-padded product
            gate, up = _pad_axis(gate, -1, self.pad_to), _pad_axis(up, -1, self.pad_to)
            kernel = _pad_axis(kernel, 0, self.pad_to)
        y = _swiglu_down(self, gate, up, kernel, (((gate.ndim - 1,), (0,)), ((), ())), precision)
        return self._finish(y, (self.features,), precision)


def _fuses_swiglu(module: nn.Module, precision: Precision) -> bool:
    """Whether a SwiGLU-fused down projection runs fused: its recipe recomputes the
    product (`mpx.dot.recomputes_swiglu`) and its kernel is not stored pre-quantized."""
    return dot_lib.recomputes_swiglu(precision.recipe) and not _stored_kernel(module)


def _swiglu_down(module: nn.Module, gate: Array, up: Array, kernel: Array, dimension_numbers,
                 precision: Precision) -> Array:
    """The fused down projection of `gate` and `up`, in `precision.output_dtype`."""
    y = dot_lib.swiglu_dot_general(gate, up, kernel, dimension_numbers, recipe=precision.recipe,
                                   residual_format=module.residual_format,
                                   preferred_element_type=_quantized_result_dtype(precision),
                                   activation=module.activation)
    return y.astype(precision.output_dtype)


# Experts' batched contraction: (E, N, K) x (E, K, F) -> (E, N, F).
EXPERT_DIMS = (((2,), (1,)), ((0,), (0,)))


class ExpertDense(nn.Module):
    """Per-expert linear maps with kernel (E, K, F): batched (E, N, K) -> (E, N, F), or
    grouped with `group_sizes` (E,): rows (M, K) sorted by expert -> (M, F), each run of
    rows multiplied by its own expert's kernel (`mpx.dot.ragged.ragged_dot`).

    Each expert's kernel is its own FP8 operand (128x128 blocks per expert under the
    DeepSeek-V3 recipe).
    """

    n_experts: int
    features: int
    policy: Policy | None = None
    kernel_init: Callable = default_kernel_init
    role = "linear"

    @nn.compact
    def __call__(self, x: Array, group_sizes: Array | None = None) -> Array:
        return self._dense(x, group_sizes)

    def _expert_kernel(self, k: int, precision: Precision) -> Array | ScaledArray:
        return _expert_kernel(self, (self.n_experts, k, self.features), precision)

    def _dense(self, x: Array, group_sizes: Array | None = None) -> Array:
        precision = resolve_precision(self, self.policy)
        kernel = self._expert_kernel(x.shape[-1], precision)
        if group_sizes is not None:
            return _ragged(x, kernel, group_sizes, precision)
        if isinstance(kernel, ScaledArray):  # serving: pre-quantized (E, K, F)
            return contract_prequantized(self, "kernel", x, kernel, precision)
        return contract(self, "kernel", _fp8_inputs(x, precision), kernel, EXPERT_DIMS, precision)


def _expert_kernel(module: nn.Module, shape: tuple[int, int, int], precision: Precision) -> Array | ScaledArray:
    """The (E, K, F) "kernel" param of an expert layer (fan-in init per expert)."""
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=1, out_axis=2)
    kernel = _kernel(module, init, shape, precision.param_dtype)
    if precision.recipe is not None and not isinstance(kernel, ScaledArray):
        warn_misaligned(module_path(module), {"in": shape[1], "out": shape[2]})
    return kernel


class ExpertKernel(nn.Module):
    """An `ExpertDense`'s (E, K, F) kernel and precision without its matmul: for code
    that multiplies the experts itself, e.g. inside `jax.shard_map` (expert parallelism),
    where a bound Flax module cannot be called. Same param path and init as ExpertDense.
    """

    n_experts: int
    features: int
    policy: Policy | None = None
    role = "linear"

    @nn.compact
    def __call__(self, in_features: int) -> tuple[Array | ScaledArray, Precision]:
        precision = resolve_precision(self, self.policy)
        return _expert_kernel(self, (self.n_experts, in_features, self.features), precision), precision


def grouped_matmul(x: Array, kernel: Array | ScaledArray, group_sizes: Array, precision: Precision) -> Array:
    """Rows sorted by expert times their experts' kernels under `precision` (the
    computation of a grouped `ExpertDense` call), in `precision.output_dtype`."""
    return _ragged(x, kernel, group_sizes, precision)


def _ragged(x: Array, kernel: Array | ScaledArray, group_sizes: Array, precision: Precision) -> Array:
    """Rows sorted by expert times their experts' kernels, in `precision.output_dtype`."""
    kw = dict(recipe=precision.recipe, preferred_element_type=_quantized_result_dtype(precision))
    if isinstance(kernel, ScaledArray):
        y = ragged_lib.prequantized_ragged_dot(x, kernel, group_sizes, compute_dtype=precision.compute_dtype, **kw)
    else:
        y = ragged_lib.ragged_dot(_fp8_inputs(x, precision), kernel, group_sizes, compute_dtype=precision.compute_dtype,
                                  **kw)
    return y.astype(precision.output_dtype)


class ExpertSwiGLUDense(ExpertDense):
    """`ExpertDense(features)(mpx.activations.swiglu(gate, up))`, the experts' down
    projection, recomputing the SwiGLU product in the backward pass as `SwiGLUDense`
    does (DeepSeek-V3 report 3.3 says it of its MoE experts) in the batched form; the
    grouped form (`group_sizes`) multiplies the SwiGLU product as `mpx.activations.glu`
    keeps it.

    Attributes:
      residual_format: SwiGLU's residuals, as in `mpx.activations.swiglu`.
      activation: the gate's activation, as in `mpx.activations.glu`.
    """

    residual_format: str | None = None
    activation: str = "silu"

    @nn.compact
    def __call__(self, gate: Array, up: Array, group_sizes: Array | None = None) -> Array:
        precision = resolve_precision(self, self.policy)
        if group_sizes is not None or not _fuses_swiglu(self, precision):
            return self._dense(activations.glu(gate, up, self.residual_format, self.activation), group_sizes)
        return _swiglu_down(self, gate, up, self._expert_kernel(gate.shape[-1], precision), EXPERT_DIMS, precision)


def is_grouped_call(module: nn.Module, args: tuple) -> bool:
    """Whether a call of `module` with `args` is an `ExpertDense` one in the grouped form
    (rows sorted by expert, with group sizes), which has no (G, M, K) view."""
    if isinstance(module, ExpertSwiGLUDense):
        return len(args) > 2 and args[2] is not None
    return isinstance(module, ExpertDense) and len(args) > 1 and args[1] is not None


LINEAR_TYPES = (DenseGeneral, ExpertDense)


def linear_input(module: nn.Module, args: tuple) -> Array:
    """The input of a linear layer's map, from the arguments of its `__call__` (what
    method interceptors tap: calibration, sensitivity): the SwiGLU product for the
    SwiGLU-fused down projections (GeGLU's for a "gelu_tanh" one), else the first argument."""
    if isinstance(module, (SwiGLUDense, ExpertSwiGLUDense)):
        return activations.glu(*args[:2], activation=module.activation)
    return args[0]


class Embed(nn.Module):
    """Token embedding; `attend(x)` computes logits against it (tied LM head).

    Lookups return `output_dtype` (f32 under the presets: the residual stream is f32);
    logits are computed in the compute dtype with `accum_dtype` accumulation.
    """

    num_embeddings: int
    features: int
    policy: Policy | None = None
    embedding_init: Callable = nn.initializers.normal(stddev=1.0)
    role = "embed"

    def setup(self):
        self._precision = resolve_precision(self, self.policy)
        self.embedding = self.param(
            "embedding", self.embedding_init, (self.num_embeddings, self.features), self._precision.param_dtype
        )

    def __call__(self, ids: Array, scale: float | None = None) -> Array:
        """Rows `ids`, times `scale` (rounded to the compute dtype, multiplied in it, as
        transformers' Gemma scales its embeddings) when given."""
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"Embed expects integer token ids; got dtype {ids.dtype}")
        compute = self._precision.compute_dtype
        rows = _lookup(self.embedding.astype(compute), ids)
        if scale is not None:
            rows = rows * jnp.asarray(scale, compute)
        return rows.astype(self._precision.output_dtype)

    def attend(self, x: Array) -> Array:
        """Logits x @ embedding^T: (..., D) -> (..., V)."""
        dims = (((x.ndim - 1,), (1,)), ((), ()))
        return contract(self, "attend", _fp8_inputs(x, self._precision), self.embedding, dims, self._precision)


@explicit.auto_inside(lambda emb, ids: P(*explicit.spec_of(ids), None))
def _lookup(emb: Array, ids: Array) -> Array:
    """Rows `ids` of `emb`, sharded as the ids (then the features, whole)."""
    return jnp.take(emb, ids, axis=0)


class RMSNorm(nn.Module):
    """Root-mean-square normalization, always in float32 (output dtype per policy).

    Attributes:
      epsilon: added to the mean square.
      policy: precision policy; None means fp32.
      unit_offset: multiply by (1 + scale) in f32, the scale initialized to zeros
        (Gemma's RMSNorm); else by the scale, initialized to ones.
    """

    epsilon: float = 1e-6
    policy: Policy | None = None
    unit_offset: bool = False
    role = "norm"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        precision = resolve_precision(self, self.policy)
        init = nn.initializers.zeros if self.unit_offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), precision.param_dtype)
        if self.unit_offset:
            scale = 1.0 + scale.astype(jnp.float32)
        # keeps x and its inverse RMS for the backward pass, not the normalized x in f32
        return activations.rms_norm(x, scale, float(self.epsilon)).astype(precision.output_dtype)


class LayerNorm(nn.Module):
    """Layer normalization with bias, always in float32 (output dtype per policy)."""

    epsilon: float = 1e-6
    policy: Policy | None = None
    role = "norm"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        precision = resolve_precision(self, self.policy)
        features = (x.shape[-1],)
        scale = self.param("scale", nn.initializers.ones, features, precision.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, features, precision.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(precision.output_dtype)


def causal_mask(q_len: int, kv_len: int, q_offset: Array | int = 0, dtype=jnp.bool_) -> Array:
    """(q_len, kv_len) mask, True (or 1) where query i may attend key j (j <= i + offset)."""
    q = jnp.arange(q_len)[:, None] + q_offset
    k = jnp.arange(kv_len)[None, :]
    return (k <= q).astype(dtype)


def attention_weights(logits: Array, mask: Array | None) -> Array:
    """Softmax in float32 over the last axis; mask (bool or int8, broadcastable) hides keys."""
    return jax.nn.softmax(attention_lib.hide(logits, attention_lib.visible_keys(mask)), axis=-1)


def grouped_attention(module: nn.Module, policy: Policy | None, q: Array, k: Array, v: Array,
                      mask: Array | None, scale: float | None = None) -> Array:
    """Grouped-query attention core with QK^T and PV at their own precisions.

    The contractions resolve `<module path>/qk` and `<module path>/pv` in the policy (in
    the fp8 presets QK^T is bf16 and PV FP8; in the others both are bf16 or f32); softmax
    always runs in f32. With QK^T free of a recipe this is `mpx.attention.softmax_attention`
    (PV in FP8 there when pv has a recipe: its formats, the attention's own scaling
    per row and head); a recipe on QK^T runs both through `contract` with their recipes.
    Call it from inside the attention block's `__call__` (it declares `fp8_state` there).

    Args:
      module: the calling attention block (gives the path and the variable scope).
      policy: the precision policy.
      q: (B, T, H, D) queries; k (B, S, G, D) keys and v (B, S, G, Dv) values, H a
        multiple of G.
      mask: bool or int8, broadcastable to (B, 1, T, S), or None.
      scale: the factor of the logits QK^T (None: 1/sqrt(D)), applied to the queries.

    Returns:
      (B, T, H, Dv) in the pv precision's output dtype.
    """
    b, t, h, d = q.shape
    g, dv = k.shape[2], v.shape[-1]
    # (B, T, G, R, D) -> (B, G, R, T, D); the 1/sqrt(D) is a power of two for D = 4**n.
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qg = jnp.transpose(q.reshape(b, t, g, h // g, d), (0, 2, 3, 1, 4)) * scale
    kt = jnp.transpose(k, (0, 2, 1, 3))  # (B, G, S, D)
    vt = jnp.transpose(v, (0, 2, 1, 3))  # (B, G, S, D)
    qk = resolve_precision(module, policy, "qk", role="attention")
    pv = resolve_precision(module, policy, "pv", role="attention")
    if mask is not None and mask.ndim == 4:
        mask = mask[:, :, None]  # (B, 1, T, S) -> (B, 1, 1, T, S)
    if qk.recipe is None:  # keeps no (T, S) residual for the backward pass; PV in FP8 if pv has a recipe
        values = None if pv.recipe is None else attention_lib.Fp8Values.of(pv.recipe)
        out = attention_lib.softmax_attention(qg, kt, vt, mask, attention_lib.Dtypes.of(qk),
                                              attention_lib.Dtypes.of(pv), values=values)
        return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, dv)
    logits = contract(module, "qk", _fp8_inputs(qg, qk), kt, (((4,), (3,)), ((0, 1), (0, 1))), qk,
                      rhs_kind="activation")  # (B, G, R, T, S)
    probs = attention_weights(logits, mask)
    out = contract(module, "pv", _fp8_inputs(probs, pv), vt, (((4,), (2,)), ((0, 1), (0, 1))), pv,
                   rhs_kind="activation")  # (B, G, R, T, Dv)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, dv)
