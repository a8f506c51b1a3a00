"""Runs the Train LoRA² node's embedded training with text-encoder targets inside a ComfyUI import (no server), in
its own process.

usage: python train_node_te_inprocess.py COMFYUI_DIR WORK_DIR
Builds a small random SDXL-architecture model and a small SDXL CLIP (ComfyUI's own classes: CLIP-L and CLIP-G of
three layers each, the real tokenizers) under inference mode, as ComfyUI's checkpoint loader does; trains
target_modules "attn+te_attn" for 4 steps (re-allocation every 2; λ_r 0, so the ranks follow the loss alone) on
two captioned images, loads the saved file with the pack's Load LoRA² Adapter node, and prints one JSON line of
findings.
"""
import copy
import hashlib
import json
import os
import re
import sys

from comfy_inprocess import TINY_SDXL_UNET, import_pack, start_script  # (this script's own folder is on sys.path)

_, work, loras = start_script(sys.argv)

import torch  # noqa: E402

import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.supported_models  # noqa: E402
from comfy import sd1_clip, sdxl_clip  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

train_mod = import_pack(ROOT)
load_mod = sys.modules["lora2_pack.nodes.load"]

from lora2_train.format import load_adapter  # noqa: E402
from lora2_train.trainer import Trainer  # noqa: E402

L_WIDTH, G_WIDTH = 64, 128  # CLIP-L / CLIP-G hidden sizes: context 192, pooled 128 → ADM 128 + 6·256
UNET = dict(TINY_SDXL_UNET, adm_in_channels=G_WIDTH + 1536, context_dim=L_WIDTH + G_WIDTH)


def clip_config(name, width, act):
    path = os.path.join(work, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"num_hidden_layers": 3, "hidden_size": width, "num_attention_heads": 2,
                   "intermediate_size": 2 * width, "hidden_act": act,
                   "max_position_embeddings": 77, "eos_token_id": 49407}, f)  # (current ComfyUI needs both)
    return path


def randomize(module, gen):
    for name, p in module.named_parameters():
        if name.endswith("logit_scale"):
            continue
        if name.endswith("text_projection.weight"):  # identity, as the early-2024 ComfyUI initialises it
            p.copy_(torch.eye(p.shape[0], dtype=p.dtype))
            continue
        if "layer_norm" in name:
            p.copy_(torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p))
        elif p.dim() >= 2:
            p.copy_((torch.randn(p.shape, generator=gen) * (0.02 if "embedding" in name else p.shape[1] ** -0.5)
                     ).to(p.dtype))
        else:
            p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))


class TinyVAE:
    """The node's VAE.encode(IMAGE) → latents: 8×8 average pooling to 4 channels (the test is about the text)."""

    def encode(self, pixels):
        x = torch.nn.functional.avg_pool2d(pixels.permute(0, 3, 1, 2).float(), 8)
        return torch.cat([x, x.mean(1, keepdim=True)], 1) * 4 - 2

    def decode(self, latent):  # (B, 4, h, w) → IMAGE (B, 8h, 8w, 3), for the samples
        x = torch.nn.functional.interpolate(latent[:, :3].float(), scale_factor=8)
        return torch.sigmoid(x).permute(0, 2, 3, 1)


cpu = torch.device("cpu")
torch.manual_seed(0)
gen = torch.Generator().manual_seed(0)
with torch.inference_mode():  # ComfyUI executes every node, checkpoint loading included, in inference mode
    base = comfy.supported_models.SDXL(UNET).get_model({})
    for p in base.diffusion_model.parameters():
        p.normal_(0, 0.02)
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
    # SDXL's CLIP with small encoders: fp16 weights cast per layer (comfy.ops.manual_cast), as ComfyUI on the CPU
    clip_l = sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=cpu, dtype=torch.float16,
                                  layer_norm_hidden_state=False, textmodel_json_config=clip_config("l", L_WIDTH,
                                                                                                   "quick_gelu"))
    clip_g = sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=cpu, dtype=torch.float16,
                                  layer_norm_hidden_state=False,
                                  textmodel_json_config=clip_config("g", G_WIDTH, "gelu"),
                                  special_tokens={"start": 49406, "end": 49407, "pad": 0})
    randomize(clip_l, gen)
    randomize(clip_g, gen)
    clip_model = sdxl_clip.SDXLClipModel.__new__(sdxl_clip.SDXLClipModel)
    torch.nn.Module.__init__(clip_model)
    clip_model.clip_l, clip_model.clip_g = clip_l, clip_g
    clip = comfy.sd.CLIP(no_init=True)
    clip.cond_stage_model, clip.tokenizer, clip.layer_idx = clip_model, sdxl_clip.SDXLTokenizer(), None
    clip.tokenizer_options, clip.use_clip_schedule, clip.apply_hooks_to_conds = {}, False, None  # newer ComfyUI
    clip.patcher = comfy.model_patcher.ModelPatcher(clip_model, load_device=cpu, offload_device=cpu)
    images = torch.rand(2, 64, 64, 3, generator=gen)


def digest(module):
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


CAPTIONS = ["a photo of sks toy", "a red cube on a table"]
PROBE = "a photo of sks toy on the beach"

# the conditioning the trainer recomputes in each step is ComfyUI's own CLIP encoding + encode_adm
with torch.inference_mode():
    ref_cond, ref_pooled = clip.encode_from_tokens(clip.tokenize(CAPTIONS[1]), return_pooled=True)
    ref_y = base.encode_adm(pooled_output=ref_pooled, width=96, height=80, crop_w=8, crop_h=4, target_width=64,
                            target_height=64)
    text = train_mod.text.TextConditioning(clip, base, train_mod.text.text_encoders(clip), CAPTIONS)
    ctx, y = text(torch.tensor([1, 0, 1]), torch.tensor([[80, 96, 4, 8, 64, 64]] * 3), cpu)
encode_matches = bool(torch.allclose(ctx[0], ref_cond[0], atol=1e-5) and torch.allclose(ctx[2], ref_cond[0])
                      and torch.allclose(y[0], ref_y[0], atol=1e-5) and not torch.allclose(ctx[1], ctx[0]))
context_shape = list(ctx.shape)

clip_before = digest(clip_model)
unet_before = digest(base.diffusion_model)
with torch.inference_mode():
    base_cond, base_pooled = clip.encode_from_tokens(clip.tokenize(PROBE), return_pooled=True)

# the optimizer groups the trainer builds (names and learning rates at the first step)
groups_seen = []
_make = Trainer._make_optimizer


def _recording(self):
    opt = _make(self)
    groups_seen.append([(g.get("name"), g["lr"], len(g["params"])) for g in opt.param_groups])
    return opt


Trainer._make_optimizer = _recording
# the samples' conditioning: what the trained encoders give for the prompt at each sampling
sampled = []
_encode_text = train_mod.text.TextConditioning.encode_text


def _recording_text(self, text):
    out = _encode_text(self, text)
    if text == PROBE:
        sampled.append((out[0].detach().float().clone(), out[1].detach().float().clone()))
    return out


train_mod.text.TextConditioning.encode_text = _recording_text
# the one-node version (every input on it, INPUT_IS_LIST); re-allocation every 2 steps (a Rank Settings input)
# so that a 4-step run ends with learned ranks
node = train_mod.TrainLoRA2Legacy()
inputs = dict(model=patcher, clip=clip, vae=TinyVAE(), dataset_path="", instance_prompt="photo of sks toy", steps=4,
              learning_rate=1e-3, nu_learning_rate=2.0, r_init=8, r_max=16, r_target=4, q=0.9, lambda_r=0.0,
              lambda_e=0.0, seed=0, resolution=64, batch_size=2, target_modules="attn+te_attn", backend="embedded",
              output_name="te", text_encoder_lr=3e-3, aspect_buckets=False, gradient_checkpointing=True,
              captions="|".join(CAPTIONS), unique_id="5", sample_prompts=PROBE + " --w 64 --h 64 --s 1",
              sample_every_n_steps=4, resize_every=2)
with torch.inference_mode():  # as ComfyUI executes nodes (INPUT_IS_LIST: every input a list)
    res = node.run(**{k: [v] for k, v in inputs.items() if k != "images"}, images=[images])
saved_name = res["ui"]["lora2_saved"][0]
# conditioning already encoded (ComfyUI's dataset nodes) cannot train the text encoders: one line, before any work
refusal = ""
try:
    with torch.inference_mode():
        node.run(**{k: [v] for k, v in {**inputs, "output_name": "te_latents"}.items()},
                 latents=[{"samples": torch.randn(1, 4, 8, 8)}],
                 positive=[[[torch.randn(1, 77, 192), {"pooled_output": torch.randn(1, 128)}]]])
except ValueError as e:
    refusal = str(e)
clip_kept, unet_kept = digest(clip_model) == clip_before, digest(base.diffusion_model) == unet_before
saved = load_adapter(os.path.join(loras, saved_name))
te_keys = {k: m for k, m in saved.modules.items() if k.startswith(("lora_te1_", "lora_te2_"))}


def moved(prefix, layer=None):
    return [k for k, m in te_keys.items() if k.startswith(prefix)
            and (layer is None or f"_layers_{layer}_" in k) and float(m.up.float().abs().max()) > 0]


# the saved file loaded back with the pack's loader changes the CLIP's conditioning exactly as ΔW = up·down·α/r
# added to the modules the kohya names say (CLIP-L = te1, CLIP-G = te2)
with torch.inference_mode():
    reference = copy.deepcopy(clip_model)
    for key, m in te_keys.items():
        enc, rest = ("clip_l", key[len("lora_te1_"):]) if key.startswith("lora_te1_") else ("clip_g", key[9:])
        i, part, leaf = re.fullmatch(r"text_model_encoder_layers_(\d+)_(self_attn|mlp)_(\w+)", rest).groups()
        lin = reference.get_submodule(f"{enc}.transformer.text_model.encoder.layers.{i}.{part}.{leaf}")
        lin.weight.copy_((lin.weight.float() + m.delta_weight().float()).to(lin.weight.dtype))
    loaded_model, loaded_clip, _info = load_mod.LoadLoRA2Adapter().load(patcher, clip, saved_name, 1.0, 1.0)["result"]
    lora_cond, lora_pooled = loaded_clip.encode_from_tokens(loaded_clip.tokenize(PROBE), return_pooled=True)
    reference.reset_clip_options()
    expect_cond, expect_pooled = reference.encode_token_weights(clip.tokenize(PROBE))[:2]

print(json.dumps({
    "encode_matches": encode_matches, "context_shape": context_shape,
    "saved": saved_name, "num_modules": len(saved.modules),
    "te1_keys": sorted(k for k in te_keys if k.startswith("lora_te1_")),
    "te2_keys": sorted(k for k in te_keys if k.startswith("lora_te2_")),
    "te_ranks": sorted({m.rank for m in te_keys.values()}),
    "all_ranks": sorted({m.rank for m in saved.modules.values()}),
    "te1_moved": len(moved("lora_te1_")), "te2_moved": len(moved("lora_te2_")),
    "te1_last_layer_moved": len(moved("lora_te1_", 2)),
    "groups": groups_seen[0] if groups_seen else None,
    "config_te_lr": json.loads(saved.metadata["lora2_config"]).get("text_encoder_lr"),
    "config_targets": json.loads(saved.metadata["lora2_config"]).get("targets"),
    "clip_kept": clip_kept, "unet_kept": unet_kept,
    "loaded_clip_patches": len(loaded_clip.patcher.patches),
    "cond_change": float((lora_cond - base_cond).abs().max()),
    "pooled_change": float((lora_pooled - base_pooled).abs().max()),
    "cond_vs_reference": float((lora_cond - expect_cond).abs().max()),
    "pooled_vs_reference": float((lora_pooled - expect_pooled).abs().max()),
    "info": res["result"][4], "refusal": refusal,
    "samples_shape": list(res["result"][5].shape), "sampled_encodings": len(sampled),
    "sample_cond_vs_reference": float((sampled[-1][0] - expect_cond.float()).abs().max()) if sampled else None,
    "sample_cond_vs_base": float((sampled[-1][0] - base_cond.float()).abs().max()) if sampled else None,
    "refused_nothing_written": not any(n.startswith("te_latents") for n in os.listdir(loras)),
}))
