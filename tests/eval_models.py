"""Tiny random-weight DINO (ViTModel) and CLIP (CLIPModel + image processor + tokenizer) folders, and test images.

Built in the test process and saved with ``save_pretrained``, as a user's downloaded models would be; nothing is
downloaded.  The CLIP tokenizer is a byte-level BPE over lowercase letters, digits and a few merges.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLIP_CROP = 64  # the tiny CLIP's input size (its image processor resizes and crops to it)
_MERGES = ["s k", "sk s</w>", "d o", "do g</w>", "c a", "ca t</w>"]


def make_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!'")
    merged = []
    for m in _MERGES:
        merged.append(m.replace(" ", ""))
    words = chars + [c + "</w>" for c in chars] + merged + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    src = folder / "_vocab"
    src.mkdir(parents=True, exist_ok=True)
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
    return CLIPTokenizer.from_pretrained(str(src))


def make_models(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """(clip folder, dino folder) under `root`, with random weights from `seed`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, ViTConfig, ViTModel

    root = Path(root)
    dino_dir, clip_dir = root / "dino-tiny", root / "clip-tiny"
    torch.manual_seed(seed)
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=224, patch_size=16), add_pooling_layer=False)
    vit.save_pretrained(dino_dir)
    tok = make_tokenizer(root)
    text = dict(vocab_size=len(tok.get_vocab()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=32, eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=CLIP_CROP, patch_size=16)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    clip.save_pretrained(clip_dir)
    tok.save_pretrained(clip_dir)
    CLIPImageProcessor(size={"shortest_edge": CLIP_CROP}, crop_size={"height": CLIP_CROP, "width": CLIP_CROP}
                       ).save_pretrained(clip_dir)
    return clip_dir, dino_dir


def make_image(seed: int, size=(96, 80)) -> Image.Image:
    """A structured RGB image (gradient, a bright rectangle, noise) that differs with `seed`."""
    g = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = g.uniform(0, 255, 3)[None, None] * (0.4 + 0.6 * (xx / w)[..., None])
    x0, y0 = int(g.integers(0, w // 2)), int(g.integers(0, h // 2))
    base[y0:y0 + h // 3, x0:x0 + w // 3] = g.uniform(0, 255, 3)
    base += g.normal(0, 12, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def write_images(folder: Path, n: int, seed: int = 0, prefix: str = "img", sizes=None, suffix: str = ".png"):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = sizes or [(96, 80), (80, 112), (64, 64), (300, 200)]
    paths = []
    for i in range(n):
        p = folder / f"{prefix}_{i:04d}{suffix}"
        make_image(seed * 100003 + i, sizes[i % len(sizes)]).save(p)
        paths.append(p)
    return paths
