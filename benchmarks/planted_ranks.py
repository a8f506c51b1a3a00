"""Planted-rank benchmark: does LoRA² find the ranks a teacher was built with?

teacher = random-weight SDXL-architecture UNet (width 32, text context 128, the five transformer
blocks of the 128-channel level, 40 attention components) + planted ΔW (spec §7):
  - every cross-attention v/out pair gets one planted rank, 1/64 … 1/2 of the pair's smallest
    dimension (2, 8, 16, 32, 64); both members the same rank, since attention only sees the
    per-head product W_o·W_v and a change in one member can be partly absorbed by the other;
  - every other component (q/k pairs, self-attention v/out) gets rank 0: the regularizer must keep
    them small.  Near-uniform random attention makes q/k changes barely visible in the output
    (sharpening it to make them visible stalls distillation), and self-attention v/out pairs
    (input: hidden states, not the white text conditioning) learned too slowly in trial runs to
    be told apart within a CPU step budget;
  - every planted direction moves the UNet output equally (per-pair gains, `balanced_gains`).
Students distil the teacher's ε-prediction on random latents / conditioning / timesteps with the
same step budget, data stream and learning rate:
  - LoRA² (full objective),
  - LoRA² without L_reg (λ_r = 0: the paper's ablation),
  - plain fixed-rank LoRA at ranks 4 … 128 (128 = full rank of every component).
Reported (last line, JSON): spearman(learned rank, planted rank) over all components and over the
planted ones, parameters and held-out teacher-mismatch MSE of every student (and of the untrained
base), and parameter ratios against the fixed-rank Pareto front.

    python benchmarks/planted_ranks.py           # full run (≈10 min on 2 CPU cores)
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
from lora2_train.planted import (RandomConditioning, balanced_gains, make_teacher, plan_pair_ranks, spearman,
                                 target_modules)
from lora2_train.trainer import Trainer

FULL = dict(width=32, context=128, depth=(0, 0, 1), middle=-2, latent=16, batch=8, steps=500, strength=1.0,
            ranks=(4, 8, 16, 32, 64, 128))
QUICK = dict(width=16, context=64, depth=(0, 0, 1), middle=-2, latent=8, batch=2, steps=6, strength=1.0,
             ranks=(4, 16))

#: planted rank of each cross-attention v/out pair, as a fraction of the pair's smallest dimension
PLANTED = (1 / 64, 1 / 16, 1 / 8, 1 / 4, 1 / 2)
#: LoRA² hyperparameters chosen on this benchmark (README, "Planted ranks"); λ_r is relative to this task's MSE
LORA2 = dict(r_init=16, r_target=2, r_max=128, rank_block=4, lr=2e-3, nu_lr=3e-2, lambda_r=1.5e-5, beta=1.0,
             resize_every=10)


def build(opts, seed=0):
    torch.manual_seed(seed)
    ucfg = reduced(sdxl_config(), model_channels=opts["width"], context_dim=opts.get("context", 2 * opts["width"]),
                   head_channels=opts["width"] // 2, depth=opts["depth"], middle=opts["middle"])
    unet = SDXLUNet(ucfg).requires_grad_(False)
    plan = plan_pair_ranks(target_modules(unet), seed=seed, fractions=PLANTED, planted=("attn2_vo",))
    data = RandomConditioning(4, opts["latent"], ucfg.context_dim, ucfg.adm_in_channels, tokens=16)
    g = torch.Generator().manual_seed(777)  # calibration inputs, disjoint from training and probe streams
    b = data.sample(16, g)
    x, t, _ = DDPMSchedule().noisy(b["latents"], g)
    gains = balanced_gains(unet, plan, lambda m: m(x, t, **b["cond"]), opts["strength"], seed)
    teacher = make_teacher(unet, plan, strength=opts["strength"], seed=seed, gains=gains)
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
    planted = [k for k in keys if plan[k] > 0]
    return {"params": res.num_params, "mse": probe_mse(unet, teacher, data),
            "spearman": spearman([plan[k] for k in keys], [res.ranks[k] for k in keys]),
            "spearman_planted": spearman([plan[k] for k in planted], [res.ranks[k] for k in planted]),
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


def _by_planted(plan: dict) -> dict:
    """planted rank → keys of the components planted at it."""
    out = {}
    for k, r in plan.items():
        out.setdefault(r, []).append(k)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()
    opts = dict(QUICK if args.quick else FULL)
    if args.steps:
        opts["steps"] = args.steps
    t0 = time.perf_counter()
    unet, teacher, _, data = build(opts)
    base_mse = probe_mse(unet, teacher, data)
    print(f"untrained: mse={base_mse:.4g}", flush=True)
    lora2 = train_lora2(opts)
    print(f"lora2: params={lora2['params']} mse={lora2['mse']:.4g} spearman={lora2['spearman']:.3f}", flush=True)
    noreg = train_lora2(opts, {"lambda_r": 0.0})
    print(f"lora2 without L_reg: params={noreg['params']} mse={noreg['mse']:.4g}", flush=True)
    fixed = {}
    for r in opts["ranks"]:
        fixed[r] = train_fixed(opts, r)
        print(f"fixed rank {r}: params={fixed[r]['params']} mse={fixed[r]['mse']:.4g}", flush=True)
    plan = lora2["plan"]
    equal = fixed_params_at_mse(fixed, lora2["mse"])
    largest = fixed[max(fixed)]
    best = min(fixed.values(), key=lambda v: v["mse"])  # the fixed rank with the lowest error
    dominated = any(v["params"] <= lora2["params"] and v["mse"] < lora2["mse"] for v in fixed.values())
    print_result({
        "benchmark": "planted_ranks", "quick": args.quick, "steps": opts["steps"], "components": len(plan),
        "spearman": round(lora2["spearman"], 4), "spearman_planted": round(lora2["spearman_planted"], 4),
        "base_mse": float(f"{base_mse:.4g}"),
        "lora2_params": lora2["params"], "lora2_mse": float(f"{lora2['mse']:.4g}"),
        "lora2_mean_rank_by_planted": {str(r): round(sum(lora2["ranks"][k] for k in ks) / len(ks), 2)
                                       for r, ks in sorted(_by_planted(plan).items())},
        "noreg_params": noreg["params"], "noreg_mse": float(f"{noreg['mse']:.4g}"),
        "noreg_mean_rank_by_planted": {str(r): round(sum(noreg["ranks"][k] for k in ks) / len(ks), 2)
                                       for r, ks in sorted(_by_planted(plan).items())},
        "noreg_spearman": round(noreg["spearman"], 4),
        "fixed": {str(r): {"params": v["params"], "mse": float(f"{v['mse']:.4g}")} for r, v in fixed.items()},
        "params_ratio_vs_fixed_at_equal_mse": round(equal / lora2["params"], 3) if equal else None,
        "params_ratio_vs_largest_fixed": round(largest["params"] / lora2["params"], 3),
        "params_ratio_vs_best_fixed": round(best["params"] / lora2["params"], 3),
        "best_fixed_mse_vs_lora2": round(best["mse"] / lora2["mse"], 3),
        "params_ratio_vs_rank512_at_equal_mse": None,
        "lora2_dominated_by_a_fixed_rank": dominated,
        "seconds": round(time.perf_counter() - t0, 1),
        **threads_note(),
    })


if __name__ == "__main__":
    main()
