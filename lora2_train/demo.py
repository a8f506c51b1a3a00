"""`python -m lora2_train demo`: LoRA² on a planted-rank teacher, the task of benchmarks/planted_ranks.py.

The model is 15 SDXL transformer blocks side by side (random weights, width 128); the teacher is
the same model with ΔW of known rank planted in its cross-attention value/output pairs (ranks
1…64, two pairs per rank) and nothing planted elsewhere (spec §7).  LoRA² distils the teacher
and should give each component a rank that rises with the rank planted in it.

Writes to the output folder: ``lora2_demo.safetensors`` (kohya keys, ragged ranks, LoRA²
metadata), ``ranks.png`` (learned against planted rank, and ranks over training),
``rank_history.json`` and ``summary.json``.  Runs on CPU in about two minutes on 2 cores.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .config import LoRA2Config
from .format import adapter_from_network, atomic_write_bytes, save_adapter
from .network import LoRA2Network
from .planted import build_planted_task, rank_metrics
from .trainer import Trainer

OUTPUTS = ("lora2_demo.safetensors", "ranks.png", "rank_history.json", "summary.json")

#: the demo's run: LoRA2Config()'s defaults (those of every entry point) with the planted benchmark's budget
#: (300 steps of batch 8) and the learning rate its sweep selects for this task
DEMO_CONFIG = dict(lr=2e-3, steps=300, batch_size=8, checkpoint_every=100, seed=0)


def run_demo(out_dir: str | Path = "lora2_demo", steps: int | None = None, overwrite: bool = False,
             callback=None) -> dict:
    out = Path(out_dir)
    existing = [n for n in OUTPUTS if (out / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out / existing[0]}: already exists (pass --overwrite or choose --out)")
    cfg = LoRA2Config(**{**DEMO_CONFIG, **({"steps": steps} if steps else {})})
    model, teacher, plan, data = build_planted_task(cfg.seed)
    network = LoRA2Network(cfg, model).apply_to()
    t0 = time.perf_counter()
    result = Trainer(model, network, data, cfg, teacher=teacher, out_dir=out, callback=callback).train()
    seconds = time.perf_counter() - t0

    adapter = adapter_from_network(network, cfg, base_model="planted-stack",
                                   extra={"backend": "embedded", "model": "planted-stack-random"})
    save_adapter(adapter, out / OUTPUTS[0], dtype="fp16", overwrite=overwrite)
    from .plot import planted_chart, png_bytes
    learned = {k: layer.effective_rank() for k, layer in network.layers.items()}
    image = planted_chart(plan, learned, history=result.history, title="LoRA² demo: learned vs planted rank")
    atomic_write_bytes(out / OUTPUTS[1], png_bytes(image), overwrite=overwrite)
    atomic_write_bytes(out / OUTPUTS[2], json.dumps(result.history).encode(), overwrite=overwrite)
    ranks = list(result.ranks.values())
    summary = {
        "steps": result.steps,
        "seconds": round(seconds, 1),
        "components": len(ranks),
        **rank_metrics(plan, learned, cfg.r_min),
        "rank_min": min(ranks), "rank_max": max(ranks), "rank_mean": round(sum(ranks) / len(ranks), 2),
        "lora2_params": result.num_params,
        "final_mse": result.last.mse if result.last else None,
        "outputs": [str(out / n) for n in OUTPUTS],
    }
    atomic_write_bytes(out / OUTPUTS[3], json.dumps(summary, indent=2).encode(), overwrite=True)
    return summary
