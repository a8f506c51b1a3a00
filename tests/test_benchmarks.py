"""The benchmarks run end to end in their quick modes and end with one JSON line."""
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(script, *args):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_planted_ranks_quick():
    res = run("planted_ranks.py", "--quick")
    for key in ("spearman", "spearman_planted", "base_mse", "lora2_params", "lora2_mse", "fixed", "noreg_params",
                "params_ratio_vs_largest_fixed", "params_ratio_vs_best_fixed", "best_fixed_mse_vs_lora2"):
        assert key in res
    assert res["components"] == 40 and res["base_mse"] > 0
    assert set(res["lora2_mean_rank_by_planted"]) == {"0", "1", "4", "8", "16", "32"}  # 1/64 … 1/2 of 64
    assert set(res["fixed"]) == {"4", "16"}
    assert -1.0 <= res["spearman"] <= 1.0
    assert res["fixed"]["16"]["params"] > res["fixed"]["4"]["params"]


def test_step_time_quick():
    res = run("step_time.py", "--quick")
    assert res["ratio_vs_fixed_same_max"] > 0 and res["ratio_vs_fixed_same_mean"] > 0
    assert res["lora_state_bytes"]["fixed_same_max"] >= res["lora_state_bytes"]["fixed_same_mean"]
    assert set(res["sec_per_step"]) == {"lora2", "fixed_same_max", "fixed_same_mean"}


def test_fixed_params_at_mse_interpolates():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from planted_ranks import fixed_params_at_mse
    finally:
        sys.path.pop(0)
    fixed = {4: {"params": 100, "mse": 1.0}, 8: {"params": 400, "mse": 0.5}}
    assert fixed_params_at_mse(fixed, 2.0) == 100
    assert fixed_params_at_mse(fixed, 0.75) == pytest.approx(200.0)
    assert fixed_params_at_mse(fixed, 0.1) is None


def test_tools_io_quick():
    res = run("tools_io.py", "--quick", "--rounds", "1")
    assert res["modules"] == 56
    for tool in ("inspect", "pad", "merge", "truncate"):
        assert res[f"{tool}_s"] > 0 and res[f"{tool}_raw_s"] > 0 and res[f"{tool}_ratio"] > 0
    assert res["max_ratio"] == max(res[f"{t}_ratio"] for t in ("inspect", "pad", "merge", "truncate"))
