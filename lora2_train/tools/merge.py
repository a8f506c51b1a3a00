"""Weighted merge of adapters with any ranks (spec §6).

exact        ΔW = Σ_i w_i ΔW_i: factors concatenated along the rank axis, B = [w_1 s_1 B_1 | … ],
             A = [A_1; …], rank Σ r_i, alpha = rank.  Optionally re-compressed per module by SVD to
             a rank or an energy threshold (ragged output).
pad-average  the paper's recipe: zero-pad each module to the largest rank among the inputs, then
             average the factors: B = Σ w_i s_i B_i, A = Σ w_i A_i (default w_i = 1/N).  Approximate:
             ΔW = Σ_i Σ_j w_i w_j B_i A_j includes cross terms.
"""
from __future__ import annotations

import json

import torch

from ..format import Adapter, LoRAModule, balanced_factors, factors_for_dtype, uniform_alpha, with_rank_metadata
from .resize import check_resize_args, resize_module

MODES = ("exact", "pad-average")
_BASE_KEYS = ("ss_base_model_version", "modelspec.architecture")


def _base_model(adapter: Adapter) -> str | None:
    for k in _BASE_KEYS:
        v = adapter.metadata.get(k)
        if v:
            return v.split("/")[0]
    return None


def check_compatible(adapters: list[Adapter], names: list[str]) -> None:
    """Same base model (metadata, where given) and the same weight shape for every shared module."""
    bases = [(n, _base_model(a)) for n, a in zip(names, adapters)]
    known = [(n, b) for n, b in bases if b]
    for n, b in known[1:]:
        if b != known[0][1]:
            raise ValueError(f"{n}: made for base model {b!r}, but {known[0][0]} is for {known[0][1]!r}; "
                             "adapters for different base models cannot be merged")
    shapes: dict[str, tuple[str, tuple]] = {}
    for n, a in zip(names, adapters):
        for key, m in a.modules.items():
            if key in shapes and shapes[key][1] != m.weight_shape:
                raise ValueError(f"{n}: key {key!r} adapts a weight of shape {m.weight_shape}, but in "
                                 f"{shapes[key][0]} it is {shapes[key][1]} (different base models?)")
            shapes.setdefault(key, (n, m.weight_shape))


def _exact(items: list[tuple[float, LoRAModule]], alpha: float | None = None,
           dtype: torch.dtype = torch.float32) -> LoRAModule:
    """[A_1; A_2; …] and [B_1 | B_2 | …] with the per-position factor c = w_i s_i (times rank/alpha, given
    `alpha`) split between the two (:func:`lora2_train.format.balanced_factors`), computed in fp32 and
    rounded once to `dtype` (:func:`lora2_train.format.factors_for_dtype`: in fp16 a module too small for
    the dtype's range keeps a smaller alpha of its own)."""
    down = torch.cat([m.down.float() for _, m in items], 0)
    rank = down.shape[0]
    alpha = float(rank) if alpha is None else alpha
    up = torch.cat([m.up.float() for _, m in items], 1)
    c = torch.cat([torch.full((m.rank,), w * m.scale * rank / alpha) for w, m in items])
    down, up = balanced_factors(down, up, c)
    return LoRAModule(*factors_for_dtype(down, up, alpha, dtype))


def _pad_average(items: list[tuple[float, LoRAModule]]) -> LoRAModule:
    r = max(m.rank for _, m in items)
    down = torch.zeros((r,) + tuple(items[0][1].down.shape[1:]))
    up = torch.zeros((items[0][1].up.shape[0], r) + tuple(items[0][1].up.shape[2:]))
    for w, m in items:
        down[: m.rank] += w * m.down.float()
        up[:, : m.rank] += (w * m.scale) * m.up.float()
    return LoRAModule(down, up, float(r))


def merge(adapters: list[Adapter], weights: list[float] | None = None, mode: str = "exact",
          rank: int | None = None, energy: float | None = None, names: list[str] | None = None,
          dtype: torch.dtype = torch.float32) -> Adapter:
    """Merge N ≥ 2 adapters module by module (a module missing from an adapter contributes nothing).

    weights default to 1 each for ``exact`` (the sum, as kohya's merge) and 1/N for ``pad-average``.
    `rank`/`energy` re-compress the exact merge by SVD (see :func:`lora2_train.tools.resize`).
    `dtype`: what the exact merge's factors are stored in — the dtype they will be saved in (the scales are
    split between the two factors and applied in fp32 either way, so a 16-bit file keeps ΔW's precision).
    """
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if len(adapters) < 2:
        raise ValueError("merge needs at least two adapters")
    names = names or [f"adapter {i + 1}" for i in range(len(adapters))]
    if weights is None:
        weights = [1.0 if mode == "exact" else 1.0 / len(adapters)] * len(adapters)
    if len(weights) != len(adapters):
        raise ValueError(f"--weights has {len(weights)} values for {len(adapters)} adapters")
    recompress = rank is not None or energy is not None
    if recompress:
        if mode != "exact":
            raise ValueError("--rank/--energy re-compress an exact merge; they do not apply to pad-average")
        check_resize_args(rank, energy)
    check_compatible(adapters, names)
    keys = list(dict.fromkeys(k for a in adapters for k in a.modules))
    groups = {key: [(float(w), a.modules[key]) for w, a in zip(weights, adapters) if key in a.modules] for key in keys}
    # one alpha for the whole file (format.uniform_alpha), folded into the concatenation
    alpha = None if recompress or mode != "exact" else float(max(sum(m.rank for _, m in g) for g in groups.values()))
    modules = {}
    for key, items in groups.items():
        if len({m.down.shape[1:] for _, m in items}) > 1:
            raise ValueError(f"key {key!r}: lora_down shapes {[tuple(m.down.shape) for _, m in items]} "
                             "differ beyond the rank (LoCon kernels of different sizes?)")
        m = _exact(items, alpha, dtype if not recompress else torch.float32) if mode == "exact" else _pad_average(items)
        modules[key] = resize_module(m, rank, energy) if recompress else m
    base = next((a.metadata for a in adapters if _base_model(a)), adapters[0].metadata)
    meta = {k: v for k, v in base.items() if k.startswith(("ss_base_model", "modelspec.", "ss_network_module"))}
    order = "svd" if recompress else "none"
    merged = json.dumps({"mode": mode, "weights": weights, "inputs": names, "rank": rank, "energy": energy})
    if alpha is None:  # (an exact merge has the file's alpha folded in already; cast modules keep theirs)
        modules = uniform_alpha(modules)
    return with_rank_metadata(Adapter(modules, meta, "lora2"), lora2_order=order, lora2_merge=merged)
