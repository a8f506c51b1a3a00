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
import statistics
import time

import torch

from _common import FixedLoRANetwork, print_result, threads_note

from lora2_train.config import LoRA2Config
from lora2_train.models import SDXLUNet, reduced, sdxl_config
from lora2_train.network import LoRA2Network
from lora2_train.objective import DDPMSchedule, mse_loss


def ragged_ranks(keys, r_max, seed=0):
    """A spread of ranks like a trained LoRA² adapter: geometric levels from 4 to r_max."""
    g = torch.Generator().manual_seed(seed)
    levels = [r for r in (4, 8, 16, 32, 64, 128, 256, 512) if r <= r_max]
    return {k: levels[int(torch.randint(0, len(levels), (1,), generator=g))] for k in keys}


def set_ranks(net: LoRA2Network, ranks: dict) -> None:
    with torch.no_grad():
        for k, layer in net.layers.items():
            layer.set_rank(ranks[k])
            layer.lora_up.normal_(std=1e-3)


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
    lora2 = LoRA2Network(cfg, unet).to(dev)
    ranks = ragged_ranks(sorted(lora2.layers), r_max)
    set_ranks(lora2, ranks)
    mean_rank = sum(lora2.ranks().values()) / len(lora2.layers)
    arms = {"lora2": lora2}
    state = {}

    def make_fixed(rank):
        net = FixedLoRANetwork(unet, rank).to(dev)
        net.restore()
        return net
    arms["fixed_same_max"] = make_fixed(r_max)
    arms["fixed_same_mean"] = make_fixed(max(1, round(mean_rank)))
    for name, net in arms.items():
        params = list(net.param_groups()) if name == "lora2" else [{"params": list(net.parameters())}]
        state[name] = {"opt": torch.optim.Adam(params, lr=1e-4, foreach=True), "times": [], "step": 0}

    def attach(name):
        arms[name].apply_to()  # LoRA²: also the per-call vectorized Λ hook on the UNet

    def detach(name):
        arms[name].restore()

    def one_step(name):
        st, net = state[name], arms[name]
        xt, t, noise = schedule.noisy(x0, g)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.full and dev.type == "cuda"):
            loss = mse_loss(unet(xt.to(next(unet.parameters()).dtype), t, **{k: v.to(xt.dtype) for k, v in cond.items()}), noise)
        if name == "lora2":
            rt, wt = net.reg_loss()
            loss = loss + cfg.lambda_r * (rt + cfg.beta * wt)
        st["opt"].zero_grad(set_to_none=True)
        loss.backward()
        st["opt"].step()
        st["step"] += 1
        if name == "lora2" and st["step"] % cfg.resize_every == 0:
            net.resize(st["opt"])

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    peak = {}
    for name in arms:  # warm-up
        attach(name)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        one_step(name)
        one_step(name)
        sync()
        if dev.type == "cuda":
            peak[name] = torch.cuda.max_memory_allocated()
        detach(name)
    for _ in range(args.rounds):
        for name in arms:
            attach(name)
            for _ in range(args.steps):
                sync()
                t0 = time.perf_counter()
                one_step(name)
                sync()
                state[name]["times"].append(time.perf_counter() - t0)
            detach(name)

    def lora_bytes(name):
        # parameters + gradients + Adam's two moments, fp32
        n = sum(p.numel() for p in arms[name].parameters() if p.dim() > 0)
        return 4 * 4 * n

    med = {n: statistics.median(s["times"]) for n, s in state.items()}
    result = {
        "benchmark": "step_time",
        "model": "sdxl-full" if args.full else ("tiny" if args.quick else "sdxl-reduced-w64"),
        "latent": size, "batch": args.batch, "r_max": r_max, "lora2_mean_rank": round(mean_rank, 2),
        "fixed_same_mean_rank": max(1, round(mean_rank)), "components": len(lora2.layers),
        "sec_per_step": {n: round(v, 5) for n, v in med.items()},
        "ratio_vs_fixed_same_max": round(med["lora2"] / med["fixed_same_max"], 3),
        "ratio_vs_fixed_same_mean": round(med["lora2"] / med["fixed_same_mean"], 3),
        "lora_state_bytes": {n: lora_bytes(n) for n in arms},
        **threads_note(),
    }
    if peak:
        result["peak_memory_bytes"] = peak
    print_result(result)


if __name__ == "__main__":
    main()
