"""ComfyUI's model management around a training run: other models out, the trained ones in and kept, the
memory check before anything loads."""
from __future__ import annotations

import contextlib


def free_memory():
    """Unload every model ComfyUI holds and return cached device memory (what exists in this ComfyUI)."""
    import comfy.model_management as mm

    for name in ("unload_all_models", "soft_empty_cache"):
        fn = getattr(mm, name, None)
        if fn is not None:
            fn()


def check_memory(base, config, pixels, device, mem_get_info=None, text_encoders=()):
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


def load_for_training(*models):
    """Load the ModelPatchers fully onto their devices (their existing patches applied, as for sampling)."""
    import inspect

    import comfy.model_management as mm

    kwargs = {}
    params = inspect.signature(mm.load_models_gpu).parameters
    if "force_full_load" in params:
        kwargs["force_full_load"] = True
    mm.load_models_gpu(list(models), **kwargs)


@contextlib.contextmanager
def keep_loaded(model):
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
