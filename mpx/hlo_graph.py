"""HLO and StableHLO text as a graph of instructions (what `mpx.inspect` walks).

`parse(text)` reads the text of a lowered or compiled computation (StableHLO's
`func.func` form or XLA's HLO) into a `Graph`: one `Node` per instruction with its
opcode, result and operand dtypes, shapes (HLO text only), attributes and computation,
plus the links between fusions or calls and the computations they run.
"""

from __future__ import annotations

import dataclasses
import re

__all__ = ["Graph", "Node", "closing", "is_f8", "parse", "parse_hlo", "parse_mlir", "split_top"]


@dataclasses.dataclass
class Node:
    name: str
    opcode: str
    dtypes: tuple[str, ...]  # element types of the result (several for tuples)
    operands: list[str]
    operand_dtypes: list[str | None]  # inline operand types, when printed
    attrs: str
    computation: str
    param_index: int | None = None
    is_root: bool = False
    shape: tuple[int, ...] | None = None  # of the (first) result, HLO text only
    operand_shapes: list[tuple[int, ...] | None] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Graph:
    nodes: dict[tuple[str, str], Node] = dataclasses.field(default_factory=dict)
    order: list[Node] = dataclasses.field(default_factory=list)
    callers: dict[str, list[Node]] = dataclasses.field(default_factory=dict)  # computation -> callers
    callees: dict[tuple[str, str], str] = dataclasses.field(default_factory=dict)  # caller -> computation
    roots: dict[str, Node] = dataclasses.field(default_factory=dict)

    def add(self, node: Node) -> None:
        self.nodes[(node.computation, node.name)] = node
        self.order.append(node)

    def get(self, computation: str, name: str) -> Node | None:
        return self.nodes.get((computation, name))


def is_f8(dtype: str | None) -> bool:
    return bool(dtype) and dtype.lower().startswith("f8")


def split_top(text: str) -> list[str]:
    """Splits on commas that are not nested in (), [], {} or <>."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    tail = text[start:].strip()
    return parts + [tail] if tail else parts


def closing(text: str, open_at: int) -> int:
    """Index of the bracket closing the one at `open_at`."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] in "([{<":
            depth += 1
        elif text[i] in ")]}>":
            depth -= 1
            if depth == 0:
                return i
    return len(text) - 1


# --------------------------------------------------------------------------- HLO text

_HLO_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-$]+)\s*(?:\(.*\)\s*->\s*.*)?\{\s*$")
_HLO_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-$]+)\s*=\s*(.*)$")
_HLO_DTYPE = re.compile(r"([a-z][a-z0-9]*)\[")


_HLO_SHAPE = re.compile(r"[a-z][a-z0-9]*\[([\d,]*)\]")


def _hlo_dtypes(type_text: str) -> tuple[str, ...]:
    return tuple(_HLO_DTYPE.findall(type_text))


def _hlo_shape(type_text: str) -> tuple[int, ...] | None:
    m = _HLO_SHAPE.search(type_text)
    return None if m is None else tuple(int(d) for d in m.group(1).split(",") if d)


def _parse_hlo_instr(name: str, rest: str, computation: str) -> Node | None:
    if rest.startswith("("):  # tuple result type
        end = closing(rest, 0)
        type_text, rest = rest[: end + 1], rest[end + 1:].lstrip()
    else:
        type_text, _, rest = rest.partition(" ")
    m = re.match(r"([\w\-]+)\(", rest)
    if not m:
        return None
    open_at = m.end() - 1
    close = closing(rest, open_at)
    operands, operand_dtypes, operand_shapes = [], [], []
    for tok in split_top(rest[open_at + 1: close]):
        words = tok.split()
        operands.append(words[-1].lstrip("%") if words else tok)
        inline = _hlo_dtypes(" ".join(words[:-1])) if len(words) > 1 else ()
        operand_dtypes.append(inline[0] if len(inline) == 1 else None)
        operand_shapes.append(_hlo_shape(" ".join(words[:-1])) if len(inline) == 1 else None)
    node = Node(name, m.group(1), _hlo_dtypes(type_text), operands, operand_dtypes,
                 rest[close + 1:], computation, shape=_hlo_shape(type_text), operand_shapes=operand_shapes)
    if node.opcode == "parameter" and operands and operands[0].isdigit():
        node.operands, node.param_index = [], int(operands[0])
    return node


def parse_hlo(text: str) -> Graph:
    graph, computation = Graph(), ""
    for line in text.splitlines():
        m = _HLO_INSTR.match(line)
        if m and computation:
            node = _parse_hlo_instr(m.group(1), m.group(2), computation)
            if node is not None:
                node.is_root = line.lstrip().startswith("ROOT ")
                graph.add(node)
            continue
        c = _HLO_COMP.match(line)
        if c and not line.lstrip().startswith("HloModule"):
            computation = c.group(1)
        elif line.strip() == "}":
            computation = ""
    for node in graph.order:
        if node.is_root:
            graph.roots[node.computation] = node
        called = re.search(r"\b(?:calls|to_apply)=%?([\w.\-$]+)", node.attrs)
        if called and node.opcode in ("fusion", "call"):
            graph.callers.setdefault(called.group(1), []).append(node)
            graph.callees[(node.computation, node.name)] = called.group(1)
    return graph


# --------------------------------------------------------------------------- StableHLO text

_MLIR_FUNC = re.compile(r"func\.func\s+(?:\w+\s+)?@([\w.\-$]+)\((.*?)\)\s*(?:->|\{|attributes)")
_MLIR_OP = re.compile(r"^\s*(%[\w#.:\-]+(?:\s*,\s*%[\w#.:\-]+)*)\s*=\s*\"?([\w.]+)\"?(.*)$")
_MLIR_TENSOR = re.compile(r"tensor<(?:[^<>]*x)?([a-zA-Z][\w]*)>")


def _mlir_dtype(type_text: str) -> str | None:
    m = _MLIR_TENSOR.search(type_text)
    return m.group(1).lower() if m else None


def _parse_mlir_op(results: str, opcode: str, rest: str, func: str) -> Node:
    body, _, signature = rest.rpartition(" : ")
    if not body:
        body, signature = rest, ""
    operands = [o.lstrip("%") for o in re.findall(r"%[\w#.\-]+", body)]
    ins, arrow, out = signature.partition("->")
    out_text = out if arrow else signature
    operand_dtypes: list[str | None] = [None] * len(operands)
    if arrow:
        in_types = split_top(ins.strip().strip("()")) if ins.strip().startswith("(") else [ins]
        operand_dtypes = [_mlir_dtype(t) for t in in_types][: len(operands)]
        operand_dtypes += [None] * (len(operands) - len(operand_dtypes))
    out_dtype = _mlir_dtype(out_text)
    name = results.split(",")[0].strip().lstrip("%").split(":")[0]
    opcode = opcode.removeprefix("stablehlo.").removeprefix("mhlo.").replace("_", "-")
    if opcode == "dot-general":
        opcode = "dot"
    if opcode == "custom-call":
        target = re.search(r"(?:call_target_name\s*=\s*\"|@)([^\s\"(]+)", body)
        rest = f'custom_call_target="{target.group(1)}"' if target else ""
    return Node(name, opcode, (out_dtype,) if out_dtype else (), operands, operand_dtypes, rest, func)


def parse_mlir(text: str) -> Graph:
    graph, func = Graph(), ""
    for line in text.splitlines():
        f = _MLIR_FUNC.search(line)
        if f:
            func = f.group(1)
            for arg in split_top(f.group(2)):
                arg_name, _, arg_type = arg.partition(":")
                graph.add(Node(arg_name.strip().lstrip("%"), "parameter",
                                (_mlir_dtype(arg_type) or "",), [], [], "", func))
            continue
        m = _MLIR_OP.match(line)
        if m and func:
            graph.add(_parse_mlir_op(m.group(1), m.group(2), m.group(3), func))
    return graph


def parse(text: str) -> Graph:
    """The graph of StableHLO (`func.func ...`) or HLO text."""
    return parse_mlir(text) if "func.func" in text else parse_hlo(text)
