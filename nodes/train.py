"""Train LoRA² (SDXL): learn an adaptive-rank LoRA on a folder of images, inside ComfyUI or via sd-scripts.

Embedded backend: images (fitted to aspect-ratio buckets) → VAE latents (scaled
by the model's latent format), encoded once per run and kept on disk
(``cache_to_disk``, :mod:`lora2_train.cache`) for later runs; captions → CLIP (cond +
pooled, SDXL ADM vector with the real original size and crop offset from the
model's own ``encode_adm``) — or latents and conditioning made by ComfyUI's own
dataset nodes — then ``lora2_train.trainer.Trainer`` runs L_MSE + λ_r·L_reg +
λ_e·L_entropy (spec §3) on ``model.model.diffusion_model`` with the prediction
type (ε or v) and discrete noise schedule of the model's ``model_sampling``.
The base weights are never written; the result is applied through ModelPatcher
patches.  Other models are unloaded through ComfyUI's model management first.
Text-encoder targets (``te_attn``/``te_mlp``): LoRA² layers also wrap the Linear
layers of the CLIP's two encoders (CLIP-L → ``lora_te1_``, CLIP-G → ``lora_te2_``),
and each step recomputes the captions' conditioning through them with gradients
(:class:`_TextConditioning`); their weights train at ``text_encoder_lr``.
Samples every ``sample_every_n_steps`` steps: the prompt lines (sd-scripts'
syntax, ``lora2_train.sample_prompts``) are encoded with the node's CLIP before
training (when the text encoders train: at each sampling, through them); the trainer's ``on_sample`` hook samples them with ComfyUI's own
``comfy.sample.sample`` on the MODEL being trained (its U-Net carries the LoRA²
network) and decodes them with the node's VAE, without effect on training.

sd-scripts backend: ``lora2_train.kohya.launch.train_sd_scripts`` in a
subprocess (``num_processes`` > 1: ``accelerate launch --multi_gpu``), with
sample prompts every N steps and
sd-scripts' training state kept on Cancel and at the end (``resume_from``).

Either backend returns its samples as the ``samples`` IMAGE (step, then prompt
order) and adds the newest ones to the live chart's progress messages.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time

from . import _pack  # noqa: F401  (puts lora2_train on sys.path inside ComfyUI)
from . import _comfy
from lora2_train.config import LoRA2Config as _DEFAULTS  # noqa: E402  (widget defaults: one place)

NONE = "(none)"
BACKENDS = ("embedded", "sd-scripts")
PRECISIONS = ("bf16", "fp16", "no")
#: sd-scripts' sample samplers (lora2_train.kohya.launch.SAMPLERS; kept here so the node lists them without
#: importing the launcher at ComfyUI start)
SAMPLERS = ("euler_a", "euler", "ddim", "pndm", "lms", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
            "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a")
#: the `samples` output when there are none (embedded backend, no prompts, nothing written): one black 64×64
#: image, which every IMAGE consumer accepts (an empty batch breaks Preview/Save Image)
PLACEHOLDER_SIZE = 64


def _checkpoint_names() -> list[str]:
    try:
        import folder_paths
    except ImportError:
        return []
    return folder_paths.get_filename_list("checkpoints")


def _optimizers() -> list[str]:
    from lora2_train.optim import OPTIMIZERS

    return ["adamw"] + [o for o in OPTIMIZERS if o != "adamw"]


def _vram_presets() -> list[str]:
    from lora2_train.kohya.launch import VRAM_PRESETS

    return list(VRAM_PRESETS)


def _sampler_map() -> str:
    from lora2_train.sample_prompts import COMFY_SAMPLERS

    return ", ".join(f"{k}→{v}" for k, v in COMFY_SAMPLERS.items() if not k.startswith("k_"))


def _presets() -> list[str]:
    from lora2_train.config import TARGET_PRESETS

    return list(TARGET_PRESETS) + list(TEXT_ENCODER_CHOICES)


#: `target_modules` choices that add LoRAs on SDXL's two text encoders (CLIP-L: lora_te1_, CLIP-G: lora_te2_) to
#: the paper's attention targets; they train at `text_encoder_lr`
TEXT_ENCODER_CHOICES = {
    "attn+te_attn": "attn1,attn2,te_attn",
    "attn+te_attn+te_mlp": "attn1,attn2,te_attn,te_mlp",
}


def _targets(target_modules: str) -> str:
    """The node's `target_modules` choice as LoRA2Config targets (a preset name or a comma list of groups)."""
    return TEXT_ENCODER_CHOICES.get(target_modules, target_modules)


#: inputs that stay lists (ComfyUI passes every input as a list to an INPUT_IS_LIST node)
LIST_INPUTS = ("images", "captions", "latents", "positive")


class TrainLoRA2:
    CATEGORY = "LoRA²"
    RETURN_TYPES = ("MODEL", "CLIP", "LORA2", "LORA2_HISTORY", "STRING", "IMAGE")
    RETURN_NAMES = ("model", "clip", "lora2", "rank_history", "info", "samples")
    FUNCTION = "run"
    OUTPUT_NODE = True
    # image / text / latent lists of ComfyUI's dataset nodes arrive whole, in one call
    INPUT_IS_LIST = True
    DESCRIPTION = ("Train an SDXL LoRA whose rank is learned per layer (LoRA²), save it into the loras folder "
                   "and return the model with it applied.")

    @classmethod
    def INPUT_TYPES(cls):
        from lora2_train.config import LOSS_TYPES, LoRA2Config as D
        from lora2_train.lr_schedule import LR_SCHEDULERS

        return {
            "required": {
                "model": ("MODEL",),
                "clip": ("CLIP",),
                "vae": ("VAE",),
                "dataset_path": ("STRING", {"default": "", "tooltip": "folder of images; name.txt beside "
                                            "name.png is its caption (else the instance prompt)"}),
                "instance_prompt": ("STRING", {"default": "photo of sks person", "multiline": False}),
                "steps": ("INT", {"default": 500, "min": 1, "max": 100000}),
                "learning_rate": ("FLOAT", {"default": D.lr, "min": 1e-7, "max": 1.0, "step": 1e-6,
                                            "round": False}),
                "nu_learning_rate": ("FLOAT", {"default": D.nu_lr, "min": 0.0, "max": 10.0, "step": 1e-4,
                                               "round": False, "tooltip": "learning rate of the rank "
                                               "parameters; 0: 25 × learning_rate, which keeps the ranks' "
                                               "pace matched to the weights' at any learning rate"}),
                "r_init": ("INT", {"default": D.r_init, "min": 1, "max": 4096, "tooltip": "rank of every module "
                                   "at step 0"}),
                "r_max": ("INT", {"default": D.r_max, "min": 1, "max": 4096, "tooltip": "no module grows beyond"}),
                "r_target": ("INT", {"default": D.r_target, "min": 1, "max": 4096, "tooltip": "rank the modules "
                                     "the data does not need settle at (L_reg's rank term pulls toward it)"}),
                "q": ("FLOAT", {"default": D.q, "min": 0.01, "max": 0.999, "step": 0.01}),
                "lambda_r": ("FLOAT", {"default": D.lambda_r, "min": 0.0, "max": 1000.0, "step": 0.01, "round": False}),
                "lambda_e": ("FLOAT", {"default": D.lambda_e, "min": 0.0, "max": 1000.0, "step": 0.01, "round": False}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF}),
                "resolution": ("INT", {"default": 1024, "min": 64, "max": 4096, "step": 8}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
                "target_modules": (_presets(), {"default": "attn"}),
                "backend": (list(BACKENDS), {"default": "embedded"}),
                "output_name": ("STRING", {"default": "lora2_sdxl"}),
            },
            "optional": {
                "images": ("IMAGE",),
                "captions": ("STRING", {"default": "", "tooltip": "with images: one caption for all, or one "
                                        "per image separated by |"}),
                "sd_scripts_path": ("STRING", {"default": ""}),
                "python_path": ("STRING", {"default": ""}),
                "base_checkpoint": ([NONE] + _checkpoint_names(), {"default": NONE}),
                "resume_from": ("STRING", {"default": "", "tooltip": "embedded: checkpoint.pt of an earlier run; "
                                           "sd-scripts: its state folder (<name>-step<N>-state beside the "
                                           "adapter, written on Cancel, or <name>-state at the end)"}),
                "num_processes": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "sd-scripts: one training "
                                          "process per GPU (accelerate launch --multi_gpu)"}),
                "sample_prompts": ("STRING", {"default": "", "multiline": True, "tooltip": "one prompt per line, "
                                              "sd-scripts options may follow: --w 512 --h 512 (size) --s 12 "
                                              "(steps) --l 5 (cfg) --d 1 (seed) --n blurry (negative prompt); "
                                              "embedded backend: defaults 512×512, 12 steps, cfg 5, the node's "
                                              "seed, also --ss <sampler>; images are returned as `samples` and "
                                              "shown in the chart"}),
                "sample_every_n_steps": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": "sample the "
                                                 "prompts every N optimizer steps (0: no samples); embedded: with "
                                                 "ComfyUI's sampler on the model being trained, without effect on "
                                                 "the training"}),
                "sample_sampler": (list(SAMPLERS), {"default": "euler_a", "tooltip": "sd-scripts sampler names; "
                                   "embedded backend: ComfyUI's sampler of the same kind with scheduler normal ("
                                   + _sampler_map() + ")"}),
                "gradient_checkpointing": ("BOOLEAN", {"default": True, "tooltip": "recompute UNet blocks in the "
                                                       "backward pass: far less memory, about 30% more time"}),
                "optimizer": (_optimizers(), {"default": "adamw", "tooltip": "adamw8bit needs bitsandbytes, "
                              "prodigy prodigyopt (learning_rate 1.0), lion lion-pytorch; ν keeps nu_learning_rate"}),
                "mixed_precision": (list(PRECISIONS), {"default": "bf16", "tooltip": "sd-scripts backend (the "
                                    "embedded backend follows the model's dtype)"}),
                "fp8_base": ("BOOLEAN", {"default": False, "tooltip": "sd-scripts backend: base U-Net in fp8"}),
                "full_bf16": ("BOOLEAN", {"default": False, "tooltip": "sd-scripts backend: LoRA weights and "
                              "gradients in bf16 (ν stays float32); needs mixed_precision bf16"}),
                "preset": (["none", *_vram_presets()], {"default": "none", "tooltip": "sd-scripts backend: GPU "
                           "memory preset; replaces resolution, batch_size, gradient_checkpointing, optimizer, "
                           "mixed_precision, fp8_base, full_bf16 and max_params, and caches latents on disk"}),
                "max_params_millions": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10000.0, "step": 0.1,
                                        "round": False, "tooltip": "cap on the LoRA parameters while training, "
                                        "positions allotted by importance; 0: none"}),
                "gradient_accumulation_steps": ("INT", {"default": 1, "min": 1, "max": 1024, "tooltip":
                                                        "micro-batches of batch_size per optimizer step"}),
                "max_grad_norm": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1000.0, "step": 0.01, "tooltip":
                                            "clip the gradient norm (0 = off)"}),
                "lr_scheduler": (list(LR_SCHEDULERS), {"default": "constant"}),
                "lr_warmup_steps": ("INT", {"default": 0, "min": 0, "max": 100000}),
                "text_encoder_lr": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 1e-6, "round": False,
                                              "tooltip": "learning rate of the text-encoder LoRAs (target_modules "
                                              "with te_attn; both backends); 0 = learning_rate"}),
                "min_snr_gamma": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip":
                                            "min-SNR-γ loss weighting (0 = off; 5 is usual)"}),
                "noise_offset": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01}),
                "loss_type": (list(LOSS_TYPES), {"default": "mse"}),
                "huber_c": ("FLOAT", {"default": 0.1, "min": 0.001, "max": 10.0, "step": 0.001, "round": False,
                                      "tooltip": "pseudo-Huber threshold (loss_type huber)"}),
                "save_every_n_steps": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip":
                                               "also save <name>_step<k>.safetensors every k steps (0 = off)"}),
                "aspect_buckets": ("BOOLEAN", {"default": True, "tooltip": "train each image at the bucket of "
                                               "about resolution² pixels nearest its aspect ratio (else a square crop)"}),
                "min_bucket_reso": ("INT", {"default": 256, "min": 64, "max": 8192, "step": 64}),
                "max_bucket_reso": ("INT", {"default": 2048, "min": 64, "max": 8192, "step": 64}),
                "cache_to_disk": ("BOOLEAN", {"default": True, "tooltip": "embedded backend: keep the VAE latents "
                                  "and caption embeddings in output/lora2_cache, keyed by the pixels, captions, "
                                  "encoders and seed, so a later run on the same data skips encoding"}),
                "latents": ("LATENT", {"tooltip": "latents of ComfyUI's dataset nodes (MakeTrainingDataset, "
                                       "ResolutionBucket) or a LATENT batch, instead of the images"}),
                "positive": ("CONDITIONING", {"tooltip": "with latents: their text conditioning (one per latent "
                                              "or one for all)"}),
                "beta": ("FLOAT", {"default": D.beta, "min": 0.0, "max": 1e9, "step": 100.0, "round": False,
                                   "tooltip": "weight term β of L_reg (price of LoRA weight per element, relative "
                                   "to the starting loss): raising it drops weak rank positions, so ranks and the "
                                   "file get smaller; lowering it keeps more"}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    # ---------------------------------------------------------------------------------------------
    def run(self, **inputs):
        """ComfyUI entry (INPUT_IS_LIST): every input arrives as a list; all but :data:`LIST_INPUTS` hold one
        value."""
        kwargs = {}
        for k, v in inputs.items():
            if k in LIST_INPUTS:
                kwargs[k] = v
            elif isinstance(v, list):
                if len(v) != 1:
                    raise ValueError(f"Train LoRA² (SDXL): input {k!r} got a list of {len(v)} values; it takes one")
                kwargs[k] = v[0]
            else:
                kwargs[k] = v
        if isinstance(kwargs.get("captions"), list) and len(kwargs["captions"]) == 1:
            kwargs["captions"] = kwargs["captions"][0]
        for k in ("images", "latents", "positive"):  # lists of one unconnected input: None
            if isinstance(kwargs.get(k), list) and all(v is None for v in kwargs[k]):
                kwargs[k] = None
        return self.train(**kwargs)

    def train(self, model, clip, vae, dataset_path, instance_prompt, steps, learning_rate, nu_learning_rate,
              r_init, r_max, r_target, q, lambda_r, lambda_e, seed, resolution, batch_size, target_modules,
              backend, output_name, images=None, captions="", sd_scripts_path="", python_path="",
              base_checkpoint=NONE, resume_from="", gradient_checkpointing=True, optimizer="adamw",
              mixed_precision="bf16", fp8_base=False, full_bf16=False, max_params_millions=0.0, preset="none",
              gradient_accumulation_steps=1, max_grad_norm=1.0, lr_scheduler="constant", lr_warmup_steps=0,
              text_encoder_lr=0.0, min_snr_gamma=0.0, noise_offset=0.0, loss_type="mse", huber_c=0.1,
              save_every_n_steps=0,
              aspect_buckets=True, min_bucket_reso=256, max_bucket_reso=2048, cache_to_disk=True, latents=None,
              positive=None, num_processes=1, sample_prompts="", sample_every_n_steps=0, sample_sampler="euler_a",
              beta=_DEFAULTS.beta, unique_id=None):
        import folder_paths

        from lora2_train.config import LoRA2Config

        from .tools import free_path

        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        use_preset = False
        if preset not in (None, "", "none"):
            from lora2_train.kohya.launch import vram_preset

            if backend != "sd-scripts":
                raise ValueError(f"preset {preset!r}: GPU memory presets are for the sd-scripts backend")
            p = vram_preset(preset)
            resolution, batch_size, optimizer = p["resolution"], p["batch_size"], p["optimizer"]
            gradient_checkpointing, mixed_precision = p["gradient_checkpointing"], p["mixed_precision"]
            fp8_base, full_bf16, max_params_millions = p["fp8_base"], p["full_bf16"], p["max_params"] / 1e6
            use_preset = True
        if latents is not None and backend != "embedded":
            raise ValueError("latents: the latents/positive inputs train with the embedded backend only")
        config = LoRA2Config(q=float(q), r_init=int(r_init), r_target=int(r_target), r_max=int(r_max),
                             lambda_r=float(lambda_r), lambda_e=float(lambda_e), lr=float(learning_rate),
                             beta=float(beta),
                             nu_lr=float(nu_learning_rate), steps=int(steps), batch_size=int(batch_size),
                             seed=int(seed), targets=_targets(target_modules),
                             text_encoder_lr=float(text_encoder_lr),
                             checkpoint_every=max(1, min(100, int(steps))),
                             gradient_checkpointing=bool(gradient_checkpointing), optimizer=optimizer,
                             max_params=int(round(float(max_params_millions) * 1e6)),
                             # the embedded backend picks its precision from the model (see _run_trainer)
                             mixed_precision=mixed_precision if backend == "sd-scripts" else "no",
                             gradient_accumulation_steps=int(gradient_accumulation_steps),
                             max_grad_norm=float(max_grad_norm), lr_scheduler=lr_scheduler,
                             lr_warmup_steps=int(lr_warmup_steps), min_snr_gamma=float(min_snr_gamma),
                             noise_offset=float(noise_offset), loss_type=loss_type, huber_c=float(huber_c),
                             save_every_n_steps=int(save_every_n_steps))
        buckets = None
        if aspect_buckets:
            from lora2_train.dataset import bucket_sizes

            buckets = bucket_sizes(int(resolution), int(min_bucket_reso), int(max_bucket_reso))
        lora_dir = folder_paths.get_folder_paths("loras")[0]
        out = free_path(lora_dir, output_name)  # a taken name gets _2, _3 …: queuing a run twice never fails
        if backend == "embedded" and int(num_processes) != 1:
            raise ValueError("num_processes > 1 needs backend sd-scripts (the embedded backend trains in one "
                             "process)")
        if int(sample_every_n_steps) < 0:
            raise ValueError(f"sample_every_n_steps must be at least 0, got {sample_every_n_steps}")
        run = _Run(unique_id, config.steps)
        samples = []
        if backend == "sd-scripts":
            from lora2_train.kohya.launch import cache_options, precision_options

            extra = precision_options(bool(fp8_base), bool(full_bf16))
            if use_preset:
                extra.update(cache_options(config))
            adapter, history, samples = self._train_sd_scripts(
                config, out, dataset_path, images, captions, instance_prompt, resolution, sd_scripts_path,
                python_path, base_checkpoint, run, extra, resume_from=resume_from, num_processes=int(num_processes),
                sample_prompts=sample_prompts, sample_every=int(sample_every_n_steps), sample_sampler=sample_sampler)
        else:
            adapter, history, samples = self._train_embedded(
                model, clip, vae, config, out, dataset_path, images, captions, instance_prompt, resolution,
                resume_from, run, buckets, latents, positive, sample_prompts=sample_prompts,
                sample_every=int(sample_every_n_steps), sample_sampler=sample_sampler,
                cache_to_disk=bool(cache_to_disk))
        out = run.saved_as or out
        from .load import patch_with_adapter

        model_out, clip_out = patch_with_adapter(model, clip, adapter, 1.0, 1.0, out.name)
        ranks = adapter.ranks()
        info = _info_line(out, output_name, adapter, history, run)
        run.send(status="done", saved=out.name, ranks_by_block=_block_means(ranks), message=info,
                 **run.take_samples(), **run.memory())
        return {"ui": {"lora2_saved": [out.name], "text": [info]},
                "result": (model_out, clip_out, adapter, history, info, images_tensor(samples))}

    # ---------------------------------------------------------------------------------------------
    def _examples(self, dataset_path, images, captions, instance_prompt, resolution, buckets=None):
        from lora2_train import dataset as D

        if images is not None:
            batches = images if isinstance(images, (list, tuple)) else [images]
            caps = captions if isinstance(captions, (list, tuple)) else [captions]
            if len(batches) == 1:
                return D.from_images(batches[0], caps[0] if len(caps) == 1 else "\n".join(caps), resolution,
                                     instance_prompt, buckets)
            if len(caps) not in (1, len(batches)):
                raise D.DatasetError(f"captions: {len(caps)} captions for {len(batches)} images; give one per "
                                     f"image or one for all")
            out = []
            for i, batch in enumerate(batches):
                for ex in D.from_images(batch, caps[i if len(caps) > 1 else 0], resolution, instance_prompt,
                                        buckets):
                    ex.source = f"images[{i}]"
                    out.append(ex)
            return out
        return D.load_folder(dataset_path, resolution, instance_prompt, buckets)

    def _train_embedded(self, model, clip, vae, config, out, dataset_path, images, captions, instance_prompt,
                        resolution, resume_from, run, buckets=None, latents=None, positive=None, sample_prompts="",
                        sample_every=0, sample_sampler="euler_a", cache_to_disk=False):
        """(adapter, history, sample images): the sample images are (H, W, 3) tensors, step then prompt order."""
        import torch

        import comfy.model_management as mm

        prompts = []
        if sample_every > 0:
            from lora2_train.sample_prompts import DEFAULT_CFG, DEFAULT_SIZE, DEFAULT_STEPS, parse_prompts

            prompts = parse_prompts(sample_prompts, width=DEFAULT_SIZE, height=DEFAULT_SIZE, steps=DEFAULT_STEPS,
                                    cfg=DEFAULT_CFG, seed=config.seed, sampler=sample_sampler)
            if clip is None or vae is None:
                raise ValueError("sample_prompts: samples need the clip and vae inputs connected")

        base = model.model
        if not hasattr(base, "encode_adm") or base.encode_adm(pooled_output=torch.zeros(1, 1280), width=8,
                                                               height=8) is None:
            raise ValueError("Train LoRA² (SDXL): the MODEL input is not an SDXL-family model")
        config.prediction_type, config.zero_terminal_snr, sampling = _prediction_of(model)
        config.validate()
        text_encoders = None
        if _trains_text_encoders(config):
            if latents is not None:
                raise ValueError("target_modules: text-encoder targets recompute the captions' conditioning every "
                                 "step; give the captioned images (dataset_path or images), not latents + positive")
            text_encoders = _text_encoders(clip)
        if resume_from and not os.path.isfile(resume_from):
            raise FileNotFoundError(f"resume_from: {resume_from}: no such checkpoint file")
        if latents is None:
            examples = self._examples(dataset_path, images, captions, instance_prompt, resolution, buckets)
            pixels = max(ex.target_size[0] * ex.target_size[1] for ex in examples)
        else:
            lats = latents if isinstance(latents, (list, tuple)) else [latents]
            pixels = max((int(d["samples"].shape[-2]) * int(d["samples"].shape[-1]) * 64 for d in lats
                          if isinstance(d, dict) and isinstance(d.get("samples"), torch.Tensor)), default=0)
        _free_memory()  # other models out of the way (VAE and CLIP load on their own for encoding)
        # fail before encoding and loading when the run cannot fit on the GPU (rough estimate; CPU: no check)
        _check_memory(base, config, pixels, getattr(model, "load_device", None) or mm.get_torch_device(),
                      text_encoders=text_encoders or ())
        if latents is not None:
            data = _data_from_latents(base, latents, positive)
        else:
            # under ComfyUI's inference mode, once per run; captions too unless the text encoders train
            from lora2_train.cache import EncodeCache

            cache = EncodeCache(_cache_dir() if cache_to_disk else None)
            data = self._encode(base, clip, vae, examples, captions_only=text_encoders is not None, seed=config.seed,
                                cache=cache)
            if cache.root is not None:
                run.cache_report = cache.report()
                logging.info("Train LoRA²: encoded data (%s): %s", cache.root, run.cache_report)
        # before training (the text encoders are unloaded next); when they train, the sampler encodes anew
        conds = _encode_prompts(clip, prompts) if text_encoders is None else None
        with torch.inference_mode(False):  # copies usable by autograd
            data = [{"latents": d["latents"].clone(), "cond": {k: v.clone() for k, v in d["cond"].items()}}
                    for d in data]
        _free_memory()  # the encoders' memory back before the UNet is loaded for training

        device = getattr(model, "load_device", None) or mm.get_torch_device()
        unet = base.diffusion_model
        text = None
        if text_encoders is not None:
            _load_for_training(model, clip.patcher)  # the CLIP runs in every step
            clip_device = getattr(clip.patcher, "load_device", device)
            if torch.device(clip_device) != torch.device(device):
                raise ValueError(f"target_modules: text-encoder training needs the CLIP on the training device "
                                 f"{device}, but ComfyUI loads it on {clip_device} (low-VRAM mode?); train the text "
                                 f"encoders with backend sd-scripts, or choose U-Net targets")
            text = _TextConditioning(clip, base, text_encoders, list(dict.fromkeys(ex.caption for ex in examples)))
        else:
            _load_for_training(model)
        sampler = _Sampler(model, vae, prompts, conds, run, out.stem, text=text) if prompts else None
        with torch.inference_mode(False), torch.enable_grad():
            adapter, history = self._run_trainer(base, unet, data, config, out, device, resume_from, run, sampling,
                                                 text=text, sampler=sampler, sample_every=sample_every)
        return adapter, history, sampler.images if sampler is not None else []

    def _encode(self, base, clip, vae, examples, captions_only=False, seed=0, cache=None):
        """(latents, context, y) per example: VAE latents scaled by the latent format; CLIP cond + pooled;
        SDXL ADM vector (pooled ‖ original size, crop offset, target size embeddings) from the model's own
        encode_adm.  `captions_only` (text-encoder training): the conditioning is the example's caption index
        and its (original size, crop offset, target size), encoded in every step by :class:`_TextConditioning`.

        ComfyUI's VAE encode draws from the latent distribution with the global generator: each image is
        encoded under a generator state forked and seeded from the run's `seed`, its pixels and how often the
        same pixels came before in this run (the same images and seed give the same latents, two copies of an
        image two draws; the caller's random state is left as it was).  `cache`
        (:class:`lora2_train.cache.EncodeCache`) keeps the VAE's output per (VAE, pixels, seed, copy) and the
        CLIP's per (CLIP, tokens) on disk, so a later run on the same data skips the encoders."""
        import torch

        from lora2_train.cache import EncodeCache, digest

        cache = cache if cache is not None else EncodeCache(None)
        vae_key = _vae_fingerprint(vae) if cache.root is not None else None
        copies: dict[str, int] = {}
        latents = []
        for ex in examples:
            pixels = ex.image.permute(1, 2, 0)[None]  # (1, H, W, 3): ComfyUI's IMAGE layout
            content = digest("pixels", pixels)
            n = copies[content] = copies.get(content, -1) + 1
            key = digest("latent", vae_key, content, int(seed), n)
            hit = cache.get("latents", key)  # (no cache: always None; put writes nothing)
            if hit is not None:
                raw = hit["latent"]
            else:
                with _seeded(int(digest("vae-seed", int(seed), content, n)[:15], 16)):
                    raw = vae.encode(pixels).float().cpu()
                cache.put("latents", key, {"latent": raw})
            latents.append(base.process_latent_in(raw).float()[0])
        if captions_only:
            captions: dict[str, int] = {}
            return [{"latents": lat, "cond": {"caption": torch.tensor(captions.setdefault(ex.caption, len(captions))),
                                              "size": torch.tensor(_size_of(ex))}}
                    for ex, lat in zip(examples, latents)]
        clip_key = _clip_fingerprint(clip) if cache.root is not None else None
        texts = {}
        for caption in dict.fromkeys(ex.caption for ex in examples):
            tokens = clip.tokenize(caption)
            try:
                key = digest("text", clip_key, tokens)
            except TypeError:  # tokens of a kind the key cannot hold: encoded, not kept
                key = None
            hit = cache.get("text", key) if key is not None else None
            if hit is None:
                cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
                hit = {"cond": cond[0].float().cpu(), "pooled": pooled.float().cpu()}
                if key is not None:
                    cache.put("text", key, hit)
            texts[caption] = (hit["cond"], hit["pooled"])
        return [{"latents": lat, "cond": {"context": texts[ex.caption][0],
                                          "y": _adm(base, texts[ex.caption][1], _size_of(ex)).float().cpu()}}
                for ex, lat in zip(examples, latents)]

    def _run_trainer(self, base, unet, data, config, out, device, resume_from, run, sampling=None, text=None,
                     sampler=None, sample_every=0):
        """Train; `text` (text-encoder targets) recomputes the conditioning in every step; `sampler` (called with
        the step) draws samples every `sample_every` steps."""
        import torch

        import comfy.model_management as mm
        from lora2_train.format import adapter_from_network, save_adapter
        from lora2_train.network import LoRA2Network
        from lora2_train.trainer import Trainer

        from .tools import free_path

        schedule = _schedule_of(base, sampling)
        run.watch_memory(device)
        dtype = getattr(base, "manual_cast_dtype", None) or base.get_dtype()
        if torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16):
            # a half-precision UNet: autocast to its dtype (and loss scaling for fp16), LoRA weights stay fp32
            config.mixed_precision = "fp16" if dtype == torch.float16 else "bf16"
            config.validate()
        ckpt_dir = _checkpoint_dir(out)
        encoders = list(text.encoders) if text is not None else []
        flags = []
        for root in [unet, *encoders]:
            _autograd_usable(root)
            flags += [(p, p.requires_grad) for p in root.parameters()]
        for p, _ in flags:
            if p.requires_grad:
                p.requires_grad_(False)
        network = LoRA2Network(config, unet=unet, text_encoders=encoders)
        network.to(device)
        network.apply_to()
        history: list[dict] = []

        def callback(ev):
            run.step(ev)
            if ev.step == 1 or ev.resized or ev.step % config.resize_every == 0 or ev.step == ev.total:
                history.append({"step": ev.step, "ranks": dict(ev.ranks), "loss": float(ev.loss)})

        stamp = {"lora2_trained_with": "embedded"}

        def snapshot(k):  # the adapter of step k, before any re-allocation, atomic like the final file
            ad = adapter_from_network(network, config, base_model=_base_model_name(base))
            ad.metadata.update(stamp, lora2_steps=str(k), lora2_snapshot="true")
            path = free_path(str(out.parent), f"{out.stem}_step{k}")
            save_adapter(ad, path)
            run.snapshots.append(path.name)
            logging.info("Train LoRA²: step %d saved as %s", k, path.name)

        unet_call = _UNetCall(unet, dtype) if text is None else _TextUNetCall(unet, dtype, text)
        trainer = Trainer(unet_call, network, data, config, schedule=schedule, out_dir=ckpt_dir,
                          callback=callback, should_stop=mm.processing_interrupted, device=device,
                          entropy_root=unet, on_save=snapshot, on_sample=sampler,
                          sample_every=int(sample_every) if sampler is not None else 0)
        try:
            with _autograd_attention(), _norm_inputs_copied(unet, *encoders), _cancel_at_step_boundaries():
                result = trainer.train(resume_from=resume_from or None)
        finally:
            unet_call.disable_gradient_checkpointing()
            network.restore()
            _restore_flags(flags)
        adapter = adapter_from_network(network, config, base_model=_base_model_name(base))
        adapter.metadata.update(stamp, lora2_steps=str(result.steps))
        if not history or history[-1]["step"] != result.steps:
            loss = float(result.last.loss) if result.last is not None else float("nan")
            history.append({"step": result.steps, "ranks": dict(result.ranks), "loss": loss})
        if result.stopped:
            partial = free_path(str(out.parent), f"{out.stem}_step{result.steps}")
            adapter.metadata["lora2_interrupted"] = "true"
            save_adapter(adapter, partial)
            msg = (f"Train LoRA²: cancelled at step {result.steps}/{config.steps}; adapter so far saved as "
                   f"{partial.name}, resumable checkpoint {result.checkpoint}")
            logging.warning(msg)
            run.send(status="interrupted", message=msg, saved=partial.name, checkpoint=str(result.checkpoint),
                     **run.memory())
            mm.throw_exception_if_processing_interrupted()
            raise mm.InterruptProcessingException()  # the flag was cleared elsewhere: still report it
        try:
            save_adapter(adapter, out)
        except FileExistsError:  # the name was taken while this run trained: the next free one
            out = free_path(str(out.parent), out.stem)
            save_adapter(adapter, out)
        run.saved_as = out
        logging.info("Train LoRA²: saved %s (%d modules, %d parameters)", out, len(adapter.modules),
                     adapter.num_parameters())
        return adapter, history

    # ---------------------------------------------------------------------------------------------
    def _train_sd_scripts(self, config, out, dataset_path, images, captions, instance_prompt, resolution,
                          sd_scripts_path, python_path, base_checkpoint, run, extra_options=None, resume_from="",
                          num_processes=1, sample_prompts="", sample_every=0, sample_sampler="euler_a"):
        import comfy.model_management as mm
        import folder_paths

        from lora2_train.format import load_adapter

        if base_checkpoint in (None, "", NONE):
            raise ValueError("base_checkpoint: choose the SDXL checkpoint sd-scripts should train on")
        ckpt = folder_paths.get_full_path("checkpoints", base_checkpoint)
        if ckpt is None:
            raise FileNotFoundError(f"base_checkpoint {base_checkpoint!r} not found in ComfyUI's checkpoints folders")
        from lora2_train.kohya.launch import (TrainingCancelled, check_sd_scripts, check_state_dir,
                                              sample_images, sample_prompt_lines, train_sd_scripts)

        check_sd_scripts(sd_scripts_path)  # one line naming the folder when it is not a usable checkout
        if resume_from:
            check_state_dir(resume_from)
        if sample_every > 0:
            sample_prompt_lines(sample_prompts)  # one line when there is no prompt
        started = time.time()
        # sample images already there (an earlier, cancelled run of a resumed one) are not this run's, even
        # when written within the mtime slack of `since`
        earlier = {p.name for p in sample_images(out.parent, out.stem)}

        with tempfile.TemporaryDirectory(prefix="lora2_data_") as tmp:
            folder = dataset_path
            if images is not None:
                folder = _write_image_folder(self._examples("", images, captions, instance_prompt, resolution),
                                             tmp)
            else:
                self._examples(dataset_path, None, "", instance_prompt, resolution)  # validate early, one line
            history: list[dict] = []
            shown: set[str] = set(earlier)

            def callback(ev):
                if sample_every > 0:  # sample images sd-scripts wrote since the last step: to the chart
                    run.new_samples = _sd_scripts_sample_refs(out, started, shown) or run.new_samples
                run.step(ev)
                if ev.step == 1 or ev.resized or ev.step % config.resize_every == 0 or ev.step == ev.total:
                    history.append({"step": ev.step, "ranks": dict(ev.ranks), "loss": float(ev.loss)})

            try:
                path = train_sd_scripts(sd_scripts_path, ckpt, folder, str(out.parent), out.stem, config,
                                        config.steps, int(resolution), config.batch_size, config.seed,
                                        python=python_path or None, callback=callback,
                                        should_stop=mm.processing_interrupted,
                                        save_every=config.save_every_n_steps or None,
                                        extra_options={**_sd_scripts_options(config), **(extra_options or {})},
                                        num_processes=num_processes,
                                        sample_prompts=sample_prompts if sample_every > 0 else None,
                                        sample_every=sample_every or None, sample_sampler=sample_sampler,
                                        resume_from=resume_from or None, save_state=True)
            except TrainingCancelled as e:
                msg = f"Train LoRA² (sd-scripts): cancelled; {e}"
                if e.state is not None:
                    msg += f" (set resume_from to {e.state} to continue)"
                logging.warning(msg)
                run.send(status="interrupted", message=msg, checkpoint=str(e.state) if e.state else None)
                mm.throw_exception_if_processing_interrupted()
                raise mm.InterruptProcessingException() from None
        if sample_every > 0:  # written after the last progress line: with the final message
            run.new_samples = run.new_samples + _sd_scripts_sample_refs(out, started, shown)
        adapter = load_adapter(path)
        if not history:
            history.append({"step": config.steps, "ranks": adapter.ranks(), "loss": float("nan")})
        ours = [p for p in sample_images(out.parent, out.stem, since=started) if p.name not in earlier]
        return adapter, history, ours


# ---- helpers (ComfyUI glue only) -----------------------------------------------------------------
class _UNetCall:
    """ε̂ = diffusion_model(x_t, t, context, y) in the model's compute dtype, returned in float32."""

    BLOCKS = ("BasicTransformerBlock", "ResBlock")

    def __init__(self, unet, dtype):
        self.unet, self.dtype = unet, dtype
        self._patched = []

    def __call__(self, x_t, t, context, y):
        d = self.dtype
        return self.unet(x_t.to(d), t.float(), context=context.to(d), y=y.to(d)).float()

    def enable_gradient_checkpointing(self):
        """Run every transformer block and ResBlock under torch.utils.checkpoint (non-reentrant).  The block
        gets a copy of its input: early-2024 blocks add residuals into it in place, which would otherwise
        change the saved input before the recomputation."""
        from torch.utils.checkpoint import checkpoint

        for m in self.unet.modules():
            if type(m).__name__ not in self.BLOCKS or "forward" in m.__dict__:
                continue
            orig = m.forward

            def run(x, *args, _orig=orig, **kwargs):
                return _orig(x.clone(), *args, **kwargs)

            def forward(x, *args, _run=run, **kwargs):
                return checkpoint(_run, x, *args, use_reentrant=False, **kwargs)

            m.forward = forward
            self._patched.append(m)

    def disable_gradient_checkpointing(self):
        for m in self._patched:
            m.__dict__.pop("forward", None)
        self._patched.clear()


def _size_of(ex) -> tuple:
    """SDXL's size conditioning of an example: (original height, width, crop top, left, target height, width)."""
    (oh, ow), (top, left), (th, tw) = ex.original_size, ex.crop_top_left, ex.target_size
    return oh, ow, top, left, th, tw


def _adm(base, pooled, size):
    """The ADM vector y of one example: the model's own ``encode_adm`` of its pooled text embedding (1, C) and
    its :func:`_size_of` tuple."""
    oh, ow, top, left, th, tw = size
    return base.encode_adm(pooled_output=pooled, width=ow, height=oh, crop_w=left, crop_h=top, target_width=tw,
                           target_height=th, device=pooled.device)[0]


def _trains_text_encoders(config) -> bool:
    from lora2_train.network import TE_GROUPS

    return any(g in TE_GROUPS for g in config.targets)


def _text_encoders(clip):
    """(CLIP-L, CLIP-G) modules of an SDXL CLIP, whose Linear layers get the lora_te1_ / lora_te2_ LoRAs (the
    names ComfyUI's LoRA loader maps back onto the same modules), or a one-line error."""
    if clip is None:
        raise ValueError("clip: text-encoder targets need the CLIP input connected")
    m = clip.cond_stage_model
    encoders = (getattr(m, "clip_l", None), getattr(m, "clip_g", None))
    if any(e is None for e in encoders):
        raise ValueError(f"clip: text-encoder targets need SDXL's two text encoders (clip_l, clip_g); this CLIP is "
                         f"{type(m).__name__}")
    return encoders


class _TextConditioning:
    """The conditioning of a batch recomputed through ComfyUI's CLIP with gradients (text-encoder training):
    each caption's tokens (tokenized once) → CLIP-L ‖ CLIP-G hidden states (context) and CLIP-G's pooled
    output → the model's own ``encode_adm`` with the example's original size, crop offset and target size
    (y).  The CLIP's clip-skip setting (CLIPSetLastLayer) is honoured as in ``CLIP.encode_from_tokens``; the
    model is not (re)loaded here: ``_load_for_training`` loaded it once."""

    def __init__(self, clip, base, encoders, captions):
        self.clip, self.base, self.encoders = clip, base, encoders
        self.tokens = [clip.tokenize(c) for c in captions]

    def _encode(self, i):
        return self._encode_tokens(self.tokens[i])

    def encode_text(self, text):
        """(cond, pooled) of `text` through the encoders as they are now (with their LoRAs)."""
        return self._encode_tokens(self.clip.tokenize(text))

    def _encode_tokens(self, tokens):
        m = self.clip.cond_stage_model
        m.reset_clip_options()
        if getattr(self.clip, "layer_idx", None) is not None:
            m.set_clip_options({"layer": self.clip.layer_idx})
        # current ComfyUI runs the encoders on the patcher's device (older versions ignore the option)
        m.set_clip_options({"execution_device": self.clip.patcher.load_device})
        out = m.encode_token_weights(tokens)
        return out[0], out[1]

    def __call__(self, caption, size, device):
        """(context (B, T, C), y (B, adm)) on `device` for caption indices (B,) and sizes (B, 6)."""
        import torch

        ids = [int(i) for i in caption.tolist()]
        encoded = {i: self._encode(i) for i in dict.fromkeys(ids)}  # each caption of the batch once
        contexts, ys = [], []
        for i, hw in zip(ids, size.tolist()):
            cond, pooled = encoded[i]
            contexts.append(cond[0].to(device))
            ys.append(_adm(self.base, pooled, hw).to(device))
        return torch.stack(contexts), torch.stack(ys)


class _TextUNetCall(_UNetCall):
    """ε̂ = diffusion_model(x_t, t, context, y) with context and y recomputed from the captions in each step
    (:class:`_TextConditioning`), so the text encoders' LoRAs get gradients."""

    def __init__(self, unet, dtype, text):
        super().__init__(unet, dtype)
        self.text = text

    def __call__(self, x_t, t, caption, size):
        context, y = self.text(caption, size, x_t.device)
        return super().__call__(x_t, t, context, y)


class _Run:
    """Progress bar + live messages of one node run; the files it saved; peak device memory."""

    def __init__(self, node_id, total):
        import comfy.utils

        self.node_id, self.total = node_id, total
        self.saved_as = None  # the final file, once written
        self.cache_report = ""  # what the on-disk cache gave (lora2_train.cache.EncodeCache.report)
        self.snapshots: list[str] = []
        self.new_samples: list[dict] = []  # image references of samples not yet sent to the chart
        self.device = None
        self.bar = comfy.utils.ProgressBar(total)
        self.send(status="started", step=0)

    def watch_memory(self, device):
        """Start measuring the peak memory allocated on `device` (CUDA only)."""
        import torch

        device = torch.device(device)
        if device.type == "cuda" and torch.cuda.is_available():
            self.device = device
            torch.cuda.reset_peak_memory_stats(device)

    def memory(self) -> dict:
        """``{"peak_memory_mb": …}`` since :meth:`watch_memory` (torch.cuda.max_memory_allocated), or {}."""
        import torch

        if self.device is None:
            return {}
        return {"peak_memory_mb": round(torch.cuda.max_memory_allocated(self.device) / 2 ** 20, 1)}

    def send(self, **data):
        _comfy.send(_comfy.PROGRESS_EVENT, {"node": self.node_id, "total": self.total, **data})

    def step(self, ev):
        import comfy.model_management as mm

        try:  # ComfyUI's progress hook raises on Cancel; the trainer's should_stop handles it at the next step
            self.bar.update_absolute(ev.step, ev.total)
        except mm.InterruptProcessingException:
            mm.interrupt_current_processing(True)
        self.send(status="running", step=ev.step, loss=ev.loss, mse=ev.mse, reg=ev.reg, entropy=ev.entropy,
                  num_params=ev.num_params, elapsed=ev.elapsed, ranks_by_block=_block_means(ev.ranks), lr=ev.lr,
                  **self.take_samples(), **self.memory())

    def take_samples(self) -> dict:
        """``{"samples": [references]}`` of the samples not sent yet (drawn before this message), or {}."""
        if not self.new_samples:
            return {}
        refs, self.new_samples = self.new_samples, []
        return {"samples": refs}


class _Sampler:
    """The embedded backend's samples: called by the trainer with the step (under torch.no_grad, entropy hooks
    paused, RNG state restored afterwards), it samples every prompt with ComfyUI's ``comfy.sample.sample`` on
    the MODEL being trained (the LoRA² network patches its U-Net's module forwards), decodes with the VAE,
    keeps the images and saves them as PNG into ComfyUI's temp folder for the live chart (``/view``)."""

    SUBFOLDER = "lora2_samples"

    def __init__(self, model, vae, prompts, conds, run, name, text=None):
        import uuid

        self.model, self.vae, self.prompts, self.conds, self.run = model, vae, prompts, conds, run
        self.text = text  # text-encoder training: the prompts are encoded anew through the trained encoders
        self.name = f"{name}_{uuid.uuid4().hex[:8]}"
        self.images = []

    def _conds(self):
        """[(positive, negative)] per prompt: encoded before training, or, when the text encoders train, now
        through them (their LoRAs as trained so far), so the samples show the whole adapter."""
        if self.text is None:
            return self.conds
        return _encode_prompts(None, self.prompts, encode=self.text.encode_text)

    def __call__(self, step):
        import comfy.model_management as mm
        import comfy.sample

        latent_channels = getattr(getattr(self.model.model, "latent_format", None), "latent_channels", 4)
        refs = []
        with _keep_loaded(self.model):
            for i, (p, (positive, negative)) in enumerate(zip(self.prompts, self._conds())):
                latent = _zeros(1, latent_channels, p.height // 8, p.width // 8)
                noise = comfy.sample.prepare_noise(latent, p.seed)
                try:
                    out = comfy.sample.sample(self.model, noise, p.steps, p.cfg, p.comfy_sampler, "normal", positive,
                                              negative, latent, denoise=1.0, disable_pbar=True, seed=p.seed)
                    image = self.vae.decode(out)[0].float().cpu().clamp(0, 1)
                except mm.InterruptProcessingException:  # Cancel while sampling: training stops at the next step
                    mm.interrupt_current_processing(True)
                    break
                self.images.append(image)
                refs.append(self._save(image, step, i))
        if refs:
            self.run.new_samples = refs
            logging.info("Train LoRA²: step %d: %d sample image(s)", step, len(refs))

    def _save(self, image, step, i):
        """The image as PNG in ComfyUI's temp folder; its /view reference (None when it cannot be written)."""
        import folder_paths
        from PIL import Image

        name = f"{self.name}_{step:06d}_{i:02d}.png"
        try:
            folder = os.path.join(folder_paths.get_temp_directory(), self.SUBFOLDER)
            os.makedirs(folder, exist_ok=True)
            arr = (image * 255).round().byte().numpy()
            Image.fromarray(arr).save(os.path.join(folder, name))
        except OSError as e:  # the chart then goes without it; the image is still returned
            logging.warning("Train LoRA²: could not write sample %s: %s", name, e)
            return None
        return {"filename": name, "subfolder": self.SUBFOLDER, "type": "temp", "step": step, "prompt": i}


def _sd_scripts_sample_refs(out, since, shown: set) -> list[dict]:
    """/view references of the sample images sd-scripts wrote for this run and not shown yet (`shown`: their
    names), each copied into ComfyUI's temp folder (the loras folder is not served)."""
    import shutil

    import folder_paths
    from lora2_train.kohya.launch import sample_images

    refs = []
    for p in sample_images(out.parent, out.stem, since=since):
        if p.name in shown:
            continue
        shown.add(p.name)
        parts = p.stem[len(out.stem) + 1:].split("_")
        try:
            folder = os.path.join(folder_paths.get_temp_directory(), _Sampler.SUBFOLDER)
            os.makedirs(folder, exist_ok=True)
            shutil.copyfile(p, os.path.join(folder, p.name))
        except OSError as e:
            logging.warning("Train LoRA²: could not copy sample %s for the chart: %s", p.name, e)
            continue
        refs.append({"filename": p.name, "subfolder": _Sampler.SUBFOLDER, "type": "temp",
                     "step": int(parts[0]) if parts[0].isdigit() else parts[0],
                     "prompt": int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else len(refs)})
    return refs


def _zeros(*shape):
    import torch

    return torch.zeros(shape)


@contextlib.contextmanager
def _keep_loaded(model):
    """While sampling during training, ComfyUI's memory manager must not unload the U-Net being trained to
    make room (for the VAE): its ``free_memory`` gets the training model added to the models it keeps."""
    import comfy.model_management as mm

    original = getattr(mm, "free_memory", None)
    if original is None:
        yield
        return
    def free_memory(memory_required, device, keep_loaded=(), *args, **kwargs):
        keep = [m for m in getattr(mm, "current_loaded_models", []) if getattr(m, "model", None) is model]
        return original(memory_required, device, list(keep_loaded) + keep, *args, **kwargs)

    mm.free_memory = free_memory
    try:
        yield
    finally:
        mm.free_memory = original


def _encode_prompts(clip, prompts, encode=None):
    """[(positive, negative)] CONDITIONING per prompt, encoded now by the CLIP (or by `encode(text)` → (cond,
    pooled)), as autograd-usable CPU copies; the SDXL size conditioning is the prompt's size."""
    import torch

    if encode is None:
        def encode(text):
            return clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)

    cache, out = {}, []
    for p in prompts:
        pair = []
        for text in (p.prompt, p.negative):
            if text not in cache:
                cond, pooled = encode(text)
                with torch.inference_mode(False):
                    cache[text] = (cond.detach().cpu().clone(), pooled.detach().cpu().clone())
            cond, pooled = cache[text]
            size = {"width": p.width, "height": p.height, "target_width": p.width, "target_height": p.height,
                    "crop_w": 0, "crop_h": 0}
            pair.append([[cond, {"pooled_output": pooled, **size}]])
        out.append(tuple(pair))
    return out


def images_tensor(images, size: int = PLACEHOLDER_SIZE):
    """Image files or (H, W, 3) tensors in [0, 1] → one ComfyUI IMAGE batch (B, H, W, 3); images of another
    size than the first are resized to it (sample prompts may ask for different sizes); none → one black
    placeholder."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    if not images:
        return torch.zeros(1, size, size, 3)
    frames = []
    for p in images:
        if isinstance(p, torch.Tensor):
            frame = p.detach().float().cpu()
        else:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if frames and (im.height, im.width) != tuple(frames[0].shape[:2]):
                    im = im.resize((frames[0].shape[1], frames[0].shape[0]), Image.BICUBIC)
                frame = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
        if frames and frame.shape != frames[0].shape:
            frame = F.interpolate(frame.permute(2, 0, 1)[None], size=tuple(frames[0].shape[:2]), mode="bicubic",
                                  align_corners=False)[0].permute(1, 2, 0).clamp(0, 1)
        frames.append(frame)
    return torch.stack(frames)


def _block_means(ranks):
    from lora2_train.plot import mean_rank_by_block

    return {k: round(float(v), 3) for k, v in mean_rank_by_block(ranks).items()}


def _sd_scripts_options(config) -> dict:
    """The node's training controls as sd-scripts options (the same names; ``mse`` is sd-scripts' ``l2``, and
    its Huber threshold is held constant as in the embedded trainer)."""
    opts = {"gradient_accumulation_steps": config.gradient_accumulation_steps,
            "max_grad_norm": config.max_grad_norm, "lr_scheduler": config.lr_scheduler,
            "lr_warmup_steps": config.lr_warmup_steps or None,
            "min_snr_gamma": config.min_snr_gamma or None, "noise_offset": config.noise_offset or None,
            "loss_type": {"mse": "l2", "huber": "huber"}[config.loss_type]}
    if config.loss_type == "huber":
        opts.update(huber_c=config.huber_c, huber_schedule="constant")
    return opts


def _info_line(out, requested, adapter, history, run) -> str:
    """One line for the node's info output: the file written (and why its name differs), size, memory."""
    from lora2_train.format import output_path

    wanted = output_path(out.parent, requested).name
    text = f"saved {out.name}" + (f" ({wanted} was taken)" if wanted != out.name else "")
    text += f": {len(adapter.modules)} modules, {adapter.num_parameters():,} parameters"
    if history:
        text += f", {history[-1]['step']} steps, last loss {history[-1]['loss']:.4g}"
    if run.snapshots:
        text += f"; snapshots {', '.join(run.snapshots)}"
    if run.cache_report:
        text += f"; {run.cache_report}"
    mem = run.memory()
    if mem:
        text += f"; peak GPU memory {mem['peak_memory_mb']:.0f} MiB"
    return text


@contextlib.contextmanager
def _seeded(seed: int):
    """The global generators (CPU and every CUDA device) seeded with `seed` inside, restored afterwards."""
    import torch

    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


#: text and image the encoders' cache keys are computed from (see lora2_train.cache.encoder_fingerprint)
_PROBE_TEXT = "a photo of a red fox sitting in tall grass at sunset, 35mm, detailed fur, bokeh"


def _vae_fingerprint(vae) -> str:
    """Cache key of the VAE: its latent of a fixed 64×64 probe image, drawn under a fixed seed."""
    import torch

    from lora2_train.cache import encoder_fingerprint

    probe = (torch.arange(64 * 64 * 3, dtype=torch.float32) * 0.618034 % 1.0).reshape(1, 64, 64, 3)
    with _seeded(0):
        return encoder_fingerprint(vae.encode(probe))


def _clip_fingerprint(clip) -> str:
    """Cache key of the CLIP (with whatever LoRA is patched into it): its conditioning of a fixed probe text."""
    from lora2_train.cache import encoder_fingerprint

    cond, pooled = clip.encode_from_tokens(clip.tokenize(_PROBE_TEXT), return_pooled=True)
    return encoder_fingerprint(cond, pooled)


def _cache_dir():
    import folder_paths

    return os.path.join(folder_paths.get_output_directory(), "lora2_cache")


def _free_memory():
    """Unload every model ComfyUI holds and return cached device memory (what exists in this ComfyUI)."""
    import comfy.model_management as mm

    for name in ("unload_all_models", "soft_empty_cache"):
        fn = getattr(mm, name, None)
        if fn is not None:
            fn()


def _check_memory(base, config, pixels, device, mem_get_info=None, text_encoders=()):
    """Refuse, in one line, a CUDA run whose rough memory estimate (:mod:`lora2_train.memory`: U-Net weights,
    LoRA at r_max with gradients and optimizer state, activations of `pixels` per image at the batch size and
    gradient checkpointing) exceeds the free device memory plus what the U-Net already holds there.  With
    `text_encoders` (text-encoder targets) their weights and LoRAs count too.  Returns the estimate, or None
    on other devices (nothing is checked)."""
    import torch

    from lora2_train import memory as M

    device = torch.device(device)
    if device.type != "cuda":
        return None
    unet = base.diffusion_model
    weights = resident = 0
    for root in (unet, *text_encoders):
        for p in root.parameters():
            size = p.numel() * p.element_size()
            weights += size
            if p.device.type == "cuda" and (device.index is None or p.device.index == device.index):
                resident += size
    dtype = getattr(base, "manual_cast_dtype", None) or base.get_dtype()
    params = M.lora_parameters(M.target_shapes(unet, config.targets, text_encoders), config.r_max, config.max_params)
    est = M.estimate(weights, params, pixels, config.batch_size, config.gradient_checkpointing, config.optimizer,
                     torch.empty((), dtype=dtype).element_size())
    free, _total = (mem_get_info or torch.cuda.mem_get_info)(device)
    try:
        M.check_fits(est, free, resident, str(device), config.gradient_checkpointing)
    except MemoryError as e:
        raise MemoryError(f"Train LoRA² (SDXL): {e}") from None
    return est


def _model_sampling(model):
    """The ModelPatcher's model_sampling, object patches (ComfyUI's ModelSamplingDiscrete node) included."""
    get = getattr(model, "get_model_object", None)
    if get is not None:
        try:
            return get("model_sampling")
        except (AttributeError, KeyError):
            pass
    patched = getattr(model, "object_patches", {}).get("model_sampling")
    return patched if patched is not None else model.model.model_sampling


def _prediction_of(model):
    """(prediction_type, zero_terminal_snr, model_sampling) of a ComfyUI model: ε or v from its sampling
    class, zero terminal SNR when the last discrete σ says ᾱ_T ≈ 0.  Other kinds are refused."""
    import comfy.model_sampling as S

    ms = _model_sampling(model)
    denoise = getattr(type(ms), "calculate_denoised", None)
    discrete = isinstance(ms, S.ModelSamplingDiscrete) and getattr(ms, "sigmas", None) is not None
    kinds = {getattr(S, "EPS").calculate_denoised: "epsilon",
             getattr(S, "V_PREDICTION").calculate_denoised: "v_prediction"}
    if not discrete or denoise not in kinds:
        raise ValueError(f"Train LoRA² (SDXL): embedded training needs an ε- or v-prediction model with a discrete "
                         f"noise schedule; this one samples with {type(ms).__name__}")
    sigma_last = float(ms.sigmas[-1])
    return kinds[denoise], 1.0 / (1.0 + sigma_last ** 2) < 1e-6, ms


def _data_from_latents(base, latents, positive):
    """Training examples from ComfyUI latents and conditioning: a LATENT (``{"samples": (B, C, h, w)}``) or a
    list of them (MakeTrainingDataset: one per image; ResolutionBucket: one batch per bucket), with a
    CONDITIONING (``[[cond, {"pooled_output": …}], …]``) or a list of them: one per LATENT, or one for all.
    Within a LATENT of B samples, the conditioning holds one entry per sample or one for all, and an entry's
    cond / pooled tensors one row per sample or one for all."""
    import torch

    lats = latents if isinstance(latents, (list, tuple)) else [latents]
    if not lats or not all(isinstance(d, dict) and isinstance(d.get("samples"), torch.Tensor) for d in lats):
        raise ValueError("latents: expected LATENT values ({'samples': tensor})")
    if positive is None:
        raise ValueError("positive: latents need their text conditioning (connect positive)")
    conds = list(positive) if isinstance(positive, (list, tuple)) else [positive]
    if conds and _is_cond_entry(conds[0]):  # one CONDITIONING rather than a list of them
        conds = [conds]
    if len(conds) not in (1, len(lats)):
        raise ValueError(f"positive: {len(conds)} conditionings for {len(lats)} latents; give one per latent or "
                         f"one for all")
    data = []
    for i, d in enumerate(lats):
        samples = d["samples"]
        if samples.dim() != 4:
            raise ValueError(f"latents[{i}]: samples must be (batch, channels, height, width), got "
                             f"{tuple(samples.shape)}")
        cond = conds[i if len(conds) > 1 else 0]
        if not cond or not all(_is_cond_entry(e) for e in cond):
            raise ValueError(f"positive[{i if len(conds) > 1 else 0}]: not a CONDITIONING ([[tensor, dict], …])")
        b = samples.shape[0]
        if len(cond) not in (1, b):
            raise ValueError(f"positive[{i}]: {len(cond)} entries for {b} latents; one per latent or one for all")
        x = base.process_latent_in(samples.float()).float().cpu()
        for j in range(b):
            tensor, extra = cond[j if len(cond) > 1 else 0]
            pooled = extra.get("pooled_output")
            if pooled is None:
                raise ValueError(f"positive[{i}]: no pooled_output (an SDXL text encoder's conditioning is needed)")
            row = j if tensor.shape[0] == b else 0
            prow = j if pooled.shape[0] == b else 0
            h, w = samples.shape[-2] * 8, samples.shape[-1] * 8
            y = base.encode_adm(pooled_output=pooled[prow:prow + 1], width=int(extra.get("width", w)),
                                height=int(extra.get("height", h)), crop_w=int(extra.get("crop_w", 0)),
                                crop_h=int(extra.get("crop_h", 0)), target_width=int(extra.get("target_width", w)),
                                target_height=int(extra.get("target_height", h)), device=pooled.device)
            data.append({"latents": x[j], "cond": {"context": tensor[row].float().cpu(), "y": y[0].float().cpu()}})
    return data


def _is_cond_entry(e) -> bool:
    import torch

    return isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[0], torch.Tensor) and isinstance(e[1], dict)


def _schedule_of(base, sampling=None):
    """The trainer's DDPM schedule taken from the model's discrete sigmas: σ_t² = (1−ᾱ_t)/ᾱ_t ⇒ ᾱ_t = 1/(1+σ_t²)."""
    from lora2_train.objective import DDPMSchedule

    schedule = DDPMSchedule()
    sigmas = getattr(sampling if sampling is not None else base.model_sampling, "sigmas", None)
    if sigmas is not None:
        sigmas = sigmas.detach().float().cpu().clone()
        schedule.alphas_cumprod = 1.0 / (1.0 + sigmas ** 2)
        schedule.num_timesteps = int(sigmas.shape[0])
    return schedule


def _load_for_training(*models):
    """Load the ModelPatchers fully onto their devices (their existing patches applied, as for sampling)."""
    import inspect

    import comfy.model_management as mm

    kwargs = {}
    params = inspect.signature(mm.load_models_gpu).parameters
    if "force_full_load" in params:
        kwargs["force_full_load"] = True
    mm.load_models_gpu(list(models), **kwargs)


def _autograd_usable(module):
    """Weights loaded under ComfyUI's inference mode cannot be saved for backward: each such parameter is
    replaced by a normal tensor holding the same bits (one at a time, so memory does not double)."""
    import torch

    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_inference():
                mod._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                del p


def _restore_flags(flags):
    for p, flag in flags:
        if p.requires_grad != flag:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _autograd_attention():
    """ComfyUI's sub-quadratic and split attention (its CPU defaults) work in place and cannot be
    differentiated: use its PyTorch SDPA attention while training, then put the choice back."""
    import comfy.ldm.modules.attention as A

    names = ("optimized_attention", "optimized_attention_masked")
    saved = {n: getattr(A, n) for n in names if hasattr(A, n)}
    in_place = {getattr(A, f, None) for f in ("attention_sub_quad", "attention_split")} - {None}
    sdpa = getattr(A, "attention_pytorch", None)
    try:
        if sdpa is not None:
            for n, f in saved.items():
                if f in in_place:
                    setattr(A, n, sdpa)
        yield
    finally:
        for n, f in saved.items():
            setattr(A, n, f)


@contextlib.contextmanager
def _cancel_at_step_boundaries():
    """Cancel stops the embedded training between steps, where the trainer keeps a resumable checkpoint and the
    adapter so far.  Newer ComfyUI (0.21.0) also checks the Cancel flag in every layer call
    (``comfy.ops.run_every_op``), which would end a step half-way with nothing saved; that per-layer check is off
    while the trainer runs (the flag stays set for the trainer's own check) and back on afterwards."""
    try:
        import comfy.ops as ops
    except ImportError:
        ops = None
    check = getattr(ops, "run_every_op", None)
    if check is None:
        yield
        return
    ops.run_every_op = lambda: None
    try:
        yield
    finally:
        ops.run_every_op = check


@contextlib.contextmanager
def _norm_inputs_copied(*roots):
    """Early-2024 ComfyUI transformer blocks (U-Net and CLIP layers) add residuals in place (``x += n``) after
    a LayerNorm has saved ``x`` for backward; giving each LayerNorm its own copy of its input keeps autograd
    valid."""
    import torch

    handles = [m.register_forward_pre_hook(lambda _m, args: (args[0].clone(),) + tuple(args[1:]))
               for root in roots for m in root.modules() if isinstance(m, torch.nn.LayerNorm)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _checkpoint_dir(out):
    import folder_paths

    return os.path.join(folder_paths.get_output_directory(), "lora2_checkpoints", out.stem)


def _base_model_name(base):
    name = type(getattr(base, "model_config", None)).__name__
    return {"SDXL": "sdxl_base_v1-0"}.get(name, name.lower())


def _write_image_folder(examples, folder):
    from PIL import Image

    for i, ex in enumerate(examples):
        arr = (ex.image.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
        Image.fromarray(arr).save(os.path.join(folder, f"{i:05d}.png"))
        with open(os.path.join(folder, f"{i:05d}.txt"), "w", encoding="utf-8") as f:
            f.write(ex.caption)
    return folder
