"""Training images and captions for the embedded trainer (torch + Pillow only).

Two sources give the same thing, a list of :class:`Example` (RGB image
resized so it covers its target size, then center-cropped to it, values in
[0, 1], plus its caption and the SDXL size conditioning: original size, crop
offset, target size).  The target is the resolution's square, or with
``buckets`` (see :func:`bucket_sizes`) the bucket whose aspect ratio is nearest
the image's:

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
    image: torch.Tensor  # (3, H, W) float32 in [0, 1]
    caption: str
    source: str  # file path, or "batch[i]"
    original_size: tuple[int, int] = (0, 0)  # (height, width) of the image as read
    crop_top_left: tuple[int, int] = (0, 0)  # (top, left) cropped off the resized image, in its pixels
    target_size: tuple[int, int] = (0, 0)  # (height, width) trained on: the image's size

    def __post_init__(self):
        if self.target_size == (0, 0):
            self.target_size = tuple(self.image.shape[-2:])
        if self.original_size == (0, 0):
            self.original_size = tuple(self.image.shape[-2:])


# ---- aspect-ratio buckets ---------------------------------------------------------------------------
def bucket_sizes(resolution: int, min_side: int = 256, max_side: int = 2048, step: int = 64) -> list[tuple[int, int]]:
    """(height, width) buckets around `resolution`: both sides multiples of `step` within
    [min_side, max_side], for every width the largest height keeping the area ≤ resolution² (widths whose
    height would exceed max_side are left out, so every bucket's area stays close to resolution²), and the
    transposed pairs.  `min_side` is lowered to the largest multiple of `step` ≤ resolution, `max_side`
    raised to it, so the set is never empty.  Sorted by aspect ratio (height / width)."""
    for name, v in (("resolution", resolution), ("min_side", min_side), ("max_side", max_side), ("step", step)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise DatasetError(f"buckets: {name} must be a positive integer, got {v!r}")
    if resolution < step:
        raise DatasetError(f"buckets: resolution {resolution} is below the bucket step {step}")
    square = resolution // step * step
    lo = min(max(step, min_side // step * step), square)
    hi = max(max_side // step * step, square)
    area = resolution * resolution
    out = set()
    for w in range(lo, hi + 1, step):
        h = area // w // step * step
        if lo <= h <= hi:
            out.update({(h, w), (w, h)})
    return sorted(out, key=lambda hw: (hw[0] / hw[1], hw[0]))


def nearest_bucket(height: int, width: int, buckets) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (|log ratio|); on a tie, the larger area."""
    if not buckets:
        raise DatasetError("buckets: the bucket list is empty")
    r = math.log(height / width)
    return min(buckets, key=lambda hw: (round(abs(math.log(hw[0] / hw[1]) - r), 12), -hw[0] * hw[1]))


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


def fit_crop(image: torch.Tensor, resolution) -> tuple[torch.Tensor, tuple[int, int]]:
    """Scale (C, H, W) so that it covers the target (antialiased bilinear), then crop the center; returns
    the crop and its (top, left) offset in the scaled image."""
    th, tw = _size(resolution)
    _, h, w = image.shape
    s = max(th / h, tw / w)
    nh, nw = max(th, math.ceil(h * s - 1e-6)), max(tw, math.ceil(w * s - 1e-6))
    if (nh, nw) != (h, w):
        image = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", align_corners=False,
                              antialias=True)[0]
    top, left = (nh - th) // 2, (nw - tw) // 2
    return image[:, top:top + th, left:left + tw].clamp(0.0, 1.0).contiguous(), (top, left)


def resize_center_crop(image: torch.Tensor, resolution) -> torch.Tensor:
    """Scale (C, H, W) so that it covers the target (antialiased bilinear), then crop the center."""
    return fit_crop(image, resolution)[0]


def to_example(image: torch.Tensor, caption: str, source: str, resolution=None, buckets=None) -> Example:
    """An Example of `image` (3, H, W) fitted to the nearest of `buckets`, else to `resolution` (None: as is)."""
    h, w = image.shape[-2:]
    if buckets:
        target = nearest_bucket(h, w, buckets)
    elif resolution is not None:
        target = _size(resolution)
    else:
        return Example(image.clamp(0.0, 1.0).contiguous(), caption, source, (h, w), (0, 0), (h, w))
    crop, offset = fit_crop(image, target)
    return Example(crop, caption, source, (h, w), offset, tuple(target))


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


def load_folder(folder: str | os.PathLike, resolution, instance_prompt: str = "", buckets=None) -> list[Example]:
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
    return [to_example(read_image(p), _caption_for(p, instance_prompt), str(p), resolution, buckets)
            for p in files]


def from_images(images: torch.Tensor, captions: str = "", resolution=None, instance_prompt: str = "",
                buckets=None) -> list[Example]:
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
    return [to_example(images[i].clamp(0.0, 1.0), caps[i], f"batch[{i}]", resolution, buckets) for i in range(b)]


def from_image_batches(batches, captions="", resolution=None, instance_prompt: str = "",
                       buckets=None) -> list[Example]:
    """Examples from one image batch or a list of them (ComfyUI's image-list nodes) with one caption string or
    one per batch (:func:`from_images` each; examples of batch i are named ``images[i]``)."""
    batches = list(batches) if isinstance(batches, (list, tuple)) else [batches]
    caps = list(captions) if isinstance(captions, (list, tuple)) else [captions]
    if len(batches) == 1:
        return from_images(batches[0], caps[0] if len(caps) == 1 else "\n".join(caps), resolution,
                           instance_prompt, buckets)
    if len(caps) not in (1, len(batches)):
        raise DatasetError(f"captions: {len(caps)} captions for {len(batches)} images; give one per image or one "
                           f"for all")
    out = []
    for i, batch in enumerate(batches):
        for ex in from_images(batch, caps[i if len(caps) > 1 else 0], resolution, instance_prompt, buckets):
            ex.source = f"images[{i}]"
            out.append(ex)
    return out


def write_image_folder(examples: list[Example], folder: str | os.PathLike) -> str:
    """The examples as a kohya-style image folder: ``00000.png`` (8-bit RGB) + ``00000.txt`` (its caption)."""
    from PIL import Image

    for i, ex in enumerate(examples):
        arr = (ex.image.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
        Image.fromarray(arr).save(os.path.join(folder, f"{i:05d}.png"))
        with open(os.path.join(folder, f"{i:05d}.txt"), "w", encoding="utf-8") as f:
            f.write(ex.caption)
    return str(folder)


def stack(examples: list[Example], channels_last: bool = True) -> torch.Tensor:
    """The images (all of one size) as one batch: (N, H, W, 3) when `channels_last` (ComfyUI IMAGE), else
    (N, 3, H, W)."""
    x = torch.stack([e.image for e in examples])
    return x.permute(0, 2, 3, 1).contiguous() if channels_last else x
