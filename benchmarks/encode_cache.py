"""Encoding time of the Train LoRA² node's embedded backend: no disk cache vs the first run that fills it vs a
second run that reads it, in one process, on the same images.

ComfyUI's own VAE and CLIP (SDXL's full-size VAE, CLIP-L and CLIP-G, random weights) come from the random-weight
KOALA-700M test checkpoint (written into the test cache on first use, like the end-to-end tests do), loaded by
ComfyUI's checkpoint loader; the images are random, at the given resolution, each with its own caption.  Each
repeat times, on fresh cache folders and in alternating order, the node's encoding step
(``nodes.train.encode.encode_examples``:
VAE latents, caption embeddings, SDXL size conditioning) three ways:

* ``no_cache``: ``cache_to_disk`` off — what every run paid before the cache;
* ``first``: the cache empty — encodes everything and writes it (plus the encoders' probe passes);
* ``second``: the same data again — reads everything back (the probes still run).

Every arm's training data is checked bit-identical to the ``no_cache`` arm's.  Last line: JSON with the
medians and the ratios second / no_cache and first / no_cache.

    python benchmarks/encode_cache.py                     # 8 images at 512², 3 repeats
    python benchmarks/encode_cache.py --images 2 --resolution 256 --repeats 1   # quick
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "comfyui"))

import comfyui_harness as H  # noqa: E402
from tests_helpers import pack_module  # noqa: E402


def main(pack):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    comfy_dir = H.ensure_comfyui()
    checkpoint = H.ensure_checkpoint(comfy_dir)
    import comfy_inprocess as C

    C.import_comfy(comfy_dir)
    import comfy.sd

    _model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=True, output_clip=True)[:3]
    from lora2_train.cache import EncodeCache
    from lora2_train.dataset import to_example

    encode_examples = sys.modules[f"{pack.__name__}.nodes.train.encode"].encode_examples
    base = _model.model
    g = torch.Generator().manual_seed(0)
    examples = [to_example(torch.rand(3, args.resolution, args.resolution, generator=g),
                           f"a photo of sks toy number {i}", f"image{i}", args.resolution)
                for i in range(args.images)]

    def encode(root):
        cache = EncodeCache(root)
        t0 = time.perf_counter()
        data = encode_examples(base, clip, vae, examples, seed=0, cache=cache)
        return time.perf_counter() - t0, data, cache.report()

    def same(a, b):
        return all(torch.equal(x["latents"], y["latents"]) and all(torch.equal(x["cond"][k], y["cond"][k])
                                                                    for k in x["cond"]) for x, y in zip(a, b))

    encode(None)  # warm-up: model loading, first-call costs
    times = {"no_cache": [], "first": [], "second": []}
    reports = {}
    for i in range(args.repeats):
        root = Path(tempfile.mkdtemp(prefix="lora2-encode-cache-"))
        try:
            runs = {}
            order = ["no_cache", "cached"] if i % 2 == 0 else ["cached", "no_cache"]
            for arm in order:
                if arm == "no_cache":
                    runs["no_cache"] = encode(None)
                else:
                    runs["first"] = encode(root)
                    runs["second"] = encode(root)
            for arm, (t, data, report) in runs.items():
                times[arm].append(t)
                reports[arm] = report
                assert same(data, runs["no_cache"][1]), f"{arm}: training data differs from the uncached encoding"
        finally:
            shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:>9}: median {med[k]:7.2f} s  (min {min(v):.2f}, max {max(v):.2f})  {reports[k]}")
    print(json.dumps({
        "images": args.images, "resolution": args.resolution, "repeats": args.repeats,
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "ratio_second_vs_no_cache": round(med["second"] / med["no_cache"], 4),
        "ratio_first_vs_no_cache": round(med["first"] / med["no_cache"], 4),
        "reports": reports, "identical": True, "comfyui": H.comfyui_label(comfy_dir),
    }))


if __name__ == "__main__":
    import torch

    # ComfyUI runs every node, the checkpoint loader and the training node's encoding included, in inference mode
    with pack_module("comfyui_lora2") as pack, torch.inference_mode():
        main(pack)
