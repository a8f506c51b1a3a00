"""Example workflows: API-format graphs, and their UI-format (LiteGraph) twins built from /object_info.

``python tests/comfyui/workflows.py`` rewrites ``example_workflows/*.json`` from the graphs below, using the node
definitions of the test ComfyUI (so widget order and types are ComfyUI's own).  The end-to-end tests check that
the files match, that every API graph runs on the test server, and that every UI workflow is well formed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "example_workflows"
LORA = "my_lora2.safetensors"
LORA_B = "other_lora.safetensors"
CKPT = "sd_xl_base_1.0.safetensors"
SEED_INPUTS = {"seed", "noise_seed"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def load_and_sample() -> dict:
    """Checkpoint → Load LoRA² Adapter (max rank 32) → sample 1024² → save; the ranks chart beside it."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "LoRA2LoadAdapter", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_name": LORA, "strength_model": 1.0, "strength_clip": 1.0,
            "rank_budget": 32.0, "budget_mode": "max rank"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of sks dog on a beach", "clip": ["2", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, low quality", "clip": ["2", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "seed": 42,
            "steps": 25, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "lora2"}},
        "9": {"class_type": "LoRA2VisualizeRanks", "inputs": {"lora_name": LORA, "info": ["2", 2]}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
    }


def visualize() -> dict:
    """Rank chart of one adapter against another."""
    return {
        "1": {"class_type": "LoRA2VisualizeRanks", "inputs": {"lora_name": LORA, "compare_with": LORA_B}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "lora2_ranks"}},
    }


def pad_and_merge() -> dict:
    """Zero-pad one adapter; merge two exactly, re-compressed by SVD to rank 32; chart the merge."""
    return {
        "1": {"class_type": "LoRA2ZeroPad", "inputs": {"lora_name": LORA, "rank": 0, "output_name": "",
                                                       "dtype": "fp16"}},
        "2": {"class_type": "LoRA2Merge", "inputs": {
            "lora_1": LORA, "weight_1": 1.0, "lora_2": LORA_B, "weight_2": 0.5, "mode": "exact + SVD resize (rank)",
            "rank": 32, "energy": 0.99, "output_name": "merged", "dtype": "fp16"}},
        "3": {"class_type": "LoRA2VisualizeRanks", "inputs": {"lora_name": LORA, "compare_with": LORA_B,
                                                              "info": ["2", 1]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }


EVAL_DINO = "dino-vits16"  # folders saved with save_pretrained in ComfyUI/models/lora2_eval
EVAL_CLIP = "clip-vit-large-patch14"
REFERENCES = "lora2_references/sks_dog"  # the subject's photos, inside ComfyUI's input folder


def budget_eval() -> dict:
    """One adapter at two rank budgets (full, and a quarter of each module's rank), sampled with the same
    DreamBooth prompt and seed, each batch scored (DINO, CLIP-I, CLIP-T) against the subject's photos."""
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "LoRA2DreamBoothPrompt", "inputs": {"kind": "live", "index": 2, "token": "sks",
                                                                "class_name": "dog"}},
        "20": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 4}},
    }
    for n, (budget, mode, prefix) in enumerate(((0.0, "max rank", "lora2_full"),
                                                (0.25, "fraction", "lora2_quarter"))):
        b = 3 + 10 * n  # nodes 3…9 (full budget) and 13…19 (a quarter of each module's rank)
        g.update({
            str(b): {"class_type": "LoRA2LoadAdapter", "inputs": {
                "model": ["1", 0], "clip": ["1", 1], "lora_name": LORA, "strength_model": 1.0,
                "strength_clip": 1.0, "rank_budget": budget, "budget_mode": mode}},
            str(b + 1): {"class_type": "CLIPTextEncode", "inputs": {"text": ["2", 0], "clip": [str(b), 1]}},
            str(b + 2): {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, low quality",
                                                                    "clip": [str(b), 1]}},
            str(b + 3): {"class_type": "KSampler", "inputs": {
                "model": [str(b), 0], "positive": [str(b + 1), 0], "negative": [str(b + 2), 0],
                "latent_image": ["20", 0], "seed": 42, "steps": 25, "cfg": 7.0, "sampler_name": "euler",
                "scheduler": "normal", "denoise": 1.0}},
            str(b + 4): {"class_type": "VAEDecode", "inputs": {"samples": [str(b + 3), 0], "vae": ["1", 2]}},
            str(b + 5): {"class_type": "SaveImage", "inputs": {"images": [str(b + 4), 0], "filename_prefix": prefix}},
            str(b + 6): {"class_type": "LoRA2ScoreImages", "inputs": {
                "images": [str(b + 4), 0], "prompts": ["2", 0], "dino_model": EVAL_DINO, "clip_model": EVAL_CLIP,
                "references_folder": REFERENCES, "batch_size": 16}},
        })
    return g


EXAMPLES = {"lora2_load_and_sample": load_and_sample, "lora2_visualize": visualize,
            "lora2_pad_and_merge": pad_and_merge, "lora2_budget_eval": budget_eval}


def _is_link(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int)


def _is_widget(spec) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def api_to_ui(graph: dict, object_info: dict) -> dict:
    """The UI-format workflow of an API-format graph (LiteGraph JSON as ComfyUI's frontend saves it)."""
    ids = sorted(graph, key=int)
    depth: dict[str, int] = {}

    def d(n):
        if n not in depth:
            srcs = [v[0] for v in graph[n]["inputs"].values() if _is_link(v)]
            depth[n] = 1 + max((d(s) for s in srcs), default=-1)
        return depth[n]

    for n in ids:
        d(n)
    nodes, links, per_col = [], [], {}
    out_links: dict[tuple, list] = {}
    for order, n in enumerate(sorted(ids, key=lambda n: (depth[n], int(n)))):
        node = graph[n]
        info = object_info[node["class_type"]]
        specs = list(info["input"].get("required", {}).items()) + list(info["input"].get("optional", {}).items())
        inputs, widgets = [], []
        for name, spec in specs:
            v = node["inputs"].get(name)
            if _is_link(v) or not _is_widget(spec):
                entry = {"name": name, "type": spec[0] if isinstance(spec[0], str) else "COMBO", "link": None}
                if _is_link(v) and _is_widget(spec):  # a widget converted to an input: its value stays listed
                    entry["widget"] = {"name": name}
                    widgets.append((spec[1] or {}).get("default", "") if len(spec) > 1 else "")
                if _is_link(v):
                    link_id = len(links) + 1
                    src = graph[v[0]]
                    src_type = object_info[src["class_type"]]["output"][v[1]]
                    links.append([link_id, int(v[0]), v[1], int(n), len(inputs), src_type])
                    out_links.setdefault((v[0], v[1]), []).append(link_id)
                    entry["link"] = link_id
                inputs.append(entry)
                continue
            if v is None:
                v = (spec[1] or {}).get("default") if len(spec) > 1 else None
                if v is None and isinstance(spec[0], list):
                    v = spec[0][0] if spec[0] else ""
            widgets.append(v)
            if name in SEED_INPUTS:
                widgets.append("fixed")
        col = depth[n]
        per_col[col] = per_col.get(col, 0) + 1
        nodes.append({
            "id": int(n), "type": node["class_type"], "pos": [50 + 380 * col, 50 + 260 * (per_col[col] - 1)],
            "size": [340, 120 + 26 * len(widgets)], "flags": {}, "order": order, "mode": 0, "inputs": inputs,
            "outputs": [{"name": name, "type": t, "links": None, "slot_index": i}
                        for i, (t, name) in enumerate(zip(info["output"], info["output_name"]))],
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets,
        })
    for node in nodes:
        for out in node["outputs"]:
            out["links"] = out_links.get((str(node["id"]), out["slot_index"]), [])
    nodes.sort(key=lambda x: x["id"])
    return {"last_node_id": max(int(n) for n in ids), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def write_examples(object_info: dict, out: Path = OUT) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, build in EXAMPLES.items():
        graph = build()
        for suffix, data in (("_api.json", graph), (".json", api_to_ui(graph, object_info))):
            path = out / f"{name}{suffix}"
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
            written.append(path)
    return written


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    import comfyui_harness as H

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        server = H.ComfyUIServer(H.ensure_comfyui(), Path(tmp)).start()
        try:
            for p in write_examples(server.object_info()):
                print(p.relative_to(ROOT))
        finally:
            server.stop()
