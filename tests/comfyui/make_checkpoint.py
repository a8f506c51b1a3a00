"""Write a random-weight KOALA-700M checkpoint in the single-file SDXL layout, using ComfyUI's own classes.

Usage: python make_checkpoint.py COMFYUI_DIR OUT.safetensors

The UNet, both text encoders and the VAE are built on the meta device with ComfyUI's model classes, their
state dicts go through ComfyUI's own save-side key conversion (``state_dict_for_saving``: UNet →
``model.diffusion_model.*``, CLIP-L → ``conditioner.embedders.0.*``, CLIP-G → ``conditioner.embedders.1.*``,
VAE → ``first_stage_model.*``), and each tensor is then drawn at random in fp16 (weights ~ N(0, 1/fan_in),
norm scales 1, biases 0), so peak memory stays near the file size.  ComfyUI's model detection recognizes the
result by its shapes as its ``KOALA_700M`` model type.
"""
import os
import sys

# KOALA-700M in ComfyUI's UNet config vocabulary (the entry ComfyUI's model detection lists for it)
KOALA_700M_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [1, 1, 1], "transformer_depth": [0, 2, 5], "transformer_depth_output": [0, 0, 2, 2, 5, 5],
    "channel_mult": [1, 2, 4], "transformer_depth_middle": -2, "use_linear_in_transformer": True,
    "context_dim": 2048, "num_head_channels": 64, "use_temporal_attention": False, "use_temporal_resblock": False,
}
VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def random_like(name, t, gen):
    import torch

    if t.device.type != "meta":
        return t.contiguous()
    if t.dim() >= 2:
        fan_in = t[0].numel() if "embedding" not in name else 1
        std = 0.02 if "embedding" in name else fan_in ** -0.5
        return (torch.randn(t.shape, generator=gen) * std).to(torch.float16)
    if t.dim() == 0:
        return torch.ones((), dtype=torch.float16)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "weight" or "scale" in leaf:
        return torch.ones(t.shape, dtype=torch.float16)
    return torch.zeros(t.shape, dtype=torch.float16)


def main(comfy_dir, out):
    sys.path.insert(0, comfy_dir)
    os.chdir(comfy_dir)
    import torch
    from safetensors.torch import save_file

    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported: no GPU probing
    import comfy.supported_models as sm
    from comfy import sdxl_clip
    from comfy.ldm.models.autoencoder import AutoencoderKL

    config = sm.KOALA_700M(dict(KOALA_700M_UNET, dtype=torch.float16))
    with torch.device("meta"), torch.no_grad():
        model = config.get_model({})
        clip = sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float16)
        vae = AutoencoderKL(ddconfig=VAE_DDCONFIG, embed_dim=4)
    sd = model.state_dict_for_saving(clip.state_dict(), vae.state_dict())
    del model, clip, vae
    gen = torch.Generator().manual_seed(0)
    tensors = {k: random_like(k, t, gen) for k, t in sorted(sd.items())}
    tmp = out + ".tmp"
    save_file(tensors, tmp, metadata={"modelspec.architecture": "koala-700m (random weights, for tests)"})
    os.replace(tmp, out)
    print(f"wrote {out}: {sum(t.numel() for t in tensors.values()) / 1e9:.3f} B parameters, {len(tensors)} tensors")


if __name__ == "__main__":
    main(os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2]))
