"""Two-operand `einsum` over the quantized `dot_general` (e.g. "btk,kn->btn")."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mpx.dot.general import dot_general
from mpx.dot.spec import DotState

__all__ = ["einsum"]


def _parse_einsum(subscripts: str) -> tuple[str, str, str]:
    spec = subscripts.replace(" ", "")
    if "..." in spec:
        raise ValueError(f"einsum subscripts with '...' are not supported; got {subscripts!r}")
    inputs, arrow, out = spec.partition("->")
    terms = inputs.split(",")
    if len(terms) != 2:
        raise ValueError(f"einsum takes exactly two operands; got subscripts {subscripts!r}")
    a, b = terms
    if not arrow:
        out = "".join(sorted(c for c in set(a + b) if (a + b).count(c) == 1))
    for term in (a, b, out):
        if not all(c.isalpha() for c in term) or len(set(term)) != len(term):
            raise ValueError(f"einsum terms must be distinct letters per operand; got {subscripts!r}")
    if set(out) - set(a + b):
        raise ValueError(f"einsum output letters {sorted(set(out) - set(a + b))} are in no input")
    return a, b, out


def _sum_unused(x: jax.Array, term: str, other: str, out: str) -> tuple[jax.Array, str]:
    """Sums out letters that appear in neither the other operand nor the output."""
    drop = tuple(i for i, c in enumerate(term) if c not in other and c not in out)
    if drop:
        x = jnp.sum(x, axis=drop)
        term = "".join(c for i, c in enumerate(term) if i not in drop)
    return x, term


def einsum(subscripts: str, lhs, rhs, *, recipe=None, state: DotState | None = None,
           preferred_element_type=None, rhs_kind: str = "weight", impl: str = "auto"):
    """Two-operand einsum computed by `dot_general` (e.g. "btk,kn->btn").

    Letters in both operands and the output are batch dims, letters in both operands
    only are contracted; a letter in one operand only and not in the output is summed
    out first (in high precision).

    Args:
      subscripts: "ab,bc->ac" style, no ellipsis; implicit output (no "->") as numpy.
      lhs, rhs, recipe, state, preferred_element_type, rhs_kind, impl: as `dot_general`.

    Returns:
      The einsum result; `(out, new_state)` when `state` is given.

    Raises:
      ValueError: for malformed subscripts or operand ranks that do not match them.
    """
    a, b, out = _parse_einsum(subscripts)
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    for term, x, name in ((a, lhs, "lhs"), (b, rhs, "rhs")):
        if len(term) != x.ndim:
            raise ValueError(f"einsum term {term!r} has {len(term)} letters but {name} has shape {x.shape}")
    lhs, a = _sum_unused(lhs, a, b, out)
    rhs, b = _sum_unused(rhs, b, a, out)
    batch = [c for c in a if c in b and c in out]
    contract = [c for c in a if c in b and c not in out]
    dims = ((tuple(a.index(c) for c in contract), tuple(b.index(c) for c in contract)),
            (tuple(a.index(c) for c in batch), tuple(b.index(c) for c in batch)))
    result = dot_general(lhs, rhs, dims, recipe=recipe, state=state, rhs_kind=rhs_kind,
                         preferred_element_type=preferred_element_type, impl=impl)
    y, new_state = result if state is not None else (result, None)
    produced = "".join(batch) + "".join(c for c in a if c not in b) + "".join(c for c in b if c not in a)
    y = jnp.transpose(y, tuple(produced.index(c) for c in out))
    return y if state is None else (y, new_state)
