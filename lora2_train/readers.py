"""Adapters other tools write, normalized to one ragged representation: kohya key → (down, up, alpha).

Recognized layouts (spec §5):
  kohya LoRA / LoCon (sd-scripts), LoRA²   ``<key>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``
  LyCORIS LoCon                            the same, optionally Tucker ``.lora_mid.weight`` (folded:
                                           down' = mid ⊛ down, exact), ``lycoris_`` prefix = UNet
  diffusers / PEFT                         ``unet.<path>.lora_A.weight`` / ``.lora_B.weight`` (also
                                           ``text_encoder.``, ``text_encoder_2.``, PEFT adapter names,
                                           old ``processor.to_q_lora.down/up``), alpha from
                                           ``lora_adapter_metadata`` (lora_alpha, alpha_pattern, rsLoRA)
UNet names in diffusers layout (``down_blocks.1.attentions.0…``) are translated to the SDXL ldm layout
(``input_blocks.4.1…``) that ComfyUI and sd-scripts use; layers per block are inferred from the key set
(2 for SDXL, 1 for KOALA).  Text encoders become ``lora_te1_`` / ``lora_te2_`` with transformers CLIP paths.
"""
from __future__ import annotations

import json
import math
import re

import torch

from .adapter import AdapterFormatError, LoRAModule
from .naming import diffusers_to_ldm, text_encoder_path

#: tensors of adapters that are not one low-rank factor pair per module: (key pattern, algorithm name)
_REFUSED = (
    (re.compile(r"\.hada_(w|t)\d"), "LoHa (Hadamard-product adapter)"),
    (re.compile(r"\.lokr_(w|t)\d"), "LoKr (Kronecker-product adapter)"),
    (re.compile(r"\.diff(_b)?$"), "full weight difference"),
    (re.compile(r"\.(oft_blocks|oft_diag|boft_blocks|oft_R)"), "OFT/BOFT (orthogonal fine-tuning)"),
    (re.compile(r"\.(w_norm|b_norm)$"), "LyCORIS norm fine-tuning"),
    (re.compile(r"\.(a1|a2|b1|b2)\.weight$"), "GLoRA"),
    (re.compile(r"\.on_input$"), "IA3"),
    (re.compile(r"\.(dora_scale|lora_magnitude_vector)"), "DoRA (weight-decomposed LoRA)"),
)

_KOHYA_PARTS = {".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_mid.weight": "mid", ".alpha": "alpha"}
_PEFT_RE = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
_OLD_DIFFUSERS_RE = re.compile(r"^(?P<mod>.+?)(?:\.processor\.(?P<proj>to_[qkv]|to_out)_lora|\.lora)"
                               r"\.(?P<ud>down|up)\.weight$")
_KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_", "lycoris_")
_PEFT_PREFIXES = (("unet.", "lora_unet_"), ("text_encoder_2.", "lora_te2_"), ("text_encoder.", "lora_te1_"),
                  ("base_model.model.", "lora_unet_"))


def normalize(path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> tuple[dict[str, LoRAModule], str]:
    """(modules keyed by ldm-layout kohya key, source name) of a file's tensors; errors name file and key."""
    if not tensors:
        raise AdapterFormatError(f"{path}: the file holds no tensors")
    for key in tensors:
        for pattern, algo in _REFUSED:
            if pattern.search(key):
                raise AdapterFormatError(f"{path}: key {key!r} belongs to a {algo} adapter, which is not a "
                                         "low-rank factor pair; only LoRA/LoCon files are read")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    style: set[str] = set()
    for key, t in tensors.items():
        module, role, kind = _split_key(path, key)
        style.add(kind)
        slot = parts.setdefault(module, {})
        if role in slot:
            raise AdapterFormatError(f"{path}: duplicate key {key!r} (module {module!r} already has a {role})")
        slot[role] = t
    if {"kohya", "peft"} <= style:
        raise AdapterFormatError(f"{path}: mixes kohya (lora_down/lora_up) and PEFT (lora_A/lora_B) keys")
    peft_alpha = _peft_alphas(path, meta) if "peft" in style else None
    n = _layers_per_block(parts)
    modules: dict[str, LoRAModule] = {}
    origin: dict[str, str] = {}
    for module, slot in parts.items():
        name = _kohya_name(path, module, n)
        if name in modules:
            raise AdapterFormatError(f"{path}: keys {origin[name]!r} and {module!r} name the same module {name!r}")
        origin[name] = module
        modules[name] = _factor_pair(path, module, slot, peft_alpha)
    lycoris = any("mid" in s for s in parts.values()) or any(m.startswith("lycoris_") for m in parts) \
        or "lycoris" in meta.get("ss_network_module", "")
    source = ("peft" if "peft" in style else "lycoris" if lycoris
              else "lora2" if "lora2_version" in meta else "kohya")
    return modules, source


def _split_key(path, key: str) -> tuple[str, str, str]:
    for suffix, role in _KOHYA_PARTS.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role, "any" if role == "alpha" else "kohya"
    m = _PEFT_RE.match(key)
    if m:
        return m["mod"], "down" if m["ab"] == "A" else "up", "peft"
    m = _OLD_DIFFUSERS_RE.match(key)
    if m:
        module = m["mod"] + ("." + ("to_out.0" if m["proj"] == "to_out" else m["proj"]) if m["proj"] else "")
        return module, m["ud"], "peft"
    raise AdapterFormatError(f"{path}: unknown key {key!r} (not a lora_down/lora_up/alpha or lora_A/lora_B tensor)")


def _factor_pair(path, module: str, slot: dict[str, torch.Tensor], peft_alpha) -> LoRAModule:
    down, up, mid, alpha = slot.get("down"), slot.get("up"), slot.get("mid"), slot.get("alpha")
    if down is None or up is None:
        missing = "lora_down (lora_A)" if down is None else "lora_up (lora_B)"
        raise AdapterFormatError(f"{path}: key {module!r} lacks its {missing} weight")
    for t, role in ((down, "lora_down"), (up, "lora_up")):
        if not t.is_floating_point():
            raise AdapterFormatError(f"{path}: key {module!r}: {role} has non-float dtype {t.dtype}")
        if t.dim() not in (2, 4) or 0 in t.shape:
            raise AdapterFormatError(f"{path}: key {module!r}: {role} has shape {tuple(t.shape)}, "
                                     "expected 2-D (linear) or 4-D (conv)")
    if mid is not None:  # LyCORIS Tucker: ΔW = up · mid · down with 1×1 up/down
        if mid.dim() != 4 or down.dim() != 4 or down.shape[2:] != (1, 1) or mid.shape[1] != down.shape[0]:
            raise AdapterFormatError(f"{path}: key {module!r}: lora_mid {tuple(mid.shape)} does not fit "
                                     f"lora_down {tuple(down.shape)}")
        down = torch.einsum("rskl,si->rikl", mid.float(), down.flatten(1).float()).to(down.dtype)
    rank = down.shape[0]
    if up.shape[1] != rank:
        raise AdapterFormatError(f"{path}: key {module!r}: lora_down rank {rank} != lora_up rank {up.shape[1]}")
    if up.dim() == 4 and up.shape[2:] != (1, 1):
        raise AdapterFormatError(f"{path}: key {module!r}: lora_up has kernel {tuple(up.shape[2:])}, expected 1×1")
    if down.dim() == 2 and up.dim() == 4:
        raise AdapterFormatError(f"{path}: key {module!r}: 2-D lora_down with a 4-D lora_up")
    if up.dim() == 2 and down.dim() == 4:
        up = up[:, :, None, None]
    if alpha is not None:
        if alpha.numel() != 1:
            raise AdapterFormatError(f"{path}: key {module!r}: alpha has shape {tuple(alpha.shape)}, expected a scalar")
        a = float(alpha.float())
    elif peft_alpha is not None:
        a = peft_alpha(module, rank)
    else:
        a = float(rank)
    if not math.isfinite(a) or a <= 0:
        raise AdapterFormatError(f"{path}: key {module!r}: alpha {a} must be a positive number")
    return LoRAModule(down, up, a)


def _kohya_name(path, module: str, layers_per_block: int) -> str:
    for prefix, kohya in _PEFT_PREFIXES:
        if module.startswith(prefix):
            rest = module[len(prefix):]
            if kohya == "lora_unet_":
                return kohya + _ldm_path(path, module, rest, layers_per_block).replace(".", "_")
            return kohya + text_encoder_path(rest).replace(".", "_")
    for prefix in _KOHYA_PREFIXES:
        if module.startswith(prefix):
            if prefix in ("lora_unet_", "lycoris_"):
                return "lora_unet_" + _ldm_kohya_rest(path, module, module[len(prefix):], layers_per_block)
            return module
    raise AdapterFormatError(f"{path}: key {module!r} names no UNet or text-encoder module "
                             f"(expected a prefix among {', '.join(_KOHYA_PREFIXES + tuple(p for p, _ in _PEFT_PREFIXES))})")


def _ldm_path(path, module: str, rest: str, n: int) -> str:
    for root in ("model.diffusion_model.", "diffusion_model."):
        if rest.startswith(root):
            return rest[len(root):]
    if rest.split(".", 1)[0] in ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out"):
        return rest
    try:
        return diffusers_to_ldm(rest, n, up_has_attention={0: True, 1: True})
    except KeyError:
        raise AdapterFormatError(f"{path}: key {module!r} is no SDXL UNet module") from None


_DIFFUSERS_KOHYA_RE = re.compile(r"^(down_blocks|up_blocks)_(\d+)_(resnets|attentions|downsamplers|upsamplers)_(\d+)_(.+)$")
_DIFFUSERS_KOHYA_MID_RE = re.compile(r"^mid_block_(resnets|attentions)_(\d+)_(.+)$")
_DIFFUSERS_TOP = {"conv_in": "conv_in", "conv_out": "conv_out", "time_embedding_linear_1": "time_embedding.linear_1",
                  "time_embedding_linear_2": "time_embedding.linear_2", "add_embedding_linear_1": "add_embedding.linear_1",
                  "add_embedding_linear_2": "add_embedding.linear_2"}


def _ldm_kohya_rest(path, module: str, rest: str, n: int) -> str:
    """kohya UNet name with underscores: diffusers layout → ldm layout; ldm names pass through."""
    m = _DIFFUSERS_KOHYA_RE.match(rest)
    dotted = None
    if m:
        dotted = f"{m[1]}.{m[2]}.{m[3]}.{m[4]}.{m[5]}"
    elif (m := _DIFFUSERS_KOHYA_MID_RE.match(rest)):
        dotted = f"mid_block.{m[1]}.{m[2]}.{m[3]}"
    elif rest in _DIFFUSERS_TOP:
        dotted = _DIFFUSERS_TOP[rest]
    if dotted is None:
        return rest
    try:
        return diffusers_to_ldm(dotted, n, up_has_attention={0: True, 1: True}).replace(".", "_")
    except KeyError:
        raise AdapterFormatError(f"{path}: key {module!r} is no SDXL UNet module") from None


def _layers_per_block(parts: dict) -> int:
    """Residual blocks per UNet level from diffusers-layout keys: down indices reach n−1, up indices n."""
    n = 0
    for module in parts:
        for m in re.finditer(r"(down|up)_blocks[._]\d+[._](?:resnets|attentions)[._](\d+)", module):
            n = max(n, int(m[2]) + (1 if m[1] == "down" else 0))
    return n or 2


def _peft_alphas(path, meta: dict[str, str]):
    """alpha(module, rank) for PEFT keys from diffusers' ``lora_adapter_metadata`` (else alpha = rank)."""
    raw = meta.get("lora_adapter_metadata")
    if raw is None:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError:
        raise AdapterFormatError(f"{path}: metadata key 'lora_adapter_metadata' is not valid JSON") from None
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"{path}: metadata key 'lora_adapter_metadata' is not a JSON object")

    def alpha(module: str, rank: int) -> float:
        prefix = module.split(".", 1)[0]
        inner = module.split(".", 1)[1] if "." in module else module
        get = lambda k, d=None: cfg.get(f"{prefix}.{k}", cfg.get(k, d))  # noqa: E731
        a = get("lora_alpha")
        for pat, value in (get("alpha_pattern") or {}).items():
            if re.fullmatch(rf"(.*\.)?{pat}", inner):
                a = value
                break
        if a is None:
            return float(rank)
        a = float(a)
        # PEFT scales by lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA; kohya by alpha / r
        return a * math.sqrt(rank) if get("use_rslora", False) else a
    return alpha
