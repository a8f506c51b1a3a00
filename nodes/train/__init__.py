"""Train LoRA² (SDXL) in ComfyUI: the train node, its settings nodes, and the glue between ComfyUI and
``lora2_train`` (one concept a module).

- :mod:`.node` — the train node (essentials) and the earlier all-inputs node;
  :mod:`.settings` — the settings nodes and every training widget; :mod:`.choices` — the widgets' choice lists;
- :mod:`.request` — the node's inputs → ``LoRA2Config`` → a backend → the adapter applied to MODEL and CLIP;
- :mod:`.embedded` — in-process training on the MODEL's U-Net; :mod:`.sd_scripts` — the sd-scripts subprocess;
- :mod:`.data` — examples of a folder, images or latents; :mod:`.encode` — VAE / CLIP encoding and its cache;
  :mod:`.text` — text-encoder training; :mod:`.unet` — the U-Net as the trainer's model;
  :mod:`.prediction` — prediction type and noise schedule; :mod:`.memory` — model management;
  :mod:`.autograd` — training through inference-mode models; :mod:`.samples` — samples; :mod:`.progress` —
  progress bar, live chart messages, the info line.
"""
from . import (autograd, choices, data, embedded, encode, memory, prediction, progress, request, samples,
               sd_scripts, settings, text, unet)
from .node import TrainLoRA2, TrainLoRA2Legacy
from .settings import DatasetSettings, RankSettings, SampleSettings, SdScriptsSettings, TrainingSettings

__all__ = ["TrainLoRA2", "TrainLoRA2Legacy", "RankSettings", "TrainingSettings", "DatasetSettings",
           "SampleSettings", "SdScriptsSettings", "autograd", "choices", "data", "embedded", "encode", "memory",
           "prediction", "progress", "request", "samples", "sd_scripts", "settings", "text", "unet"]
