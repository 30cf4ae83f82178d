"""mpx: FP8/BF16 mixed-precision training and inference of transformer LMs in JAX."""

from mpx import calibrate, dot, formats, inspect, metrics, optim, policy, recipes, scaled, target
from mpx.dot import DotState, dot_general, einsum, init_state
from mpx.formats import Format, cast
from mpx.policy import Policy, Precision, Rule
from mpx.scaled import (
    MX,
    Blocks,
    PerAxis,
    PerTensor,
    ScaledArray,
    check_finite,
    dequantize,
    fake_quant,
    nonfinite_counts,
    quantize,
    quantize_with_scale,
)
from mpx.scales import compute_amax, compute_scale

__version__ = "0.1.0"


def __getattr__(name: str):
    # Every other submodule (mpx.nn, mpx.sensitivity, mpx.hardware, ...) loads on first use,
    # so `import mpx` stays free of Flax.
    import importlib
    import importlib.util

    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'mpx' has no attribute {name!r}")

__all__ = [
    # names
    "Blocks", "Format", "MX", "PerAxis", "PerTensor", "Policy", "Precision", "Rule", "ScaledArray",
    "DotState", "cast", "check_finite", "compute_amax", "compute_scale", "dequantize", "dot_general",
    "einsum", "fake_quant", "init_state", "nonfinite_counts", "quantize", "quantize_with_scale",
    # modules (those not imported above load on first use)
    "activations", "aot", "attention", "calibrate", "config", "dot", "formats", "hardware", "hlo_graph",
    "inspect", "kernels", "metrics", "nn", "optim", "ordering", "policy", "recipes", "scaled", "scales",
    "sensitivity", "sharding", "target",
]
