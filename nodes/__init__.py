"""ComfyUI node classes (classic node API).  Thin adapters: every computation lives in ``lora2_train``."""
from .train import (DatasetSettings, RankSettings, SampleSettings, SdScriptsSettings, TrainingSettings,
                    TrainLoRA2, TrainLoRA2Legacy)
from .load import LoadLoRA2Adapter
from .tools import MergeLoRA2Adapters, ZeroPadLoRA2Adapter
from .visualize import VisualizeLoRA2Ranks
from .evaluate import DreamBoothPrompt, ScoreImages

NODE_CLASS_MAPPINGS = {
    "LoRA2VisualizeRanks": VisualizeLoRA2Ranks,
    "LoRA2LoadAdapter": LoadLoRA2Adapter,
    "LoRA2ZeroPad": ZeroPadLoRA2Adapter,
    "LoRA2Merge": MergeLoRA2Adapters,
    "LoRA2TrainSDXL": TrainLoRA2,
    "LoRA2RankSettings": RankSettings,
    "LoRA2TrainingSettings": TrainingSettings,
    "LoRA2Dataset": DatasetSettings,
    "LoRA2Samples": SampleSettings,
    "LoRA2SdScripts": SdScriptsSettings,
    "LoRA2Train": TrainLoRA2Legacy,
    "LoRA2ScoreImages": ScoreImages,
    "LoRA2DreamBoothPrompt": DreamBoothPrompt,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LoRA2VisualizeRanks": "Visualize LoRA² Ranks",
    "LoRA2LoadAdapter": "Load LoRA² Adapter",
    "LoRA2ZeroPad": "Zero-Pad LoRA² Adapter",
    "LoRA2Merge": "Merge LoRA² Adapters",
    "LoRA2TrainSDXL": "Train LoRA² (SDXL)",
    "LoRA2RankSettings": "LoRA² Rank Settings",
    "LoRA2TrainingSettings": "LoRA² Training Settings",
    "LoRA2Dataset": "LoRA² Dataset",
    "LoRA2Samples": "LoRA² Samples",
    "LoRA2SdScripts": "LoRA² sd-scripts",
    "LoRA2Train": "Train LoRA² (SDXL, all inputs: legacy)",
    "LoRA2ScoreImages": "LoRA² Score Images (DINO / CLIP)",
    "LoRA2DreamBoothPrompt": "LoRA² DreamBooth Prompt",
}
