"""Per-layer, per-format loss sensitivity: a fast Fisher estimate, checked exactly on a subset.

Estimate (one forward and backward pass per calibration batch): every linear layer's
output y (canonical (G, M, N)) gets a zero perturbation whose gradient is g = dL/dy. The
quantization noise of a candidate is measured on the layer's real input x and weight
W of that batch, d = Q(x) Q(W) - x W, and the loss increase of lowering that layer
alone is its second-order Taylor expansion, the curvature from the empirical Fisher at
token granularity:

    dL ~ sum_m g_m . d_m  +  (M / 2) * sum_m (g_m . d_m)^2      (m over the M rows / tokens)

(the per-token score M g_m stands in for the gradient of token m's own loss). The
first-order term matters: a weight's rounding error is the same on every batch, so its
effect does not average out unless the model sits exactly at a minimum (on a briefly
trained tiny model it carries nearly all of the rank correlation with exact
measurement; the Fisher term alone does not rank layers). Both terms are kept apart
(`Sensitivity.second_order`).

Exact measurement: the loss over the batches with that one layer's output replaced by
Q(x) Q(W) (one compilation per candidate, the layer selected by a traced index). On a
subset of (layer, candidate) pairs it checks the estimate: Spearman rank correlation.

Smoothing (SmoothQuant, per input channel k, amax over the batch):
s_k = amax(x_k)^alpha / amax(W_k)^(1 - alpha),
x' = x / s, W' = s W (the product is unchanged); the estimate is repeated on x', W' for
candidates with FP8 activations, so the report can say per layer whether it helped.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mpx import formats as formats_lib
from mpx.sensitivity import capture
from mpx.sensitivity import candidates as candidates_lib
from mpx.sensitivity import stats as stats_lib

__all__ = [
    "Progress", "Sensitivity", "spearman", "smoothing_factors", "smoothable", "estimate", "exact",
    "exact_subset", "analyze"
]

Progress = Callable[[str, int, int], None]  # (phase, done, total)


def _quiet(phase: str, done: int, total: int) -> None:
    del phase, done, total


@dataclasses.dataclass
class Sensitivity:
    """The result of `analyze`.

    Attributes:
      layers: the analysed layers (path, canonical shapes).
      candidates: the candidates, in column order.
      estimate: (layers, candidates) predicted loss increase in nats of lowering one layer
        (first- plus second-order term; may be negative).
      second_order: (layers, candidates) the Fisher term alone (>= 0).
      smoothed: like `estimate` with SmoothQuant smoothing (NaN for candidates without FP8
        activations), or None.
      exact: {(path, candidate name): measured loss increase in nats}.
      base_loss: the mean loss of the unlowered model over the calibration batches.
      weight_stats, activation_stats: {path: `stats.summary` dict}.
      seconds: {phase: wall seconds}.
    """

    layers: tuple[capture.Layer, ...]
    candidates: tuple[candidates_lib.Candidate, ...]
    estimate: np.ndarray
    second_order: np.ndarray
    smoothed: np.ndarray | None
    exact: dict[tuple[str, str], float]
    base_loss: float
    weight_stats: dict[str, dict[str, float]]
    activation_stats: dict[str, dict[str, float]]
    seconds: dict[str, float]

    @property
    def paths(self) -> list[str]:
        return [layer.path for layer in self.layers]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.candidates]

    def column(self, name: str) -> int:
        """Column index of candidate `name`."""
        return self.names.index(name)

    def spearman(self, name: str | None = None) -> float | None:
        """Rank correlation of estimate and exact measurement over the exact subset
        (of one candidate if `name` is given); None with fewer than 3 pairs."""
        pairs = [(self.estimate[self.paths.index(p), self.column(c)], v)
                 for (p, c), v in self.exact.items() if name is None or c == name]
        if len(pairs) < 3:
            return None
        est, exact = np.array(pairs).T
        return spearman(est, exact)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


# --------------------------------------------------------------------------- estimate


def smoothing_factors(x3: jax.Array, w3: jax.Array, alpha: float) -> jax.Array:
    """SmoothQuant's per-input-channel s (G, 1, K): amax(x_k)^alpha / amax(W_k)^(1-alpha)."""
    ax = jnp.max(jnp.abs(x3.astype(jnp.float32)), axis=1, keepdims=True)  # (G, 1, K)
    aw = jnp.max(jnp.abs(w3.astype(jnp.float32)), axis=2)[:, None, :]  # (G, 1, K)
    s = ax**alpha / jnp.maximum(aw, 1e-12) ** (1 - alpha)
    return jnp.where((ax > 0) & (aw > 0), s, 1.0)


def smoothable(cand: candidates_lib.Candidate) -> bool:
    """Whether smoothing applies: the candidate quantizes activations to 8 bits (FP8)."""
    return cand.activation is not None and formats_lib.get(cand.activation.fmt).bits == 8


def _fisher(g3: jax.Array, d: jax.Array) -> jax.Array:
    """First-order term sum(g . d) plus the Fisher term (M / 2) sum_m (g_m . d_m)^2."""
    per_row = jnp.sum(g3 * d, axis=-1)  # (G, M)
    rows = g3.shape[0] * g3.shape[1]
    return jnp.stack([jnp.sum(per_row), 0.5 * rows * jnp.sum(per_row**2)])


def _layer_scores(cands: tuple[candidates_lib.Candidate, ...], alpha: float | None) -> Callable:
    """`(x3, w3, g3, moments) -> (terms (C, 2), smoothed (C,), moments)`.

    Runs op by op: its pieces (the quantizers, the matmul) are jitted per shape and
    format and shared by every layer of that shape, which compiles far less than one
    fused function per layer shape for a handful of batches.
    """

    def score(x3, w3, g3, moments):
        x3, w3, g3 = x3.astype(jnp.float32), w3.astype(jnp.float32), g3.astype(jnp.float32)
        exact = jnp.einsum("gmk,gkn->gmn", x3, w3)
        est = jnp.stack([_fisher(g3, c.lower(x3, w3) - exact) for c in cands])
        smooth = jnp.full((len(cands),), jnp.nan)
        if alpha is not None:
            s = smoothing_factors(x3, w3, alpha)
            xs, ws = x3 / s, w3 * jnp.swapaxes(s, 1, 2)
            smooth = jnp.stack([jnp.sum(_fisher(g3, c.lower(xs, ws) - exact)) if smoothable(c)
                                else jnp.float32(jnp.nan) for c in cands])
        return est, smooth, _observe(moments, x3)

    return score


_observe = jax.jit(stats_lib.observe)


def _weights(variables: Any, layers: tuple[capture.Layer, ...]) -> dict[str, jax.Array]:
    """Each layer's canonical (G, K, N) f32 weight, from the params tree."""
    out = {}
    for layer in layers:
        node = variables["params"]
        for part in layer.path.split("/"):
            node = node[part]
        out[layer.path] = jnp.asarray(node["kernel"], jnp.float32).reshape(layer.weight_shape)
    return out


def _zero_outputs(apply_fn, variables, batch, layers) -> dict[str, jax.Array]:
    """Zero perturbations shaped like each layer's output for this batch (batches may differ)."""
    shapes = {layer.path: layer.out_shape for layer in capture.find_layers(apply_fn, variables, batch)}
    return {layer.path: jnp.zeros(shapes[layer.path], jnp.float32) for layer in layers}


def estimate(apply_fn: capture.ApplyFn, variables: Any, batches: Sequence[Any], cands, *, layers=None,
             loss_fn: Callable = capture.next_token_nll, smooth_alpha: float | None = None,
             progress: Progress = _quiet) -> tuple[np.ndarray, np.ndarray | None, float, dict]:
    """Fisher-weighted noise estimates for every (layer, candidate); see the module doc.

    Returns:
      (terms (L, C, 2): first- and second-order, smoothed (L, C) or None, mean base
      loss, {path: activation stats}).
    """
    layers = tuple(layers or capture.find_layers(apply_fn, variables, batches[0]))
    f = capture.tapped_loss(apply_fn, loss_fn, layers)
    grad_step = jax.jit(jax.value_and_grad(f, has_aux=True))
    weights = _weights(variables, layers)
    score = _layer_scores(tuple(cands), smooth_alpha)
    total = np.zeros((len(layers), len(cands), 2))
    smooth_total = np.zeros((len(layers), len(cands)))
    moments = {layer.path: stats_lib.zeros() for layer in layers}
    losses = []
    for b, batch in enumerate(batches):
        (loss, inputs), grads = grad_step(_zero_outputs(apply_fn, variables, batch, layers), variables, batch)
        losses.append(float(loss))
        for i, layer in enumerate(layers):
            g3 = capture.to_canonical_out(grads[layer.path], layer)
            est, smooth, moments[layer.path] = score(inputs[layer.path], weights[layer.path], g3,
                                                     moments[layer.path])
            total[i] += np.asarray(est)
            smooth_total[i] += np.asarray(smooth)
        progress("estimate", b + 1, len(batches))
    n = len(batches)
    acts = {path: stats_lib.summary(m) for path, m in moments.items()}
    return total / n, (smooth_total / n if smooth_alpha is not None else None), float(np.mean(losses)), acts


# --------------------------------------------------------------------------- exact


def exact(apply_fn: capture.ApplyFn, variables: Any, batches: Sequence[Any], layers, pairs: Iterable[tuple[str, str]],
          *, loss_fn: Callable = capture.next_token_nll, progress: Progress = _quiet) -> dict[tuple[str, str], float]:
    """Measured loss increase of lowering one layer at a time, for (path, candidate) pairs.

    Returns:
      {(path, candidate name): mean over batches of loss(lowered) - loss(unlowered)}.
    """
    layers = tuple(layers)
    index = {layer.path: i for i, layer in enumerate(layers)}
    pairs = list(pairs)
    by_cand: dict[str, list[str]] = {}
    for path, name in pairs:
        by_cand.setdefault(name, []).append(path)
    out: dict[tuple[str, str], float] = {}
    done = 0
    for name, paths in by_cand.items():
        cand = candidates_lib.get([name])[0]
        f = jax.jit(capture.lowered_loss(apply_fn, loss_fn, layers, cand.lower))
        # The unlowered loss through the same compiled function: no last-bit differences
        # from another fusion, which would swamp the smallest effects.
        base = [float(f(variables, b, -1)) for b in batches]
        for path in paths:
            lowered = [float(f(variables, b, index[path])) for b in batches]
            out[(path, name)] = float(np.mean(np.subtract(lowered, base)))
            done += 1
            progress("exact", done, len(pairs))
    return out


def exact_subset(paths: Sequence[str], est: np.ndarray, names: Sequence[str], count: int) -> list[tuple[str, str]]:
    """`count` (path, candidate) pairs evenly spread over the ranking of all estimates in `est`."""
    order = np.argsort(est, axis=None)
    picks = np.unique(np.linspace(0, len(order) - 1, min(count, len(order))).round().astype(int))
    rows, cols = np.unravel_index(order[picks], est.shape)
    return [(paths[r], names[c]) for r, c in zip(rows, cols)]


def analyze(apply_fn: capture.ApplyFn, variables: Any, batches: Sequence[Any], *,
            candidates: str | Sequence[str] | None = None, loss_fn: Callable = capture.next_token_nll,
            exact_pairs: int = 12, exact_candidates: Sequence[str] | None = None,
            smooth_alpha: float | None = None, layers: Sequence[str] | None = None,
            progress: Progress = _quiet) -> Sensitivity:
    """Sensitivity of every linear layer to every candidate precision.

    Args:
      apply_fn: `(variables, batch) -> output` calling the Flax model (layers from `mpx.nn`).
      variables: the model's variables, f32 master weights.
      batches: calibration batches (for the default loss, (B, T) int token arrays).
      candidates: candidate names (see `candidates.CANDIDATES`); default all.
      loss_fn: `(output, batch) -> scalar mean loss`; default next-token NLL.
      exact_pairs: (layer, candidate) pairs measured exactly, spread evenly over the
        ranking of the estimates; 0 skips the check.
      exact_candidates: the candidates measured exactly (default all).
      smooth_alpha: SmoothQuant alpha (e.g. 0.5) to also estimate smoothed activations.
      layers: module paths to analyse (default every linear layer).
      progress: `(phase, done, total)` callback for progress bars.

    Returns:
      A `Sensitivity`.

    Raises:
      ValueError: unknown candidates, no batches, or layer paths the model does not have.
    """
    cands = candidates_lib.get(candidates)
    if not batches:
        raise ValueError("analyze needs at least one calibration batch")
    found = capture.find_layers(apply_fn, variables, batches[0])
    chosen = _select_layers(found, layers)
    t0 = time.perf_counter()
    weight_stats = {layer.path: stats_lib.tensor_stats(w) for layer, w in
                    zip(chosen, _weights(variables, chosen).values())}
    terms, smoothed, base_loss, act_stats = estimate(apply_fn, variables, batches, cands, layers=chosen,
                                                   loss_fn=loss_fn, smooth_alpha=smooth_alpha, progress=progress)
    est = terms.sum(axis=-1)
    t1 = time.perf_counter()
    names = [c.name for c in cands] if exact_candidates is None else list(exact_candidates)
    columns = [c for c, cand in enumerate(cands) if cand.name in names]
    pairs = exact_subset([layer.path for layer in chosen], est[:, columns], [cands[c].name for c in columns],
                         exact_pairs) if exact_pairs else []
    measured = exact(apply_fn, variables, batches, chosen, pairs, loss_fn=loss_fn, progress=progress)
    seconds = {"estimate": t1 - t0, "exact": time.perf_counter() - t1}
    return Sensitivity(chosen, cands, est, terms[..., 1], smoothed, measured, base_loss, weight_stats, act_stats,
                       seconds)


def _select_layers(found: tuple[capture.Layer, ...], paths: Sequence[str] | None) -> tuple[capture.Layer, ...]:
    if paths is None:
        return found
    known = {layer.path: layer for layer in found}
    missing = [p for p in paths if p not in known]
    if missing:
        raise ValueError(f"unknown layer path(s) {missing}; the model's linear layers: {', '.join(known)}")
    return tuple(known[p] for p in paths)
