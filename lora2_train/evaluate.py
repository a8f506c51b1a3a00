"""Personalisation metrics of generated images: DINO, CLIP-I and CLIP-T (the DreamBooth protocol).

* **DINO** (subject fidelity): a ViT (``transformers.ViTModel``, e.g. ``facebook/dino-vits16``); each image is
  converted to RGB, resized so that its shorter side is 256 px (bicubic, PIL), centre-cropped to 224×224,
  scaled to [0, 1] and normalised with the ImageNet mean/std; its embedding is the CLS token of
  ``last_hidden_state``.  Score: mean cosine similarity over every (generated, reference) pair.
* **CLIP-I**: ``CLIPModel.get_image_features`` of the images prepared by the image processor saved beside the
  CLIP weights; mean cosine similarity over every (generated, reference) pair.
* **CLIP-T**: cosine similarity of each generated image's CLIP image features with its prompt's CLIP text
  features (``get_text_features``, prompt truncated to the text model's context), averaged over the images.

All scores are raw cosines in [-1, 1] (not the CLIPScore 2.5·max(cos, 0) rescaling).  Models are read only
from a folder saved with ``save_pretrained`` or from the local Hugging Face cache (``local_files_only``): this
module never downloads anything.  ``transformers`` is imported only when models are loaded.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
DINO_RESIZE, DINO_CROP = 256, 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROMPTS_FILE = Path(__file__).with_name("data") / "dreambooth_prompts.json"
TEMPLATE_KINDS = ("object", "live")
DINO_PROTOCOL = (f"ViTModel CLS token of last_hidden_state; RGB, resize shorter side {DINO_RESIZE} (bicubic), "
                 f"center crop {DINO_CROP}, ImageNet mean/std")
CLIP_PROTOCOL = ("CLIPModel get_image_features / get_text_features; the image processor (PIL backend) and "
                 "tokenizer saved beside the weights")


class EvalError(ValueError):
    """Bad evaluation input; the message (one line) names the file, folder or option."""


# ------------------------------------------------------------------------------------------------ prompts


def dreambooth_templates(kind: str) -> list[str]:
    """The 25 DreamBooth evaluation prompt templates for `kind` ('object' or 'live'), with {token} and {class}."""
    if kind not in TEMPLATE_KINDS:
        raise EvalError(f"prompt template must be one of {', '.join(TEMPLATE_KINDS)}, got {kind!r}")
    return list(json.loads(PROMPTS_FILE.read_text(encoding="utf-8"))[kind])


def dreambooth_prompts(kind: str, token: str, class_name: str, images_per_prompt: int = 1) -> list[str]:
    """The DreamBooth prompts for one subject, each repeated `images_per_prompt` times in a row."""
    token, class_name = str(token).strip(), str(class_name).strip()
    if not token or not class_name:
        raise EvalError("a DreamBooth prompt needs a non-empty token (e.g. sks) and class (e.g. dog)")
    filled = [t.replace("{token}", token).replace("{class}", class_name) for t in dreambooth_templates(kind)]
    return repeat_prompts(filled, images_per_prompt)


def repeat_prompts(prompts: Sequence[str], images_per_prompt: int = 1) -> list[str]:
    if int(images_per_prompt) < 1:
        raise EvalError(f"images per prompt must be ≥ 1, got {images_per_prompt}")
    return [p for p in prompts for _ in range(int(images_per_prompt))]


def prompt_lines(text: str, source: str) -> list[str]:
    """One prompt per line; blank lines at the end are ignored, a blank line inside the list is an error."""
    lines = str(text).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise EvalError(f"{source}: no prompts (one line per generated image)")
    blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if blank:
        raise EvalError(f"{source}: line {blank[0]} is blank (one prompt per line, one line per generated image)")
    return [line.strip() for line in lines]


def read_prompt_lines(path: str | Path) -> list[str]:
    """The prompts of a text file, one per line (see :func:`prompt_lines`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EvalError(f"{path}: not a UTF-8 text file") from None
    except OSError as e:
        raise EvalError(f"{path}: cannot read the prompts file ({e.strerror or e})") from None
    return prompt_lines(text, str(path))


def prompts_for_batch(text: str, n: int, source: str = "prompts") -> list[str]:
    """Prompts of `n` images from a multi-line text: one line for every image, or exactly one line per image."""
    lines = prompt_lines(text, source)
    if len(lines) == 1:
        return lines * n
    if len(lines) != n:
        raise EvalError(f"{source}: {len(lines)} lines for {n} images (one line for all images, or one per image)")
    return lines


def match_prompts(images: Sequence[Path], prompt: str | None = None, prompts: Sequence[str] | None = None,
                  source: str = "--prompts") -> list[str]:
    """The prompt of each generated image (in the order given, i.e. sorted file names).

    `prompt`: one prompt for every image; `prompts`: exactly one per image; neither: ``<image stem>.txt``
    beside each image.  A count that does not match, or an image without a prompt, is an error.
    """
    if prompt is not None and prompts is not None:
        raise EvalError("give one prompt for all images or a list of prompts, not both")
    if prompt is not None:
        if not str(prompt).strip():
            raise EvalError("the prompt is empty")
        return [str(prompt).strip()] * len(images)
    if prompts is not None:
        if len(prompts) != len(images):
            where = f" in {Path(images[0]).parent}" if images and isinstance(images[0], Path) else ""
            raise EvalError(f"{source}: {len(prompts)} prompts for {len(images)} generated images{where} "
                            f"(one prompt per image, in sorted file-name order)")
        return [str(p).strip() for p in prompts]
    out, missing = [], []
    for img in images:
        side = Path(img).with_suffix(".txt")
        if side.is_file():
            text = side.read_text(encoding="utf-8").strip()
            if not text:
                raise EvalError(f"{side}: empty prompt file")
            out.append(text)
        else:
            missing.append(Path(img).name)
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise EvalError(f"no prompt for {', '.join(missing[:3])}{more}: give --prompt, --prompts or a "
                        f"<image name>.txt beside each image")
    return out


# ------------------------------------------------------------------------------------------------- images


def list_images(folder: str | Path, what: str = "images") -> tuple[list[Path], list[str]]:
    """(image files of `folder` in sorted file-name order, names of other files skipped).

    Prompt files beside images (``<image stem>.txt``) are not reported as skipped; sub-folders are ignored.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise EvalError(f"{folder}: no such folder ({what})")
    files = sorted((p for p in folder.iterdir() if p.is_file()), key=lambda p: p.name)
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    stems = {p.stem for p in images}
    skipped = [p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES
               and not (p.suffix.lower() == ".txt" and p.stem in stems)]
    if not images:
        raise EvalError(f"{folder}: no images ({what}; looked for {', '.join(IMAGE_SUFFIXES)})")
    return images, skipped


def open_rgb(source):
    """A PIL RGB image from a path, a PIL image, or an (H, W, 3) uint8 array (EXIF orientation applied)."""
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, np.ndarray):
        return Image.fromarray(source).convert("RGB")
    try:
        with Image.open(source) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise EvalError(f"{source}: not a readable image ({type(e).__name__})") from None


def comfy_to_pil(images) -> list:
    """ComfyUI IMAGE (B, H, W, C floats in [0, 1]) → PIL RGB images, quantised as ComfyUI's SaveImage does
    (clip(255·x) truncated to uint8), so a batch scores exactly as the PNG files SaveImage writes."""
    import numpy as np
    from PIL import Image

    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4 or images.shape[-1] not in (1, 3, 4):
        raise EvalError(f"expected an IMAGE batch (B, H, W, C), got shape {tuple(images.shape)}")
    arr = np.clip(255.0 * images.detach().cpu().float().numpy(), 0, 255).astype(np.uint8)
    out = []
    for a in arr:
        if a.shape[-1] == 1:
            a = np.repeat(a, 3, axis=-1)
        out.append(Image.fromarray(a[..., :3]).convert("RGB"))
    return out


def dino_preprocess(image) -> torch.Tensor:
    """(3, 224, 224) float tensor: shorter side → 256 (bicubic), centre crop 224, [0, 1], ImageNet mean/std."""
    import numpy as np
    from PIL import Image

    w, h = image.size
    if w <= h:
        size = (DINO_RESIZE, int(DINO_RESIZE * h / w))
    else:
        size = (int(DINO_RESIZE * w / h), DINO_RESIZE)
    if size != (w, h):
        image = image.resize(size, Image.BICUBIC)
    left = int(round((size[0] - DINO_CROP) / 2.0))
    top = int(round((size[1] - DINO_CROP) / 2.0))
    image = image.crop((left, top, left + DINO_CROP, top + DINO_CROP))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


# ------------------------------------------------------------------------------------------------- models

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def find_model_folders(root: str | Path, depth: int = 2) -> list[str]:
    """Folders under `root` (to `depth` levels) holding a ``config.json``: names relative to `root`, sorted."""
    root = Path(root)
    found = []
    if not root.is_dir():
        return found
    stack = [(root, 0)]
    while stack:
        d, level = stack.pop()
        try:
            entries = sorted(d.iterdir())
        except OSError:
            continue
        for e in entries:
            if e.is_dir():
                if (e / "config.json").is_file():
                    found.append(e.relative_to(root).as_posix())
                elif level + 1 < depth:
                    stack.append((e, level + 1))
    return sorted(found)


def _how_to_get(name: str) -> str:
    if _HUB_ID.match(name):
        return (f"download it once where there is internet (`huggingface-cli download {name}`) or pass a folder "
                f"saved with save_pretrained")
    return "pass a folder saved with save_pretrained or a Hugging Face id already in the local cache"


def resolve_model(name: str, role: str, model_type: str, option: str | None = None):
    """(location, config) of a local model: a save_pretrained folder, or a hub id in the local HF cache.

    Never downloads; a missing model, a folder without config.json, or a model of another type is an error.
    """
    from transformers import AutoConfig

    option = option or f"--{role}"
    name = str(name).strip()
    if not name:
        raise EvalError(f"{option}: no model given ({_how_to_get('')})")
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise EvalError(f"{option} {path}: not a model folder (no config.json; save one with save_pretrained)")
        location = str(path)
    elif _HUB_ID.match(name) and not name.startswith("."):
        location = name
    else:
        raise EvalError(f"{option} {name}: no such folder ({_how_to_get(name)})")
    try:
        config = AutoConfig.from_pretrained(location, local_files_only=True)
    except (OSError, ValueError) as e:
        if location == name and not path.exists():
            raise EvalError(f"{option} {name}: not found locally (no download is attempted); "
                            f"{_how_to_get(name)}") from None
        raise EvalError(f"{option} {location}: unreadable config.json ({str(e).splitlines()[0][:160]})") from None
    if config.model_type != model_type:
        raise EvalError(f"{option} {location}: a {config.model_type!r} model, expected {model_type!r} "
                        f"({'a DINO ViT such as facebook/dino-vits16' if role == 'dino' else 'a CLIP model'})")
    return location, config


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' load reports and progress bars off while models load (this module reports problems)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _load_weights(cls, location: str, option: str, **kwargs):
    try:
        with _quiet_transformers():
            model, info = cls.from_pretrained(location, local_files_only=True, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as e:
        raise EvalError(f"{option} {location}: cannot load the weights ({str(e).splitlines()[0][:160]}); "
                        f"{_how_to_get(location)}") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise EvalError(f"{option} {location}: {len(missing)} weights missing from the checkpoint "
                        f"(e.g. {missing[0]}): not a complete {cls.__name__}")
    return model.eval().requires_grad_(False)


def _pil_backend_kwargs() -> dict:
    """The image processor's PIL backend (the original CLIP preprocessing; transformers 5 would otherwise pick
    its torchvision backend, whose resize differs by a few 1/255 steps)."""
    try:
        import transformers
        major = int(transformers.__version__.split(".")[0])
    except (ImportError, ValueError):
        return {}
    return {"backend": "pil"} if major >= 5 else {"use_fast": False}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _features(out) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output whose pooler_output is it (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@dataclass
class Embeddings:
    """L2-normalised embeddings of a set of images (rows in the order of `names`)."""

    names: list[str]
    dino: torch.Tensor
    clip: torch.Tensor


class Scorer:
    """DINO ViT and CLIP loaded once; images embedded in batches under ``torch.inference_mode``."""

    def __init__(self, clip: str, dino: str, device: str | None = None, batch_size: int = 16,
                 options: tuple[str, str] = ("--clip", "--dino")):
        """`options`: how errors name the two models (the CLI's options by default)."""
        try:
            from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, ViTModel
        except ImportError:
            raise EvalError("evaluation needs the transformers package (pip install transformers)") from None

        if int(batch_size) < 1:
            raise EvalError(f"--batch-size must be ≥ 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.device = torch.device(device or default_device())
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise EvalError("--device cuda: no CUDA device available")
        clip_opt, dino_opt = options
        dino_loc, dino_cfg = resolve_model(dino, "dino", "vit", dino_opt)
        clip_loc, _ = resolve_model(clip, "clip", "clip", clip_opt)
        self.names = {"dino": dino_loc, "clip": clip_loc}
        self.dino = _load_weights(ViTModel, dino_loc, dino_opt, add_pooling_layer=False).to(self.device)
        self._interpolate = int(getattr(dino_cfg, "image_size", DINO_CROP)) != DINO_CROP
        self.clip = _load_weights(CLIPModel, clip_loc, clip_opt).to(self.device)
        try:
            self.processor = AutoImageProcessor.from_pretrained(clip_loc, local_files_only=True,
                                                                **_pil_backend_kwargs())
        except (OSError, ValueError):
            raise EvalError(f"{clip_opt} {clip_loc}: no image processor (preprocessor_config.json) beside the "
                            f"weights") from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(clip_loc, local_files_only=True)
        except (OSError, ValueError):
            raise EvalError(f"{clip_opt} {clip_loc}: no tokenizer (vocab.json/merges.txt or tokenizer.json) beside "
                            f"the weights") from None
        self.max_length = int(self.clip.config.text_config.max_position_embeddings)

    def models(self) -> dict:
        return {"dino": self.names["dino"], "clip": self.names["clip"], "dino_preprocess": DINO_PROTOCOL,
                "clip_preprocess": CLIP_PROTOCOL, "device": str(self.device)}

    @torch.inference_mode()
    def embed_images(self, sources: Sequence, names: Sequence[str] | None = None,
                     progress: Callable[[int], None] | None = None) -> Embeddings:
        """Embeddings of image files / PIL images / uint8 arrays; each image is read once for both models."""
        dino, clip = [], []
        for start in range(0, len(sources), self.batch_size):
            batch = [open_rgb(s) for s in sources[start:start + self.batch_size]]
            x = torch.stack([dino_preprocess(im) for im in batch]).to(self.device)
            hidden = self.dino(pixel_values=x, interpolate_pos_encoding=self._interpolate).last_hidden_state
            dino.append(hidden[:, 0].float().cpu())
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            clip.append(_features(self.clip.get_image_features(pixel_values=pixels)).float().cpu())
            if progress is not None:
                progress(len(batch))
        names = list(names) if names is not None else [str(s) if isinstance(s, (str, Path)) else f"image {i}"
                                                       for i, s in enumerate(sources)]
        return Embeddings(names, _unit(torch.cat(dino)), _unit(torch.cat(clip)))

    @torch.inference_mode()
    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised CLIP text features, one row per prompt (each distinct prompt encoded once)."""
        unique = list(dict.fromkeys(prompts))
        rows = []
        for start in range(0, len(unique), self.batch_size):
            enc = self.tokenizer(unique[start:start + self.batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            out = self.clip.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                              attention_mask=enc["attention_mask"].to(self.device))
            rows.append(_features(out).float().cpu())
        table = _unit(torch.cat(rows))
        index = {p: i for i, p in enumerate(unique)}
        return table[[index[p] for p in prompts]]

    def score(self, generated: Embeddings, references: Embeddings, prompts: Sequence[str]) -> dict:
        return score_embeddings(generated, references, self.embed_texts(prompts), prompts, self.models())


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def score_embeddings(generated: Embeddings, references: Embeddings, text: torch.Tensor, prompts: Sequence[str],
                     models: dict | None = None) -> dict:
    """The result object: mean pairwise cosines (DINO, CLIP-I), mean image–prompt cosine (CLIP-T), per image."""
    dino = generated.dino @ references.dino.T  # (G, R) cosines: rows are unit vectors
    clip_i = generated.clip @ references.clip.T
    clip_t = (generated.clip * text).sum(-1)
    check_finite({"dino": float(dino.mean()), "clip_i": float(clip_i.mean()), "clip_t": float(clip_t.mean())})
    per_image = [{"image": n, "prompt": p, "dino": float(d), "clip_i": float(c), "clip_t": float(t)}
                 for n, p, d, c, t in zip(generated.names, prompts, dino.mean(1), clip_i.mean(1), clip_t)]
    return {"dino": float(dino.mean()), "clip_i": float(clip_i.mean()), "clip_t": float(clip_t.mean()),
            "n_images": len(generated.names), "n_references": len(references.names), "models": dict(models or {}),
            "per_image": per_image}


def format_table(result: dict, title: str | None = None) -> str:
    """Per-image rows and the means, as text."""
    rows = result["per_image"]
    width = max([len("image")] + [len(Path(r["image"]).name) for r in rows])
    lines = [title] if title else []
    lines.append(f"{'image':<{width}}  {'DINO':>7}  {'CLIP-I':>7}  {'CLIP-T':>7}  prompt")
    for r in rows:
        prompt = r["prompt"] if len(r["prompt"]) <= 60 else r["prompt"][:57] + "..."
        lines.append(f"{Path(r['image']).name:<{width}}  {r['dino']:>7.4f}  {r['clip_i']:>7.4f}  "
                     f"{r['clip_t']:>7.4f}  {prompt}")
    lines.append(f"{'mean':<{width}}  {result['dino']:>7.4f}  {result['clip_i']:>7.4f}  {result['clip_t']:>7.4f}  "
                 f"({result['n_images']} images × {result['n_references']} references; raw cosines)")
    return "\n".join(lines)


def summary_line(result: dict) -> str:
    return (f"DINO {result['dino']:.4f}  CLIP-I {result['clip_i']:.4f}  CLIP-T {result['clip_t']:.4f}  "
            f"({result['n_images']} images, {result['n_references']} references)")


def check_finite(result: dict) -> dict:
    for k in ("dino", "clip_i", "clip_t"):
        if not math.isfinite(result[k]):
            raise EvalError(f"{k}: the score is not finite (an image or model produced NaN)")
    return result


# -------------------------------------------------------------------------------------------- folders


def embed_folder(scorer: Scorer, folder, what: str, note: Callable[[str], None] | None = None,
                 progress: Callable[[int], None] | None = None) -> Embeddings:
    """Embeddings of every image of `folder` (sorted file names); other files are skipped with a note."""
    images, skipped = list_images(folder, what)
    if skipped and note is not None:
        more = f" (+{len(skipped) - 5} more)" if len(skipped) > 5 else ""
        note(f"{folder}: skipped {len(skipped)} non-image file{'s' if len(skipped) > 1 else ''}: "
             f"{', '.join(skipped[:5])}{more}")
    return scorer.embed_images(images, [str(p) for p in images], progress)


def evaluate_folder(scorer: Scorer, images_dir, references: Embeddings, prompt: str | None = None,
                    prompts: Sequence[str] | None = None, prompts_source: str = "--prompts",
                    note: Callable[[str], None] | None = None,
                    progress: Callable[[int], None] | None = None) -> dict:
    """Score the images of `images_dir` against reference embeddings (prompt rules of :func:`match_prompts`)."""
    images, _ = list_images(images_dir, "generated images")
    matched = match_prompts(images, prompt, prompts, prompts_source)  # before any model runs: errors come first
    generated = embed_folder(scorer, images_dir, "generated images", note, progress)
    return scorer.score(generated, references, matched)
