"""An automatic layer-wise policy: the cheapest precisions whose loss increase fits a budget.

`search(sensitivity, budget_pct)` takes an `mpx.sensitivity.Sensitivity` (per layer and
candidate, a predicted loss increase) and chooses each linear layer's candidate to
minimize a cost (weight bytes, or the matmul work left outside FP8) with the loss
increase within the budget, a perplexity change in percent (a loss budget of
ln(1 + pct / 100) nats). Only candidates a `Policy` can express (a recipe, or a compute
dtype) are chosen; a layer may also stay at the base policy.

Move order: greedy on efficiency. From the base, repeatedly take the one move (a layer
to a cheaper candidate) with the most cost saved per nat of predicted loss, until every
layer sits at its cheapest candidate. Per-layer predictions are floored at their
second-order (Fisher) term, so no lowering is free: a budget of 0 lowers nothing.

Without a `measure` callback the policy is the longest prefix of that order whose
summed prediction fits the budget (moves that do not fit are skipped, later smaller
ones still taken). Sensitivities do not add exactly, though: on a real model the sum
under-predicts the interactions. With `measure(policy) -> loss increase` (held-out
batches, the real model under the policy) measured loss decides:

1. The whole order (the cheapest policy) is measured; within the budget, it is chosen.
2. Otherwise the longest prefix within the budget is searched on measured loss over
   prefix length: each probe interpolates the measured losses of the interval's ends
   against their predictions (re-estimating where the prediction disagrees), kept inside
   the interval's middle half, until the interval closes.
3. With measurements left, the move that crossed the budget is skipped and later moves
   fill the measured room left (predictions scaled by the measured-to-predicted ratio),
   halving the room after a fill that measures over.

A measurement may come with its standard error (`measure` returning `(mean, se)`: the
paired per-window differences of the held-out windows). A policy then counts as within
the budget only when `mean + confidence * se` is, so a policy that fits by the luck of
few windows is not taken: on a real model, neighbouring prefixes of the order measured
+-3% apart on 8 windows of 256 tokens, more than a 1% budget.

The chosen policy is the cheapest measured one within the budget (the base when none
is), so it never measures over when a measured policy fits, and losses that are not
monotone in prefix length cannot push it over. At most `max_measurements` policies are
measured (default ceil(log2(moves + 1)) + 4); every one is kept in
`SearchResult.rounds` with its predicted and measured increase and FP8 share.

The policy's rules group layers with the same candidate (`mpx.policy.patterns`): paths
"<prefix><i><suffix>" ("layers_12/mlp/up") become one regex rule per set of consecutive
indices ("re:layers_([0-9]|1[0-5])/(mlp/up|mlp/gate)").
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from mpx.config import check_choice
from mpx.policy.presets import preset
from mpx.policy.patterns import group_patterns, index_regex  # noqa: F401 (index_regex: public here too)
from mpx.policy.rules import Policy, Rule

__all__ = [
    "OBJECTIVES", "Round", "SearchResult", "ppl_change_pct", "budget_nats", "order", "solve",
    "default_max_measurements", "search", "search_candidates"
]

OBJECTIVES = ("bytes", "fp8-flops")


@dataclasses.dataclass(frozen=True)
class Round:
    """One policy `search` considered (every measured one, or the one predicted).

    Attributes:
      moves: how many moves of the order it takes (for a refinement, the prefix it extends).
      predicted_nats: its summed predicted loss increase.
      measured_nats: its measured increase (None: not measured).
      measured_se_nats: the standard error of that measurement (None: not given).
      fp8_weight_fraction: share of linear-layer weight elements in an 8-bit format.
      weight_bytes: linear-layer weight bytes under it.
      seconds: wall seconds of its measurement (0 when not measured).
      step: "all" (the whole order), "bisect" (a prefix), "refine" (a fill after a
        skipped move) or "predicted" (no measurement).
    """

    moves: int
    predicted_nats: float
    measured_nats: float | None
    fp8_weight_fraction: float
    weight_bytes: float
    seconds: float
    step: str
    measured_se_nats: float | None = None

    @property
    def predicted_ppl_change_pct(self) -> float:
        return ppl_change_pct(self.predicted_nats)

    @property
    def measured_ppl_change_pct(self) -> float | None:
        return ppl_change_pct(self.measured_nats)

    @property
    def measured_se_pct(self) -> float | None:
        """The standard error as a perplexity change in percent (first order: 100 * se)."""
        return None if self.measured_se_nats is None else 100 * self.measured_se_nats

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "moves": self.moves, "predicted_ppl_change_pct": self.predicted_ppl_change_pct,
                "measured_ppl_change_pct": self.measured_ppl_change_pct, "measured_se_pct": self.measured_se_pct,
                "fp8_weight_fraction": self.fp8_weight_fraction, "weight_bytes": self.weight_bytes,
                "seconds": self.seconds}


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """What `search` chose and how it measured.

    Attributes:
      policy: the chosen policy (base plus one rule per group of lowered layers).
      assignment: {layer path: candidate name, or "base"}.
      budget_pct: the perplexity budget in percent.
      predicted_nats, measured_nats: loss increase of the final policy (measured: None
        without a measure callback; 0.0 for the base, which is not measured).
      rounds: every measured policy in measurement order (without a measure callback,
        the one predicted policy), as `Round`s.
      weight_bytes: linear-layer weight bytes under the policy.
      base_weight_bytes: the same under the base policy.
      fp8_weight_fraction: share of linear-layer weight elements stored in an 8-bit format.
      moves: length of the efficiency order (moves from the base to the cheapest policy).
      max_measurements: the cap on measurements the search ran under.
    """

    policy: Policy
    assignment: dict[str, str]
    budget_pct: float
    predicted_nats: float
    measured_nats: float | None
    rounds: list[Round]
    weight_bytes: float
    base_weight_bytes: float
    fp8_weight_fraction: float
    moves: int = 0
    max_measurements: int = 0

    @property
    def measurements(self) -> int:
        """How many policies were measured."""
        return sum(r.measured_nats is not None for r in self.rounds)

    @property
    def predicted_ppl_change_pct(self) -> float:
        return ppl_change_pct(self.predicted_nats)

    @property
    def measured_ppl_change_pct(self) -> float | None:
        return ppl_change_pct(self.measured_nats)


def ppl_change_pct(nats: float | None) -> float | None:
    """The perplexity change in percent of a loss increase in nats (None stays None);
    the inverse of `budget_nats`."""
    return None if nats is None else 100 * math.expm1(nats)


def budget_nats(budget_pct: float) -> float:
    """The loss budget of a perplexity budget in percent: ln(1 + pct / 100).

    Raises:
      ValueError: a budget that is not a finite number >= 0.
    """
    if isinstance(budget_pct, bool) or not isinstance(budget_pct, (int, float)) or not (
            math.isfinite(budget_pct) and budget_pct >= 0):
        raise ValueError(f"budget must be a perplexity change in percent, a finite number >= 0; got {budget_pct!r}")
    return math.log1p(budget_pct / 100)


def _base_bytes(base: Policy, path: str, role: str, elements: int) -> float:
    precision = base.resolve(path, role)
    return elements * (1 if precision.recipe is not None else jnp.dtype(precision.compute_dtype).itemsize)


def _tables(sens, base: Policy, objective: str, names: Sequence[str]):
    """(cost (L, 1 + C'), predicted (L, 1 + C'), bytes (L, 1 + C')), column 0 the base."""
    cols = [sens.column(n) for n in names]
    cands = [sens.candidates[c] for c in cols]
    elements = np.array([layer.weight_elements for layer in sens.layers], float)
    nbytes = np.array([[_base_bytes(base, layer.path, layer.role, layer.weight_elements)] +
                       [c.weight_bytes(layer.weight_shape) for c in cands] for layer in sens.layers])
    pred = np.maximum(sens.estimate[:, cols], sens.second_order[:, cols])
    pred = np.concatenate([np.zeros((len(elements), 1)), pred], axis=1)
    if objective == "bytes":
        cost = nbytes.copy()
    else:  # matmul work outside FP8 (proportional to weight elements), bytes to break ties
        outside = np.array([[1.0] + [0.0 if c.fp8_matmul else 1.0 for c in cands]])
        cost = outside * elements[:, None] + 1e-9 * nbytes
    worse = np.concatenate([np.zeros((len(elements), 1), bool), cost[:, 1:] >= cost[:, :1]], axis=1)
    cost[worse] = np.inf  # only lowerings: a candidate must save over the base
    return cost, pred, nbytes


def order(cost: np.ndarray, pred: np.ndarray, budget: float = math.inf) -> list[tuple[int, int]]:
    """The greedy efficiency order of moves (row, column) from column 0 (see the module doc).

    Args:
      cost, pred: (L, K) tables; column 0 is the starting point (pred 0); inf cost = never.
      budget: the summed `pred` the moves may add (a move that does not fit is skipped,
        later ones still considered); inf: every move down to each row's cheapest column.

    Returns:
      [(row, column)] in the order taken; a row may move more than once.
    """
    choice = np.zeros(len(cost), int)
    rows = np.arange(len(cost))
    spent, moves = 0.0, []
    while True:
        saved = cost[rows, choice][:, None] - cost
        added = pred - pred[rows, choice][:, None]
        ok = (saved > 0) & np.isfinite(cost) & (added <= budget - spent)
        if not ok.any():
            return moves
        efficiency = np.where(ok, saved / np.maximum(added, 1e-30), -np.inf)
        r, c = np.unravel_index(np.argmax(efficiency), efficiency.shape)
        spent += added[r, c]
        choice[r] = c
        moves.append((int(r), int(c)))


def solve(cost: np.ndarray, pred: np.ndarray, budget: float) -> np.ndarray:
    """Per-row column choices minimizing total cost with summed `pred` <= budget (greedy).

    Args:
      cost, pred: (L, K) tables; column 0 is the starting point (pred 0); inf cost = never.

    Returns:
      (L,) chosen column indices.
    """
    return _apply(np.zeros(len(cost), int), order(cost, pred, budget))


def _apply(choice: np.ndarray, moves: Sequence[tuple[int, int]]) -> np.ndarray:
    choice = choice.copy()
    for r, c in moves:
        choice[r] = c
    return choice


def default_max_measurements(moves: int) -> int:
    """ceil(log2(moves + 1)) + 4: the whole order, a bisection over its prefixes and a few refinements."""
    return math.ceil(math.log2(moves + 1)) + 4


def search(sensitivity, budget: float, cost: str = "bytes", *, base: Policy | None = None,
           measure: Callable[[Policy], float | tuple[float, float]] | None = None,
           candidates: Sequence[str] | str | None = None, max_measurements: int | None = None,
           confidence: float = 1.0, name: str = "auto") -> SearchResult:
    """The cheapest layer-wise policy within a perplexity budget (see the module doc).

    Args:
      sensitivity: an `mpx.sensitivity.Sensitivity`.
      budget: perplexity change in percent (>= 0).
      cost: "bytes" (linear-layer weight bytes) or "fp8-flops" (maximize the FP8 share
        of matmul work).
      base: the policy of unlowered layers (default the fp32 preset: the estimates are
        relative to f32 arithmetic).
      measure: `policy -> measured loss increase (nats)` on held-out batches, or
        `(increase, standard error)`; measured loss then decides (see the module doc).
      candidates: names to choose from; default (None or "native") the analysed
        candidates hardware runs as is (bf16, E4M3, E5M2: see `Candidate.native`), or
        every searchable one analysed if none of them is; "all": every searchable
        candidate analysed, simulated formats (FP9, FP6, FP4) included.
      max_measurements: most policies measured (default `default_max_measurements` of the
        order's length).
      confidence: standard errors a measurement's mean must stay below the budget by
        (>= 0; 0 trusts the mean; ignored where `measure` gives no error).
      name: the policy's name.

    Returns:
      A `SearchResult`.

    Raises:
      ValueError: a bad budget, objective or max_measurements, or a candidate that was
        not analysed or that no policy can express.
    """
    check_choice("cost", cost, OBJECTIVES)
    target = budget_nats(budget)
    if max_measurements is not None and (isinstance(max_measurements, bool) or not isinstance(
            max_measurements, int) or max_measurements < 1):
        raise ValueError(f"max_measurements must be an integer >= 1; got {max_measurements!r}")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not (
            math.isfinite(confidence) and confidence >= 0):
        raise ValueError(f"confidence must be a finite number >= 0 (standard errors); got {confidence!r}")
    base = base or preset("fp32")
    names = search_candidates(sensitivity.candidates, candidates)
    costs, pred, nbytes = _tables(sensitivity, base, cost, names)
    ctx = _Context(sensitivity, names, costs, pred, nbytes, base, name)
    moves = order(costs, pred)
    cap = default_max_measurements(len(moves)) if max_measurements is None else max_measurements
    zero = np.zeros(len(costs), int)
    if measure is None:
        choice = solve(costs, pred, target)
        rnd = ctx.round(choice, len(order(costs, pred, target)), None, 0.0, "predicted")
        return ctx.result(choice, budget, [rnd], None, len(moves), cap)
    if target <= 0 or not moves:  # nothing fits a zero budget; nothing to lower
        return ctx.result(zero, budget, [], 0.0, len(moves), cap)
    choice, measured, rounds = _measured_search(ctx, moves, target, measure, cap, float(confidence))
    return ctx.result(choice, budget, rounds, measured, len(moves), cap)


@dataclasses.dataclass(frozen=True)
class _Context:
    """The tables of one search and how a choice becomes a policy, a round, a result."""

    sens: Any
    names: list[str]
    cost: np.ndarray
    pred: np.ndarray
    nbytes: np.ndarray
    base: Policy
    name: str

    def predicted(self, choice: np.ndarray) -> float:
        return float(self.pred[np.arange(len(choice)), choice].sum())

    def total_cost(self, choice: np.ndarray) -> float:
        return float(self.cost[np.arange(len(choice)), choice].sum())

    def policy(self, choice: np.ndarray) -> Policy:
        return _policy(self.sens, self.names, choice, self.base, self.name)

    def fp8_fraction(self, choice: np.ndarray) -> float:
        elements = np.array([layer.weight_elements for layer in self.sens.layers], float)
        eight = np.array([c > 0 and self.sens.candidates[self.sens.column(self.names[c - 1])].bits == 8
                          for c in choice])
        base_eight = np.array([self.base.resolve(layer.path, layer.role).recipe is not None
                               for layer in self.sens.layers])
        return float(elements[np.where(choice > 0, eight, base_eight)].sum() / elements.sum())

    def round(self, choice, moves: int, measured, seconds: float, step: str, se: float | None = None) -> Round:
        rows = np.arange(len(choice))
        return Round(moves, self.predicted(choice), measured, self.fp8_fraction(choice),
                     float(self.nbytes[rows, choice].sum()), seconds, step, se)

    def result(self, choice, budget, rounds, measured, n_moves: int, cap: int) -> SearchResult:
        rows = np.arange(len(choice))
        assignment = {layer.path: ("base" if c == 0 else self.names[c - 1])
                      for layer, c in zip(self.sens.layers, choice)}
        policy = self.policy(choice) if choice.any() else self.base.with_rules(name=self.name)
        return SearchResult(policy, assignment, float(budget), self.predicted(choice), measured, rounds,
                            float(self.nbytes[rows, choice].sum()), float(self.nbytes[:, 0].sum()),
                            self.fp8_fraction(choice), n_moves, cap)


def _measured_search(ctx: _Context, moves, target: float, measure, cap: int, confidence: float):
    """(choice, measured nats, rounds) of the measured search (steps 1-3 of the module doc);
    decisions compare each measurement's mean plus `confidence` standard errors."""
    n = len(moves)
    prefix = [np.zeros(len(ctx.cost), int)]
    for r, c in moves:
        prefix.append(prefix[-1].copy())
        prefix[-1][r] = c
    predicted = [ctx.predicted(p) for p in prefix]
    rounds: list[Round] = []

    def run(choice, k: int, step: str) -> float:
        t0 = time.perf_counter()
        mean, se = _mean_and_error(measure(ctx.policy(choice)))
        rounds.append(ctx.round(choice, k, mean, time.perf_counter() - t0, step, se))
        value = mean + confidence * (se or 0.0)
        return value if math.isfinite(value) else math.inf

    lo, m_lo, hi, m_hi = 0, 0.0, n, run(prefix[n], n, "all")
    if m_hi <= target:
        return prefix[n], rounds[-1].measured_nats, rounds
    mean_lo = 0.0  # the base: not measured, no increase
    while hi - lo > 1 and len(rounds) < cap:
        k = _probe(predicted, lo, m_lo, hi, m_hi, target)
        m = run(prefix[k], k, "bisect")
        if m <= target:
            lo, m_lo, mean_lo = k, m, rounds[-1].measured_nats
        else:
            hi, m_hi = k, m
    best, m_best, mean_best = prefix[lo], m_lo, mean_lo
    # 3. skip the move that crossed (moves[lo]) and fill the measured room with later moves,
    # predictions scaled by what the best feasible policy measured against its prediction
    room = _room(target, m_best, ctx.predicted(best))
    later = moves[hi:] if hi == lo + 1 else []
    while later and len(rounds) < cap:
        fill = _fill(ctx, best, later, room)
        if ctx.total_cost(fill) >= ctx.total_cost(best):
            break
        m = run(fill, lo, "refine")
        if m <= target:
            best, m_best, mean_best = fill, m, rounds[-1].measured_nats
            room = _room(target, m_best, ctx.predicted(best))
        else:
            room /= 2
    return best, mean_best, rounds


def _mean_and_error(value) -> tuple[float, float | None]:
    """(mean, standard error or None) of what `measure` returned: a number or a pair."""
    if isinstance(value, (tuple, list)):
        mean, se = (float(v) for v in value)
        return mean, (se if math.isfinite(se) else math.inf)
    return float(value), None


def _room(target: float, measured: float, predicted: float) -> float:
    """Predicted nats left in the budget: the measured room over the measured-to-predicted ratio."""
    ratio = measured / predicted if measured > 0 and predicted > 0 else 1.0
    return max(target - measured, 0.0) / ratio


def _probe(predicted: list[float], lo: int, m_lo: float, hi: int, m_hi: float, target: float) -> int:
    """The prefix length to measure next in (lo, hi): where the measured losses of lo and hi,
    interpolated over their predictions, reach the budget, kept in the interval's middle half."""
    quarter = max(1, (hi - lo) // 4)
    first, last = lo + quarter, hi - quarter
    if last <= first:
        return (lo + hi) // 2
    span = predicted[hi] - predicted[lo]
    if span <= 0:
        return (lo + hi) // 2
    goal = predicted[lo] + (target - m_lo) * span / (m_hi - m_lo)
    k = lo + int(np.searchsorted(predicted[lo:hi + 1], goal, side="right")) - 1
    return min(max(k, first), last)


def _fill(ctx: _Context, choice: np.ndarray, moves, room: float) -> np.ndarray:
    """`choice` plus the `moves` (in order) that still lower their layer and fit `room` of prediction."""
    choice = choice.copy()
    for r, c in moves:
        added = ctx.pred[r, c] - ctx.pred[r, choice[r]]
        if ctx.cost[r, c] < ctx.cost[r, choice[r]] and added <= room:
            choice[r] = c
            room -= added
    return choice


def search_candidates(candidates, names: Sequence[str] | str | None = None) -> list[str]:
    """The names `search` chooses from, checked against the analysed candidates.

    Args:
      candidates: the analysed `mpx.sensitivity.Candidate`s (`Sensitivity.candidates`,
        or `mpx.sensitivity.get_candidates(...)` before an analysis runs).
      names: None or "native" (the searchable candidates hardware runs as is, or every
        searchable one if none is native), "all", or names (a sequence or a
        comma-separated string).

    Raises:
      ValueError: an empty list, or a name that was not analysed or is weight-only.
    """
    analysed = {c.name: c for c in candidates}
    searchable = [c.name for c in candidates if c.searchable]
    if names is None or names == "native":
        names = [c.name for c in candidates if c.searchable and c.native] or searchable
    elif names == "all":
        names = searchable
    elif isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not list(names):
        raise ValueError(f"no candidates to search; give 'native', 'all' or names of: {', '.join(searchable)}")
    for n in names:
        if n not in analysed:
            raise ValueError(f"candidate {n!r} was not analysed; analysed: {', '.join(analysed)}")
        if not analysed[n].searchable:
            raise ValueError(f"candidate {n!r} has no recipe a policy can express (weight-only); "
                             f"searchable: {', '.join(searchable)}")
    return list(names)


# --------------------------------------------------------------------------- readable rules


def _policy(sens, names, choice, base: Policy, name: str) -> Policy:
    groups: dict[str, list[str]] = {}
    for layer, c in zip(sens.layers, choice):
        if c:
            groups.setdefault(names[c - 1], []).append(layer.path)
    rules = []
    for cand_name in names:
        cand = sens.candidates[sens.column(cand_name)]
        for pattern in group_patterns(groups.get(cand_name, [])):
            rules.append(_rule(pattern, cand))
    return base.with_rules(*rules, name=name)


def _rule(pattern: str, cand: Any) -> Rule:
    if cand.recipe is not None:
        return Rule(pattern, recipe=cand.recipe)
    return Rule(pattern, compute_dtype=cand.compute, recipe=None)
