"""Sample images while training: the embedded backend's sampler (ComfyUI's own), sd-scripts' sample files,
and the node's IMAGE output."""
from __future__ import annotations

import logging
import os

from . import memory
from .encode import encode_prompts

#: the `samples` output when there are none (embedded backend, no prompts, nothing written): one black 64×64
#: image, which every IMAGE consumer accepts (an empty batch breaks Preview/Save Image)
PLACEHOLDER_SIZE = 64


class Sampler:
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
        return encode_prompts(None, self.prompts, encode=self.text.encode_text)

    def __call__(self, step):
        import comfy.model_management as mm
        import comfy.sample

        latent_channels = getattr(getattr(self.model.model, "latent_format", None), "latent_channels", 4)
        refs = []
        with memory.keep_loaded(self.model):
            for i, (p, (positive, negative)) in enumerate(zip(self.prompts, self._conds())):
                latent = zeros(1, latent_channels, p.height // 8, p.width // 8)
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


def sd_scripts_sample_refs(out, since, shown: set) -> list[dict]:
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
            folder = os.path.join(folder_paths.get_temp_directory(), Sampler.SUBFOLDER)
            os.makedirs(folder, exist_ok=True)
            shutil.copyfile(p, os.path.join(folder, p.name))
        except OSError as e:
            logging.warning("Train LoRA²: could not copy sample %s for the chart: %s", p.name, e)
            continue
        refs.append({"filename": p.name, "subfolder": Sampler.SUBFOLDER, "type": "temp",
                     "step": int(parts[0]) if parts[0].isdigit() else parts[0],
                     "prompt": int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else len(refs)})
    return refs


def zeros(*shape):
    import torch

    return torch.zeros(shape)


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
