"""The planted-rank task (spec §7): a teacher whose per-component ranks are known.

teacher = base UNet with W_ℓ ← W_ℓ + ΔW_ℓ, where ΔW_ℓ = σ · U_ℓ V_ℓᵀ has exactly
rank r_ℓ (U, V with orthonormal columns, every direction of equal strength σ).
A LoRA distilling the teacher on random latents and conditioning should give
more rank to components with more planted rank.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from . import naming
from .network import target_pattern

PLANTED_LEVELS = (0, 2, 4, 8, 16, 32, 64)


def target_modules(unet: nn.Module, groups=("attn1", "attn2")) -> dict[str, nn.Linear]:
    """kohya key → module for the target groups (ldm UNet paths)."""
    pattern = target_pattern(groups)
    return {naming.kohya_key(p): m for p, m in unet.named_modules()
            if isinstance(m, nn.Linear) and pattern.search("." + p)}


def plan_ranks(modules: dict[str, nn.Linear], seed: int = 0, levels=PLANTED_LEVELS) -> dict[str, int]:
    """Assign each component a planted rank drawn from `levels` (capped by its shape), evenly spread."""
    g = torch.Generator().manual_seed(seed)
    keys = sorted(modules)
    order = torch.randperm(len(keys), generator=g).tolist()
    plan = {}
    for i, idx in enumerate(order):
        m = modules[keys[idx]]
        plan[keys[idx]] = min(levels[i % len(levels)], m.in_features, m.out_features)
    return plan


@torch.no_grad()
def planted_delta(module: nn.Linear, r: int, strength: float, generator: torch.Generator) -> torch.Tensor:
    """ΔW = σ·U Vᵀ of rank r; σ = strength · ‖W‖_F / √min(in, out) (the size of an average direction of W)."""
    out_f, in_f = module.weight.shape
    if r == 0:
        return torch.zeros_like(module.weight)
    u, _ = torch.linalg.qr(torch.randn(out_f, r, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(in_f, r, generator=generator))
    sigma = strength * module.weight.norm() / min(in_f, out_f) ** 0.5
    return sigma * u @ v.T


@torch.no_grad()
def make_teacher(unet: nn.Module, plan: dict[str, int], strength: float = 1.0, seed: int = 0) -> nn.Module:
    """A deep copy of `unet` with the planted ΔW added to every planned component."""
    teacher = copy.deepcopy(unet)
    mods = target_modules(teacher)
    g = torch.Generator().manual_seed(seed + 1)
    for key in sorted(plan):
        mods[key].weight += planted_delta(mods[key], plan[key], strength, g)
    teacher.requires_grad_(False)
    return teacher


class RandomConditioning:
    """Infinite synthetic data: Gaussian latents, SDXL-style context (tokens×dim) and pooled/size vector y."""

    def __init__(self, channels: int, size: int, context_dim: int, adm_dim: int, tokens: int = 77):
        self.channels, self.size, self.context_dim, self.adm_dim, self.tokens = channels, size, context_dim, adm_dim, tokens

    def sample(self, batch_size: int, generator: torch.Generator) -> dict:
        return {
            "latents": torch.randn(batch_size, self.channels, self.size, self.size, generator=generator),
            "cond": {
                "context": torch.randn(batch_size, self.tokens, self.context_dim, generator=generator),
                "y": torch.randn(batch_size, self.adm_dim, generator=generator),
            },
        }


def spearman(a, b) -> float:
    """Spearman rank correlation with average ranks for ties."""
    def ranks(x):
        x = torch.as_tensor(x, dtype=torch.float64)
        order = torch.argsort(x)
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for v in torch.unique(x):
            m = x == v
            r[m] = r[m].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / den) if den > 0 else 0.0


@torch.no_grad()
def sharpen_attention(unet: nn.Module, factor: float = 3.0) -> nn.Module:
    """Scale every to_q and to_k weight by `factor` (logits by factor²).

    Random-init attention is nearly uniform, so changes of q/k barely move the
    output and q/k ranks would be unidentifiable; trained SDXL attention is
    peaked.  Sharpening the random base makes every planted component matter.
    """
    for path, m in unet.named_modules():
        if path.endswith(("to_q", "to_k")) and isinstance(m, nn.Linear):
            m.weight.mul_(factor)
    return unet
