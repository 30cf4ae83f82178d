"""Did FP8 actually run? Find every GEMM in HLO text and say which precision it used.

XLA falls back to a high-precision GEMM without a word when the FP8 pattern breaks.
`fp8_report` reads the text of a lowered or compiled computation, finds every dot,
convolution and GEMM custom call (e.g. cuBLASLt's `__cublas$lt$matmul$f8`, or a Pallas
kernel named as a GEMM, such as `mpx.kernels.block_fp8`'s "mpx_block_fp8_gemm"), and
classifies it:

* "fp8":            both operands reach the GEMM as FP8 values (f8e4m3fn, f8e5m2, ...);
* "upcast":         an FP8 value is converted to a wider type before the GEMM (what XLA
                    does on CPU, and what happens when the Hopper FP8 rewrite fails);
* "high_precision": no FP8 value feeds the GEMM.

`residual_bytes(fn, *args)` answers the memory side: what fn's backward pass keeps
from its forward pass, per dtype (FP8 residuals show as one-byte dtypes).

Compiled text (`jax.jit(f).lower(...).compile()`) shows what runs on the backend;
lowered StableHLO (`.lower(...)`) shows only what was asked for. On CPU every FP8 dot
is an upcast; `mpx.dot`'s "upcast_bf16" path never materializes FP8 at all, so its
GEMMs are bf16 "high_precision" ones, which is what the CPU really multiplies.

Example:
    >>> import jax, jax.numpy as jnp, mpx.inspect
    >>> f8 = jnp.ones((16, 32), jnp.float8_e4m3fn)
    >>> dot = lambda a, b: jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32).T)
    >>> mpx.inspect.fp8_report(jax.jit(dot).lower(f8, f8).compile()).counts["upcast"]
    1
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp

from mpx.hlo_graph import Graph, Node, is_f8, parse

CLASSES = ("fp8", "upcast", "high_precision")
_GEMM_OPCODES = ("dot", "convolution")
_GEMM_TARGET = re.compile(r"gemm|matmul|conv", re.IGNORECASE)
_MAX_VISITS = 400  # bound on the backward walk from one GEMM operand
# Custom calls that run a kernel compiled from Pallas (Triton on GPU); the kernel's name
# in the call's backend config tells a GEMM (`mpx.kernels.block_fp8`) from other kernels.
_KERNEL_CALLS = ("__gpu$xla.gpu.triton",)


@dataclasses.dataclass(frozen=True)
class Gemm:
    """One GEMM found in the text.

    Attributes:
      name: instruction (HLO) or SSA value (StableHLO) name.
      kind: "dot", "convolution" or "custom-call <target>".
      lhs_dtype, rhs_dtype, out_dtype: element types as printed ("f8e4m3fn", "bf16").
      classification: "fp8", "upcast" or "high_precision".
      computation: the HLO computation or MLIR function holding it.
      op_name: the JAX op that produced it (HLO metadata), when printed.
    """

    name: str
    kind: str
    lhs_dtype: str
    rhs_dtype: str
    out_dtype: str
    classification: str
    computation: str = ""
    op_name: str = ""
    flops: int = 0  # 2 x output elements x contraction length; 0 where the text does not say
    lhs_shape: tuple[int, ...] | None = None  # HLO text only
    rhs_shape: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Fp8Report:
    """All GEMMs of a computation with their precision class.

    Attributes:
      gemms: the GEMMs in text order.
    """

    gemms: tuple[Gemm, ...]

    @property
    def counts(self) -> dict[str, int]:
        """Number of GEMMs per class (all three keys always present)."""
        return {c: sum(g.classification == c for g in self.gemms) for c in CLASSES}

    @property
    def fp8_fraction(self) -> float:
        """Fraction of GEMMs that run in FP8 (0.0 when there are none)."""
        return self.counts["fp8"] / len(self.gemms) if self.gemms else 0.0

    @property
    def fp8_flop_fraction(self) -> float:
        """Share of the GEMM FLOPs that run in FP8 (0.0 without FLOPs: StableHLO text)."""
        total = sum(g.flops for g in self.gemms)
        return sum(g.flops for g in self.gemms if g.classification == "fp8") / total if total else 0.0

    def fallbacks(self) -> tuple[Gemm, ...]:
        """GEMMs that do not run in FP8."""
        return tuple(g for g in self.gemms if g.classification != "fp8")

    def __str__(self) -> str:
        head = ("class", "kind", "lhs", "rhs", "out", "name", "op")
        shaped = lambda dtype, shape: dtype if shape is None else f"{dtype}{list(shape)}"  # noqa: E731
        rows = [head] + [
            (g.classification, g.kind, shaped(g.lhs_dtype, g.lhs_shape), shaped(g.rhs_dtype, g.rhs_shape),
             g.out_dtype, g.name, g.op_name)
            for g in self.gemms
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        c = self.counts
        lines.append(f"{len(self.gemms)} GEMMs: {c['fp8']} fp8, {c['upcast']} upcast, "
                     f"{c['high_precision']} high_precision (fp8 fraction {self.fp8_fraction:.2f})")
        return "\n".join(lines)


class Fp8FallbackError(AssertionError):
    """Raised by `assert_fp8` when too few GEMMs run in FP8."""


# --------------------------------------------------------------------------- classification


def _gemm_kind(node: Node) -> str | None:
    if node.opcode in _GEMM_OPCODES:
        return node.opcode
    if node.opcode == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', node.attrs)
        if target and target.group(1) in _KERNEL_CALLS:  # a Pallas kernel: its name says what it is
            kernel = re.search(r'\bname = \\?"([\w.\-]+)', node.attrs)
            if kernel and _GEMM_TARGET.search(kernel.group(1)):
                return f"custom-call {kernel.group(1)}"
        elif target and _GEMM_TARGET.search(target.group(1)):
            return f"custom-call {target.group(1)}"
    return None


def _operand_dtype(graph: Graph, node: Node, i: int) -> str:
    if i < len(node.operand_dtypes) and node.operand_dtypes[i]:
        return node.operand_dtypes[i]
    src = graph.get(node.computation, node.operands[i]) if i < len(node.operands) else None
    return src.dtypes[0] if src is not None and src.dtypes else "?"


def _sources(graph: Graph, node: Node) -> list[Node]:
    """The nodes feeding `node`: a fusion's root, a fused parameter's fusion operand."""
    callee = graph.callees.get((node.computation, node.name))
    if callee in graph.roots:
        return [graph.roots[callee]]
    if node.param_index is not None:
        return [graph.get(f.computation, f.operands[node.param_index])
                for f in graph.callers.get(node.computation, ())
                if node.param_index < len(f.operands)]
    return [graph.get(node.computation, name) for name in node.operands]


def _contracting_dims(node: Node, kind: str) -> tuple[int, ...] | None:
    """lhs's contracting dims: a dot's attribute, a cuBLAS call's backend config, or K of
    a Pallas GEMM's (M, K) lhs."""
    found = re.search(r'lhs_contracting_dim(?:s=\{|ensions\\?"\s*:\s*\[)([^}\]]*)', node.attrs)
    if found:
        return tuple(int(d) for d in re.findall(r"\d+", found.group(1)))
    return (1,) if kind.startswith("custom-call mpx_") else None


def _operand_shape(graph: Graph, node: Node, i: int) -> tuple[int, ...] | None:
    if i < len(node.operand_shapes) and node.operand_shapes[i] is not None:
        return node.operand_shapes[i]
    source = graph.get(node.computation, node.operands[i]) if i < len(node.operands) else None
    return source.shape if source is not None else None


def _flops(graph: Graph, node: Node, kind: str) -> int:
    """2 x output elements x contraction length, from HLO shapes (0 when unknown)."""
    lhs = _operand_shape(graph, node, 0)
    dims = _contracting_dims(node, kind)
    if lhs is None or node.shape is None or dims is None or any(d >= len(lhs) for d in dims):
        return 0
    out, k = 1, 1
    for n in node.shape:
        out *= n
    for d in dims:
        k *= lhs[d]
    return 2 * out * k


def _reaches_f8(graph: Graph, start: Node | None) -> bool:
    """Whether an FP8 value lies upstream of `start` (not crossing other GEMMs)."""
    stack, seen = [start], set()
    while stack and len(seen) < _MAX_VISITS:
        node = stack.pop()
        if node is None or (node.computation, node.name) in seen:
            continue
        seen.add((node.computation, node.name))
        if any(is_f8(d) for d in node.dtypes):
            return True
        if node is not start and _gemm_kind(node):
            continue
        stack.extend(_sources(graph, node))
    return False


def _classify(graph: Graph, node: Node) -> str:
    dtypes = [_operand_dtype(graph, node, i) for i in (0, 1)]
    if all(is_f8(d) for d in dtypes):
        return "fp8"
    for i in (0, 1):
        if i < len(node.operands) and (
            is_f8(dtypes[i]) or _reaches_f8(graph, graph.get(node.computation, node.operands[i]))
        ):
            return "upcast"
    return "high_precision"


def _text_of(obj: Any) -> str:
    if isinstance(obj, str):
        return obj
    as_text = getattr(obj, "as_text", None)
    if as_text is None:
        raise TypeError(
            f"fp8_report takes HLO/StableHLO text or an object with .as_text() (jax Lowered or "
            f"Compiled); got {type(obj).__name__}"
        )
    text = as_text()
    if not isinstance(text, str):
        raise TypeError(f"{type(obj).__name__}.as_text() returned {type(text).__name__}, not text")
    return text


def fp8_report(compiled_or_lowered_or_text: Any) -> Fp8Report:
    """Lists every GEMM in a computation with its operand dtypes and precision class.

    Args:
      compiled_or_lowered_or_text: `jax.jit(f).lower(...).compile()`, `.lower(...)`, or
        their `.as_text()` (HLO or StableHLO).

    Returns:
      An `Fp8Report` (print it for a table; `.counts`, `.fp8_fraction`).

    Raises:
      TypeError: for an object that is neither text nor has `.as_text()`.
    """
    text = _text_of(compiled_or_lowered_or_text)
    graph = parse(text)
    gemms = []
    for node in graph.order:
        kind = _gemm_kind(node)
        if kind is None:
            continue
        op_name = re.search(r'op_name="([^"]*)"', node.attrs)
        gemms.append(Gemm(
            name=node.name, kind=kind,
            lhs_dtype=_operand_dtype(graph, node, 0), rhs_dtype=_operand_dtype(graph, node, 1),
            out_dtype=node.dtypes[0] if node.dtypes else "?",
            classification=_classify(graph, node), computation=node.computation,
            op_name=op_name.group(1) if op_name else "", flops=_flops(graph, node, kind),
            lhs_shape=_operand_shape(graph, node, 0), rhs_shape=_operand_shape(graph, node, 1),
        ))
    return Fp8Report(tuple(gemms))


def assert_fp8(compiled_or_lowered_or_text: Any, min_fraction: float = 1.0) -> Fp8Report:
    """Raises unless at least `min_fraction` of the GEMMs run in FP8.

    Args:
      compiled_or_lowered_or_text: as `fp8_report`.
      min_fraction: required share of "fp8" GEMMs, in [0, 1].

    Returns:
      The report, when the check passes.

    Raises:
      ValueError: for min_fraction outside [0, 1].
      Fp8FallbackError: naming each GEMM that fell back (and its class), or saying that
        no GEMM was found.
    """
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in [0, 1]; got {min_fraction}")
    report = fp8_report(compiled_or_lowered_or_text)
    if not report.gemms and min_fraction > 0:
        raise Fp8FallbackError("no dot, convolution or GEMM custom call found in the computation")
    if report.fp8_fraction < min_fraction:
        names = ", ".join(f"{g.name} ({g.classification}: {g.lhs_dtype} x {g.rhs_dtype}"
                          f"{', ' + g.op_name if g.op_name else ''})" for g in report.fallbacks())
        raise Fp8FallbackError(
            f"only {report.counts['fp8']} of {len(report.gemms)} GEMMs run in FP8 "
            f"(fraction {report.fp8_fraction:.2f} < {min_fraction}); fell back: {names}"
        )
    return report


def residual_bytes(fn: Callable, *primals: Any) -> dict[str, int]:
    """What the backward pass of `fn` keeps from its forward pass, in bytes per dtype.

    The residuals of `jax.vjp(fn, *primals)` as autodiff leaves them (shapes only:
    nothing runs), before XLA schedules or rematerializes anything. FP8 operands cached
    for the backward pass (`fp8_residuals`) show here as one-byte dtypes.

    Args:
      fn: a differentiable function of `primals`.
      *primals: its arguments (arrays, ShapeDtypeStructs or pytrees of them).

    Returns:
      {dtype name: bytes}, plus "total".
    """
    residuals = jax.eval_shape(lambda *args: jax.vjp(fn, *args)[1], *primals)
    out: dict[str, int] = {}
    for leaf in jax.tree.leaves(residuals):
        name = jnp.dtype(leaf.dtype).name
        out[name] = out.get(name, 0) + leaf.size * jnp.dtype(leaf.dtype).itemsize
    out["total"] = sum(out.values())
    return out


__all__ = ["CLASSES", "Fp8FallbackError", "Fp8Report", "Gemm", "assert_fp8", "fp8_report", "residual_bytes"]
