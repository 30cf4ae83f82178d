"""Sensitivity analysis: how much each linear layer's loss suffers in each narrow format.

Model-agnostic: any Flax model whose matmuls go through `mpx.nn` layers, layers named by
module path. `analyze(apply_fn, variables, batches)` estimates, for every layer and
candidate precision (`candidates.CANDIDATES`), the loss increase of lowering that layer
alone (a Fisher-weighted noise estimate from one forward and backward pass per batch),
checks the estimate against exact one-layer measurements on a subset (Spearman rank
correlation), and summarizes each layer's weights and activations (amax, kurtosis,
outliers, saturation, flush to zero). `mpx.policy.search` turns the result into a
layer-wise `Policy` under a loss budget.

Modules: `candidates` (formats and their costs), `capture` (finding and tapping layers
by method interception), `stats` (tensor statistics), `measure` (analyze: estimate, exact
measurement, SmoothQuant smoothing).
"""

from mpx.sensitivity.measure import (
    Sensitivity,
    analyze,
    estimate,
    exact,
    smoothable,
    smoothing_factors,
    spearman,
)
from mpx.sensitivity.candidates import CANDIDATES, Candidate, Operand
from mpx.sensitivity.candidates import get as get_candidates
from mpx.sensitivity.capture import Layer, assigned_loss, find_layers, next_token_nll
from mpx.sensitivity.stats import tensor_stats

__all__ = [
    "CANDIDATES", "Candidate", "Layer", "Operand", "Sensitivity", "analyze", "assigned_loss", "estimate", "exact",
    "find_layers", "get_candidates", "next_token_nll", "smoothable", "smoothing_factors", "spearman", "tensor_stats",
]
