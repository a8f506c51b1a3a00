"""ComfyUI's own modules in this process: meta-device SDXL-family models wrapped as MODEL / CLIP.

Used where a running server is not needed (LoRA key coverage, load-time benchmark).  The ComfyUI folder goes
at the *end* of ``sys.path`` so that this repository's ``nodes`` package is not shadowed by ComfyUI's
``nodes.py``; ComfyUI is told ``--cpu`` before ``comfy.model_management`` is imported.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import torch

SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}

#: a small random SDXL-architecture U-Net (width 32, one transformer block per level) for in-process training
TINY_SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "dtype": torch.float32, "in_channels": 4,
    "model_channels": 32, "num_res_blocks": [1, 1, 1], "transformer_depth": [0, 1, 1], "channel_mult": [1, 2, 2],
    "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 16,
    "transformer_depth_output": [0, 0, 1, 1, 1, 1], "use_temporal_attention": False, "use_temporal_resblock": False,
}


def start_script(argv):
    """The start of an in-process Train-node script run as ``script COMFYUI_DIR WORK_DIR``: ComfyUI first on
    ``sys.path``, told ``--cpu`` before any of its modules loads; LoRAs go to ``WORK_DIR/loras`` and outputs to
    ``WORK_DIR/output``.  Returns (comfy_dir, work, loras folder)."""
    comfy_dir, work = argv[1], argv[2]
    sys.argv = [argv[0], "--cpu"]
    sys.path.insert(0, comfy_dir)
    import comfy.options

    comfy.options.enable_args_parsing()
    import folder_paths

    loras = os.path.join(work, "loras")
    os.makedirs(loras, exist_ok=True)
    folder_paths.folder_names_and_paths["loras"] = ([loras], {".safetensors"})
    folder_paths.set_output_directory(os.path.join(work, "output"))
    return comfy_dir, work, loras


def import_pack(root):
    """This repository imported as the ComfyUI custom-node package ``lora2_pack`` (as ComfyUI loads it);
    returns its ``nodes.train`` package."""
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("lora2_pack", os.path.join(root, "__init__.py"),
                                                  submodule_search_locations=[root])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["lora2_pack"] = pack
    spec.loader.exec_module(pack)
    return sys.modules["lora2_pack.nodes.train"]


def import_comfy(comfy_dir: Path):
    comfy_dir = str(Path(comfy_dir).resolve())
    if comfy_dir not in sys.path:
        sys.path.append(comfy_dir)
    from comfy.cli_args import args

    args.cpu = True
    return importlib.import_module("comfy.lora")


def meta_models(comfy_dir: Path, arch: str = "sdxl"):
    """(MODEL, CLIP) of ComfyUI's SDXL (or KOALA-700M) classes on the meta device: real names and shapes."""
    import_comfy(comfy_dir)
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models as sm
    from comfy import sdxl_clip

    if arch == "sdxl":
        config = sm.SDXL(dict(SDXL_UNET, dtype=torch.float16))
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        from make_checkpoint import KOALA_700M_UNET

        config = sm.KOALA_700M(dict(KOALA_700M_UNET, dtype=torch.float16))
    cpu = torch.device("cpu")
    with torch.device("meta"), torch.no_grad():
        base = config.get_model({})
        clip_model = sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float16)
    model = comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
    clip = comfy.sd.CLIP(no_init=True)
    clip.cond_stage_model = clip_model
    clip.tokenizer = None
    clip.layer_idx = None
    # what CLIP.__init__ would set and CLIP.clone copies in current ComfyUI (unused by the early-2024 one)
    clip.tokenizer_options, clip.use_clip_schedule, clip.apply_hooks_to_conds = {}, False, None
    clip.patcher = comfy.model_patcher.ModelPatcher(clip_model, load_device=cpu, offload_device=cpu)
    return model, clip


def calculate_weight(patcher, key: str, weight: torch.Tensor) -> torch.Tensor:
    """The weight ComfyUI computes for `key` from the patches recorded on `patcher` (early and current API)."""
    patches = patcher.patches[key]
    if hasattr(patcher, "calculate_weight"):
        return patcher.calculate_weight(patches, weight, key)
    import comfy.lora

    return comfy.lora.calculate_weight(patches, weight, key)
