"""Load-time rank budget: keep the first k positions of each module (spec §5–§6).

LoRA² files keep positions in learned importance order, so their first k positions are the k most
important ones and no SVD is needed.  Other files are first put into singular-value order.
A module truncated from r to k keeps alpha/rank: alpha' = alpha·k/r; the result is then given one
alpha for all modules (see :func:`lora2_train.format.uniform_alpha`).  Trailing all-zero positions
(zero-padding) are dropped too, so truncating a padded file restores its ragged ranks.
"""
from __future__ import annotations

import heapq
import math

from ..format import Adapter, LoRAModule, balanced_factors, with_rank_metadata
from .svd import svd_ordered


def live_rank(m: LoRAModule, k: int) -> int:
    """min(k, r), less any trailing all-zero positions (zero-padding) among the first k.

    Position k−1 is checked on its own first (the usual case: nothing to drop); only when it is dead are
    the first k positions scanned at once for the last live one.
    """
    k = min(k, m.rank)
    up, down = m.up.flatten(1)[:, :k], m.down.flatten(1)[:k]
    if k <= 1 or (bool(up[:, -1].any()) and bool(down[-1].any())):
        return k
    live = (up.ne(0).any(0) & down.ne(0).any(1)).nonzero()
    return int(live[-1]) + 1 if live.numel() else 1


def keep_first(m: LoRAModule, k: int, alpha: float) -> LoRAModule:
    """The first k ≤ r positions, carrying `alpha`: the factor (alpha_m·k/r)/alpha goes into up (fp32 factors;
    a 16-bit writer balances them, :func:`lora2_train.format.factors_for_dtype`) or, for 16-bit factors, is
    split between the two (:func:`lora2_train.format.balanced_factors`), so alpha/rank of the kept positions
    is unchanged.  Without a rescale the factors are views of `m`'s (writers copy them)."""
    kept_alpha = m.alpha * k / m.rank
    down = m.down if k == m.rank else m.down[:k]
    if alpha == kept_alpha:
        return m if k == m.rank else LoRAModule(down, m.up[:, :k], kept_alpha)
    if m.up.dtype.itemsize < 4:  # 16-bit factors: rescaled in fp32, split between the two (the writer rounds once)
        return LoRAModule(*balanced_factors(down, m.up[:, :k], kept_alpha / alpha), float(alpha))
    return LoRAModule(down, m.up[:, :k] * (kept_alpha / alpha), float(alpha))


def position_scores(m: LoRAModule) -> list[float]:
    """‖B[:, p]‖·‖A[p]‖·alpha/r per position (σ_p in SVD order), made non-increasing along p."""
    score = (m.up.flatten(1).float().norm(dim=0) * m.down.flatten(1).float().norm(dim=1) * m.scale).tolist()
    for i in range(1, len(score)):
        score[i] = min(score[i], score[i - 1])
    return score


def budget_ranks(modules: dict[str, LoRAModule], params: int) -> dict[str, int]:
    """Ranks that fit `params` parameters, taking positions in decreasing score, one prefix per module."""
    cost = {k: m.num_parameters // m.rank for k, m in modules.items()}
    floor = sum(cost.values())
    if params < floor:
        raise ValueError(f"--params {params} is below {floor}, the size of one position per module")
    scores = {k: position_scores(m) for k, m in modules.items()}
    return allot(scores, cost, params, {k: 1 for k in modules})


def allot(scores: dict[str, list[float]], cost: dict[str, int], budget: int, floor: dict[str, int]) -> dict[str, int]:
    """Units per key within `budget`: every key starts with its first ``floor[k]`` units; then units are
    taken in decreasing score (``scores[k][p]``, non-increasing in p, so each key keeps a prefix), each
    while its cost ``cost[k]`` still fits.  Used by the load-time ``--params`` budget (positions scored
    by ‖B[:,p]‖·‖A[p]‖) and by training's ``max_params`` (blocks scored by their f-mass)."""
    keep = dict(floor)
    left = budget - sum(cost[k] * floor[k] for k in scores)
    heap = [(-s, k, p) for k, sc in scores.items() for p, s in enumerate(sc) if p >= floor[k]]
    heapq.heapify(heap)
    while heap and left > 0:
        _, k, p = heapq.heappop(heap)
        if p == keep[k] and cost[k] <= left:
            keep[k] += 1
            left -= cost[k]
    return keep


def truncate(adapter: Adapter, max_rank: int | None = None, fraction: float | None = None,
             params: int | None = None) -> Adapter:
    """Keep, per module, min(r, max_rank) positions, or ceil(fraction·r), or a global parameter budget."""
    given = [v is not None for v in (max_rank, fraction, params)]
    if sum(given) != 1:
        raise ValueError("give exactly one of --max-rank, --fraction, --params")
    if max_rank is not None and max_rank < 1:
        raise ValueError(f"--max-rank must be ≥ 1, got {max_rank}")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ValueError(f"--fraction must be in (0, 1], got {fraction}")
    modules = adapter.modules
    order = adapter.order
    if order == "none":
        modules = {k: svd_ordered(m) for k, m in modules.items()}
        order = "svd"
    if max_rank is not None:
        ranks = {k: min(m.rank, max_rank) for k, m in modules.items()}
    elif fraction is not None:
        ranks = {k: max(1, math.ceil(fraction * m.rank - 1e-9)) for k, m in modules.items()}
    else:
        ranks = budget_ranks(modules, int(params))
    ranks = {k: live_rank(m, ranks[k]) for k, m in modules.items()}
    alpha = float(max(ranks.values()))  # one alpha for the file (see format.uniform_alpha)
    out = Adapter({k: keep_first(m, ranks[k], alpha) for k, m in modules.items()}, adapter.metadata, adapter.source)
    return with_rank_metadata(out, lora2_order=order)
