"""The planted-rank task (spec §7): a teacher whose per-component ranks are known.

teacher = base UNet with W_ℓ ← W_ℓ + g_ℓ·ΔW_ℓ, where ΔW_ℓ = σ · U_ℓ V_ℓᵀ has exactly
rank r_ℓ (U, V with orthonormal columns, every direction of equal strength σ) and the
optional gain g_ℓ makes every planted direction move the model output equally.
A LoRA distilling the teacher on random latents and conditioning should give
more rank to components with more planted rank.
"""
from __future__ import annotations

import copy
import re

import torch
import torch.nn as nn

from . import naming
from .network import target_pattern

PLANTED_LEVELS = (0, 2, 4, 8, 16, 32, 64)
#: planted rank as a fraction of the smallest dimension of the component pair it goes into
PLANTED_FRACTIONS = (0.0, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)


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


def attention_unit(key: str) -> str:
    """The pair a component belongs to: to_v/to_out.0 → '…_vo', to_q/to_k → '…_qk'.

    Attention sees its projections only through the per-head products W_oW_v and W_qᵀW_k,
    so a change planted in one member of a pair can be partly absorbed by the other.
    """
    return re.sub(r"to_(q|k)$", "qk", re.sub(r"to_(v|out_0)$", "vo", key))


def attention_units(keys) -> dict[str, list[str]]:
    """Pair name (:func:`attention_unit`) → its component keys, in sorted key order."""
    units: dict[str, list[str]] = {}
    for k in sorted(keys):
        units.setdefault(attention_unit(k), []).append(k)
    return units


def plan_pair_ranks(modules: dict[str, nn.Linear], seed: int = 0, fractions=PLANTED_FRACTIONS,
                    planted=("vo",)) -> dict[str, int]:
    """Planted ranks per attention pair (both members get the same rank), relative to the pair's shape.

    Each pair whose kind is in `planted` draws a fraction from `fractions` (evenly spread, shuffled);
    its rank is round(fraction · smallest in/out dimension of the pair), so with fractions below 1
    it never reaches a layer's full rank.  Components of the other pairs get rank 0.
    """
    units = attention_units(modules)
    chosen = sorted(u for u in units if u.endswith(planted))
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(chosen), generator=g).tolist()
    plan = {k: 0 for k in modules}
    for i, idx in enumerate(order):
        keys = units[chosen[idx]]
        dim = min(min(modules[k].in_features, modules[k].out_features) for k in keys)
        for k in keys:
            plan[k] = int(round(fractions[i % len(fractions)] * dim))
    return plan


def plan_level_ranks(modules: dict[str, nn.Linear], levels, seed: int = 0, planted=("attn2_vo",)) -> dict[str, int]:
    """Planted ranks per attention pair from an explicit list of non-zero `levels` (spec §7).

    The pairs whose kind is in `planted` are shuffled (seeded); each level goes to the same number
    of pairs, ⌊pairs / levels⌋ ≥ 1, both members of a pair share its rank (capped at the pair's
    smallest dimension), and every other component — the left-over pairs included — gets rank 0.
    """
    levels = [int(v) for v in levels]
    if not levels or min(levels) < 1:
        raise ValueError(f"planted levels must be positive integers, got {levels!r}")
    units = attention_units(modules)
    chosen = sorted(u for u in units if u.endswith(planted))
    per = len(chosen) // len(levels)
    if per < 1:
        raise ValueError(f"{len(levels)} planted levels need at least as many {'/'.join(planted)} pairs; "
                         f"the model has {len(chosen)}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(chosen), generator=g).tolist()
    plan = {k: 0 for k in modules}
    for i, idx in enumerate(order[: per * len(levels)]):
        keys = units[chosen[idx]]
        dim = min(min(modules[k].in_features, modules[k].out_features) for k in keys)
        for k in keys:
            plan[k] = min(levels[i % len(levels)], dim)
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
def planted_deltas(modules: dict[str, nn.Linear], plan: dict[str, int], strength: float = 1.0,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """ΔW of every planned component (drawn in sorted key order from one generator seeded `seed + 1`)."""
    g = torch.Generator().manual_seed(seed + 1)
    return {key: planted_delta(modules[key], plan[key], strength, g) for key in sorted(plan)}


@torch.no_grad()
def make_teacher(unet: nn.Module, plan: dict[str, int], strength: float = 1.0, seed: int = 0,
                 gains: dict[str, float] | None = None) -> nn.Module:
    """A deep copy of `unet` with the planted ΔW added to every planned component (times `gains[key]`)."""
    teacher = copy.deepcopy(unet)
    mods = target_modules(teacher)
    for key, delta in planted_deltas(mods, plan, strength, seed).items():
        mods[key].weight += (1.0 if gains is None else gains.get(key, 1.0)) * delta
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def balanced_gains(unet: nn.Module, plan: dict[str, int], run, strength: float = 1.0, seed: int = 0,
                   max_gain: float = 4.0) -> dict[str, float]:
    """Per-pair gains that make every planted direction move the model output equally.

    For each attention pair u with planted rank r_u > 0, the pair alone is planted and
    e_u = mean‖run(teacher_u) − run(unet)‖² / r_u is its output change per direction (r_u: the
    largest planted rank in the pair).  The output change is quadratic in ΔW for small ΔW, so
    gain_u = √(ē / e_u) (ē: geometric mean over pairs, gains clipped to [1/max_gain, max_gain])
    equalizes it; `run(model)` evaluates a model on fixed probe inputs.
    """
    ref = run(unet)
    mods = target_modules(unet)
    deltas = planted_deltas(mods, plan, strength, seed)
    units = attention_units(k for k in plan if plan[k] > 0)
    per_dir = {}
    for u, keys in units.items():
        saved = {k: mods[k].weight.clone() for k in keys}
        try:
            for k in keys:
                mods[k].weight += deltas[k]
            per_dir[u] = max(float((run(unet) - ref).square().mean()), 1e-30) / max(plan[k] for k in keys)
        finally:
            for k in keys:
                mods[k].weight.copy_(saved[k])
    if not per_dir:
        return {}
    mean = torch.tensor(list(per_dir.values()), dtype=torch.float64).log().mean().exp().item()
    return {k: min(max((mean / per_dir[u]) ** 0.5, 1 / max_gain), max_gain) for u, keys in units.items() for k in keys}


class PlantedStack(nn.Module):
    """The planted-rank model: SDXL transformer blocks (``BasicTransformerBlock``: self-attention,
    cross-attention on the text context, GEGLU feed-forward, the modules LoRA² adapts), `depth` of them,
    called like a UNet: forward(x, timesteps, context, y) → ``output_scale`` times the output
    (timesteps and y are not used).

    ``layout="parallel"`` (the planted task's default): every block is its own ``SpatialTransformer``
    reading the same input, and the output stacks what each block adds to it, so the teacher's change
    in one block is observed apart from the others' and a student cannot shift it into another
    block.  ``layout="stack"``: one ``SpatialTransformer`` with the blocks in sequence, as in a UNet;
    a change planted in one block can then be imitated by small changes spread over the blocks after
    it, which a student with a few hundred steps does (see ``benchmarks/planted_ranks.py``,
    identifiability)."""

    LAYOUTS = ("parallel", "stack")

    def __init__(self, channels: int = 128, depth: int = 15, context_dim: int = 128, head_channels: int = 16,
                 layout: str = "parallel"):
        super().__init__()
        from .models.sdxl_unet import SpatialTransformer
        if layout not in self.LAYOUTS:
            raise ValueError(f"layout must be one of {self.LAYOUTS}, got {layout!r}")
        self.layout = layout
        groups = min(32, channels // 4)
        heads = channels // head_channels
        if layout == "stack":
            self.transformer = SpatialTransformer(channels, heads, head_channels, depth, context_dim, groups)
        else:
            self.blocks = nn.ModuleList(SpatialTransformer(channels, heads, head_channels, 1, context_dim, groups)
                                        for _ in range(depth))
        self.output_scale = 1.0

    def forward(self, x, timesteps=None, context=None, y=None):
        if self.layout == "stack":
            out = self.transformer(x, context)
        else:
            out = torch.stack([block(x, context) - x for block in self.blocks], 1)
        return out if self.output_scale == 1.0 else out * self.output_scale


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


#: the planted-rank task of the demo and benchmarks/planted_ranks.py (spec §7)
PLANTED_TASK = dict(channels=128, depth=15, context_dim=128, head_channels=16, size=4, tokens=16,
                    levels=(1, 2, 4, 8, 16, 32, 64), layout="parallel")


@torch.no_grad()
def build_planted_task(seed: int = 0, levels=None, **overrides):
    """(student model, teacher, plan, data) of the planted-rank task (spec §7).

    Model: :class:`PlantedStack` (random weights, seeded; ``layout`` parallel or stack); plan:
    :func:`plan_level_ranks` on the cross-attention value/output pairs; teacher: the model plus the planted ΔW, every planted
    direction moving the output equally (:func:`balanced_gains`, calibrated on 8 inputs of their
    own stream), and both outputs scaled so that the untrained student's mismatch is 1 on those
    inputs; data: Gaussian tokens and text conditioning (:class:`RandomConditioning`).
    """
    from .objective import DDPMSchedule

    o = {**PLANTED_TASK, **overrides}
    torch.manual_seed(seed)
    model = PlantedStack(o["channels"], o["depth"], o["context_dim"], o["head_channels"],
                         o["layout"]).requires_grad_(False)
    plan = plan_level_ranks(target_modules(model), levels or o["levels"], seed=seed)
    data = RandomConditioning(o["channels"], o["size"], o["context_dim"], 1, tokens=o["tokens"])
    g = torch.Generator().manual_seed(404_000 + seed)
    b = data.sample(8, g)
    x, t, _ = DDPMSchedule().noisy(b["latents"], g)
    gains = balanced_gains(model, plan, lambda m: m(x, t, **b["cond"]), 1.0, seed)
    teacher = make_teacher(model, plan, strength=1.0, seed=seed, gains=gains)
    # outputs scaled so that the untrained student's mismatch with the teacher is 1 on these inputs:
    # the loss, and λ_r against it, mean the same whatever the model's width, depth and plan
    scale = float((teacher(x, t, **b["cond"]) - model(x, t, **b["cond"])).square().mean()) ** -0.5
    model.output_scale = teacher.output_scale = scale
    return model, teacher, plan, data


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


def rank_metrics(plan: dict, ranks: dict, r_min: int = 1) -> dict:
    """How learned ranks follow planted ones: Spearman over the planted (non-zero) components and over all,
    mean learned rank per planted level (and whether it rises with the level), and the rank-0 components'
    mean rank and share at the floor `r_min`."""
    import statistics

    keys = sorted(plan)
    planted = [k for k in keys if plan[k] > 0]
    zeros = [k for k in keys if plan[k] == 0]
    levels = sorted({plan[k] for k in planted})
    means = {str(v): round(statistics.fmean(ranks[k] for k in planted if plan[k] == v), 2) for v in levels}
    return {
        "spearman_planted": round(spearman([plan[k] for k in planted], [ranks[k] for k in planted]), 4),
        "spearman_all": round(spearman([plan[k] for k in keys], [ranks[k] for k in keys]), 4),
        "level_means": means,
        "levels_increasing": all(means[str(a)] < means[str(b)] for a, b in zip(levels, levels[1:])),
        "zero_mean_rank": round(statistics.fmean(ranks[k] for k in zeros), 2) if zeros else None,
        "zero_at_floor": round(sum(ranks[k] <= r_min for k in zeros) / len(zeros), 4) if zeros else None,
    }
