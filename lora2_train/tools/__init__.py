"""Rank tools over the one in-memory adapter representation (:class:`lora2_train.format.Adapter`).

Each takes and returns an Adapter; none touches the disk.  Every tool keeps ΔW = alpha/rank · up·down
consistent: when a module's rank changes, its alpha changes with it (spec §6).
"""
from .merge import merge
from .pad import pad
from .resize import resize
from .summary import inspect_adapter
from .truncate import truncate

__all__ = ["inspect_adapter", "merge", "pad", "resize", "truncate"]
