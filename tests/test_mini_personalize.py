"""benchmarks/mini_personalize.py: its --quick run end to end, its pretraining cache and its verdict rule."""
import dataclasses
import json
import math
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import mini_personalize
    finally:
        sys.path.pop(0)
    return mini_personalize


def test_quick_run_reports_every_figure(tmp_path):
    png = tmp_path / "fig.png"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mini_personalize.py"), "--quick",
                        "--cache-dir", str(tmp_path / "cache"), "--png", str(png)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    from lora2_train.config import LoRA2Config

    # the LoRA² arm runs at the library defaults; only the step budget is the quick mode's
    expected = json.loads(json.dumps(dataclasses.asdict(dataclasses.replace(LoRA2Config(), steps=30))))
    assert res["lora2_config"] == expected
    assert res["quick"] and res["subjects"] == [3, 8] and res["seeds"] == [0] and res["ranks"] == [1, 4]
    assert res["pretrain"]["cached"] is False and list((tmp_path / "cache").glob("base-*.pt"))
    assert res["verdict"] in ("wins", "loses", "undecided") and sum(res["outcomes"].values()) == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| LoRA² (defaults)" in res["table"] and "| fixed rank 4 |" in res["table"]
    assert len(res["per_pair"]) == 2
    for pair in res["per_pair"]:
        ref = pair["reference"]
        assert 0 < ref["test"] < 1 and 0 < ref["prior"] < 1  # ε-MSE of a trained model: below the 1 of ε̂ = 0
        assert ref["n"]["train"] == 8 and ref["n"]["val"] == 40 and ref["n"]["test"] > 100
        assert -1 <= ref["similarity"] <= 1 and 0.5 <= ref["real_val_hit_rate"] <= 1  # the encoder tells the subject apart
        arms = pair["arms"]
        assert set(arms) == {"lora2", "1", "4"}
        assert 0 < arms["1"]["params"] < arms["4"]["params"] and arms["lora2"]["params"] > 0
        for a in arms.values():
            assert 0.5 < a["test"] < 1.5 and 0.5 < a["prior"] < 1.5, a  # relative to the pretrained model
            assert -1 <= a["similarity"] <= 1 and 0 <= a["hit_rate"] <= 1 and a["lr"] == 3e-3
        assert 1 <= arms["lora2"]["min_rank"] <= arms["lora2"]["mean_rank"] <= arms["lora2"]["max_rank"] <= 512
        assert pair["outcome"] in ("wins", "loses", "undecided")
    assert math.isfinite(res["summary"]["arms"]["lora2"]["test"])


def test_pretraining_is_cached_by_its_settings(tmp_path, bench):
    opts = dict(bench.QUICK, pretrain_steps=2, encoder_steps=2)
    log = lambda m: None
    path, first = bench.load_or_pretrain(opts, tmp_path, log)
    again, second = bench.load_or_pretrain(opts, tmp_path, log)
    assert path == again and not first["cached"] and second["cached"]
    other, third = bench.load_or_pretrain(dict(opts, subjects=(3, 5)), tmp_path, log)
    assert other != path and not third["cached"]
    assert bench.cache_key(bench.pretrain_settings(opts)) == bench.cache_key(bench.pretrain_settings(dict(opts)))


def _runs(params_test):
    return {arm: [{"params": p, "lr": 1e-3, "val": t, "test": t, "prior": 1.0, "similarity": 0.5, "hit_rate": 0.5,
                   **({"mean_rank": 4.0} if arm == "lora2" else {})}] for arm, (p, t) in params_test.items()}


def test_verdict_rule(bench):
    ref = {"val": 1.0, "test": 1.0, "prior": 1.0}
    # a smaller fixed rank with a lower subject loss: LoRA² loses the pair
    loses = bench.pair_figures(ref, _runs({"lora2": (100, 0.9), "1": (50, 0.85), "4": (200, 0.8)}), [1, 4])
    assert loses["outcome"] == "loses" and loses["beaten_by_smaller"] == [1] and loses["dominated_by"] == [1]
    assert loses["margin_vs_no_larger_fixed"] == pytest.approx(0.05)
    # only a larger fixed rank reaches its loss: LoRA² wins the pair
    wins = bench.pair_figures(ref, _runs({"lora2": (100, 0.9), "1": (50, 0.95), "4": (200, 0.9)}), [1, 4])
    assert wins["outcome"] == "wins" and wins["beats_larger_than_needed"] == [4]
    # LoRA² larger than every fixed rank and better than all of them: no evidence either way
    undecided = bench.pair_figures(ref, _runs({"lora2": (900, 0.7), "1": (50, 0.95), "4": (200, 0.9)}), [1, 4])
    assert undecided["outcome"] == "undecided"
    pairs = [dict(loses, subject=3, seed=0), dict(loses, subject=3, seed=1), dict(wins, subject=8, seed=0)]
    for p in pairs:
        p["reference"] = {"similarity": 0.5, "hit_rate": 0.5, "real_val_similarity": 0.9, "real_val_hit_rate": 0.9}
    summary = bench.summarize(pairs, [1, 4])
    assert summary["verdict"] == "loses" and summary["outcomes"] == {"wins": 1, "loses": 2, "undecided": 0}
    assert summary["mean_margin_vs_no_larger_fixed"] == pytest.approx((0.05 + 0.05 - 0.05) / 3, abs=1e-4)
    assert bench.summarize(pairs[1:], [1, 4])["verdict"] == "undecided"  # 1 : 1 is no majority
