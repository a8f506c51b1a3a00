"""Shared pieces of the benchmarks: a plain fixed-rank LoRA baseline and small helpers."""
from __future__ import annotations

import json
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lora2_train.planted import target_modules  # noqa: E402


class FixedLoRA(nn.Module):
    """Standard LoRA on one nn.Linear: y = Wx + s·up(down(x)), down Kaiming-uniform, up zero.

    s = 1 when `alpha` is None (kohya with alpha = rank), else the rsLoRA scale s = alpha/√rank.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        rank = min(rank, base.in_features, base.out_features)
        self.scale = 1.0 if alpha is None else alpha / math.sqrt(rank)
        self.base = [base]
        self.lora_down = nn.Parameter(torch.empty(rank, base.in_features).uniform_(-1, 1) / math.sqrt(base.in_features))
        self.lora_up = nn.Parameter(torch.zeros(base.out_features, rank))
        self._orig = base.forward
        base.forward = self.forward

    def forward(self, x):
        h = F.linear(F.linear(x, self.lora_down.to(x.dtype)), self.lora_up.to(x.dtype))
        return self._orig(x) + (h if self.scale == 1.0 else self.scale * h)

    def restore(self):
        self.base[0].forward = self._orig


class FixedLoRANetwork(nn.Module):
    """Fixed-rank LoRA on the paper's attention targets, keyed like LoRA² (kohya names).

    `rank`: one rank for every target, or a rank per kohya key (0 or absent: that module gets no LoRA,
    the oracle arm of the planted benchmark)."""

    def __init__(self, unet: nn.Module, rank, alpha: float | None = None):
        super().__init__()
        ranks = rank if isinstance(rank, dict) else {k: rank for k in target_modules(unet)}
        self.layers = nn.ModuleDict({k: FixedLoRA(m, ranks[k], alpha) for k, m in target_modules(unet).items()
                                     if ranks.get(k, 0) > 0})

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def apply_to(self):
        for l in self.layers.values():
            l.base[0].forward = l.forward
        return self

    def restore(self):
        for l in self.layers.values():
            l.restore()


def threads_note() -> dict:
    return {"torch_threads": torch.get_num_threads(), "device": "cuda" if torch.cuda.is_available() else "cpu"}


def print_result(result: dict) -> None:
    """Last line of every benchmark: one JSON object."""
    print(json.dumps(result, sort_keys=True))
