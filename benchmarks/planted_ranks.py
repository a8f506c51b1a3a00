"""Planted-rank benchmark: does LoRA² find the ranks a teacher was built with, and is it smaller?

Task (spec §7; identical for every arm; `lora2_train.planted.build_planted_task`):
  model = 15 SDXL transformer blocks (`BasicTransformerBlock`: self-attention, cross-attention on a
  128-wide text context, GEGLU feed-forward), width 128, random weights, 120 attention components (the
  paper's targets); by default the blocks sit side by side, each reading the same tokens, and the output
  stacks what each adds (`--layout stack`: in sequence, where a change planted in one block can be imitated
  by changes spread over the later ones — see `identifiability` below);
  teacher = the model + planted ΔW:
  - the cross-attention value/output pairs get planted ranks from `--levels` (default 1,2,4,8,16,32,64),
    each level on the same number of pairs (2 pairs = 4 components per level by default), both members
    of a pair the same rank (attention only sees the per-head product W_o·W_v);
  - every other component (query/key pairs, self-attention value/output, left-over pairs) gets rank 0;
  - every planted direction moves the output equally (per-pair gains, `balanced_gains`).
  Data: Gaussian tokens (4×4 positions) and text conditioning (16 tokens); the target is the teacher's
  output. A training stream (one fresh batch of 8 per step), a validation split (learning-rate
  selection) and a test split (every reported error) come from disjoint generators.

Arms, all trained by the same loop, data, step budget and Adam, each at every learning rate of
`--lrs` (the one with the lowest validation error is kept; its test error is reported):
  - LoRA² (full objective: MSE + λ_r·L_reg),
  - LoRA² without L_reg (λ_r = 0; the paper's ablation), at LoRA²'s selected learning rate,
  - plain fixed-rank LoRA at every rank of `--ranks`, rsLoRA scaling ΔW = (α/√r)·B·A with one α for all
    ranks (α = 4): with Adam the change of ΔW per step grows like √r under any rank-independent scale, so
    one learning-rate grid would favour some ranks; rsLoRA gives the grid the same meaning for all.
The loss of every arm is divided by the untrained student's validation error (λ_r is relative to 1).

Reported (last line, JSON), per seed and mean: `spearman_planted` (learned effective rank D(ν) against
planted rank over the non-zero components only), `level_means` (mean learned rank per planted level),
`zero_at_floor` (share of rank-0 components that ended at r_min = 1), `spearman_all`, the tuned
fixed-rank table and `params_ratio_at_equal_mse` (parameters of the smallest tuned fixed rank whose test
error is at most LoRA²'s, interpolated on log parameters, over LoRA²'s; null when no fixed rank of the run is
as accurate, with `params_ratio_lower_bound` = the largest one's parameters over LoRA²'s), and `identifiability`: where the
largest fixed rank puts its change (Spearman of its per-component ‖ΔW‖ and energy rank against the planted
ranks, share of Σ‖ΔW‖² in planted components) — a check of the task, which no rank learner can pass
if a student with room for every plant does not put its change where the plants are.

    python benchmarks/planted_ranks.py                       # seeds 0,1,2, one worker process per core
    python benchmarks/planted_ranks.py --seeds 5,6 --levels 1,3,6,12,24,48
    python benchmarks/planted_ranks.py --quick               # one seed, 60 steps; used by the tests
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import time
from dataclasses import dataclass

import torch

from _common import FixedLoRANetwork, print_result, threads_note

from lora2_train.config import LoRA2Config
from lora2_train.network import LoRA2Network
from lora2_train.objective import DDPMSchedule, lora2_loss, mse_loss
from lora2_train.planted import build_planted_task, rank_metrics

FULL = dict(layout="parallel", batch=8, steps=300, seeds=(0, 1, 2), levels=(1, 2, 4, 8, 16, 32, 64),
            ranks=(4, 8, 16, 32, 64), lrs=(1e-3, 2e-3, 4e-3))
QUICK = dict(layout="parallel", batch=8, steps=60, seeds=(0,), levels=(2, 8, 32), ranks=(4, 32), lrs=(2e-3,))
#: rsLoRA α of the fixed-rank baselines: ΔW = (α/√r)·B·A
FIXED_ALPHA = 4.0
#: the LoRA2Config fields the benchmark's loop uses (recorded in the JSON; the lr is the sweep's)
METHOD_FIELDS = ("q", "r_init", "r_target", "r_max", "r_min", "rank_block", "resize_every", "lambda_r", "lambda_e", "beta",
                 "scale", "targets", "nu_lr", "optimizer")
SPLIT_SEEDS = {"train": 101, "val": 202, "test": 303}


@dataclass
class Task:
    unet: torch.nn.Module
    plan: dict
    train: list
    val: list
    test: list
    base_val: float
    base_test: float


def _batches(teacher, data, n, batch, seed):
    """n batches (x_t, t, cond, teacher ε̂) drawn from their own generator."""
    g = torch.Generator().manual_seed(seed)
    sched, out = DDPMSchedule(), []
    with torch.no_grad():
        for _ in range(n):
            b = data.sample(batch, g)
            x, t, _ = sched.noisy(b["latents"], g)
            out.append((x, t, b["cond"], teacher(x, t, **b["cond"])))
    return out


def evaluate(unet, batches) -> float:
    with torch.no_grad():
        return statistics.fmean(float(mse_loss(unet(x, t, **c), y)) for x, t, c, y in batches)


def build_task(opts, seed: int) -> Task:
    unet, teacher, plan, data = build_planted_task(seed, opts["levels"], layout=opts["layout"])
    split = lambda name, n, b: _batches(teacher, data, n, b, SPLIT_SEEDS[name] * 1000 + seed)
    train, val, test = split("train", opts["steps"], opts["batch"]), split("val", 4, 16), split("test", 4, 16)
    return Task(unet, plan, train, val, test, evaluate(unet, val), evaluate(unet, test))


def lora2_config(arm, lr: float, seed: int, **overrides) -> LoRA2Config:
    """The LoRA² arm's settings: the shipped defaults, the sweep's learning rate, the seed (and λ_r = 0 for the
    no-L_reg ablation)."""
    return LoRA2Config(lr=lr, seed=seed, **({"lambda_r": 0.0} if arm == "noreg" else {}), **overrides)


def train_arm(task: Task, arm, lr: float, opts, seed: int, **overrides) -> dict:
    """One student: LoRA² ('lora2', 'noreg'), fixed rank r (int) or the oracle (fixed ranks = the planted ones),
    the same loop, data and Adam for all; every arm minimises the plain MSE, LoRA² adds λ_r·L_reg through the
    library's objective (:func:`lora2_train.objective.lora2_loss`)."""
    torch.manual_seed(seed)
    if isinstance(arm, int) or arm == "oracle":
        ranks = arm if isinstance(arm, int) else oracle_ranks(task.plan)
        net = FixedLoRANetwork(task.unet, ranks, alpha=FIXED_ALPHA)
        opt = torch.optim.Adam(net.parameters(), lr=lr, foreach=True)
        cfg = None
    else:
        cfg = lora2_config(arm, lr, seed, **overrides)
        net = LoRA2Network(cfg, task.unet).apply_to()
        opt = torch.optim.Adam(net.param_groups(), foreach=True)
    try:
        for step, (x, t, c, y) in enumerate(task.train):
            loss = mse_loss(task.unet(x, t, **c), y)
            if cfg is not None:
                loss = lora2_loss(loss, net, cfg)[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if cfg is not None and (step + 1) % cfg.resize_every == 0 and step + 1 < len(task.train):
                net.resize(opt)
        res = {"params": net.num_parameters(), "val": evaluate(task.unet, task.val),
               "test": evaluate(task.unet, task.test), "lr": lr}
        if cfg is not None:
            res["ranks"] = {k: l.effective_rank() for k, l in net.layers.items()}
        else:
            res["delta"] = delta_profile(net)
        return res
    finally:
        net.restore()


def oracle_ranks(plan: dict) -> dict:
    """The oracle's per-module ranks: exactly the planted ones (rank-0 modules get no LoRA)."""
    return {k: int(r) for k, r in plan.items() if r > 0}


@torch.no_grad()
def delta_profile(net) -> dict:
    """Per component of a fixed-rank LoRA: ‖ΔW‖_F and its energy rank (singular values holding 90 % of ‖ΔW‖²)."""
    out = {}
    for k, l in net.layers.items():
        s = torch.linalg.svdvals(l.scale * (l.lora_up @ l.lora_down))
        energy = (s.square().cumsum(0) / s.square().sum().clamp_min(1e-30))
        out[k] = {"norm": float(s.norm()), "energy_rank": int((energy < 0.9).sum()) + 1}
    return out


def identifiability(plan: dict, delta: dict) -> dict:
    """Does a fixed-rank LoRA with room for every planted rank put its change where the plants are?

    Spearman of planted rank against its ‖ΔW‖ and energy rank over the planted components, and the share
    of Σ‖ΔW‖² that lands in planted components.  Low values mean the student matches the teacher with
    changes spread over components planted at 0 as well: no method can then read the planted ranks
    off the data within this budget, and the rank metrics above measure the task as much as the method.
    """
    from lora2_train.planted import spearman

    planted = [k for k in sorted(plan) if plan[k] > 0]
    total = sum(v["norm"] ** 2 for v in delta.values())
    return {
        "spearman_norm": round(spearman([plan[k] for k in planted], [delta[k]["norm"] for k in planted]), 4),
        "spearman_energy_rank": round(spearman([plan[k] for k in planted], [delta[k]["energy_rank"] for k in planted]), 4),
        "planted_energy_share": round(sum(delta[k]["norm"] ** 2 for k in planted) / total, 4) if total else None,
        "planted_share_of_components": round(len(planted) / len(plan), 4),
    }


def pick(task: Task, runs: list, arm, log) -> dict:
    """The arm's run with the lowest validation error over the learning-rate sweep."""
    best = dict(min(runs, key=lambda r: r["val"]))
    best["val_by_lr"] = {f"{r['lr']:g}": round(r["val"] / task.base_val, 4) for r in sorted(runs, key=lambda r: r["lr"])}
    log(f"  {arm}: lr={best['lr']:g} params={best['params']} test={best['test'] / task.base_test:.4f} "
        f"(val by lr {best['val_by_lr']})")
    return best


def fixed_params_at_mse(fixed: dict, mse: float):
    """Parameters a fixed-rank LoRA needs to reach `mse`: the smallest rank that does, interpolated on log
    parameters against the next smaller rank; None if no rank does."""
    pts = sorted((v["params"], v["test"]) for v in fixed.values())
    for i, (p, m) in enumerate(pts):
        if m <= mse:
            if i == 0:
                return p
            p0, m0 = pts[i - 1]
            w = (m0 - mse) / (m0 - m)
            return math.exp(math.log(p0) + w * (math.log(p) - math.log(p0)))
    return None


def summarize(opts, seed, runs: dict, noreg: dict, seconds: float, log) -> dict:
    """One seed's figures from its runs: runs[arm] = [one result per learning rate]."""
    task = _task(opts, seed)
    lora2 = pick(task, runs["lora2"], "lora2", log)
    fixed = {r: pick(task, runs[r], r, log) for r in opts["ranks"]}
    oracle = pick(task, runs["oracle"], "oracle", log)
    rel = lambda v: round(v / task.base_test, 4)
    equal = fixed_params_at_mse(fixed, lora2["test"])
    out = {
        "seed": seed, **rank_metrics(task.plan, lora2["ranks"]),
        "lora2": {"params": lora2["params"], "test": rel(lora2["test"]), "lr": lora2["lr"],
                  "mean_rank": round(statistics.fmean(lora2["ranks"].values()), 2),
                  "val_by_lr": lora2["val_by_lr"]},
        "noreg": {"params": noreg["params"], "test": rel(noreg["test"]),
                  "level_means": rank_metrics(task.plan, noreg["ranks"])["level_means"]},
        "fixed": {str(r): {"params": v["params"], "test": rel(v["test"]), "lr": v["lr"], "val_by_lr": v["val_by_lr"]}
                  for r, v in fixed.items()},
        "params_ratio_at_equal_mse": round(equal / lora2["params"], 3) if equal else None,
        # the physical limit of the task: fixed per-module ranks equal to the planted ones, tuned like every arm
        "oracle": {"params": oracle["params"], "test": rel(oracle["test"]), "lr": oracle["lr"]},
        "params_ratio_vs_oracle": round(lora2["params"] / oracle["params"], 3),
        "test_ratio_vs_oracle": round(lora2["test"] / oracle["test"], 3),
        # no fixed rank of the run as accurate as LoRA²: the ratio is at least the largest one's size over LoRA²'s
        "params_ratio_lower_bound": (round(max(v["params"] for v in fixed.values()) / lora2["params"], 3)
                                     if equal is None and all(v["test"] > lora2["test"] for v in fixed.values())
                                     else None),
        # the largest fixed rank: where does a student with room for every plant put its change?
        "identifiability": {"rank": max(fixed), **identifiability(task.plan, fixed[max(fixed)]["delta"])},
        "dominated_by": [r for r, v in fixed.items() if v["params"] <= lora2["params"] and v["test"] < lora2["test"]],
        "train_seconds": round(seconds, 1),
    }
    log(f"seed {seed}: spearman_planted={out['spearman_planted']} level_means={out['level_means']} "
        f"zero_at_floor={out['zero_at_floor']} params_ratio_at_equal_mse={out['params_ratio_at_equal_mse']} "
        f"identifiability={out['identifiability']}")
    return out


_TASKS: dict = {}


def _task(opts, seed) -> Task:
    """The seed's task, built once per process (every arm of a seed trains on the same one)."""
    key = (seed, opts["layout"], tuple(opts["levels"]), opts["steps"], opts["batch"])
    if key not in _TASKS:
        _TASKS.clear()
        _TASKS[key] = build_task(opts, seed)
    return _TASKS[key]


def _job(args):
    """One (seed, arm, learning rate) run in a worker; returns it with its wall time."""
    opts, seed, arm, lr, threads = args
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    res = train_arm(_task(opts, seed), arm, lr, opts, seed)
    print(f"[seed {seed}] {arm} lr={lr:g}: val={res['val']:.4g} params={res['params']} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return (seed, arm, lr), res, time.perf_counter() - t0


def _run_jobs(jobs, workers):
    if workers > 1 and len(jobs) > 1:
        import multiprocessing
        with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            return list(pool.imap_unordered(_job, jobs, chunksize=1))
    return [_job(j) for j in jobs]


def run_all(opts, workers: int, threads: int, log) -> list:
    """Every arm of every seed at every learning rate, spread over `workers` processes (longest first, sorted by
    seed so each worker mostly keeps one task built), then the no-L_reg ablation at LoRA²'s selected rate."""
    arms = ["lora2", "oracle", *sorted(opts["ranks"], reverse=True)]
    jobs = [(opts, s, a, lr, threads) for s in opts["seeds"] for a in arms for lr in opts["lrs"]]
    done = _run_jobs(jobs, workers)
    runs = {s: {a: [] for a in arms} for s in opts["seeds"]}
    seconds = {s: 0.0 for s in opts["seeds"]}
    for (s, a, _), res, sec in done:
        runs[s][a].append(res)
        seconds[s] += sec
    best_lr = {s: min(runs[s]["lora2"], key=lambda r: r["val"])["lr"] for s in opts["seeds"]}
    noreg = {}
    for (s, _, _), res, sec in _run_jobs([(opts, s, "noreg", best_lr[s], threads) for s in opts["seeds"]], workers):
        noreg[s] = res
        seconds[s] += sec
    return [summarize(opts, s, runs[s], noreg[s], seconds[s], log) for s in opts["seeds"]]


def mean_of(per_seed, key):
    return round(statistics.fmean(s["identifiability"][key] for s in per_seed), 4)


def _at_least(per_seed):
    vals = [s["params_ratio_at_equal_mse"] if s["params_ratio_at_equal_mse"] is not None
            else s["params_ratio_lower_bound"] for s in per_seed]
    return min(vals) if all(v is not None for v in vals) else None


def _ints(text):
    return tuple(int(v) for v in text.split(","))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one seed, three levels, 60 steps")
    ap.add_argument("--seeds", type=_ints)
    ap.add_argument("--levels", type=_ints, help="planted non-zero ranks, comma-separated")
    ap.add_argument("--ranks", type=_ints, help="fixed ranks of the baselines")
    ap.add_argument("--lrs", type=lambda s: tuple(float(v) for v in s.split(",")), help="learning-rate sweep")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--layout", choices=("parallel", "stack"), help="blocks side by side (default) or in sequence")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="worker processes; every (seed, arm, learning rate) run is one job (default: one per core)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    args = ap.parse_args(argv)
    opts = dict(QUICK if args.quick else FULL)
    for name in ("seeds", "levels", "ranks", "lrs", "steps", "layout"):
        if getattr(args, name):
            opts[name] = getattr(args, name)
    t0 = time.perf_counter()
    per_seed = run_all(opts, args.jobs, args.threads, lambda m: print(m, flush=True))
    mean = lambda key: round(statistics.fmean(s[key] for s in per_seed), 4)
    levels = list(per_seed[0]["level_means"])
    level_means = {v: round(statistics.fmean(s["level_means"][v] for s in per_seed), 2) for v in levels}
    ratios = [s["params_ratio_at_equal_mse"] for s in per_seed]
    print_result({
        "benchmark": "planted_ranks", "quick": args.quick, "layout": opts["layout"], "steps": opts["steps"], "seeds": list(opts["seeds"]),
        "levels": list(opts["levels"]), "lrs": list(opts["lrs"]),
        "spearman_planted": mean("spearman_planted"),
        "spearman_planted_per_seed": [s["spearman_planted"] for s in per_seed],
        "spearman_all": mean("spearman_all"),
        "level_means": level_means,
        "levels_increasing": all(level_means[a] < level_means[b] for a, b in zip(levels, levels[1:])),
        "zero_at_floor": mean("zero_at_floor"),
        "params_ratio_at_equal_mse": (round(statistics.fmean(ratios), 3) if all(r is not None for r in ratios)
                                      else None),
        "params_ratio_at_equal_mse_per_seed": ratios,
        "params_ratio_lower_bound_per_seed": [s["params_ratio_lower_bound"] for s in per_seed],
        # the smallest size ratio any seed supports: its ratio, or its lower bound where no fixed rank matches
        "params_ratio_at_least": _at_least(per_seed),
        "lora2_dominated": any(s["dominated_by"] for s in per_seed),
        "params_ratio_vs_oracle": mean("params_ratio_vs_oracle"),
        "test_ratio_vs_oracle": mean("test_ratio_vs_oracle"),
        "level_ratio_range": [round(min(level_means[v] / int(v) for v in levels), 3),
                              round(max(level_means[v] / int(v) for v in levels), 3)],
        # the LoRA² arm's settings: LoRA2Config() (the shipped defaults) with the sweep's learning rate
        "lora2_config": {k: v for k, v in dataclasses.asdict(lora2_config("lora2", 1.0, 0)).items() if k in METHOD_FIELDS},
        "identifiability_spearman_norm": mean_of(per_seed, "spearman_norm"),
        "identifiability_planted_energy_share": mean_of(per_seed, "planted_energy_share"),
        "per_seed": per_seed,
        "seconds": round(time.perf_counter() - t0, 1),
        **threads_note(),
    })


if __name__ == "__main__":
    main()
