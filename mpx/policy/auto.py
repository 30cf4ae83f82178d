"""An automatic layer-wise policy: the cheapest precisions whose loss increase fits a budget.

`search(sensitivity, budget_pct)` takes an `mpx.sensitivity.Sensitivity` (per layer and
candidate, a predicted loss increase) and chooses each linear layer's candidate to
minimize a cost (weight bytes, or the matmul work left outside FP8) with the summed
predicted increase within the budget, a perplexity change in percent (a loss budget
of ln(1 + pct / 100) nats). Only candidates a `Policy` can express (a recipe, or a
compute dtype) are chosen; a layer may also stay at the base policy.

Solver: greedy on efficiency. From the base, repeatedly take the one move (a layer to a
cheaper candidate) with the most cost saved per nat of predicted loss that still fits
the remaining budget, until none fits. Per-layer predictions are floored at their
second-order (Fisher) term, so no lowering is free: a budget of 0 lowers nothing.

Sensitivities do not add exactly. With a `measure(policy) -> loss increase` callback
(held-out batches, the real model under the policy), the chosen policy is measured; while
the measurement exceeds the budget, the predicted budget is tightened by the ratio and
the search runs again (at most `rounds` times, then the base policy). Every round's
predicted and measured increase is kept (`SearchResult.rounds`).

The policy's rules group layers: paths "<prefix><i><suffix>" ("layers_12/mlp/up") with
the same candidate become one regex rule per set of consecutive indices
("re:layers_([0-9]|1[0-5])/(mlp/up|mlp/gate)").
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from mpx.config import check_choice
from mpx.policy.presets import preset
from mpx.policy.rules import Policy, Rule

OBJECTIVES = ("bytes", "fp8-flops")


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """What `search` chose and how it measured.

    Attributes:
      policy: the chosen policy (base plus one rule per group of lowered layers).
      assignment: {layer path: candidate name, or "base"}.
      budget_pct: the perplexity budget in percent.
      predicted_nats, measured_nats: loss increase of the final policy (measured: None
        without a measure callback).
      rounds: [(predicted nats, measured nats or None)] per search round.
      weight_bytes: linear-layer weight bytes under the policy.
      base_weight_bytes: the same under the base policy.
      fp8_weight_fraction: share of linear-layer weight elements stored in an 8-bit format.
    """

    policy: Policy
    assignment: dict[str, str]
    budget_pct: float
    predicted_nats: float
    measured_nats: float | None
    rounds: list[tuple[float, float | None]]
    weight_bytes: float
    base_weight_bytes: float
    fp8_weight_fraction: float

    @property
    def predicted_ppl_change_pct(self) -> float:
        return 100 * math.expm1(self.predicted_nats)

    @property
    def measured_ppl_change_pct(self) -> float | None:
        return None if self.measured_nats is None else 100 * math.expm1(self.measured_nats)


def budget_nats(budget_pct: float) -> float:
    """The loss budget of a perplexity budget in percent: ln(1 + pct / 100).

    Raises:
      ValueError: a budget that is not a finite number >= 0.
    """
    if isinstance(budget_pct, bool) or not isinstance(budget_pct, (int, float)) or not (
            math.isfinite(budget_pct) and budget_pct >= 0):
        raise ValueError(f"budget must be a perplexity change in percent, a finite number >= 0; got {budget_pct!r}")
    return math.log1p(budget_pct / 100)


def _base_bytes(base: Policy, path: str, elements: int) -> float:
    precision = base.resolve(path)
    return elements * (1 if precision.recipe is not None else jnp.dtype(precision.compute_dtype).itemsize)


def _tables(sens, base: Policy, objective: str, names: Sequence[str]):
    """(cost (L, 1 + C'), predicted (L, 1 + C'), bytes (L, 1 + C')), column 0 the base."""
    cols = [sens.column(n) for n in names]
    cands = [sens.candidates[c] for c in cols]
    elements = np.array([layer.weight_elements for layer in sens.layers], float)
    nbytes = np.array([[_base_bytes(base, layer.path, layer.weight_elements)] +
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


def solve(cost: np.ndarray, pred: np.ndarray, budget: float) -> np.ndarray:
    """Per-row column choices minimizing total cost with summed `pred` <= budget (greedy).

    Args:
      cost, pred: (L, K) tables; column 0 is the starting point (pred 0); inf cost = never.

    Returns:
      (L,) chosen column indices.
    """
    choice = np.zeros(len(cost), int)
    rows = np.arange(len(cost))
    spent = 0.0
    while True:
        saved = cost[rows, choice][:, None] - cost
        added = pred - pred[rows, choice][:, None]
        ok = (saved > 0) & np.isfinite(cost) & (added <= budget - spent)
        if not ok.any():
            return choice
        efficiency = np.where(ok, saved / np.maximum(added, 1e-30), -np.inf)
        r, c = np.unravel_index(np.argmax(efficiency), efficiency.shape)
        spent += added[r, c]
        choice[r] = c


def search(sensitivity, budget: float, cost: str = "bytes", *, base: Policy | None = None,
           measure: Callable[[Policy], float] | None = None, candidates: Sequence[str] | str | None = None,
           rounds: int = 6, name: str = "auto") -> SearchResult:
    """The cheapest layer-wise policy within a perplexity budget (see the module doc).

    Args:
      sensitivity: an `mpx.sensitivity.Sensitivity`.
      budget: perplexity change in percent (>= 0).
      cost: "bytes" (linear-layer weight bytes) or "fp8-flops" (maximize the FP8 share
        of matmul work).
      base: the policy of unlowered layers (default the fp32 preset: the estimates are
        relative to f32 arithmetic).
      measure: `policy -> measured loss increase (nats)` on held-out batches; enables
        the tightening rounds.
      candidates: names to choose from; default (None or "native") the analysed
        candidates hardware runs as is (bf16, E4M3, E5M2: see `Candidate.native`), or
        every searchable one analysed if none of them is; "all": every searchable
        candidate analysed, simulated formats (FP9, FP6, FP4) included.
      rounds: most search rounds with measurement.
      name: the policy's name.

    Returns:
      A `SearchResult`.

    Raises:
      ValueError: a bad budget or objective, or a candidate that was not analysed or
        that no policy can express.
    """
    check_choice("cost", cost, OBJECTIVES)
    target = budget_nats(budget)
    base = base or preset("fp32")
    names = search_candidates(sensitivity.candidates, candidates)
    costs, pred, nbytes = _tables(sensitivity, base, cost, names)
    inner, history = target, []
    for _ in range(max(rounds, 1)):
        choice = solve(costs, pred, inner)
        policy = _policy(sensitivity, names, choice, base, name)
        predicted = float(pred[np.arange(len(choice)), choice].sum())
        measured = None if measure is None or not choice.any() else float(measure(policy))
        history.append((predicted, 0.0 if measure is not None and not choice.any() else measured))
        if measured is None or measured <= target:
            return _result(sensitivity, names, choice, policy, budget, history, nbytes, base)
        inner *= min(0.8, target / measured) if measured > 0 else 0.8
    choice = np.zeros(len(costs), int)
    history.append((0.0, 0.0))
    return _result(sensitivity, names, choice, base.with_rules(name=name), budget, history, nbytes, base)


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


def _result(sens, names, choice, policy, budget, history, nbytes, base) -> SearchResult:
    rows = np.arange(len(choice))
    assignment = {layer.path: ("base" if c == 0 else names[c - 1]) for layer, c in zip(sens.layers, choice)}
    elements = np.array([layer.weight_elements for layer in sens.layers], float)
    eight = np.array([c > 0 and sens.candidates[sens.column(names[c - 1])].bits == 8 for c in choice])
    base_eight = np.array([base.resolve(layer.path).recipe is not None for layer in sens.layers])
    fp8 = np.where(choice > 0, eight, base_eight)
    predicted, measured = history[-1]
    return SearchResult(policy, assignment, float(budget), predicted, measured, history,
                        float(nbytes[rows, choice].sum()), float(nbytes[:, 0].sum()),
                        float(elements[fp8].sum() / elements.sum()))


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


_INDEXED = re.compile(r"^(.*?)(\d+)(/.*)?$")


def group_patterns(paths: Sequence[str]) -> list[str]:
    """Few rule patterns matching exactly `paths` (first by prefix, then by index set).

    "layers_3/mlp/up", "layers_4/mlp/up", "layers_3/mlp/gate", "layers_4/mlp/gate" ->
    ["re:layers_([3-4])/(mlp/up|mlp/gate)"]; a single layer, or a path without an index,
    is anchored as is ("/layers_9/attn/q_proj", "/lm_head").
    """
    by_suffix: dict[tuple[str, str], list[int]] = {}
    plain = []
    for path in paths:
        match = _INDEXED.match(path)
        if match is None:
            plain.append("/" + path)
            continue
        by_suffix.setdefault((match.group(1), match.group(3) or ""), []).append(int(match.group(2)))
    merged: dict[tuple[str, tuple[int, ...], bool], list[str]] = {}
    for (prefix, suffix), indices in by_suffix.items():  # an empty suffix never shares an alternation
        merged.setdefault((prefix, tuple(sorted(set(indices))), suffix == ""), []).append(suffix)
    patterns = [_pattern(prefix, indices, suffixes)
                for (prefix, indices, _), suffixes in sorted(merged.items(), key=lambda kv: (kv[0][1][0], kv[0][0]))]
    return patterns + plain


def _pattern(prefix: str, indices: tuple[int, ...], suffixes: list[str]) -> str:
    if len(indices) == 1 and len(suffixes) == 1:  # one layer: its own anchored path
        return f"/{prefix}{indices[0]}{suffixes[0]}"
    return f"re:{re.escape(prefix)}({index_regex(indices)}){_alternatives(suffixes)}"


def _alternatives(suffixes: list[str]) -> str:
    if len(suffixes) == 1:
        return re.escape(suffixes[0])
    return "/(" + "|".join(re.escape(s.lstrip("/")) for s in suffixes) + ")"


def index_regex(indices: Sequence[int]) -> str:
    """A regex alternation matching exactly the decimal `indices`, runs as digit ranges.

    [0..15] -> "[0-9]|1[0-5]"; [3, 7, 8] -> "3|[7-8]".
    """
    parts = []
    for lo, hi in _runs(sorted(set(indices))):
        while lo <= hi:
            top = min(hi, lo - lo % 10 + 9)  # the end of lo's decade
            head = str(lo // 10) if lo >= 10 else ""
            parts.append(f"{head}{lo % 10}" if lo == top else f"{head}[{lo % 10}-{top % 10}]")
            lo = top + 1
    return "|".join(parts)


def _runs(values: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], v)
        else:
            runs.append((v, v))
    return runs
