"""Tests for mpx.policy: dtypes, rule matching, presets, explain, YAML round trips."""

import glob
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax.core import FrozenDict

from mpx import policy as P
from mpx import recipes
from models.precision import role_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLICY_DIR = os.path.join(ROOT, "configs", "policies")
F32, BF16, F16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)

# The reference model's module paths (attention einsums qk/pv have no params).
DENSE = ["embed", "layers_0/attn_norm", "layers_0/attn/q_proj", "layers_0/attn/k_proj", "layers_0/attn/v_proj",
         "layers_0/attn/o_proj", "layers_0/attn/qk", "layers_0/attn/pv", "layers_0/mlp_norm", "layers_0/mlp/gate",
         "layers_0/mlp/up", "layers_0/mlp/down", "final_norm", "lm_head"]
MOE = ["layers_1/moe/router", "layers_1/moe/experts/gate", "layers_1/moe/experts/up", "layers_1/moe/experts/down"]
# DeepSeek-V3's additions: multi-head latent attention and shared experts.
MLA = ["layers_1/attn/q_a_proj", "layers_1/attn/q_b_proj", "layers_1/attn/kv_a_proj", "layers_1/attn/kv_b_proj",
       "layers_1/moe/shared/gate", "layers_1/moe/shared/up", "layers_1/moe/shared/down"]


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("name, dtype", [
    ("f32", F32), ("fp32", F32), ("float32", F32), ("FP32", F32), ("bf16", BF16), ("bfloat16", BF16),
    ("fp16", F16), ("f16", F16), ("float16", F16), ("half", F16),
    (jnp.float32, F32), (jnp.bfloat16, BF16), (F16, F16),
])
def test_parse_dtype_accepts(name, dtype):
    assert P.parse_dtype(name) == dtype


@pytest.mark.parametrize("name, fragment", [
    ("e4m3", "recipe"), ("fp8", "recipe"), ("float64", "allowed"), ("int8", "allowed"), (jnp.float64, "allowed"),
    (None, "allowed"), (jnp.float8_e4m3fn, "allowed"),
])
def test_parse_dtype_rejects(name, fragment):
    with pytest.raises(ValueError, match=fragment) as e:
        P.parse_dtype(name)
    assert "bf16" in str(e.value)  # names the allowed ones


# --------------------------------------------------------------------------- Precision


def test_precision_normalizes_and_hashes():
    a = P.Precision(param_dtype="f32", compute_dtype="bf16", output_dtype=jnp.bfloat16, recipe="deepseek_v3")
    b = P.Precision(param_dtype=jnp.float32, compute_dtype=jnp.bfloat16, output_dtype="bfloat16",
                    recipe=recipes.DeepSeekV3())
    assert a == b and hash(a) == hash(b)
    assert a.compute_dtype == jnp.bfloat16 and isinstance(a.recipe, recipes.DeepSeekV3)
    assert P.Precision().recipe is None


def test_precision_bad_field_names_field():
    with pytest.raises(ValueError, match="compute_dtype"):
        P.Precision(compute_dtype="e4m3")
    with pytest.raises(ValueError, match="unknown recipe"):
        P.Precision(recipe="fastest")


@pytest.mark.parametrize("spec, expected", [
    ("p=f32,c=bf16,o=bf16,a=f32,r=deepseek_v3", (F32, BF16, BF16, F32, "deepseek_v3")),
    ("p=bf16", (BF16, BF16, BF16, F32, None)),        # compute <- param, output <- compute
    ("c=bf16", (F32, BF16, BF16, F32, None)),
    ("params=f32, compute=f16, output=f32, recipe=current", (F32, F16, F32, F32, "current")),
    ("r=none", (F32, F32, F32, F32, None)),
])
def test_precision_parse(spec, expected):
    p = P.Precision.parse(spec)
    got = (p.param_dtype, p.compute_dtype, p.output_dtype, p.accum_dtype, p.recipe.name if p.recipe else None)
    assert got == expected


@pytest.mark.parametrize("spec, fragment", [
    ("p=f32,x=bf16", "unknown precision key 'x'"), ("p=f32,p=bf16", "twice"), ("pf32", "key=value"),
    ("c=", "key=value"), ("c=e4m3", "recipe"), ("r=fastest", "unknown recipe"),
])
def test_precision_parse_errors(spec, fragment):
    with pytest.raises(ValueError, match=fragment):
        P.Precision.parse(spec)


def test_precision_str_round_trips():
    for spec in ["p=f32,c=bf16,o=bf16,a=f32,r=deepseek_v3", "p=f32,c=f16,o=f32,a=f32,r=none"]:
        assert str(P.Precision.parse(spec)) == spec
        assert P.Precision.parse(str(P.Precision.parse(spec))) == P.Precision.parse(spec)


def test_precision_casts_floating_leaves_only():
    p = P.Precision.parse("p=f32,c=bf16,o=f32")
    tree = {"w": jnp.ones((2,), jnp.float32), "ids": jnp.arange(2)}
    out = p.cast_to_compute(tree)
    assert out["w"].dtype == BF16 and out["ids"].dtype == tree["ids"].dtype
    assert p.cast_to_output(out)["w"].dtype == F32 and p.cast_to_param(out)["w"].dtype == F32


# --------------------------------------------------------------------------- matching


@pytest.mark.parametrize("pattern, path, expected", [
    ("v_proj", "layers_3/attn/v_proj", True),           # suffix after "/"
    ("attn/v_proj", "layers_3/attn/v_proj", True),
    ("v_proj", "v_proj", True),                         # full path
    ("proj", "layers_3/attn/v_proj", False),            # suffix must start at a "/"
    ("v_pro", "layers_3/attn/v_proj", False),
    ("/v_proj", "layers_3/attn/v_proj", False),         # leading "/" anchors
    ("/layers_3/attn/v_proj", "layers_3/attn/v_proj", True),
    ("/layers_*/attn/*", "layers_3/attn/v_proj", True),
    ("*norm*", "layers_0/attn_norm", True),
    ("*norm*", "final_norm", True),
    ("layers_*/mlp/*", "layers_10/mlp/up", True),
    ("*", "layers_0/mlp/up", True),                     # "*" crosses "/"
    ("mlp/*", "layers_0/mlp_norm", False),
    ("mlp/*", "layers_0/moe/experts/gate", False),
    ("attn/?_proj", "layers_0/attn/q_proj", True),
    ("V_PROJ", "layers_0/attn/v_proj", False),          # case-sensitive
    ("re:.*/attn/(q|k)_proj", "layers_0/attn/k_proj", True),
    ("re:.*/attn/(q|k)_proj", "layers_0/attn/v_proj", False),
    ("re:v_proj", "layers_0/attn/v_proj", False),       # regex is a full match, no suffix rule
    ("re:(.*/)?v_proj", "layers_0/attn/v_proj", True),
    ("re:(.*/)?v_proj", "v_proj", True),
])
def test_match_path_table(pattern, path, expected):
    assert P.match_path(pattern, path) is expected
    assert P.Rule(pattern).matches(tuple(path.split("/"))) is expected


@pytest.mark.parametrize("pattern", ["", "re:", "/", "re:(unclosed", 3])
def test_bad_patterns(pattern):
    with pytest.raises(ValueError, match="pattern"):
        P.Rule(pattern)


def test_rule_sets_only_named_fields():
    rule = P.Rule("mlp/*", recipe="deepseek_v3", compute_dtype="f16")
    assert set(rule.overrides()) == {"recipe", "compute_dtype"}
    base = P.Precision.parse("p=f32,c=bf16,o=bf16")
    got = rule.apply(base)
    assert (got.param_dtype, got.compute_dtype, got.output_dtype, got.recipe.name) == (F32, F16, BF16, "deepseek_v3")
    assert P.Rule("x", recipe=None).overrides() == {"recipe": None}  # None is a setting, not "inherit"
    assert P.Rule("x").overrides() == {}


def test_first_match_wins_and_default():
    policy = P.Policy(rules=[P.Rule("layers_0/mlp/up", compute_dtype="f32"), P.Rule("mlp/*", recipe="current")],
                      default=P.Precision.parse("c=bf16"))
    assert policy.match("layers_0/mlp/up") == 0 and policy.match("layers_1/mlp/up") == 1
    assert policy.resolve("layers_0/mlp/up", role_of("layers_0/mlp/up")) == P.Precision.parse("c=f32,o=bf16")  # rule 0 only: no recipe
    assert policy.resolve("layers_1/mlp/up", role_of("layers_1/mlp/up")).recipe == recipes.CurrentScaling()
    assert policy.match("embed") is None and policy.resolve("embed", role_of("embed")) == policy.default
    assert policy.resolve(("layers_1", "mlp", "up")) == policy.resolve("layers_1/mlp/up", role_of("layers_1/mlp/up"))
    assert isinstance(policy.rules, tuple)


def test_with_rules_overrides_and_map_recipes():
    base = P.preset("fp8")
    p = base.with_rules(P.Rule("layers_0/mlp/*", recipe=None), name="fp8_but_layer0")
    assert p.name == "fp8_but_layer0" and p.resolve("layers_0/mlp/up", role_of("layers_0/mlp/up")).recipe is None
    assert p.resolve("layers_1/mlp/up", role_of("layers_1/mlp/up")) == base.resolve("layers_1/mlp/up", role_of("layers_1/mlp/up"))
    pow2 = base.map_recipes(lambda r: recipes.DeepSeekV3(scale_format="ue8m0"))
    assert pow2.resolve("layers_0/attn/v_proj", role_of("layers_0/attn/v_proj")).recipe.scale_format == "ue8m0"
    assert pow2.resolve("embed", role_of("embed")).recipe is None and pow2.rules[-1] == base.rules[-1]


def test_policy_rejects_non_rules():
    with pytest.raises(TypeError, match=r"rules\[1\]"):
        P.Policy(rules=(P.Rule("a"), "b"))
    with pytest.raises(TypeError, match="default"):
        P.Policy(default="c=bf16")


# --------------------------------------------------------------------------- presets


def _summary(p: P.Precision):
    return tuple(str(getattr(p, f)) for f in P.DTYPE_FIELDS[:4]) + (p.recipe.name if p.recipe else None,)


HALF_EXPECT = {  # path -> (param, compute, output, accum, recipe) with "h" = the half dtype
    "embed": ("float32", "h", "float32", "float32", None),
    "lm_head": ("float32", "h", "float32", "float32", None),
    "layers_0/attn_norm": ("float32", "float32", "float32", "float32", None),
    "final_norm": ("float32", "float32", "float32", "float32", None),
    "layers_1/moe/router": ("float32", "float32", "float32", "float32", None),
    "layers_0/attn/q_proj": ("float32", "h", "h", "float32", None),
    "layers_0/attn/qk": ("float32", "h", "h", "float32", None),
    "layers_0/mlp/down": ("float32", "h", "h", "float32", None),
    "layers_1/moe/experts/up": ("float32", "h", "h", "float32", None),
}


@pytest.mark.parametrize("name, half", [("bf16", "bfloat16"), ("fp16", "float16")])
@pytest.mark.parametrize("path", sorted(HALF_EXPECT))
def test_half_presets(name, half, path):
    expected = tuple(half if v == "h" else v for v in HALF_EXPECT[path])
    assert _summary(P.preset(name).resolve(path, role_of(path))) == expected


@pytest.mark.parametrize("path", DENSE + MOE)
def test_fp32_preset(path):
    assert _summary(P.preset("fp32").resolve(path, role_of(path))) == ("float32",) * 4 + (None,)


FP8_EXPECT = {  # path -> (compute, output, has recipe); params f32 and accum f32 everywhere
    "embed": ("bfloat16", "float32", False),
    "lm_head": ("bfloat16", "float32", False),
    "layers_0/attn_norm": ("float32", "float32", False),
    "layers_0/mlp_norm": ("float32", "float32", False),
    "final_norm": ("float32", "float32", False),
    "layers_0/attn/q_proj": ("bfloat16", "bfloat16", True),
    "layers_0/attn/k_proj": ("bfloat16", "bfloat16", True),
    "layers_0/attn/v_proj": ("bfloat16", "bfloat16", True),
    "layers_0/attn/o_proj": ("bfloat16", "bfloat16", True),
    "layers_0/attn/qk": ("bfloat16", "bfloat16", False),
    "layers_0/attn/pv": ("bfloat16", "bfloat16", True),  # FP8 inside the fused attention
    "layers_0/mlp/gate": ("bfloat16", "bfloat16", True),
    "layers_0/mlp/up": ("bfloat16", "bfloat16", True),
    "layers_0/mlp/down": ("bfloat16", "bfloat16", True),
    "layers_1/moe/router": ("float32", "float32", False),
    "layers_1/moe/experts/gate": ("bfloat16", "bfloat16", True),
    "layers_1/moe/experts/up": ("bfloat16", "bfloat16", True),
    "layers_1/moe/experts/down": ("bfloat16", "bfloat16", True),
}


@pytest.mark.parametrize("name, recipe_type", [
    ("fp8", recipes.DeepSeekV3), ("fp8_current", recipes.CurrentScaling), ("fp8_delayed", recipes.DelayedScaling)])
def test_fp8_presets(name, recipe_type):
    policy = P.preset(name)
    assert set(FP8_EXPECT) == set(DENSE + MOE)
    for path, (compute, output, has_recipe) in FP8_EXPECT.items():
        p = policy.resolve(path, role_of(path))
        assert (str(p.param_dtype), str(p.accum_dtype)) == ("float32", "float32"), path
        assert (str(p.compute_dtype), str(p.output_dtype)) == (compute, output), path
        assert isinstance(p.recipe, recipe_type) if has_recipe else p.recipe is None, path


def test_fp8_with_custom_recipe_and_unknown_preset():
    r = recipes.DeepSeekV3(scale_format="ue8m0")
    assert P.fp8(r).resolve("layers_0/mlp/up", role_of("layers_0/mlp/up")).recipe == r
    with pytest.raises(ValueError, match="known presets: fp32, bf16"):
        P.preset("int4")


@pytest.mark.parametrize("name", sorted(P.PRESETS))
def test_presets_hashable_and_jit_static(name):
    policy = P.preset(name)
    assert hash(policy) == hash(P.preset(name)) and policy == P.preset(name)

    @jax.jit
    def f(x):
        return x.astype(policy.resolve("layers_0/mlp/up", role_of("layers_0/mlp/up")).compute_dtype)

    assert f(jnp.ones(2)).dtype == policy.resolve("layers_0/mlp/up", role_of("layers_0/mlp/up")).compute_dtype
    traced = jax.jit(lambda x, p: x.astype(p.default.compute_dtype), static_argnums=1)
    assert traced(jnp.ones(2), policy).dtype == policy.default.compute_dtype


# --------------------------------------------------------------------------- explain


def _params():
    leaf = jnp.zeros((1,))
    attn = {n: {"kernel": leaf} for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    layer = {"attn_norm": {"scale": leaf}, "attn": attn,
             "mlp_norm": {"scale": leaf}, "mlp": {n: {"kernel": leaf} for n in ("gate", "up", "down")}}
    return {"embed": {"embedding": leaf}, "layers_0": layer, "final_norm": {"scale": leaf},
            "lm_head": {"kernel": leaf, "bias": leaf}}


def test_module_paths_from_params_and_variables():
    expected = [p for p in DENSE if not p.endswith(("/qk", "/pv"))]
    assert sorted(P.module_paths(_params())) == sorted(expected)
    assert P.module_paths(_params())[0] == "embed"  # insertion order kept
    assert sorted(P.module_paths({"params": _params(), "fp8_state": {"layers_0": {"mlp": {"up": {"amax": 0}}}}})) \
        == sorted(expected)
    assert sorted(P.module_paths(FrozenDict(_params()))) == sorted(expected)
    assert P.module_paths({"kernel": 0}) == [""]  # root module
    assert P.module_paths(["a/b", ("a", "b"), "c"]) == ["a/b", "c"]


def test_explain_table():
    policy = P.preset("fp8")
    text = policy.explain(_params(), extra_paths=["layers_0/attn/qk", "layers_0/attn/pv"], roles=role_of)
    lines = text.splitlines()
    header = lines[1]
    assert header.split() == ["path", "role", "param", "compute", "output", "accum", "recipe", "rule"]
    rows = {line.split()[0]: line for line in lines[2:] if not line.startswith("rule ")}
    assert set(rows) == set(P.module_paths(_params())) | {"layers_0/attn/qk", "layers_0/attn/pv"}
    columns = [header.index(h) for h in ("role", "param", "compute", "recipe", "rule")]
    for line in rows.values():  # aligned: every column starts at the header's offset
        assert all(line[c - 1] == " " and line[c] != " " for c in columns), line
    assert "deepseek_v3" in rows["layers_0/mlp/up"] and "'*' (role linear)" in rows["layers_0/mlp/up"]
    assert rows["final_norm"].split()[1:6] == ["norm", "f32", "f32", "f32", "f32"]
    unmatched = [line for line in lines if line.startswith("rule ")]
    expected = {policy.rules.index(r) for r in policy.unmatched_rules(list(rows), roles=role_of)}
    assert {int(line.split()[1]) for line in unmatched} == expected
    assert unmatched == [f"rule {policy.rules.index(r)} '*' (role router) matches no layer"
                         for r in policy.rules if r.role == "router"]  # a dense model has no router
    without_roles = policy.explain(_params())  # paths without roles: only role-free rules match
    assert sum(line.endswith("matches no layer") for line in without_roles.splitlines()) == len(policy.rules)


def test_unmatched_rules():
    policy = P.preset("fp8")
    unmatched = policy.unmatched_rules(DENSE, roles=role_of)
    assert [(r.pattern, r.role) for r in unmatched] == [("*", "router")]
    assert policy.unmatched_rules(DENSE + MOE + MLA, roles=role_of) == []
    assert all(policy.resolve(p, role_of(p)).recipe is not None for p in MLA)  # FP8, as DeepSeek-V3 trains them
    assert P.Policy(rules=[P.Rule("nothing*")]).explain(["a"]).endswith("rule 0 'nothing*' matches no layer")


def test_explain_default_row():
    text = P.Policy(name="empty").explain(["x"])
    assert text.splitlines()[0] == "policy 'empty': 1 paths, 0 rules"
    assert text.splitlines()[2].split() == ["x", "-", "f32", "f32", "f32", "f32", "-", "default"]


# --------------------------------------------------------------------------- YAML


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp8", "fp8_current"])
def test_yaml_files_mirror_presets(name):
    assert P.load(os.path.join(POLICY_DIR, f"{name}.yaml")) == P.preset(name)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(POLICY_DIR, "*.yaml"))))
def test_every_policy_file_loads_and_round_trips(path):
    policy = P.load(path)
    assert policy.name == os.path.basename(path)[:-5]
    assert P.from_dict(P.to_dict(policy)) == policy


def test_ffn_only_example():
    policy = P.load(os.path.join(POLICY_DIR, "fp8_ffn_only.yaml"))
    for path in ["layers_0/mlp/gate", "layers_1/moe/experts/down"]:
        assert policy.resolve(path, role_of(path)).recipe == recipes.DeepSeekV3(scale_format="ue8m0")
    for path in ["layers_0/attn/v_proj", "layers_0/attn/q_proj", "embed", "layers_1/moe/router"]:
        assert policy.resolve(path, role_of(path)).recipe is None
    assert policy.resolve("final_norm", role_of("final_norm")).compute_dtype == F32


@pytest.mark.parametrize("name", sorted(P.PRESETS))
def test_to_dict_round_trips_presets(name):
    assert P.from_dict(P.to_dict(P.preset(name))) == P.preset(name)


def test_from_dict_recipe_forms_and_partial_default():
    d = {"name": "x", "default": {"compute": "bf16"},
         "rules": [{"match": "a", "recipe": {"name": "delayed", "history": 4, "margin": 1}},
                   {"match": "b", "recipe": None}, {"match": "c", "recipe": "none"}, {"match": "d"}]}
    policy = P.from_dict(d)
    assert policy.default == P.Precision(compute_dtype="bf16")  # other fields: Precision() defaults
    assert policy.resolve("a", role_of("a")).recipe == recipes.DelayedScaling(history=4, margin=1.0)
    assert policy.rules[1].recipe is None and policy.rules[2].recipe is None
    assert policy.rules[3].recipe is P.INHERIT
    assert P.from_dict({"default": "p=f32,c=bf16,r=current"}).default.recipe == recipes.CurrentScaling()
    assert P.from_dict({}) == P.Policy()


def test_from_dict_base_merges_rules_after():
    policy = P.from_dict({"base": "bf16", "default": {"recipe": "current"},
                          "rules": [{"match": "lm_head", "output": "bf16"}]})
    assert policy.name == "bf16" and policy.rules[1:] == P.preset("bf16").rules
    assert policy.resolve("lm_head", role_of("lm_head")).output_dtype == BF16
    assert policy.resolve("layers_0/mlp/up", role_of("layers_0/mlp/up")).recipe == recipes.CurrentScaling()
    assert policy.resolve("final_norm", role_of("final_norm")).recipe is None  # base rules keep norms out of FP8


@pytest.mark.parametrize("d, fragments", [
    ({"nme": "x"}, ["<dict>", "unknown key 'nme'", "allowed: name, base, default, rules"]),
    ({"rules": [{"match": "a"}, {"match": "b", "comptue": "f32"}]},
     ["rules[1]", "unknown key 'comptue'", "allowed: match, role, param, compute, output, accum, recipe"]),
    ({"default": {"param": "f32", "accumulate": "f32"}}, ["default", "unknown key 'accumulate'", "accum"]),
    ({"rules": [{"match": "a", "compute": "fp12"}]}, ["rules[0]", "'fp12'", "bf16"]),
    ({"rules": [{"match": "a", "param": "e4m3"}]}, ["rules[0]", "recipe"]),
    ({"rules": [{"match": "a", "recipe": "fastest"}]}, ["rules[0]", "unknown recipe 'fastest'", "deepseek_v3"]),
    ({"rules": [{"match": "a", "recipe": {"name": "fastest"}}]}, ["rules[0]", "unknown recipe", "current"]),
    ({"rules": [{"match": "a", "recipe": {"name": "deepseek_v3", "blocks": 64}}]},
     ["rules[0]", "unknown key 'blocks'", "block", "scale_format"]),
    ({"rules": [{"match": "a", "recipe": {"name": "deepseek_v3", "fmt": "e4m3"}}]},
     ["rules[0]", "unknown key 'fmt'", "renamed: use fwd_format"]),
    ({"rules": [{"match": "a", "recipe": {"name": "current", "pow2_scale": True}}]},
     ["rules[0]", "unknown key 'pow2_scale'", "renamed: use scale_format ('ue8m0')"]),
    ({"rules": [{"match": "a", "recipe": {"name": "deepseek_v3", "block": "128"}}]}, ["rules[0]", "block", "int"]),
    ({"rules": [{"match": "a", "recipe": {"name": "current", "fwd_format": "e9m9"}}]}, ["rules[0]", "e9m9"]),
    ({"rules": [{"match": "a", "recipe": {"block": 64}}]}, ["rules[0]", "'name'"]),
    ({"rules": [{"compute": "f32"}]}, ["rules[0]", "'match'"]),
    ({"rules": [{"match": "re:("}]}, ["rules[0]", "regex"]),
    ({"rules": {"match": "a"}}, ["rules must be a list"]),
    ({"rules": ["a"]}, ["rules[0]", "expected a mapping"]),
    ({"base": "int4"}, ["unknown base 'int4'", "fp8"]),
])
def test_from_dict_errors(d, fragments):
    with pytest.raises(ValueError) as e:
        P.from_dict(d)
    for fragment in fragments:
        assert fragment in str(e.value), (fragment, str(e.value))


def test_load_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nrules:\n  - match: '*'\n  - match: mlp/*\n    recipe: {name: current, margn: 1}\n")
    with pytest.raises(ValueError) as e:
        P.load(path)
    assert str(path) in str(e.value) and "rules[1]" in str(e.value) and "margin" in str(e.value)
    with pytest.raises(FileNotFoundError):
        P.load(tmp_path / "missing.yaml")


def test_load_base_file_relative_and_cycle(tmp_path):
    (tmp_path / "parent.yaml").write_text("name: parent\nbase: fp8\nrules:\n  - match: lm_head\n    output: bf16\n")
    (tmp_path / "child.yaml").write_text("name: child\nbase: parent.yaml\nrules:\n  - match: embed\n    output: bf16\n")
    child = P.load(tmp_path / "child.yaml")
    assert child.name == "child" and child.rules[2:] == P.preset("fp8").rules
    assert child.resolve("embed", role_of("embed")).output_dtype == BF16 and child.resolve("lm_head", role_of("lm_head")).output_dtype == BF16
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        P.load(tmp_path / "a.yaml")


def test_policy_pickles_and_copies_with_inherit_singleton():
    import copy
    import pickle

    policy = P.from_dict({"base": "fp8", "rules": [{"match": "x", "compute": "f32"}]})
    for clone in (pickle.loads(pickle.dumps(policy)), copy.deepcopy(policy)):
        assert clone == policy and hash(clone) == hash(policy)
        assert clone.rules[0].recipe is P.INHERIT


def test_a_recipe_mapping_sets_its_fields_rejects_unknown_ones_and_round_trips():
    spec = {"name": "m", "base": "bf16", "rules": [
        {"match": "mlp/*", "recipe": {"name": "deepseek_v3", "scale_format": "ue8m0", "fp8_residuals": False}},
        {"match": "attn/*", "recipe": {"name": "current", "margin": 1.0}}]}
    policy = P.from_dict(spec)
    assert policy.resolve("layers_0/mlp/up", role_of("layers_0/mlp/up")).recipe == recipes.DeepSeekV3(scale_format="ue8m0",
                                                                          fp8_residuals=False)
    assert policy.resolve("layers_0/attn/q_proj", role_of("layers_0/attn/q_proj")).recipe == recipes.CurrentScaling(margin=1.0)
    assert P.from_dict(P.to_dict(policy)) == policy
    spec["rules"][0]["recipe"]["scale"] = "ue8m0"
    with pytest.raises(ValueError, match=r"rules\[0\]: recipe deepseek_v3: unknown key 'scale'; allowed: name, block, "
                                         r"fwd_format, bwd_format, scale_format, fp8_residuals, "
                                         r"swiglu_residuals, recompute_swiglu"):
        P.from_dict(spec)


def test_get_takes_a_preset_name_or_a_policy_file(tmp_path):
    assert P.get("fp8") == P.preset("fp8")
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(P.to_dict(P.preset("fp8_current"))))
    assert P.get(str(path)) == P.preset("fp8_current").with_rules(name="fp8_current")
    with pytest.raises(ValueError, match="no policy file '.*missing.yaml'"):
        P.get(str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match="unknown policy 'fp7': give a preset \\(fp32, bf16"):
        P.get("fp7")


# --------------------------------------------------------------------------- search on measured loss
# A synthetic sensitivity: 32 equal layers, one candidate (E4M3 blocks), predicted increases
# 2e-4 * (i + 1) nats, so the efficiency order is layers_0, layers_1, ...; `measure` sums the
# predictions of the lowered layers times a per-layer interaction factor.

N_LAYERS = 32
BUDGET = 1.0  # % perplexity: ln(1.01) = 0.00995 nats


def _synthetic():
    from mpx import sensitivity as S

    layers = tuple(S.Layer(f"layers_{i}/mlp/up", (1, 128, 128), (1, 8, 128), jnp.float32) for i in range(N_LAYERS))
    pred = 2e-4 * np.arange(1, N_LAYERS + 1, dtype=float)[:, None]
    return S.Sensitivity(layers, tuple(S.get_candidates("e4m3_block")), pred, pred, None, {}, 3.0, {}, {}, {})


def _measure(sens, factor, calls=None):
    """policy -> sum over its FP8 layers of prediction x factor[i]; counts calls in `calls`."""
    def measure(policy):
        if calls is not None:
            calls.append(policy)
        lowered = np.array([policy.resolve(p, role_of(p)).recipe is not None for p in sens.paths])
        return float((sens.estimate[:, 0] * factor)[lowered].sum())
    return measure


def _shrinking_search(sens, budget, measure):
    """The search this replaced: predicted budget shrunk by measured/target until it fits."""
    from mpx.policy import auto

    costs, pred, _ = auto._tables(sens, P.preset("fp32"), "bytes", ["e4m3_block"])
    target = inner = math.log1p(budget / 100)
    for _ in range(6):
        choice = auto.solve(costs, pred, inner)
        measured = measure(auto._policy(sens, ["e4m3_block"], choice, P.preset("fp32"), "old"))
        if measured <= target:
            return measured
        inner *= min(0.8, target / measured)
    return 0.0


def test_measured_search_spends_the_budget_the_shrinking_search_left_unused():
    sens, target = _synthetic(), math.log1p(BUDGET / 100)
    factor = np.ones(N_LAYERS)
    factor[3] = 30.0  # one layer hurts 30x its prediction (an interaction the estimate misses)
    measure = _measure(sens, factor)
    assert _shrinking_search(sens, BUDGET, measure) < 0.2 * target
    result = P.search(sens, BUDGET, measure=measure)
    assert 0.5 * target <= result.measured_nats <= target
    assert result.measured_nats == measure(result.policy) and result.assignment["layers_3/mlp/up"] == "base"
    assert result.rounds[0].step == "all" and result.rounds[-1].measured_nats == result.measured_nats
    # Everywhere 3x the prediction: still within [0.5, 1] x budget, FP8 on as many layers as fit.
    uniform = P.search(sens, BUDGET, measure=_measure(sens, np.full(N_LAYERS, 3.0)))
    assert 0.5 * target <= uniform.measured_nats <= target
    fits = np.searchsorted(np.cumsum(3 * sens.estimate[:, 0]), target, side="right")
    assert sum(v != "base" for v in uniform.assignment.values()) == fits
    for r in uniform.rounds:  # predicted and measured of every measured policy
        assert r.measured_nats == pytest.approx(3 * r.predicted_nats) and 0 <= r.fp8_weight_fraction <= 1


def test_measured_search_never_returns_an_over_budget_policy_when_one_fits():
    sens, target = _synthetic(), math.log1p(BUDGET / 100)
    rng = np.random.default_rng(0)
    for trial in range(20):  # not monotone in prefix length: some layers help (negative factors)
        factor = rng.uniform(-20, 40, N_LAYERS)
        result = P.search(sens, BUDGET, measure=_measure(sens, factor))
        feasible = [r for r in result.rounds if r.measured_nats <= target]
        assert result.measured_nats <= target
        assert all(result.weight_bytes <= r.weight_bytes for r in feasible)  # the cheapest measured within
        if not feasible:
            assert result.policy.rules == () and result.measured_nats == 0.0
    hopeless = P.search(sens, BUDGET, measure=lambda policy: 1.0)  # nothing fits: the base
    assert set(hopeless.assignment.values()) == {"base"} and hopeless.measured_nats == 0.0


def test_measurements_are_bounded_and_edge_budgets_measure_little():
    sens = _synthetic()
    factor = np.full(N_LAYERS, 5.0)
    calls = []
    result = P.search(sens, BUDGET, measure=_measure(sens, factor, calls))
    assert len(calls) == result.measurements == len(result.rounds) <= result.max_measurements == 10  # log2(33) + 4
    calls.clear()
    capped = P.search(sens, BUDGET, measure=_measure(sens, factor, calls), max_measurements=3)
    assert len(calls) == 3 == capped.max_measurements
    calls.clear()
    none = P.search(sens, 0, measure=_measure(sens, factor, calls))
    assert calls == [] and set(none.assignment.values()) == {"base"} and none.measured_nats == 0.0
    every = P.search(sens, BUDGET, measure=_measure(sens, np.full(N_LAYERS, 0.01), calls))
    assert len(calls) == 1 and every.fp8_weight_fraction == 1.0 and every.rounds[0].step == "all"
    with pytest.raises(ValueError, match="max_measurements must be an integer >= 1; got 0"):
        P.search(sens, BUDGET, measure=lambda policy: 0.0, max_measurements=0)


# --------------------------------------------------------------------------- roles


def test_a_role_rule_matches_only_layers_of_its_role():
    rule = P.Rule("*", role="norm", compute_dtype=F32)
    assert rule.matches("anything/ln_1", "norm") and not rule.matches("anything/ln_1", "linear")
    assert not rule.matches("anything/ln_1")  # a path without a role: role-free rules only
    policy = P.preset("fp8")
    assert policy.resolve("my_block/ffn/w1", "linear").recipe == recipes.DeepSeekV3()
    assert policy.resolve("my_block/ffn/w1").recipe is None  # no role given: the bf16 default
    assert policy.resolve("my_block/scores", "attention").compute_dtype == BF16


@pytest.mark.parametrize("make", [lambda: P.Rule("*", role="ffn"), lambda: P.preset("fp8").resolve("x", "ffn"),
                                  lambda: P.from_dict({"rules": [{"role": "ffn"}]})])
def test_an_unknown_role_names_the_roles(make):
    with pytest.raises(ValueError, match=r"must be one of linear, attention, norm, router, embed, head; got 'ffn'"):
        make()


def test_role_rules_in_yaml_round_trip():
    policy = P.from_dict({"name": "r", "rules": [{"role": "norm", "compute": "f32"},
                                                {"match": "mlp/*", "role": "linear", "recipe": "current"}]})
    assert policy.rules[0] == P.Rule("*", role="norm", compute_dtype=F32)
    assert policy.resolve("layers_0/mlp/up", "linear").recipe == recipes.CurrentScaling()
    assert policy.resolve("layers_0/attn/q_proj", "linear").recipe is None
    assert P.from_dict(P.to_dict(policy)) == policy
    with pytest.raises(ValueError, match=r"rules\[0\]: rule needs a 'match' pattern or a 'role'"):
        P.from_dict({"rules": [{"compute": "f32"}]})



def test_a_measurement_with_an_error_fits_only_when_its_upper_bound_does():
    """With `(mean, se)` measurements a policy counts as within the budget only when mean +
    confidence x se is: noisy in-budget means no longer win; confidence 0 trusts the mean."""
    sens, target = _synthetic(), math.log1p(BUDGET / 100)
    plain = _measure(sens, np.full(N_LAYERS, 3.0))
    noisy = lambda policy: (plain(policy), 0.3 * target)  # noqa: E731
    trusting = P.search(sens, BUDGET, measure=noisy, confidence=0.0)
    careful = P.search(sens, BUDGET, measure=noisy, confidence=1.0)
    assert trusting.measured_nats == P.search(sens, BUDGET, measure=plain).measured_nats
    assert careful.measured_nats + 0.3 * target <= target < trusting.measured_nats + 0.3 * target
    assert careful.fp8_weight_fraction < trusting.fp8_weight_fraction
    assert all(r.measured_se_nats == 0.3 * target for r in careful.rounds)
    assert careful.rounds[0].to_dict()["measured_se_pct"] == pytest.approx(30 * target)
    with pytest.raises(ValueError, match="confidence must be a finite number >= 0"):
        P.search(sens, BUDGET, measure=noisy, confidence=-1)


def test_bf16_attention_example_is_fp8_with_pv_in_bf16():
    """configs/policies/fp8_bf16_attention.yaml: the fp8 preset but for PV, which stays bf16."""
    policy, fp8 = P.load(os.path.join(POLICY_DIR, "fp8_bf16_attention.yaml")), P.preset("fp8")
    for path in DENSE + MOE:
        got, want = policy.resolve(path, role_of(path)), fp8.resolve(path, role_of(path))
        assert got == (want.replace(recipe=None) if path.endswith("attn/pv") else want), path
