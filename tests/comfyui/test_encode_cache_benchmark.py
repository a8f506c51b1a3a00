"""benchmarks/encode_cache.py runs end to end on a small case: the second run reads every latent and caption back
from the disk cache, and every arm's training data equals the uncached encoding (the script asserts it)."""
import json
import subprocess
import sys

import comfyui_harness as H


def test_encode_cache_small(comfyui_dir, koala_checkpoint):
    r = subprocess.run([sys.executable, str(H.REPO_ROOT / "benchmarks" / "encode_cache.py"), "--images", "2",
                        "--resolution", "128", "--repeats", "1"],
                       cwd=H.REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["identical"] and set(res["median_s"]) == {"no_cache", "first", "second"}
    assert res["reports"] == {"no_cache": "",
                              "first": "latents 0 from cache, 2 encoded; text 0 from cache, 2 encoded",
                              "second": "latents 2 from cache, 0 encoded; text 2 from cache, 0 encoded"}
    assert res["ratio_second_vs_no_cache"] > 0
