"""Third-party models built small with random weights, for naming and interop tests; the pack loader."""
import contextlib
import importlib.util
import pathlib
import sys

import torch

from lora2_train.models import SDXLUNet, UNetConfig


def diffusers_sdxl_like(layers_per_block=2, depth=(0, 2, 3), koala=False, width=32, context=64):
    """(diffusers UNet2DConditionModel, our ldm UNet) with the same SDXL-family block structure."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    chans = (width, 2 * width, 4 * width)
    diff = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
        block_out_channels=chans, norm_num_groups=16, cross_attention_dim=context,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type=None if koala else "UNetMidBlock2DCrossAttn",
        transformer_layers_per_block=list(depth), attention_head_dim=[c // 16 for c in chans],
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=2 * context,
    )
    ldm = SDXLUNet(UNetConfig(model_channels=width, num_res_blocks=(layers_per_block,) * 3,
                              transformer_depth=tuple(depth), transformer_depth_output=tuple(depth),
                              transformer_depth_middle=-2 if koala else depth[-1], context_dim=context,
                              adm_in_channels=2 * context, num_head_channels=16, norm_groups=16))
    return diff, ldm


def tiny_clip_text_model(layers=2, width=32):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=width, intermediate_size=2 * width,
                                        num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=16))


def unet_inputs(unet, batch=2, size=8, tokens=8, seed=0):
    """(x, timesteps, context, y) for an ldm-layout SDXL UNet, from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    return (torch.randn(batch, c.in_channels, size, size, generator=g), torch.randint(0, 1000, (batch,), generator=g),
            torch.randn(batch, tokens, c.context_dim, generator=g), torch.randn(batch, c.adm_in_channels, generator=g))


@contextlib.contextmanager
def pack_module(name: str = "lora2_pack"):
    """The repository loaded as a package under `name`, the way ComfyUI loads a custom node folder."""
    root = pathlib.Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        for m in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            sys.modules.pop(m)
