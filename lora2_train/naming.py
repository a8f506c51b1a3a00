"""Module paths → kohya LoRA keys (spec §5).

SDXL LoRAs in kohya format name UNet modules by the original (SGM/ldm) UNet
layout that ComfyUI and sd-scripts use: ``lora_unet_`` + the module path with
``.`` replaced by ``_`` (``input_blocks.4.1.transformer_blocks.0.attn1.to_q``
→ ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``).  Text
encoders use the transformers CLIP paths under ``lora_te1_`` / ``lora_te2_``.
A diffusers ``UNet2DConditionModel`` path is translated to the ldm path first.
"""
from __future__ import annotations

import re

UNET_PREFIX = "lora_unet_"
TE_PREFIXES = ("lora_te1_", "lora_te2_")

#: wrappers whose module paths put the UNet under a sub-path
_ROOT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

_RESNET_DIFFUSERS_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

_TOP_DIFFUSERS_TO_LDM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def kohya_key(path: str, prefix: str = UNET_PREFIX) -> str:
    """kohya LoRA name of a module: prefix + path with '.' → '_'."""
    for root in _ROOT_PREFIXES:
        if path.startswith(root):
            path = path[len(root):]
    return prefix + path.replace(".", "_")


def text_encoder_path(path: str) -> str:
    """Normalize a CLIP text-encoder module path to the transformers 4 layout kohya keys use.

    ``encoder.layers.0.self_attn.q_proj`` (transformers 5), ``transformer.text_model.encoder…``
    (ComfyUI) and ``text_model.encoder…`` all become ``text_model.encoder.layers.0.self_attn.q_proj``.
    """
    i = path.find("encoder.layers.")
    return "text_model." + path[i:] if i >= 0 else path


def is_diffusers_unet_path(path: str) -> bool:
    return path.split(".", 1)[0] in ("down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out",
                                      "time_embedding", "add_embedding", "conv_norm_out")


def _resnet_rest(rest: str) -> str:
    head, _, tail = rest.partition(".")
    mapped = _RESNET_DIFFUSERS_TO_LDM.get(head)
    if mapped is None:
        raise KeyError(head)
    return mapped + ("." + tail if tail else "")


def diffusers_to_ldm(path: str, layers_per_block: int, up_has_attention: dict[int, bool] | None = None) -> str:
    """Translate a diffusers SDXL-family UNet module path into the ldm path.

    Index rules (n = layers_per_block; levels count from the highest resolution):
      down_blocks.i.{resnets|attentions}.j  → input_blocks.(1 + i(n+1) + j).{0|1}
      down_blocks.i.downsamplers.0.conv      → input_blocks.((i+1)(n+1)).0.op
      mid_block.resnets.j / attentions.0      → middle_block.(2j) / middle_block.1
      up_blocks.i.{resnets|attentions}.j      → output_blocks.(i(n+1) + j).{0|1}
      up_blocks.i.upsamplers.0.conv           → output_blocks.(i(n+1) + n).{2 if attentions else 1}.conv
    Raises KeyError for a path with no ldm counterpart.
    """
    for src, dst in _TOP_DIFFUSERS_TO_LDM.items():
        if path == src or path.startswith(src + "."):
            return dst + path[len(src):]
    n = layers_per_block
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)(?:\.(.*))?$", path)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4] or ""
        if kind == "downsamplers":
            return f"input_blocks.{(i + 1) * (n + 1)}.0." + rest.replace("conv", "op", 1)
        idx = 1 + i * (n + 1) + j
        if kind == "resnets":
            return f"input_blocks.{idx}.0.{_resnet_rest(rest)}"
        return f"input_blocks.{idx}.1.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", path)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3] or ""
        if kind == "resnets":
            return f"middle_block.{2 * j}.{_resnet_rest(rest)}"
        return f"middle_block.1.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)(?:\.(.*))?$", path)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4] or ""
        if kind == "upsamplers":
            slot = 2 if (up_has_attention or {}).get(i, False) else 1
            return f"output_blocks.{i * (n + 1) + n}.{slot}.{rest}"
        idx = i * (n + 1) + j
        if kind == "resnets":
            return f"output_blocks.{idx}.0.{_resnet_rest(rest)}"
        return f"output_blocks.{idx}.1.{rest}"
    raise KeyError(f"no ldm counterpart for diffusers module {path!r}")
