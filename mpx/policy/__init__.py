"""Layer-wise precision policy: which dtypes and FP8 recipe each module path gets.

A `Policy` is an ordered tuple of `Rule`s and a default `Precision`. `resolve(path)`
returns the default with the fields of the first matching rule laid over it; rules set
only the fields they name and inherit the rest from the default.

Paths are module paths joined with "/" ("layers_3/attn/v_proj", "embed"); a rule may
also name a role (`ROLES`: linear, attention, norm, router, embed, head), which every
`mpx.nn` layer declares, and then matches only layers of that role. Patterns:

* "re:REGEX": `re.fullmatch(REGEX, path)` against the full path (no suffix rule;
  write "re:(.*/)?v_proj" for "v_proj anywhere").
* "/GLOB" (leading slash): anchored, `fnmatch(path, GLOB)` on the full path only.
* "GLOB": matches the full path, or any path ending in "/" + something matching
  GLOB, i.e. `fnmatch(path, GLOB) or fnmatch(path, "*/" + GLOB)`. So "v_proj" and
  "attn/v_proj" both match "layers_3/attn/v_proj", but "proj" matches neither.

Globs are `fnmatch.fnmatchcase` (case-sensitive); `*` matches across "/".

Presets (`preset(name)`, names in `PRESET_NAMES`) follow DeepSeek-V3's precision map
(`mpx.policy.presets`: FP8 projections, FFN, experts and attention's PV; bf16 QK^T,
embeddings and head; f32 norms, router and logits); YAML files under `configs/policies/` mirror them (`load`, `from_dict`, `to_dict`).

Modules: `precision` (Precision, dtypes, the "p=..,c=.." grammar), `rules` (Rule,
Policy, path matching), `presets`, `files` (YAML), `auto` (`search`: a layer-wise
policy from a sensitivity analysis under a perplexity budget).

Example:
    >>> import mpx.policy as P
    >>> p = P.preset("fp8")
    >>> p.resolve("layers_0/mlp/up", "linear").recipe.name, str(p.resolve("final_norm", "norm").compute_dtype)
    ('deepseek_v3', 'float32')
"""

from mpx.policy.files import from_dict, get, load, to_dict
from mpx.policy.precision import (
    DTYPE_FIELDS,
    FIELDS,
    INHERIT,
    Precision,
    dtype_name,
    parse_dtype,
    recipe_label,
)
from mpx.policy.presets import (
    BF16,
    F16,
    F32,
    PRESET_NAMES,
    PRESETS,
    bf16,
    fp8,
    fp8_current,
    fp8_delayed,
    fp16,
    fp32,
    preset,
)
from mpx.policy.rules import ROLES, Policy, Rule, check_role, match_path, module_paths
from mpx.policy.auto import (  # noqa: E402  (after Policy: it builds policies)
    OBJECTIVES,
    SearchResult,
    search,
    search_candidates,
)

__all__ = [
    "BF16", "F16", "F32", "INHERIT", "OBJECTIVES", "PRESETS", "PRESET_NAMES", "Policy", "Precision", "ROLES", "Rule",
    "check_role",
    "SearchResult", "bf16", "get", "search", "search_candidates",
    "dtype_name", "fp16", "fp32", "fp8", "fp8_current", "fp8_delayed", "from_dict", "load", "match_path",
    "module_paths", "parse_dtype", "preset", "recipe_label", "to_dict",
]
