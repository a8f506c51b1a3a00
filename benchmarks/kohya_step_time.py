"""Seconds per training step under sd-scripts: LoRA² (lora2_train.kohya.network + trainer extension) vs
sd-scripts' own networks.lora at the same starting rank on the same modules, in one run, for each optimizer.

    SD_SCRIPTS_DIR=... python benchmarks/kohya_step_time.py --python SD_PY --checkpoint SDXL.safetensors \\
        --dataset DIR [--steps 3] [--resolution 256] [--rank 8] [--tokenizer-cache-dir DIR] \\
        [--optimizers adamw,adamw8bit,adafactor,prodigy]

Each optimizer trains LoRA² first, then (unless left out of --baseline-for) networks.lora with the same
sd-scripts optimizer settings (Prodigy at learning rate 1.0, the others at 1e-4).  LoRA² checks its ranks
after every step, so once ν has moved (sooner with a larger --nu-lr; growth with --r-target above --rank)
its optimizer state (8-bit, factored or Prodigy's) is carried across re-allocations; the losses, the ranks,
the number of re-allocated modules per step and the step time of each are printed as a JSON line when it
ends.

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
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora2_train.config import LoRA2Config  # noqa: E402
from lora2_train.kohya.launch import to_toml, train_sd_scripts  # noqa: E402
from lora2_train.optim import OPTIMIZERS  # noqa: E402


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
    p.add_argument("--r-target", type=int, default=None, help="LoRA²'s r_target (default: rank/2, so ranks shrink; "
                   "above --rank they grow)")
    p.add_argument("--nu-lr", type=float, default=0.05, help="ν's learning rate (larger: ranks move sooner)")
    p.add_argument("--tokenizer-cache-dir", default=None)
    p.add_argument("--optimizers", default="adamw", help="comma-separated: " + ", ".join(OPTIMIZERS))
    p.add_argument("--baseline-for", default=None,
                   help="optimizers that also train networks.lora (default: all of --optimizers)")
    p.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    a = p.parse_args()
    optimizers = [o.strip() for o in a.optimizers.split(",") if o.strip()]
    bad = [o for o in optimizers if o not in OPTIMIZERS]
    if bad or not optimizers:
        p.error(f"--optimizers: {', '.join(bad) or 'none given'}; choose from {', '.join(OPTIMIZERS)}")
    baseline = optimizers if a.baseline_for is None else [o.strip() for o in a.baseline_for.split(",") if o.strip()]
    if set(baseline) - set(optimizers):
        p.error(f"--baseline-for: {', '.join(sorted(set(baseline) - set(optimizers)))} not in --optimizers")
    if not a.sd_scripts:
        p.error("--sd-scripts or SD_SCRIPTS_DIR is required")
    out = Path(a.out or tempfile.mkdtemp(prefix="lora2-kohya-bench-"))
    results = []
    for opt in optimizers:
        res = compare(a, opt, out / opt, baseline=opt in baseline)
        print(json.dumps(res), flush=True)
        results.append(res)
    print(json.dumps({"steps": a.steps, "resolution": a.resolution, "rank": a.rank, "runs": results}))
    return 0 if all("error" not in r for r in results) else 1


def compare(a, optimizer: str, out: Path, baseline: bool = True) -> dict:
    """LoRA² then (`baseline`) networks.lora with `optimizer`: s/step of each, LoRA²'s losses and ranks."""
    out.mkdir(parents=True, exist_ok=True)
    lr = 1.0 if optimizer == "prodigy" else 1e-4
    cfg = LoRA2Config(r_init=a.rank, r_target=a.r_target or max(1, a.rank // 2), r_max=4 * a.rank,
                      lambda_e=a.lambda_e, nu_lr=a.nu_lr, lr=lr, resize_every=1, rank_block=1, targets="attn+ff+proj",
                      optimizer=optimizer, mixed_precision="no")
    events = []
    t0 = time.perf_counter()
    try:
        train_sd_scripts(a.sd_scripts, a.checkpoint, a.dataset, out, "lora2", cfg, a.steps, a.resolution, 1, 0,
                         python=a.python, callback=events.append, overwrite=True,
                         tokenizer_cache_dir=a.tokenizer_cache_dir)
    except Exception as e:  # one optimizer failing still reports the others
        return {"optimizer": optimizer, "error": f"LoRA² run: {e}"[:2000]}
    lora2_wall = time.perf_counter() - t0
    lora2_s = events[-1].elapsed / events[-1].step
    ranks = list(events[-1].ranks.values())
    res = {"optimizer": optimizer, "lr": lr, "modules": len(ranks), "lora2_s_per_step": round(lora2_s, 3),
           "lora2_losses": [round(float(e.loss), 4) for e in events],
           "lora2_resized_modules": [len(e.resized or {}) for e in events],
           "lora2_mean_rank": [round(sum(e.ranks.values()) / len(e.ranks), 3) for e in events],
           "lora2_final_ranks": [min(ranks), max(ranks)], "lora2_wall_s": round(lora2_wall, 1)}
    if not baseline:
        return res

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
        return {**res, "error": f"networks.lora run failed; see {out / 'kohya_lora.log'}"}
    rates = re.findall(r"(\d+(?:\.\d+)?)s/it", run.stdout + run.stderr)
    its = re.findall(r"(\d+(?:\.\d+)?)it/s", run.stdout + run.stderr)
    kohya_s = float(rates[-1]) if rates else (1.0 / float(its[-1]) if its else float("nan"))
    return {**res, "networks_lora_s_per_step": round(kohya_s, 3), "ratio": round(lora2_s / kohya_s, 3),
            "networks_lora_wall_s": round(kohya_wall, 1)}


if __name__ == "__main__":
    sys.exit(main())
