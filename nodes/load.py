"""Load LoRA² Adapter: apply a (ragged-rank) kohya LoRA to MODEL and CLIP, optionally under a rank budget.

The adapter is read and truncated by ``lora2_train`` (``format.load_adapter``, ``tools.truncate``: keep the
first k positions of each module, spec §5–§6); the weights are patched by ComfyUI itself: its LoRA key map
(``comfy.lora.model_lora_keys_unet`` / ``model_lora_keys_clip``) names the weight of each kohya key,
``comfy.lora.load_lora`` turns the factors into patches and ``ModelPatcher.add_patches`` records them on clones,
so the node composes with other LoRA loaders and with ComfyUI's model management.  A key that names no weight
of the model, or whose ΔW does not fit that weight, is an error listing those keys.
"""
from __future__ import annotations

import math
import os

from . import _pack

BUDGET_MODES = ("max rank", "fraction", "parameters (millions)")


def adapter_info(name: str, adapter, full=None, **extra) -> dict:
    """LORA2_INFO: what the chart and the user need to know about a loaded/produced adapter."""
    ranks = adapter.ranks()
    info = {"name": name, "ranks": ranks, "num_parameters": adapter.num_parameters(),
            "num_modules": len(ranks), "max_rank": max(ranks.values(), default=0),
            "min_rank": min(ranks.values(), default=0)}
    if full is not None:
        info["full_ranks"] = full.ranks()
        info["full_num_parameters"] = full.num_parameters()
    info.update(extra)
    return info


def apply_budget(adapter, rank_budget: float, budget_mode: str):
    """`rank_budget` 0 keeps the whole adapter; otherwise tools.truncate under the chosen mode."""
    from lora2_train.tools import truncate

    if rank_budget is None or rank_budget == 0:
        return adapter
    if rank_budget < 0 or not math.isfinite(rank_budget):
        raise ValueError(f"rank_budget must be 0 (full) or positive, got {rank_budget}")
    if budget_mode == "max rank":
        if rank_budget != int(rank_budget):
            raise ValueError(f"rank_budget {rank_budget} in mode 'max rank' must be a whole number")
        return truncate(adapter, max_rank=int(rank_budget))
    if budget_mode == "fraction":
        if rank_budget > 1:
            raise ValueError(f"rank_budget {rank_budget} in mode 'fraction' must lie in (0, 1]")
        return truncate(adapter, fraction=float(rank_budget))
    if budget_mode == "parameters (millions)":
        return truncate(adapter, params=int(round(rank_budget * 1e6)))
    raise ValueError(f"budget_mode must be one of {BUDGET_MODES}, got {budget_mode!r}")


def lora_key_map(model, clip) -> dict:
    """kohya key → weight key (or (key, offset…) tuple) of MODEL and CLIP, by ComfyUI's own key map."""
    import comfy.lora

    key_map = {}
    if model is not None:
        comfy.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    return key_map


def _list(keys, limit=8) -> str:
    keys = sorted(keys)
    more = f" … (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_keys(adapter, key_map: dict, model, clip, source: str) -> None:
    """Every module must name a weight of the model (an error lists those that do not) and fit its shape."""
    unmapped = [k for k in adapter.modules if k not in key_map]
    if unmapped:
        hint = " (a LoRA for another base model?)" if len(unmapped) == len(adapter.modules) else ""
        raise ValueError(f"{source}: {len(unmapped)} of {len(adapter.modules)} LoRA keys name no weight of this "
                         f"model/CLIP{hint}: {_list(unmapped)}")
    roots = [r for r in (model.model if model is not None else None,
                         clip.cond_stage_model if clip is not None else None) if r is not None]
    found: dict = {}
    bad = []
    for k, m in adapter.modules.items():
        target = key_map[k]
        if not isinstance(target, str):  # (key, offset…): part of a fused weight
            continue
        shape = _weight_shape(roots, target, found)
        if shape is None:
            continue
        if shape[0] != m.out_features or math.prod(shape) != math.prod(m.weight_shape):
            bad.append(f"{k} ΔW {tuple(m.weight_shape)} vs weight {shape}")
    if bad:
        raise ValueError(f"{source}: {len(bad)} LoRA keys do not fit the model's weights (another base model?): "
                         f"{_list(bad, 4)}")


def _weight_shape(roots, name: str, found: dict):
    """Shape of parameter `name` of the first root that has it (None if none does).

    Submodules are looked up through ``_modules`` with the parents already found remembered in `found`:
    ``get_parameter`` walks the whole path with ``getattr`` for each of hundreds of keys.
    """
    path, _, leaf = name.rpartition(".")
    for i, root in enumerate(roots):
        module = _submodule(root, path, found, i)
        p = module._parameters.get(leaf) if module is not None else None
        if p is not None:
            return tuple(p.shape)
    return None


def _submodule(root, path: str, found: dict, tag: int):
    if not path:
        return root
    key = (tag, path)
    if key not in found:
        parent_path, _, name = path.rpartition(".")
        parent = _submodule(root, parent_path, found, tag)
        found[key] = parent._modules.get(name) if parent is not None else None
    return found[key]


def patch_with_adapter(model, clip, adapter, strength_model: float, strength_clip: float, source: str = "adapter"):
    """(MODEL, CLIP) clones carrying `adapter` as ComfyUI LoRA patches; the inputs are never modified."""
    import comfy.lora

    from lora2_train.format import adapter_state_dict

    key_map = lora_key_map(model, clip)
    check_keys(adapter, key_map, model, clip, source)
    sd = adapter_state_dict(adapter, None, contiguous=False)  # ComfyUI multiplies views as they are
    patches = comfy.lora.load_lora(sd, {k: key_map[k] for k in adapter.modules})
    new_model, new_clip = model, clip
    if model is not None and strength_model != 0:
        new_model = model.clone()
        new_model.add_patches(patches, strength_model)
    if clip is not None and strength_clip != 0:
        new_clip = clip.clone()
        new_clip.add_patches(patches, strength_clip)
    return new_model, new_clip


class LoadLoRA2Adapter:
    CATEGORY = "LoRA²"
    RETURN_TYPES = ("MODEL", "CLIP", "LORA2_INFO")
    RETURN_NAMES = ("model", "clip", "info")
    FUNCTION = "load"
    DESCRIPTION = ("Apply a LoRA (ragged ranks or not; kohya, diffusers/PEFT or LyCORIS LoCon file) to MODEL and "
                   "CLIP through ComfyUI's LoRA patching. rank_budget 0 loads it whole; otherwise each module keeps "
                   "its most important positions up to a max rank, a fraction of its rank, or a total parameter "
                   "budget.")

    def __init__(self):
        self._cache = None  # ((path, mtime, size), Adapter)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "clip": ("CLIP",),
            "lora_name": (_pack.lora_names(),),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -20.0, "max": 20.0, "step": 0.01}),
            "strength_clip": ("FLOAT", {"default": 1.0, "min": -20.0, "max": 20.0, "step": 0.01}),
            "rank_budget": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0e6, "step": 0.01, "round": False,
                                      "tooltip": "0 = full adapter; else a max rank, a fraction in (0, 1] or "
                                                 "millions of parameters, per budget_mode"}),
            "budget_mode": (list(BUDGET_MODES), {"default": BUDGET_MODES[0]}),
        }}

    def _read(self, path: str):
        from lora2_train.format import load_adapter

        st = os.stat(path)
        stamp = (path, st.st_mtime_ns, st.st_size)
        if self._cache is None or self._cache[0] != stamp:
            self._cache = None
            self._cache = (stamp, load_adapter(path))
        return self._cache[1]

    def load(self, model, clip, lora_name, strength_model, strength_clip, rank_budget=0.0,
             budget_mode=BUDGET_MODES[0]):
        full = self._read(_pack.lora_path(lora_name))
        adapter = apply_budget(full, rank_budget, budget_mode)
        new_model, new_clip = patch_with_adapter(model, clip, adapter, strength_model, strength_clip, lora_name)
        info = adapter_info(lora_name, adapter, full, strength_model=strength_model, strength_clip=strength_clip,
                            rank_budget=rank_budget, budget_mode=budget_mode)
        ui = {"name": lora_name, "ranks": info["ranks"], "full_ranks": info["full_ranks"],
              "num_parameters": info["num_parameters"], "full_num_parameters": info["full_num_parameters"]}
        return {"ui": {"lora2_ranks": [ui]}, "result": (new_model, new_clip, info)}  # ui: the browser's rank chart
