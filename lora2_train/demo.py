"""`python -m lora2_train demo`: LoRA² on a random-weight, reduced-width SDXL UNet with a planted teacher.

Writes to the output folder: ``lora2_demo.safetensors`` (kohya keys, ragged
ranks, LoRA² metadata), ``ranks.png``, ``rank_history.json`` and
``summary.json``.  Runs on CPU in about two minutes on 2 cores.
"""
from __future__ import annotations

import io
import json
import time
from pathlib import Path

import torch

from .config import LoRA2Config
from .format import adapter_from_network, atomic_write_bytes, save_adapter
from .models import SDXLUNet, reduced, sdxl_config
from .network import LoRA2Network
from .planted import RandomConditioning, make_teacher, plan_ranks, spearman, target_modules
from .trainer import Trainer

OUTPUTS = ("lora2_demo.safetensors", "ranks.png", "rank_history.json", "summary.json")

#: the demo's model: SDXL block structure (70 transformer blocks) at width 32
DEMO_UNET = dict(model_channels=32, context_dim=64, head_channels=16)
DEMO_CONFIG = dict(r_init=8, r_target=4, r_max=64, lr=2e-3, nu_lr=3e-2, lambda_r=1e-3, beta=1.0,
                   steps=120, resize_every=10, batch_size=2, checkpoint_every=50, seed=0)


def run_demo(out_dir: str | Path = "lora2_demo", steps: int | None = None, overwrite: bool = False,
             callback=None, latent_size: int = 8) -> dict:
    out = Path(out_dir)
    existing = [n for n in OUTPUTS if (out / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out / existing[0]}: already exists (pass --overwrite or choose --out)")
    torch.manual_seed(0)
    ucfg = reduced(sdxl_config(), **DEMO_UNET)
    unet = SDXLUNet(ucfg).requires_grad_(False)
    plan = plan_ranks(target_modules(unet))
    teacher = make_teacher(unet, plan, strength=3.0)
    cfg = LoRA2Config(**{**DEMO_CONFIG, **({"steps": steps} if steps else {})})
    network = LoRA2Network(cfg, unet).apply_to()
    data = RandomConditioning(ucfg.in_channels, latent_size, ucfg.context_dim, ucfg.adm_in_channels, tokens=16)
    t0 = time.perf_counter()
    result = Trainer(unet, network, data, cfg, teacher=teacher, out_dir=out, callback=callback).train()
    seconds = time.perf_counter() - t0

    adapter = adapter_from_network(network, cfg, extra={"backend": "embedded", "model": "sdxl-reduced-random"})
    save_adapter(adapter, out / OUTPUTS[0], dtype="fp16", overwrite=overwrite)
    from .plot import rank_chart
    buf = io.BytesIO()
    image = rank_chart([result.ranks], ["demo"], history=result.history, title="LoRA² demo: learned ranks")
    from PIL import Image
    Image.fromarray(image).save(buf, format="PNG")
    atomic_write_bytes(out / OUTPUTS[1], buf.getvalue(), overwrite=overwrite)
    atomic_write_bytes(out / OUTPUTS[2], json.dumps(result.history).encode(), overwrite=overwrite)
    keys = sorted(plan)
    ranks = list(result.ranks.values())
    summary = {
        "steps": result.steps,
        "seconds": round(seconds, 1),
        "components": len(ranks),
        "rank_min": min(ranks), "rank_max": max(ranks), "rank_mean": round(sum(ranks) / len(ranks), 2),
        "distinct_ranks": sorted(set(ranks)),
        "lora2_params": result.num_params,
        "final_mse": result.last.mse if result.last else None,
        "spearman_vs_planted": round(spearman([plan[k] for k in keys], [result.ranks[k] for k in keys]), 3),
        "outputs": [str(out / n) for n in OUTPUTS],
    }
    atomic_write_bytes(out / OUTPUTS[3], json.dumps(summary, indent=2).encode(), overwrite=True)
    return summary
