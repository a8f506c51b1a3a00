"""A rough estimate of the device memory a LoRA² training run needs, to refuse a run that cannot fit before it
spends time encoding images and loading the model.

The estimate (bytes) is the sum of three parts:

* **weights**: the base model's parameters, ``Σ numel · element_size`` (as loaded for training);
* **LoRA**: every targeted module at rank ``r_max`` (the most the run can allocate; at most ``max_params``
  parameters when a cap is set), ``P = Σ min(r_max, in · k, out) · (in · k + out)`` parameters (``k`` the kernel size of a
  convolution, 1 for a linear layer), each held in float32 as weight, gradient and optimizer state:
  ``P · (4 + 4 + OPTIMIZER_STATE_BYTES[optimizer])``;
* **activations**: what the backward pass keeps, taken proportional to the pixels of one training image and
  to the batch: ``batch_size · pixels · ACTIVATION_BYTES_PER_PIXEL[gradient_checkpointing] · dtype_bytes / 2``
  (the constants are per pixel of an SDXL-sized U-Net computing in 16-bit: about 16 GiB for one 1024² image
  without gradient checkpointing, 2.5 GiB with it; a float32 model doubles them).

It is meant to catch the runs that are far off (a batch of 8 at 2048² on a 24 GiB card), not to predict the
peak to the last MiB: :func:`check_fits` compares it with the free memory reported by the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

GIB = 2 ** 30

#: float32 optimizer state per LoRA parameter, by optimizer (lora2_train.optim.OPTIMIZERS)
OPTIMIZER_STATE_BYTES = {"adam": 8, "adamw": 8, "adamw8bit": 2, "adafactor": 4, "prodigy": 16, "lion": 4}
#: activation bytes kept for backward per pixel of one training image (16-bit compute), by
#: gradient_checkpointing (False, True)
ACTIVATION_BYTES_PER_PIXEL = {False: 16 * 1024, True: 2560}


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    lora: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.lora + self.activations


def lora_parameters(shapes: Iterable[tuple[int, int]], r_max: int, max_params: int = 0) -> int:
    """LoRA parameters of modules of shapes ``(in · k, out)`` at rank `r_max` (a module's rank is at most
    min(in · k, out)), at most `max_params` in all (0: no cap)."""
    total = sum(min(int(r_max), int(fan_in), int(fan_out)) * (int(fan_in) + int(fan_out)) for fan_in, fan_out in shapes)
    return min(total, int(max_params)) if max_params else total


def estimate(weight_bytes: int, lora_params: int, pixels: int, batch_size: int, gradient_checkpointing: bool,
             optimizer: str = "adamw", dtype_bytes: int = 2) -> MemoryEstimate:
    """The three parts of the estimate (see the module docstring); `pixels` = height · width of the largest
    training image (its bucket)."""
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"optimizer must be one of {tuple(OPTIMIZER_STATE_BYTES)}, got {optimizer!r}")
    lora = int(lora_params) * (4 + 4 + OPTIMIZER_STATE_BYTES[optimizer])
    per_pixel = ACTIVATION_BYTES_PER_PIXEL[bool(gradient_checkpointing)] * int(dtype_bytes) // 2
    return MemoryEstimate(int(weight_bytes), lora, int(batch_size) * int(pixels) * per_pixel)


def check_fits(est: MemoryEstimate, free_bytes: int, resident_bytes: int = 0, device: str = "the GPU",
               gradient_checkpointing: bool = True) -> None:
    """Raise a one-line :class:`MemoryError` when the estimate, less the `resident_bytes` of the model already
    on the device (they are not part of the free memory), exceeds `free_bytes`; the message names the inputs
    that lower it."""
    needed = est.total - int(resident_bytes)
    if needed <= free_bytes:
        return
    lower = "batch_size, resolution or r_max (or set max_params_millions)"
    if not gradient_checkpointing:
        lower += ", or turn gradient_checkpointing on"
    raise MemoryError(
        f"this run needs about {est.total / GIB:.1f} GiB on {device} (model {est.weights / GIB:.1f}, LoRA at r_max "
        f"with gradients and optimizer state {est.lora / GIB:.1f}, activations {est.activations / GIB:.1f}) but "
        f"only {(free_bytes + resident_bytes) / GIB:.1f} GiB are available; lower {lower}")


def target_shapes(root, groups: Iterable[str], text_encoders=()) -> list[tuple[int, int]]:
    """``(in · k, out)`` of every module that :class:`lora2_train.network.LoRA2Network` would wrap for the target
    `groups`: the U-Net groups in `root`, the text-encoder groups (``te_attn``, ``te_mlp``) in each of
    `text_encoders` (none given: they count nothing)."""
    from .network import TE_GROUPS, UNET_GROUPS

    groups = list(groups)
    shapes = _shapes(root, [g for g in groups if g in UNET_GROUPS])
    for encoder in text_encoders:
        shapes += _shapes(encoder, [g for g in groups if g in TE_GROUPS])
    return shapes


def _shapes(root, groups) -> list[tuple[int, int]]:
    import torch.nn as nn

    from .network import target_pattern

    if not groups:
        return []
    pattern = target_pattern(groups)
    shapes = []
    for path, m in root.named_modules():
        if isinstance(m, nn.Linear) and pattern.search("." + path):
            shapes.append((m.in_features, m.out_features))
        elif isinstance(m, nn.Conv2d) and m.groups == 1 and pattern.search("." + path):
            k = m.kernel_size[0] * m.kernel_size[1]
            shapes.append((m.in_channels * k, m.out_channels))
    return shapes
