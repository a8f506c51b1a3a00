"""Zero-Pad and Merge LoRA² Adapters: rank tools of ``lora2_train.tools`` (spec §6) that write a new LoRA file.

The result goes next to the (first) input in ComfyUI's ``loras`` folder, under a new name
(``format.output_path`` keeps it inside that folder; ``format.save_adapter`` writes atomically and never
replaces a file: a taken name gets a ``_2``, ``_3`` … suffix).  Both are output nodes, so they run on their own.
"""
from __future__ import annotations

import os

from . import _pack
from .load import adapter_info

NONE = "(none)"
DTYPES = ("fp16", "bf16", "fp32")
MERGE_MODES = ("exact", "exact + SVD resize (rank)", "exact + SVD resize (energy)", "pad-average")


def loras_root(lora_name: str) -> str:
    """The ``loras`` folder that holds `lora_name` (names may include sub-folders)."""
    full = os.path.normpath(_pack.lora_path(lora_name))
    rel = os.path.normpath(lora_name)
    if not full.endswith(rel):
        return os.path.dirname(full)
    return full[: len(full) - len(rel)].rstrip(os.sep) or os.sep


def default_name(lora_name: str, suffix: str) -> str:
    stem = lora_name[: -len(".safetensors")] if lora_name.lower().endswith(".safetensors") else lora_name
    return f"{stem}_{suffix}"


def numbered_paths(root: str, name: str):
    """``root/name.safetensors``, then ``name_2``, ``name_3`` … (each checked to stay inside `root`)."""
    from lora2_train.format import output_path

    stem = name.strip()
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    for i in range(1, 10000):
        yield output_path(root, stem if i == 1 else f"{stem}_{i}")
    raise FileExistsError(f"{root}: no free name left for {name!r}")


def free_path(root: str, name: str):
    """The first of :func:`numbered_paths` that names no file yet."""
    for path in numbered_paths(root, name):
        if not path.exists():
            return path


def save_new(adapter, root: str, name: str, dtype: str) -> str:
    """Save under `name` (or name_2, name_3 … when taken) inside `root`; returns the name relative to `root`."""
    from lora2_train.format import save_adapter

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    root = os.path.realpath(root)
    for path in numbered_paths(root, name):
        try:
            save_adapter(adapter, path, dtype=dtype, overwrite=False)
        except FileExistsError:
            continue
        return os.path.relpath(path, root).replace(os.sep, "/")


def _result(saved: str, info: dict):
    return {"ui": {"text": [saved]}, "result": (saved, info)}


class ZeroPadLoRA2Adapter:
    CATEGORY = "LoRA²"
    RETURN_TYPES = ("STRING", "LORA2_INFO")
    RETURN_NAMES = ("lora_name", "info")
    FUNCTION = "pad"
    OUTPUT_NODE = True
    DESCRIPTION = ("Zero-pad every module of a ragged LoRA to one rank (ΔW unchanged), for tools that need a "
                   "uniform rank; saved as a new file in the loras folder.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora_name": (_pack.lora_names(),),
            "rank": ("INT", {"default": 0, "min": 0, "max": 4096,
                             "tooltip": "0 = the largest rank in the adapter"}),
            "output_name": ("STRING", {"default": "", "tooltip": "empty: <input name>_padded"}),
            "dtype": (list(DTYPES), {"default": DTYPES[0]}),
        }}

    def pad(self, lora_name, rank=0, output_name="", dtype=DTYPES[0]):
        from lora2_train.format import load_adapter
        from lora2_train.tools import pad

        adapter = load_adapter(_pack.lora_path(lora_name))
        padded = pad(adapter, rank=rank or None)
        name = output_name.strip() or default_name(lora_name, f"padded_r{max(padded.ranks().values())}")
        saved = save_new(padded, loras_root(lora_name), name, dtype)
        return _result(saved, adapter_info(saved, padded, adapter, operation="pad", inputs=[lora_name]))


class MergeLoRA2Adapters:
    CATEGORY = "LoRA²"
    RETURN_TYPES = ("STRING", "LORA2_INFO")
    RETURN_NAMES = ("lora_name", "info")
    FUNCTION = "merge"
    OUTPUT_NODE = True
    DESCRIPTION = ("Merge 2–4 LoRAs (any ranks) with weights. exact: ΔW = Σ wᵢ ΔWᵢ (ranks add up); exact + SVD "
                   "resize: the same, re-compressed per module to a rank or an energy fraction; pad-average: the "
                   "paper's zero-pad-and-average of the factors (weights normalized to sum 1). Saved as a new file.")

    @classmethod
    def INPUT_TYPES(cls):
        names = _pack.lora_names()
        weight = ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01})
        return {
            "required": {
                "lora_1": (names,), "weight_1": weight,
                "lora_2": (names,), "weight_2": weight,
                "mode": (list(MERGE_MODES), {"default": MERGE_MODES[0]}),
                "rank": ("INT", {"default": 64, "min": 1, "max": 4096,
                                 "tooltip": "rank of each module after 'exact + SVD resize (rank)'"}),
                "energy": ("FLOAT", {"default": 0.99, "min": 0.01, "max": 1.0, "step": 0.001,
                                     "tooltip": "kept fraction of Σσ² per module for 'exact + SVD resize (energy)'"}),
                "output_name": ("STRING", {"default": "", "tooltip": "empty: <first input>_merged"}),
                "dtype": (list(DTYPES), {"default": DTYPES[0]}),
            },
            "optional": {
                "lora_3": ([NONE] + names, {"default": NONE}), "weight_3": weight,
                "lora_4": ([NONE] + names, {"default": NONE}), "weight_4": weight,
            },
        }

    def merge(self, lora_1, weight_1, lora_2, weight_2, mode=MERGE_MODES[0], rank=64, energy=0.99,
              output_name="", dtype=DTYPES[0], lora_3=NONE, weight_3=1.0, lora_4=NONE, weight_4=1.0):
        from lora2_train.format import load_adapter
        from lora2_train.tools import merge

        pairs = [(lora_1, weight_1), (lora_2, weight_2), (lora_3, weight_3), (lora_4, weight_4)]
        pairs = [(n, float(w)) for n, w in pairs if n not in (None, "", NONE)]
        names = [n for n, _ in pairs]
        weights = [w for _, w in pairs]
        kwargs = {}
        if mode == "pad-average":
            total = sum(weights)
            if total == 0:
                raise ValueError("pad-average: the weights sum to 0; they are normalized to sum 1")
            weights = [w / total for w in weights]
            tool_mode = "pad-average"
        elif mode in MERGE_MODES:
            tool_mode = "exact"
            if mode == "exact + SVD resize (rank)":
                kwargs["rank"] = int(rank)
            elif mode == "exact + SVD resize (energy)":
                kwargs["energy"] = float(energy)
        else:
            raise ValueError(f"mode must be one of {MERGE_MODES}, got {mode!r}")
        adapters = [load_adapter(_pack.lora_path(n)) for n in names]
        merged = merge(adapters, weights, mode=tool_mode, names=names, **kwargs)
        name = output_name.strip() or default_name(lora_1, "merged")
        saved = save_new(merged, loras_root(lora_1), name, dtype)
        return _result(saved, adapter_info(saved, merged, operation="merge", mode=mode, inputs=names,
                                           weights=weights))
