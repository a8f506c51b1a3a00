"""Trains one adapter through every way the Train LoRA² node can be given the same settings, inside a ComfyUI
import (no server), in its own process, and prints one JSON line: each way's digest of the saved tensors.

usage: python train_node_split_inprocess.py COMFYUI_DIR WORK_DIR
Ways: the workflow node of before the settings nodes (class ``LoRA2Train``, every input on one node), and
``LoRA2TrainSDXL`` fed by the settings nodes (``LoRA2RankSettings``, ``LoRA2TrainingSettings``,
``LoRA2Dataset``) — the same settings, seed and data (ComfyUI LATENT + CONDITIONING, so no VAE or CLIP is
needed), 12 steps with a re-allocation at step 10.
"""
import hashlib
import json
import os
import sys

from comfy_inprocess import TINY_SDXL_UNET, start_script  # (this script's own folder is on sys.path)

_, work, loras = start_script(sys.argv)

import importlib.util  # noqa: E402

import torch  # noqa: E402

import comfy.model_patcher  # noqa: E402
import comfy.supported_models  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
spec = importlib.util.spec_from_file_location("lora2_pack", os.path.join(ROOT, "__init__.py"),
                                              submodule_search_locations=[ROOT])
pack = importlib.util.module_from_spec(spec)
sys.modules["lora2_pack"] = pack
spec.loader.exec_module(pack)
NODES = pack.NODE_CLASS_MAPPINGS

from lora2_train.format import read_safetensors  # noqa: E402

torch.manual_seed(0)
with torch.inference_mode():  # as ComfyUI's checkpoint loader
    base = comfy.supported_models.SDXL(TINY_SDXL_UNET).get_model({})
    for p in base.diffusion_model.parameters():
        p.normal_(0, 0.02)
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    latents = {"samples": torch.randn(3, 4, 8, 8)}
    positive = [[torch.randn(1, 77, 2048), {"pooled_output": torch.randn(1, 1280), "width": 64, "height": 64}]]

#: the essentials (main node) and the settings each settings node carries, none at its default
ESSENTIALS = {"dataset_path": "", "instance_prompt": "sks", "steps": 12, "learning_rate": 1e-3, "r_target": 2,
              "r_max": 8, "seed": 3, "resolution": 64, "batch_size": 2, "target_modules": "attn",
              "backend": "embedded"}
RANK = {"r_init": 4, "q": 0.85, "lambda_r": 0.2, "lambda_e": 0.0, "beta": 2000.0, "nu_learning_rate": 0.05}
TRAINING = {"optimizer": "adamw", "gradient_checkpointing": False, "lr_scheduler": "cosine", "lr_warmup_steps": 2,
            "gradient_accumulation_steps": 1, "max_grad_norm": 0.5, "min_snr_gamma": 5.0, "noise_offset": 0.05,
            "loss_type": "huber", "huber_c": 0.2}
DATASET = {"latents": latents, "positive": positive}


def digest(name):
    tensors, _meta = read_safetensors(os.path.join(loras, name + ".safetensors"))
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def as_lists(inputs):  # an INPUT_IS_LIST node gets every input as a list
    return {k: [v] for k, v in inputs.items()}


found = {}
with torch.inference_mode():  # ComfyUI runs every node under inference mode
    legacy = NODES["LoRA2Train"]()
    legacy.run(model=[patcher], clip=[None], vae=[None], output_name=["legacy"], unique_id=["1"],
               **as_lists({**ESSENTIALS, **RANK, **TRAINING, **DATASET}))
    found["legacy"] = digest("legacy")
    if "LoRA2TrainSDXL" in NODES:
        (rank,) = NODES["LoRA2RankSettings"]().settings(**RANK)
        (training,) = NODES["LoRA2TrainingSettings"]().settings(**TRAINING)
        (dataset,) = NODES["LoRA2Dataset"]().run(**as_lists(DATASET))
        NODES["LoRA2TrainSDXL"]().train(model=patcher, clip=None, vae=None, output_name="split", unique_id="2",
                                        rank_settings=rank, training_settings=training, dataset=dataset,
                                        **ESSENTIALS)
        found["split"] = digest("split")
print(json.dumps({"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
                  "threads": torch.get_num_threads(), **found}))
