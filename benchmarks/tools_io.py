"""Rank tools vs raw safetensors I/O of the same bytes, in one run.

A full-size SDXL ragged adapter (the paper's 560 attention components, shapes from the real SDXL
UNet, random factors, ranks uniform in 8…256, fp16) is written to disk.  Each tool runs end to end
as the CLI does (read + validate, compute, atomic write) and is compared with a raw
``safetensors.torch.load_file`` of its inputs plus ``save_file`` of a state dict of exactly the
bytes it wrote (``inspect``: the raw read only).  Each tool writes a new file (as both arms do; replacing
a file with --overwrite adds an fsync before the rename).
Rounds are interleaved; medians are reported.  Last line: JSON with the seconds and the ratios (target ≤ 2×).

    python benchmarks/tools_io.py            # full size, ~3 min on 2 cores
    python benchmarks/tools_io.py --quick    # reduced shapes, for the test suite
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from _common import print_result, threads_note

from lora2_train.format import Adapter, LoRAModule, load_adapter, save_adapter
from lora2_train.models import SDXLUNet, sdxl_config
from lora2_train.naming import kohya_key
from lora2_train.network import target_pattern
from lora2_train.tools import inspect_adapter, merge, pad, truncate


def sdxl_attention_shapes() -> dict[str, tuple[int, int]]:
    """kohya key → (out, in) of the 560 attention projections of the full SDXL UNet (meta tensors)."""
    with torch.device("meta"):
        unet = SDXLUNet(sdxl_config())
    pattern = target_pattern(["attn1", "attn2"])
    return {kohya_key(n): (m.out_features, m.in_features) for n, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear) and pattern.search(n)}


def random_adapter(shapes, lo, hi, seed) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for key, (out, inp) in shapes.items():
        r = int(torch.randint(lo, hi + 1, (1,), generator=g))
        mods[key] = LoRAModule((torch.randn(r, inp, generator=g) * 0.02).half(),
                               (torch.randn(out, r, generator=g) * 0.02).half(), float(hi))
    return Adapter(mods, {"ss_base_model_version": "sdxl_base_v1-0", "lora2_version": "1",
                          "lora2_order": "importance"})


def tool_runs(a_path: Path, b_path: Path, out: Path):
    def inspect():
        inspect_adapter(load_adapter(a_path, mapped=True))

    def pad_():
        save_adapter(pad(load_adapter(a_path, mapped=True)), out, dtype=None, overwrite=True)

    def merge_():
        merged = merge([load_adapter(a_path, mapped=True), load_adapter(b_path, mapped=True)], dtype=torch.float16)  # as the CLI does
        save_adapter(merged, out, dtype="fp16", overwrite=True)

    def truncate_():
        save_adapter(truncate(load_adapter(a_path, mapped=True), fraction=0.5), out, dtype=None, overwrite=True)

    return {"inspect": (inspect, [a_path]), "pad": (pad_, [a_path]), "merge": (merge_, [a_path, b_path]),
            "truncate": (truncate_, [a_path])}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tenth of the modules, ranks 8…32")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    shapes = sdxl_attention_shapes()
    lo, hi = 8, 256
    if args.quick:
        shapes = dict(list(shapes.items())[::10])
        lo, hi = 8, 32
    with tempfile.TemporaryDirectory(prefix="lora2-tools-io-") as tmp:
        tmp = Path(tmp)
        a_path = save_adapter(random_adapter(shapes, lo, hi, 0), tmp / "a.safetensors", dtype="fp16")
        b_path = save_adapter(random_adapter(shapes, lo, hi, 1), tmp / "b.safetensors", dtype="fp16")
        size = a_path.stat().st_size
        out = tmp / "out.safetensors"
        runs = tool_runs(a_path, b_path, out)
        written = {}
        for name, (fn, _) in runs.items():  # warm-up; remember the bytes each tool writes
            fn()
            if name != "inspect":
                written[name] = load_file(str(out))
        raw_out = tmp / "raw.safetensors"
        tool_t = {n: [] for n in runs}
        raw_t = {n: [] for n in runs}
        for _ in range(args.rounds):
            for name, (fn, inputs) in runs.items():
                t0 = time.perf_counter()
                fn()
                tool_t[name].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                for path in inputs:
                    load_file(str(path))
                if name in written:
                    save_file(written[name], str(raw_out))
                raw_t[name].append(time.perf_counter() - t0)
                os.unlink(out) if out.exists() else None
                os.unlink(raw_out) if raw_out.exists() else None
    result = {"benchmark": "tools_io", "quick": args.quick, "modules": len(shapes), "ranks": [lo, hi],
              "adapter_mib": round(size / 2**20, 1), "threads": threads_note()}
    for name in runs:
        t, r = statistics.median(tool_t[name]), statistics.median(raw_t[name])
        result[f"{name}_s"] = round(t, 3)
        result[f"{name}_raw_s"] = round(r, 3)
        result[f"{name}_ratio"] = round(t / r, 2)
        print(f"{name:9s} {t:7.3f} s   raw read+write {r:7.3f} s   ratio {t / r:5.2f}")
    result["max_ratio"] = max(result[f"{n}_ratio"] for n in runs)
    print_result(result)
    return result


if __name__ == "__main__":
    main()
