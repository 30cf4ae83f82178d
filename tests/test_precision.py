"""Tests for models.precision: the role table agrees with the roles the layers declare."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from models import config as config_lib
from models import precision, transformer
from mpx import policy as P
from store.hf import read_config

HF = ["deepseek_v3", "gemma3", "llama3", "mistral", "qwen2", "qwen3", "tinyllama"]


@dataclasses.dataclass(frozen=True)
class Recording(P.Policy):
    """The fp8 preset, recording the (path, role) of every resolution the layers ask for."""

    seen: list = dataclasses.field(default_factory=list, compare=False, hash=False)

    def resolve(self, path, role=None):
        self.seen.append((path, role))
        return super().resolve(path, role)


def _declared(config) -> set[tuple[str, str | None]]:
    fp8 = P.preset("fp8")
    policy = Recording(fp8.rules, fp8.default, "recording")
    model = transformer.Transformer(config, policy=policy)
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    return set(policy.seen)


def _configs():
    for name in ("tiny", "tiny_moe", "deepseek_v3_tiny"):
        yield name, config_lib.preset(name)
    for name in HF:
        yield name, read_config(f"tests/fixtures/hf/{name}", 64)


@pytest.mark.parametrize("name, config", list(_configs()), ids=lambda v: v if isinstance(v, str) else "")
def test_the_table_gives_every_layer_the_role_it_declares(name, config):
    declared = _declared(config)
    assert {role for _, role in declared} >= {"linear", "attention", "norm", "embed"}
    wrong = sorted((path, role, precision.role_of(path)) for path, role in declared if precision.role_of(path) != role)
    assert not wrong, f"{name}: (path, declared, table): {wrong}"


def test_an_untied_head_and_a_router_are_not_linear():
    declared = dict(_declared(config_lib.preset("deepseek_v3_tiny")))
    assert declared["lm_head"] == "head" and declared["layers_1/moe/router"] == "router"
    assert precision.resolve(P.preset("fp8"), "layers_1/moe/router").param_dtype == jnp.float32
    assert precision.resolve(P.preset("fp8"), "lm_head").recipe is None


@pytest.mark.parametrize("remat, policy, expected", [
    ("non_fp8", "fp8", [False, False]), ("non_fp8", "bf16", [True, True]), ("full", "fp8", [True, True]),
    ("none", "bf16", [False, False])])
def test_is_remat_follows_the_ffn_precision(remat, policy, expected):
    config = dataclasses.replace(config_lib.preset("tiny"), remat=remat, n_layers=2)
    assert [precision.is_remat(config, P.preset(policy), i) for i in range(2)] == expected
    assert precision.is_fp8_layer(P.preset("fp8"), 0) and not precision.is_fp8_layer(P.preset("bf16"), 0)
