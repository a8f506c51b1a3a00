"""The ComfyUI part of benchmarks/gpu_check.py (dry run) against the session's headless ComfyUI: Train LoRA² →
Load LoRA² Adapter under a rank budget → sample → decoded image; both loaders timed.

Five prompts on the CPU ComfyUI, about 150 CPU-seconds: the dry run's every part, ComfyUI's included, runs in CI."""
import json
import math
import subprocess
import sys

import pytest

import comfyui_harness as H


def test_gpu_check_comfyui_part(comfyui_alive, koala_checkpoint, tmp_path):
    server = comfyui_alive
    cmd = [sys.executable, str(H.REPO_ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--parts", "comfyui",
           "--comfyui-url", server.url, "--comfyui-checkpoint", koala_checkpoint.name, "--out", str(tmp_path)]
    try:
        r = subprocess.run(cmd, cwd=H.REPO_ROOT, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        part = json.loads((tmp_path / "gpu_check.json").read_text(encoding="utf-8"))["comfyui"]
        assert part["status"] == "pass", part
        assert part["device_type"] == "cpu" and part["checkpoint"] == koala_checkpoint.name
        train, sample, loaders = part["train"], part["load_sample"], part["loaders"]
        assert train["steps"] == 2 and train["losses_finite"] and (server.dirs["loras"] / train["saved"]).is_file()
        assert sample["max_rank_used"] <= sample["rank_budget"] and sample["image_size"] == [64, 64]
        assert sample["image_std"] > 0  # a decoded image, not a blank one
        med = loaders["median_s"]
        assert set(med) == {"none", "lora2", "stock"} and all(math.isfinite(v) and v > 0 for v in med.values())
        assert loaders["ratio_wall"] == pytest.approx(med["lora2"] / med["stock"], rel=1e-3)
    finally:
        for p in server.dirs["loras"].glob("gpucheck_*"):
            p.unlink()
