"""The in-memory form of a LoRA adapter that readers, tools and writers share, and the error for bad files.

A leaf module (torch only): :mod:`lora2_train.readers` builds these objects from other tools' layouts and
:mod:`lora2_train.format` reads and writes them, so both import from here and never from each other
(``lora2_train.format`` re-exports every name for existing callers).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: ``lora2_order`` values: positions ordered by learned importance (ν), by singular value, or unordered
ORDERS = ("importance", "svd", "none")


class AdapterFormatError(ValueError):
    """A file is not a readable LoRA adapter; the message names the file and key."""


@dataclass
class LoRAModule:
    """One low-rank factor pair: ΔW = (alpha / rank) · up @ down."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the adapted weight: (out, in) or (out, in, kh, kw)."""
        return (self.out_features,) + tuple(self.down.shape[1:])

    @property
    def num_parameters(self) -> int:
        return self.down.numel() + self.up.numel()

    def delta_weight(self) -> torch.Tensor:
        down, up = self.down.float(), self.up.float()
        s = self.alpha / self.rank
        if down.dim() == 2:
            return s * (up.flatten(1) @ down)
        return s * torch.einsum("od,dikl->oikl", up.flatten(1), down)


@dataclass
class Adapter:
    """The in-memory ragged adapter every tool takes and returns: module name → factors, plus metadata.

    Module names are kohya keys in the SDXL ldm layout (``lora_unet_input_blocks_…``,
    ``lora_te1_…``, ``lora_te2_…``) whatever layout the file used.
    """

    modules: dict[str, LoRAModule]
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = "lora2"

    def ranks(self) -> dict[str, int]:
        return {k: m.rank for k, m in self.modules.items()}

    def num_parameters(self) -> int:
        return sum(m.num_parameters for m in self.modules.values())

    def dtype_name(self) -> str:
        """fp32/fp16/bf16 of the factors (of the first module)."""
        first = next(iter(self.modules.values()), None)
        name = _dtype_name(first.down.dtype) if first is not None else "fp16"
        return name if name in DTYPES else "fp32"

    @property
    def order(self) -> str:
        """Order of each module's positions: 'importance' (LoRA²), 'svd', or 'none'."""
        order = self.metadata.get("lora2_order")
        if order in ORDERS:
            return order
        return "importance" if "lora2_version" in self.metadata else "none"


def _dtype_name(dt: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dt, str(dt).replace("torch.", ""))
