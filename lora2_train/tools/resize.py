"""SVD re-compression to ragged ranks (compare sd-scripts' resize_lora dynamic methods).

Per module: ΔW = U Σ Vᵀ; keep k = min(R, r) singular directions, or the smallest k whose
Σ_{i≤k} σ_i² reaches `energy` of Σ σ_i² (Frobenius energy retained).  Output positions are in
singular-value order, alpha = k.
"""
from __future__ import annotations

from ..format import Adapter, LoRAModule, uniform_alpha, with_rank_metadata
from .svd import energy_rank, factor_svd, from_svd


def resize_module(m: LoRAModule, rank: int | None = None, energy: float | None = None) -> LoRAModule:
    u, s, vh = factor_svd(m)
    k = min(rank, m.rank) if rank is not None else energy_rank(s, energy)
    return from_svd(u, s, vh, k, m)


def check_resize_args(rank, energy) -> None:
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of --rank, --energy")
    if rank is not None and rank < 1:
        raise ValueError(f"--rank must be ≥ 1, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"--energy must be in (0, 1], got {energy}")


def resize(adapter: Adapter, rank: int | None = None, energy: float | None = None) -> Adapter:
    """Every module re-compressed by SVD to `rank` (or less) or to an energy threshold."""
    check_resize_args(rank, energy)
    modules = uniform_alpha({k: resize_module(m, rank, energy) for k, m in adapter.modules.items()})
    out = Adapter(modules, adapter.metadata, adapter.source)
    return with_rank_metadata(out, lora2_order="svd")
