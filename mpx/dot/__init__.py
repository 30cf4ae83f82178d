"""Differentiable FP8 `dot_general` and `einsum`: quantized forward, dgrad and wgrad.

    out = dequantize(q(lhs)) . dequantize(q(rhs))        accumulated in float32

`dot_general(lhs, rhs, dimension_numbers, recipe=...)` quantizes both operands as the
recipe says, multiplies them with float32 accumulation and returns
`preferred_element_type`. Its gradient (a `jax.custom_vjp`) runs the two backward
matmuls in FP8 too:

    dgrad   d_lhs = dY . rhs^T      (contracts over rhs's free dims)
    wgrad   d_rhs = lhs^T . dY      (contracts over lhs's free dims, e.g. tokens)

Canonical layout. Any `dimension_numbers` are mapped by transposes and reshapes onto
`lhs (B, M, K) x rhs (B, K, N) -> (B, M, N)` (no B axis without batch dims). Several
contracting dims are flattened into K in the order given, and scale blocks run along
that flattened K. All granularities below are in these canonical coordinates.

Which scale groups each operand gets (`plan(recipe)` returns them):

| recipe | fprop lhs | fprop rhs | dY (dgrad) | rhs (dgrad) | lhs (wgrad) | dY (wgrad) |
|---|---|---|---|---|---|---|
| Current/Delayed/Static | tensor E4M3 | tensor E4M3 | tensor E5M2 | reused | reused | reused |
| DeepSeekV3, weight rhs | 1x128 | 128x128 | 1x128 | reused 128x128 | 128x1 | 128x1 |
| DeepSeekV3, activation rhs | 1x128 | 128x1 | 1x128 | 1x128 | 128x1 | 128x1 |

i.e. every block-scaled operand is grouped `block` wide along the contraction dim of the
matmul it feeds (DeepSeek-V3 report, section 3.3), and output gradients are tiled per
token (1x128), never in 128x128 blocks. A backward operand whose spec equals the forward
spec of the same tensor reuses the forward quantization.

Residuals. The backward pass keeps the FP8 operands the forward made (E4M3 data and
f32 scales: about 1 byte per element) instead of the unquantized input
(`fp8_residuals=True`, the recipes' default; DeepSeek-V3 report, 3.3). dgrad reuses the
stored weight operand; wgrad needs its lhs in 128x1 tiles along tokens where the forward
made 1x128 tiles along K, so it dequantizes the stored operand and quantizes it again:
its lhs carries two E4M3 roundings, so wgrad errs somewhat more than when requantizing
from the input (forward and dgrad are unchanged; `tests/test_dot.py` bounds it).

Scale state. Gradients are always scaled just in time (current scaling), even under
`DelayedScaling`: delayed-scaling state is only used for forward operands, so no amax
travels through the gradient channel and microbatch accumulation of scale state is a
plain `mpx.recipes.merge_amax_trees` of the returned states. With a stateful recipe
(`DelayedScaling`, `StaticScaling`) pass `state=init_state(recipe)`; the call returns
`(out, new_state)`. Delayed scaling quantizes with scales from the *old* history (the
operand's own amax when the history is still empty) and records this call's amax in
`new_state`. Two microbatches that start from the same state therefore produce states
whose merge holds, at history[0], the max of both observations. The state never gets a
gradient (it passes through `lax.stop_gradient`).

Implementations of the quantized matmul (`impl`):

* "fp8": per-tensor scales use the Hopper pattern `dot(convert(f8) * s_a, convert(f8) *
  s_b)`, which XLA rewrites into a cuBLASLt FP8 GEMM on H100/H200. Block scales (1x128
  tiles, 128x128 blocks) go to the Pallas kernel `mpx.kernels.block_fp8` (FP8 WGMMA,
  f32 promotion per K group) on a target with FP8 tensor cores (`mpx.target`);
  elsewhere to the "upcast_bf16" computation on the raw FP8 values.
* "upcast_bf16": bf16 GEMMs of the exact FP8 values (bf16 holds every E4M3/E5M2 value)
  with f32 accumulation; per-tensor scales multiply the f32 result. Block scales are
  folded into the operands when that is exact (power-of-two scales, `scale_format=
  "ue8m0"`), else they multiply f32 partial sums per K group (a scan of per-group GEMMs,
  in chunks of rows for many rows; past `backends.MAX_SCANNED_GROUPS` groups, f32 GEMMs
  of dequantized operands, in chunks of the rhs's columns), as DeepSeek-V3's GEMM does:
  the result is the dequantized operands' product up to f32 rounding. The default on
  CPU.
* "fold_bf16": block scales folded into bf16 operands whatever they are: one GEMM, but
  each operand value gains up to 2^-9 relative error (about 2.7e-3 of max|y| against
  the exact product at 1024-wide shapes; E4M3 itself has 2^-4).
* "dequant_f32": the exact reference: dequantize to float32, float32 dot (HIGHEST).
* "auto": "fp8" on GPU targets, "upcast_bf16" elsewhere (`mpx.target.Target.default_impl`).

Serving's `prequantized_matmul` (module `mpx.dot.prequantized`) adds "cpu_kernel" (the
stored FP8 weight multiplied in `mpx.kernels.decode_matmul`, which reads it as one byte
per weight) and "fold_f32" (both operands dequantized into f32, one f32 dot). On CPU,
"auto" picks the kernel for decode-sized products (`mpx.target.Target.decode_sized`) where it
is built, else "fold_f32": there XLA runs a bf16 dot as an f32 dot anyway, and it
computes the loop-invariant weight dequantization once per compiled decode call.
`rounded_dot` (module `mpx.dot.rounded`) does the same for the unquantized bf16 matmuls
of a decode step (projections and the LM head through the kernel, attention in f32);
training products have batch x sequence rows and never take either.

Modules: `spec` (plan, state, canonical layout), `general` (the differentiable dot),
`fused` (an FFN's down projection that recomputes the SwiGLU product it multiplies),
`subscripts` (einsum), `backends` (how quantized operands enter a GEMM: the bf16 fold,
K-grouped partial sums, the CPU decode-sized f32 path), `prequantized` (serving). The
quantization steps themselves (amax, scale, rounding, broadcast) are `mpx.scales`'.

On CPU the bf16 GEMMs keep the two layouts XLA's fast kernel takes, (M, K) x (K, N) and
(M, K) x (N, K): wgrad's lhs^T is materialized while it is quantized, and optimization
barriers stop XLA from folding a neighbouring transpose into the dot after it picked its
kernel (its fallback kernel rejects bf16 x bf16 -> f32).

Example:
    >>> import jax, jax.numpy as jnp, mpx, mpx.dot
    >>> x = jax.random.normal(jax.random.key(0), (64, 256))
    >>> w = jax.random.normal(jax.random.key(1), (256, 32))
    >>> y = mpx.dot.dot_general(x, w, (((1,), (0,)), ((), ())), recipe=mpx.recipes.DeepSeekV3())
    >>> bool(mpx.metrics.relative_error(y, x @ w) < 0.06)
    True
"""

from mpx.dot.rounded import rounded_dot
from mpx.dot.general import dot_general, quantized_operands
from mpx.dot.fused import recomputes_swiglu, swiglu_dot_general
from mpx.dot.prequantized import PREQUANTIZED_IMPLS, prequantized_matmul
from mpx.dot.spec import IMPLS, RHS_KINDS, DotPlan, DotState, OperandSpec, init_state, plan, resolve_impl
from mpx.dot.subscripts import einsum
from mpx.formats import upcast

__all__ = [
    "DotPlan", "DotState", "IMPLS", "OperandSpec", "PREQUANTIZED_IMPLS", "RHS_KINDS",
    "dot_general", "einsum", "init_state", "plan", "prequantized_matmul", "quantized_operands", "recomputes_swiglu",
    "resolve_impl", "rounded_dot", "swiglu_dot_general", "upcast",
]
