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


def small_adapter(ranks: list[int], seed: int = 0, width: int = 64):
    """A LoRA² adapter over a few attention projections with the given per-module ranks (importance order)."""
    from lora2_train.format import FORMAT_VERSION, Adapter, LoRAModule, with_rank_metadata

    g = torch.Generator().manual_seed(seed)
    modules = {}
    for i, r in enumerate(ranks):
        key = f"lora_unet_input_blocks_{4 + i // 3}_1_transformer_blocks_0_attn1_to_{'qkv'[i % 3]}"
        down = torch.randn(r, width, generator=g) / width ** 0.5
        up = torch.randn(width, r, generator=g) * torch.linspace(1.0, 0.1, r)  # decreasing importance
        modules[key] = LoRAModule(down, up, float(r))
    meta = {"lora2_version": FORMAT_VERSION, "lora2_order": "importance"}
    return with_rank_metadata(Adapter(modules, meta))


def degraded_copies(references: list[Path], folder: Path, noise: float, copies: int = 2, seed: int = 0):
    """Synthetic "generated" images: each reference with Gaussian pixel noise of std `noise` (0–255 scale)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    for i, ref in enumerate(references):
        base = np.asarray(Image.open(ref).convert("RGB"), dtype=np.float32)
        for c in range(copies):
            img = np.clip(base + g.normal(0, noise, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"gen_{i:02d}_{c}.png")
    return folder


def demo_chart(out: Path, work: Path) -> dict:
    """The demonstration chart of docs/evaluation.md: two adapters (ragged LoRA², fixed-rank LoRA) at several budgets, scored
    by tiny random-weight models on synthetic images (references plus noise that shrinks with the budget)."""
    import json as _json

    from lora2_train import cli
    from lora2_train.format import save_adapter

    work = Path(work)
    clip_dir, dino_dir = make_models(work / "models")
    refs = write_images(work / "ref", 4, seed=7, sizes=[(128, 128)])
    lora2 = work / "lora2_ragged.safetensors"
    fixed = work / "lora_r16.safetensors"
    save_adapter(small_adapter([4, 8, 16, 24, 32, 12, 6, 20, 28], seed=1), lora2)
    save_adapter(small_adapter([16] * 9, seed=2), fixed)
    entries = []
    for path, budgets in ((lora2, ("full", "fraction=0.5", "fraction=0.25", "max_rank=4")),
                          (fixed, ("full", "max_rank=8", "max_rank=4"))):
        for j, b in enumerate(budgets):
            noise = {"full": 10, "fraction=0.5": 30, "fraction=0.25": 60, "max_rank=4": 90, "max_rank=8": 45}[b]
            folder = degraded_copies(refs, work / f"{path.stem}_{j}", noise, seed=j + 10 * len(entries))
            entries += ["--entry", str(path), b, str(folder)]
    argv = ["eval-budget", *entries, "--references", str(work / "ref"), "--clip", str(clip_dir), "--dino",
            str(dino_dir), "--device", "cpu", "--prompt", "a sks dog", "-o", str(out), "--overwrite", "--json",
            "--title", "DEMONSTRATION of the chart only: tiny random-weight models, synthetic images",
            "--note", "not a quality figure: 'generated' images are the references plus noise that shrinks "
                      "with the budget"]
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(argv)
    if rc != 0:
        raise RuntimeError(f"eval-budget failed with exit code {rc}")
    return _json.loads(buf.getvalue())


if __name__ == "__main__":  # python tests/eval_models.py docs/eval_budget_demo.png
    import sys
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    with tempfile.TemporaryDirectory() as tmp:
        result = demo_chart(Path(sys.argv[1]), Path(tmp))
    for e in result["entries"]:
        print(f"{e['label']:<14} {e['budget']:<14} {e['params']:>7}  DINO {e['dino']:.3f}  CLIP-I {e['clip_i']:.3f}"
              f"  CLIP-T {e['clip_t']:.3f}")
