"""Rule patterns for sets of layer paths: "<prefix><i><suffix>" paths with a shared
suffix set become one regex per run of indices ("re:layers_([0-9]|1[0-5])/(mlp/up|mlp/gate)"),
so a searched policy reads as a few rules instead of one per layer."""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["group_patterns", "index_regex"]

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
