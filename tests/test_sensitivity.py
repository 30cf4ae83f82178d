"""Tests of mpx.sensitivity, mpx.policy.search and python -m serve.sensitivity.

One tiny model (2 blocks, 14 linear layers) is trained for a few dozen Adam steps on
this repository's README (module fixture) and analysed once.
"""

import dataclasses
import json
import math
import re
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mpx
from models import config as model_config
from models import transformer
from mpx import sensitivity as S
from mpx.policy import auto
from serve import sensitivity as cli
from store import checkpoint as ckpt_lib

ROOT = Path(__file__).resolve().parents[1]
CFG = model_config.ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64)
CANDS = "e4m3_block,e3m2,e2m1_mx,e2m1_b32"
SEQ = 32


def _windows() -> np.ndarray:
    tokens = np.frombuffer((ROOT / "README.md").read_bytes(), np.uint8).astype(np.int32)
    return tokens[: len(tokens) // SEQ * SEQ].reshape(-1, SEQ)


@pytest.fixture(scope="module")
def trained():
    """(model, variables, calibration batches, held-out batches) of a briefly trained model."""
    model = transformer.Transformer(CFG, mpx.policy.preset("fp32"))
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    tx = optax.adam(3e-3)

    @jax.jit
    def step(p, opt, batch):
        loss, grads = jax.value_and_grad(lambda p: S.next_token_nll(model.apply({"params": p}, batch)[0], batch))(p)
        updates, opt = tx.update(grads, opt)
        return optax.apply_updates(p, updates), opt

    windows, opt = _windows(), tx.init(params)
    for i in range(40):
        params, opt = step(params, opt, jnp.asarray(windows[8 * i % 160: 8 * i % 160 + 8]))
    n = len(windows)
    batches = [jnp.asarray(windows[i:i + 4]) for i in range(n - 16, n, 4)]
    return model, {"params": params}, batches[:2], batches[2:]


@pytest.fixture(scope="module")
def sens(trained):
    model, variables, calib, _ = trained
    return S.analyze(lambda v, b: model.apply(v, b)[0], variables, calib, candidates=CANDS,
                     exact_pairs=14, exact_candidates=["e3m2"], smooth_alpha=0.5)


def _measure(trained):
    model, variables, _, heldout = trained
    loss = cli.policy_loss(model.config, variables, heldout)
    base = loss(mpx.policy.preset("fp32"))
    return lambda policy: cli.paired_change(loss(policy), base)


def test_estimate_ranks_layers_like_exact_measurement(sens):
    assert len(sens.layers) == 14 and sens.estimate.shape == (14, 4)
    assert len([k for k in sens.exact if k[1] == "e3m2"]) == 14
    assert sens.spearman("e3m2") >= 0.8
    # FP4 everywhere hurts more than FP8 blocks, layer by layer.
    assert (sens.second_order[:, sens.column("e2m1_b32")] > sens.second_order[:, sens.column("e4m3_block")]).all()


def test_searched_policy_meets_its_budget_on_held_out_batches(trained, sens):
    measure = _measure(trained)
    result = mpx.policy.search(sens, 0.5, measure=measure, max_measurements=4)
    assert any(c != "base" for c in result.assignment.values()) and result.measurements <= 4
    assert set(result.assignment.values()) != {"e2m1_b32"}  # not simply the cheapest everywhere
    mean, se = measure(result.policy)  # the policy, for real: its mean and that mean's error
    assert result.measured_nats is not None and result.measured_nats + se <= math.log1p(0.005) + 1e-9
    assert abs(mean - result.measured_nats) < 1e-6 and se >= 0
    assert result.weight_bytes < result.base_weight_bytes
    assert mpx.policy.from_dict(mpx.policy.to_dict(result.policy)) == result.policy
    assert len(result.policy.rules) <= sum(c != "base" for c in result.assignment.values())


def test_zero_budget_lowers_nothing_and_a_huge_one_takes_the_cheapest_everywhere(trained, sens):
    none = mpx.policy.search(sens, 0, measure=_measure(trained))
    assert set(none.assignment.values()) == {"base"} and none.policy.rules == ()
    assert none.measured_nats == 0.0 and none.weight_bytes == none.base_weight_bytes
    every = mpx.policy.search(sens, 1e9, candidates="all")
    cheapest = {layer.path: min((c for c in sens.candidates if c.searchable),
                                key=lambda c: c.weight_bytes(layer.weight_shape)).name for layer in sens.layers}
    assert every.assignment == cheapest and set(cheapest.values()) == {"e2m1_b32"}
    # By default only formats hardware multiplies as is: here E4M3 blocks, the one native candidate analysed.
    native = mpx.policy.search(sens, 1e9)
    assert set(native.assignment.values()) == {"e4m3_block"} and native.fp8_weight_fraction == 1.0
    assert mpx.policy.search(sens, 1e9, candidates="e3m2").assignment == {p: "e3m2" for p in cheapest}
    flops = mpx.policy.search(sens, 1e9, "fp8-flops")  # every matmul on FP8 (or narrower) operands
    assert all(sens.candidates[sens.column(c)].fp8_matmul for c in flops.assignment.values())


@pytest.mark.parametrize("budget", [-1, float("nan"), float("inf"), "1"])
def test_a_bad_budget_is_a_clear_error(sens, budget):
    with pytest.raises(ValueError, match="budget must be a perplexity change in percent"):
        mpx.policy.search(sens, budget)


def test_unknown_or_inexpressible_formats_are_clear_errors(sens):
    with pytest.raises(ValueError, match="unknown candidate format\\(s\\) 'e9m9'; known: bf16, e4m3_block"):
        S.get_candidates("e4m3_block,e9m9")
    with pytest.raises(ValueError, match="'e2m1_mx' has no recipe a policy can express"):
        mpx.policy.search(sens, 1, candidates=["e2m1_mx"])
    with pytest.raises(ValueError, match="cost must be one of 'bytes', 'fp8-flops'"):
        mpx.policy.search(sens, 1, "speed")


def test_grouped_rules_match_exactly_the_lowered_paths():
    paths = [f"layers_{i}/{m}" for i in range(31) for m in ("attn/q_proj", "mlp/up", "mlp/down")]
    rng = np.random.default_rng(0)
    for _ in range(20):
        chosen = [p for p in paths if rng.random() < 0.5] + ["lm_head"]
        patterns = auto.group_patterns(chosen)
        assert len(patterns) < len(chosen)
        matched = [p for p in paths + ["lm_head"] if any(mpx.policy.match_path(pat, p) for pat in patterns)]
        assert matched == [p for p in paths + ["lm_head"] if p in chosen]
    assert auto.index_regex(range(16)) == "[0-9]|1[0-5]"
    assert re.fullmatch(auto.index_regex([5, 6, 30, 31, 32]), "31") and not re.fullmatch(
        auto.index_regex([5, 6, 30, 31, 32]), "7")


def test_fake_quant_candidate_matches_the_recipe_it_names():
    x = jax.random.normal(jax.random.key(1), (16, 256))
    w = jax.random.normal(jax.random.key(2), (256, 128)) * 0.05
    exact = x @ w
    # The CPU FP8 path may round the scaled operands to bf16 (half-ulp 2**-9 each): its
    # products differ from the emulation's by at most 2 * 2**-9 of sum |x| |w|.
    bf16_bound = 2 * 2.0**-9 * float(jnp.max(jnp.abs(x) @ jnp.abs(w)))
    for name in ("e4m3_block", "e4m3_tensor"):
        cand = S.CANDIDATES[name]
        emulated = cand.lower(x[None], w[None])[0]
        real = mpx.dot_general(x, w, (((1,), (0,)), ((), ())), recipe=cand.recipe,
                               preferred_element_type=jnp.float32)
        assert float(jnp.max(jnp.abs(emulated - real))) <= bf16_bound < float(jnp.max(jnp.abs(emulated - exact)))


def test_statistics_and_smoothing_on_known_tensors(sens):
    x = jax.random.normal(jax.random.key(3), (200_000,))
    stats = S.tensor_stats(x)
    assert abs(stats["kurtosis"] - 3) < 0.1 and stats["outlier_fraction"] < 1e-4
    assert stats["saturated_fraction"] == 0 and stats["amax"] == pytest.approx(float(jnp.max(jnp.abs(x))))
    spiky = x.at[:100].set(1000.0)
    stats = S.tensor_stats(spiky)
    assert stats["outlier_fraction"] == pytest.approx(100 / x.size) and stats["saturated_fraction"] == pytest.approx(
        100 / x.size)
    # amax 1000 -> scale 1000 / 448: |x| below half of E4M3's smallest subnormal (2**-10) flushes.
    threshold = 2.0**-10 * 1000 / 448
    assert stats["flushed_fraction"] == pytest.approx(math.erf(threshold / math.sqrt(2)), rel=0.2)
    x3, w3 = jax.random.normal(jax.random.key(4), (1, 8, 64)), jax.random.normal(jax.random.key(5), (1, 64, 32))
    s = S.smoothing_factors(x3, w3, 0.5)
    np.testing.assert_allclose((x3 / s) @ (w3 * jnp.swapaxes(s, 1, 2)), x3 @ w3, rtol=1e-5, atol=1e-5)
    assert sens.smoothed.shape == sens.estimate.shape
    for name in ("e2m1_mx", "e3m2"):  # weight-only, or activations not FP8: not smoothed
        assert np.isnan(sens.smoothed[:, sens.column(name)]).all()
    assert np.isfinite(sens.smoothed[:, sens.column("e4m3_block")]).all()
    assert set(sens.weight_stats) == set(sens.paths) == set(sens.activation_stats)


def test_report_and_heatmap(sens, tmp_path):
    result = mpx.policy.search(sens, 1.0)
    args = types.SimpleNamespace(calibration_windows=2, confidence=1.0, seq=SEQ, objective="bytes", search="native", budget=1.0,
                                 smooth_alpha=0.5)
    report = cli.to_markdown(sens, result, args, types.SimpleNamespace(name="tiny", step=60))
    assert f"Spearman {sens.spearman():.3f} over 14 pairs" in report
    assert "| layers_1/mlp/down |" in report and "SmoothQuant smoothing (alpha 0.5)" in report
    assert "e4m3_block plain -> smoothed" in report and "e3m2 plain" not in report  # FP8 activations only
    cli.plot(sens, result, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 10_000


def test_cli_writes_the_report_policy_and_json(trained, tmp_path, capsys):
    model, variables, _, _ = trained
    run = tmp_path / "run" / "checkpoints"
    meta = {"config": {"model": dataclasses.asdict(CFG), "data": {"tokenizer": "bytes"}}}
    ckpt_lib.save(run, 60, {"params": variables["params"]}, meta)
    out = tmp_path / "sens"
    argv = ["--checkpoint", str(run.parent), "--data", str(ROOT / "README.md"), "--budget", "20", "--out", str(out),
            "--candidates", "e4m3_block", "--seq", "32", "--calibration-windows", "4", "--heldout-windows", "4", "--exact", "3",
            "--smooth-alpha", "0", "--json"]
    assert cli.main(argv) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(record) == {"policy", "budget_pct", "predicted_ppl_change_pct", "measured_ppl_change_pct",
                           "fp8_weight_fraction", "weight_bytes", "seconds", "measure_seconds", "peak_rss_bytes",
                           "moves", "measurements", "max_measurements", "rounds"}
    assert record["measured_ppl_change_pct"] <= 20 and record["fp8_weight_fraction"] == 1.0  # e4m3 everywhere
    # e4m3 everywhere fits: one measurement, of the whole order (14 moves)
    assert record["moves"] == 14 and record["measurements"] == 1 and record["max_measurements"] == 8
    (only,) = record["rounds"]
    assert only["step"] == "all" and only["measured_ppl_change_pct"] == record["measured_ppl_change_pct"]
    assert 0 < record["measure_seconds"] <= record["seconds"] and record["peak_rss_bytes"] > 100 * 2**20
    policy = mpx.policy.load(out / "policy.yaml")
    assert transformer.Transformer(CFG, policy).apply(variables, jnp.zeros((1, 8), jnp.int32))[0].shape == (1, 8, 256)
    report = (out / "sensitivity.md").read_text()
    assert "Spearman" in report and "layers_1/mlp/down" in report and (out / "sensitivity.png").stat().st_size > 0
    assert "Policies measured on the held-out windows: 1 (at most 8) over an order of 14 moves" in report
    for bad, message in ((argv[:5] + ["-1"] + argv[6:], "argument --budget: must be a finite number >= 0"),
                         (argv[:9] + ["e4m3_block,fp7"] + argv[10:], "unknown candidate format(s) 'fp7'"),
                         (argv + ["--search", "e3m2"], "argument --search: candidate 'e3m2' was not analysed"),
                         (argv[:9] + ["e4m3_block,e4m3_weight"] + argv[10:] + ["--search", "e4m3_weight"],
                          "argument --search: candidate 'e4m3_weight' has no recipe a policy can express")):
        with pytest.raises(SystemExit) as exit_:  # argparse refuses the flag before anything loads
            cli.main(bad)
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_cli_runs_on_a_hugging_face_directory(tmp_path, capsys):
    directory = ROOT / "tests" / "fixtures" / "hf" / "qwen3"
    out = tmp_path / "sens"
    argv = ["--checkpoint", str(directory), "--data", str(ROOT / "README.md"), "--budget", "5", "--out", str(out),
            "--candidates", "e4m3_block", "--seq", "32", "--calibration-windows", "2", "--heldout-windows", "2", "--rows", "2",
            "--exact", "0", "--smooth-alpha", "0", "--json"]
    assert cli.main(argv) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= record["fp8_weight_fraction"] <= 1 and record["measured_ppl_change_pct"] <= 5
    report = (out / "sensitivity.md").read_text()
    assert report.startswith("# Sensitivity of qwen3") and "15 linear layers x 1 formats" in report  # 2 x 7 + head
