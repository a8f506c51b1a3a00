"""benchmarks/load_time.py runs end to end in its quick mode and ends with one JSON line."""
import json
import subprocess
import sys

import comfyui_harness as H


def test_load_time_quick(comfyui_dir):
    r = subprocess.run([sys.executable, str(H.REPO_ROOT / "benchmarks" / "load_time.py"), "--quick"],
                       cwd=H.REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["modules"] == 16 and res["rank_min"] == 8 and res["rank_max"] == 32
    assert {"stock", "lora2", "lora2_max_rank_64"} <= set(res["median_s"])
    assert res["ratio"] > 0 and res["ratio_of_min"] > 0
