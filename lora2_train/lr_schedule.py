"""Learning-rate schedules of the embedded trainer, by optimizer step (the names sd-scripts uses).

``lr_multiplier(name, step, warmup, total)`` is the factor applied to every parameter group's base
learning rate for the optimizer step with 0-based index `step` of a run of `total` optimizer steps:

* ``constant``: 1;
* ``constant_with_warmup``: step / warmup for the first `warmup` steps, then 1;
* ``cosine``: the same warm-up, then ½(1 + cos(π·p)) with p = (step − warmup) / (total − warmup).
"""
from __future__ import annotations

import math

LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine")


def lr_multiplier(name: str, step: int, warmup: int, total: int) -> float:
    if name not in LR_SCHEDULERS:
        raise ValueError(f"lr_scheduler must be one of {LR_SCHEDULERS}, got {name!r}")
    if name == "constant":
        return 1.0
    if step < warmup:
        return step / warmup
    if name == "constant_with_warmup":
        return 1.0
    p = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, p)))
