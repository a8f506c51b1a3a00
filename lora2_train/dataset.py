"""Training images and captions for the embedded trainer (torch + Pillow only).

Two sources give the same thing, a list of :class:`Example` (RGB image
resized so its shorter side equals the resolution, then center-cropped to a
square, values in [0, 1], plus its caption):

* a folder: every ``*.png|jpg|jpeg|webp|bmp`` file directly inside it, in name
  order; the caption of ``cat.png`` is the text of ``cat.txt`` beside it when
  that file exists and is not empty, else the instance prompt;
* an image batch (B, H, W, C) or (B, C, H, W) with a caption string: one
  caption per line when the string has exactly B non-empty lines (or, on one
  line, exactly B parts separated by "|"), else the whole string for every
  image (empty: the instance prompt).

Bad input raises :class:`DatasetError` with one line naming the folder or file.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DatasetError(ValueError):
    """The dataset cannot be read; the message names the folder or file."""


@dataclass
class Example:
    image: torch.Tensor  # (3, S, S) float32 in [0, 1]
    caption: str
    source: str  # file path, or "batch[i]"


def _size(resolution) -> tuple[int, int]:
    if isinstance(resolution, int) and not isinstance(resolution, bool):
        h = w = resolution
    else:
        try:
            h, w = (int(v) for v in resolution)
        except (TypeError, ValueError):
            raise DatasetError(f"resolution must be an int or (height, width), got {resolution!r}") from None
    if h < 8 or w < 8:
        raise DatasetError(f"resolution must be at least 8 pixels, got {resolution!r}")
    return h, w


def resize_center_crop(image: torch.Tensor, resolution) -> torch.Tensor:
    """Scale (C, H, W) so that it covers the target (antialiased bilinear), then crop the center."""
    th, tw = _size(resolution)
    _, h, w = image.shape
    s = max(th / h, tw / w)
    nh, nw = max(th, math.ceil(h * s - 1e-6)), max(tw, math.ceil(w * s - 1e-6))
    if (nh, nw) != (h, w):
        image = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", align_corners=False,
                              antialias=True)[0]
    top, left = (nh - th) // 2, (nw - tw) // 2
    return image[:, top:top + th, left:left + tw].clamp(0.0, 1.0).contiguous()


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file as a (3, H, W) float tensor in [0, 1] (EXIF orientation applied, alpha dropped)."""
    from PIL import Image, ImageOps

    path = Path(path)
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im = im.convert("RGB")
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
            w, h = im.size
    except Exception as e:  # Pillow raises several types for a damaged or foreign file
        raise DatasetError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
    return data.view(h, w, 3).permute(2, 0, 1).float().div(255.0)


def _caption_for(path: Path, instance_prompt: str) -> str:
    txt = path.with_suffix(".txt")
    if txt.is_file():
        try:
            text = txt.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise DatasetError(f"{txt}: unreadable caption file ({type(e).__name__}: {e})") from None
        if text:
            return " ".join(text.split())
    return instance_prompt


def load_folder(folder: str | os.PathLike, resolution, instance_prompt: str = "") -> list[Example]:
    """Every image directly inside `folder` with its caption (see the module docstring)."""
    if folder is None or not str(folder).strip():
        raise DatasetError("dataset folder is empty: give the path of a folder of images")
    folder = Path(os.path.expanduser(str(folder).strip()))
    if not folder.exists():
        raise DatasetError(f"{folder}: dataset folder does not exist")
    if not folder.is_dir():
        raise DatasetError(f"{folder}: dataset path is not a folder")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DatasetError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the dataset folder")
    _size(resolution)
    return [Example(resize_center_crop(read_image(p), resolution), _caption_for(p, instance_prompt), str(p))
            for p in files]


def from_images(images: torch.Tensor, captions: str = "", resolution=None, instance_prompt: str = "") -> list[Example]:
    """Examples from an image batch (B, H, W, C) (ComfyUI IMAGE) or (B, C, H, W), values in [0, 1]."""
    if not isinstance(images, torch.Tensor) or images.dim() not in (3, 4):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise DatasetError(f"images must be a (B, H, W, C) or (B, C, H, W) tensor, got {shape}")
    if images.dim() == 3:
        images = images[None]
    if images.shape[0] == 0:
        raise DatasetError("images: the batch holds no image")
    if images.shape[-1] in (1, 3, 4):  # ComfyUI IMAGE: channels last
        images = images.permute(0, 3, 1, 2)
    elif images.shape[1] not in (1, 3, 4):
        raise DatasetError(f"images: expected 1, 3 or 4 channels, got shape {tuple(images.shape)}")
    images = images.float()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    images = images[:, :3]
    b = images.shape[0]
    lines = [" ".join(s.split()) for s in (captions or "").splitlines() if s.strip()]
    if len(lines) == 1 and b > 1:  # a one-line field: captions separated by "|"
        parts = [" ".join(s.split()) for s in lines[0].split("|") if s.strip()]
        lines = parts if len(parts) == b else lines
    if len(lines) == b and b > 1:
        caps = lines
    else:
        whole = " ".join((captions or "").split())
        caps = [whole or instance_prompt] * b
    out = []
    for i in range(b):
        img = images[i].clamp(0.0, 1.0)
        if resolution is not None:
            img = resize_center_crop(img, resolution)
        out.append(Example(img.contiguous(), caps[i], f"batch[{i}]"))
    return out


def stack(examples: list[Example], channels_last: bool = True) -> torch.Tensor:
    """The images as one batch: (N, S, S, 3) when `channels_last` (ComfyUI IMAGE), else (N, 3, S, S)."""
    x = torch.stack([e.image for e in examples])
    return x.permute(0, 2, 3, 1).contiguous() if channels_last else x
