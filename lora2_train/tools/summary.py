"""Rank table of an adapter: per module shape, rank, alpha, parameters; totals; size at each dtype."""
from __future__ import annotations

import json

from ..format import _JSON_METADATA, Adapter
from ..plot import block_of, component_of

BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def inspect_adapter(adapter: Adapter) -> dict:
    """{'source', 'order', 'modules': [...], 'totals': {...}, 'metadata': {...}} (JSON-ready).

    Size in bytes counts the factor tensors at each dtype plus one fp32 alpha per module.
    """
    rows = []
    for key, m in adapter.modules.items():
        rows.append({"module": key, "block": block_of(key), "component": component_of(key),
                     "shape": list(m.weight_shape), "rank": m.rank, "alpha": m.alpha,
                     "params": m.num_parameters})
    ranks = [r["rank"] for r in rows]
    params = sum(r["params"] for r in rows)
    meta = {}
    for k, v in adapter.metadata.items():
        if k in _JSON_METADATA:
            try:
                v = json.loads(v)
            except json.JSONDecodeError:
                pass
        meta[k] = v
    return {
        "source": adapter.source,
        "order": adapter.order,
        "modules": rows,
        "totals": {"modules": len(rows), "params": params,
                   "min_rank": min(ranks, default=0), "max_rank": max(ranks, default=0),
                   "mean_rank": round(sum(ranks) / len(ranks), 3) if ranks else 0.0,
                   "bytes": {d: params * b + 4 * len(rows) for d, b in BYTES.items()}},
        "metadata": meta,
    }
