"""API-format graph builders shared by the end-to-end tests."""
from __future__ import annotations


def sample_graph(ckpt_name: str, size: int = 256, steps: int = 2, seed: int = 0, prefix: str = "lora2_test",
                 lora: dict | None = None) -> dict:
    """checkpoint → (optional LoRA node) → text encode → KSampler → VAE decode → SaveImage.

    `lora` is ``{"class_type": ..., "inputs": {...}}`` without the model/clip links; it is inserted as node "10"
    and fed from the checkpoint loader.
    """
    model, clip = ["1", 0], ["1", 1]
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}}}
    if lora is not None:
        g["10"] = {"class_type": lora["class_type"], "inputs": dict(lora["inputs"], model=model, clip=clip)}
        model, clip = ["10", 0], ["10", 1]
    g.update({
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": clip}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": model, "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": seed, "steps": steps, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    })
    return g


def _settings_homes() -> dict:
    """Settings input of the train node → (class_type of its settings node, the inputs that node carries, its
    required widgets at their defaults)."""
    from nodes import NODE_CLASS_MAPPINGS
    from nodes.train import settings as S

    types = {cls: name for name, cls in NODE_CLASS_MAPPINGS.items()}
    return {socket: (types[node], set(node.defaults()),
                     {k: v for k, v in node.defaults().items() if k in node.INPUT_TYPES()["required"]})
            for socket, node in S.SETTINGS.items()}


def train_node(node_id: str, ckpt_loader: str, dataset_path, name, steps=2, **over) -> dict:
    """Train LoRA² (SDXL) as node `node_id`, embedded backend, fed from checkpoint loader node `ckpt_loader`:
    small defaults (256², ranks 8 → ≤ 16, attention), any input replaced through `over`; inputs that belong on a
    settings node go to one (ids `node_id` + 1…5, only those needed).  Returns the nodes by id."""
    inputs = {"model": [ckpt_loader, 0], "clip": [ckpt_loader, 1], "vae": [ckpt_loader, 2],
              "dataset_path": str(dataset_path), "instance_prompt": "a photo of sks toy", "steps": steps,
              "learning_rate": 1e-4, "r_max": 16, "r_target": 4, "seed": 0, "resolution": 256, "batch_size": 1,
              "target_modules": "attn", "backend": "embedded", "output_name": name}
    settings = {"rank_settings": {"nu_learning_rate": 1e-2, "r_init": 8, "q": 0.9, "lambda_r": 1.0,
                                  "lambda_e": 0.0}}
    homes = _settings_homes()
    for key, value in over.items():
        socket = next((sock for sock, (_, keys, _) in homes.items() if key in keys), None)
        if socket is None:
            inputs[key] = value
        else:
            settings.setdefault(socket, {})[key] = value
    graph = {node_id: {"class_type": "LoRA2TrainSDXL", "inputs": inputs}}
    for n, (socket, (class_type, _, required)) in enumerate(homes.items(), 1):
        if socket in settings:
            sid = f"{node_id}{n}"
            graph[sid] = {"class_type": class_type, "inputs": {**required, **settings[socket]}}
            inputs[socket] = [sid, 0]
    return graph


def rank_chart(train_id: str, chart_id: str, prefix: str = "chart") -> dict:
    """Visualize LoRA² Ranks on a Train LoRA² node's adapter and rank history (node `chart_id`), saved by a
    SaveImage node (id `chart_id` + 1)."""
    save_id = str(int(chart_id) + 1)
    return {chart_id: {"class_type": "LoRA2VisualizeRanks",
                       "inputs": {"lora_name": "(none)", "adapter": [train_id, 2], "history": [train_id, 3]}},
            save_id: {"class_type": "SaveImage", "inputs": {"images": [chart_id, 0], "filename_prefix": prefix}}}
