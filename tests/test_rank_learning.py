"""The method end to end on the smallest case where the answer is known: one linear layer.

The target is W + ΔW with ΔW of planted rank r (all directions equally strong).  LoRA² with
the full objective (data MSE + λ_r·(|ν − ν_target| + β·weight norm)) must give more rank to
layers with more planted rank, and the regularizer must hold unneeded rank down.
"""
import torch

from lora2_train import rank as R
from lora2_train.layer import AdaptiveLoRA
from lora2_train.planted import spearman


def learn_rank(planted: int, dim=48, steps=400, seed=0) -> int:
    torch.manual_seed(seed)
    base = torch.nn.Linear(dim, dim).requires_grad_(False)
    g = torch.Generator().manual_seed(seed + 1)
    delta = torch.zeros(dim, dim)
    if planted:
        u, _ = torch.linalg.qr(torch.randn(dim, planted, generator=g))
        v, _ = torch.linalg.qr(torch.randn(dim, planted, generator=g))
        delta = 3 * base.weight.norm() / dim ** 0.5 * u @ v.T
    target_w = base.weight + delta
    layer = AdaptiveLoRA("x", base, r_init=8, q=0.9, r_max=dim, block=4)
    layer.apply_to()
    opt = torch.optim.Adam([{"params": [layer.lora_down, layer.lora_up], "lr": 1e-2},
                            {"params": [layer.rho], "lr": 3e-2}], foreach=False)
    nu_t = R.nu_target(4, 0.9)
    for step in range(steps):
        x = torch.randn(64, dim, generator=g)
        mse = (base(x) - x @ target_w.T - base.bias).square().mean()
        reg = (layer.nu() - nu_t).abs() + 1e-2 * (layer.lora_down.square().mean() + layer.lora_up.square().mean())
        loss = mse + 1e-2 * reg
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 10 == 0:
            layer.resize(layer.target_rank(), opt)
    return layer.rank


def test_learned_rank_follows_planted_rank_in_one_layer():
    planted = [0, 2, 4, 8, 16, 32]
    learned = [learn_rank(r) for r in planted]
    # ranks at or below r_target = 4 are all "unneeded": they settle at r_target's block (4 or 8)
    assert all(r <= 8 for r in learned[:3]), learned
    assert spearman(planted[2:], learned[2:]) >= 0.9, learned  # above r_target, more planted → more learned
    assert learned[-1] >= 32, learned  # a rank-32 target grows far beyond r_init = 8
