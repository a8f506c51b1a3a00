"""The embedded backend: ``lora2_train.trainer.Trainer`` on the ComfyUI MODEL's U-Net, in this process.

Images (fitted to aspect-ratio buckets) → VAE latents (scaled by the model's latent format), encoded once per
run and kept on disk (``cache_to_disk``, :mod:`lora2_train.cache`); captions → CLIP (cond + pooled, SDXL ADM
vector from the model's own ``encode_adm``) — or latents and conditioning made by ComfyUI's own dataset nodes.
The trainer runs L_MSE + λ_r·L_reg + λ_e·L_entropy (spec §3) with the prediction type (ε or v) and discrete
noise schedule of the model's ``model_sampling``.  The base weights are never written; the node applies the
result through ModelPatcher patches.  Text-encoder targets: LoRA² layers also wrap the Linear layers of the
CLIP's two encoders, and each step recomputes the captions' conditioning through them
(:class:`text.TextConditioning`).  Samples every N steps with ComfyUI's own sampler (:class:`samples.Sampler`).
"""
from __future__ import annotations

import logging
import os

from . import autograd, data as D, encode as E, memory, prediction, samples as S, text as T
from .unet import TextUNetCall, UNetCall


def train_embedded(model, clip, vae, config, out, inputs, run, buckets=None):
    """(adapter, history, sample images) of one embedded run; `inputs` are the node's (settings merged); the
    sample images are (H, W, 3) tensors, step then prompt order."""
    import torch

    import comfy.model_management as mm

    sample_every = int(inputs["sample_every_n_steps"])
    prompts = _prompts(inputs, config, clip, vae) if sample_every > 0 else []
    base = model.model
    _check_sdxl(base)
    config.prediction_type, config.zero_terminal_snr, sampling = prediction.prediction_of(model)
    config.validate()
    latents = inputs.get("latents")
    text_encoders = None
    if T.trains_text_encoders(config):
        if latents is not None:
            raise ValueError("target_modules: text-encoder targets recompute the captions' conditioning every "
                             "step; give the captioned images (dataset_path or images), not latents + positive")
        text_encoders = T.text_encoders(clip)
    resume_from = inputs.get("resume_from") or ""
    if resume_from and not os.path.isfile(resume_from):
        raise FileNotFoundError(f"resume_from: {resume_from}: no such checkpoint file")
    data, examples = _data(model, clip, vae, config, inputs, run, buckets, text_encoders)
    # before training (the text encoders are unloaded next); when they train, the sampler encodes anew
    conds = E.encode_prompts(clip, prompts) if text_encoders is None else None
    with torch.inference_mode(False):  # copies usable by autograd
        data = [{"latents": d["latents"].clone(), "cond": {k: v.clone() for k, v in d["cond"].items()}}
                for d in data]
    memory.free_memory()  # the encoders' memory back before the UNet is loaded for training
    device = getattr(model, "load_device", None) or mm.get_torch_device()
    text = _load(model, clip, base, device, text_encoders, examples)
    sampler = S.Sampler(model, vae, prompts, conds, run, out.stem, text=text) if prompts else None
    with torch.inference_mode(False), torch.enable_grad():
        adapter, history = run_trainer(base, base.diffusion_model, data, config, out, device, resume_from, run,
                                       sampling, text=text, sampler=sampler, sample_every=sample_every)
    return adapter, history, sampler.images if sampler is not None else []


def _prompts(inputs, config, clip, vae):
    from lora2_train.sample_prompts import DEFAULT_CFG, DEFAULT_SIZE, DEFAULT_STEPS, parse_prompts

    prompts = parse_prompts(inputs["sample_prompts"], width=DEFAULT_SIZE, height=DEFAULT_SIZE, steps=DEFAULT_STEPS,
                            cfg=DEFAULT_CFG, seed=config.seed, sampler=inputs["sample_sampler"])
    if clip is None or vae is None:
        raise ValueError("sample_prompts: samples need the clip and vae inputs connected")
    return prompts


def _check_sdxl(base):
    import torch

    if not hasattr(base, "encode_adm") or base.encode_adm(pooled_output=torch.zeros(1, 1280), width=8,
                                                           height=8) is None:
        raise ValueError("Train LoRA² (SDXL): the MODEL input is not an SDXL-family model")


def _data(model, clip, vae, config, inputs, run, buckets, text_encoders):
    """(training data, examples or None): the memory check first (before encoding and loading: a run that
    cannot fit on the GPU fails at once; CPU: no check), then the encoded examples or the given latents."""
    import torch

    import comfy.model_management as mm

    base, latents = model.model, inputs.get("latents")
    examples = None
    if latents is None:
        examples = D.examples(inputs["dataset_path"], inputs.get("images"), inputs.get("captions", ""),
                              inputs["instance_prompt"], inputs["resolution"], buckets)
        pixels = max(ex.target_size[0] * ex.target_size[1] for ex in examples)
    else:
        lats = latents if isinstance(latents, (list, tuple)) else [latents]
        pixels = max((int(d["samples"].shape[-2]) * int(d["samples"].shape[-1]) * 64 for d in lats
                      if isinstance(d, dict) and isinstance(d.get("samples"), torch.Tensor)), default=0)
    memory.free_memory()  # other models out of the way (VAE and CLIP load on their own for encoding)
    memory.check_memory(base, config, pixels, getattr(model, "load_device", None) or mm.get_torch_device(),
                        text_encoders=text_encoders or ())
    if latents is not None:
        return D.data_from_latents(base, latents, inputs.get("positive")), None
    # under ComfyUI's inference mode, once per run; captions too unless the text encoders train
    from lora2_train.cache import EncodeCache

    cache = EncodeCache(E.cache_dir() if inputs["cache_to_disk"] else None)
    data = E.encode_examples(base, clip, vae, examples, captions_only=text_encoders is not None, seed=config.seed,
                             cache=cache)
    if cache.root is not None:
        run.cache_report = cache.report()
        logging.info("Train LoRA²: encoded data (%s): %s", cache.root, run.cache_report)
    return data, examples


def _load(model, clip, base, device, text_encoders, examples):
    """Load the U-Net (and, when they train, the CLIP) for training; the per-step text conditioning or None."""
    import torch

    if text_encoders is None:
        memory.load_for_training(model)
        return None
    memory.load_for_training(model, clip.patcher)  # the CLIP runs in every step
    clip_device = getattr(clip.patcher, "load_device", device)
    if torch.device(clip_device) != torch.device(device):
        raise ValueError(f"target_modules: text-encoder training needs the CLIP on the training device {device}, "
                         f"but ComfyUI loads it on {clip_device} (low-VRAM mode?); train the text encoders with "
                         f"backend sd-scripts, or choose U-Net targets")
    return T.TextConditioning(clip, base, text_encoders, list(dict.fromkeys(ex.caption for ex in examples)))


def run_trainer(base, unet, data, config, out, device, resume_from, run, sampling=None, text=None, sampler=None,
                sample_every=0):
    """Train and save; `text` (text-encoder targets) recomputes the conditioning in every step; `sampler`
    (called with the step) draws samples every `sample_every` steps.  (adapter, rank history)."""
    import comfy.model_management as mm
    from lora2_train.trainer import Trainer, history_point

    schedule = prediction.schedule_of(base, sampling)
    run.watch_memory(device)
    dtype = _compute_dtype(base, config, device)
    encoders = list(text.encoders) if text is not None else []
    network, flags = _network(unet, encoders, config, device)
    history: list[dict] = []

    def callback(ev):
        run.step(ev)
        point = history_point(ev, config.resize_every)
        if point is not None:
            history.append(point)

    unet_call = UNetCall(unet, dtype) if text is None else TextUNetCall(unet, dtype, text)
    trainer = Trainer(unet_call, network, data, config, schedule=schedule, out_dir=checkpoint_dir(out),
                      callback=callback, should_stop=mm.processing_interrupted, device=device,
                      entropy_root=unet, on_save=lambda k: _snapshot(network, config, base, out, run, k),
                      on_sample=sampler, sample_every=int(sample_every) if sampler is not None else 0)
    try:
        with autograd.autograd_attention(), autograd.norm_inputs_copied(unet, *encoders), \
                autograd.cancel_at_step_boundaries():
            result = trainer.train(resume_from=resume_from or None)
    finally:
        unet_call.disable_gradient_checkpointing()
        network.restore()
        autograd.restore_flags(flags)
    return _finish(network, config, base, out, run, result, history)


def _compute_dtype(base, config, device):
    """The U-Net's compute dtype; a half-precision U-Net on CUDA trains under autocast to it (and loss scaling
    for fp16), the LoRA weights stay fp32."""
    import torch

    dtype = getattr(base, "manual_cast_dtype", None) or base.get_dtype()
    if torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        config.mixed_precision = "fp16" if dtype == torch.float16 else "bf16"
        config.validate()
    return dtype


def _network(unet, encoders, config, device):
    """The LoRA² network injected into the U-Net (and encoders), base weights frozen: (network, the base
    parameters' requires_grad flags to restore)."""
    from lora2_train.network import LoRA2Network

    flags = []
    for root in [unet, *encoders]:
        autograd.autograd_usable(root)
        flags += [(p, p.requires_grad) for p in root.parameters()]
    for p, _ in flags:
        if p.requires_grad:
            p.requires_grad_(False)
    network = LoRA2Network(config, unet=unet, text_encoders=encoders)
    network.to(device)
    network.apply_to()
    return network, flags


STAMP = {"lora2_trained_with": "embedded"}


def _adapter(network, config, base, steps):
    from lora2_train.format import adapter_from_network

    adapter = adapter_from_network(network, config, base_model=base_model_name(base))
    adapter.metadata.update(STAMP, lora2_steps=str(steps))
    return adapter


def _snapshot(network, config, base, out, run, k):
    """The adapter of step k, before any re-allocation, atomic like the final file."""
    from lora2_train.format import save_adapter

    from ..tools import free_path

    ad = _adapter(network, config, base, k)
    ad.metadata.update(lora2_snapshot="true")
    path = free_path(str(out.parent), f"{out.stem}_step{k}")
    save_adapter(ad, path)
    run.snapshots.append(path.name)
    logging.info("Train LoRA²: step %d saved as %s", k, path.name)


def _finish(network, config, base, out, run, result, history):
    """Save the trained adapter (a taken name: the next free one); on Cancel the adapter so far as
    ``<name>_step<k>`` and ComfyUI's interrupt raised.  (adapter, history)."""
    import comfy.model_management as mm
    from lora2_train.format import save_adapter

    from ..tools import free_path

    adapter = _adapter(network, config, base, result.steps)
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


def checkpoint_dir(out):
    import folder_paths

    return os.path.join(folder_paths.get_output_directory(), "lora2_checkpoints", out.stem)


def base_model_name(base):
    name = type(getattr(base, "model_config", None)).__name__
    return {"SDXL": "sdxl_base_v1-0"}.get(name, name.lower())
