"""Seconds per training step under sd-scripts: LoRA² (lora2_train.kohya.network + trainer extension) vs
sd-scripts' own networks.lora at the same starting rank on the same modules, in one run.

    SD_SCRIPTS_DIR=... python benchmarks/kohya_step_time.py --python SD_PY --checkpoint SDXL.safetensors \\
        --dataset DIR [--steps 3] [--resolution 256] [--rank 8] [--tokenizer-cache-dir DIR]

LoRA² targets attn+ff+proj, which are the Linear layers networks.lora wraps in every Transformer2DModel, and
re-allocates after every step (resize_every=1, the costliest setting).  The figure for each is the average
over all steps of the train loop (sd-scripts' tqdm rate for networks.lora, the progress lines' elapsed time
for LoRA²).  The last printed line is JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora2_train.config import LoRA2Config  # noqa: E402
from lora2_train.kohya.launch import to_toml, train_sd_scripts  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sd-scripts", default=os.environ.get("SD_SCRIPTS_DIR"))
    p.add_argument("--python", default=os.environ.get("SD_SCRIPTS_PYTHON", sys.executable))
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lambda-e", type=float, default=0.1)
    p.add_argument("--tokenizer-cache-dir", default=None)
    p.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    a = p.parse_args()
    if not a.sd_scripts:
        p.error("--sd-scripts or SD_SCRIPTS_DIR is required")
    out = Path(a.out or tempfile.mkdtemp(prefix="lora2-kohya-bench-"))
    cfg = LoRA2Config(r_init=a.rank, r_target=max(1, a.rank // 2), r_max=4 * a.rank, lambda_e=a.lambda_e,
                      nu_lr=0.05, lr=1e-4, resize_every=1, rank_block=1, targets="attn+ff+proj",
                      optimizer="adamw", mixed_precision="no")
    events = []
    t0 = time.perf_counter()
    train_sd_scripts(a.sd_scripts, a.checkpoint, a.dataset, out, "lora2", cfg, a.steps, a.resolution, 1, 0,
                     python=a.python, callback=events.append, overwrite=True,
                     tokenizer_cache_dir=a.tokenizer_cache_dir)
    lora2_wall = time.perf_counter() - t0
    lora2_s = events[-1].elapsed / events[-1].step

    import tomllib
    settings = tomllib.loads((out / ".lora2-lora2" / "train.toml").read_text())
    settings.pop("network_args")
    settings.update(network_module="networks.lora", network_dim=a.rank, network_alpha=float(a.rank),
                    output_name="kohya_lora")
    (out / "kohya_lora.toml").write_text(to_toml(settings))
    t0 = time.perf_counter()
    run = subprocess.run([a.python, "sdxl_train_network.py", "--config_file", str(out / "kohya_lora.toml")],
                         cwd=a.sd_scripts, capture_output=True, text=True)
    kohya_wall = time.perf_counter() - t0
    (out / "kohya_lora.log").write_text(run.stdout + run.stderr)
    if run.returncode != 0:
        print(f"networks.lora run failed; see {out / 'kohya_lora.log'}", file=sys.stderr)
        return 1
    rates = re.findall(r"(\d+(?:\.\d+)?)s/it", run.stdout + run.stderr)
    its = re.findall(r"(\d+(?:\.\d+)?)it/s", run.stdout + run.stderr)
    kohya_s = float(rates[-1]) if rates else (1.0 / float(its[-1]) if its else float("nan"))
    ranks = list(events[-1].ranks.values())
    print(json.dumps({
        "steps": a.steps, "resolution": a.resolution, "rank": a.rank, "modules": len(ranks),
        "lora2_s_per_step": round(lora2_s, 3), "networks_lora_s_per_step": round(kohya_s, 3),
        "ratio": round(lora2_s / kohya_s, 3), "lora2_final_ranks": [min(ranks), max(ranks)],
        "lora2_wall_s": round(lora2_wall, 1), "networks_lora_wall_s": round(kohya_wall, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
