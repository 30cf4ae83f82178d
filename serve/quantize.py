"""Serving weights: load a training checkpoint and convert it under a precision.

    ckpt = load_run("runs/tiny/checkpoints")              # f32 masters + model config
    spec = ServeSpec("fp8")                               # or "bf16", "fp32"
    model, variables = prepare(ckpt, spec)                # quantized, ready for apply

Precisions (weight memory about 100 / 50 / 25 % of fp32):

* "fp32": the training masters as they are.
* "bf16": every parameter in bf16 (the MoE router stays f32).
* "fp8": the matmul kernels the fp8 policy quantizes (Q/K/V/O projections, FFN, MoE
  experts) stored as `mpx.ScaledArray`s: E4M3 data plus float32 scales, per 128x128
  block (`weights="block"`, DeepSeek-V3's `weight_scale_inv`) or per output channel
  (`weights="channel"`). A DenseGeneral kernel is quantized and stored in its 2-D
  (K, N) view; expert kernels as (E, K, F) with blocks (1, 128, 128) or (1, K, 1).
  Embeddings (and so the tied LM head), norms and the rest are bf16. Activations are
  quantized per the `activations` option: "token" (online 1x128 tiles per token, the
  DeepSeekV3 recipe), "tensor" (online per tensor), "static" (per tensor, from
  calibration with the `calibration` method) or "none" (weight-only, bf16 activations).

Static activations are calibrated in serve/calibration.py (`prepare` calls it).

Loading (`load_run`, `load_tokenizer`, `Checkpoint`, `ServeError`) lives in
serve/loader.py and is importable from here; `serve.sources.load_checkpoint` loads any
kind of checkpoint. User mistakes (a missing or incomplete
checkpoint, a checkpoint of another model, a missing tokenizer) raise `ServeError` with
a one-line message.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

import mpx
from models import precision as roles
from models import transformer
from models.config import ModelConfig
from mpx import calibrate as calibrate_lib
from mpx import recipes as recipes_lib
from mpx.scaled import ScaledArray
from mpx import config as config_lib
from serve import calibration
from serve.loader import (TRAIN_CHECKPOINTS, TRAIN_COMMAND, Checkpoint, ServeError,  # noqa: F401 (re-exported)
                          key_name, check_params, load_run, load_tokenizer, missing_checkpoint_message)

PRECISIONS = ("fp32", "bf16", "fp8")
WEIGHT_SCALES = ("block", "channel")
ACTIVATIONS = ("token", "tensor", "static", "none")
BLOCK = 128


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    try:
        config_lib.check_choice(name, value, allowed)
    except ValueError as err:
        raise ServeError(str(err)) from None


@dataclasses.dataclass(frozen=True)
class ServeSpec:
    """How to serve a checkpoint.

    Attributes:
      precision: "fp32", "bf16" or "fp8".
      weights: FP8 weight scales, "block" (128x128) or "channel" (per output channel).
      activations: FP8 activation scaling, "token", "tensor", "static" or "none".
      calibration: for static activations: "max", "percentile", "mse" or "kl".
      fmt: FP8 element format of weights and activations.
      layer_policy: a precision policy that decides per layer instead (see `fp8_forms`):
        precision, weights, activations and fmt then do not apply.
    """

    precision: str = "fp8"
    weights: str = "block"
    activations: str = "token"
    calibration: str = "max"
    fmt: str = "e4m3"
    layer_policy: mpx.Policy | None = None

    def __post_init__(self):
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("weight scaling", self.weights, WEIGHT_SCALES)
        _check_choice("activation scaling", self.activations, ACTIVATIONS)
        _check_choice("calibration method", self.calibration, calibrate_lib.METHODS)

    @property
    def label(self) -> str:
        """A short name for reports: "fp8 (block, static kl)", "policy NAME"."""
        if self.layer_policy is not None:
            return f"policy {self.layer_policy.name}"
        if self.precision != "fp8":
            return self.precision
        acts = f"static {self.calibration}" if self.activations == "static" else self.activations
        return f"fp8 ({self.weights} w, {acts} act)"

    def recipe(self) -> recipes_lib.Recipe | None:
        """The recipe of the FP8 layers' activations (None: weight-only)."""
        return {"token": recipes_lib.DeepSeekV3(fwd_format=self.fmt, bwd_format=self.fmt),
                "tensor": recipes_lib.CurrentScaling(fwd_format=self.fmt),
                "static": recipes_lib.StaticScaling(fwd_format=self.fmt), "none": None}[self.activations]

    def policy(self) -> mpx.Policy:
        """The serving policy: `layer_policy`, else the preset with the FP8 layers' recipe from `activations`."""
        if self.layer_policy is not None:
            return self.layer_policy
        if self.precision != "fp8":
            return mpx.policy.preset(self.precision)
        recipe = self.recipe()
        return mpx.policy.preset("fp8").map_recipes(lambda _: recipe)


def policy_spec(path: str) -> ServeSpec:
    """The `ServeSpec` of a precision policy YAML (`--policy FILE`).

    Raises:
      ServeError: a missing or invalid policy file (one line, naming it).
    """
    try:
        return ServeSpec(layer_policy=mpx.policy.load(path))
    except FileNotFoundError:
        raise ServeError(f"--policy {path}: no such file") from None
    except ValueError as err:
        raise ServeError(f"--policy: {err}") from None


# --------------------------------------------------------------------------- layers


@dataclasses.dataclass(frozen=True)
class KernelForm:
    """How one FP8 kernel is stored for serving, and its conversion from a checkpoint tensor
    (`quantize`, or `keeps` it as loaded); `mpx.nn` multiplies the stored `ScaledArray`.

    Attributes:
      n_out: feature axes of a DenseGeneral kernel (None: an ExpertDense (E, K, F) one).
      fmt: element format.
      scales: "block" (edge x edge), "channel" (per output channel) or "tensor" (one).
      scale_format: "f32", "ue8m0" (powers of two) or "ue8m3" (`mpx.scales`).
      edge: the block edge.
    """

    n_out: int | None
    fmt: str = "e4m3"
    scales: str = "block"
    scale_format: str = "f32"
    edge: int = BLOCK

    def quantize(self, kernel: jax.Array) -> ScaledArray:
        """The kernel (a DenseGeneral's (in..., out...) or an expert layer's (E, K, F)) in
        this form: a DenseGeneral kernel held in its 2-D (K, N) view."""
        if self.n_out is None:  # ExpertDense (E, K, F)
            view = kernel
            block = {"block": (1, self.edge, self.edge), "channel": (1, kernel.shape[1], 1)}.get(self.scales,
                                                                                                 kernel.shape)
        else:
            view = kernel.reshape(-1, math.prod(kernel.shape[kernel.ndim - self.n_out:]))
            block = {"block": (self.edge, self.edge), "channel": (view.shape[0], 1)}.get(self.scales, view.shape)
        return mpx.quantize(view, self.fmt, mpx.Blocks(tuple(block)), scale_format=self.scale_format)

    def keeps(self, leaf: ScaledArray) -> bool:
        """Whether a loaded block-FP8 kernel already has this form (no requantization)."""
        return (self.scales == "block" and self.edge == BLOCK and self.scale_format == "f32"
                and leaf.fmt == mpx.formats.get(self.fmt))


def _form_of_recipe(path: str, n_out: int | None, recipe) -> KernelForm | None:
    """The weight form a policy's recipe gives a layer (None: no FP8, compute dtype)."""
    if recipe is None:
        return None
    if recipe.tiled:
        return KernelForm(n_out, recipe.fwd_format, "block", recipe.scale_format, recipe.block)
    if not recipe.stateful:  # current scaling
        return KernelForm(n_out, recipe.fwd_format, "tensor")
    raise ServeError(f"policy recipe {recipe.name!r} at {path} needs training-time state; serving policies "
                     "use deepseek_v3 or current (or none)")


def fp8_forms(config: ModelConfig, spec: ServeSpec) -> dict[str, KernelForm]:
    """{layer path: KernelForm} of the kernels `spec` stores in FP8.

    Under `spec.layer_policy`, every dense layer whose recipe is `DeepSeekV3` gets its
    block x block blocks in its format and scale format, `CurrentScaling`
    one scale per tensor in its fwd_format; a layer without recipe stays in its compute
    dtype. Else the fp8 preset's layers under `spec.weights` and `spec.fmt` (fp8), or none.

    Raises:
      ServeError: a policy recipe serving cannot apply (delayed, static).
    """
    if spec.layer_policy is not None:
        forms = {p: _form_of_recipe(p, n, roles.resolve(spec.layer_policy, p).recipe)
                 for p, n in roles.linear_layers(config).items()}
        return {p: f for p, f in forms.items() if f is not None}
    if spec.precision != "fp8":
        return {}
    return {p: KernelForm(n, spec.fmt, spec.weights) for p, n in roles.fp8_layers(config).items()}


def _path_of(path: tuple) -> tuple[str, str]:
    """(module path, param name) of a params-tree key path."""
    names = [key_name(k) for k in path]
    return "/".join(names[:-1]), names[-1]


def _float_dtype(module: str, spec: ServeSpec):
    """The dtype of a non-FP8 serving param."""
    if spec.layer_policy is not None:
        return jnp.dtype(roles.resolve(spec.layer_policy, module).compute_dtype)
    return roles.serving_dtype(module, spec.precision)


def convert_leaf(module: str, name: str, leaf, spec: ServeSpec, fp8: dict[str, KernelForm],
                 shape: tuple[int, ...] | None = None):
    """One serving param under `spec` from a float master or a block-FP8 ScaledArray.

    `fp8` is `fp8_forms(config, spec)`. A ScaledArray (from a block-FP8 checkpoint,
    held in its kernel's 2-D (K, N) view, ragged last blocks included) serves as it is
    where its layer wants 128x128 blocks of its format, and is dequantized first
    everywhere else, into `shape`: the param's shape in the model ((D, H, K) for q_proj).
    """
    form = fp8.get(module) if name == "kernel" else None
    if isinstance(leaf, ScaledArray):
        if form is not None and form.keeps(leaf):
            return leaf
        leaf = mpx.dequantize(leaf).reshape(leaf.shape if shape is None else shape)
    if form is not None:
        return form.quantize(jnp.asarray(leaf, jnp.float32))
    return jnp.asarray(leaf, _float_dtype(module, spec))


def quantize_params(params, config: ModelConfig, spec: ServeSpec):
    """The serving params of `params` under `spec` (see the module docstring).

    Args:
      params: the model's params tree: f32 masters, or already converted leaves
        (block-FP8 ScaledArrays, bf16) as a Hugging Face checkpoint loads them.
      config: the model's shape.
      spec: the precision (or per-layer policy, see `fp8_forms`).

    Returns:
      A params tree of the same structure; FP8 kernels are `ScaledArray`s.

    Raises:
      ServeError: a policy recipe serving cannot apply.
    """
    fp8, shapes = fp8_forms(config, spec), param_shapes(config)

    def convert(path, leaf):
        module, name = _path_of(path)
        return convert_leaf(module, name, leaf, spec, fp8, shapes.get(f"{module}/{name}"))

    return jax.tree_util.tree_map_with_path(convert, params, is_leaf=lambda x: isinstance(x, ScaledArray))


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{"layers_0/attn/q_proj/kernel": shape} of the reference transformer's params under `config`."""
    model = transformer.Transformer(config)
    tree = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    return {"/".join(key_name(k) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --------------------------------------------------------------------------- memory


def _nbytes(x) -> int:
    return int(x.size) * jnp.dtype(x.dtype).itemsize  # arrays and jax.ShapeDtypeStructs alike


def weight_bytes(params) -> int:
    """Bytes the params hold on device: FP8 data, f32 scales and float arrays alike."""
    return sum(_nbytes(x) for x in jax.tree_util.tree_leaves(params))


def memory_report(params) -> dict[str, int]:
    """Bytes by kind: "fp8" (data), "scales", "bf16", "f32" and "total"."""
    out = {"fp8": 0, "scales": 0, "bf16": 0, "f32": 0}
    for leaf in jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, ScaledArray)):
        if isinstance(leaf, ScaledArray):
            out["fp8"] += _nbytes(leaf.data)
            out["scales"] += _nbytes(leaf.scale)
        else:
            out["bf16" if leaf.dtype == jnp.bfloat16 else "f32"] += _nbytes(leaf)
    out["total"] = sum(out.values())
    return out


# --------------------------------------------------------------------------- putting it together


def prepare(ckpt_: Checkpoint, spec: ServeSpec, *, hists: dict | None = None,
            calibration_count: int = 8) -> tuple[transformer.Transformer, dict]:
    """The serving model and its variables for a checkpoint under `spec`.

    Static activations need histograms: `hists` from `serve.calibration.calibrate`, or `calibration_count`
    batches of the checkpoint's training data are observed here.

    Returns:
      (model, variables) for `model.apply(variables, tokens, positions, cache)`.
    """
    model = transformer.Transformer(ckpt_.config, spec.policy())
    converted = ckpt_.serving == spec  # converted tensor by tensor while loading: not again
    variables = {"params": ckpt_.params if converted else quantize_params(ckpt_.params, ckpt_.config, spec)}
    if spec.layer_policy is None and spec.precision == "fp8" and spec.activations == "static":
        if hists is None:
            hists = calibration.calibrate(ckpt_.config, ckpt_.params,
                                          calibration.calibration_batches(ckpt_, calibration_count))
        variables["fp8_state"] = calibration.static_state(hists, spec.calibration, spec.fmt)
    return model, variables
