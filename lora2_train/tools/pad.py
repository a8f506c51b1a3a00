"""Zero-padding to a uniform rank (spec §6): ΔW is bit-identical."""
from __future__ import annotations

import torch

from ..format import Adapter, LoRAModule, with_rank_metadata


def pad_module(m: LoRAModule, rank: int) -> LoRAModule:
    """Append rank − r zero rows to ``lora_down`` and zero columns to ``lora_up``; alpha·R/r keeps alpha/rank."""
    extra = rank - m.rank
    if extra == 0:
        return m
    down = torch.cat([m.down, m.down.new_zeros((extra,) + tuple(m.down.shape[1:]))], 0)
    up = torch.cat([m.up, m.up.new_zeros((m.up.shape[0], extra) + tuple(m.up.shape[2:]))], 1)
    return LoRAModule(down, up, m.alpha * rank / m.rank if m.alpha != m.rank else float(rank))


def pad(adapter: Adapter, rank: int | None = None) -> Adapter:
    """Every module zero-padded to `rank` (default: the largest rank in the adapter)."""
    ranks = adapter.ranks()
    if not ranks:
        raise ValueError("the adapter has no modules")
    top = max(ranks, key=ranks.get)
    target = ranks[top] if rank is None else int(rank)
    if target < ranks[top]:
        raise ValueError(f"--rank {target} is below the largest module rank {ranks[top]} ({top}); "
                         "padding only adds positions (use truncate to remove them)")
    out = Adapter({k: pad_module(m, target) for k, m in adapter.modules.items()}, adapter.metadata, adapter.source)
    return with_rank_metadata(out, lora2_padded_from=str(ranks[top]))
