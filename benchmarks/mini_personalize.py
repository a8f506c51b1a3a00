"""Miniature personalization benchmark on real images: LoRA² at its defaults against tuned fixed-rank LoRAs.

Nothing is planted here. The images are scikit-learn's bundled handwritten digits (`load_digits`: 1797
8×8 scans, 10 classes, the same bytes everywhere), upsampled to 16×16 and scaled to [-1, 1].

Pretraining (once per setting, cached on disk, keyed by a hash of its settings): a small ε-prediction
diffusion UNet — the SDXL/KOALA architecture of `lora2_train.models` at reduced width, one image channel,
no VAE — learns every digit class except the held-out subjects, conditioned through cross-attention on
two tokens [prefix, class] of a learned token table (the pooled vector y is zero: the class reaches the
UNet only through attention). 85 % of each pretraining class trains it, 15 % is kept for prior retention.
An encoder (a small CNN classifier of the pretraining classes, trained here on the same 85 %) gives the
similarity score.

Personalization (per subject = one held-out digit class, per seed): the subject gets a new token (a
fixed random vector of the class tokens' mean norm, never trained: DreamBooth's rare token); `--shots`
images of it (drawn by the seed) are the training set, the rest of the class is split into validation
(learning-rate selection) and test (every reported subject figure). Arms, each at every learning rate of
`--lrs`, all trained by `lora2_train.trainer.Trainer` (the library's loss, clipping, schedule, data and
noise draws; LoRA² also gets its rank regulariser and its re-allocation every `resize_every` steps):
  - LoRA² at `LoRA2Config()` defaults, only `lr` (and `seed`) replaced; its config is in the JSON,
  - plain fixed-rank LoRA on the same targets (attention: attn1/attn2 q, k, v, out) at every rank of
    `--ranks`, rsLoRA scale α/√r with α = 4 (so one learning-rate grid means the same for every rank),
    under the same `LoRA2Config` (its L_reg is zero: a plain LoRA has no rank parameters).  A rank above a
    layer's min(in, out) is capped there: rank 64 is full rank on every target of this UNet (attention
    widths 32 and 64), the size LoRA² has whenever its r_init reaches those widths.
The run with the lowest validation subject loss is kept per arm.

Reported per (subject, seed) and averaged:
  - subject fidelity: held-out denoising loss on the subject's test images (ε-MSE over fixed
    (t, ε) draws, the same for every arm), relative to the pretrained model with the subject token;
    similarity: mean cosine between the encoder embeddings of 32 DDIM samples of the subject token and
    the centroid of the subject's test images; hit rate: share of samples whose nearest class centroid
    (prior classes and subject) is the subject's;
  - prior retention: the denoising loss on the held-out images of every pretraining class (own token),
    relative to the pretrained model (1.0 = unchanged, above = forgotten);
  - adapter parameters.

Verdict. LoRA² *loses* a (subject, seed) pair when a fixed rank with at most LoRA²'s parameters reaches a
lower held-out subject loss; it *wins* a pair when no such fixed rank does and a larger fixed rank does
(so the comparison shows a size advantage); otherwise the pair is *undecided* (LoRA² is larger than every
fixed rank and beats them all, or loses to nothing the run has measured).  The run's verdict is the
outcome of the majority of pairs ("undecided" without a majority).  Prior retention is reported beside it:
`lora2_dominated` says whether some fixed rank with at most LoRA²'s parameters is better on both subject
loss and prior retention.

    python benchmarks/mini_personalize.py                  # 2 subjects x 2 seeds, about 15 min on 2 busy cores
    python benchmarks/mini_personalize.py --quick          # CI size, under 2 minutes
    python benchmarks/mini_personalize.py --subjects 3,8,5 --seeds 0,1,2 --png out.png

The pretrained model and encoder are cached under `--cache-dir` (default ~/.cache/lora2/mini_personalize);
a rerun with the same settings skips pretraining. Prints a markdown table, writes a PNG (`--png`) and ends
with one JSON line.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from _common import FixedLoRANetwork, print_result, threads_note

from lora2_train.config import LoRA2Config
from lora2_train.models import SDXLUNet, koala_700m_config, reduced
from lora2_train.network import LoRA2Network
from lora2_train.objective import DDPMSchedule, diffusion_loss
from lora2_train.trainer import Trainer

#: bump when anything below changes what pretraining produces (the cache key includes it)
CACHE_VERSION = 1
#: the UNet: KOALA-700M's block layout (one ResBlock per level, no middle block) at reduced width
MODEL = dict(model_channels=16, context_dim=32, head_channels=16, depth=(0, 1, 1), image_size=16)
FULL = dict(subjects=(3, 8), seeds=(0, 1), ranks=(1, 2, 4, 8, 16, 64), lrs=(3e-4, 1e-3, 3e-3), shots=8, val=40,
            steps=None, pretrain_steps=600, pretrain_batch=32, pretrain_lr=2e-3, encoder_steps=400,
            samples=32, sample_steps=20, eval_draws=4)
QUICK = dict(FULL, seeds=(0,), ranks=(1, 4), lrs=(3e-3,), steps=30, pretrain_steps=120, encoder_steps=60,
             samples=8, sample_steps=8, eval_draws=1)
#: rsLoRA α of the fixed-rank arms: ΔW = (α/√r)·B·A
FIXED_ALPHA = 4.0
PRIOR_FRACTION = 0.15  # of each pretraining class, held out for prior retention
SPLIT_SEED = 1234      # the pretraining/prior split (independent of the run seed)
EVAL_SEED = 777        # the (t, ε) draws of every denoising-loss evaluation


# ---- data -------------------------------------------------------------------------------------
def load_images(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as (N, 1, size, size) in [-1, 1] (bilinear upsampling) and labels (N,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1), torch.tensor(d.target, dtype=torch.long)


def prior_split(labels: torch.Tensor, held_out) -> tuple[list[int], list[int]]:
    """Indices of the pretraining classes: (pretrain, prior-eval), a fixed split of each class."""
    g = torch.Generator().manual_seed(SPLIT_SEED)
    train, evals = [], []
    for c in range(10):
        if c in held_out:
            continue
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)].tolist()
        k = max(1, round(PRIOR_FRACTION * len(idx)))
        evals += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(evals)


def subject_split(labels: torch.Tensor, subject: int, seed: int, shots: int, val: int) -> dict:
    """The subject's images: `shots` to fine-tune on, `val` for learning-rate selection, the rest to test."""
    idx = (labels == subject).nonzero().flatten()
    idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(10_000 + 97 * subject + seed))]
    idx = idx.tolist()
    return {"train": idx[:shots], "val": idx[shots:shots + val], "test": idx[shots + val:]}


# ---- models -----------------------------------------------------------------------------------
def unet_config(model: dict):
    cfg = reduced(koala_700m_config(), model_channels=model["model_channels"], context_dim=model["context_dim"],
                  head_channels=model["head_channels"], depth=model["depth"])
    return dataclasses.replace(cfg, in_channels=1, out_channels=1)


class Encoder(nn.Module):
    """A small CNN classifier of the pretraining classes; its penultimate layer is the embedding."""

    def __init__(self, n_classes: int, dim: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.LazyLinear(dim), nn.SiLU())
        self.head = nn.Linear(dim, n_classes)

    def embed(self, x):
        return F.normalize(self.features(x), dim=-1)

    def forward(self, x):
        return self.head(self.features(x))


def context_of(prefix: torch.Tensor, vec: torch.Tensor) -> dict:
    """The conditioning of one example: context [prefix, token] and a zero pooled vector."""
    ctx = torch.stack([prefix, vec])
    return {"context": ctx, "y": torch.zeros(2 * ctx.shape[-1])}


# ---- pretraining and its cache ----------------------------------------------------------------
def pretrain_settings(opts) -> dict:
    return {"version": CACHE_VERSION, "model": {k: list(v) if isinstance(v, tuple) else v for k, v in MODEL.items()},
            "held_out": sorted(opts["subjects"]), "steps": opts["pretrain_steps"], "batch": opts["pretrain_batch"],
            "lr": opts["pretrain_lr"], "encoder_steps": opts["encoder_steps"], "prior_fraction": PRIOR_FRACTION,
            "split_seed": SPLIT_SEED, "data": "sklearn.load_digits", "seed": 0}


def cache_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def pretrain(settings: dict, log) -> dict:
    """Train the base UNet (+ token table) and the encoder; returns their state and summary figures."""
    torch.manual_seed(settings["seed"])
    x, y = load_images(settings["model"]["image_size"])
    train_idx, prior_idx = prior_split(y, settings["held_out"])
    unet = SDXLUNet(unet_config(settings["model"]))
    dim = settings["model"]["context_dim"]
    tokens = nn.Embedding(11, dim)  # 10 classes + the prefix token (index 10)
    nn.init.normal_(tokens.weight, std=1.0)
    sched = DDPMSchedule()
    params = [*unet.parameters(), *tokens.parameters()]
    opt = torch.optim.AdamW(params, lr=settings["lr"], weight_decay=0.0)
    g = torch.Generator().manual_seed(settings["seed"])
    xt, yt = x[train_idx], y[train_idx]
    steps, t0 = settings["steps"], time.perf_counter()
    for step in range(steps):
        lr = settings["lr"] * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        b = torch.randint(0, len(xt), (settings["batch"],), generator=g)
        x0, lab = xt[b], yt[b]
        noisy, t, noise = sched.noisy(x0, g)
        ctx = torch.stack([tokens.weight[10].expand(len(b), -1), tokens(lab)], dim=1)
        loss = diffusion_loss(unet(noisy, t, ctx, torch.zeros(len(b), 2 * dim)), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"  pretrain step {step + 1}/{steps}: loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)")
    classes = sorted(set(yt.tolist()))
    remap = {c: i for i, c in enumerate(classes)}
    enc = Encoder(len(classes))
    enc(xt[:2])  # materialize the lazy layer
    eopt = torch.optim.Adam(enc.parameters(), lr=2e-3)
    target = torch.tensor([remap[int(c)] for c in yt])
    for _ in range(settings["encoder_steps"]):
        b = torch.randint(0, len(xt), (64,), generator=g)
        aug = xt[b] + 0.1 * torch.randn(xt[b].shape, generator=g)
        loss = F.cross_entropy(enc(aug), target[b])
        eopt.zero_grad(set_to_none=True)
        loss.backward()
        eopt.step()
    with torch.no_grad():
        pred = enc(x[prior_idx]).argmax(1)
        acc = float((pred == torch.tensor([remap[int(c)] for c in y[prior_idx]])).float().mean())
    return {"unet": unet.state_dict(), "tokens": tokens.state_dict(), "encoder": enc.state_dict(),
            "encoder_classes": classes, "encoder_prior_accuracy": round(acc, 4),
            "pretrain_seconds": round(time.perf_counter() - t0, 1), "settings": settings}


def load_or_pretrain(opts, cache_dir: Path, log) -> tuple[Path, dict]:
    """The cached pretraining of these settings, trained and written first when absent."""
    settings = pretrain_settings(opts)
    path = cache_dir / f"base-{cache_key(settings)}.pt"
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("settings") == settings:
            log(f"pretrained model from the cache: {path}")
            return path, {"cached": True, **_summary(state)}
    log(f"pretraining (no cache entry {path.name})")
    state = pretrain(settings, log)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path, {"cached": False, **_summary(state)}


def _summary(state):
    return {k: state[k] for k in ("encoder_prior_accuracy", "pretrain_seconds")}


# ---- the pieces every job rebuilds from the cache ---------------------------------------------
class Base:
    """Everything fine-tuning and evaluation need: the frozen UNet, tokens, encoder, data and splits."""

    def __init__(self, path: Path, opts, subject: int, seed: int):
        state = torch.load(path, map_location="cpu", weights_only=True)
        s = state["settings"]
        self.unet = SDXLUNet(unet_config(s["model"]))
        self.unet.load_state_dict(state["unet"])
        self.unet.requires_grad_(False).eval()
        w = state["tokens"]["weight"]
        self.prefix = w[10]
        self.enc = Encoder(len(state["encoder_classes"]))
        self.x, self.y = load_images(s["model"]["image_size"])
        self.enc(self.x[:2])
        self.enc.load_state_dict(state["encoder"])
        self.enc.requires_grad_(False).eval()
        norm = w[:10].norm(dim=1)[state["encoder_classes"]].mean()
        v = torch.randn(w.shape[1], generator=torch.Generator().manual_seed(50_000 + subject))
        self.subject_token = v / v.norm() * norm
        self.class_tokens = {c: w[c] for c in state["encoder_classes"]}
        _, self.prior_idx = prior_split(self.y, s["held_out"])
        self.split = subject_split(self.y, subject, seed, opts["shots"], opts["val"])
        self.opts = opts
        with torch.no_grad():
            emb = lambda idx: self.enc.embed(self.x[idx]).mean(0)
            self.centroids = torch.stack(
                [F.normalize(emb(self.split["test"]), dim=0)]
                + [F.normalize(emb([i for i in self.prior_idx if int(self.y[i]) == c]), dim=0)
                   for c in state["encoder_classes"]])

    def examples(self) -> list[dict]:
        cond = context_of(self.prefix, self.subject_token)
        return [{"latents": self.x[i], "cond": cond} for i in self.split["train"]]

    @torch.no_grad()
    def denoise_loss(self, idx, tokens) -> float:
        """ε-MSE over `eval_draws` fixed (t, ε) draws per image (the same draws for every arm)."""
        g = torch.Generator().manual_seed(EVAL_SEED)
        sched, x0 = DDPMSchedule(), self.x[idx].repeat(self.opts["eval_draws"], 1, 1, 1)
        ctx = torch.stack([torch.stack([self.prefix, t]) for t in tokens]).repeat(self.opts["eval_draws"], 1, 1)
        noisy, t, noise = sched.noisy(x0, g)
        total = 0.0
        for part in torch.split(torch.arange(len(x0)), 256):
            pred = self.unet(noisy[part], t[part], ctx[part], torch.zeros(len(part), 2 * ctx.shape[-1]))
            total += float(diffusion_loss(pred, noise[part])) * len(part)
        return total / len(x0)

    def subject_loss(self, split: str) -> float:
        idx = self.split[split]
        return self.denoise_loss(idx, [self.subject_token] * len(idx))

    def prior_loss(self) -> float:
        return self.denoise_loss(self.prior_idx, [self.class_tokens[int(self.y[i])] for i in self.prior_idx])

    @torch.no_grad()
    def sample(self, n: int, steps: int, seed: int) -> torch.Tensor:
        """Deterministic DDIM samples of the subject token."""
        sched = DDPMSchedule()
        a = sched.alphas_cumprod
        ts = torch.linspace(sched.num_timesteps - 1, 0, steps).round().long()
        size = self.x.shape[-1]
        x = torch.randn((n, 1, size, size), generator=torch.Generator().manual_seed(seed))
        ctx = torch.stack([self.prefix, self.subject_token]).expand(n, -1, -1)
        y = torch.zeros(n, 2 * ctx.shape[-1])
        for i, t in enumerate(ts):
            eps = self.unet(x, t.expand(n), ctx, y)
            at = a[t]
            x0 = ((x - (1 - at).sqrt() * eps) / at.sqrt()).clamp(-1, 1)
            a_next = a[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        return x.clamp(-1, 1)

    @torch.no_grad()
    def similarity(self, seed: int) -> dict:
        """Encoder similarity of DDIM samples to the subject's test images, and the hit rate."""
        s = self.sample(self.opts["samples"], self.opts["sample_steps"], 90_000 + seed)
        e = self.enc.embed(s)
        cos = e @ self.centroids.T
        return {"similarity": round(float(cos[:, 0].mean()), 4), "hit_rate": round(float((cos.argmax(1) == 0).float().mean()), 4)}

    def measure(self, seed: int) -> dict:
        return {"val": self.subject_loss("val"), "test": self.subject_loss("test"), "prior": self.prior_loss(),
                **self.similarity(seed)}


# ---- fixed-rank arm inside the library's trainer ------------------------------------------------
class TrainerFixedLoRA(FixedLoRANetwork):
    """A plain fixed-rank LoRA with the interface `Trainer` uses: no rank parameters (L_reg = 0), no
    re-allocation."""

    def __init__(self, unet, rank, lr):
        super().__init__(unet, rank, alpha=FIXED_ALPHA)
        self.lr = lr
        self.register_buffer("loss_ref", torch.zeros(2))  # the objective's L_ref (it multiplies L_reg = 0 here)

    def param_groups(self):
        return [{"params": list(self.parameters()), "lr": self.lr, "name": "lora"}]

    def reg_loss(self):
        zero = torch.zeros(())
        return zero, zero

    def ranks(self):
        return {k: l.lora_down.shape[0] for k, l in self.layers.items()}

    def nus(self):
        return {}

    def target_ranks(self):
        return self.ranks()

    def resize(self, optimizer=None, targets=None, **_):
        return {}

    def clear_lam(self):
        pass


def finetune_config(opts, lr: float, seed: int) -> LoRA2Config:
    """LoRA2Config() with the swept learning rate and the run seed (and `--steps` when given): the same for
    every arm."""
    changes = {"lr": lr, "seed": seed}
    if opts.get("steps"):
        changes["steps"] = opts["steps"]
    return dataclasses.replace(LoRA2Config(), **changes)


def train_arm(path: Path, opts, subject: int, seed: int, arm, lr: float) -> dict:
    base = Base(path, opts, subject, seed)
    cfg = finetune_config(opts, lr, seed)
    torch.manual_seed(seed)
    if arm == "lora2":
        net = LoRA2Network(cfg, base.unet).apply_to()
    else:
        net = TrainerFixedLoRA(base.unet, int(arm), lr)
    try:
        result = Trainer(base.unet, net, base.examples(), cfg).train()
        res = {"params": net.num_parameters(), "lr": lr, **base.measure(seed), "final_mse": result.last.mse}
        if arm == "lora2":
            ranks = list(net.ranks().values())
            res.update(mean_rank=round(statistics.fmean(ranks), 2), min_rank=min(ranks), max_rank=max(ranks))
        return res
    finally:
        net.restore()


def reference(path: Path, opts, subject: int, seed: int) -> dict:
    """The pretrained model without adapter (subject token as is), and the real test images' similarity."""
    base = Base(path, opts, subject, seed)
    real = base.enc.embed(base.x[base.split["val"]]) @ base.centroids.T
    return {**base.measure(seed), "real_val_similarity": round(float(real[:, 0].mean()), 4),
            "real_val_hit_rate": round(float((real.argmax(1) == 0).float().mean()), 4),
            "n": {k: len(v) for k, v in base.split.items()}, "prior_images": len(base.prior_idx)}


# ---- jobs --------------------------------------------------------------------------------------
def _job(args):
    path, opts, subject, seed, arm, lr, threads = args
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    res = reference(path, opts, subject, seed) if arm == "base" else train_arm(path, opts, subject, seed, arm, lr)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"[subject {subject} seed {seed}] {arm} lr={lr:g}: val={res['val']:.4f} test={res['test']:.4f} "
          f"prior={res['prior']:.4f} sim={res['similarity']:.3f} params={res.get('params', 0)} "
          f"({res['seconds']:.0f} s)", flush=True)
    return (subject, seed, arm, lr), res


def run_jobs(jobs, workers):
    if workers > 1 and len(jobs) > 1:
        import multiprocessing
        with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            return list(pool.imap_unordered(_job, jobs, chunksize=1))
    return [_job(j) for j in jobs]


# ---- figures -----------------------------------------------------------------------------------
def pair_figures(ref: dict, runs: dict, ranks) -> dict:
    """One (subject, seed): the kept run of every arm, relative figures, and the verdict."""
    rel = lambda r: {"params": r["params"], "lr": r["lr"], "test": round(r["test"] / ref["test"], 4),
                     "prior": round(r["prior"] / ref["prior"], 4), "similarity": r["similarity"],
                     "hit_rate": r["hit_rate"],
                     "val_by_lr": {f"{x['lr']:g}": round(x["val"] / ref["val"], 4)
                                   for x in sorted(runs_of, key=lambda x: x["lr"])}}
    arms = {}
    for arm in ["lora2", *[str(r) for r in ranks]]:
        runs_of = runs[arm]
        best = min(runs_of, key=lambda r: r["val"])
        arms[arm] = rel(best)
        for k in ("mean_rank", "min_rank", "max_rank"):
            if k in best:
                arms[arm][k] = best[k]
    lo = arms["lora2"]
    fixed = {r: arms[str(r)] for r in ranks}
    smaller_better = [r for r, v in fixed.items() if v["params"] <= lo["params"] and v["test"] < lo["test"]]
    larger_better = [r for r, v in fixed.items() if v["params"] > lo["params"] and v["test"] <= lo["test"]]
    outcome = "loses" if smaller_better else ("wins" if larger_better else "undecided")
    dominated = [r for r in smaller_better if fixed[r]["prior"] <= lo["prior"]]
    best_fixed = min(fixed, key=lambda r: fixed[r]["test"])
    # how far LoRA² is behind (> 0) or ahead (< 0) of the best fixed rank no larger than it, in relative subject loss
    no_larger = [v["test"] for v in fixed.values() if v["params"] <= lo["params"]]
    margin = round(lo["test"] - min(no_larger), 4) if no_larger else None
    return {"reference": ref, "arms": arms, "outcome": outcome, "margin_vs_no_larger_fixed": margin,
            "beaten_by_smaller": smaller_better,
            "beats_larger_than_needed": larger_better, "dominated_by": dominated, "best_fixed_rank": best_fixed}


def markdown_table(summary: dict, ranks) -> str:
    head = ("| arm | adapter params | subject test loss (rel.) | prior loss (rel.) | similarity | hit rate | lr kept |\n"
            "|---|---:|---:|---:|---:|---:|---|")
    rows = [head]
    ref = summary["reference"]
    rows.append(f"| pretrained, no adapter | 0 | 1.000 | 1.000 | {ref['similarity']:.3f} | {ref['hit_rate']:.2f} | – |")
    for arm in ["lora2", *[str(r) for r in ranks]]:
        a = summary["arms"][arm]
        name = "LoRA² (defaults)" if arm == "lora2" else f"fixed rank {arm}"
        if arm == "lora2":
            name += f", mean rank {a['mean_rank']:.1f}"
        rows.append(f"| {name} | {a['params']:.0f} | {a['test']:.3f} ± {a['test_sd']:.3f} | {a['prior']:.3f} ± "
                    f"{a['prior_sd']:.3f} | {a['similarity']:.3f} | {a['hit_rate']:.2f} | {a['lrs']} |")
    rows.append(f"| real subject images (val) | – | – | – | {ref['real_val_similarity']:.3f} | "
                f"{ref['real_val_hit_rate']:.2f} | – |")
    return "\n".join(rows)


def summarize(pairs: list, ranks) -> dict:
    mean = lambda vals: round(statistics.fmean(vals), 4)
    sd = lambda vals: round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0
    arms = {}
    for arm in ["lora2", *[str(r) for r in ranks]]:
        vs = [p["arms"][arm] for p in pairs]
        arms[arm] = {"params": mean([v["params"] for v in vs]), "test": mean([v["test"] for v in vs]),
                     "test_sd": sd([v["test"] for v in vs]), "prior": mean([v["prior"] for v in vs]),
                     "prior_sd": sd([v["prior"] for v in vs]), "similarity": mean([v["similarity"] for v in vs]),
                     "hit_rate": mean([v["hit_rate"] for v in vs]),
                     "lrs": ",".join(sorted({f"{v['lr']:g}" for v in vs}))}
        if arm == "lora2":
            arms[arm]["mean_rank"] = mean([v["mean_rank"] for v in vs])
    ref = {k: mean([p["reference"][k] for p in pairs])
           for k in ("similarity", "hit_rate", "real_val_similarity", "real_val_hit_rate")}
    outcomes = [p["outcome"] for p in pairs]
    counts = {o: outcomes.count(o) for o in ("wins", "loses", "undecided")}
    verdict = next((o for o, n in counts.items() if n > len(pairs) / 2), "undecided")
    margins = [p["margin_vs_no_larger_fixed"] for p in pairs if p["margin_vs_no_larger_fixed"] is not None]
    return {"arms": arms, "reference": ref, "outcomes": counts, "verdict": verdict,
            "mean_margin_vs_no_larger_fixed": mean(margins) if margins else None,
            "lora2_dominated_pairs": sum(bool(p["dominated_by"]) for p in pairs)}


def plot(pairs: list, summary: dict, ranks, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    panels = (("test", "held-out subject loss (rel. to pretrained)"), ("similarity", "encoder similarity of samples"),
              ("prior", "prior loss (rel. to pretrained; 1 = kept)"))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, label) in zip(axes, panels):
        for i, p in enumerate(pairs):
            c = colors[i % len(colors)]
            xs = [p["arms"][str(r)]["params"] for r in ranks]
            ax.plot(xs, [p["arms"][str(r)][key] for r in ranks], "o-", color=c, alpha=0.45, lw=1,
                    label=f"fixed ranks, subject {p['subject']} seed {p['seed']}")
            lo = p["arms"]["lora2"]
            ax.plot([lo["params"]], [lo[key]], "*", color=c, ms=13, mec="k",
                    label=f"LoRA² defaults, subject {p['subject']} seed {p['seed']}")
        xs = [summary["arms"][str(r)]["params"] for r in ranks]
        ax.plot(xs, [summary["arms"][str(r)][key] for r in ranks], "s-", color="k", lw=2, label="fixed ranks, mean")
        for r, x in zip(ranks, xs):
            ax.annotate(f"r{r}", (x, summary["arms"][str(r)][key]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        ax.plot([summary["arms"]["lora2"]["params"]], [summary["arms"]["lora2"][key]], "*", color="k", ms=18,
                label="LoRA², mean")
        ax.set_xscale("log")
        ax.set_xlabel("adapter parameters")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main --------------------------------------------------------------------------------------
def _ints(text):
    return tuple(int(v) for v in text.split(","))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI size: one seed, ranks 1,4, one learning rate, 30 steps")
    ap.add_argument("--subjects", type=_ints, help="held-out digit classes, comma-separated")
    ap.add_argument("--seeds", type=_ints)
    ap.add_argument("--ranks", type=_ints, help="fixed ranks of the baselines")
    ap.add_argument("--lrs", type=lambda s: tuple(float(v) for v in s.split(",")), help="learning-rate sweep")
    ap.add_argument("--steps", type=int, help="fine-tuning steps of every arm (default: LoRA2Config().steps)")
    ap.add_argument("--shots", type=int, help="subject images to fine-tune on")
    ap.add_argument("--pretrain-steps", type=int)
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("LORA2_CACHE", "~/.cache/lora2")).expanduser()
                    / "mini_personalize")
    ap.add_argument("--png", type=Path, default=Path("mini_personalize.png"), help="figure to write")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: one per core)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    args = ap.parse_args(argv)
    opts = dict(QUICK if args.quick else FULL)
    for name in ("subjects", "seeds", "ranks", "lrs", "steps", "shots", "pretrain_steps"):
        if getattr(args, name):
            opts[name] = getattr(args, name)
    log = lambda m: print(m, flush=True)
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    path, pre = load_or_pretrain(opts, args.cache_dir, log)
    t_pre = time.perf_counter() - t0
    ranks = sorted(opts["ranks"])
    arms = ["lora2", *[str(r) for r in sorted(ranks, reverse=True)]]
    jobs = [(path, opts, s, seed, "base", 0.0, args.threads) for s in opts["subjects"] for seed in opts["seeds"]]
    jobs += [(path, opts, s, seed, arm, lr, args.threads) for s in opts["subjects"] for seed in opts["seeds"]
             for arm in arms for lr in opts["lrs"]]
    done = run_jobs(jobs, args.jobs)
    pairs = []
    for s in opts["subjects"]:
        for seed in opts["seeds"]:
            ref = next(r for (s2, e, a, _), r in done if (s2, e, a) == (s, seed, "base"))
            runs = {a: [r for (s2, e, a2, _), r in done if (s2, e, a2) == (s, seed, a)] for a in arms}
            pairs.append({"subject": s, "seed": seed, **pair_figures(ref, runs, ranks)})
    summary = summarize(pairs, ranks)
    table = markdown_table(summary, ranks)
    print(table)
    cfg = finetune_config(opts, opts["lrs"][0], 0)
    verdict_line = {"loses": "LoRA² LOSES: on most (subject, seed) pairs a fixed rank with at most its parameters "
                             "reaches a lower held-out subject loss",
                    "wins": "LoRA² wins: on most pairs no fixed rank with at most its parameters matches its held-out "
                            "subject loss, and a larger one does",
                    "undecided": "undecided: no outcome holds on most pairs"}[summary["verdict"]]
    print(f"verdict: {verdict_line} ({summary['outcomes']}); mean margin of LoRA²'s relative subject loss over the "
          f"best fixed rank no larger than it: {summary['mean_margin_vs_no_larger_fixed']} (> 0: behind); LoRA² "
          f"dominated on subject loss and prior retention on {summary['lora2_dominated_pairs']}/{len(pairs)} pairs")
    plot(pairs, summary, ranks, args.png,
         f"mini personalization (digits, subjects {list(opts['subjects'])}, seeds {list(opts['seeds'])}, "
         f"{cfg.steps} steps): verdict {summary['verdict']}")
    # the LoRA² arm's config: LoRA2Config() as it stands, `steps` replaced only under --steps/--quick; every run
    # replaces `lr` (one of `lrs`) and `seed` (its seed) as well
    lora2_config = dataclasses.asdict(finetune_config(opts, LoRA2Config().lr, LoRA2Config().seed))
    print_result({
        "benchmark": "mini_personalize", "quick": args.quick, "subjects": list(opts["subjects"]),
        "seeds": list(opts["seeds"]), "ranks": ranks, "lrs": list(opts["lrs"]), "shots": opts["shots"],
        "steps": cfg.steps, "lora2_config": lora2_config,
        "lora2_config_per_run": {"lr": "one of lrs (kept: per_pair[].arms.lora2.lr)", "seed": "the pair's seed"}, "model": {**MODEL, "depth": list(MODEL["depth"])},
        "pretrain": {"cache_key": path.stem, **pre, "seconds_this_run": round(t_pre, 1)},
        "verdict": summary["verdict"], "outcomes": summary["outcomes"],
        "mean_margin_vs_no_larger_fixed": summary["mean_margin_vs_no_larger_fixed"],
        "lora2_dominated_pairs": summary["lora2_dominated_pairs"],
        "summary": summary, "table": table, "per_pair": pairs, "png": str(args.png),
        "seconds": round(time.perf_counter() - t0, 1), **threads_note(),
    })


if __name__ == "__main__":
    main()
