"""Random LoRA² adapters with exactly the kohya keys our trainer writes, for SDXL-family models.

The key set comes from :class:`lora2_train.network.LoRA2Network` itself, injected into our ldm-layout UNet and
into transformers CLIP text encoders of SDXL's sizes, all built on the meta device (no memory, no weights).
"""
from __future__ import annotations

import functools
import math

import torch

ALL_GROUPS = ("attn1", "attn2", "ff", "proj", "resnet", "te_attn", "te_mlp")
ATTN_GROUPS = ("attn1", "attn2")


@functools.lru_cache(maxsize=None)
def _target_shapes(arch: str, groups: tuple) -> dict[str, tuple]:
    from lora2_train.config import LoRA2Config
    from lora2_train.models import SDXLUNet, koala_700m_config, sdxl_config
    from lora2_train.network import LoRA2Network

    unet_cfg = {"sdxl": sdxl_config, "koala-700m": koala_700m_config}[arch]()
    tes = ()
    with torch.device("meta"):
        unet = SDXLUNet(unet_cfg)
        if any(g.startswith("te_") for g in groups):
            from transformers import CLIPTextConfig, CLIPTextModel

            tes = (CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                num_attention_heads=12)),
                   CLIPTextModel(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                num_attention_heads=20)))
        net = LoRA2Network(LoRA2Config(targets=groups, r_init=4, rank_block=1), unet, tes)
    return {k: tuple(layer.base.weight.shape) for k, layer in net.layers.items()}


def trainer_keys(arch: str = "sdxl", groups=ALL_GROUPS) -> dict[str, tuple]:
    """kohya key → shape of the adapted weight, for every component the trainer writes."""
    return dict(_target_shapes(arch, tuple(groups)))


def random_adapter(shapes: dict[str, tuple], ranks, seed: int = 0, scale: float = 1.0, order: str = "importance"):
    """An Adapter over `shapes` with ``ranks[key]`` (or ``ranks(i, key)``) positions per module.

    Factors are Gaussian (ΔW entries of order `scale`/√in); alpha = rank, as the trainer writes.
    """
    from lora2_train.format import FORMAT_VERSION, Adapter, LoRAModule, with_rank_metadata

    g = torch.Generator().manual_seed(seed)
    modules = {}
    for i, (key, shape) in enumerate(shapes.items()):
        r = int(ranks(i, key) if callable(ranks) else ranks[key])
        fan_in = math.prod(shape[1:])
        down = torch.randn((r,) + tuple(shape[1:]), generator=g) / math.sqrt(fan_in)
        up = torch.randn((shape[0], r) + ((1, 1) if len(shape) == 4 else ()), generator=g) * (scale / math.sqrt(r))
        modules[key] = LoRAModule(down, up, float(r))
    meta = {"ss_base_model_version": "sdxl_base_v1-0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            "lora2_version": FORMAT_VERSION, "lora2_order": order}
    return with_rank_metadata(Adapter(modules, meta))


def ragged_ranks(low: int = 8, high: int = 256, block: int = 8):
    """Deterministic ragged ranks from `low` to `high` (multiples of `block`), cycling over the modules."""
    steps = (high - low) // block + 1
    return lambda i, key: low + block * ((i * 37) % steps)
