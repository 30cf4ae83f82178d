"""benchmarks.gpu, the script for the day a GPU is lent, runs its CPU path end to end."""

import json

from benchmarks import gpu


def test_the_gpu_benchmark_dry_runs_and_writes_every_figure(tmp_path, capsys):
    assert gpu.main(["--dry-run", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert {r["recipe"] for r in result["gemms"]} == set(gpu.RECIPES)
    assert all(r["fwd_tflops"] > 0 and r["fwd_bwd_tflops"] > 0 for r in result["gemms"])
    assert [r["preset"] for r in result["train_step"]] == ["fp32", "bf16", "fp8"]
    assert {(r["precision"], r["rows"]) for r in result["decode"]} == {(p, n) for p in ("bf16", "fp8") for n in (1, 8)}
    assert [c["passed"] for c in result["checks"]] == [True, True]
    assert "dry run" in capsys.readouterr().out
