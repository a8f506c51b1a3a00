"""An offline tokenizer folder for sd-scripts' ``--tokenizer_cache_dir``.

sd-scripts' SDXL trainer loads two CLIP tokenizers by hub id; with
``--tokenizer_cache_dir DIR`` it first looks for ``DIR/<id with '/' → '_'>``.
Both SDXL tokenizers use the same CLIP BPE vocabulary (``vocab.json`` +
``merges.txt``; ComfyUI ships it as ``comfy/sd1_tokenizer``); they differ in
the padding token only (sd-scripts sets the second one's pad id to 0 anyway).

    python -m lora2_train.kohya.tokenizers --from ComfyUI/comfy/sd1_tokenizer --out ~/sd-tokenizers
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

#: sd-scripts' SDXL tokenizer ids (library/strategy_sdxl.py) → padding token of each
SDXL_TOKENIZERS = {"openai/clip-vit-large-patch14": "<|endoftext|>",
                   "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k": "!"}
FILES = ("vocab.json", "merges.txt")


def make_tokenizer_cache(source, cache_dir, overwrite: bool = False) -> list[Path]:
    """Write one CLIPTokenizer folder per SDXL tokenizer id under `cache_dir` from `source`'s vocab.json and
    merges.txt; returns the folders.  Refuses to replace an existing folder unless `overwrite`."""
    source, cache_dir = Path(source).expanduser(), Path(cache_dir).expanduser()
    for name in FILES:
        if not (source / name).is_file():
            raise FileNotFoundError(f"{source}: no {name} (expected a CLIP tokenizer folder, e.g. comfy/sd1_tokenizer)")
    try:
        vocab = json.loads((source / "vocab.json").read_text(encoding="utf-8"))
    except ValueError:
        raise ValueError(f"{source / 'vocab.json'}: not valid JSON") from None
    for token in ("<|startoftext|>", "<|endoftext|>"):
        if token not in vocab:
            raise ValueError(f"{source / 'vocab.json'}: lacks the CLIP special token {token!r}")
    made = []
    for hub_id, pad in SDXL_TOKENIZERS.items():
        folder = cache_dir / hub_id.replace("/", "_")
        if folder.exists() and not overwrite:
            raise FileExistsError(f"{folder}: already exists (pass --overwrite to replace it)")
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in FILES:
            shutil.copyfile(source / name, tmp / name)
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
                  "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                  "pad_token": pad, "errors": "replace", "add_prefix_space": False}
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
        made.append(folder)
    return made


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora2_train.kohya.tokenizers", description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="source", required=True, help="folder with a CLIP vocab.json and merges.txt")
    p.add_argument("--out", required=True, help="the folder to pass as --tokenizer_cache_dir")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        for folder in make_tokenizer_cache(args.source, args.out, args.overwrite):
            print(folder)
    except (OSError, ValueError) as e:
        print(f"lora2_train.kohya.tokenizers: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
