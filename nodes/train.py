"""Train LoRA² (SDXL): learn an adaptive-rank LoRA on a folder of images, inside ComfyUI or via sd-scripts.

Embedded backend: images → VAE latents (scaled by the model's latent format),
captions → CLIP (cond + pooled, SDXL ADM vector from the model's own
``encode_adm``), then ``lora2_train.trainer.Trainer`` runs L_MSE + λ_r·L_reg +
λ_e·L_entropy (spec §3) on ``model.model.diffusion_model`` with ε-prediction
under the model's own discrete noise schedule.  The base weights are never
written; the result is applied through ModelPatcher patches.

sd-scripts backend: ``lora2_train.kohya.launch.train_sd_scripts`` in a
subprocess (``num_processes`` > 1: ``accelerate launch --multi_gpu``), with
sample prompts every N steps (returned as the ``samples`` IMAGE) and
sd-scripts' training state kept on Cancel and at the end (``resume_from``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time

from . import _pack  # noqa: F401  (puts lora2_train on sys.path inside ComfyUI)
from . import _comfy

NONE = "(none)"
BACKENDS = ("embedded", "sd-scripts")
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


def _presets() -> list[str]:
    from lora2_train.config import TARGET_PRESETS

    return list(TARGET_PRESETS)


class TrainLoRA2:
    CATEGORY = "LoRA²"
    RETURN_TYPES = ("MODEL", "CLIP", "LORA2", "LORA2_HISTORY", "IMAGE")
    RETURN_NAMES = ("model", "clip", "lora2", "rank_history", "samples")
    FUNCTION = "train"
    OUTPUT_NODE = True
    DESCRIPTION = ("Train an SDXL LoRA whose rank is learned per layer (LoRA²), save it into the loras folder "
                   "and return the model with it applied.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "clip": ("CLIP",),
                "vae": ("VAE",),
                "dataset_path": ("STRING", {"default": "", "tooltip": "folder of images; name.txt beside "
                                            "name.png is its caption (else the instance prompt)"}),
                "instance_prompt": ("STRING", {"default": "photo of sks person", "multiline": False}),
                "steps": ("INT", {"default": 500, "min": 1, "max": 100000}),
                "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1.0, "step": 1e-6,
                                            "round": False}),
                "nu_learning_rate": ("FLOAT", {"default": 1e-2, "min": 1e-6, "max": 10.0, "step": 1e-4,
                                               "round": False}),
                "r_init": ("INT", {"default": 64, "min": 1, "max": 4096}),
                "r_max": ("INT", {"default": 512, "min": 1, "max": 4096}),
                "r_target": ("INT", {"default": 64, "min": 1, "max": 4096}),
                "q": ("FLOAT", {"default": 0.9, "min": 0.01, "max": 0.999, "step": 0.01}),
                "lambda_r": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1000.0, "step": 0.01, "round": False}),
                "lambda_e": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1000.0, "step": 0.01, "round": False}),
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
                "sample_prompts": ("STRING", {"default": "", "multiline": True, "tooltip": "sd-scripts: one prompt "
                                              "per line (sd-scripts options such as --w 1024 --h 1024 --s 28 --d 1 "
                                              "may follow); images are returned as `samples`"}),
                "sample_every_n_steps": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": "sd-scripts: "
                                                 "sample every N steps (0: no samples)"}),
                "sample_sampler": (list(SAMPLERS), {"default": "euler_a"}),
                "gradient_checkpointing": ("BOOLEAN", {"default": True, "tooltip": "recompute UNet blocks in the "
                                                       "backward pass: far less memory, about 30% more time"}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    # ---------------------------------------------------------------------------------------------
    def train(self, model, clip, vae, dataset_path, instance_prompt, steps, learning_rate, nu_learning_rate,
              r_init, r_max, r_target, q, lambda_r, lambda_e, seed, resolution, batch_size, target_modules,
              backend, output_name, images=None, captions="", sd_scripts_path="", python_path="",
              base_checkpoint=NONE, resume_from="", gradient_checkpointing=True, num_processes=1, sample_prompts="",
              sample_every_n_steps=0, sample_sampler="euler_a", unique_id=None):
        import folder_paths

        from lora2_train.config import LoRA2Config
        from lora2_train.format import output_path

        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        config = LoRA2Config(q=float(q), r_init=int(r_init), r_target=int(r_target), r_max=int(r_max),
                             lambda_r=float(lambda_r), lambda_e=float(lambda_e), lr=float(learning_rate),
                             nu_lr=float(nu_learning_rate), steps=int(steps), batch_size=int(batch_size),
                             seed=int(seed), targets=target_modules,
                             checkpoint_every=max(1, min(100, int(steps))),
                             gradient_checkpointing=bool(gradient_checkpointing))
        lora_dir = folder_paths.get_folder_paths("loras")[0]
        out = output_path(lora_dir, output_name)
        if out.exists():
            raise FileExistsError(f"{out}: already exists; choose another output_name (files are never replaced)")
        if backend == "embedded" and (int(num_processes) != 1 or int(sample_every_n_steps) > 0):
            raise ValueError("num_processes > 1 and sample images need backend sd-scripts (the embedded backend "
                             "trains in one process and draws no samples)")
        run = _Run(unique_id, config.steps)
        samples = []
        if backend == "sd-scripts":
            adapter, history, samples = self._train_sd_scripts(
                config, out, dataset_path, images, captions, instance_prompt, resolution, sd_scripts_path,
                python_path, base_checkpoint, run, resume_from=resume_from, num_processes=int(num_processes),
                sample_prompts=sample_prompts, sample_every=int(sample_every_n_steps), sample_sampler=sample_sampler)
        else:
            adapter, history = self._train_embedded(model, clip, vae, config, out, dataset_path, images,
                                                    captions, instance_prompt, resolution, resume_from, run)
        from .load import patch_with_adapter

        model_out, clip_out = patch_with_adapter(model, clip, adapter, 1.0, 1.0, out.name)
        ranks = adapter.ranks()
        run.send(status="done", saved=out.name, ranks_by_block=_block_means(ranks))
        return {"ui": {"lora2_saved": [out.name]},
                "result": (model_out, clip_out, adapter, history, images_tensor(samples))}

    # ---------------------------------------------------------------------------------------------
    def _examples(self, dataset_path, images, captions, instance_prompt, resolution):
        from lora2_train import dataset as D

        if images is not None:
            return D.from_images(images, captions, resolution, instance_prompt)
        return D.load_folder(dataset_path, resolution, instance_prompt)

    def _train_embedded(self, model, clip, vae, config, out, dataset_path, images, captions, instance_prompt,
                        resolution, resume_from, run):
        import torch

        import comfy.model_management as mm

        examples = self._examples(dataset_path, images, captions, instance_prompt, resolution)
        base = model.model
        if not hasattr(base, "encode_adm") or base.encode_adm(pooled_output=torch.zeros(1, 1280), width=8,
                                                               height=8) is None:
            raise ValueError("Train LoRA² (SDXL): the MODEL input is not an SDXL-family model")
        if getattr(getattr(base, "model_type", None), "name", "EPS") != "EPS":
            raise ValueError(f"Train LoRA² (SDXL): embedded training needs an ε-prediction model, "
                             f"this one is {base.model_type.name}")

        data = self._encode(base, clip, vae, examples, resolution)  # under ComfyUI's inference mode
        with torch.inference_mode(False):  # copies usable by autograd
            data = [{"latents": d["latents"].clone(), "cond": {k: v.clone() for k, v in d["cond"].items()}}
                    for d in data]
        if resume_from and not os.path.isfile(resume_from):
            raise FileNotFoundError(f"resume_from: {resume_from}: no such checkpoint file")

        _load_for_training(model)
        device = getattr(model, "load_device", None) or mm.get_torch_device()
        unet = base.diffusion_model
        with torch.inference_mode(False), torch.enable_grad():
            return self._run_trainer(base, unet, data, config, out, device, resume_from, run)

    def _encode(self, base, clip, vae, examples, resolution):
        """(latents, context, y) per example: VAE latents scaled by the latent format; CLIP cond + pooled;
        SDXL ADM vector (pooled ‖ size embeddings) from the model's own encode_adm."""
        import torch

        from lora2_train import dataset as D

        pixels = D.stack(examples)  # (N, S, S, 3), ComfyUI IMAGE layout
        latents = []
        for i in range(pixels.shape[0]):
            latents.append(base.process_latent_in(vae.encode(pixels[i:i + 1])).float().cpu())
        latents = torch.cat(latents)
        h, w = pixels.shape[1], pixels.shape[2]
        cache = {}
        data = []
        for ex, lat in zip(examples, latents):
            if ex.caption not in cache:
                cond, pooled = clip.encode_from_tokens(clip.tokenize(ex.caption), return_pooled=True)
                y = base.encode_adm(pooled_output=pooled, width=w, height=h, crop_w=0, crop_h=0,
                                    target_width=w, target_height=h, device=pooled.device)
                cache[ex.caption] = (cond[0].float().cpu(), y[0].float().cpu())
            context, y = cache[ex.caption]
            data.append({"latents": lat, "cond": {"context": context, "y": y}})
        return data

    def _run_trainer(self, base, unet, data, config, out, device, resume_from, run):
        import torch

        import comfy.model_management as mm
        from lora2_train.format import adapter_from_network, save_adapter
        from lora2_train.network import LoRA2Network
        from lora2_train.trainer import Trainer

        schedule = _schedule_of(base)
        dtype = getattr(base, "manual_cast_dtype", None) or base.get_dtype()
        if torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16):
            # a half-precision UNet: autocast to its dtype (and loss scaling for fp16), LoRA weights stay fp32
            config.mixed_precision = "fp16" if dtype == torch.float16 else "bf16"
            config.validate()
        ckpt_dir = _checkpoint_dir(out)
        _autograd_usable(unet)
        flags = [(p, p.requires_grad) for p in unet.parameters()]
        for p, _ in flags:
            if p.requires_grad:
                p.requires_grad_(False)
        network = LoRA2Network(config, unet=unet)
        network.to(device)
        network.apply_to()
        history: list[dict] = []

        def callback(ev):
            run.step(ev)
            if ev.step == 1 or ev.resized or ev.step % config.resize_every == 0 or ev.step == ev.total:
                history.append({"step": ev.step, "ranks": dict(ev.ranks), "loss": float(ev.loss)})

        unet_call = _UNetCall(unet, dtype)
        trainer = Trainer(unet_call, network, data, config, schedule=schedule, out_dir=ckpt_dir,
                          callback=callback, should_stop=mm.processing_interrupted, device=device,
                          entropy_root=unet)
        try:
            with _autograd_attention(), _norm_inputs_copied(unet):
                result = trainer.train(resume_from=resume_from or None)
        finally:
            unet_call.disable_gradient_checkpointing()
            network.restore()
            _restore_flags(flags)
        stamp = {"lora2_steps": str(result.steps), "lora2_trained_with": "embedded"}
        adapter = adapter_from_network(network, config, base_model=_base_model_name(base))
        adapter.metadata.update(stamp)
        if not history or history[-1]["step"] != result.steps:
            loss = float(result.last.loss) if result.last is not None else float("nan")
            history.append({"step": result.steps, "ranks": dict(result.ranks), "loss": loss})
        if result.stopped:
            partial = out.with_name(f"{out.stem}_step{result.steps}{out.suffix}")
            if partial.exists():
                partial = out.with_name(f"{out.stem}_step{result.steps}_{int(time.time())}{out.suffix}")
            adapter.metadata["lora2_interrupted"] = "true"
            save_adapter(adapter, partial)
            msg = (f"Train LoRA²: cancelled at step {result.steps}/{config.steps}; adapter so far saved as "
                   f"{partial.name}, resumable checkpoint {result.checkpoint}")
            logging.warning(msg)
            run.send(status="interrupted", message=msg, saved=partial.name, checkpoint=str(result.checkpoint))
            mm.throw_exception_if_processing_interrupted()
            raise mm.InterruptProcessingException()  # the flag was cleared elsewhere: still report it
        save_adapter(adapter, out)
        logging.info("Train LoRA²: saved %s (%d modules, %d parameters)", out, len(adapter.modules),
                     adapter.num_parameters())
        return adapter, history

    # ---------------------------------------------------------------------------------------------
    def _train_sd_scripts(self, config, out, dataset_path, images, captions, instance_prompt, resolution,
                          sd_scripts_path, python_path, base_checkpoint, run, resume_from="", num_processes=1,
                          sample_prompts="", sample_every=0, sample_sampler="euler_a"):
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

        with tempfile.TemporaryDirectory(prefix="lora2_data_") as tmp:
            folder = dataset_path
            if images is not None:
                folder = _write_image_folder(self._examples("", images, captions, instance_prompt, resolution),
                                             tmp)
            else:
                self._examples(dataset_path, None, "", instance_prompt, resolution)  # validate early, one line
            history: list[dict] = []

            def callback(ev):
                run.step(ev)
                if ev.step == 1 or ev.resized or ev.step % config.resize_every == 0 or ev.step == ev.total:
                    history.append({"step": ev.step, "ranks": dict(ev.ranks), "loss": float(ev.loss)})

            try:
                path = train_sd_scripts(sd_scripts_path, ckpt, folder, str(out.parent), out.stem, config,
                                        config.steps, int(resolution), config.batch_size, config.seed,
                                        python=python_path or None, callback=callback,
                                        should_stop=mm.processing_interrupted, num_processes=num_processes,
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
        adapter = load_adapter(path)
        if not history:
            history.append({"step": config.steps, "ranks": adapter.ranks(), "loss": float("nan")})
        return adapter, history, sample_images(out.parent, out.stem, since=started)


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


class _Run:
    """Progress bar + live messages of one node run."""

    def __init__(self, node_id, total):
        import comfy.utils

        self.node_id, self.total = node_id, total
        self.bar = comfy.utils.ProgressBar(total)
        self.send(status="started", step=0)

    def send(self, **data):
        _comfy.send(_comfy.PROGRESS_EVENT, {"node": self.node_id, "total": self.total, **data})

    def step(self, ev):
        import comfy.model_management as mm

        try:  # ComfyUI's progress hook raises on Cancel; the trainer's should_stop handles it at the next step
            self.bar.update_absolute(ev.step, ev.total)
        except mm.InterruptProcessingException:
            mm.interrupt_current_processing(True)
        self.send(status="running", step=ev.step, loss=ev.loss, mse=ev.mse, reg=ev.reg, entropy=ev.entropy,
                  num_params=ev.num_params, elapsed=ev.elapsed, ranks_by_block=_block_means(ev.ranks))


def images_tensor(paths, size: int = PLACEHOLDER_SIZE):
    """Image files → one ComfyUI IMAGE batch (B, H, W, 3) in [0, 1]; images of another size than the first
    are resized to it (sd-scripts prompts may ask for different sizes); no file → one black placeholder."""
    import numpy as np
    import torch
    from PIL import Image

    if not paths:
        return torch.zeros(1, size, size, 3)
    frames, first = [], None
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            first = first or im.size
            if im.size != first:
                im = im.resize(first, Image.BICUBIC)
            frames.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0))
    return torch.stack(frames)


def _block_means(ranks):
    from lora2_train.plot import mean_rank_by_block

    return {k: round(float(v), 3) for k, v in mean_rank_by_block(ranks).items()}


def _schedule_of(base):
    """The trainer's DDPM schedule taken from the model's discrete sigmas: σ_t² = (1−ᾱ_t)/ᾱ_t ⇒ ᾱ_t = 1/(1+σ_t²)."""
    from lora2_train.objective import DDPMSchedule

    schedule = DDPMSchedule()
    sigmas = getattr(base.model_sampling, "sigmas", None)
    if sigmas is not None:
        sigmas = sigmas.detach().float().cpu().clone()
        schedule.alphas_cumprod = 1.0 / (1.0 + sigmas ** 2)
        schedule.num_timesteps = int(sigmas.shape[0])
    return schedule


def _load_for_training(model):
    """Load the ModelPatcher fully onto its device (its existing patches applied, as for sampling)."""
    import inspect

    import comfy.model_management as mm

    kwargs = {}
    params = inspect.signature(mm.load_models_gpu).parameters
    if "force_full_load" in params:
        kwargs["force_full_load"] = True
    mm.load_models_gpu([model], **kwargs)


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
def _norm_inputs_copied(unet):
    """Early-2024 ComfyUI transformer blocks add residuals in place (``x += n``) after a LayerNorm has
    saved ``x`` for backward; giving each LayerNorm its own copy of its input keeps autograd valid."""
    import torch

    handles = [m.register_forward_pre_hook(lambda _m, args: (args[0].clone(),) + tuple(args[1:]))
               for m in unet.modules() if isinstance(m, torch.nn.LayerNorm)]
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
