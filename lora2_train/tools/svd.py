"""SVD of a factor pair without forming ΔW: QR of both factors, then the SVD of a small core.

ΔW = s·B A, B = Q_B R_B, Aᵀ = Q_A R_A  ⇒  ΔW = Q_B (s R_B R_Aᵀ) Q_Aᵀ = (Q_B U_c) Σ (V_cᵀ Q_Aᵀ).
Cost O((out + in)·r²) instead of O(out·in·min(out, in)).
"""
from __future__ import annotations

import torch

from ..format import LoRAModule


def factor_svd(m: LoRAModule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of ΔW of a module, ΔW flattened to (out, in·kh·kw), singular values descending."""
    up = m.up.flatten(1).float() * m.scale
    down = m.down.flatten(1).float()
    qu, ru = torch.linalg.qr(up)
    qd, rd = torch.linalg.qr(down.T)
    uc, s, vhc = torch.linalg.svd((ru.double() @ rd.double().T), full_matrices=False)
    return qu @ uc.float(), s.float(), vhc.float() @ qd.T


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest k with Σ_{i≤k} σ_i² ≥ energy · Σ σ_i² (at least 1)."""
    e = s.double().square()
    total = float(e.sum())
    if total == 0.0:
        return 1
    k = int(torch.searchsorted(torch.cumsum(e, 0) / total, torch.tensor([energy - 1e-6], dtype=torch.float64)))
    return max(1, min(k + 1, s.numel()))


def from_svd(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int, like: LoRAModule) -> LoRAModule:
    """Rank-k module from an SVD, √σ split into both factors (fp16-safe range), alpha = k (factor 1)."""
    k = max(1, min(k, s.numel()))
    root = s[:k].sqrt()
    down = (root[:, None] * vh[:k]).reshape((k,) + tuple(like.down.shape[1:]))
    up = u[:, :k] * root[None, :]
    if like.down.dim() == 4:
        up = up[:, :, None, None]
    return LoRAModule(down.contiguous(), up.contiguous(), float(k))


def svd_ordered(m: LoRAModule) -> LoRAModule:
    """The same ΔW with positions ordered by singular value (rank ≤ min(r, out, in))."""
    u, s, vh = factor_svd(m)
    return from_svd(u, s, vh, min(m.rank, s.numel()), m)
