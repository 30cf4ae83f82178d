"""Where a compiled step's work goes: ops, FLOPs and bytes per op category, from its HLO.

Reads XLA's optimized HLO text (`jax.jit(f).lower(...).compile().as_text()`) and sorts
every executed instruction into matmuls, elementwise (fusions and other compute ops),
layout copies (copy, transpose) and collectives. Bytes are each instruction's operands
plus its result, a memory-traffic estimate (a loop that updates a slice of a buffer
in place counts the whole buffer each trip); instructions inside a while loop count once
per known trip of every loop around them. Free instructions (parameters, tuples,
bitcasts) are skipped.

    python -m benchmarks.train_step --model small --ops   # the table per preset
"""

from __future__ import annotations

import math
import re

CATEGORIES = ("matmul", "elementwise", "layout", "collective")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
         "replica-id", "while", "call", "conditional", "opt-barrier"}
_COLLECTIVE = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
          "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def _array_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(text):
        if dtype in _BYTES:
            total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _computations(hlo: str) -> dict[str, list[str]]:
    comps, name = {}, None
    for line in hlo.splitlines():
        match = _COMP.match(line)
        if match:
            name = match.group(1)
            comps[name] = []
        elif name is not None and line.strip() not in ("}", ""):
            comps[name].append(line)
    return comps


def _operands(rest: str) -> list[str]:
    """Names of an instruction's operands (the text up to its closing parenthesis)."""
    depth, end = 1, len(rest)
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            end = i
            break
    return re.findall(r"%([\w.\-]+)", rest[:end])


def _shape(text: str) -> list[int]:
    found = _ARRAY.findall(text)
    return [int(d) for d in found[0][1].split(",") if d] if found else []


def _dot_flops(lines: list[str], types: dict[str, str]) -> float:
    """2 * output size * contraction size for each dot in `lines`."""
    flops = 0.0
    for line in lines:
        match = _INSTR.match(line)
        if not match or match.group(3) not in ("dot", "convolution"):
            continue
        _, result, _, rest = match.groups()
        names = _operands(rest)
        dims = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", rest)
        lhs = _shape(types.get(names[0], "")) if names else []
        if lhs and dims:
            k = math.prod(lhs[int(i)] for i in dims.group(1).split(",") if i)
            flops += 2.0 * math.prod(_shape(result)) * k
    return flops


def _category(opcode: str, rest: str, comps: dict[str, list[str]]) -> str:
    if opcode in ("dot", "convolution"):
        return "matmul"
    if opcode == "fusion" or opcode == "custom-call":
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        body = comps.get(called.group(1), []) if called else []
        if any(" dot(" in line or " convolution(" in line for line in body) or "matmul" in rest:
            return "matmul"
        return "elementwise"
    if opcode in ("copy", "transpose"):
        return "layout"
    if opcode.startswith(_COLLECTIVE):
        return "collective"
    return "elementwise"


def op_table(hlo: str) -> dict[str, dict[str, float]]:
    """{category: {"ops", "gflop", "mbytes"}} for the executed instructions of `hlo`."""
    comps = _computations(hlo)
    types = {m.group(1): m.group(2) for lines in comps.values() for line in lines if (m := _INSTR.match(line))}
    fused = {m for lines in comps.values() for line in lines for m in re.findall(r"calls=%?([\w.\-]+)", line)
             if " fusion(" in line or " custom-call(" in line}
    called = {m for lines in comps.values() for line in lines
              for m in re.findall(r"(?:to_apply|condition|comparator)=%?([\w.\-]+)", line)}
    trips = _trip_counts(comps)
    table = {c: {"ops": 0, "gflop": 0.0, "mbytes": 0.0} for c in CATEGORIES}
    for name, lines in comps.items():
        if name in fused or name in called:
            continue
        n = trips.get(name, 1)
        for line in lines:
            match = _INSTR.match(line)
            if not match or match.group(3) in _FREE:
                continue
            _, result, opcode, rest = match.groups()
            category = _category(opcode, rest, comps)
            row = table[category]
            row["ops"] += n
            moved = _array_bytes(result) + sum(_array_bytes(types.get(o, "")) for o in _operands(rest))
            row["mbytes"] += n * moved / 1e6
            if category == "matmul":
                body = comps.get(m.group(1), []) if (m := re.search(r"calls=%?([\w.\-]+)", rest)) else [line]
                row["gflop"] += n * _dot_flops(body, types) / 1e9
    return table


def _trip_counts(comps: dict[str, list[str]]) -> dict[str, int]:
    """Loop bodies with a known trip count (`known_trip_count` in the while's config),
    times the trips of the loops they run in."""
    loops = {}  # body -> (trip count, the computation that runs the loop)
    for comp, lines in comps.items():
        for line in lines:
            if " while(" not in line:
                continue
            body = re.search(r"body=%?([\w.\-]+)", line)
            count = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            if body:
                loops[body.group(1)] = (int(count.group(1)) if count else 1, comp)

    def total(body: str, depth: int = 0) -> int:
        count, parent = loops[body]
        return count * (total(parent, depth + 1) if parent in loops and depth < 16 else 1)

    return {body: total(body) for body in loops}


def format_table(tables: dict[str, dict[str, dict[str, float]]]) -> str:
    """Rows per preset and category: ops, GFLOP, MB moved."""
    lines = [f"{'preset':<22}{'category':<13}{'ops':>7}{'GFLOP':>9}{'MB moved':>11}"]
    for preset, table in tables.items():
        for cat in CATEGORIES:
            r = table[cat]
            lines.append(f"{preset:<22}{cat:<13}{r['ops']:>7}{r['gflop']:>9.2f}{r['mbytes']:>11.1f}")
    return "\n".join(lines)
