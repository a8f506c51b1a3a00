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
    for key in ("spearman_planted", "spearman_planted_per_seed", "spearman_all", "level_means", "levels_increasing",
                "zero_at_floor", "params_ratio_at_equal_mse", "params_ratio_lower_bound_per_seed",
                "params_ratio_at_least", "lora2_dominated", "per_seed"):
        assert key in res, key
    (seed,) = res["per_seed"]
    assert set(res["level_means"]) == {"2", "8", "32"} and res["seeds"] == [0]
    assert set(seed["fixed"]) == {"4", "32"} and seed["fixed"]["32"]["params"] > seed["fixed"]["4"]["params"]
    for arm in [seed["lora2"], seed["noreg"], *seed["fixed"].values()]:
        assert 0 < arm["test"] < 1.5 and arm["params"] > 0  # test error relative to the untrained student
    assert seed["lora2"]["lr"] == 2e-3 and -1.0 <= res["spearman_planted"] <= 1.0
    ident = seed["identifiability"]
    assert ident["rank"] == 32 and 0 < ident["planted_energy_share"] < 1 and ident["planted_share_of_components"] == 0.25
    assert res["identifiability_planted_energy_share"] == ident["planted_energy_share"]


def test_step_time_quick():
    res = run("step_time.py", "--quick")
    assert res["ratio_vs_fixed_same_max"] > 0 and res["ratio_vs_fixed_same_mean"] > 0
    assert res["lora_state_bytes"]["fixed_same_max"] >= res["lora_state_bytes"]["fixed_same_mean"]
    assert set(res["sec_per_step"]) == {"lora2", "fixed_same_max", "fixed_same_mean"}


def test_fixed_params_at_mse_interpolates_against_the_next_smaller_rank():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from planted_ranks import _at_least, fixed_params_at_mse
    finally:
        sys.path.pop(0)
    # the smallest ratio the seeds support: a seed's ratio, or its lower bound where no fixed rank matched
    seeds = [{"params_ratio_at_equal_mse": 5.58, "params_ratio_lower_bound": None},
             {"params_ratio_at_equal_mse": None, "params_ratio_lower_bound": 5.57}]
    assert _at_least(seeds) == 5.57 and _at_least(seeds[:1]) == 5.58
    assert _at_least(seeds + [{"params_ratio_at_equal_mse": None, "params_ratio_lower_bound": None}]) is None
    fixed = {4: {"params": 100, "test": 1.0}, 8: {"params": 400, "test": 0.5}, 16: {"params": 1600, "test": 0.6}}
    assert fixed_params_at_mse(fixed, 2.0) == 100
    assert fixed_params_at_mse(fixed, 0.75) == pytest.approx(200.0)  # halfway on log params
    assert fixed_params_at_mse(fixed, 0.55) == pytest.approx(100 * 4 ** 0.9)  # rank 16 (worse than 8) plays no part
    assert fixed_params_at_mse(fixed, 0.1) is None
    from lora2_train.planted import rank_metrics

    plan = {"a": 0, "b": 0, "c": 2, "d": 2, "e": 8, "f": 8}
    m = rank_metrics(plan, {"a": 1, "b": 3, "c": 2, "d": 4, "e": 9, "f": 7})
    assert m["level_means"] == {"2": 3.0, "8": 8.0} and m["levels_increasing"]
    assert m["zero_at_floor"] == 0.5 and m["spearman_planted"] == pytest.approx(0.8944, abs=1e-4)
    inverted = rank_metrics(plan, {"a": 1, "b": 1, "c": 9, "d": 9, "e": 2, "f": 2})
    assert inverted["spearman_planted"] == -1.0 and not inverted["levels_increasing"]
    assert inverted["spearman_all"] <= 0.5


def test_tools_io_quick():
    res = run("tools_io.py", "--quick", "--rounds", "1")
    assert res["modules"] == 56
    for tool in ("inspect", "pad", "merge", "truncate"):
        assert res[f"{tool}_s"] > 0 and res[f"{tool}_raw_s"] > 0 and res[f"{tool}_ratio"] > 0
    assert res["max_ratio"] == max(res[f"{t}_ratio"] for t in ("inspect", "pad", "merge", "truncate"))


def test_identifiability_by_hand():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from planted_ranks import identifiability
    finally:
        sys.path.pop(0)
    plan = {"a": 0, "b": 0, "c": 2, "d": 8}
    # the change sits where the plants are, in proportion: share 25/26, both Spearman figures 1
    good = {"a": {"norm": 1.0, "energy_rank": 1}, "b": {"norm": 0.0, "energy_rank": 1},
            "c": {"norm": 3.0, "energy_rank": 2}, "d": {"norm": 4.0, "energy_rank": 8}}
    assert identifiability(plan, good) == {"spearman_norm": 1.0, "spearman_energy_rank": 1.0,
                                           "planted_energy_share": round(25 / 26, 4),
                                           "planted_share_of_components": 0.5}
    # spread over the rank-0 components, against the plants
    bad = {"a": {"norm": 4.0, "energy_rank": 9}, "b": {"norm": 4.0, "energy_rank": 9},
           "c": {"norm": 2.0, "energy_rank": 5}, "d": {"norm": 1.0, "energy_rank": 3}}
    m = identifiability(plan, bad)
    assert m["spearman_norm"] == -1.0 and m["spearman_energy_rank"] == -1.0 and m["planted_energy_share"] == round(5 / 37, 4)
