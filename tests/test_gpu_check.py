"""benchmarks/gpu_check.py --dry-run: every part on the CPU with tiny shapes, both report files, measured numbers;
a part that raises is recorded and the next part still runs."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("train_step", "trainer_fp16", "comfyui", "sd_scripts")


def dry_run(out, *extra):
    env = {k: v for k, v in os.environ.items() if k not in ("LORA2_COMFYUI_DIR", "SD_SCRIPTS_DIR")}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out),
                        *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    report = json.loads((out / "gpu_check.json").read_text(encoding="utf-8"))
    md = (out / "gpu_check.md").read_text(encoding="utf-8")
    return r, report, md


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_dry_run_reports_every_part_with_measured_figures(tmp_path):
    r, rep, md = dry_run(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert set(rep) == {"meta", *PARTS} and rep["meta"]["dry_run"] is True
    assert all(positive(rep[p]["wall_s"]) or rep[p]["status"] == "skipped" for p in PARTS)
    assert "[gpu_check] part 1/4 train_step" in r.stdout  # progress as it goes

    step = rep["train_step"]
    assert step["status"] in ("pass", "fail") and step["losses_finite"]
    sec = step["sec_per_step"]
    assert set(sec) == {"lora2", "fixed_r_max", "fixed_same_mean"} and all(positive(v) for v in sec.values())
    # the ratios and targets are computed from the measured times
    assert step["ratio_vs_fixed_r_max"] == pytest.approx(sec["lora2"] / sec["fixed_r_max"], rel=1e-3)
    assert step["ratio_vs_fixed_same_mean"] == pytest.approx(sec["lora2"] / sec["fixed_same_mean"], rel=1e-3)
    t = step["targets"]["ratio_vs_fixed_r_max"]
    assert t["max"] == 1.10 and t["pass"] == (t["value"] <= 1.10)
    assert step["targets"]["peak_memory_vs_fixed_r_max"]["pass"] is None  # no CUDA memory figures on the CPU
    low, high = step["lora2_rank_range"]
    assert 4 <= low < step["lora2_mean_rank"] < high <= step["r_max"]
    assert step["fixed_same_mean_rank"] == round(step["lora2_mean_rank"])
    assert step["lora_state_bytes"]["fixed_r_max"] > step["lora_state_bytes"]["fixed_same_mean"] > 0
    assert step["timed_steps_per_arm"] >= 2

    tr = rep["trainer_fp16"]
    assert tr["status"] == "pass", tr
    assert tr["mixed_precision"] == "fp16" and tr["grad_scaler_enabled"] is False  # the scaler is for CUDA
    assert tr["resumed_at_step"] == tr["steps_first_run"] < tr["steps_total"] and tr["resume_state_identical"]
    assert tr["losses_finite"] and tr["nan_losses"] == 0 and positive(tr["loss_first"])
    assert tr["components_rank_changed"] > 0 and positive(tr["checkpoint_bytes"])

    comfy = rep["comfyui"]
    assert comfy["status"] == "skipped" and "dry run" in comfy["skipped"]
    assert comfy["imports_checked"] == ["comfyui_harness", "graphs"] and comfy["graph_nodes_built"] > 0
    assert rep["sd_scripts"]["status"] == "skipped" and "SD_SCRIPTS_DIR" in rep["sd_scripts"]["skipped"]

    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 + len(PARTS) and "DRY RUN" in md  # header, rule, one row per part
    assert f"×{step['ratio_vs_fixed_r_max']:.3f}" in md


def test_a_part_that_raises_is_recorded_and_the_next_part_runs(tmp_path):
    not_sd = tmp_path / "not_sd_scripts"
    not_sd.mkdir()
    r, rep, md = dry_run(tmp_path / "out", "--parts", "sd_scripts,trainer_fp16", "--sd-scripts", str(not_sd))
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    err = rep["sd_scripts"]
    assert err["status"] == "error" and str(not_sd) in err["error"] and "not an sd-scripts checkout" in err["error"]
    assert rep["trainer_fp16"]["status"] == "pass"
    assert rep["train_step"] == {"status": "skipped", "skipped": "not selected (--parts)"}
    assert "| error |" in md


def test_unknown_part_is_a_one_line_usage_error(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out",
                        str(tmp_path), "--parts", "train_step,warp_drive"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "unknown part 'warp_drive'" in r.stderr
    assert not (tmp_path / "gpu_check.json").exists()
