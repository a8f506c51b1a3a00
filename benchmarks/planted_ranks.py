"""Planted-rank benchmark: does LoRA² find the ranks a teacher was built with?

teacher = random-weight SDXL-architecture UNet + ΔW_ℓ of planted rank r_ℓ ∈ {0, 2, 4, 8, 16, 32, 64}
on every attention projection (spec §7).  Students distil the teacher's ε-prediction on random
latents / conditioning / timesteps with the same step budget, data stream and learning rate:
  - LoRA² (full objective),
  - LoRA² without L_reg (λ_r = 0: the paper's ablation),
  - plain fixed-rank LoRA at ranks 4 … 128 (capped by each layer's shape).
Reported (last line, JSON): spearman(learned rank, planted rank) over components, parameters and
held-out teacher-mismatch MSE of every student, and parameter ratios against the fixed-rank
Pareto front.

    python benchmarks/planted_ranks.py           # full run (≈15 min on 2 CPU cores)
    python benchmarks/planted_ranks.py --quick   # seconds; used by the tests
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from _common import FixedLoRANetwork, print_result, threads_note

from lora2_train.config import LoRA2Config
from lora2_train.models import SDXLUNet, reduced, sdxl_config
from lora2_train.network import LoRA2Network
from lora2_train.objective import DDPMSchedule, mse_loss
from lora2_train.planted import (RandomConditioning, make_teacher, plan_ranks, sharpen_attention, spearman,
                                 target_modules)
from lora2_train.trainer import Trainer

FULL = dict(width=32, depth=(0, 1, 1), middle=-1, latent=8, batch=8, steps=300, sharpen=3.0,
            ranks=(4, 8, 16, 32, 64, 128))
QUICK = dict(width=16, depth=(0, 1, 1), middle=-1, latent=8, batch=2, steps=6, sharpen=3.0, ranks=(4, 16))

#: LoRA² hyperparameters chosen on this benchmark (README: "Choosing λ_r, β")
LORA2 = dict(r_init=8, r_target=4, r_max=128, lr=2e-3, nu_lr=3e-2, lambda_r=1e-3, beta=1.0, resize_every=10)


def build(opts, seed=0):
    torch.manual_seed(seed)
    ucfg = reduced(sdxl_config(), model_channels=opts["width"], context_dim=2 * opts["width"],
                   head_channels=opts["width"] // 2, depth=opts["depth"], middle=opts["middle"])
    unet = sharpen_attention(SDXLUNet(ucfg).requires_grad_(False), opts["sharpen"])
    plan = plan_ranks(target_modules(unet), seed=seed)
    teacher = make_teacher(unet, plan, strength=3.0, seed=seed)
    data = RandomConditioning(4, opts["latent"], ucfg.context_dim, ucfg.adm_in_channels, tokens=16)
    return unet, teacher, plan, data


def probe_mse(unet, teacher, data, n=32):
    """Held-out teacher mismatch: mean ‖student − teacher‖² on a fixed probe set."""
    g = torch.Generator().manual_seed(12345)
    b = data.sample(n, g)
    x, t, _ = DDPMSchedule().noisy(b["latents"], g)
    with torch.no_grad():
        return float(mse_loss(unet(x, t, **b["cond"]), teacher(x, t, **b["cond"])))


def train_lora2(opts, overrides=None):
    unet, teacher, plan, data = build(opts)
    cfg = LoRA2Config(**{**LORA2, "steps": opts["steps"], "batch_size": opts["batch"], "checkpoint_every": 10**6,
                         **(overrides or {})})
    net = LoRA2Network(cfg, unet).apply_to()
    res = Trainer(unet, net, data, cfg, teacher=teacher).train()
    keys = sorted(plan)
    return {"params": res.num_params, "mse": probe_mse(unet, teacher, data),
            "spearman": spearman([plan[k] for k in keys], [res.ranks[k] for k in keys]),
            "ranks": res.ranks, "plan": plan}


def train_fixed(opts, rank):
    """Plain LoRA at a fixed rank, same data stream, schedule, optimizer and steps as LoRA²."""
    unet, teacher, _, data = build(opts)
    net = FixedLoRANetwork(unet, rank)
    opt = torch.optim.Adam(net.parameters(), lr=LORA2["lr"], foreach=True)
    sched, g = DDPMSchedule(), torch.Generator().manual_seed(0)
    for _ in range(opts["steps"]):
        b = data.sample(opts["batch"], g)
        x, t, _ = sched.noisy(b["latents"], g)
        with torch.no_grad():
            target = teacher(x, t, **b["cond"])
        loss = mse_loss(unet(x, t, **b["cond"]), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"params": net.num_parameters(), "mse": probe_mse(unet, teacher, data)}


def fixed_params_at_mse(fixed: dict, mse: float):
    """Parameters a fixed-rank LoRA needs to reach `mse`, interpolated in log(params) along the sweep; None if none does."""
    pts = sorted((v["params"], v["mse"]) for v in fixed.values())
    best_so_far = []
    for p, m in pts:
        if m <= mse:
            if not best_so_far:
                return p
            p0, m0 = best_so_far[-1]
            if m0 == m:
                return p
            w = (m0 - mse) / (m0 - m)
            return math.exp(math.log(p0) + w * (math.log(p) - math.log(p0)))
        best_so_far.append((p, m))
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()
    opts = dict(QUICK if args.quick else FULL)
    if args.steps:
        opts["steps"] = args.steps
    t0 = time.perf_counter()
    lora2 = train_lora2(opts)
    print(f"lora2: params={lora2['params']} mse={lora2['mse']:.5f} spearman={lora2['spearman']:.3f}", flush=True)
    noreg = train_lora2(opts, {"lambda_r": 0.0})
    print(f"lora2 without L_reg: params={noreg['params']} mse={noreg['mse']:.5f}", flush=True)
    fixed = {}
    for r in opts["ranks"]:
        fixed[r] = train_fixed(opts, r)
        print(f"fixed rank {r}: params={fixed[r]['params']} mse={fixed[r]['mse']:.5f}", flush=True)
    plan = lora2["plan"]
    equal = fixed_params_at_mse(fixed, lora2["mse"])
    largest = fixed[max(fixed)]
    dominated = any(v["params"] <= lora2["params"] and v["mse"] < lora2["mse"] for v in fixed.values())
    by_planted = {}
    for k, r in lora2["plan"].items():
        by_planted.setdefault(r, []).append(lora2["ranks"][k])
    print_result({
        "benchmark": "planted_ranks", "quick": args.quick, "steps": opts["steps"], "components": len(plan),
        "spearman": round(lora2["spearman"], 4),
        "lora2_params": lora2["params"], "lora2_mse": round(lora2["mse"], 6),
        "lora2_mean_rank_by_planted": {str(r): round(sum(v) / len(v), 2) for r, v in sorted(by_planted.items())},
        "noreg_params": noreg["params"], "noreg_mse": round(noreg["mse"], 6),
        "noreg_spearman": round(noreg["spearman"], 4),
        "fixed": {str(r): {"params": v["params"], "mse": round(v["mse"], 6)} for r, v in fixed.items()},
        "params_ratio_vs_fixed_at_equal_mse": round(equal / lora2["params"], 3) if equal else None,
        "params_ratio_vs_largest_fixed": round(largest["params"] / lora2["params"], 3),
        "params_ratio_vs_rank512_at_equal_mse": None,
        "lora2_dominated_by_a_fixed_rank": dominated,
        "seconds": round(time.perf_counter() - t0, 1),
        **threads_note(),
    })


if __name__ == "__main__":
    main()
