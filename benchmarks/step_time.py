"""Training step time: LoRA² vs plain fixed-rank LoRA, interleaved in one run.

Three arms on the same UNet, batch and data, trained with Adam on the paper's
attention targets:
  lora2           LoRA² with r_max = R and ragged ranks (mean m), full objective
                  (ε-MSE + λ_r·L_reg), re-allocation check every 10 steps
  fixed_same_max  plain LoRA at rank R
  fixed_same_mean plain LoRA at rank round(m)
Arms run in interleaved blocks so that machine noise hits all of them alike.
Last line: JSON with the per-step medians and the ratios.

    python benchmarks/step_time.py            # reduced-width SDXL on CPU
    python benchmarks/step_time.py --full     # full-size SDXL shapes (random weights), GPU advised
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from _common import FixedLoRANetwork, print_result, threads_note

from lora2_train.config import LoRA2Config
from lora2_train.models import SDXLUNet, reduced, sdxl_config
from lora2_train.network import LoRA2Network
from lora2_train.objective import DDPMSchedule, lora2_loss, mse_loss


def ragged_ranks(keys, r_max, seed=0, mean=None):
    """A spread of ranks like a trained LoRA² adapter over geometric levels from 4 to r_max.

    Without `mean`: each key draws a level uniformly.  With `mean`: the levels are weighted geometrically
    (w_i ∝ a^i, `a` found by bisection so that the weighted mean level is `mean`), the keys get the levels at
    evenly spaced quantiles of that distribution (so the realized mean is close to `mean` and the largest level
    occurs when its share is at least 1/(2·len(keys))), in a random order."""
    g = torch.Generator().manual_seed(seed)
    levels = [r for r in (4, 8, 16, 32, 64, 128, 256, 512) if r <= r_max]
    keys = list(keys)
    if mean is None:
        return {k: levels[int(torch.randint(0, len(levels), (1,), generator=g))] for k in keys}
    if not levels[0] <= mean <= levels[-1]:
        raise ValueError(f"mean rank {mean} outside the levels {levels[0]}…{levels[-1]}")

    def weights(log_a):
        w = [math.exp(log_a * i) for i in range(len(levels))]
        return [x / sum(w) for x in w]

    lo, hi = -20.0, 20.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if sum(w * r for w, r in zip(weights(mid), levels)) < mean:
            lo = mid
        else:
            hi = mid
    cdf, acc = [], 0.0
    for w in weights((lo + hi) / 2):
        acc += w
        cdf.append(acc)
    n = len(keys)
    picks = [next((r for r, c in zip(levels, cdf) if (j + 0.5) / n <= c), levels[-1]) for j in range(n)]
    order = torch.randperm(n, generator=g).tolist()
    return {k: picks[i] for k, i in zip(keys, order)}


def set_ranks(net: LoRA2Network, ranks: dict) -> None:
    """Start every component at its rank in `ranks` (through the layers' rank API, which re-allocates);
    B gets small random values so that the adapters are not zero."""
    with torch.no_grad():
        for k, layer in net.layers.items():
            layer.set_rank(ranks[k])
            layer.lora_up.normal_(std=1e-3)


def build_arm(unet, dev, cfg: LoRA2Config | None = None, mean: float | None = None, rank: int | None = None):
    """(network, Adam) of one arm, not attached to the UNet: LoRA² (`cfg`; ragged ranks up to r_max, around
    `mean` if given, see :func:`ragged_ranks`) or plain LoRA at `rank`."""
    if cfg is not None:
        net = LoRA2Network(cfg, unet).to(dev)
        set_ranks(net, ragged_ranks(sorted(net.layers), cfg.r_max, mean=mean))
        params = net.param_groups()
    else:
        net = FixedLoRANetwork(unet, rank).to(dev)
        net.restore()
        params = [{"params": list(net.parameters())}]
    return net, torch.optim.Adam(params, lr=1e-4, foreach=True)


def train_step(unet, net, opt, schedule, x0, cond, g, amp_dtype=None, cfg: LoRA2Config | None = None,
               step: int = 0) -> torch.Tensor:
    """One Adam step of an attached arm on (x0, cond) with fresh noise; LoRA² (`cfg` given) adds λ_r·L_reg and
    re-allocates every `cfg.resize_every` steps (`step` counts from 1).  `amp_dtype`: autocast dtype or None."""
    xt, t, noise = schedule.noisy(x0, g)
    dtype = next(unet.parameters()).dtype
    with torch.autocast(x0.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        loss = mse_loss(unet(xt.to(dtype), t, **{k: v.to(dtype) for k, v in cond.items()}), noise)
    if cfg is not None:
        loss = lora2_loss(loss, net, cfg)[0]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if cfg is not None and step % cfg.resize_every == 0:
        net.resize(opt)
    return loss.detach()


def lora_state_bytes(net) -> int:
    """Parameters + gradients + Adam's two moments, fp32."""
    return 4 * 4 * sum(p.numel() for p in net.parameters() if p.dim() > 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="full-size SDXL UNet shapes (2.6 B parameters)")
    ap.add_argument("--r-max", type=int, default=None)
    ap.add_argument("--size", type=int, default=None, help="latent side (default 16 reduced / 32 full)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per block per arm")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--quick", action="store_true", help="tiny settings for tests")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.full:
        ucfg, r_max, size, ctx_tokens = sdxl_config(), args.r_max or 512, args.size or 32, 77
    else:
        ucfg = reduced(sdxl_config(), model_channels=64, context_dim=128, head_channels=32)
        r_max, size, ctx_tokens = args.r_max or 128, args.size or 16, 16
    if args.quick:
        ucfg = reduced(sdxl_config(), model_channels=16, context_dim=32, head_channels=8, depth=(0, 1, 1), middle=1)
        r_max, size, args.steps, args.rounds = 16, 8, 2, 1
    torch.manual_seed(0)
    unet = SDXLUNet(ucfg).to(dev).requires_grad_(False)
    if args.full and dev.type == "cuda":
        unet = unet.to(torch.bfloat16)
    schedule = DDPMSchedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.batch, 4, size, size, generator=g).to(dev)
    cond = {"context": torch.randn(args.batch, ctx_tokens, ucfg.context_dim, generator=g).to(dev),
            "y": torch.randn(args.batch, ucfg.adm_in_channels, generator=g).to(dev)}

    cfg = LoRA2Config(r_init=min(64, r_max), r_target=min(64, r_max), r_max=r_max, lr=1e-4, nu_lr=1e-2,
                      lambda_r=1e-3, beta=1e-2, steps=10**6)
    lora2 = build_arm(unet, dev, cfg)
    mean_rank = sum(lora2[0].ranks().values()) / len(lora2[0].layers)
    arms = {"lora2": lora2, "fixed_same_max": build_arm(unet, dev, rank=r_max),
            "fixed_same_mean": build_arm(unet, dev, rank=max(1, round(mean_rank)))}
    state = {name: {"times": [], "step": 0} for name in arms}
    amp = torch.bfloat16 if args.full and dev.type == "cuda" else None

    def one_step(name):
        net, opt = arms[name]
        state[name]["step"] += 1
        train_step(unet, net, opt, schedule, x0, cond, g, amp, cfg if name == "lora2" else None,
                   state[name]["step"])

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    peak = {}
    for name in arms:  # warm-up
        arms[name][0].apply_to()  # LoRA²: also the per-call vectorized Λ hook on the UNet
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        one_step(name)
        one_step(name)
        sync()
        if dev.type == "cuda":
            peak[name] = torch.cuda.max_memory_allocated()
        arms[name][0].restore()
    for _ in range(args.rounds):
        for name in arms:
            arms[name][0].apply_to()
            for _ in range(args.steps):
                sync()
                t0 = time.perf_counter()
                one_step(name)
                sync()
                state[name]["times"].append(time.perf_counter() - t0)
            arms[name][0].restore()

    med = {n: statistics.median(s["times"]) for n, s in state.items()}
    result = {
        "benchmark": "step_time",
        "model": "sdxl-full" if args.full else ("tiny" if args.quick else "sdxl-reduced-w64"),
        "latent": size, "batch": args.batch, "r_max": r_max, "lora2_mean_rank": round(mean_rank, 2),
        "fixed_same_mean_rank": max(1, round(mean_rank)), "components": len(lora2[0].layers),
        "sec_per_step": {n: round(v, 5) for n, v in med.items()},
        "ratio_vs_fixed_same_max": round(med["lora2"] / med["fixed_same_max"], 3),
        "ratio_vs_fixed_same_mean": round(med["lora2"] / med["fixed_same_mean"], 3),
        "lora_state_bytes": {n: lora_state_bytes(arms[n][0]) for n in arms},
        **threads_note(),
    }
    if peak:
        result["peak_memory_bytes"] = peak
    print_result(result)


if __name__ == "__main__":
    main()
