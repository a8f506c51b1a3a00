"""LoRA² adapter files: standard kohya LoRA safetensors with ragged ranks (spec §5).

Keys per module ``<name>``: ``<name>.lora_down.weight`` (D×in[×k×k]),
``<name>.lora_up.weight`` (out×D[×1×1]) and ``<name>.alpha`` (scalar = D, so
the kohya factor alpha/D is 1).  s·Λ is folded into ``lora_up``.  Positions
stay in importance order: the first k positions of a module are its k most
important directions.  Metadata: the ``ss_*`` keys kohya tools read plus
``lora2_version``, ``lora2_ranks``, ``lora2_nu``, ``lora2_config`` (JSON).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

FORMAT_VERSION = "1"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NETWORK_MODULE = "networks.lora"


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

    def delta_weight(self) -> torch.Tensor:
        down, up = self.down.float(), self.up.float()
        s = self.alpha / self.rank
        if down.dim() == 2:
            return s * (up @ down)
        return s * torch.einsum("od,dikl->oikl", up.flatten(1), down)


@dataclass
class Adapter:
    """The in-memory ragged adapter every tool takes and returns: module name → factors, plus metadata."""

    modules: dict[str, LoRAModule]
    metadata: dict[str, str] = field(default_factory=dict)

    def ranks(self) -> dict[str, int]:
        return {k: m.rank for k, m in self.modules.items()}

    def num_parameters(self) -> int:
        return sum(m.down.numel() + m.up.numel() for m in self.modules.values())


def adapter_from_network(network, config=None, base_model: str = "sdxl_base_v1-0", extra: dict | None = None) -> Adapter:
    """Fold s·Λ into ``lora_up`` of every component of a LoRA2Network and attach the metadata of spec §5."""
    modules = {}
    for key, layer in network.layers.items():
        down, up = layer.folded_factors()
        modules[key] = LoRAModule(down.float(), up.float(), float(layer.rank))
    ranks = {k: m.rank for k, m in modules.items()}
    max_rank = max(ranks.values())
    cfg = dict(config.to_dict() if config is not None else {})
    cfg.update(extra or {})
    meta = {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": str(max_rank),
        "ss_network_alpha": str(max_rank),
        "ss_base_model_version": base_model,
        "ss_network_args": json.dumps({"algo": "lora2", "ragged_ranks": "true"}),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "lora2_version": FORMAT_VERSION,
        "lora2_ranks": json.dumps(ranks),
        "lora2_nu": json.dumps({k: round(v, 8) for k, v in network.nus().items()}),
        "lora2_config": json.dumps(cfg, default=str),
    }
    return Adapter(modules, meta)


def adapter_state_dict(adapter: Adapter, dtype: str = "fp16") -> dict[str, torch.Tensor]:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    dt = DTYPES[dtype]
    sd = {}
    for name, m in adapter.modules.items():
        sd[f"{name}.lora_down.weight"] = m.down.to(dt).contiguous()
        sd[f"{name}.lora_up.weight"] = m.up.to(dt).contiguous()
        sd[f"{name}.alpha"] = torch.tensor(float(m.alpha), dtype=dt)
    return sd


def atomic_write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = False) -> Path:
    """Write via a temporary file in the same folder and rename: a reader never sees half a file."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_adapter(adapter: Adapter, path: str | os.PathLike, dtype: str = "fp16", overwrite: bool = False) -> Path:
    """Write a kohya-format safetensors file atomically; refuses to replace a file unless `overwrite`."""
    sd = adapter_state_dict(adapter, dtype)
    meta = dict(adapter.metadata)
    meta["lora2_dtype"] = dtype
    return atomic_write_bytes(path, st_save(sd, metadata=meta), overwrite=overwrite)


def load_adapter(path: str | os.PathLike) -> Adapter:
    """Read a kohya LoRA safetensors file (ragged ranks allowed) into an :class:`Adapter`.

    A missing ``alpha`` means alpha = rank (kohya convention).
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise AdapterFormatError(f"{path}: only .safetensors adapters are read (pickle files are never loaded)")
    try:
        f = safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises several types for a damaged header
        raise AdapterFormatError(f"{path}: not a readable safetensors file ({e})") from None
    tensors, meta = {}, dict(f.metadata() or {})
    for key in f.keys():
        tensors[key] = f.get_tensor(key)
    names = sorted({k.split(".", 1)[0] for k in tensors})
    modules = {}
    for name in names:
        down, up = tensors.get(f"{name}.lora_down.weight"), tensors.get(f"{name}.lora_up.weight")
        if down is None or up is None:
            raise AdapterFormatError(f"{path}: key {name!r} lacks lora_down/lora_up weights")
        if down.shape[0] != up.shape[1]:
            raise AdapterFormatError(
                f"{path}: key {name!r}: lora_down rank {down.shape[0]} != lora_up rank {up.shape[1]}")
        alpha = tensors.get(f"{name}.alpha")
        modules[name] = LoRAModule(down, up, float(alpha) if alpha is not None else float(down.shape[0]))
    return Adapter(modules, meta)
